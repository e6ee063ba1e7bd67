//! The input bridge between the eras.
//!
//! Stateless client → handshake-era server: the server asks for input
//! (`elicitation/create`, `sampling/createMessage`, `roots/list`) in the
//! middle of a call. The call is held open upstream, the client gets an
//! `input_required` result whose `requestState` names the held call, and its
//! retry with `inputResponses` answers the waiting server requests. Held calls
//! are bounded in count and time; dropping one cancels it upstream.
//!
//! Handshake-era client → stateless server: an `input_required` result is
//! turned into server→client requests to the client, and the call retried
//! with its answers.
//!
//! A call whose server waits for a person ([`HumanWaits`]) is bounded by the
//! service's call timeout for the server's own work plus, per question, the
//! hold time for the answer — not by the call timeout alone.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::future::join_all;
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;

use super::protocol::{
    rpc_error, GATEWAY_BUSY, INVALID_PARAMS, META_CLIENT_CAPABILITIES, MISSING_CLIENT_CAPABILITY,
};
use super::route::{rpc, CallCtx, Endpoint};
use super::sessions::random_id;
use super::upstream::{ClientPeer, RpcError, UpstreamError};
use super::Inner;
use crate::model::Principal;

/// Rounds of `input_required` a handshake-era client is walked through, at most.
const MAX_ROUNDS: usize = 8;

/// Questions to a person one upstream call may wait for, at most, before
/// the session's own deadline (the backstop) ends it.
pub const MAX_HUMAN_WAITS: u32 = 8;

/// The time one call spent waiting for its client's answers (elicitation,
/// sampling, roots), which does not count against the call timeout.
#[derive(Debug, Default)]
pub struct HumanWaits {
    /// (questions open now, time spent waiting on answered ones)
    state: Mutex<(usize, Duration)>,
    changed: Notify,
}

/// One open question; its time is credited when it ends.
pub struct WaitGuard<'a> {
    waits: &'a HumanWaits,
    since: Instant,
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        let spent = self.since.elapsed();
        {
            let mut st = self.waits.state.lock().expect("poisoned");
            st.0 -= 1;
            st.1 += spent;
        }
        self.waits.changed.notify_waiters();
    }
}

impl HumanWaits {
    /// A question goes to the client now.
    pub fn begin(&self) -> WaitGuard<'_> {
        self.state.lock().expect("poisoned").0 += 1;
        self.changed.notify_waiters();
        WaitGuard {
            waits: self,
            since: Instant::now(),
        }
    }

    /// Runs `call` for at most `budget` of time not spent waiting for answers.
    pub async fn bounded<T>(
        &self,
        budget: Duration,
        call: impl std::future::Future<Output = Result<T, UpstreamError>>,
    ) -> Result<T, UpstreamError> {
        let start = Instant::now();
        // Waits of earlier calls (of the same client request) are not this one's.
        let before = self.state.lock().expect("poisoned").1;
        tokio::pin!(call);
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before reading the state: no change is missed.
            changed.as_mut().enable();
            let (open, waited) = *self.state.lock().expect("poisoned");
            let deadline = start + budget + waited.saturating_sub(before);
            tokio::select! {
                biased;
                r = &mut call => return r,
                _ = &mut changed => {}
                _ = tokio::time::sleep_until(deadline), if open == 0 => {
                    return Err(UpstreamError::Timeout(budget));
                }
            }
        }
    }
}

/// Questions one held call keeps for its client, at most.
const MAX_ASKS: usize = 16;

/// The server's questions of one call, on their way to the client.
#[derive(Default)]
struct Asks {
    queue: Mutex<VecDeque<InputAsk>>,
    arrived: Notify,
}

impl Asks {
    fn push(&self, ask: InputAsk) -> Result<(), InputAsk> {
        let mut q = self.queue.lock().expect("poisoned");
        if q.len() >= MAX_ASKS {
            return Err(ask);
        }
        q.push_back(ask);
        drop(q);
        self.arrived.notify_one();
        Ok(())
    }

    fn try_pop(&self) -> Option<InputAsk> {
        self.queue.lock().expect("poisoned").pop_front()
    }

    async fn pop(&self) -> InputAsk {
        loop {
            if let Some(a) = self.try_pop() {
                return a;
            }
            self.arrived.notified().await;
        }
    }
}

