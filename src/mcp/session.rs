//! The MCP client session: JSON-RPC 2.0 over newline-delimited stdio, in
//! both protocol eras.
//!
//! Three tasks per session, each owning one thing:
//! - the **writer** owns the server's stdin. Everything meshbox sends —
//!   requests, notifications, answers to the server's requests — goes
//!   through one bounded queue with a byte budget, and a request's deadline
//!   covers its queueing and writing, so a server that stops reading makes
//!   calls time out instead of hang.
//! - the **reader** owns stdout: it matches replies to pending requests by id,
//!   routes progress and server→client requests to the call that caused them,
//!   answers what nobody else can, and never waits on anything the server
//!   controls. Non-JSON lines are logs. Buffers it fills are bounded and shrink
//!   back after a large line.
//! - the **refresher** re-reads the tool list after `list_changed`.
//!
//! Messages pass through as `serde_json` values (unknown methods and fields
//! untouched); replies are kept as raw JSON so large results are never
//! re-encoded on the way out. Dropping a request's future cancels it upstream.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{broadcast, mpsc, oneshot, watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::codec::FramedRead;
use tracing::debug;

use super::framing::{Frame, LineCodec, DEFAULT_MAX_LINE};
use super::protocol::{self, code, meta, method};
use crate::model::{wait_exit, BoxWrite, ExitReason, ExitWatch, LogStream, Protocol};

/// Receives every line that is not protocol: non-JSON stdout, server log notifications.
pub type LogSink = Arc<dyn Fn(LogStream, &str) + Send + Sync>;

/// Why the server broke the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("{method}: `{field}` is not {expected}")]
    WrongType {
        method: &'static str,
        field: &'static str,
        expected: &'static str,
    },
    #[error("{method}: the server repeated the same nextCursor")]
    RepeatedCursor { method: &'static str },
    #[error("{method}: more than {pages} pages")]
    TooManyPages { method: &'static str, pages: usize },
    #[error("the tool list is larger than meshbox accepts ({what} over {limit})")]
    ToolListTooLarge { what: &'static str, limit: usize },
    #[error("the answer is larger than meshbox accepts here ({size} bytes, over {limit})")]
    ResultTooLarge { size: usize, limit: usize },
    #[error("the server speaks protocol version {0}, which meshbox does not support")]
    UnsupportedVersion(String),
    #[error("server/discover does not list {}", protocol::STATELESS_VERSION)]
    NotStateless,
    #[error("the server's answer is not valid JSON-RPC")]
    Malformed,
}

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
    #[error("server closed its stdout")]
    StdoutClosed,
    #[error("session closed")]
    Closed,
    #[error("protocol error")]
    Protocol(#[source] ProtocolError),
}

/// A JSON-RPC error object, as a client answers a server's request with it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RpcError {
    pub code: i64,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

/// The client a call came from, for the server→client requests (sampling,
/// elicitation, roots) that belong to the call.
#[async_trait::async_trait]
pub trait ClientPeer: Send + Sync {
    /// Which client session: the same for every call of one client.
    fn client_id(&self) -> u64;
    /// Forwards one server→client request; its `result`, or a JSON-RPC error.
    async fn request(&self, method: &str, params: Option<Value>) -> Result<Value, RpcError>;
}

/// How one request is made.
#[derive(Clone)]
pub struct CallOptions {
    /// Covers queueing, writing and waiting for the answer.
    pub timeout: Duration,
    /// Receives this call's `notifications/progress` params (the caller's own
    /// progressToken restored); dropped when full.
    pub progress: Option<mpsc::Sender<Value>>,
    /// Answers the server's requests routed to this call.
    pub peer: Option<Arc<dyn ClientPeer>>,
    /// `_meta` entries to add (traceparent, a stateless client's
    /// capabilities); the caller's own `_meta` in params wins.
    pub meta: Option<Map<String, Value>>,
}

impl CallOptions {
    pub fn timeout(timeout: Duration) -> Self {
        CallOptions {
            timeout,
            progress: None,
            peer: None,
            meta: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Longest accepted stdout line; longer lines are dropped.
    pub max_line: usize,
    /// Answer to the server's `roots/list` when no client takes it.
    pub roots: Vec<Value>,
    /// How long to wait for the exit reason once stdout has closed.
    pub exit_grace: Duration,
    /// Messages queued for the server's stdin.
    pub queue_len: usize,
    /// Bytes queued for the server's stdin.
    pub queue_bytes: usize,
    /// Server→client requests forwarded to clients at once.
    pub max_peer_requests: usize,
    /// Most tools, and most bytes of tools, accepted from `tools/list`.
    pub max_tools: usize,
    pub max_tools_bytes: usize,
    /// Notifications longer than this are logged, not broadcast.
    pub max_notification: usize,
    /// Capabilities declared in `initialize` / `_meta`.
    pub client_capabilities: Value,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            max_line: DEFAULT_MAX_LINE,
            roots: Vec::new(),
            exit_grace: Duration::from_millis(1000),
            queue_len: 1024,
            queue_bytes: 16 << 20,
            max_peer_requests: 64,
            max_tools: 10_000,
            max_tools_bytes: 16 << 20,
            max_notification: 256 << 10,
            client_capabilities: json!({
                "roots": { "listChanged": true },
                "sampling": {},
                "elicitation": {},
            }),
        }
    }
}

/// What the server said about itself in `initialize` or `server/discover`.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerInfo {
    pub protocol: Protocol,
    /// The version answered (handshake) or chosen (stateless).
    pub protocol_version: String,
    pub server_info: Value,
    pub capabilities: Value,
    pub instructions: Option<String>,
    /// The whole `server/discover` result of a stateless server.
    pub discover: Option<Value>,
}

/// Why connecting (probe, handshake, first tool list) failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConnectError {
    /// An old server that exits when the first message is not `initialize`:
    /// start it again in the handshake era (this is not a crash).
    #[error("server exited when probed with server/discover ({0})")]
    ExitedDuringProbe(ExitReason),
    #[error("MCP {step} failed")]
    Step {
        step: &'static str,
        #[source]
        source: CallError,
    },
}

