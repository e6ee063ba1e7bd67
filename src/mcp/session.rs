//! The MCP client session: JSON-RPC 2.0 over newline-delimited stdio.
//!
//! One actor task owns the pending-request map and `select!`s over the reader,
//! the command queue and the server's exit signal; one writer task owns the
//! server's stdin, so messages never interleave and a slow reader on the other
//! side never blocks replies from being read. Messages are plain
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
use crate::orchestrator::{wait_exit, ExitReason};

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
    Request {
        id: u64,
        line: Bytes,
        reply: oneshot::Sender<Reply>,
    },
    Notify {
        line: Bytes,
    },
    Cancel {
        id: u64,
        reason: &'static str,
    },
    /// Close the server's stdin: the polite way to ask it to exit.
    Close,
}

/// Cheap handle for sending requests; clones share the id counter.
#[derive(Clone)]
struct Client {
    commands: mpsc::UnboundedSender<Command>,
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
        self.commands
            .send(Command::Request {
                id,
                line,
                reply: tx,
            })
            .map_err(|_| self.closed_error())?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => Err(self.closed_error()),
            Err(_) => {
                // `initialize` must never be cancelled (MCP spec).
                if method != "initialize" {
                    let _ = self.commands.send(Command::Cancel {
                        id,
                        reason: "timeout",
                    });
                }
                Err(CallError::Timeout(timeout))
            }
        }
    }

    fn notify(&self, method: &str, params: Option<Value>) -> Result<(), CallError> {
        let msg = match params {
            Some(p) => json!({"jsonrpc": "2.0", "method": method, "params": p}),
            None => json!({"jsonrpc": "2.0", "method": method}),
        };
        self.commands
            .send(Command::Notify { line: encode(&msg) })
            .map_err(|_| self.closed_error())
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
                Some(_) => return Err(CallError::Protocol("tools/list: `tools` is not an array".into())),
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
    tools: watch::Receiver<Arc<Vec<Value>>>,
    tools_tx: Arc<watch::Sender<Arc<Vec<Value>>>>,
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
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let (closed_tx, closed_rx) = watch::channel(None);
        let (list_changed_tx, mut list_changed_rx) = mpsc::channel::<()>(1);
        tokio::spawn(write_loop(writer, out_rx));
        let actor = Actor {
            pending: HashMap::new(),
            out: Some(out_tx),
            log: log.clone(),
            roots: config.roots.clone(),
            list_changed: list_changed_tx,
        };
        let frames = FramedRead::with_capacity(reader, LineCodec::new(config.max_line), 64 * 1024);
        let actor = tokio::spawn(actor.run(frames, cmd_rx, exit, closed_tx, config.exit_grace));
        let client = Client {
            commands: cmd_tx,
            next_id: Arc::new(AtomicU64::new(1)),
            closed: closed_rx,
        };
        let (tools_tx, tools_rx) = watch::channel(Arc::new(Vec::new()));
        let tools_tx = Arc::new(tools_tx);
        let refresher = {
            let client = client.clone();
            let tools_tx = tools_tx.clone();
            let log = log.clone();
            tokio::spawn(async move {
                while list_changed_rx.recv().await.is_some() {
                    match client.list_tools(Duration::from_secs(30)).await {
                        Ok(tools) => {
                            tools_tx.send_replace(Arc::new(tools));
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
            .ok_or_else(|| CallError::Protocol("initialize: no protocolVersion in answer".into()))?;
        let protocol_version = negotiate_version(answered).ok_or_else(|| {
            CallError::Protocol(format!(
                "server speaks protocol version {answered}, which meshbox does not support"
            ))
        })?;
        self.client.notify("notifications/initialized", None)?;
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let tools = self.client.list_tools(left.max(Duration::from_millis(1))).await?;
        self.tools_tx.send_replace(Arc::new(tools));
        Ok(ServerInfo {
            protocol_version,
            info: result.get("serverInfo").cloned().unwrap_or(Value::Null),
            capabilities: result.get("capabilities").cloned().unwrap_or(Value::Null),
        })
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
        self.client.request("ping", json!({}), timeout).await.map(|_| ())
    }

    /// Re-reads the tool list (all pages) and publishes it.
    pub async fn refresh_tools(&self, timeout: Duration) -> Result<Arc<Vec<Value>>, CallError> {
        let tools = Arc::new(self.client.list_tools(timeout).await?);
        self.tools_tx.send_replace(tools.clone());
        Ok(tools)
    }

    /// The last tool list the server gave.
    pub fn tools(&self) -> Arc<Vec<Value>> {
        self.tools.borrow().clone()
    }

    /// Resolves when the session has ended, with the reason.
    pub async fn closed(&self) -> CallError {
        let mut rx = self.client.closed.clone();
        let reason = rx.wait_for(Option::is_some).await.ok().and_then(|v| v.clone());
        reason.unwrap_or_else(|| CallError::Closed("session ended".into()))
    }

    /// Closes the server's stdin; replies already on their way are still read.
    pub fn close(&self) {
        let _ = self.client.commands.send(Command::Close);
    }

    pub fn is_closed(&self) -> bool {
        self.client.closed.borrow().is_some() || self.client.commands.is_closed()
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(mut writer: W, mut rx: mpsc::UnboundedReceiver<Bytes>) {
    while let Some(line) = rx.recv().await {
        if let Err(e) = writer.write_all(&line).await {
            debug!(error = %e, "server stdin closed");
            return;
        }
        // Drain what is queued before flushing: one flush per burst.
        while let Ok(more) = rx.try_recv() {
            if writer.write_all(&more).await.is_err() {
                return;
            }
        }
        if writer.flush().await.is_err() {
            return;
        }
    }
    // Queue closed: closing stdin tells the server to exit.
    let _ = writer.shutdown().await;
}

struct Actor {
    pending: HashMap<u64, oneshot::Sender<Reply>>,
    /// `None` once the session is closing: stdin is then closed.
    out: Option<mpsc::UnboundedSender<Bytes>>,
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
                biased;
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

    fn send(&self, line: Bytes) {
        if let Some(out) = &self.out {
            let _ = out.send(line);
        }
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Request { id, line, reply } => {
                self.pending.insert(id, reply);
                self.send(line);
            }
            Command::Notify { line } => self.send(line),
            Command::Close => self.out = None,
            Command::Cancel { id, reason } => {
                if self.pending.remove(&id).is_some() {
                    self.send(encode(&json!({
                        "jsonrpc": "2.0",
                        "method": "notifications/cancelled",
                        "params": {"requestId": id, "reason": reason},
                    })));
                }
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
            Ok(msg.get_mut("result").map(Value::take).unwrap_or(Value::Null))
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
                let level = params.get("level").and_then(Value::as_str).unwrap_or("info");
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
