//! `make bench`, calls part: what meshbox adds to a tool call, measured in
//! one run against baselines taken in the same run (issue 9, item 10).
//!
//! The same node echo server (tests/fixtures/node_server) behind:
//! - a direct stdio pipe, driven by a client whose callers write
//!   concurrently with no lock (the strongest baseline);
//! - `meshbox serve` (its own process), `POST /v1/.../call`;
//! - the seed runner (../shared/peers/seed-runner.mjs, node), `POST /call`,
//!   on a copy of the fixture (it installs into its source directory);
//! - as a reference, no contender: an HTTP server that does nothing (no
//!   server behind it; see `common::BareHttp`). Its figures are the floor and
//!   the ceiling of any HTTP runner on this machine: a runner's call is that
//!   hop plus the pipe's round trip;
//! - as a reference too: the least a runner can be (the same HTTP server
//!   relaying each call to the same node server over its pipes, with no
//!   checks, limits or lifecycle; `common::BareHttp::relaying`).
//!
//! The one-caller figures come from interleaved slices of each way.
//! Each HTTP caller owns one keep-alive connection (no pool, no lock).
//!
//! Figures: added p50 at 1 caller; calls/s at 64 callers as ratios; meshbox
//! CPU per call from /proc; idle RSS and RSS per idle service; deploy time
//! vs a bare start + handshake.

mod common;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{cpu_time, median, rss_kib, us, verdict, BareHttp, Direct, HttpCaller, ProcDaemon};
use serde_json::json;

const SEQ_CALLS: usize = 3000;
const ROUNDS: usize = 10;
const CONC: usize = 64;
const CONC_CALLS_EACH: usize = 200;
const STARTS: usize = 10;
const IDLE_SERVICES: usize = 20;

fn node_fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/node_server")
}

fn seed_runner() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/peers/seed-runner.mjs")
}

struct Stats {
    p50: Duration,
    p99: Duration,
    per_sec: f64,
    calls: usize,
}

fn stats(mut lat: Vec<Duration>, wall: Duration) -> Stats {
    lat.sort();
    let pick = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)];
    Stats {
        p50: pick(0.50),
        p99: pick(0.99),
        per_sec: lat.len() as f64 / wall.as_secs_f64(),
        calls: lat.len(),
    }
}

type CallFut = Pin<Box<dyn Future<Output = ()> + Send>>;

/// One caller: made per task, then called `each` times in a row.
trait Caller: Send + 'static {
    fn call(&mut self) -> CallFut;
}

type MakeCaller =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Box<dyn Caller>> + Send>> + Send + Sync>;

async fn run_load(callers: usize, each: usize, make: &MakeCaller) -> Stats {
    let (lat, wall) = run_load_raw(callers, each, make).await;
    stats(lat, wall)
}