impl ConnectError {
    fn step(step: &'static str) -> impl FnOnce(CallError) -> ConnectError {
        move |source| ConnectError::Step { step, source }
    }
}

type Reply = Result<Box<RawValue>, CallError>;

/// The stdout read buffer's starting size.
const READ_BUFFER: usize = 8 * 1024;

struct Slot {
    reply: oneshot::Sender<Reply>,
    /// The caller's own progress token and where its progress goes.
    progress: Option<(Value, mpsc::Sender<Value>)>,
    peer: Option<Arc<dyn ClientPeer>>,
    deadline: Instant,
    /// Larger results are refused without being copied.
    max_result: usize,
}

/// A line queued for stdin, holding its share of the byte budget.
struct Outbound {
    bytes: Bytes,
    _permit: Option<OwnedSemaphorePermit>,
}

struct Shared {
    out: mpsc::Sender<Outbound>,
    /// Bytes that may be queued for stdin.
    budget: Arc<Semaphore>,
    pending: Mutex<HashMap<u64, Slot>>,
    next_id: AtomicU64,
    stateless: AtomicBool,
    closed: watch::Sender<Option<CallError>>,
    close_stdin: Notify,
    notifications: broadcast::Sender<Arc<Value>>,
    tools: watch::Sender<Option<Arc<Vec<Value>>>>,
    refresh: Notify,
    peer_slots: Arc<Semaphore>,
    /// Server→client requests forwarded to a client, by the server's id.
    forwarded: Mutex<HashMap<String, tokio::task::AbortHandle>>,
    config: SessionConfig,
    log: LogSink,
}

/// A live MCP session with one server. Share it (`Arc`): many callers at
/// once, replies in any order.
pub struct Session {
    shared: Arc<Shared>,
    info: std::sync::OnceLock<ServerInfo>,
    tasks: [JoinHandle<()>; 3],
}

impl Drop for Session {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

#[derive(Serialize)]
struct OutRequest<'a> {
    jsonrpc: &'static str,
    id: u64,
    method: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    params: Option<&'a Value>,
}

#[derive(Serialize)]
struct OutNotification<'a> {
    jsonrpc: &'static str,
    method: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    params: Option<&'a Value>,
}

fn line_of<T: Serialize>(msg: &T) -> Bytes {
    let mut v = serde_json::to_vec(msg).expect("a message always serializes");
    v.push(b'\n');
    Bytes::from(v)
}

/// An answer to a server request, echoing its id exactly.
fn answer_line(id: &RawValue, outcome: Result<Value, RpcError>) -> Bytes {
    #[derive(Serialize)]
    struct Answer<'a> {
        jsonrpc: &'static str,
        id: &'a RawValue,
        #[serde(skip_serializing_if = "Option::is_none")]
        result: Option<Value>,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<RpcError>,
    }
    let (result, error) = match outcome {
        Ok(r) => (Some(r), None),
        Err(e) => (None, Some(e)),
    };
    line_of(&Answer {
        jsonrpc: "2.0",
        id,
        result,
        error,
    })
}

