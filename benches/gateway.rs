//! `make bench`, gateway part (issue 12, item 9): one `tools/call` of the
//! same stdio echo server (tests/fixtures/node_server, handshake era), at 1
//! and at 64 concurrent callers, through
//! - the direct stdio pipe (the baseline: callers write concurrently with no
//!   lock, one reader matches replies);
//! - meshbox's MCP gateway (`meshbox serve`, its own process): a stateless
//!   (2026-07-28) `POST /mcp/bench/echo` — to this handshake-era server it
//!   goes through the gateway's input bridge;
//! - supergateway (npm) `--stateful`, one session shared by every caller,
//!   so one child process serves them all (its stateless modes start a
//!   child per request);
//! - mcp-proxy (PyPI) `--stateless`: one child, a stateless 2025-era POST;
//! - for reference, meshbox's own REST route (`POST /v1/…/call`), which
//!   shows what the HTTP server and the session cost without the gateway.
//!
//! A reference, no contender: the gateway's request to an HTTP server that
//! does nothing (`common::BareHttp`): the least any HTTP gateway adds here;
//! and to the least a gateway can be, the same server relaying each call to
//! the echo server's pipes with no checks or limits.
//!
//! Each HTTP caller owns one keep-alive connection (no pool, no lock) and
//! reads the whole answer (JSON or SSE). The peers come from
//! scripts/mcp-clients.sh; without them the bench fails and says so.
//!
//! Targets: the gateway adds ≤ 100 µs to the p50 of the direct pipe at 1
//! caller; at 64 callers it makes ≥ 5× the calls/s of the better peer.
//! The machine may be noisy: the figures that matter are the ratios of one run.
//!
//! `MESHBOX_BENCH_PROFILE=SECS[,CALLERS[,rest]]` drives only the gateway (or
//! the REST route), at CALLERS (default 64) callers, for that long, after
//! printing meshbox's pid (for `perf record -g -p PID`).

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{cpu_time, verdict, Direct, HttpCaller, ProcDaemon};
use futures_util::future::BoxFuture;
use serde_json::json;

const SEQUENTIAL: usize = 2000;
/// The one-caller calls are made in this many interleaved slices.
const ROUNDS: usize = 10;
const CALLERS: usize = 64;
const EACH: usize = 100;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A way in: makes one caller, whose `call` makes one echo call.
trait Way: Send + Sync {
    fn caller(&self) -> BoxFuture<'_, Box<dyn Call>>;
}

trait Call: Send {
    fn call(&mut self) -> BoxFuture<'_, ()>;
}

struct Latencies {
    sorted: Vec<Duration>,
    wall: Duration,
}

impl Latencies {
    fn q(&self, q: f64) -> f64 {
        let i = ((self.sorted.len() as f64 * q) as usize).min(self.sorted.len() - 1);
        self.sorted[i].as_secs_f64() * 1e6
    }

    fn per_sec(&self) -> f64 {
        self.sorted.len() as f64 / self.wall.as_secs_f64()
    }
}

/// `callers` callers start together; each makes `each` calls in a row.
async fn load(way: &dyn Way, callers: usize, each: usize) -> Latencies {
    let mut made = Vec::with_capacity(callers);
    for _ in 0..callers {
        made.push(way.caller().await);
    }
    let gate = Arc::new(tokio::sync::Barrier::new(callers + 1));
    let tasks: Vec<_> = made
        .into_iter()
        .map(|mut c| {
            let gate = gate.clone();
            tokio::spawn(async move {
                gate.wait().await;
                let mut lat = Vec::with_capacity(each);
                for _ in 0..each {
                    let t = Instant::now();
                    c.call().await;
                    lat.push(t.elapsed());
                }
                lat
            })
        })
        .collect();
    gate.wait().await;
    let start = Instant::now();
    let mut sorted = Vec::with_capacity(callers * each);
    for t in tasks {
        sorted.extend(t.await.unwrap());
    }
    let wall = start.elapsed();
    sorted.sort();
    Latencies { sorted, wall }
}

