//! `make bench`: what meshbox adds, measured against a baseline in the same run.
//!
//! 1. A tool call through the HTTP API vs the same call over a direct stdio
//!    pipe to the same fixture server, at 1 and at 64 concurrent callers:
//!    p50/p99 latency, calls/s, and the ratio.
//! 2. Deploy-to-running through the API vs the bare process start + MCP
//!    handshake (initialize, initialized, every tools/list page).

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meshbox::api::{self, ApiConfig};
use meshbox::orchestrator::process::{ProcessBackend, ProcessConfig};
use meshbox::supervisor::{Supervisor, SupervisorConfig};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{ChildStdin, Command};
use tokio::sync::oneshot;

const SEQ_CALLS: usize = 3000;
const CONC: usize = 64;
const CONC_CALLS_EACH: usize = 60;
const STARTS: usize = 10;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/py_server")
}

/// A minimal pipelined JSON-RPC client straight on the server's pipes: the baseline.
struct Direct {
    stdin: tokio::sync::Mutex<ChildStdin>,
    pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>,
    next: AtomicU64,
    _child: tokio::process::Child,
}

impl Direct {
    async fn spawn() -> Direct {
        // The same argv and curated environment meshbox gives the server.
        let home = std::env::temp_dir().join("meshbox-bench-home");
        std::fs::create_dir_all(&home).unwrap();
        let mut child = Command::new("python3")
            .arg("server.py")
            .current_dir(fixture())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", &home)
            .env("LANG", "C.UTF-8")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>> = Arc::default();
        let p = pending.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let v: Value = match serde_json::from_str(&line) {
                    Ok(v) => v,
                    Err(_) => continue,
                };
                if let Some(id) = v["id"].as_u64() {
                    if let Some(tx) = p.lock().unwrap().remove(&id) {
                        let _ = tx.send(v);
                    }
                }
            }
        });
        Direct {
            stdin: tokio::sync::Mutex::new(child.stdin.take().unwrap()),
            pending,
            next: AtomicU64::new(1),
            _child: child,
        }
    }

    async fn request(&self, method: &str, params: Value) -> Value {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(id, tx);
        let line = format!(
            "{}\n",
            json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params})
        );
        {
            let mut w = self.stdin.lock().await;
            w.write_all(line.as_bytes()).await.unwrap();
            w.flush().await.unwrap();
        }
        rx.await.unwrap()
    }

    async fn notify(&self, method: &str) {
        let line = format!("{}\n", json!({"jsonrpc": "2.0", "method": method}));
        let mut w = self.stdin.lock().await;
        w.write_all(line.as_bytes()).await.unwrap();
        w.flush().await.unwrap();
    }

    /// initialize → initialized → tools/list following nextCursor.
    async fn handshake(&self) -> usize {
        self.request("initialize", json!({"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "bench", "version": "0"}}))
            .await;
        self.notify("notifications/initialized").await;
        let mut n = 0;
        let mut cursor: Option<String> = None;
        loop {
            let params = match &cursor {
                Some(c) => json!({"cursor": c}),
                None => json!({}),
            };
            let r = self.request("tools/list", params).await;
            n += r["result"]["tools"].as_array().map_or(0, Vec::len);
            match r["result"]["nextCursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => return n,
            }
        }
    }
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

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let data = tempfile::tempdir().unwrap();
    let backend = Arc::new(ProcessBackend::new(ProcessConfig::default()));
    let supervisor = Arc::new(Supervisor::new(
        backend,
        SupervisorConfig::new(data.path().to_path_buf()),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = api::router(supervisor.clone(), ApiConfig::default());
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let server = tokio::spawn(api::serve(listener, router, async {
        let _ = stop_rx.await;
    }));
    let base = format!("http://{addr}");
    let http = reqwest::Client::new();
    let spec = json!({"source": format!("path:{}", fixture().display())});

    println!("meshbox bench — fixture: tests/fixtures/py_server (python), process backend");
    println!();
    println!("== deploy-to-running vs bare start + handshake (median of {STARTS}) ==");
    let mut bare = Vec::new();
    let mut deploy = Vec::new();
    for i in 0..STARTS {
        let t = Instant::now();
        let d = Direct::spawn().await;
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
    let direct = Arc::new(Direct::spawn().await);
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

    supervisor.shutdown().await;
    let _ = stop_tx.send(());
    let _ = server.await;
}