impl Shared {
    fn pending(&self) -> MutexGuard<'_, HashMap<u64, Slot>> {
        self.pending.lock().expect("pending map poisoned")
    }

    fn closed_error(&self) -> Option<CallError> {
        self.closed.borrow().clone()
    }

    fn is_stateless(&self) -> bool {
        self.stateless.load(Ordering::Relaxed)
    }

    /// Queues a line without waiting; false when the queue or budget is full
    /// (the server is not reading) or stdin is gone.
    fn try_send(&self, bytes: Bytes) -> bool {
        let permit = match u32::try_from(bytes.len().min(self.config.queue_bytes)) {
            Ok(n) => self.budget.clone().try_acquire_many_owned(n).ok(),
            Err(_) => None,
        };
        if permit.is_none() {
            return false;
        }
        self.out
            .try_send(Outbound {
                bytes,
                _permit: permit,
            })
            .is_ok()
    }

    /// Queues a line, waiting for room until `deadline`.
    async fn send(&self, bytes: Bytes, deadline: Instant) -> Result<(), SendError> {
        let n = u32::try_from(bytes.len().min(self.config.queue_bytes)).unwrap_or(u32::MAX);
        // The common case: room in the budget and the queue, no timer needed.
        let bytes = match self.budget.clone().try_acquire_many_owned(n) {
            Ok(permit) => match self.out.try_send(Outbound {
                bytes,
                _permit: Some(permit),
            }) {
                Ok(()) => return Ok(()),
                Err(mpsc::error::TrySendError::Closed(_)) => return Err(SendError::Closed),
                Err(mpsc::error::TrySendError::Full(o)) => o.bytes,
            },
            Err(tokio::sync::TryAcquireError::Closed) => return Err(SendError::Closed),
            Err(tokio::sync::TryAcquireError::NoPermits) => bytes,
        };
        let permit = match tokio::time::timeout_at(
            deadline,
            self.budget.clone().acquire_many_owned(n),
        )
        .await
        {
            Ok(Ok(p)) => p,
            Ok(Err(_)) => return Err(SendError::Closed),
            Err(_) => return Err(SendError::Timeout),
        };
        match tokio::time::timeout_at(
            deadline,
            self.out.send(Outbound {
                bytes,
                _permit: Some(permit),
            }),
        )
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(SendError::Closed),
            Err(_) => Err(SendError::Timeout),
        }
    }

    /// Fills in what a request needs upstream: the stateless `_meta` keys,
    /// a session-unique progress token, the caller's extra `_meta`.
    fn shape_params(
        &self,
        id: u64,
        params: Option<Value>,
        opts: &CallOptions,
    ) -> (Option<Value>, Option<Value>) {
        let stateless = self.is_stateless();
        let mut params = params;
        let has_token = params
            .as_ref()
            .and_then(|p| p.get("_meta"))
            .and_then(|m| m.get(meta::PROGRESS_TOKEN))
            .is_some();
        if !stateless && !has_token && opts.meta.is_none() {
            return (params, None);
        }
        let p = params.get_or_insert_with(|| Value::Object(Map::new()));
        let Value::Object(obj) = p else {
            // Not an object: nothing can be added; the server will say so.
            return (params, None);
        };
        let meta_v = obj
            .entry("_meta")
            .or_insert_with(|| Value::Object(Map::new()));
        if !meta_v.is_object() {
            *meta_v = Value::Object(Map::new());
        }
        let m = meta_v.as_object_mut().expect("made an object");
        let mut client_token = None;
        if let Some(tok) = m.get_mut(meta::PROGRESS_TOKEN) {
            client_token = Some(std::mem::replace(tok, json!(id)));
        }
        if let Some(extra) = &opts.meta {
            for (k, v) in extra {
                m.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
        if stateless {
            m.entry(meta::PROTOCOL_VERSION)
                .or_insert_with(|| json!(protocol::STATELESS_VERSION));
            m.entry(meta::CLIENT_CAPABILITIES)
                .or_insert_with(|| self.config.client_capabilities.clone());
            m.entry(meta::CLIENT_INFO).or_insert_with(client_info);
        }
        (params, client_token)
    }

    async fn request(
        self: &Arc<Self>,
        method: &str,
        params: Option<Value>,
        opts: CallOptions,
    ) -> Reply {
        self.request_limited(method, params, opts, usize::MAX).await
    }

    async fn request_limited(
        self: &Arc<Self>,
        method: &str,
        params: Option<Value>,
        opts: CallOptions,
        max_result: usize,
    ) -> Reply {
        let deadline = Instant::now() + opts.timeout;
        if let Some(e) = self.closed_error() {
            return Err(e);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (params, client_token) = self.shape_params(id, params, &opts);
        let line = line_of(&OutRequest {
            jsonrpc: "2.0",
            id,
            method,
            params: params.as_ref(),
        });
        drop(params);
        let (tx, rx) = oneshot::channel();
        let progress = match (client_token, opts.progress) {
            (Some(t), Some(sink)) => Some((t, sink)),
            _ => None,
        };
        self.pending().insert(
            id,
            Slot {
                reply: tx,
                progress,
                peer: opts.peer,
                deadline,
                max_result,
            },
        );
        let mut guard = PendingGuard {
            shared: self,
            id,
            cancel_on_drop: false,
            done: false,
        };
        match self.send(line, deadline).await {
            // `initialize` must never be cancelled (MCP spec); a discover
            // probe has nothing to stop and must not reach an old server
            // before its `initialize`.
            Ok(()) => {
                guard.cancel_on_drop = method != method::INITIALIZE && method != method::DISCOVER
            }
            Err(SendError::Timeout) => return Err(CallError::Timeout(opts.timeout)),
            Err(SendError::Closed) => {
                return Err(self.closed_error().unwrap_or(CallError::Closed));
            }
        }
        let reply = match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => Err(self.closed_error().unwrap_or(CallError::Closed)),
            Err(_) => return Err(CallError::Timeout(opts.timeout)),
        };
        guard.done = true;
        reply
    }

    fn notify(&self, method: &str, params: Option<Value>) -> Result<(), CallError> {
        if let Some(e) = self.closed_error() {
            return Err(e);
        }
        let line = line_of(&OutNotification {
            jsonrpc: "2.0",
            method,
            params: params.as_ref(),
        });
        if self.try_send(line) {
            Ok(())
        } else {
            Err(CallError::Timeout(Duration::ZERO))
        }
    }

    /// Every page of `tools/list`, bounded in count and bytes.
    async fn list_tools(self: &Arc<Self>, timeout: Duration) -> Result<Vec<Value>, CallError> {
        const MAX_PAGES: usize = 1000;
        const M: &str = "tools/list";
        let deadline = Instant::now() + timeout;
        let mut tools = Vec::new();
        let mut bytes = 0usize;
        let mut cursor: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let params = match &cursor {
                Some(c) => json!({ "cursor": c }),
                None => json!({}),
            };
            let left = deadline.saturating_duration_since(Instant::now());
            let raw = self
                .request_limited(
                    method::TOOLS_LIST,
                    Some(params),
                    CallOptions::timeout(left),
                    self.config.max_tools_bytes - bytes,
                )
                .await
                .map_err(|e| match e {
                    CallError::Timeout(_) => CallError::Timeout(timeout),
                    CallError::Protocol(ProtocolError::ResultTooLarge { .. }) => {
                        CallError::Protocol(ProtocolError::ToolListTooLarge {
                            what: "bytes",
                            limit: self.config.max_tools_bytes,
                        })
                    }
                    other => other,
                })?;
            bytes += raw.get().len();
            if bytes > self.config.max_tools_bytes {
                return Err(CallError::Protocol(ProtocolError::ToolListTooLarge {
                    what: "bytes",
                    limit: self.config.max_tools_bytes,
                }));
            }
            #[derive(Deserialize)]
            struct Page {
                #[serde(default)]
                tools: Option<Value>,
                #[serde(default, rename = "nextCursor")]
                next_cursor: Option<Value>,
            }
            let page: Page = serde_json::from_str(raw.get())
                .map_err(|_| CallError::Protocol(ProtocolError::Malformed))?;
            match page.tools {
                Some(Value::Array(items)) => {
                    if tools.len() + items.len() > self.config.max_tools {
                        return Err(CallError::Protocol(ProtocolError::ToolListTooLarge {
                            what: "tools",
                            limit: self.config.max_tools,
                        }));
                    }
                    tools.extend(items);
                }
                Some(Value::Null) | None => {}
                Some(_) => {
                    return Err(CallError::Protocol(ProtocolError::WrongType {
                        method: M,
                        field: "tools",
                        expected: "an array",
                    }))
                }
            }
            match page.next_cursor {
                Some(Value::String(next)) if !next.is_empty() => {
                    if cursor.as_deref() == Some(next.as_str()) {
                        return Err(CallError::Protocol(ProtocolError::RepeatedCursor {
                            method: M,
                        }));
                    }
                    cursor = Some(next);
                }
                _ => return Ok(tools),
            }
        }
        Err(CallError::Protocol(ProtocolError::TooManyPages {
            method: M,
            pages: MAX_PAGES,
        }))
    }
}