// ---------------------------------------------------------------- the ways in

struct Pipe(Arc<Direct>);

struct PipeCall(Arc<Direct>);

impl Way for Pipe {
    fn caller(&self) -> BoxFuture<'_, Box<dyn Call>> {
        Box::pin(async move { Box::new(PipeCall(self.0.clone())) as Box<dyn Call> })
    }
}

impl Call for PipeCall {
    fn call(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let r = self
                .0
                .request(
                    "tools/call",
                    json!({"name": "echo", "arguments": {"text": "hello"}}),
                )
                .await;
            assert_eq!(r["result"]["content"][0]["text"], "hello", "{r}");
        })
    }
}

/// An MCP client over HTTP: one POST per call, with its headers.
struct Http {
    base: String,
    path: String,
    headers: Vec<(String, String)>,
    /// The request after its id: `,"method":…}`; or, when `numbered` is
    /// false, the whole body.
    rest: String,
    numbered: bool,
    /// Callers made so far (each numbers its requests apart: ids are unique
    /// per session).
    callers: std::sync::atomic::AtomicU64,
}

struct HttpCall {
    conn: HttpCaller,
    way: Arc<Http>,
    next_id: u64,
}

impl Way for Arc<Http> {
    fn caller(&self) -> BoxFuture<'_, Box<dyn Call>> {
        Box::pin(async move {
            let n = self
                .callers
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Box::new(HttpCall {
                conn: HttpCaller::connect(&self.base).await,
                way: self.clone(),
                next_id: n * 1_000_000,
            }) as Box<dyn Call>
        })
    }
}

impl Call for HttpCall {
    fn call(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let headers: Vec<(&str, &str)> = self
                .way
                .headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            self.next_id += 1;
            let body = Bytes::from(match self.way.numbered {
                true => format!(
                    "{{\"jsonrpc\":\"2.0\",\"id\":{}{}",
                    self.next_id, self.way.rest
                ),
                false => self.way.rest.clone(),
            });
            let (status, body) = self.conn.post_with(&self.way.path, &headers, body).await;
            assert!(
                status == 200 && body.windows(7).any(|w| w == b"\"hello\""),
                "{status}: {}",
                String::from_utf8_lossy(&body)
            );
        })
    }
}

/// An echo `tools/call` after its id (`,"method":…}`), with `_meta` if given.
fn call_rest(meta: Option<serde_json::Value>) -> String {
    let mut params = json!({"name": "echo", "arguments": {"text": "hello"}});
    if let Some(m) = meta {
        params["_meta"] = m;
    }
    let whole = json!({"jsonrpc": "2.0", "method": "tools/call", "params": params}).to_string();
    // `{"jsonrpc":"2.0",` is replaced by the caller's own head with the id.
    format!(",{}", &whole["{\"jsonrpc\":\"2.0\",".len()..])
}

fn headers(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

const ACCEPT: (&str, &str) = ("accept", "application/json, text/event-stream");

/// A peer process, killed when dropped.
struct Peer {
    child: tokio::process::Child,
    base: String,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn start_peer(argv: &[String], port: u16) -> Peer {
    let child = tokio::process::Command::new(&argv[0])
        .args(&argv[1..])
        .current_dir(root().join("tests/fixtures/node_server"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("{} does not start: {e}", argv[0]));
    for _ in 0..300 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Peer {
                child,
                base: format!("http://127.0.0.1:{port}"),
            };
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{} did not listen on {port}", argv[0]);
}

/// supergateway's session: initialize once; every caller then uses it.
async fn supergateway_session(base: &str) -> String {
    let mut c = HttpCaller::connect(base).await;
    let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "meshbox-bench", "version": "0"}}});
    let (status, _, sid) = c
        .post_session(
            "/mcp",
            &[ACCEPT],
            Bytes::from(init.to_string()),
            "mcp-session-id",
        )
        .await;
    assert_eq!(status, 200, "supergateway initialize");
    let sid = sid.expect("supergateway gave no Mcp-Session-Id");
    let note = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    let (status, _) = c
        .post_with(
            "/mcp",
            &[
                ACCEPT,
                ("mcp-session-id", &sid),
                ("mcp-protocol-version", "2025-06-18"),
            ],
            Bytes::from(note.to_string()),
        )
        .await;
    assert_eq!(status, 202, "supergateway notifications/initialized");
    sid
}

