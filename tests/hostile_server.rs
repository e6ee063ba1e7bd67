//! A hostile server against the real daemon (issue 9): each attack that used
//! to wedge, exhaust or outlive meshbox, proven harmless.

mod common;

use std::time::{Duration, Instant};

use common::{fixture, pid_alive, rss_kib, Daemon, RssSampler};
use serde_json::{json, Value};

const UP: Duration = Duration::from_secs(30);

fn hostile(args: &[&str]) -> Value {
    json!({
        "source": format!("path:{}", fixture("hostile_server").display()),
        "command": ["python3", "server.py"],
        "args": args,
    })
}

async fn deploy(d: &Daemon, name: &str, spec: Value) -> (u16, Value) {
    d.put(&format!("/v1/meshes/h/services/{name}"), spec).await
}

/// A server that stops reading its stdin: a call with a 300 KB argument
/// answers 504 at its deadline; liveness restarts the server; DELETE takes
/// effect at once and leaves no process.
#[tokio::test]
async fn a_server_that_stops_reading_cannot_wedge_the_daemon() {
    let d = Daemon::start();
    let mut spec = hostile(&["--stop-reading"]);
    spec["health"] = json!({"interval_s": 1, "timeout_s": 1, "failure_threshold": 2});
    let (code, st) = deploy(&d, "deaf", spec).await;
    assert_eq!(code, 200, "{st}");
    let first_pid = st["pid"].as_u64().unwrap() as u32;
    let big = "x".repeat(300 * 1024);
    let t = Instant::now();
    let (code, r) = d
        .post(
            "/v1/meshes/h/services/deaf/call",
            json!({"tool": "echo", "arguments": {"text": big}, "timeout_ms": 1000}),
        )
        .await;
    assert_eq!(code, 504, "{r}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    // The API keeps answering meanwhile.
    assert_eq!(d.get("/v1/health").await.0, 200);
    // Liveness probes time out → restarted with a new process.
    let st = d
        .wait_status("h", "deaf", UP, |s| {
            s["restarts"].as_u64() >= Some(1) && s["status"] == "running"
        })
        .await;
    assert!(!pid_alive(first_pid), "the wedged process was killed");
    let pid = st["pid"].as_u64().unwrap() as u32;
    let t = Instant::now();
    let (code, _) = d.delete("/v1/meshes/h/services/deaf").await;
    assert_eq!(code, 204);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert!(!pid_alive(pid));
}

/// Floods the server controls: 1 GiB of stderr without a newline, a million
/// pings it never reads answers to, a million tools. meshbox stays under
/// +64 MB while they run and returns to its baseline after undeploy.
#[tokio::test]
async fn floods_leave_memory_bounded() {
    let d = Daemon::start();
    // Warm up allocator and runtime with one ordinary service.
    let (code, _) = deploy(&d, "warm", hostile(&[])).await;
    assert_eq!(code, 200);
    d.delete("/v1/meshes/h/services/warm").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let base = rss_kib(d.pid());
    let sampler = RssSampler::start(d.pid());

    // 1 GiB of stderr, one line.
    let gib = (1u64 << 30).to_string();
    let (code, st) = deploy(&d, "stderr", hostile(&["--stderr-flood", &gib])).await;
    assert_eq!(code, 200, "{st}");
    let t = Instant::now();
    loop {
        let (_, logs) = d.get("/v1/meshes/h/services/stderr/logs?lines=5").await;
        if logs.to_string().contains("(cut)") {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "{logs}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let the rest of the gigabyte drain.
    tokio::time::sleep(Duration::from_secs(2)).await;

    // A million pings while not reading.
    let (code, st) = deploy(&d, "pings", hostile(&["--ping-flood", "1000000"])).await;
    assert_eq!(code, 200, "{st}");
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(d.get("/v1/health").await.0, 200);

    // A million tools in one page: refused with a clear error.
    let (code, st) = deploy(&d, "tools", hostile(&["--tools", "1000000"])).await;
    assert_eq!(code, 502, "{st}");
    assert!(
        st["error"]
            .as_str()
            .unwrap()
            .contains("tool list is larger"),
        "{st}"
    );
    // And a thousand pages of a thousand.
    let (code, st) = deploy(&d, "pages", hostile(&["--tool-pages", "1000"])).await;
    assert_eq!(code, 502, "{st}");
    assert!(
        st["error"]
            .as_str()
            .unwrap()
            .contains("tool list is larger"),
        "{st}"
    );

    let peak = sampler.max_kib();
    assert!(
        peak < base + 64 * 1024,
        "peak RSS {peak} KiB over a baseline of {base} KiB"
    );
    for name in ["stderr", "pings", "tools", "pages"] {
        let (code, _) = d.delete(&format!("/v1/meshes/h/services/{name}")).await;
        assert_eq!(code, 204);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib(d.pid());
    assert!(
        after < base + 16 * 1024,
        "RSS {after} KiB after undeploy, baseline {base} KiB"
    );
}

/// One 60 MB reply must not pin 60 MB for the life of the service.
#[tokio::test]
async fn a_large_reply_does_not_pin_its_buffer() {
    let d = Daemon::start();
    let (code, _) = deploy(&d, "big", hostile(&[])).await;
    assert_eq!(code, 200);
    let base = rss_kib(d.pid());
    let (code, r) = d
        .post(
            "/v1/meshes/h/services/big/call",
            json!({"tool": "big", "arguments": {"mb": 60}}),
        )
        .await;
    assert_eq!(code, 200);
    assert_eq!(
        r["result"]["content"][0]["text"].as_str().unwrap().len(),
        60 << 20
    );
    drop(r);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib(d.pid());
    assert!(
        after < base + 20 * 1024,
        "RSS {after} KiB after a 60 MB reply, baseline {base} KiB"
    );
}

/// A server that closes its stdout: calls fail at once (not after their
/// timeout) and it is restarted promptly, not left `running` for minutes.
#[tokio::test]
async fn closed_stdout_fails_calls_at_once_and_restarts() {
    let d = Daemon::start();
    let (code, st) = deploy(&d, "mute", hostile(&["--close-stdout"])).await;
    assert_eq!(code, 200, "{st}");
    let first = st["pid"].clone();
    let t = Instant::now();
    let st = d
        .wait_status("h", "mute", UP, |s| s["restarts"].as_u64() >= Some(1))
        .await;
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert_ne!(st["pid"], first);
    let (_, logs) = d.get("/v1/meshes/h/services/mute/logs?lines=50").await;
    assert!(logs.to_string().contains("closed its stdout"), "{logs}");
    // A call made while it closes again answers at once, never after 25 s.
    let t = Instant::now();
    let (code, _) = d
        .post(
            "/v1/meshes/h/services/mute/call",
            json!({"tool": "echo", "arguments": {}, "timeout_ms": 20000}),
        )
        .await;
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "{code} after {:?}",
        t.elapsed()
    );
}

#[tokio::test]
async fn handshake_errors_name_their_step() {
    let d = Daemon::start();
    let (code, st) = deploy(&d, "strike", hostile(&["--fail-tools-list"])).await;
    assert_eq!(code, 502, "{st}");
    let e = st["error"].as_str().unwrap();
    assert!(e.contains("tools/list") && e.contains("on strike"), "{e}");
}

/// `pid` is shown only while the process exists.
#[tokio::test]
async fn pid_goes_with_the_process() {
    let d = Daemon::start();
    let (code, st) = d.deploy_py("h", "crashy", &[], json!({})).await;
    assert_eq!(code, 200, "{st}");
    let pid = st["pid"].as_u64().unwrap() as u32;
    let (code, _) = d.call("h", "crashy", "crash", json!({})).await;
    assert_eq!(code, 503);
    // Between the crash and the restart (≥ 0.75 s of backoff) no pid is shown.
    let st = d.status("h", "crashy").await;
    assert!(!pid_alive(pid));
    if st["status"] == "restarting" {
        assert!(st.get("pid").is_none(), "{st}");
    }
    let st = d
        .wait_status("h", "crashy", UP, |s| s["status"] == "running")
        .await;
    assert_ne!(st["pid"].as_u64().unwrap() as u32, pid);
}

/// Two daemons on one data dir would run every server twice.
#[tokio::test]
async fn a_second_daemon_on_the_same_data_dir_refuses_to_start() {
    let d = Daemon::start();
    let out = std::process::Command::new(common::meshbox_bin())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--backend",
            "process",
            "--data-dir",
        ])
        .arg(d.data.path())
        .env("MESHBOX_LOG", "warn")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("in use by another meshbox") && err.contains(&d.pid().to_string()),
        "{err}"
    );
}