enum SendError {
    Timeout,
    Closed,
}

/// Forgets a request that did not complete, and tells the server to stop
/// working on it when it was already sent.
struct PendingGuard<'a> {
    shared: &'a Shared,
    id: u64,
    cancel_on_drop: bool,
    done: bool,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let was_pending = self.shared.pending().remove(&self.id).is_some();
        if was_pending && self.cancel_on_drop && self.shared.closed_error().is_none() {
            let params = json!({"requestId": self.id, "reason": "cancelled by meshbox"});
            let line = line_of(&OutNotification {
                jsonrpc: "2.0",
                method: method::CANCELLED,
                params: Some(&params),
            });
            // Best effort: a full queue means the server is not reading anyway.
            let _ = self.shared.try_send(line);
        }
    }
}

fn client_info() -> Value {
    json!({ "name": "meshbox", "version": env!("CARGO_PKG_VERSION") })
}

impl Session {
    /// Starts the session's tasks over a server's stdout (`reader`) and stdin
    /// (`writer`). `exit` resolves to the server's exit reason when it dies.
    pub fn start<R, W>(
        reader: R,
        writer: W,
        exit: ExitWatch,
        log: LogSink,
        config: SessionConfig,
    ) -> Session
    where
        R: AsyncRead + Send + Unpin + 'static,
        W: AsyncWrite + Send + Unpin + 'static,
    {
        let (out_tx, out_rx) = mpsc::channel(config.queue_len.max(1));
        let budget = Arc::new(Semaphore::new(config.queue_bytes.max(1)));
        let shared = Arc::new(Shared {
            out: out_tx,
            budget,
            pending: Mutex::new(HashMap::new()),
            // A random base: replies still in flight to a previous session
            // (a re-adopted server) can never match this session's ids.
            next_id: AtomicU64::new(1 + (u64::from(fastrand::u32(..)) << 20)),
            stateless: AtomicBool::new(false),
            closed: watch::channel(None).0,
            close_stdin: Notify::new(),
            notifications: broadcast::channel(64).0,
            tools: watch::channel(None).0,
            refresh: Notify::new(),
            peer_slots: Arc::new(Semaphore::new(config.max_peer_requests.max(1))),
            forwarded: Mutex::new(HashMap::new()),
            config,
            log,
        });
        let writer = tokio::spawn(write_loop(
            out_rx,
            Box::pin(writer) as BoxWrite,
            shared.clone(),
        ));
        let frames =
            FramedRead::with_capacity(reader, LineCodec::new(shared.config.max_line), READ_BUFFER);
        let reader = tokio::spawn(read_loop(shared.clone(), frames, exit));
        let refresher = tokio::spawn(refresh_loop(shared.clone()));
        Session {
            shared,
            info: std::sync::OnceLock::new(),
            tasks: [writer, reader, refresher],
        }
    }