/// One server→client request of a held call.
struct InputAsk {
    method: String,
    params: Option<Value>,
    reply: oneshot::Sender<Result<Value, RpcError>>,
}

struct BridgePeer {
    client_id: u64,
    asks: Arc<Asks>,
    waits: Arc<HumanWaits>,
}

#[async_trait]
impl ClientPeer for BridgePeer {
    fn client_id(&self) -> u64 {
        self.client_id
    }

    async fn request(&self, method: &str, params: Option<Value>) -> Result<Value, RpcError> {
        let (reply, rx) = oneshot::channel();
        let ask = InputAsk {
            method: method.to_owned(),
            params,
            reply,
        };
        let gone = || rpc_error(super::protocol::INTERNAL_ERROR, "the client went away");
        let _waiting = self.waits.begin();
        if self.asks.push(ask).is_err() {
            return Err(rpc_error(
                super::protocol::INTERNAL_ERROR,
                "too many requests wait for this client",
            ));
        }
        // Bounded by the held call's expiry: an expired call is dropped.
        rx.await.map_err(|_| gone())?
    }
}

/// Aborts a task when dropped.
pub struct AbortOnDrop<T>(pub JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Whose request a held call is: a retry must be the same request of the
/// same caller on the same endpoint.
#[derive(PartialEq)]
struct Asker {
    principal: Principal,
    endpoint: Endpoint,
    method: String,
    /// The tool or prompt name, or resource URI.
    name: Option<Value>,
}

type CallFuture = Pin<Box<dyn Future<Output = Result<Value, UpstreamError>> + Send>>;

/// The upstream call: polled by the client's request while it runs, moved
/// into a task of its own when held (it outlives that request then).
enum Running {
    Inline(CallFuture),
    Task {
        result: oneshot::Receiver<Result<Value, UpstreamError>>,
        _task: AbortOnDrop<()>,
    },
}

impl Running {
    async fn result(&mut self) -> Result<Value, UpstreamError> {
        match self {
            Running::Inline(call) => call.as_mut().await,
            Running::Task { result, .. } => result.await.unwrap_or_else(|_| {
                Err(UpstreamError::Protocol(
                    "the call ended without an answer".into(),
                ))
            }),
        }
    }

    /// A task of its own (the request that polled it ends).
    fn detach(self) -> Running {
        match self {
            Running::Inline(call) => {
                let (tx, result) = oneshot::channel();
                // The call keeps the span of the request that started it.
                let task = tokio::spawn(
                    async move {
                        let _ = tx.send(call.await);
                    }
                    .in_current_span(),
                );
                Running::Task {
                    result,
                    _task: AbortOnDrop(task),
                }
            }
            held => held,
        }
    }
}

/// An upstream call of a stateless client that may wait for the client's input.
pub struct HeldCall {
    asker: Asker,
    caps: Value,
    asks: Arc<Asks>,
    waiting: Vec<(String, Option<Value>, InputAsk)>,
    running: Running,
    progress: Option<mpsc::Receiver<Value>>,
    next_key: u32,
    pub expires: Instant,
}

enum Drive {
    Done(Result<Value, UpstreamError>),
    NeedInput,
    MissingCapability(&'static str),
}

fn capability_of(method: &str) -> Option<&'static str> {
    match method {
        "elicitation/create" => Some("elicitation"),
        "sampling/createMessage" => Some("sampling"),
        "roots/list" => Some("roots"),
        _ => None,
    }
}

impl HeldCall {
    fn new_ask(&mut self, ask: InputAsk) -> Option<&'static str> {
        if let Some(c) = capability_of(&ask.method) {
            if self.caps.get(c).is_none() {
                return Some(c);
            }
        }
        self.next_key += 1;
        let key = format!("input-{}", self.next_key);
        let params = ask.params.clone();
        self.waiting.push((key, params, ask));
        None
    }

    /// Runs until the call ends or asks for input; progress goes to `out`.
    async fn drive(&mut self, out: Option<&mpsc::Sender<Value>>) -> Drive {
        let asks = self.asks.clone();
        loop {
            let progress = async {
                match &mut self.progress {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                r = self.running.result() => {
                    if let Some(rx) = &mut self.progress {
                        while let Ok(p) = rx.try_recv() {
                            forward_progress(out, p).await;
                        }
                    }
                    return Drive::Done(r);
                }
                ask = asks.pop() => {
                    if let Some(c) = self.new_ask(ask) {
                        return Drive::MissingCapability(c);
                    }
                    while let Some(more) = asks.try_pop() {
                        if let Some(c) = self.new_ask(more) {
                            return Drive::MissingCapability(c);
                        }
                    }
                    return Drive::NeedInput;
                }
                Some(p) = progress => forward_progress(out, p).await,
            }
        }
    }

    fn input_required(&self, token: &str) -> Value {
        let requests: Map<String, Value> = self
            .waiting
            .iter()
            .map(|(k, params, ask)| {
                let mut r = json!({ "method": ask.method });
                if let Some(p) = params {
                    r["params"] = p.clone();
                }
                (k.clone(), r)
            })
            .collect();
        json!({ "resultType": "input_required", "inputRequests": requests, "requestState": token })
    }

    /// Answers the waiting requests `responses` has keys for.
    fn answer(&mut self, responses: Option<&Map<String, Value>>) {
        let Some(responses) = responses else { return };
        let waiting = std::mem::take(&mut self.waiting);
        for (key, params, ask) in waiting {
            match responses.get(&key) {
                Some(v) => {
                    let _ = ask.reply.send(Ok(v.clone()));
                }
                None => self.waiting.push((key, params, ask)),
            }
        }
    }
}

async fn forward_progress(out: Option<&mpsc::Sender<Value>>, params: Value) {
    if let Some(out) = out {
        let _ = out
            .send(json!({ "jsonrpc": "2.0", "method": "notifications/progress", "params": params }))
            .await;
    }
}

/// The table of held calls.
#[derive(Default)]
pub struct Held {
    map: std::sync::Mutex<HashMap<String, HeldCall>>,
}

impl Held {
    pub fn count(&self) -> usize {
        self.map.lock().expect("poisoned").len()
    }

    /// Drops expired calls (cancelling them upstream); how many.
    pub fn expire(&self) -> usize {
        let now = Instant::now();
        let mut map = self.map.lock().expect("poisoned");
        let before = map.len();
        map.retain(|_, c| c.expires > now);
        before - map.len()
    }
}

impl Inner {
    /// A `tools/call`, `prompts/get` or `resources/read` of a stateless client
    /// to a handshake-era upstream, through the input bridge.
    pub(super) async fn bridged(
        self: &Arc<Self>,
        principal: &Principal,
        ep: &Endpoint,
        method: &str,
        mut params: Map<String, Value>,
        ctx: CallCtx,
        out: Option<&mpsc::Sender<Value>>,
    ) -> Result<Value, UpstreamError> {
        let caps = params
            .get("_meta")
            .and_then(|m| m.get(META_CLIENT_CAPABILITIES))
            .cloned()
            .unwrap_or_else(|| json!({}));
        let state = params.remove("requestState");
        let responses = params.remove("inputResponses");
        let asker = Asker {
            principal: principal.clone(),
            endpoint: ep.clone(),
            method: method.to_owned(),
            name: params.get("name").or_else(|| params.get("uri")).cloned(),
        };
        let mut call = match state {
            Some(token) => {
                // The retry is a request of its own: its headers are checked too.
                if let Some(h) = &ctx.param_headers {
                    self.check_tool_headers(ep, h, &params).await?;
                }
                let token = token.as_str().unwrap_or_default();
                let mut call = self.take_held(token, &asker)?;
                call.caps = caps;
                call.answer(responses.as_ref().and_then(Value::as_object));
                if !call.waiting.is_empty() {
                    return self.hold(call);
                }
                call
            }
            None => self.start_held(asker, params, ctx, caps, out.is_some()),
        };
        match call.drive(out).await {
            Drive::Done(r) => r,
            Drive::NeedInput => self.hold(call),
            Drive::MissingCapability(c) => Err(UpstreamError::Rpc(RpcError {
                data: Some(json!({ "requiredCapabilities": { c: {} } })),
                ..rpc_error(
                    MISSING_CLIENT_CAPABILITY,
                    format!("this request needs the client capability `{c}`"),
                )
            })),
        }
    }

    /// The call, not started: it runs as the request polls it (no task of
    /// its own unless it has to wait for the client).
    fn start_held(
        self: &Arc<Self>,
        asker: Asker,
        params: Map<String, Value>,
        ctx: CallCtx,
        caps: Value,
        progress: bool,
    ) -> HeldCall {
        let asks = Arc::new(Asks::default());
        let waits = Arc::new(HumanWaits::default());
        let peer = Arc::new(BridgePeer {
            client_id: self.sessions.next_client(),
            asks: asks.clone(),
            waits: waits.clone(),
        });
        let (progress_tx, progress) = match progress {
            true => {
                let (t, r) = mpsc::channel(32);
                (Some(t), Some(r))
            }
            false => (None, None),
        };
        let ctx = CallCtx {
            progress: progress_tx,
            peer: Some(peer),
            waits: Some(waits),
            ..ctx
        };
        let inner = self.clone();
        let (ep, method) = (asker.endpoint.clone(), asker.method.clone());
        let call: CallFuture =
            Box::pin(async move { inner.call(&ep, &method, Some(params), ctx).await });
        HeldCall {
            asker,
            caps,
            asks,
            waiting: Vec::new(),
            running: Running::Inline(call),
            progress,
            next_key: 0,
            expires: Instant::now() + self.config.held_ttl,
        }
    }

    /// Keeps `call` for the client's retry; the `input_required` result.
    fn hold(&self, mut call: HeldCall) -> Result<Value, UpstreamError> {
        call.running = std::mem::replace(
            &mut call.running,
            Running::Inline(Box::pin(std::future::pending())),
        )
        .detach();
        let token = random_id();
        let answer = call.input_required(&token);
        call.expires = Instant::now() + self.config.held_ttl;
        let mut map = self.held.map.lock().expect("poisoned");
        if map.len() >= self.config.max_held {
            return Err(rpc(
                GATEWAY_BUSY,
                "too many calls are waiting for client input; retry later",
            ));
        }
        map.insert(token, call);
        Ok(answer)
    }

    fn take_held(&self, token: &str, asker: &Asker) -> Result<HeldCall, UpstreamError> {
        let mut map = self.held.map.lock().expect("poisoned");
        let fits = map
            .get(token)
            .is_some_and(|c| c.asker == *asker && c.expires > Instant::now());
        if !fits {
            return Err(rpc(
                INVALID_PARAMS,
                "requestState names no call waiting for input here (expired, already answered, or another request's); send the request again without it",
            ));
        }
        Ok(map.remove(token).expect("checked above"))
    }

    /// A handshake-era client's call whose stateless upstream answered
    /// `input_required`: asks the client, retries with its answers.
    pub(super) async fn complete_inputs(
        &self,
        ep: &Endpoint,
        method: &str,
        params: Option<Map<String, Value>>,
        mut result: Value,
        ctx: CallCtx,
    ) -> Result<Value, UpstreamError> {
        for _ in 0..MAX_ROUNDS {
            if result.get("resultType").and_then(Value::as_str) != Some("input_required") {
                return Ok(result);
            }
            let Some(peer) = ctx.peer.clone() else {
                return Err(rpc(
                    INVALID_PARAMS,
                    "the server needs client input this client cannot give",
                ));
            };
            let requests = result
                .get("inputRequests")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default();
            let answers = join_all(requests.into_iter().map(|(k, r)| {
                let peer = peer.clone();
                async move {
                    let method = r
                        .get("method")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned();
                    let out = peer.request(&method, r.get("params").cloned()).await;
                    (k, out)
                }
            }))
            .await;
            let mut responses = Map::new();
            for (k, out) in answers {
                responses.insert(k, out.map_err(UpstreamError::Rpc)?);
            }
            let mut p = params.clone().unwrap_or_default();
            p.insert("inputResponses".into(), Value::Object(responses));
            if let Some(s) = result.get("requestState") {
                p.insert("requestState".into(), s.clone());
            }
            result = self.call(ep, method, Some(p), ctx.clone()).await?;
        }
        Err(UpstreamError::Protocol(format!(
            "the server still needed input after {MAX_ROUNDS} rounds"
        )))
    }
}
