//! The MCP client session: JSON-RPC 2.0 over newline-delimited stdio.
//!
//! One actor task owns the pending-request map and `select!`s over the command
//! queue, the reader and the server's exit signal. Writers share the server's
//! stdin through one lock, so messages never interleave; callers write their
//! own requests (no extra task hop on the hot path) and the actor never waits
//! on stdin, so a server that stops reading never blocks replies being read. Messages are plain
//! `serde_json::Value`s: unknown methods and fields pass through untouched.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::codec::FramedRead;
use tracing::{debug, warn};

use super::framing::{Frame, LineCodec, DEFAULT_MAX_LINE};
use super::{negotiate_version, LATEST_PROTOCOL_VERSION};
use crate::orchestrator::{wait_exit, BoxWrite, ExitReason};

/// Where a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogStream {
    Stdout,
    Stderr,
    /// meshbox's own notes about the service (restarts, dropped lines).
    Meshbox,
}

impl fmt::Display for LogStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogStream::Stdout => "stdout",
            LogStream::Stderr => "stderr",
            LogStream::Meshbox => "meshbox",
        })
    }
}

/// Receives every line that is not protocol: non-JSON stdout, server log notifications.
pub type LogSink = Arc<dyn Fn(LogStream, &str) + Send + Sync>;

#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    #[error("call timed out after {}ms", .0.as_millis())]
    Timeout(Duration),
    #[error("server answered with error {code}: {message}")]
    Rpc {
        code: i64,
        message: String,
        data: Option<Value>,
    },
    #[error("server exited ({0})")]
    Exited(ExitReason),
    #[error("session closed: {0}")]
    Closed(String),
    #[error("protocol error: {0}")]
    Protocol(String),
}

#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Longest accepted stdout line; longer lines are dropped.
    pub max_line: usize,
    /// Answer to the server's `roots/list` requests.
    pub roots: Vec<Value>,
    /// How long to wait for the exit reason once stdout has closed.
    pub exit_grace: Duration,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            max_line: DEFAULT_MAX_LINE,
            roots: Vec::new(),
            exit_grace: Duration::from_secs(2),
        }
    }
}

/// What the server said in its `initialize` answer.
#[derive(Debug, Clone)]
pub struct ServerInfo {
    pub protocol_version: &'static str,
    pub info: Value,
    pub capabilities: Value,
}

type Reply = Result<Value, CallError>;

enum Command {
    /// Registers a reply slot; the caller writes the request itself afterwards.
    Request {
        id: u64,
        reply: oneshot::Sender<Reply>,
    },
    /// Forgets a request that timed out.
    Cancel { id: u64 },
}

/// The server's stdin, shared by everyone who writes; `None` once closed.
type SharedWriter = Arc<tokio::sync::Mutex<Option<BoxWrite>>>;

/// Writes one whole line; false when stdin is closed or broken.
async fn write_line(writer: &SharedWriter, line: &[u8]) -> bool {
    let mut guard = writer.lock().await;
    let Some(w) = guard.as_mut() else {
        return false;
    };
    if w.write_all(line).await.is_err() || w.flush().await.is_err() {
        debug!("server stdin closed");
        *guard = None;
        return false;
    }
    true
}

/// Cheap handle for sending requests; clones share the id counter.
#[derive(Clone)]
struct Client {
    commands: mpsc::UnboundedSender<Command>,
    writer: SharedWriter,
    next_id: Arc<AtomicU64>,
    closed: watch::Receiver<Option<CallError>>,
}

impl Client {
    fn closed_error(&self) -> CallError {
        self.closed
            .borrow()
            .clone()
            .unwrap_or_else(|| CallError::Closed("session ended".into()))
    }