    /// Connects in the era `pin` names, or detects it: a `server/discover`
    /// probe whose result lists 2026-07-28 means stateless; an error or
    /// silence means the handshake era; an exit is
    /// [`ConnectError::ExitedDuringProbe`]. Then the first tool list.
    pub async fn connect(
        &self,
        pin: Option<Protocol>,
        timeout: Duration,
    ) -> Result<ServerInfo, ConnectError> {
        /// How long a silent server gets before it counts as handshake-era.
        const PROBE: Duration = Duration::from_secs(5);
        let deadline = Instant::now() + timeout;
        let left = || deadline.saturating_duration_since(Instant::now());
        let info = match pin {
            Some(Protocol::Handshake) => self.initialize(left()).await?,
            Some(Protocol::Stateless) => self.discover_stateless(left()).await?,
            None => match self.discover(left().min(PROBE)).await {
                Ok(r) if protocol::discover_is_stateless(&r) => stateless_info(r),
                Err(CallError::Exited(reason)) => {
                    return Err(ConnectError::ExitedDuringProbe(reason))
                }
                Err(CallError::StdoutClosed | CallError::Closed) => {
                    return Err(ConnectError::ExitedDuringProbe(ExitReason::default()))
                }
                Err(CallError::Timeout(_)) => match self.initialize(left()).await {
                    // Slow to start, not silent: it answered the probe after
                    // its few seconds and now serves the stateless era.
                    Err(ConnectError::Step {
                        source: CallError::Rpc { code, .. },
                        ..
                    }) if code == protocol::code::UNSUPPORTED_VERSION => {
                        self.discover_stateless(left()).await?
                    }
                    other => other?,
                },
                _ => self.initialize(left()).await?,
            },
        };
        self.shared
            .stateless
            .store(info.protocol == Protocol::Stateless, Ordering::Relaxed);
        let tools = Arc::new(
            self.shared
                .list_tools(left().max(Duration::from_millis(1)))
                .await
                .map_err(ConnectError::step("tools/list"))?,
        );
        // A refresh after `list_changed` may have finished first; its list is newer.
        self.shared.tools.send_if_modified(|cur| {
            let first = cur.is_none();
            if first {
                *cur = Some(tools);
            }
            first
        });
        let _ = self.info.set(info.clone());
        Ok(info)
    }

    /// Takes over a server connected by an earlier session (a re-adopted
    /// container): no new handshake, just its era and current tool list.
    pub async fn adopt(&self, info: ServerInfo, timeout: Duration) -> Result<(), CallError> {
        self.shared
            .stateless
            .store(info.protocol == Protocol::Stateless, Ordering::Relaxed);
        let _ = self.info.set(info);
        self.refresh_tools(timeout).await.map(|_| ())
    }

    /// A `server/discover` that must show a stateless server.
    async fn discover_stateless(&self, timeout: Duration) -> Result<ServerInfo, ConnectError> {
        let r = self
            .discover(timeout)
            .await
            .map_err(ConnectError::step("server/discover"))?;
        if !protocol::discover_is_stateless(&r) {
            return Err(ConnectError::Step {
                step: "server/discover",
                source: CallError::Protocol(ProtocolError::NotStateless),
            });
        }
        Ok(stateless_info(r))
    }

    async fn discover(&self, timeout: Duration) -> Result<Value, CallError> {
        // The probe carries the stateless `_meta` whatever era is assumed.
        let params = json!({"_meta": {
            meta::PROTOCOL_VERSION: protocol::STATELESS_VERSION,
            meta::CLIENT_CAPABILITIES: self.shared.config.client_capabilities,
            meta::CLIENT_INFO: client_info(),
        }});
        let raw = self
            .shared
            .request(
                method::DISCOVER,
                Some(params),
                CallOptions::timeout(timeout),
            )
            .await?;
        serde_json::from_str(raw.get()).map_err(|_| CallError::Protocol(ProtocolError::Malformed))
    }

    /// `initialize` → `notifications/initialized`.
    async fn initialize(&self, timeout: Duration) -> Result<ServerInfo, ConnectError> {
        let params = json!({
            "protocolVersion": protocol::LATEST_HANDSHAKE_VERSION,
            "capabilities": self.shared.config.client_capabilities,
            "clientInfo": client_info(),
        });
        let step = ConnectError::step;
        let raw = self
            .shared
            .request(
                method::INITIALIZE,
                Some(params),
                CallOptions::timeout(timeout),
            )
            .await
            .map_err(step("initialize"))?;
        let result: Value = serde_json::from_str(raw.get())
            .map_err(|_| CallError::Protocol(ProtocolError::Malformed))
            .map_err(step("initialize"))?;
        let answered = result
            .get("protocolVersion")
            .and_then(Value::as_str)
            .ok_or(CallError::Protocol(ProtocolError::WrongType {
                method: "initialize",
                field: "protocolVersion",
                expected: "a string",
            }))
            .map_err(step("initialize"))?;
        let version = protocol::negotiate_handshake(answered)
            .ok_or_else(|| {
                CallError::Protocol(ProtocolError::UnsupportedVersion(
                    answered.chars().take(40).collect(),
                ))
            })
            .map_err(step("initialize"))?;
        self.shared
            .notify(method::INITIALIZED, None)
            .map_err(step("notifications/initialized"))?;
        Ok(ServerInfo {
            protocol: Protocol::Handshake,
            protocol_version: version.to_owned(),
            server_info: result.get("serverInfo").cloned().unwrap_or(Value::Null),
            capabilities: result.get("capabilities").cloned().unwrap_or(Value::Null),
            instructions: result
                .get("instructions")
                .and_then(Value::as_str)
                .map(str::to_owned),
            discover: None,
        })
    }

    /// What the server said about itself; `None` before `connect`/`adopt`.
    pub fn info(&self) -> Option<&ServerInfo> {
        self.info.get()
    }

