//! The HTTP server bounds what slow, idle or many clients can hold: header,
//! body and idle timeouts, and a connection cap below the fd limit.

mod common;

use std::time::{Duration, Instant};

use common::Daemon;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn host_port(d: &Daemon) -> String {
    d.url.trim_start_matches("http://").to_owned()
}

/// Reads until the server closes the connection; how long that took.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((started + limit).into(), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => {}
            Err(_) => panic!("connection still open after {limit:?}"),
        }
    }
}

async fn health_within(d: &Daemon, limit: Duration) {
    let http = reqwest::Client::builder()
        .timeout(limit)
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let started = Instant::now();
    let r = http.get(format!("{}/v1/health", d.url)).send().await;
    assert!(
        r.as_ref().is_ok_and(|r| r.status() == 200),
        "/v1/health did not answer within {limit:?}: {r:?} after {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn idle_connections_under_a_1024_fd_limit_do_not_lock_out_health() {
    let d = Daemon::start_wrapped(&["prlimit", "--nofile=1024"], &[]);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", d.pid())).unwrap();
    let nofile = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .to_owned();
    assert!(
        nofile
            .split_whitespace()
            .skip(3)
            .take(2)
            .all(|n| n == "1024"),
        "prlimit did not apply: {nofile}"
    );
    let addr = host_port(&d);
    let mut idle = Vec::new();
    for _ in 0..1100 {
        match tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(&addr)).await {
            Ok(Ok(s)) => idle.push(s),
            Ok(Err(e)) => panic!("connect failed: {e}"),
            Err(_) => panic!("connect timed out after {} connections", idle.len()),
        }
    }
    assert_eq!(idle.len(), 1100);
    for _ in 0..5 {
        health_within(&d, Duration::from_secs(1)).await;
    }
    // And once more after another wave.
    for _ in 0..200 {
        if let Ok(Ok(s)) =
            tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(&addr)).await
        {
            idle.push(s);
        }
    }
    health_within(&d, Duration::from_secs(1)).await;
    drop(idle);
}

#[tokio::test]
async fn half_sent_headers_and_idle_keep_alive_are_closed() {
    // The default (10 s, unit-tested in api::listen) shortened to keep the
    // lane fast; the closing is the same.
    let d = Daemon::start_with(&["--header-timeout", "3"], &[]);
    let addr = host_port(&d);
    // Never a complete head.
    let mut half = TcpStream::connect(&addr).await.unwrap();
    half.write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    // Nothing at all.
    let mut silent = TcpStream::connect(&addr).await.unwrap();
    // One request, then idle on a kept-alive connection.
    let mut kept = TcpStream::connect(&addr).await.unwrap();
    kept.write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = kept.read(&mut buf).await.unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    let (a, b, c) = tokio::join!(
        closed_within(&mut half, Duration::from_secs(6)),
        closed_within(&mut silent, Duration::from_secs(6)),
        closed_within(&mut kept, Duration::from_secs(6)),
    );
    eprintln!("closed after {a:?}, {b:?}, {c:?}");
    health_within(&d, Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_dripped_body_is_cut_at_the_body_deadline() {
    let d = Daemon::start_with(&["--body-timeout", "3"], &[]);
    let addr = host_port(&d);
    let mut s = TcpStream::connect(&addr).await.unwrap();
    s.write_all(
        b"PUT /v1/meshes/m/services/slow HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{",
    )
    .await
    .unwrap();
    let started = Instant::now();
    let drip = async {
        // A byte every second: never idle long enough for an inactivity timer.
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if s.write_all(b" ").await.is_err() {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(15), drip).await;
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(15),
        "the server kept reading a dripped body for {elapsed:?}"
    );
    let (_, list) = d.get("/v1/meshes/m/services").await;
    assert_eq!(list["services"], serde_json::json!([]));
}