/// Every latency of a run, and its wall time.
async fn run_load_raw(callers: usize, each: usize, make: &MakeCaller) -> (Vec<Duration>, Duration) {
    let mut clients = Vec::new();
    for _ in 0..callers {
        clients.push(make().await);
    }
    let start_line = Arc::new(tokio::sync::Barrier::new(callers + 1));
    let mut tasks = Vec::new();
    for mut c in clients {
        let start_line = start_line.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(each);
            start_line.wait().await;
            for _ in 0..each {
                let t = Instant::now();
                c.call().await;
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    start_line.wait().await;
    let start = Instant::now();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    (all, start.elapsed())
}

/// One caller on each way, in `ROUNDS` interleaved slices of `calls / ROUNDS`
/// (so that the machine's slow minutes fall on every way alike).
async fn one_caller(ways: &[&MakeCaller], calls: usize) -> Vec<Stats> {
    let mut runs: Vec<(Vec<Duration>, Duration)> = vec![Default::default(); ways.len()];
    for _ in 0..ROUNDS {
        for (way, run) in ways.iter().zip(runs.iter_mut()) {
            let (lat, wall) = run_load_raw(1, calls / ROUNDS, way).await;
            run.0.extend(lat);
            run.1 += wall;
        }
    }
    runs.into_iter()
        .map(|(lat, wall)| stats(lat, wall))
        .collect()
}

struct DirectCaller(Arc<Direct>);

impl Caller for DirectCaller {
    fn call(&mut self) -> CallFut {
        let d = self.0.clone();
        Box::pin(async move {
            let r = d
                .request(
                    "tools/call",
                    json!({"name": "echo", "arguments": {"text": "hello"}}),
                )
                .await;
            assert_eq!(r["result"]["content"][0]["text"], "hello");
        })
    }
}

/// One caller's own connection (the mutex is never contended: each caller
/// makes its calls one after another).
struct Http {
    c: Arc<tokio::sync::Mutex<HttpCaller>>,
    path: Arc<str>,
    body: Bytes,
}

impl Caller for Http {
    fn call(&mut self) -> CallFut {
        let c = self.c.clone();
        let (path, body) = (self.path.clone(), self.body.clone());
        Box::pin(async move {
            let (status, bytes) = c.lock().await.post(&path, body).await;
            assert_eq!(status, 200, "{}", String::from_utf8_lossy(&bytes));
            assert!(
                bytes.windows(5).any(|w| w == b"hello"),
                "{}",
                String::from_utf8_lossy(&bytes)
            );
        })
    }
}

fn row(label: &str, base: &Stats, other: &Stats, who: &str) {
    println!(
        "{label:<24} direct p50 {:>7.1} µs p99 {:>7.1} µs {:>7.0}/s | {who} p50 {:>7.1} µs p99 {:>7.1} µs {:>7.0}/s | added p50 {:>6.1} µs | throughput {:.2}x of direct",
        us(base.p50),
        us(base.p99),
        base.per_sec,
        us(other.p50),
        us(other.p99),
        other.per_sec,
        us(other.p50) - us(base.p50),
        other.per_sec / base.per_sec,
    );
}

/// The do-nothing HTTP server's figures: it relays nothing, so they are
/// not compared with the pipe's.
fn reference_row(label: &str, s: &Stats) {
    println!(
        "{label:<24} reference: an HTTP server that does nothing | p50 {:>7.1} µs p99 {:>7.1} µs {:>7.0}/s",
        us(s.p50),
        us(s.p99),
        s.per_sec,
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn http_caller_factory(base: String, path: String, body: Bytes) -> MakeCaller {
    let path: Arc<str> = path.into();
    Arc::new(move || {
        let (base, path, body) = (base.clone(), path.clone(), body.clone());
        Box::pin(async move {
            Box::new(Http {
                c: Arc::new(tokio::sync::Mutex::new(HttpCaller::connect(&base).await)),
                path,
                body,
            }) as Box<dyn Caller>
        })
    })
}

#[tokio::main]
async fn main() {
    common::serve_bare_http_if_asked().await;
    let fixture = node_fixture();
    println!(
        "meshbox bench — calls: node echo server (tests/fixtures/node_server), process backend"
    );

    // ---- the three ways in --------------------------------------------------
    let daemon = ProcDaemon::start(&[]);
    let mut admin = HttpCaller::connect(&daemon.base).await;
    let spec = json!({"source": format!("path:{}", fixture.display())}).to_string();
    let (code, body) = admin
        .put("/v1/meshes/bench/services/echo", Bytes::from(spec.clone()))
        .await;
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));

    let direct = Arc::new(Direct::spawn(&["node", "server.js"], &fixture).await);
    direct.handshake().await;

    let seed_port = free_port();
    let mut seed = tokio::process::Command::new("node")
        .arg(seed_runner())
        .env("RUNNER_PORT", seed_port.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("node runs the seed runner");
    let seed_base = format!("http://127.0.0.1:{seed_port}");
    let mut seed_admin = loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", seed_port))
            .await
            .is_ok()
        {
            break HttpCaller::connect(&seed_base).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // The seed runner installs into the directory it is given: a copy.
    let seed_src = tempfile::tempdir().unwrap();
    for f in ["server.js", "package.json"] {
        std::fs::copy(fixture.join(f), seed_src.path().join(f)).unwrap();
    }
    let (code, body) = seed_admin
        .post(
            "/load",
            Bytes::from(json!({"name": "echo", "sourcePath": seed_src.path()}).to_string()),
        )
        .await;
    assert_eq!(code, 200, "seed /load: {}", String::from_utf8_lossy(&body));

    let direct_make: MakeCaller = {
        let d = direct.clone();
        Arc::new(move || {
            let d = d.clone();
            Box::pin(async move { Box::new(DirectCaller(d)) as Box<dyn Caller> })
        })
    };
    let mesh_make = http_caller_factory(
        daemon.base.clone(),
        "/v1/meshes/bench/services/echo/call".into(),
        Bytes::from(json!({"tool": "echo", "arguments": {"text": "hello"}}).to_string()),
    )
    .await;
    let seed_make = http_caller_factory(
        seed_base.clone(),
        "/call".into(),
        Bytes::from(json!({"name": "echo", "tool": "echo", "args": {"text": "hello"}}).to_string()),
    )
    .await;

    let bare = BareHttp::answering();
    let bare_make = http_caller_factory(
        bare.base.clone(),
        "/call".into(),
        Bytes::from(json!({"tool": "echo", "arguments": {"text": "hello"}}).to_string()),
    )
    .await;
    let relay = BareHttp::relaying(&fixture);
    let relay_make = http_caller_factory(
        relay.base.clone(),
        "/call".into(),
        Bytes::from(json!({"tool": "echo", "arguments": {"text": "hello"}}).to_string()),
    )
    .await;

    // Warm up every path.
    for m in [
        &direct_make,
        &bare_make,
        &relay_make,
        &mesh_make,
        &seed_make,
    ] {
        run_load(4, 200, m).await;
    }

    // ---- 1 caller -----------------------------------------------------------
    println!();
    println!("== one caller, {SEQ_CALLS} sequential `echo` calls each, in {ROUNDS} interleaved slices ==");
    let floor = {
        let mut c = HttpCaller::connect(&daemon.base).await;
        let mut lat = Vec::new();
        for _ in 0..SEQ_CALLS {
            let t = Instant::now();
            let (code, _) = c.get("/v1/health").await;
            assert_eq!(code, 200);
            lat.push(t.elapsed());
        }
        median(lat)
    };
    println!(
        "HTTP floor (GET /v1/health on one connection): p50 {:.1} µs",
        us(floor)
    );
    let [b1, h1, r1, m1, s1]: [Stats; 5] = one_caller(
        &[
            &direct_make,
            &bare_make,
            &relay_make,
            &mesh_make,
            &seed_make,
        ],
        SEQ_CALLS,
    )
    .await
    .try_into()
    .unwrap_or_else(|_| unreachable!());
    row("1 caller", &b1, &m1, "meshbox");
    row("1 caller", &b1, &s1, "seed");
    reference_row("1 caller", &h1);
    row("1 caller", &b1, &r1, "bare relay");
    let added = us(m1.p50) - us(b1.p50);

    // ---- 64 callers ---------------------------------------------------------
    println!();
    println!("== {CONC} concurrent callers × {CONC_CALLS_EACH} calls ==");
    let b64 = run_load(CONC, CONC_CALLS_EACH, &direct_make).await;
    let cpu0 = cpu_time(daemon.pid());
    let m64 = run_load(CONC, CONC_CALLS_EACH, &mesh_make).await;
    let cpu = cpu_time(daemon.pid()) - cpu0;
    let s64 = run_load(CONC, CONC_CALLS_EACH, &seed_make).await;
    let (bare_cpu0, client_cpu0) = (cpu_time(bare.pid()), cpu_time(std::process::id()));
    let h64 = run_load(CONC, CONC_CALLS_EACH, &bare_make).await;
    let bare_cores = (cpu_time(bare.pid()) - bare_cpu0 + cpu_time(std::process::id())
        - client_cpu0)
        .as_secs_f64()
        * h64.per_sec
        / h64.calls as f64;
    drop(bare);
    let r64 = run_load(CONC, CONC_CALLS_EACH, &relay_make).await;
    drop(relay);
    row("64 callers", &b64, &m64, "meshbox");
    row("64 callers", &b64, &s64, "seed");
    reference_row("64 callers", &h64);
    row("64 callers", &b64, &r64, "bare relay");
    let cpu_per_call = us(cpu) / m64.calls as f64;
    let of_direct = m64.per_sec / b64.per_sec;
    let of_seed = m64.per_sec / s64.per_sec;

    // ---- cost of metrics and tracing (issue 13) ----------------------------
    // The same daemon with `--no-metrics` (tracing is in both, exporter off),
    // interleaved, best of three rounds each.
    let plain = ProcDaemon::start(&["--no-metrics"]);
    let mut plain_admin = HttpCaller::connect(&plain.base).await;
    let (code, body) = plain_admin
        .put("/v1/meshes/bench/services/echo", Bytes::from(spec.clone()))
        .await;
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    let plain_make = http_caller_factory(
        plain.base.clone(),
        "/v1/meshes/bench/services/echo/call".into(),
        Bytes::from(json!({"tool": "echo", "arguments": {"text": "hello"}}).to_string()),
    )
    .await;
    run_load(4, 200, &plain_make).await;
    let (mut with_metrics, mut without) = (0f64, 0f64);
    for _ in 0..3 {
        without = without.max(run_load(CONC, CONC_CALLS_EACH, &plain_make).await.per_sec);
        with_metrics = with_metrics.max(run_load(CONC, CONC_CALLS_EACH, &mesh_make).await.per_sec);
    }
    let metrics_cost = 1.0 - with_metrics / without;
    drop(plain);

    // ---- memory -------------------------------------------------------------
    // Idle, then after a first service (a one-time cost: code paged in,
    // the store's pages, the runtime's first allocations), then the cost of
    // each of IDLE_SERVICES more; the target bounds the whole:
    // RSS with n services ≤ 15 MB + n × 100 KB.
    let idle_daemon = ProcDaemon::start(&[]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle_rss = rss_kib(idle_daemon.pid());
    let mut idle_admin = HttpCaller::connect(&idle_daemon.base).await;
    let mut first_rss = 0;
    for i in 0..=IDLE_SERVICES {
        let (code, body) = idle_admin
            .put(
                &format!("/v1/meshes/idle/services/s{i}"),
                Bytes::from(spec.clone()),
            )
            .await;
        assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
        if i == 0 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            first_rss = rss_kib(idle_daemon.pid());
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let loaded_rss = rss_kib(idle_daemon.pid());
    let first_cost = first_rss.saturating_sub(idle_rss);
    let per_service = (loaded_rss.saturating_sub(first_rss)) as f64 / IDLE_SERVICES as f64;
    let services = IDLE_SERVICES as u64 + 1;
    let bound = 15 * 1024 + services * 100;
    drop(idle_daemon);

    // ---- deploy time --------------------------------------------------------
    let mut bare = Vec::new();
    let mut deploy = Vec::new();
    for i in 0..STARTS {
        let t = Instant::now();
        let d = Direct::spawn(&["node", "server.js"], &fixture).await;
        d.handshake().await;
        bare.push(t.elapsed());
        drop(d);
        let t = Instant::now();
        let (code, _) = admin
            .put(
                &format!("/v1/meshes/bench/services/start{i}"),
                Bytes::from(spec.clone()),
            )
            .await;
        assert_eq!(code, 200);
        deploy.push(t.elapsed());
        admin
            .delete(&format!("/v1/meshes/bench/services/start{i}"))
            .await;
    }
    let (bare, deploy) = (median(bare), median(deploy));

    println!();
    println!("== summary (targets from issue 9) ==");
    println!(
        "1 caller: meshbox adds {added:.1} µs p50 over the direct pipe (target ≤ 60 µs): {}",
        verdict(added <= 60.0)
    );
    println!(
        "64 callers: meshbox {:.0}/s = {:.0}% of the direct pipe (target ≥ 50%): {}",
        m64.per_sec,
        of_direct * 100.0,
        verdict(of_direct >= 0.5)
    );
    println!(
        "64 callers: meshbox {:.2}x the seed runner (target ≥ 3x): {}",
        of_seed,
        verdict(of_seed >= 3.0)
    );
    println!(
        "what an HTTP hop alone costs here (a server that does nothing, same client, same run): \
         1 caller p50 {:.1} µs, about the least any HTTP runner adds to the pipe's round trip \
         (target for meshbox's whole call: ≤ 60 µs added); 64 callers {:.0}/s using {:.2} cores \
         with its client = {:.2}x the seed runner and {:.0}% of the direct pipe, with no server \
         behind it (targets for meshbox with the server: ≥ 3x, ≥ 50%)",
        us(h1.p50),
        h64.per_sec,
        bare_cores,
        h64.per_sec / s64.per_sec,
        h64.per_sec / b64.per_sec * 100.0
    );
    println!(
        "the least a runner can be (HTTP in, the same server's pipes out, no checks or limits; same run): \
         1 caller adds {:.1} µs p50 over the direct pipe (target for meshbox ≤ 60 µs); 64 callers {:.0}/s \
         = {:.0}% of the direct pipe (≥ 50%) and {:.2}x the seed runner (≥ 3x)",
        us(r1.p50) - us(b1.p50),
        r64.per_sec,
        r64.per_sec / b64.per_sec * 100.0,
        r64.per_sec / s64.per_sec
    );
    println!(
        "64 callers: metrics + tracing (exporter off) {:.0}/s vs --no-metrics {:.0}/s: cost {:.1}% (target ≤ 3%): {}",
        with_metrics,
        without,
        metrics_cost * 100.0,
        verdict(metrics_cost <= 0.03)
    );
    println!(
        "meshbox CPU per call at 64 callers: {cpu_per_call:.1} µs (target ≤ 25 µs): {}",
        verdict(cpu_per_call <= 25.0)
    );
    println!(
        "idle RSS {:.1} MB (target ≤ 15 MB): {}; per idle service {:.0} KB after the first (target ≤ 100 KB): {}; the first service once {:.0} KB",
        idle_rss as f64 / 1024.0,
        verdict(idle_rss <= 15 * 1024),
        per_service,
        verdict(per_service <= 100.0),
        first_cost as f64
    );
    println!(
        "RSS with {services} idle services {:.1} MB (target ≤ 15 MB + {services} × 100 KB = {:.1} MB): {}",
        loaded_rss as f64 / 1024.0,
        bound as f64 / 1024.0,
        verdict(loaded_rss <= bound)
    );
    println!(
        "deploy-to-running {:.1} ms vs bare start + handshake {:.1} ms: {:.2}x",
        deploy.as_secs_f64() * 1e3,
        bare.as_secs_f64() * 1e3,
        deploy.as_secs_f64() / bare.as_secs_f64()
    );
    let _ = seed.kill().await;
}
