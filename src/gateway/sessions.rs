//! Handshake-era client sessions (`initialize` → `Mcp-Session-Id`): their
//! table, bounded in count and expired when idle; each session's GET stream,
//! its calls in flight (for `notifications/cancelled`), its resource
//! subscriptions, and the server→client requests waiting for its answer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::future::AbortHandle;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::bridge::HumanWaits;
use super::follow::SubGuard;
use super::protocol::{rpc_error, INTERNAL_ERROR, INVALID_PARAMS};
use super::route::Endpoint;
use super::upstream::{ClientPeer, RpcError};
use crate::model::Principal;

/// One handshake-era client.
pub struct ClientSession {
    pub id: String,
    /// Numeric identity for upstream routing (`ClientPeer::client_id`).
    pub num: u64,
    pub principal: Principal,
    pub endpoint: Endpoint,
    /// What the client declared in `initialize`.
    pub capabilities: Value,
    last_active: Mutex<Instant>,
    /// Open streams and requests in flight: a busy session never expires.
    busy: AtomicUsize,
    get_stream: Mutex<Option<mpsc::Sender<Value>>>,
    pending: Mutex<HashMap<String, oneshot::Sender<Result<Value, RpcError>>>>,
    next_out: AtomicU64,
    inflight: Mutex<HashMap<String, AbortHandle>>,
    /// Resource subscriptions by the URI the client named (prefixed on a
    /// mesh endpoint); dropping a guard lets the server's subscription go.
    pub subscriptions: Mutex<HashMap<String, SubGuard>>,
    max_pending: usize,
}

/// Keeps a session from expiring while it lives.
pub struct BusyGuard(Arc<ClientSession>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
        self.0.touch();
    }
}

/// Unregisters an in-flight call when it ends.
pub struct InflightGuard {
    session: Arc<ClientSession>,
    key: String,
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.session
            .inflight
            .lock()
            .expect("poisoned")
            .remove(&self.key);
    }
}

impl ClientSession {
    pub fn touch(&self) {
        *self.last_active.lock().expect("poisoned") = Instant::now();
    }

    pub fn busy(self: &Arc<Self>) -> BusyGuard {
        self.busy.fetch_add(1, Ordering::AcqRel);
        self.touch();
        BusyGuard(self.clone())
    }

    fn idle_since(&self) -> Option<Instant> {
        (self.busy.load(Ordering::Acquire) == 0)
            .then(|| *self.last_active.lock().expect("poisoned"))
    }

    /// Whether the client declared `capability` (`elicitation`, `sampling`, `roots`).
    pub fn declares(&self, capability: &str) -> bool {
        self.capabilities.get(capability).is_some()
    }

    /// Opens the GET stream; `None` if one is open already.
    pub fn open_stream(&self, tx: mpsc::Sender<Value>) -> bool {
        let mut s = self.get_stream.lock().expect("poisoned");
        if s.as_ref().is_some_and(|t| !t.is_closed()) {
            return false;
        }
        *s = Some(tx);
        true
    }

    /// Queues a message on the GET stream; false when none is open or it is full.
    pub fn push(&self, msg: Value) -> bool {
        let s = self.get_stream.lock().expect("poisoned");
        s.as_ref().is_some_and(|t| t.try_send(msg).is_ok())
    }

    pub fn has_stream(&self) -> bool {
        self.get_stream
            .lock()
            .expect("poisoned")
            .as_ref()
            .is_some_and(|t| !t.is_closed())
    }

    /// Registers a client request in flight under its id.
    pub fn start_call(self: &Arc<Self>, id: &Value, abort: AbortHandle) -> InflightGuard {
        let key = id.to_string();
        self.inflight
            .lock()
            .expect("poisoned")
            .insert(key.clone(), abort);
        InflightGuard {
            session: self.clone(),
            key,
        }
    }