struct Row {
    name: &'static str,
    one: Latencies,
    /// The median of the one-caller slices' p50s.
    p50: f64,
    many: Latencies,
}

#[tokio::main]
async fn main() {
    common::serve_bare_http_if_asked().await;
    let clients = root().join("target/mcp-clients");
    let supergateway = clients.join("node_modules/supergateway/dist/index.js");
    let mcp_proxy = clients.join("proxy-venv/bin/mcp-proxy");
    assert!(
        supergateway.is_file() && mcp_proxy.is_file(),
        "supergateway and mcp-proxy are not installed: run scripts/mcp-clients.sh"
    );
    let fixture = root().join("tests/fixtures/node_server");
    println!("meshbox bench — gateway: a `tools/call` of the node echo server (tests/fixtures/node_server)");

    // ---- the ways in --------------------------------------------------------
    eprintln!("starting the direct pipe, meshbox, supergateway and mcp-proxy");
    let direct = Arc::new(Direct::spawn(&["node", "server.js"], &fixture).await);
    direct.handshake().await;

    let daemon = ProcDaemon::start(&[]);
    let mut admin = HttpCaller::connect(&daemon.base).await;
    let spec = json!({"source": format!("path:{}", fixture.display())}).to_string();
    let (code, body) = admin
        .put("/v1/meshes/bench/services/echo", Bytes::from(spec))
        .await;
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    let meta = json!({
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
        "io.modelcontextprotocol/clientInfo": {"name": "meshbox-bench", "version": "0"}
    });
    let gateway = Arc::new(Http {
        base: daemon.base.clone(),
        path: "/mcp/bench/echo".into(),
        headers: headers(&[
            ACCEPT,
            ("mcp-protocol-version", "2026-07-28"),
            ("mcp-method", "tools/call"),
            ("mcp-name", "echo"),
        ]),
        rest: call_rest(Some(meta)),
        numbered: true,
        callers: Default::default(),
    });

    let rest_way = Arc::new(Http {
        base: daemon.base.clone(),
        path: "/v1/meshes/bench/services/echo/call".into(),
        headers: Vec::new(),
        rest: json!({"tool": "echo", "arguments": {"text": "hello"}}).to_string(),
        numbered: false,
        callers: Default::default(),
    });

    if let Ok(profile) = std::env::var("MESHBOX_BENCH_PROFILE") {
        let mut parts = profile.split(',');
        let secs: u64 = parts.next().and_then(|s| s.parse().ok()).unwrap_or(20);
        let callers: usize = parts.next().and_then(|s| s.parse().ok()).unwrap_or(CALLERS);
        let way: &dyn Way = match parts.next() {
            Some("rest") => &rest_way,
            _ => &gateway,
        };
        eprintln!("profiling: meshbox pid {}", daemon.pid());
        let until = Instant::now() + Duration::from_secs(secs);
        let mut calls = 0;
        while Instant::now() < until {
            calls += load(way, callers, EACH).await.sorted.len();
        }
        eprintln!("profiling: {calls} calls");
        return;
    }

    let port = free_port();
    let sg = start_peer(
        &[
            "node".into(),
            supergateway.display().to_string(),
            "--stdio".into(),
            "node server.js".into(),
            "--outputTransport".into(),
            "streamableHttp".into(),
            "--stateful".into(),
            "--port".into(),
            port.to_string(),
            "--logLevel".into(),
            "none".into(),
        ],
        port,
    )
    .await;
    let sid = supergateway_session(&sg.base).await;
    let supergateway_way = Arc::new(Http {
        base: sg.base.clone(),
        path: "/mcp".into(),
        headers: headers(&[
            ACCEPT,
            ("mcp-session-id", &sid),
            ("mcp-protocol-version", "2025-06-18"),
        ]),
        rest: call_rest(None),
        numbered: true,
        callers: Default::default(),
    });

    let port = free_port();
    let mp = start_peer(
        &[
            mcp_proxy.display().to_string(),
            "--port".into(),
            port.to_string(),
            "--stateless".into(),
            "--log-level".into(),
            "WARNING".into(),
            "--".into(),
            "node".into(),
            "server.js".into(),
        ],
        port,
    )
    .await;
    let proxy_way = Arc::new(Http {
        base: mp.base.clone(),
        path: "/mcp".into(),
        headers: headers(&[ACCEPT, ("mcp-protocol-version", "2025-06-18")]),
        rest: call_rest(None),
        numbered: true,
        callers: Default::default(),
    });

    // A reference, no contender: the same request to an HTTP server that
    // does nothing (no server behind it).
    let bare = common::BareHttp::answering();
    let bare_way = Arc::new(Http {
        base: bare.base.clone(),
        path: "/mcp/bench/echo".into(),
        ..clone_http(&gateway)
    });

    let relay = common::BareHttp::relaying(&fixture);
    let relay_way = Arc::new(Http {
        base: relay.base.clone(),
        ..clone_http(&gateway)
    });

    let ways: [(&'static str, &dyn Way); 7] = [
        ("direct pipe", &Pipe(direct.clone())),
        ("meshbox gateway", &gateway),
        ("supergateway", &supergateway_way),
        ("mcp-proxy", &proxy_way),
        ("meshbox REST", &rest_way),
        ("bare HTTP", &bare_way),
        ("bare relay", &relay_way),
    ];
    for (name, way) in &ways {
        eprintln!("warming up: {name}");
        load(*way, 8, 50).await;
    }

    // ---- measure ------------------------------------------------------------
    // What any HTTP answer of meshbox costs this client on this machine now.
    let floor = {
        let mut c = HttpCaller::connect(&daemon.base).await;
        let mut lat = Vec::with_capacity(SEQUENTIAL);
        for _ in 0..SEQUENTIAL {
            let t = Instant::now();
            assert_eq!(c.get("/v1/health").await.0, 200);
            lat.push(t.elapsed());
        }
        common::median(lat).as_secs_f64() * 1e6
    };
    // One caller: the ways take turns, a slice at a time, so the machine's
    // noise falls on all of them alike; each way's p50 is the median of its
    // slices' p50s.
    let mut one: Vec<Vec<Duration>> = vec![Vec::new(); ways.len()];
    let mut slices: Vec<Vec<f64>> = vec![Vec::new(); ways.len()];
    let mut cpu_one = std::collections::HashMap::new();
    for round in 0..ROUNDS {
        eprintln!("measuring one caller, round {}/{ROUNDS}", round + 1);
        for (i, (name, way)) in ways.iter().enumerate() {
            let cpu0 = cpu_time(daemon.pid());
            let l = load(*way, 1, SEQUENTIAL / ROUNDS).await;
            *cpu_one.entry(*name).or_insert(Duration::ZERO) += cpu_time(daemon.pid()) - cpu0;
            slices[i].push(l.q(0.5));
            one[i].extend(l.sorted);
        }
    }
    let mut rows = Vec::new();
    let mut cpu = std::collections::HashMap::new();
    for (i, (name, way)) in ways.iter().enumerate() {
        eprintln!("measuring: {name}, {CALLERS} callers");
        let cpu0 = cpu_time(daemon.pid());
        let many = load(*way, CALLERS, EACH).await;
        let spent = cpu_time(daemon.pid()) - cpu0;
        cpu.insert(*name, spent.as_secs_f64() * 1e6 / many.sorted.len() as f64);
        let mut sorted = std::mem::take(&mut one[i]);
        sorted.sort();
        let mut p50s = std::mem::take(&mut slices[i]);
        p50s.sort_by(f64::total_cmp);
        let wall = sorted.iter().sum();
        rows.push(Row {
            name,
            one: Latencies { sorted, wall },
            p50: p50s[p50s.len() / 2],
            many,
        });
    }
    println!();
    println!(
        "{:<16} {:>10} {:>10} {:>10} | {:>10} {:>10} {:>10}",
        "", "1: p50 µs", "p99 µs", "calls/s", "64: p50 µs", "p99 µs", "calls/s"
    );
    for r in &rows {
        println!(
            "{:<16} {:>10.1} {:>10.1} {:>10.0} | {:>10.1} {:>10.1} {:>10.0}",
            r.name,
            r.p50,
            r.one.q(0.99),
            r.one.per_sec(),
            r.many.q(0.5),
            r.many.q(0.99),
            r.many.per_sec()
        );
    }
    let [direct_row, gateway_row, sg_row, mp_row, rest_row, bare_row, relay_row] = &rows[..] else {
        unreachable!()
    };
    let added = gateway_row.p50 - direct_row.p50;
    let (better, better_rate) = if sg_row.many.per_sec() >= mp_row.many.per_sec() {
        ("supergateway", sg_row.many.per_sec())
    } else {
        ("mcp-proxy", mp_row.many.per_sec())
    };
    let ratio = gateway_row.many.per_sec() / better_rate;
    println!();
    println!("== summary (targets from issue 12) ==");
    println!(
        "1 caller: the gateway adds {added:.1} µs p50 over the direct pipe (target ≤ 100 µs): {}",
        verdict(added <= 100.0)
    );
    println!(
        "64 callers: the gateway makes {:.2}x the calls/s of the better peer ({better}) (target ≥ 5x): {}",
        ratio,
        verdict(ratio >= 5.0)
    );
    println!(
        "64 callers: the gateway makes {:.0}% of the direct pipe's calls/s",
        gateway_row.many.per_sec() / direct_row.many.per_sec() * 100.0,
    );
    println!(
        "where the 1-caller p50 goes: HTTP floor (GET /v1/health) {floor:.1} µs; meshbox REST adds {:.1} µs over the pipe; the gateway adds {:.1} µs over REST",
        rest_row.p50 - direct_row.p50,
        gateway_row.p50 - rest_row.p50
    );
    println!(
        "what an HTTP hop alone costs here (the same request to a server that does nothing, same client, same run): \
         1 caller p50 {:.1} µs, about the least any HTTP gateway adds to the pipe's round trip; \
         the 100 µs target leaves {:.1} µs for relaying the call",
        bare_row.p50,
        100.0 - bare_row.p50
    );
    println!(
        "the least a gateway can be (the same HTTP server relaying each call to the same server's pipes, \
         no checks or limits; same run): 1 caller adds {:.1} µs p50 over the direct pipe (target for \
         meshbox ≤ 100 µs); 64 callers {:.2}x the better peer",
        relay_row.p50 - direct_row.p50,
        relay_row.many.per_sec() / better_rate
    );
    let per_call = |d: Duration| d.as_secs_f64() * 1e6 / SEQUENTIAL as f64;
    println!(
        "meshbox CPU per call: 1 caller gateway {:.1} µs, REST {:.1} µs; 64 callers gateway {:.1} µs, REST {:.1} µs",
        per_call(cpu_one["meshbox gateway"]),
        per_call(cpu_one["meshbox REST"]),
        cpu["meshbox gateway"],
        cpu["meshbox REST"]
    );
    drop((sg, mp, bare, relay));
}

/// A copy of `way` with no callers made yet.
fn clone_http(way: &Http) -> Http {
    Http {
        base: way.base.clone(),
        path: way.path.clone(),
        headers: way.headers.clone(),
        rest: way.rest.clone(),
        numbered: way.numbered,
        callers: Default::default(),
    }
}