    async fn request(&self, method: &str, params: Value, timeout: Duration) -> Reply {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let msg = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        let line = encode(&msg);
        let (tx, rx) = oneshot::channel();
        // Registered before it is written, so the reply always finds its slot.
        self.commands
            .send(Command::Request { id, reply: tx })
            .map_err(|_| self.closed_error())?;
        // A failed write means the server is going; the actor then fails the
        // slot with its exit reason, so just wait for the answer.
        write_line(&self.writer, &line).await;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => Err(self.closed_error()),
            Err(_) => {
                let _ = self.commands.send(Command::Cancel { id });
                // `initialize` must never be cancelled (MCP spec).
                if method != "initialize" {
                    let cancel = encode(&json!({
                        "jsonrpc": "2.0",
                        "method": "notifications/cancelled",
                        "params": {"requestId": id, "reason": "timeout"},
                    }));
                    write_line(&self.writer, &cancel).await;
                }
                Err(CallError::Timeout(timeout))
            }
        }
    }

    async fn notify(&self, method: &str, params: Option<Value>) -> Result<(), CallError> {
        let msg = match params {
            Some(p) => json!({"jsonrpc": "2.0", "method": method, "params": p}),
            None => json!({"jsonrpc": "2.0", "method": method}),
        };
        if write_line(&self.writer, &encode(&msg)).await {
            Ok(())
        } else {
            Err(self.closed_error())
        }
    }

    async fn list_tools(&self, timeout: Duration) -> Result<Vec<Value>, CallError> {
        const MAX_PAGES: usize = 1000;
        let mut tools = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let params = match &cursor {
                Some(c) => json!({ "cursor": c }),
                None => json!({}),
            };
            let result = self.request("tools/list", params, timeout).await?;
            match result.get("tools") {
                Some(Value::Array(page)) => tools.extend(page.iter().cloned()),
                Some(_) => {
                    return Err(CallError::Protocol(
                        "tools/list: `tools` is not an array".into(),
                    ))
                }
                None => {}
            }
            match result.get("nextCursor") {
                Some(Value::String(next)) if !next.is_empty() => {
                    if cursor.as_deref() == Some(next.as_str()) {
                        return Err(CallError::Protocol(
                            "tools/list: server repeated the same nextCursor".into(),
                        ));
                    }
                    cursor = Some(next.clone());
                }
                _ => return Ok(tools),
            }
        }
        Err(CallError::Protocol(format!(
            "tools/list: more than {MAX_PAGES} pages"
        )))
    }
}

fn encode(msg: &Value) -> Bytes {
    let mut v = serde_json::to_vec(msg).expect("a Value always serializes");
    v.push(b'\n');
    Bytes::from(v)
}

/// A live MCP session with one server.
pub struct Session {
    client: Client,
    /// `None` until the handshake's `tools/list` (or a refresh) answered.
    tools: watch::Receiver<Option<Arc<Vec<Value>>>>,
    tools_tx: Arc<watch::Sender<Option<Arc<Vec<Value>>>>>,
    actor: tokio::task::JoinHandle<()>,
    refresher: tokio::task::JoinHandle<()>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.actor.abort();
        self.refresher.abort();
    }
}

impl Session {
    /// Starts the session's tasks over a server's stdout (`reader`) and stdin
    /// (`writer`). `exit` resolves to the server's exit reason when it dies.
    pub fn start<R, W>(
        reader: R,
        writer: W,
        exit: watch::Receiver<Option<ExitReason>>,
        log: LogSink,
        config: SessionConfig,
    ) -> Session
    where
        R: AsyncRead + Send + Unpin + 'static,
        W: AsyncWrite + Send + Unpin + 'static,
    {
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (closed_tx, closed_rx) = watch::channel(None);
        let (list_changed_tx, mut list_changed_rx) = mpsc::channel::<()>(1);
        let writer: SharedWriter =
            Arc::new(tokio::sync::Mutex::new(Some(Box::pin(writer) as BoxWrite)));
        let actor = Actor {
            pending: HashMap::new(),
            out: Some(writer.clone()),
            log: log.clone(),
            roots: config.roots.clone(),
            list_changed: list_changed_tx,
        };
        let frames = FramedRead::with_capacity(reader, LineCodec::new(config.max_line), 64 * 1024);
        let actor = tokio::spawn(actor.run(frames, cmd_rx, exit, closed_tx, config.exit_grace));
        let client = Client {
            commands: cmd_tx,
            writer,
            // A random base: replies still in flight to a previous session
            // (a re-adopted server) can never match this session's ids.
            next_id: Arc::new(AtomicU64::new(1 + (u64::from(fastrand::u32(..)) << 20))),
            closed: closed_rx,
        };
        let (tools_tx, tools_rx) = watch::channel(None);
        let tools_tx = Arc::new(tools_tx);
        let refresher = {
            let client = client.clone();
            let tools_tx = tools_tx.clone();
            let log = log.clone();
            tokio::spawn(async move {
                while list_changed_rx.recv().await.is_some() {
                    match client.list_tools(Duration::from_secs(30)).await {
                        Ok(tools) => {
                            tools_tx.send_replace(Some(Arc::new(tools)));
                        }
                        Err(e) => log(
                            LogStream::Meshbox,
                            &format!("tools/list refresh after list_changed failed: {e}"),
                        ),
                    }
                }
            })
        };
        Session {
            client,
            tools: tools_rx,
            tools_tx,
            actor,
            refresher,
        }
    }

