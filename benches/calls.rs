//! `make bench`: what meshbox adds, measured against a baseline in the same run.
//!
//! 1. A tool call through the HTTP API vs the same call over a direct stdio
//!    pipe to the same fixture server, at 1 and at 64 concurrent callers:
//!    p50/p99 latency, calls/s, and the ratio.
//! 2. Deploy-to-running through the API vs the bare process start + MCP
//!    handshake (initialize, initialized, every tools/list page).

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{median, Daemon, Direct};
use serde_json::json;

const SEQ_CALLS: usize = 3000;
const CONC: usize = 64;
const CONC_CALLS_EACH: usize = 60;
const STARTS: usize = 10;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/py_server")
}

struct Stats {
    p50: Duration,
    p99: Duration,
    per_sec: f64,
}

fn stats(mut lat: Vec<Duration>, wall: Duration) -> Stats {
    lat.sort();
    let pick = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)];
    Stats {
        p50: pick(0.50),
        p99: pick(0.99),
        per_sec: lat.len() as f64 / wall.as_secs_f64(),
    }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

async fn run_load<F, Fut>(callers: usize, each: usize, call: F) -> Stats
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..callers {
        let call = call.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(each);
            for _ in 0..each {
                let t = Instant::now();
                call().await;
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    stats(all, start.elapsed())
}

fn row(label: &str, base: &Stats, mesh: &Stats) {
    println!(
        "{label:<22} direct p50 {:>8.1} µs  p99 {:>8.1} µs  {:>8.0}/s | meshbox p50 {:>8.1} µs  p99 {:>8.1} µs  {:>8.0}/s | added p50 {:>7.1} µs  ratio p50 {:.2}x  throughput {:.2}x",
        us(base.p50),
        us(base.p99),
        base.per_sec,
        us(mesh.p50),
        us(mesh.p99),
        mesh.per_sec,
        us(mesh.p50) - us(base.p50),
        us(mesh.p50) / us(base.p50),
        mesh.per_sec / base.per_sec,
    );
}

#[tokio::main]
async fn main() {
    let data = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(data.path().to_path_buf(), None).await;
    let base = daemon.base.clone();
    let http = reqwest::Client::new();
    let spec = json!({"source": format!("path:{}", fixture().display())});

    println!("meshbox bench — fixture: tests/fixtures/py_server (python), process backend");
    println!();
    println!("== deploy-to-running vs bare start + handshake (median of {STARTS}) ==");
    let mut bare = Vec::new();
    let mut deploy = Vec::new();
    for i in 0..STARTS {
        let t = Instant::now();
        let d = Direct::spawn(&["python3", "server.py"], &fixture()).await;
        let n = d.handshake().await;
        bare.push(t.elapsed());
        assert_eq!(n, 15);
        drop(d);
        let t = Instant::now();
        let r = http
            .put(format!("{base}/v1/meshes/bench/services/start{i}"))
            .json(&spec)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        deploy.push(t.elapsed());
        http.delete(format!("{base}/v1/meshes/bench/services/start{i}"))
            .send()
            .await
            .unwrap();
    }
    let (b, m) = (median(bare), median(deploy));
    println!(
        "bare start+handshake {:>8.1} ms | meshbox deploy-to-running {:>8.1} ms | ratio {:.2}x (target ≤ 1.20x)",
        b.as_secs_f64() * 1e3,
        m.as_secs_f64() * 1e3,
        m.as_secs_f64() / b.as_secs_f64()
    );

    println!();
    println!("== tool call `echo`: HTTP API vs direct stdio pipe (same server code) ==");
    let r = http
        .put(format!("{base}/v1/meshes/bench/services/calls"))
        .json(&spec)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let direct = Arc::new(Direct::spawn(&["python3", "server.py"], &fixture()).await);
    direct.handshake().await;
    let body = json!({"tool": "echo", "arguments": {"text": "hello"}}).to_string();
    let url = format!("{base}/v1/meshes/bench/services/calls/call");

    let direct_call = {
        let direct = direct.clone();
        move || {
            let direct = direct.clone();
            async move {
                let r = direct
                    .request(
                        "tools/call",
                        json!({"name": "echo", "arguments": {"text": "hello"}}),
                    )
                    .await;
                assert_eq!(r["result"]["content"][0]["text"], "hello");
            }
        }
    };
    let mesh_call = {
        let http = http.clone();
        move || {
            let (http, url, body) = (http.clone(), url.clone(), body.clone());
            async move {
                let r = http
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                let _ = r.bytes().await.unwrap();
            }
        }
    };
    // Warm up both paths.
    run_load(4, 100, direct_call.clone()).await;
    run_load(4, 100, mesh_call.clone()).await;

    let health_url = format!("{base}/v1/health");
    let floor = {
        let http = http.clone();
        move || {
            let (http, url) = (http.clone(), health_url.clone());
            async move {
                let r = http.get(&url).send().await.unwrap();
                let _ = r.bytes().await.unwrap();
            }
        }
    };
    run_load(1, 200, floor.clone()).await;
    let f = run_load(1, SEQ_CALLS, floor).await;
    println!(
        "HTTP floor (GET /v1/health, no MCP): p50 {:.1} µs  p99 {:.1} µs",
        us(f.p50),
        us(f.p99)
    );
    let b1 = run_load(1, SEQ_CALLS, direct_call.clone()).await;
    let m1 = run_load(1, SEQ_CALLS, mesh_call.clone()).await;
    row("1 caller", &b1, &m1);
    let b64 = run_load(CONC, CONC_CALLS_EACH, direct_call).await;
    let m64 = run_load(CONC, CONC_CALLS_EACH, mesh_call).await;
    row("64 concurrent callers", &b64, &m64);
    println!("(target: ≤ 60 µs added p50 per call)");

    daemon.stop().await;
}