    /// Any request; the answer's `result` (see the module docs for what is
    /// added to `params`). Dropping the future cancels the request upstream.
    pub async fn request(
        &self,
        method: &str,
        params: Option<Value>,
        opts: CallOptions,
    ) -> Result<Value, CallError> {
        let raw = self.shared.request(method, params, opts).await?;
        serde_json::from_str(raw.get()).map_err(|_| CallError::Protocol(ProtocolError::Malformed))
    }

    /// As [`request`](Self::request), with the result as raw JSON (never
    /// re-encoded: large results pass through as they came).
    pub async fn request_raw(
        &self,
        method: &str,
        params: Option<Value>,
        opts: CallOptions,
    ) -> Result<Box<RawValue>, CallError> {
        self.shared.request(method, params, opts).await
    }

    pub async fn call_tool(
        &self,
        tool: &str,
        arguments: Value,
        timeout: Duration,
    ) -> Result<Value, CallError> {
        self.request(
            method::TOOLS_CALL,
            Some(json!({"name": tool, "arguments": arguments})),
            CallOptions::timeout(timeout),
        )
        .await
    }

    /// A notification to the server; never waits (bounded queue).
    pub fn notify(&self, method: &str, params: Option<Value>) -> Result<(), CallError> {
        self.shared.notify(method, params)
    }

    /// Liveness: `ping` (handshake era) or a `server/discover` (stateless).
    pub async fn probe(&self, timeout: Duration) -> Result<(), CallError> {
        if self.shared.is_stateless() {
            self.discover(timeout).await.map(|_| ())
        } else {
            self.shared
                .request(method::PING, Some(json!({})), CallOptions::timeout(timeout))
                .await
                .map(|_| ())
        }
    }

    /// Server notifications not tied to one call (list_changed,
    /// resources/updated, message). A slow receiver lags and should resync.
    pub fn notifications(&self) -> broadcast::Receiver<Arc<Value>> {
        self.shared.notifications.subscribe()
    }

    /// Re-reads the tool list (all pages) and publishes it.
    pub async fn refresh_tools(&self, timeout: Duration) -> Result<Arc<Vec<Value>>, CallError> {
        let tools = Arc::new(self.shared.list_tools(timeout).await?);
        self.shared.tools.send_replace(Some(tools.clone()));
        Ok(tools)
    }

    /// The last tool list the server gave.
    pub fn tools(&self) -> Arc<Vec<Value>> {
        self.shared.tools.borrow().clone().unwrap_or_default()
    }

    /// Resolves when the session has ended, with the reason.
    pub async fn closed(&self) -> CallError {
        let mut rx = self.shared.closed.subscribe();
        let reason = rx
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|v| v.clone());
        reason.unwrap_or(CallError::Closed)
    }

    /// Closes the server's stdin; replies already on their way are still read.
    pub fn close(&self) {
        self.shared.close_stdin.notify_one();
    }

    pub fn is_closed(&self) -> bool {
        self.shared.closed.borrow().is_some()
    }

    /// Requests waiting for an answer (for tests and metrics).
    pub fn in_flight(&self) -> usize {
        self.shared.pending().len()
    }
}

fn stateless_info(r: Value) -> ServerInfo {
    let server_info = r
        .get("serverInfo")
        .or_else(|| r.pointer(&format!("/_meta/{}", meta::SERVER_INFO.replace('/', "~1"))))
        .cloned()
        .unwrap_or(Value::Null);
    ServerInfo {
        protocol: Protocol::Stateless,
        protocol_version: protocol::STATELESS_VERSION.to_owned(),
        server_info,
        capabilities: r.get("capabilities").cloned().unwrap_or(Value::Null),
        instructions: r
            .get("instructions")
            .and_then(Value::as_str)
            .map(str::to_owned),
        discover: Some(r),
    }
}

/// Owns stdin: writes queued lines in batches until the queue closes, stdin
/// breaks, or the session asks to close it.
async fn write_loop(mut rx: mpsc::Receiver<Outbound>, mut w: BoxWrite, shared: Arc<Shared>) {
    const BATCH: usize = 256 * 1024;
    // Grows to what is written at once; shrunk back after a large batch.
    let mut buf: Vec<u8> = Vec::new();
    let mut held: Vec<Outbound> = Vec::new();
    loop {
        let first = tokio::select! {
            biased;
            _ = shared.close_stdin.notified() => break,
            m = rx.recv() => m,
        };
        let Some(first) = first else { break };
        if first.bytes.len() >= BATCH {
            // One large line: written straight from its buffer.
            if w.write_all(&first.bytes).await.is_err() || w.flush().await.is_err() {
                break;
            }
            continue;
        }
        buf.extend_from_slice(&first.bytes);
        held.push(first);
        while buf.len() < BATCH {
            match rx.try_recv() {
                Ok(m) => {
                    buf.extend_from_slice(&m.bytes);
                    held.push(m);
                }
                Err(_) => break,
            }
        }
        let ok = w.write_all(&buf).await.is_ok() && w.flush().await.is_ok();
        buf.clear();
        // Releases the byte budget of what was written.
        held.clear();
        if buf.capacity() > 4 * BATCH {
            buf = Vec::new();
        }
        if !ok {
            debug!("server stdin closed");
            break;
        }
    }
    let _ = w.shutdown().await;
    // Dropping `rx` fails later sends at once.
}