    /// `initialize` → `notifications/initialized` → `tools/list` (all pages).
    pub async fn handshake(&self, timeout: Duration) -> Result<ServerInfo, CallError> {
        let params = json!({
            "protocolVersion": LATEST_PROTOCOL_VERSION,
            "capabilities": { "roots": { "listChanged": false } },
            "clientInfo": { "name": "meshbox", "version": env!("CARGO_PKG_VERSION") },
        });
        let deadline = tokio::time::Instant::now() + timeout;
        let result = self.client.request("initialize", params, timeout).await?;
        let answered = result
            .get("protocolVersion")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                CallError::Protocol("initialize: no protocolVersion in answer".into())
            })?;
        let protocol_version = negotiate_version(answered).ok_or_else(|| {
            CallError::Protocol(format!(
                "server speaks protocol version {answered}, which meshbox does not support"
            ))
        })?;
        self.client
            .notify("notifications/initialized", None)
            .await?;
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let tools = Arc::new(
            self.client
                .list_tools(left.max(Duration::from_millis(1)))
                .await?,
        );
        // A refresh after `list_changed` may have finished first; its list is newer.
        self.tools_tx.send_if_modified(|cur| {
            let first = cur.is_none();
            if first {
                *cur = Some(tools);
            }
            first
        });
        Ok(ServerInfo {
            protocol_version,
            info: result.get("serverInfo").cloned().unwrap_or(Value::Null),
            capabilities: result.get("capabilities").cloned().unwrap_or(Value::Null),
        })
    }

    /// Takes over a server that was initialized by an earlier session (a
    /// re-adopted container): no new handshake, just its current tool list.
    pub async fn adopt(&self, timeout: Duration) -> Result<(), CallError> {
        self.refresh_tools(timeout).await.map(|_| ())
    }

    /// Any request; the answer's `result`, or the error.
    pub async fn request(&self, method: &str, params: Value, timeout: Duration) -> Reply {
        self.client.request(method, params, timeout).await
    }

    pub async fn call_tool(&self, tool: &str, arguments: Value, timeout: Duration) -> Reply {
        self.client
            .request(
                "tools/call",
                json!({"name": tool, "arguments": arguments}),
                timeout,
            )
            .await
    }

    pub async fn ping(&self, timeout: Duration) -> Result<(), CallError> {
        self.client
            .request("ping", json!({}), timeout)
            .await
            .map(|_| ())
    }

    /// Re-reads the tool list (all pages) and publishes it.
    pub async fn refresh_tools(&self, timeout: Duration) -> Result<Arc<Vec<Value>>, CallError> {
        let tools = Arc::new(self.client.list_tools(timeout).await?);
        self.tools_tx.send_replace(Some(tools.clone()));
        Ok(tools)
    }

    /// The last tool list the server gave.
    pub fn tools(&self) -> Arc<Vec<Value>> {
        self.tools.borrow().clone().unwrap_or_default()
    }

    /// Resolves when the session has ended, with the reason.
    pub async fn closed(&self) -> CallError {
        let mut rx = self.client.closed.clone();
        let reason = rx
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|v| v.clone());
        reason.unwrap_or_else(|| CallError::Closed("session ended".into()))
    }

    /// Closes the server's stdin; replies already on their way are still read.
    pub fn close(&self) {
        let writer = self.client.writer.clone();
        tokio::spawn(async move {
            let w = writer.lock().await.take();
            if let Some(mut w) = w {
                let _ = w.shutdown().await;
            }
        });
    }

    pub fn is_closed(&self) -> bool {
        self.client.closed.borrow().is_some() || self.client.commands.is_closed()
    }
}