    /// `notifications/cancelled`: aborts the call, which cancels it upstream.
    pub fn cancel(&self, request_id: &Value) -> bool {
        let h = self
            .inflight
            .lock()
            .expect("poisoned")
            .remove(&request_id.to_string());
        h.map(|h| h.abort()).is_some()
    }

    /// A client's answer to a server→client request; false when no such
    /// request is waiting (a forged or repeated id).
    pub fn answer(&self, id: &Value, outcome: Result<Value, RpcError>) -> bool {
        let Some(id) = id.as_str() else { return false };
        match self.pending.lock().expect("poisoned").remove(id) {
            Some(tx) => {
                let _ = tx.send(outcome);
                true
            }
            None => false,
        }
    }

    /// Ends the session: streams close, calls are aborted (cancelled upstream).
    fn close(&self) {
        self.get_stream.lock().expect("poisoned").take();
        for (_, h) in self.inflight.lock().expect("poisoned").drain() {
            h.abort();
        }
        self.pending.lock().expect("poisoned").clear();
        self.subscriptions.lock().expect("poisoned").clear();
    }
}

/// Why a session could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum SessionsFull {
    #[error("too many MCP sessions are open ({max}); close one or retry later")]
    All { max: usize },
    #[error("too many MCP sessions are open on mesh {mesh} ({max}); close one or retry later")]
    Mesh { mesh: String, max: usize },
}

/// The session table.
pub struct Sessions {
    map: Mutex<HashMap<String, Arc<ClientSession>>>,
    next: AtomicU64,
    max: usize,
    max_per_mesh: usize,
    idle: Duration,
    max_pending: usize,
}

impl Sessions {
    pub fn new(max: usize, max_per_mesh: usize, idle: Duration, max_pending: usize) -> Self {
        Sessions {
            map: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            max,
            max_per_mesh,
            idle,
            max_pending,
        }
    }

    pub fn open(
        &self,
        principal: Principal,
        endpoint: Endpoint,
        capabilities: Value,
    ) -> Result<Arc<ClientSession>, SessionsFull> {
        let mut map = self.map.lock().expect("poisoned");
        let mesh = endpoint.mesh().to_owned();
        let of_mesh = |map: &HashMap<String, Arc<ClientSession>>| {
            map.values().filter(|s| s.endpoint.mesh() == mesh).count()
        };
        if map.len() >= self.max || of_mesh(&map) >= self.max_per_mesh {
            Self::expire_locked(&mut map, self.idle);
            if map.len() >= self.max {
                return Err(SessionsFull::All { max: self.max });
            }
            if of_mesh(&map) >= self.max_per_mesh {
                return Err(SessionsFull::Mesh {
                    mesh,
                    max: self.max_per_mesh,
                });
            }
        }
        let s = Arc::new(ClientSession {
            id: random_id(),
            num: self.next.fetch_add(1, Ordering::Relaxed),
            principal,
            endpoint,
            capabilities,
            last_active: Mutex::new(Instant::now()),
            busy: AtomicUsize::new(0),
            get_stream: Mutex::new(None),
            pending: Mutex::new(HashMap::new()),
            next_out: AtomicU64::new(1),
            inflight: Mutex::new(HashMap::new()),
            subscriptions: Mutex::new(HashMap::new()),
            max_pending: self.max_pending,
        });
        map.insert(s.id.clone(), s.clone());
        Ok(s)
    }

    /// The session `id`, if it exists and belongs to this caller and endpoint.
    pub fn get(
        &self,
        id: &str,
        principal: &Principal,
        endpoint: &Endpoint,
    ) -> Option<Arc<ClientSession>> {
        let s = self.map.lock().expect("poisoned").get(id).cloned()?;
        (s.principal == *principal && s.endpoint == *endpoint).then_some(s)
    }

    pub fn remove(&self, id: &str) -> Option<Arc<ClientSession>> {
        let s = self.map.lock().expect("poisoned").remove(id)?;
        s.close();
        Some(s)
    }