/// A redeploy whose new spec cannot start answers the error and leaves the
/// running instance serving and stored.
#[tokio::test]
async fn a_bad_redeploy_changes_nothing() {
    let d = Daemon::start();
    let (code, st) = d.deploy_py("h", "keep", &[], json!({})).await;
    assert_eq!(code, 200, "{st}");
    let pid = st["pid"].clone();
    // A typo in the entry: the new process exits during its handshake.
    let (code, e) = d
        .deploy_py("h", "keep", &["--exit-during-init"], json!({}))
        .await;
    assert_eq!(code, 502, "{e}");
    let st = d.status("h", "keep").await;
    assert_eq!(
        (st["status"].clone(), st["pid"].clone()),
        (json!("running"), pid)
    );
    let (code, r) = d
        .call("h", "keep", "echo", json!({"text": "still here"}))
        .await;
    assert_eq!(code, 200, "{r}");
    // Stored as it was: a restart brings back the working spec.
    let data = d.data.path().to_path_buf();
    let mut d = d;
    d.terminate();
    let d2 = Daemon::start_on(&data, &[]);
    let st = d2
        .wait_status("h", "keep", UP, |s| s["status"] == "running")
        .await;
    assert_eq!(st["restarts"], 0, "{st}");
}

/// A file meshbox inherited from whoever started it (a supervisor's pipe,
/// a terminal, a secret opened by a wrapper) never reaches a server or the
/// init above it: only the pipes meshbox gives them are open there.
#[tokio::test]
async fn a_descriptor_meshbox_inherited_never_reaches_a_server() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("inherited-secret");
    std::fs::write(&secret, "not for servers").unwrap();
    // The shell opens fd 9 without close-on-exec and execs meshbox on it.
    let open = format!("exec 9<'{}'; exec \"$0\" \"$@\"", secret.display());
    let d = Daemon::start_wrapped(&["bash", "-c", &open], &[]);
    let (code, st) = d.deploy_py("h", "fds", &[], json!({})).await;
    assert_eq!(code, 200, "{st}");
    let server = st["pid"].as_u64().unwrap() as u32;
    let parent = std::fs::read_to_string(format!("/proc/{server}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .map(|p| p.trim().parse::<u32>().unwrap())
        .unwrap();
    for pid in [server, parent] {
        let fds: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .map(|e| std::fs::read_link(e.unwrap().path()).unwrap_or_default())
            .collect();
        assert!(
            !fds.contains(&secret),
            "pid {pid} holds the file meshbox inherited: {fds:?}"
        );
    }
}