struct Actor {
    pending: HashMap<u64, oneshot::Sender<Reply>>,
    /// For answers to the server's requests; `None` once every handle is gone.
    out: Option<SharedWriter>,
    log: LogSink,
    roots: Vec<Value>,
    list_changed: mpsc::Sender<()>,
}

impl Actor {
    async fn run<R: AsyncRead + Unpin>(
        mut self,
        mut frames: FramedRead<R, LineCodec>,
        mut commands: mpsc::UnboundedReceiver<Command>,
        mut exit: watch::Receiver<Option<ExitReason>>,
        closed: watch::Sender<Option<CallError>>,
        exit_grace: Duration,
    ) {
        enum Next {
            Continue,
            StreamEnded,
            Exited(ExitReason),
        }
        let mut commands_open = true;
        let reason = loop {
            let next = tokio::select! {
                // Commands first: a request is registered before its reply is read.
                biased;
                cmd = commands.recv(), if commands_open => {
                    match cmd {
                        Some(cmd) => self.on_command(cmd),
                        None => {
                            // Every handle is gone: close stdin, wait for the server to go.
                            commands_open = false;
                            self.out = None;
                        }
                    }
                    Next::Continue
                }
                frame = frames.next() => match frame {
                    Some(Ok(frame)) => {
                        self.on_frame(frame);
                        Next::Continue
                    }
                    Some(Err(e)) => {
                        warn!(error = %e, "reading server stdout failed");
                        Next::StreamEnded
                    }
                    None => Next::StreamEnded,
                },
                reason = wait_exit(&mut exit) => Next::Exited(reason),
            };
            match next {
                Next::Continue => {}
                Next::StreamEnded => {
                    break match tokio::time::timeout(exit_grace, wait_exit(&mut exit)).await {
                        Ok(r) => CallError::Exited(r),
                        Err(_) => CallError::Closed("server closed its stdout".into()),
                    };
                }
                Next::Exited(reason) => {
                    // Read what the server wrote before it died, briefly.
                    let drain = async {
                        while let Some(Ok(frame)) = frames.next().await {
                            self.on_frame(frame);
                        }
                    };
                    let _ = tokio::time::timeout(Duration::from_millis(200), drain).await;
                    break CallError::Exited(reason);
                }
            }
        };
        self.out = None;
        closed.send_replace(Some(reason.clone()));
        for (_, reply) in self.pending.drain() {
            let _ = reply.send(Err(reason.clone()));
        }
        // Fail requests that were queued behind the end too.
        commands.close();
        while let Some(cmd) = commands.recv().await {
            if let Command::Request { reply, .. } = cmd {
                let _ = reply.send(Err(reason.clone()));
            }
        }
    }

