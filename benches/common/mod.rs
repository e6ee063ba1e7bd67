//! Shared pieces of the benchmarks: a direct stdio client (the baseline)
//! and an in-process meshbox daemon.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use meshbox::api::{self, ApiConfig};
use meshbox::orchestrator::process::{ProcessBackend, ProcessConfig};
use meshbox::supervisor::{Supervisor, SupervisorConfig};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::oneshot;

/// The baseline: a pipelined JSON-RPC client straight on the server's pipes.
/// Callers write concurrently, each its own whole line with one `write(2)`
/// on the non-blocking pipe (atomic below PIPE_BUF), with no lock between
/// them; one reader matches replies by id.
pub struct Direct {
    stdin: tokio::net::unix::pipe::Sender,
    pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>,
    next: AtomicU64,
    child: tokio::process::Child,
}

impl Direct {
    /// Spawns `argv` in `cwd` with the same curated environment meshbox gives servers.
    pub async fn spawn(argv: &[&str], cwd: &Path) -> Direct {
        Self::spawn_with(argv, cwd, &[]).await
    }

    /// As `spawn`, with extra environment (an installer's cache dir, CA bundle).
    pub async fn spawn_with(argv: &[&str], cwd: &Path, extra: &[(String, String)]) -> Direct {
        let home = std::env::temp_dir().join("meshbox-bench-home");
        std::fs::create_dir_all(&home).unwrap();
        let mut child = Command::new(argv[0])
            .args(&argv[1..])
            .current_dir(cwd)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", &home)
            .env("LANG", "C.UTF-8")
            // As meshbox passes them on: a CA bundle in NODE_EXTRA_CA_CERTS
            // alone costs node ~40 ms at start on these machines.
            .envs(meshbox::environ::from_runner(
                meshbox::environ::PROXY_AND_CA,
            ))
            .envs(extra.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let stdin: std::os::fd::OwnedFd = child.stdin.take().unwrap().into_owned_fd().unwrap();
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
            stdin: tokio::net::unix::pipe::Sender::from_owned_fd(stdin).unwrap(),
            pending,
            next: AtomicU64::new(1),
            child,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// One whole line in one write: concurrent writers never interleave.
    async fn write_line(&self, line: &[u8]) {
        assert!(line.len() < 4096, "lines past PIPE_BUF could interleave");
        loop {
            self.stdin.writable().await.unwrap();
            match self.stdin.try_write(line) {
                Ok(n) => {
                    assert_eq!(n, line.len(), "pipe writes below PIPE_BUF are whole");
                    return;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => panic!("writing the server's stdin: {e}"),
            }
        }
    }

    pub async fn request(&self, method: &str, params: Value) -> Value {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(id, tx);
        let line = format!(
            "{}\n",
            json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params})
        );
        self.write_line(line.as_bytes()).await;
        rx.await.unwrap()
    }

    pub async fn notify(&self, method: &str) {
        let line = format!("{}\n", json!({"jsonrpc": "2.0", "method": method}));
        self.write_line(line.as_bytes()).await;
    }

    /// initialize → initialized → tools/list following nextCursor.
    pub async fn handshake(&self) -> usize {
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

/// One HTTP/1.1 keep-alive connection of one caller: no pool, no lock.
///
/// The connection is driven by the caller's own task, as a load generator's
/// event loop does (a pipelining client writes from the caller's task too):
/// no hand-off to a connection task and back on every request.
pub struct HttpCaller {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    conn: Pin<Box<Conn>>,
    host: String,
}

type Conn = hyper::client::conn::http1::Connection<TokioIo<tokio::net::TcpStream>, Full<Bytes>>;

impl HttpCaller {
    pub async fn connect(base: &str) -> HttpCaller {
        let host = base.trim_start_matches("http://").to_owned();
        let (sender, conn) = Self::open(&host).await;
        HttpCaller { sender, conn, host }
    }

    async fn open(
        host: &str,
    ) -> (
        hyper::client::conn::http1::SendRequest<Full<Bytes>>,
        Pin<Box<Conn>>,
    ) {
        let stream = tokio::net::TcpStream::connect(host).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        (sender, Box::pin(conn))
    }

    /// POST `body` to `path`: the status and the whole answer.
    pub async fn post(&mut self, path: &str, body: Bytes) -> (u16, Bytes) {
        self.send(hyper::Method::POST, path, body).await
    }

    pub async fn put(&mut self, path: &str, body: Bytes) -> (u16, Bytes) {
        self.send(hyper::Method::PUT, path, body).await
    }

    pub async fn get(&mut self, path: &str) -> (u16, Bytes) {
        self.send(hyper::Method::GET, path, Bytes::new()).await
    }

    pub async fn delete(&mut self, path: &str) -> (u16, Bytes) {
        self.send(hyper::Method::DELETE, path, Bytes::new()).await
    }

    /// POST `body` to `path` with extra headers (an MCP client's).
    pub async fn post_with(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> (u16, Bytes) {
        self.send_with(hyper::Method::POST, path, headers, body)
            .await
    }

    /// POST with extra headers; also the value of the answer's `header`.
    pub async fn post_session(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
        header: &str,
    ) -> (u16, Bytes, Option<String>) {
        let (status, h, body) = self
            .send_full(hyper::Method::POST, path, headers, body)
            .await;
        let value = h
            .get(header)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        (status, body, value)
    }

    async fn send(&mut self, method: hyper::Method, path: &str, body: Bytes) -> (u16, Bytes) {
        self.send_with(method, path, &[], body).await
    }

    async fn send_with(
        &mut self,
        method: hyper::Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> (u16, Bytes) {
        let (status, _, body) = self.send_full(method, path, headers, body).await;
        (status, body)
    }

    async fn send_full(
        &mut self,
        method: hyper::Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> (u16, hyper::HeaderMap, Bytes) {
        use http_body_util::BodyExt;
        // meshbox closes a kept-alive connection that stays idle past its
        // header timeout (as it should); a caller that sat out a long
        // measurement opens a new one, as any pooling client would.
        if (&mut self.conn).now_or_never().is_some() {
            (self.sender, self.conn) = Self::open(&self.host).await;
        }
        let mut req = hyper::Request::builder()
            .method(method.clone())
            .uri(path)
            .header(hyper::header::HOST, &self.host)
            .header(hyper::header::CONTENT_TYPE, "application/json");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(body)).unwrap();
        let sender = &mut self.sender;
        let exchange = async move {
            sender.ready().await?;
            let resp = sender.send_request(req).await?;
            let status = resp.status().as_u16();
            let headers = resp.headers().clone();
            let bytes = resp.into_body().collect().await?.to_bytes();
            Ok::<_, hyper::Error>((status, headers, bytes))
        };
        let ended = tokio::select! {
            biased;
            r = exchange => match r {
                Ok(answer) => return answer,
                Err(e) => e.to_string(),
            },
            r = &mut self.conn => format!("the connection ended: {r:?}"),
        };
        panic!("{method} {path} on {}: {ended}", self.host)
    }
}

/// `meshbox serve` as its own process (its CPU and memory are its own).
pub struct ProcDaemon {
    child: std::process::Child,
    pub base: String,
    _data: tempfile::TempDir,
}

impl ProcDaemon {
    pub fn start(args: &[&str]) -> ProcDaemon {
        use std::io::BufRead;
        let data = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_meshbox"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--backend",
                "process",
                "--data-dir",
            ])
            .arg(data.path())
            .args(args)
            .env("MESHBOX_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut reader = std::io::BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        let base = loop {
            line.clear();
            assert!(
                reader.read_line(&mut line).unwrap() > 0,
                "meshbox did not start"
            );
            if let Some(u) = line.trim().strip_prefix("meshbox listening on ") {
                break u.to_owned();
            }
        };
        std::thread::spawn(move || {
            let mut sink = String::new();
            while reader.read_line(&mut sink).unwrap_or(0) > 0 {
                sink.clear();
            }
        });
        ProcDaemon {
            child,
            base,
            _data: data,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ProcDaemon {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

/// User + system CPU time of `pid` so far.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(") ").next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) are 11 and 12 after the state field.
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    // USER_HZ is 100 on Linux.
    Duration::from_millis(ticks * 10)
}

/// Resident memory of `pid`, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// meshbox's supervisor and API in this process, on 127.0.0.1:0.
pub struct Daemon {
    pub base: String,
    pub supervisor: Arc<Supervisor>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Daemon {
    pub async fn start(data_dir: PathBuf, path: Option<String>) -> Daemon {
        let backend = ProcessBackend::new(sandboxed_config());
        backend.keep_spare();
        let backend = Arc::new(backend);
        let mut config = SupervisorConfig::new(data_dir);
        if let Some(p) = path {
            config.server_path = p.clone();
            config.install.path = p;
        }
        let supervisor = Arc::new(Supervisor::new(backend, config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = api::router(supervisor.clone(), ApiConfig::default());
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let server = tokio::spawn(api::serve(
            listener,
            router,
            api::ServeConfig::default(),
            async {
                let _ = stop_rx.await;
            },
        ));
        Daemon {
            base: format!("http://{addr}"),
            supervisor,
            stop: Some(stop_tx),
            server: Some(server),
        }
    }

    pub async fn stop(mut self) {
        self.supervisor.shutdown().await;
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(s) = self.server.take() {
            let _ = s.await;
        }
    }
}

/// The process backend as `meshbox serve` runs it: sandboxed by the real
/// meshbox binary's `sandbox-init` (not this benchmark's own executable).
pub fn sandboxed_config() -> ProcessConfig {
    ProcessConfig {
        init_program: Some(PathBuf::from(env!("CARGO_BIN_EXE_meshbox"))),
        ..Default::default()
    }
}

/// How a bench prints a figure against its issue's target.
pub fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "NOT MET"
    }
}

/// A duration in microseconds.
pub fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

pub fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Set in a bench process that is to be [`BareHttp`]'s server: `answer`, or
/// `relay:` and the directory of a node server to relay to.
const BARE_HTTP: &str = "MESHBOX_BENCH_BARE_HTTP";

/// The answer [`BareHttp`] gives every request when it relays nothing: the
/// size and shape of meshbox's answer to an `echo` call.
const BARE_ANSWER: &str = r#"{"result":{"content":[{"type":"text","text":"hello"}]}}"#;

/// References, not contenders, each in its own process (the bench's own
/// binary, started again) and serving HTTP/1.1 as meshbox does (hyper on a
/// multi-thread tokio runtime, each request's body read whole):
/// - [`BareHttp::answering`] relays nothing: a fixed answer. What one call
///   to it costs is what the HTTP hop alone costs on this machine.
/// - [`BareHttp::relaying`] is the least a runner can be: every request goes
///   to one node server over its pipes as a `tools/call` ([`Direct`]: callers
///   write concurrently, one reader matches replies by id) and its result
///   comes back. No validation, limits, deadlines, logs, metrics, auth or
///   lifecycle.
pub struct BareHttp {
    child: std::process::Child,
    pub base: String,
}

impl BareHttp {
    pub fn answering() -> BareHttp {
        Self::start("answer".into())
    }

    pub fn relaying(server_dir: &Path) -> BareHttp {
        Self::start(format!("relay:{}", server_dir.display()))
    }

    fn start(mode: String) -> BareHttp {
        use std::io::BufRead;
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .env(BARE_HTTP, mode)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let base = line
            .trim()
            .strip_prefix("bare http on ")
            .unwrap_or_else(|| panic!("the bare HTTP server did not start: {line:?}"))
            .to_owned();
        BareHttp { child, base }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for BareHttp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the relaying [`BareHttp`] answers: a JSON-RPC request gets its
/// answer under the client's id; any other body `{"tool", "arguments"}` gets
/// `{"result": …}`.
async fn relay(direct: &Direct, body: &[u8]) -> Value {
    let req: Value = serde_json::from_slice(body).unwrap_or_default();
    match req.get("method").and_then(Value::as_str) {
        Some(method) => {
            let mut params = req.get("params").cloned().unwrap_or_default();
            if let Some(p) = params.as_object_mut() {
                p.remove("_meta");
            }
            let mut r = direct.request(method, params).await;
            r["id"] = req["id"].clone();
            r
        }
        None => {
            let params = json!({"name": req["tool"], "arguments": req["arguments"]});
            let r = direct.request("tools/call", params).await;
            json!({"result": r["result"]})
        }
    }
}

/// In a process started by [`BareHttp`], serves until killed; in any other,
/// returns at once. Call it first thing in a bench's `main`.
pub async fn serve_bare_http_if_asked() {
    use http_body_util::BodyExt;
    let Some(mode) = std::env::var_os(BARE_HTTP) else {
        return;
    };
    let direct = match mode.to_str().and_then(|m| m.strip_prefix("relay:")) {
        Some(dir) => {
            let d = Direct::spawn(&["node", "server.js"], Path::new(dir)).await;
            d.handshake().await;
            Some(Arc::new(d))
        }
        None => None,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!("bare http on http://{}", listener.local_addr().unwrap());
    loop {
        let (stream, _) = listener.accept().await.unwrap();
        stream.set_nodelay(true).unwrap();
        let direct = direct.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let direct = direct.clone();
                    async move {
                        let body = req.into_body().collect().await?.to_bytes();
                        let answer = match &direct {
                            Some(d) => Bytes::from(relay(d, &body).await.to_string()),
                            None => Bytes::from_static(BARE_ANSWER.as_bytes()),
                        };
                        let mut resp = hyper::Response::new(Full::new(answer));
                        resp.headers_mut().insert(
                            hyper::header::CONTENT_TYPE,
                            hyper::header::HeaderValue::from_static("application/json"),
                        );
                        Ok::<_, hyper::Error>(resp)
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