/// Owns stdout until the server goes; then fails everything still pending
/// with the reason.
async fn read_loop<R: AsyncRead + Unpin>(
    shared: Arc<Shared>,
    mut frames: FramedRead<R, LineCodec>,
    mut exit: ExitWatch,
) {
    /// After a line this long the read buffer is replaced, releasing it.
    const SHRINK_AFTER: usize = 1 << 20;
    let reason = loop {
        let frame = tokio::select! {
            frame = frames.next() => frame,
            reason = wait_exit(&mut exit) => {
                // Read what the server wrote before it died, briefly.
                let drain = async {
                    while let Some(Ok(frame)) = frames.next().await {
                        on_frame(&shared, frame);
                    }
                };
                let _ = tokio::time::timeout(Duration::from_millis(200), drain).await;
                break CallError::Exited(reason);
            }
        };
        match frame {
            Some(Ok(frame)) => {
                let large = match &frame {
                    Frame::Line(l) => l.len() >= SHRINK_AFTER,
                    Frame::Oversized(_) => true,
                };
                on_frame(&shared, frame);
                if large {
                    let buf = frames.read_buffer_mut();
                    let mut fresh = BytesMut::with_capacity(READ_BUFFER);
                    fresh.extend_from_slice(buf);
                    *buf = fresh;
                }
            }
            Some(Err(e)) => {
                debug!(error = %e, "reading server stdout failed");
                break end_reason(&shared, &mut exit).await;
            }
            None => break end_reason(&shared, &mut exit).await,
        }
    };
    shared.closed.send_replace(Some(reason.clone()));
    let slots: Vec<Slot> = shared.pending().drain().map(|(_, s)| s).collect();
    for slot in slots {
        let _ = slot.reply.send(Err(reason.clone()));
    }
    let forwarded: Vec<_> = shared
        .forwarded
        .lock()
        .expect("forwarded poisoned")
        .drain()
        .collect();
    for (_, task) in forwarded {
        task.abort();
    }
}

/// Stdout ended: the exit reason if it comes within the grace, else "closed".
async fn end_reason(shared: &Shared, exit: &mut ExitWatch) -> CallError {
    match tokio::time::timeout(shared.config.exit_grace, wait_exit(exit)).await {
        Ok(r) => CallError::Exited(r),
        Err(_) => CallError::StdoutClosed,
    }
}

/// Re-reads the tool list after each (coalesced) `list_changed`. Holds the
/// session's state; aborted when the session is dropped.
async fn refresh_loop(s: Arc<Shared>) {
    loop {
        s.refresh.notified().await;
        match s.list_tools(Duration::from_secs(30)).await {
            Ok(tools) => {
                s.tools.send_replace(Some(Arc::new(tools)));
            }
            Err(e) => (s.log)(
                LogStream::Meshbox,
                &format!(
                    "tools/list refresh after list_changed failed: {}",
                    crate::error_chain(&e)
                ),
            ),
        }
    }
}

#[derive(Deserialize)]
struct Incoming<'a> {
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(default)]
    method: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    params: Option<&'a RawValue>,
    #[serde(borrow, default)]
    result: Option<&'a RawValue>,
    #[serde(default)]
    error: Option<RpcErrorWire>,
}

#[derive(Deserialize)]
struct RpcErrorWire {
    #[serde(default)]
    code: Option<i64>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    data: Option<Value>,
}

fn on_frame(shared: &Arc<Shared>, frame: Frame) {
    let line = match frame {
        Frame::Line(line) => line,
        Frame::Oversized(n) => {
            (shared.log)(
                LogStream::Meshbox,
                &format!("dropped a stdout line of {n} bytes (longer than the line cap)"),
            );
            return;
        }
    };
    if line.iter().all(u8::is_ascii_whitespace) {
        return;
    }
    let msg: Incoming<'_> = match serde_json::from_slice(&line) {
        Ok(m) => m,
        Err(_) => {
            (shared.log)(LogStream::Stdout, &String::from_utf8_lossy(&line));
            return;
        }
    };
    let id = msg.id.filter(|i| i.get() != "null");
    match (msg.method.as_deref(), id) {
        (None, Some(id)) => on_response(shared, id, msg.result, msg.error),
        (Some(m), Some(id)) => on_server_request(shared, id, m, msg.params),
        (Some(m), None) => on_notification(shared, m, msg.params, &line),
        (None, None) => (shared.log)(LogStream::Stdout, &String::from_utf8_lossy(&line)),
    }
}

fn on_response(
    shared: &Shared,
    id: &RawValue,
    result: Option<&RawValue>,
    error: Option<RpcErrorWire>,
) {
    let Ok(id) = id.get().parse::<u64>() else {
        debug!(id = id.get(), "reply to an id meshbox never sent");
        return;
    };
    let Some(slot) = shared.pending().remove(&id) else {
        debug!(id, "reply to a request no longer pending");
        return;
    };
    let reply = match error {
        Some(e) => Err(CallError::Rpc {
            code: e.code.unwrap_or(code::INTERNAL_ERROR),
            message: e.message.unwrap_or_default(),
            data: e.data,
        }),
        None => match result {
            Some(r) if r.get().len() > slot.max_result => {
                Err(CallError::Protocol(ProtocolError::ResultTooLarge {
                    size: r.get().len(),
                    limit: slot.max_result,
                }))
            }
            Some(r) => Ok(r.to_owned()),
            None => Ok(RawValue::from_string("null".into()).expect("null is JSON")),
        },
    };
    let _ = slot.reply.send(reply);
}