    /// Writes without waiting: the actor must never block on the server's stdin.
    fn send(&self, line: Bytes) {
        if let Some(out) = self.out.clone() {
            tokio::spawn(async move { write_line(&out, &line).await });
        }
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Request { id, reply } => {
                self.pending.insert(id, reply);
            }
            Command::Cancel { id } => {
                self.pending.remove(&id);
            }
        }
    }

    fn on_frame(&mut self, frame: Frame) {
        let line = match frame {
            Frame::Line(line) => line,
            Frame::Oversized(n) => {
                (self.log)(
                    LogStream::Meshbox,
                    &format!("dropped a stdout line of {n} bytes (longer than the line cap)"),
                );
                return;
            }
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        let msg: Value = match serde_json::from_slice(&line) {
            Ok(v @ Value::Object(_)) => v,
            _ => {
                (self.log)(LogStream::Stdout, &String::from_utf8_lossy(&line));
                return;
            }
        };
        let has_method = msg.get("method").is_some();
        let id = msg.get("id").filter(|v| !v.is_null()).cloned();
        match (has_method, id) {
            (false, Some(id)) => self.on_response(id, msg),
            (true, Some(id)) => self.on_server_request(id, &msg),
            (true, None) => self.on_notification(&msg),
            (false, None) => (self.log)(LogStream::Stdout, &String::from_utf8_lossy(&line)),
        }
    }

    fn on_response(&mut self, id: Value, mut msg: Value) {
        let Some(id) = id.as_u64() else {
            debug!(%id, "reply to an id meshbox never sent");
            return;
        };
        let Some(reply) = self.pending.remove(&id) else {
            debug!(id, "reply to a request no longer pending");
            return;
        };
        let result = if let Some(err) = msg.get_mut("error") {
            Err(CallError::Rpc {
                code: err.get("code").and_then(Value::as_i64).unwrap_or(-32603),
                message: err
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned(),
                data: err.get_mut("data").map(Value::take),
            })
        } else {
            Ok(msg
                .get_mut("result")
                .map(Value::take)
                .unwrap_or(Value::Null))
        };
        let _ = reply.send(result);
    }

    fn on_server_request(&mut self, id: Value, msg: &Value) {
        let method = msg.get("method").and_then(Value::as_str).unwrap_or("");
        let answer = match method {
            "ping" => json!({"jsonrpc": "2.0", "id": id, "result": {}}),
            "roots/list" => json!({"jsonrpc": "2.0", "id": id, "result": {"roots": self.roots}}),
            other => json!({
                "jsonrpc": "2.0",
                "id": id,
                "error": {"code": -32601, "message": format!("method not supported by meshbox: {other}")},
            }),
        };
        self.send(encode(&answer));
    }

    fn on_notification(&mut self, msg: &Value) {
        match msg.get("method").and_then(Value::as_str).unwrap_or("") {
            "notifications/tools/list_changed" => {
                // A full channel means a refresh is already queued.
                let _ = self.list_changed.try_send(());
            }
            "notifications/message" => {
                let params = msg.get("params").cloned().unwrap_or(Value::Null);
                let level = params
                    .get("level")
                    .and_then(Value::as_str)
                    .unwrap_or("info");
                let data = params.get("data").cloned().unwrap_or(Value::Null);
                let text = match data {
                    Value::String(s) => s,
                    other => other.to_string(),
                };
                (self.log)(LogStream::Stdout, &format!("[{level}] {text}"));
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, DuplexStream, Lines};

    use super::*;

    /// The server end of a session under test: reads requests, writes anything.
    struct Fake {
        lines: Lines<BufReader<DuplexStream>>,
        out: DuplexStream,
    }

    impl Fake {
        async fn recv(&mut self) -> Value {
            let line = self
                .lines
                .next_line()
                .await
                .unwrap()
                .expect("client closed");
            serde_json::from_str(&line).unwrap()
        }
        async fn send_raw(&mut self, s: &str) {
            self.out.write_all(s.as_bytes()).await.unwrap();
            self.out.write_all(b"\n").await.unwrap();
        }
        async fn send(&mut self, v: Value) {
            self.send_raw(&v.to_string()).await;
        }
        async fn reply(&mut self, id: &Value, result: Value) {
            self.send(json!({"jsonrpc": "2.0", "id": id, "result": result}))
                .await;
        }
        /// Answers initialize (with `version`), expects initialized, answers tools/list.
        async fn handshake(&mut self, version: &str) {
            let init = self.recv().await;
            assert_eq!(init["method"], "initialize");
            assert_eq!(
                init["params"]["protocolVersion"],
                crate::mcp::LATEST_PROTOCOL_VERSION
            );
            self.reply(
                &init["id"],
                json!({"protocolVersion": version, "capabilities": {}}),
            )
            .await;
            let n = self.recv().await;
            assert_eq!(n["method"], "notifications/initialized");
            assert!(n.get("id").is_none());
            let list = self.recv().await;
            self.reply(&list["id"], json!({"tools": [{"name": "t"}]}))
                .await;
        }
    }

    type Logs = Arc<Mutex<Vec<(LogStream, String)>>>;

    fn start(max_line: usize) -> (Session, Fake, watch::Sender<Option<ExitReason>>, Logs) {
        let (client_w, server_r) = tokio::io::duplex(1 << 20);
        let (server_w, client_r) = tokio::io::duplex(1 << 20);
        let (exit_tx, exit_rx) = watch::channel(None);
        let logs: Logs = Arc::default();
        let sink = {
            let logs = logs.clone();
            Arc::new(move |s: LogStream, l: &str| logs.lock().unwrap().push((s, l.to_owned())))
        };
        let session = Session::start(
            client_r,
            client_w,
            exit_rx,
            sink,
            SessionConfig {
                max_line,
                roots: vec![json!({"uri": "file:///data", "name": "data"})],
                exit_grace: Duration::from_millis(100),
            },
        );
        let fake = Fake {
            lines: BufReader::new(server_r).lines(),
            out: server_w,
        };
        (session, fake, exit_tx, logs)
    }

    const T: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn handshake_accepts_an_older_version_and_pages_tools() {
        let (s, mut f, _exit, _) = start(1 << 20);
        let server = tokio::spawn(async move {
            let init = f.recv().await;
            f.reply(&init["id"], json!({"protocolVersion": "2024-11-05", "capabilities": {}, "serverInfo": {"name": "x"}})).await;
            assert_eq!(f.recv().await["method"], "notifications/initialized");
            let p1 = f.recv().await;
            assert_eq!(p1["params"], json!({}));
            f.reply(
                &p1["id"],
                json!({"tools": [{"name": "a"}], "nextCursor": "c1"}),
            )
            .await;
            let p2 = f.recv().await;
            assert_eq!(p2["params"]["cursor"], "c1");
            f.reply(
                &p2["id"],
                json!({"tools": [{"name": "b"}, {"name": "c", "x-extra": 1}]}),
            )
            .await;
            f
        });
        let info = s.handshake(T).await.unwrap();
        assert_eq!(info.protocol_version, "2024-11-05");
        assert_eq!(info.info["name"], "x");
        let tools = s.tools();
        let names: Vec<_> = tools.iter().map(|t| t["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert_eq!(tools[2]["x-extra"], 1, "unknown fields pass through");
        server.await.unwrap();
    }

    #[tokio::test]
    async fn unsupported_version_is_refused() {
        let (s, mut f, _exit, _) = start(1 << 20);
        tokio::spawn(async move {
            let init = f.recv().await;
            f.reply(&init["id"], json!({"protocolVersion": "1999-01-01"}))
                .await;
            f
        });
        let err = s.handshake(T).await.unwrap_err();
        assert!(err.to_string().contains("1999-01-01"), "{err}");
    }

    #[tokio::test]
    async fn concurrent_calls_matched_out_of_order() {
        let (s, mut f, _exit, _) = start(1 << 20);
        let server = tokio::spawn(async move {
            f.handshake("2025-11-25").await;
            let mut reqs = Vec::new();
            for _ in 0..20 {
                reqs.push(f.recv().await);
            }
            // Answer newest first.
            for r in reqs.iter().rev() {
                let n = r["params"]["arguments"]["n"].clone();
                f.reply(&r["id"], json!({"n": n})).await;
            }
            f
        });
        s.handshake(T).await.unwrap();
        let s = Arc::new(s);
        let calls = (0..20).map(|i| {
            let s = s.clone();
            async move { s.call_tool("t", json!({"n": i}), T).await.unwrap()["n"].clone() }
        });
        let got = futures_util::future::join_all(calls).await;
        assert_eq!(got, (0..20).map(|i| json!(i)).collect::<Vec<_>>());
        server.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn timeout_sends_cancelled_and_session_lives_on() {
        let (s, mut f, _exit, _) = start(1 << 20);
        let server = tokio::spawn(async move {
            f.handshake("2025-11-25").await;
            let hung = f.recv().await;
            let cancel = f.recv().await;
            assert_eq!(cancel["method"], "notifications/cancelled");
            assert_eq!(cancel["params"]["requestId"], hung["id"]);
            // A late reply to the cancelled request is ignored.
            f.reply(&hung["id"], json!({"late": true})).await;
            let next = f.recv().await;
            f.reply(&next["id"], json!({"ok": true})).await;
            f
        });
        s.handshake(T).await.unwrap();
        let err = s
            .call_tool("hang", json!({}), Duration::from_secs(25))
            .await
            .unwrap_err();
        assert!(matches!(err, CallError::Timeout(d) if d == Duration::from_secs(25)));
        let ok = s.call_tool("t", json!({}), T).await.unwrap();
        assert_eq!(ok["ok"], true);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn answers_server_requests() {
        let (s, mut f, _exit, _) = start(1 << 20);
        let server = tokio::spawn(async move {
            f.handshake("2025-11-25").await;
            f.send(json!({"jsonrpc": "2.0", "id": "p1", "method": "ping"}))
                .await;
            let a = f.recv().await;
            assert_eq!(
                (a["id"].clone(), a["result"].clone()),
                (json!("p1"), json!({}))
            );
            f.send(json!({"jsonrpc": "2.0", "id": 7, "method": "roots/list"}))
                .await;
            let a = f.recv().await;
            assert_eq!(a["result"]["roots"][0]["uri"], "file:///data");
            f.send(json!({"jsonrpc": "2.0", "id": 8, "method": "sampling/createMessage", "params": {}})).await;
            let a = f.recv().await;
            assert_eq!(a["error"]["code"], -32601);
            f
        });
        s.handshake(T).await.unwrap();
        server.await.unwrap();
    }

    #[tokio::test]
    async fn list_changed_refreshes_tools() {
        let (s, mut f, _exit, _logs) = start(1 << 20);
        let server = tokio::spawn(async move {
            f.handshake("2025-11-25").await;
            f.send(json!({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}))
                .await;
            let list = f.recv().await;
            assert_eq!(list["method"], "tools/list");
            f.reply(
                &list["id"],
                json!({"tools": [{"name": "t"}, {"name": "new"}]}),
            )
            .await;
            f
        });
        s.handshake(T).await.unwrap();
        let _f = server.await.unwrap();
        for _ in 0..100 {
            if s.tools().len() == 2 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "tool list not refreshed: {:?} {:?}",
            s.tools(),
            _logs.lock().unwrap()
        );
    }

    #[tokio::test]
    async fn garbage_and_oversized_lines_go_to_logs() {
        let (s, mut f, _exit, logs) = start(1024);
        let server = tokio::spawn(async move {
            f.handshake("2025-11-25").await;
            let r = f.recv().await;
            f.send_raw("starting up... not json").await;
            f.send_raw(&"y".repeat(5000)).await;
            f.send_raw("[1,2,3]").await;
            f.reply(&r["id"], json!({"fine": true})).await;
            f
        });
        s.handshake(T).await.unwrap();
        let r = s.call_tool("t", json!({}), T).await.unwrap();
        assert_eq!(r["fine"], true);
        let logs = logs.lock().unwrap().clone();
        assert!(
            logs.contains(&(LogStream::Stdout, "starting up... not json".into())),
            "{logs:?}"
        );
        assert!(
            logs.iter()
                .any(|(s, l)| *s == LogStream::Meshbox && l.contains("5000 bytes")),
            "{logs:?}"
        );
        assert!(logs.contains(&(LogStream::Stdout, "[1,2,3]".into())));
        drop(server);
    }

    #[tokio::test]
    async fn pending_calls_fail_at_once_when_the_server_dies() {
        let (s, mut f, exit, _) = start(1 << 20);
        let server = tokio::spawn(async move {
            f.handshake("2025-11-25").await;
            let _ = f.recv().await;
            f
        });
        s.handshake(T).await.unwrap();
        let s = Arc::new(s);
        let call = {
            let s = s.clone();
            tokio::spawn(async move { s.call_tool("t", json!({}), Duration::from_secs(60)).await })
        };
        let f = server.await.unwrap();
        let started = std::time::Instant::now();
        exit.send_replace(Some(ExitReason {
            code: None,
            signal: Some(9),
            oom_killed: true,
        }));
        drop(f);
        let err = call.await.unwrap().unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(1));
        match &err {
            CallError::Exited(r) => assert!(r.oom_killed),
            other => panic!("unexpected {other:?}"),
        }
        assert!(err.to_string().contains("out of memory"), "{err}");
        // Later calls fail at once with the same reason.
        let again = s.call_tool("t", json!({}), T).await.unwrap_err();
        assert!(matches!(again, CallError::Exited(_)), "{again:?}");
        assert!(matches!(s.closed().await, CallError::Exited(_)));
    }

    #[tokio::test]
    async fn rpc_errors_carry_code_and_message() {
        let (s, mut f, _exit, _) = start(1 << 20);
        tokio::spawn(async move {
            f.handshake("2025-11-25").await;
            let r = f.recv().await;
            f.send(json!({"jsonrpc": "2.0", "id": r["id"], "error": {"code": -32000, "message": "boom", "data": {"k": 1}}})).await;
            f
        });
        s.handshake(T).await.unwrap();
        match s.call_tool("t", json!({}), T).await.unwrap_err() {
            CallError::Rpc {
                code,
                message,
                data,
            } => {
                assert_eq!((code, message.as_str()), (-32000, "boom"));
                assert_eq!(data.unwrap()["k"], 1);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