    /// Sessions of an endpoint (for notification fan-out).
    pub fn of(&self, endpoint: &Endpoint) -> Vec<Arc<ClientSession>> {
        self.map
            .lock()
            .expect("poisoned")
            .values()
            .filter(|s| s.endpoint == *endpoint)
            .cloned()
            .collect()
    }

    /// A fresh client number (stateless clients' calls get one each).
    pub fn next_client(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    pub fn count(&self) -> usize {
        self.map.lock().expect("poisoned").len()
    }

    /// Drops sessions idle for longer than the idle timeout; how many.
    pub fn expire(&self) -> usize {
        Self::expire_locked(&mut self.map.lock().expect("poisoned"), self.idle)
    }

    fn expire_locked(map: &mut HashMap<String, Arc<ClientSession>>, idle: Duration) -> usize {
        let now = Instant::now();
        let before = map.len();
        map.retain(|_, s| {
            let keep = s.idle_since().is_none_or(|t| now.duration_since(t) < idle);
            if !keep {
                s.close();
            }
            keep
        });
        before - map.len()
    }
}

/// 128 random bits, hex: session ids and request-state handles.
pub fn random_id() -> String {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("the OS random source failed");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Delivers server→client requests to a handshake-era client: on the
/// response stream of the call that caused them when it is an SSE stream,
/// else on the session's GET stream; waits for the client's answer POST.
pub struct LegacyPeer {
    pub session: Arc<ClientSession>,
    /// The SSE response stream of the call, if it is one.
    pub call_stream: Option<mpsc::Sender<Value>>,
    /// How long one answer may take.
    pub timeout: Duration,
    /// Where the time spent waiting for answers is credited.
    pub waits: Arc<HumanWaits>,
}

/// Removes a pending server→client request however its wait ends.
struct PendingGuard<'a> {
    session: &'a ClientSession,
    id: String,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.session
            .pending
            .lock()
            .expect("poisoned")
            .remove(&self.id);
    }
}

#[async_trait]
impl ClientPeer for LegacyPeer {
    fn client_id(&self) -> u64 {
        self.session.num
    }

    async fn request(&self, method: &str, params: Option<Value>) -> Result<Value, RpcError> {
        let capability = match method {
            "elicitation/create" => Some("elicitation"),
            "sampling/createMessage" => Some("sampling"),
            "roots/list" => Some("roots"),
            _ => None,
        };
        if let Some(c) = capability {
            if !self.session.declares(c) {
                return Err(rpc_error(
                    INVALID_PARAMS,
                    format!("the client did not declare the `{c}` capability"),
                ));
            }
        }
        let s = &self.session;
        let id = format!("meshbox-{}", s.next_out.fetch_add(1, Ordering::Relaxed));
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = s.pending.lock().expect("poisoned");
            if pending.len() >= s.max_pending {
                return Err(rpc_error(
                    INTERNAL_ERROR,
                    "too many requests wait for this client",
                ));
            }
            pending.insert(id.clone(), tx);
        }
        let _guard = PendingGuard {
            session: s,
            id: id.clone(),
        };
        let mut msg = json!({ "jsonrpc": "2.0", "id": id, "method": method });
        if let Some(p) = params {
            msg["params"] = p;
        }
        let sent = match &self.call_stream {
            Some(tx) => tx.send(msg.clone()).await.is_ok(),
            None => false,
        } || s.push(msg);
        if !sent {
            return Err(rpc_error(
                INTERNAL_ERROR,
                "the client has no open stream to receive this request",
            ));
        }
        let _waiting = self.waits.begin();
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => Err(rpc_error(INTERNAL_ERROR, "the client session ended")),
            Err(_) => Err(rpc_error(
                INTERNAL_ERROR,
                format!(
                    "the client did not answer {method} within {}s",
                    self.timeout.as_secs()
                ),
            )),
        }
    }
}