/// The call a server→client request belongs to: named by a related-request
/// id or progress token, else the only client with calls in flight.
fn route(shared: &Shared, params: Option<&Value>) -> Option<(Arc<dyn ClientPeer>, Instant)> {
    let pending = shared.pending();
    let m = params.and_then(|p| p.get("_meta"));
    for key in [meta::RELATED_REQUEST_ID, meta::PROGRESS_TOKEN] {
        if let Some(id) = m.and_then(|m| m.get(key)).and_then(Value::as_u64) {
            if let Some(slot) = pending.get(&id) {
                return slot.peer.clone().map(|p| (p, slot.deadline));
            }
        }
    }
    let mut found: Option<(Arc<dyn ClientPeer>, Instant)> = None;
    for slot in pending.values() {
        if let Some(p) = &slot.peer {
            match &found {
                None => found = Some((p.clone(), slot.deadline)),
                Some((f, d)) if f.client_id() == p.client_id() => {
                    let later = (*d).max(slot.deadline);
                    found = Some((f.clone(), later));
                }
                Some(_) => return None,
            }
        }
    }
    found
}

fn on_server_request(shared: &Arc<Shared>, id: &RawValue, method: &str, params: Option<&RawValue>) {
    let params: Option<Value> = params.and_then(|p| serde_json::from_str(p.get()).ok());
    let target = if method == method::PING {
        None
    } else {
        route(shared, params.as_ref())
    };
    let Some((peer, deadline)) = target else {
        let outcome = match method {
            method::PING => Ok(json!({})),
            method::ROOTS_LIST => Ok(json!({ "roots": shared.config.roots })),
            other => Err(RpcError {
                code: code::METHOD_NOT_FOUND,
                message: format!(
                    "{}: no MCP client of meshbox can answer this request here",
                    crate::model::shown(other, 64)
                ),
                data: None,
            }),
        };
        if !shared.try_send(answer_line(id, outcome)) {
            debug!("server is not reading; an answer to its request was dropped");
        }
        return;
    };
    let Ok(permit) = shared.peer_slots.clone().try_acquire_owned() else {
        let _ = shared.try_send(answer_line(
            id,
            Err(RpcError {
                code: code::INTERNAL_ERROR,
                message: "too many server requests in flight".into(),
                data: None,
            }),
        ));
        return;
    };
    let id: Box<RawValue> = id.to_owned();
    let key = id.get().to_owned();
    let method = method.to_owned();
    let weak = Arc::downgrade(shared);
    let task = tokio::spawn({
        let key = key.clone();
        async move {
            let _permit = permit;
            let outcome =
                match tokio::time::timeout_at(deadline, peer.request(&method, params)).await {
                    Ok(r) => r,
                    Err(_) => Err(RpcError {
                        code: code::INTERNAL_ERROR,
                        message: "the client did not answer in time".into(),
                        data: None,
                    }),
                };
            let Some(shared) = weak.upgrade() else { return };
            shared
                .forwarded
                .lock()
                .expect("forwarded poisoned")
                .remove(&key);
            let _ = shared
                .send(
                    answer_line(&id, outcome),
                    Instant::now() + Duration::from_secs(5),
                )
                .await;
        }
    });
    shared
        .forwarded
        .lock()
        .expect("forwarded poisoned")
        .insert(key, task.abort_handle());
}

fn on_notification(shared: &Shared, method: &str, params: Option<&RawValue>, line: &[u8]) {
    match method {
        method::PROGRESS => {
            let Some(mut p) = params.and_then(|p| serde_json::from_str::<Value>(p.get()).ok())
            else {
                return;
            };
            let Some(token) = p.get(meta::PROGRESS_TOKEN).and_then(Value::as_u64) else {
                return;
            };
            let pending = shared.pending();
            if let Some((client_token, sink)) =
                pending.get(&token).and_then(|s| s.progress.as_ref())
            {
                p[meta::PROGRESS_TOKEN] = client_token.clone();
                // A slow consumer loses progress, never blocks the reader.
                let _ = sink.try_send(p);
            }
            return;
        }
        method::CANCELLED => {
            let id = params
                .and_then(|p| serde_json::from_str::<Value>(p.get()).ok())
                .and_then(|p| p.get("requestId").map(Value::to_string));
            if let Some(id) = id {
                if let Some(task) = shared
                    .forwarded
                    .lock()
                    .expect("forwarded poisoned")
                    .remove(&id)
                {
                    task.abort();
                }
            }
            return;
        }
        method::TOOLS_LIST_CHANGED => shared.refresh.notify_one(),
        method::MESSAGE => {
            let p = params.and_then(|p| serde_json::from_str::<Value>(p.get()).ok());
            let p = p.unwrap_or(Value::Null);
            let level = p.get("level").and_then(Value::as_str).unwrap_or("info");
            let text = match p.get("data") {
                Some(Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
                None => String::new(),
            };
            (shared.log)(LogStream::Stdout, &format!("[{level}] {text}"));
        }
        _ => {}
    }
    if line.len() > shared.config.max_notification {
        (shared.log)(
            LogStream::Meshbox,
            &format!(
                "{}: a notification of {} bytes was not forwarded (over {} bytes)",
                crate::model::shown(method, 64),
                line.len(),
                shared.config.max_notification
            ),
        );
        return;
    }
    if shared.notifications.receiver_count() > 0 {
        if let Ok(v) = serde_json::from_slice::<Value>(line) {
            let _ = shared.notifications.send(Arc::new(v));
        }
    }
}

#[cfg(test)]
mod tests;
