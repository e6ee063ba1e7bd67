//! The MCP gateway: every deployed service, and every mesh, as an MCP
//! Streamable HTTP endpoint (`/mcp/{mesh}/{name}`, `/mcp/{mesh}`), in both
//! protocol eras at once.
//!
//! Owns the client side of MCP over HTTP: parsing and checking what clients
//! POST, handshake-era client sessions, SSE response and GET streams, the
//! mesh endpoint's name prefixes, the input bridge between the eras, and the
//! fan-out of server notifications. It reaches servers only through
//! [`upstream::Upstreams`] (bound to the supervisor in [`bind`]); it never
//! starts, stops or talks to a process, and authentication happens before it
//! (the API's middleware puts the caller's [`Principal`] in the request).

pub mod bind;
mod bridge;
mod follow;
mod hub;
pub mod names;
pub mod protocol;
mod route;
mod sessions;
pub mod upstream;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Json, Router};
use futures_util::future::{AbortHandle, Abortable};
use futures_util::StreamExt;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;
use tracing::{debug, Instrument};

use crate::metrics::{Era, Metrics};
use crate::model::{validate_name, Principal, Protocol};
use bridge::{AbortOnDrop, Held, HumanWaits};
use follow::{Followers, SubscriptionsFull};
use hub::{Hub, Listener};
use protocol::*;
pub use route::Endpoint;
use route::{to_rpc_error, CallCtx};
use sessions::{LegacyPeer, Sessions};
use upstream::{RpcError, ServiceKey, UpstreamError, Upstreams};

/// Limits and timings of the gateway.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Handshake-era sessions open at once, at most (all meshes).
    pub max_sessions: usize,
    /// Handshake-era sessions open at once on one mesh's endpoints, at most,
    /// so one tenant cannot take every session.
    pub max_sessions_per_mesh: usize,
    /// A session with no request and no open stream for this long ends.
    pub session_idle: Duration,
    /// Calls held open for a stateless client's input, at most.
    pub max_held: usize,
    /// How long a held call waits for the client's retry.
    pub held_ttl: Duration,
    /// `ttlMs` on cacheable results for stateless clients.
    pub list_ttl_ms: u64,
    /// How long a request waits for a starting or restarting service.
    pub upstream_wait: Duration,
    /// Browser origins allowed besides loopback ones (`http://localhost:3000`).
    pub allowed_origins: Vec<String>,
    /// Server→client requests waiting for one client's answer, at most.
    pub max_pending_per_session: usize,
    /// How often expired sessions and held calls are dropped.
    pub sweep_every: Duration,
    /// Where requests and sessions are counted.
    pub metrics: Arc<Metrics>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            max_sessions: 4096,
            max_sessions_per_mesh: 512,
            session_idle: Duration::from_secs(30 * 60),
            max_held: 256,
            held_ttl: Duration::from_secs(300),
            list_ttl_ms: 10_000,
            upstream_wait: Duration::from_secs(30),
            allowed_origins: Vec::new(),
            max_pending_per_session: 64,
            sweep_every: Duration::from_secs(5),
            metrics: Arc::new(Metrics::disabled()),
        }
    }
}

pub(crate) struct Inner {
    upstreams: Arc<dyn Upstreams>,
    config: GatewayConfig,
    sessions: Arc<Sessions>,
    held: Held,
    hubs: Mutex<HashMap<Endpoint, Arc<Hub>>>,
    followers: Arc<Followers>,
}

/// The gateway: build once, serve its [`Gateway::router`] under `/mcp`.
pub struct Gateway {
    inner: Arc<Inner>,
    _sweeper: AbortOnDrop<()>,
}

impl Gateway {
    /// Needs a tokio runtime (it starts the expiry sweeper).
    pub fn new(upstreams: Arc<dyn Upstreams>, config: GatewayConfig) -> Self {
        let inner = Arc::new(Inner {
            sessions: Arc::new(Sessions::new(
                config.max_sessions,
                config.max_sessions_per_mesh,
                config.session_idle,
                config.max_pending_per_session,
            )),
            followers: Arc::new(Followers::new(upstreams.clone())),
            upstreams,
            held: Held::default(),
            hubs: Mutex::new(HashMap::new()),
            config,
        });
        let weak: Weak<Inner> = Arc::downgrade(&inner);
        let every = inner.config.sweep_every;
        let sweeper = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                let (s, h) = (inner.sessions.expire(), inner.held.expire());
                inner.count_sessions();
                if s + h > 0 {
                    debug!(sessions = s, held_calls = h, "expired");
                }
            }
        });
        Gateway {
            inner,
            _sweeper: AbortOnDrop(sweeper),
        }
    }

    /// Routes relative to `/mcp`: `/{mesh}` and `/{mesh}/{name}`.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/{mesh}", post(post_mcp).get(get_mcp).delete(delete_mcp))
            .route(
                "/{mesh}/{name}",
                post(post_mcp).get(get_mcp).delete(delete_mcp),
            )
            .layer(middleware::from_fn_with_state(
                self.inner.clone(),
                check_origin,
            ))
            .with_state(self.inner.clone())
    }

    /// Handshake-era sessions open now.
    pub fn sessions(&self) -> usize {
        self.inner.sessions.count()
    }

    /// Calls held for a stateless client's input now.
    pub fn held_calls(&self) -> usize {
        self.inner.held.count()
    }
}

type St = State<Arc<Inner>>;

// ---------------------------------------------------------------- responses

fn rpc_response(status: StatusCode, id: &Value, e: &RpcError) -> Response {
    (status, Json(error_message(id, e))).into_response()
}

fn bad(id: &Value, code: i64, message: impl Into<String>) -> Response {
    rpc_response(StatusCode::BAD_REQUEST, id, &rpc_error(code, message))
}

fn accepted() -> Response {
    StatusCode::ACCEPTED.into_response()
}

/// An SSE response fed by `rx`; `guard` (the producing task) lives as long
/// as the stream, so closing the stream aborts it.
fn sse_response<G: Send + 'static>(rx: mpsc::Receiver<Value>, guard: G) -> Response {
    let stream =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|v| (v, rx)) })
            .map(move |v| {
                let _keep = &guard;
                Ok::<_, std::convert::Infallible>(Event::default().data(v.to_string()))
            });
    let mut r = Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response();
    r.headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    r
}

/// Answers one request: as JSON, or (`sse`) as a stream on which `make`'s
/// output channel carries notifications and requests before the final answer.
async fn respond<F, Fut>(
    sse: bool,
    id: Value,
    status_of: fn(i64) -> StatusCode,
    make: F,
) -> Response
where
    F: FnOnce(Option<mpsc::Sender<Value>>) -> Fut,
    Fut: Future<Output = Result<Value, RpcError>> + Send + 'static,
{
    if !sse {
        return match make(None).await {
            Ok(v) => Json(result_message(&id, v)).into_response(),
            Err(e) => rpc_response(status_of(e.code), &id, &e),
        };
    }
    let (tx, rx) = mpsc::channel(64);
    let fut = make(Some(tx.clone())).in_current_span();
    let task = tokio::spawn(async move {
        let msg = match fut.await {
            Ok(v) => result_message(&id, v),
            Err(e) => error_message(&id, &e),
        };
        let _ = tx.send(msg).await;
    });
    sse_response(rx, AbortOnDrop(task))
}

/// Forwards `notifications/progress` from `rx` to `out` while `call` runs.
async fn pump<T>(
    out: Option<mpsc::Sender<Value>>,
    rx: Option<mpsc::Receiver<Value>>,
    call: impl Future<Output = T>,
) -> T {
    let (Some(out), Some(mut rx)) = (out, rx) else {
        return call.await;
    };
    let note = |p| json!({ "jsonrpc": "2.0", "method": "notifications/progress", "params": p });
    tokio::pin!(call);
    loop {
        tokio::select! {
            biased;
            r = &mut call => {
                while let Ok(p) = rx.try_recv() {
                    let _ = out.send(note(p)).await;
                }
                return r;
            }
            Some(p) = rx.recv() => { let _ = out.send(note(p)).await; }
        }
    }
}

fn has_progress_token(params: Option<&Map<String, Value>>) -> bool {
    params
        .and_then(|p| p.get("_meta"))
        .and_then(|m| m.get("progressToken"))
        .is_some()
}

// ---------------------------------------------------------------- extractors

/// The endpoint from the path, validated, and the caller.
async fn endpoint_of(
    inner: &Inner,
    path: &HashMap<String, String>,
    principal: &Principal,
) -> Result<Endpoint, Response> {
    let mesh = path.get("mesh").map(String::as_str).unwrap_or_default();
    validate_name("mesh", mesh).map_err(|e| bad(&Value::Null, INVALID_REQUEST, e.to_string()))?;
    if !principal.reaches(mesh) {
        return Err(rpc_response(
            StatusCode::FORBIDDEN,
            &Value::Null,
            &rpc_error(INVALID_REQUEST, "this token does not reach this mesh"),
        ));
    }
    let Some(name) = path.get("name") else {
        return Ok(Endpoint::Mesh(mesh.to_owned()));
    };
    let key = ServiceKey::parse(mesh, name)
        .map_err(|e| bad(&Value::Null, INVALID_REQUEST, e.to_string()))?;
    if !inner.upstreams.exists(&key) {
        return Err(rpc_response(
            StatusCode::NOT_FOUND,
            &Value::Null,
            &rpc_error(INVALID_REQUEST, format!("service {key} is not deployed")),
        ));
    }
    Ok(Endpoint::Service(key))
}

fn principal_of(p: Option<Extension<Principal>>) -> Principal {
    p.map(|Extension(p)| p).unwrap_or(Principal::Open)
}

// ---------------------------------------------------------------- origin

fn origin_allowed(origin: &str, allowed: &[String]) -> bool {
    if allowed.iter().any(|a| a == origin) {
        return true;
    }
    let Some(rest) = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
    else {
        return false;
    };
    let host = if let Some(v6) = rest.strip_prefix('[') {
        v6.split(']').next().unwrap_or_default()
    } else {
        rest.split(':').next().unwrap_or_default()
    };
    matches!(host, "localhost" | "127.0.0.1" | "::1")
}

/// A browser page of another origin gets 403 (DNS rebinding, CSRF).
async fn check_origin(State(inner): St, req: Request, next: Next) -> Response {
    if let Some(origin) = req.headers().get(header::ORIGIN) {
        let ok = origin
            .to_str()
            .is_ok_and(|o| origin_allowed(o, &inner.config.allowed_origins));
        if !ok {
            return rpc_response(
                StatusCode::FORBIDDEN,
                &Value::Null,
                &rpc_error(INVALID_REQUEST, "requests from this Origin are not allowed"),
            );
        }
    }
    next.run(req).await
}

// ---------------------------------------------------------------- POST

async fn post_mcp(
    State(inner): St,
    Path(path): Path<HashMap<String, String>>,
    principal: Option<Extension<Principal>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let span = tracing::debug_span!("mcp", otel.kind = "server", path = ?path);
    let call = post_mcp_in(inner, path, principal, &headers, body);
    crate::telemetry::traced(span, |name| header(&headers, name), call).await
}

async fn post_mcp_in(
    inner: Arc<Inner>,
    path: HashMap<String, String>,
    principal: Option<Extension<Principal>>,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let principal = principal_of(principal);
    let ep = match endpoint_of(&inner, &path, &principal).await {
        Ok(ep) => ep,
        Err(r) => return r,
    };
    let body = match body {
        Ok(b) => b,
        Err(r) => {
            let status = r.status();
            let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
                "request body is larger than the limit".to_owned()
            } else {
                r.body_text()
            };
            return rpc_response(status, &Value::Null, &rpc_error(INVALID_REQUEST, message));
        }
    };
    let msg = match protocol::parse(&body) {
        Ok(m) => m,
        Err(rej) => return rpc_response(StatusCode::BAD_REQUEST, &rej.id, &rej.error),
    };
    if let Some(sid) = header(headers, H_SESSION) {
        let sid = sid.to_owned();
        inner.config.metrics.gateway_request(Era::handshake);
        return legacy_post(inner, ep, principal, &sid, headers, msg).await;
    }
    if let Incoming::Request { id, method, params } = &msg {
        if !looks_modern(headers, params.as_ref()) {
            if method == "initialize" {
                inner.config.metrics.gateway_request(Era::handshake);
                let r = initialize(&inner, ep, principal, id, params.as_ref()).await;
                inner.count_sessions();
                return r;
            }
            if header(headers, H_PROTOCOL_VERSION).is_some() {
                return bad(
                    id,
                    INVALID_REQUEST,
                    "Mcp-Session-Id header is required: send initialize first",
                );
            }
        }
    }
    inner.config.metrics.gateway_request(Era::stateless);
    stateless_post(inner, ep, principal, headers, msg).await
}

// ---------------------------------------------------------------- stateless era

async fn stateless_post(
    inner: Arc<Inner>,
    ep: Endpoint,
    principal: Principal,
    headers: &HeaderMap,
    msg: Incoming,
) -> Response {
    let (id, method, params) = match msg {
        // No client notification means anything here; closing a stream is the cancellation.
        Incoming::Notification { .. } => return accepted(),
        Incoming::Response { id, .. } => {
            return bad(
                &id,
                INVALID_REQUEST,
                "stateless clients send no JSON-RPC responses",
            )
        }
        Incoming::Request { id, method, params } => (id, method, params),
    };
    if let Err(e) = check_stateless(headers, &method, params.as_ref()) {
        return rpc_response(StatusCode::BAD_REQUEST, &id, &e);
    }
    if REMOVED_IN_STATELESS.contains(&method.as_str()) {
        return rpc_response(
            StatusCode::NOT_FOUND,
            &id,
            &rpc_error(
                METHOD_NOT_FOUND,
                format!("method `{method}` does not exist in protocol 2026-07-28"),
            ),
        );
    }
    match method.as_str() {
        "server/discover" => discover(&inner, &ep, &id).await,
        "subscriptions/listen" => listen(&inner, &ep, id, params, headers).await,
        _ => {
            let sse = accepts_sse(headers) && has_progress_token(params.as_ref());
            let ttl = inner.config.list_ttl_ms;
            let param_headers = (method == "tools/call").then(|| ParamHeaders::of(headers));
            respond(sse, id, stateless_status, move |out| async move {
                let r =
                    stateless_call(&inner, &principal, &ep, &method, params, param_headers, out)
                        .await;
                let mut v = r.map_err(|e| to_rpc_error(&e))?;
                finish_stateless_result(&method, &mut v, ttl);
                Ok(v)
            })
            .await
        }
    }
}

/// The service a request goes to, and its session: the service itself, or
/// on a mesh endpoint the one its prefixed name or URI points at.
async fn target_upstream(
    inner: &Inner,
    ep: &Endpoint,
    params: Option<&Map<String, Value>>,
) -> Option<(ServiceKey, Arc<dyn upstream::Upstream>)> {
    let key = match ep {
        Endpoint::Service(k) => k.clone(),
        Endpoint::Mesh(mesh) => {
            let exposed = params
                .and_then(|p| p.get("name").or_else(|| p.get("uri")))
                .and_then(Value::as_str)?;
            let (svc, _) = names::decode(exposed)?;
            ServiceKey {
                mesh: mesh.clone(),
                name: svc,
            }
        }
    };
    let up = inner.upstream_of(&key).await.ok()?;
    Some((key, up))
}

async fn stateless_call(
    inner: &Arc<Inner>,
    principal: &Principal,
    ep: &Endpoint,
    method: &str,
    params: Option<Map<String, Value>>,
    param_headers: Option<ParamHeaders>,
    out: Option<mpsc::Sender<Value>>,
) -> Result<Value, UpstreamError> {
    let upstream = target_upstream(inner, ep, params.as_ref()).await;
    let handshake = upstream
        .as_ref()
        .is_some_and(|(_, up)| up.protocol() == Protocol::Handshake);
    let ctx = CallCtx {
        param_headers,
        upstream,
        ..CallCtx::default()
    };
    if may_need_input(method) && handshake {
        return inner
            .bridged(
                principal,
                ep,
                method,
                params.unwrap_or_default(),
                ctx,
                out.as_ref(),
            )
            .await;
    }
    let (ptx, prx) = match out {
        Some(_) => {
            let (t, r) = mpsc::channel(32);
            (Some(t), Some(r))
        }
        None => (None, None),
    };
    let ctx = CallCtx {
        progress: ptx,
        ..ctx
    };
    pump(out, prx, inner.call(ep, method, params, ctx)).await
}

async fn discover(inner: &Inner, ep: &Endpoint, id: &Value) -> Response {
    match inner.describe(ep).await {
        Ok(info) => {
            let mut r = json!({
                "supportedVersions": MODERN_VERSIONS,
                "capabilities": info.capabilities,
                "_meta": { META_SERVER_INFO: info.server_info },
            });
            if let Some(i) = info.instructions {
                r["instructions"] = json!(i);
            }
            finish_stateless_result("server/discover", &mut r, inner.config.list_ttl_ms);
            Json(result_message(id, r)).into_response()
        }
        Err(e) => rpc_response(StatusCode::OK, id, &to_rpc_error(&e)),
    }
}

/// `subscriptions/listen`: a long-lived stream of the change notifications
/// the client opted in to, tagged with its subscription id.
async fn listen(
    inner: &Arc<Inner>,
    ep: &Endpoint,
    id: Value,
    params: Option<Map<String, Value>>,
    headers: &HeaderMap,
) -> Response {
    if !accepts_sse(headers) {
        return rpc_response(
            StatusCode::NOT_ACCEPTABLE,
            &id,
            &rpc_error(
                INVALID_REQUEST,
                "subscriptions/listen answers with text/event-stream",
            ),
        );
    }
    let info = match inner.describe(ep).await {
        Ok(i) => i,
        Err(e) => return rpc_response(StatusCode::OK, &id, &to_rpc_error(&e)),
    };
    let filter = params
        .as_ref()
        .and_then(|p| p.get("notifications"))
        .cloned()
        .unwrap_or_else(|| json!({}));
    let wants = |k: &str| filter.get(k).and_then(Value::as_bool).unwrap_or(false);
    let caps = &info.capabilities;
    let list_changed = |c: &str| caps.pointer(&format!("/{c}/listChanged")) == Some(&json!(true));
    let asked: Vec<String> = if caps.pointer("/resources/subscribe") == Some(&json!(true)) {
        filter
            .get("resourceSubscriptions")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .take(MAX_SUBSCRIPTIONS_PER_CLIENT)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    // Held by the stream: closing it lets the server's subscriptions go.
    let mut guards = Vec::new();
    let mut uris = Vec::new();
    for uri in asked {
        let Ok((key, own)) = inner.resource_target(ep, &uri) else {
            continue;
        };
        if let Ok((guard, _)) = inner.followers.subscribe(&key, &own) {
            guards.push(guard);
            uris.push(uri);
        }
    }
    let listener_fields = (
        wants("toolsListChanged") && list_changed("tools"),
        wants("promptsListChanged") && list_changed("prompts"),
        wants("resourcesListChanged") && list_changed("resources"),
    );
    let mut ack = Map::new();
    for (k, on) in [
        ("toolsListChanged", listener_fields.0),
        ("promptsListChanged", listener_fields.1),
        ("resourcesListChanged", listener_fields.2),
    ] {
        if on {
            ack.insert(k.into(), json!(true));
        }
    }
    if !uris.is_empty() {
        ack.insert("resourceSubscriptions".into(), json!(uris));
    }
    let (tx, rx) = mpsc::channel(64);
    let _ = tx
        .send(json!({
            "jsonrpc": "2.0",
            "method": "notifications/subscriptions/acknowledged",
            "params": { "_meta": { META_SUBSCRIPTION_ID: id }, "notifications": ack }
        }))
        .await;
    let listener = Listener {
        tx,
        subscription_id: id,
        tools: listener_fields.0,
        prompts: listener_fields.1,
        resources: listener_fields.2,
        uris: uris.into_iter().collect(),
    };
    inner.listen(ep, listener);
    sse_response(rx, guards)
}

impl Inner {
    /// Handshake-era sessions open now, into the metrics.
    fn count_sessions(&self) {
        self.config
            .metrics
            .gateway_sessions(Era::handshake, self.sessions.count());
    }

    fn hub(&self, ep: &Endpoint) -> Arc<Hub> {
        let mut hubs = self.hubs.lock().expect("poisoned");
        if let Some(h) = hubs.get(ep).filter(|h| h.is_running()) {
            return h.clone();
        }
        let h = Hub::start(
            ep.clone(),
            self.upstreams.clone(),
            self.followers.clone(),
            self.sessions.clone(),
        );
        hubs.insert(ep.clone(), h.clone());
        h
    }

    fn listen(&self, ep: &Endpoint, mut l: Listener) {
        for _ in 0..3 {
            match self.hub(ep).listen(l) {
                Ok(()) => return,
                // That hub was closing: a new one.
                Err(back) => {
                    self.hubs.lock().expect("poisoned").remove(ep);
                    l = back;
                }
            }
        }
    }
}

// ---------------------------------------------------------------- handshake era

async fn initialize(
    inner: &Inner,
    ep: Endpoint,
    principal: Principal,
    id: &Value,
    params: Option<&Map<String, Value>>,
) -> Response {
    let Some(requested) = params
        .and_then(|p| p.get("protocolVersion"))
        .and_then(Value::as_str)
    else {
        return rpc_response(
            StatusCode::BAD_REQUEST,
            id,
            &rpc_error(INVALID_PARAMS, "initialize needs params.protocolVersion"),
        );
    };
    let version = LEGACY_VERSIONS
        .iter()
        .find(|v| **v == requested)
        .copied()
        .unwrap_or(LEGACY_VERSIONS[0]);
    let info = match inner.describe(&ep).await {
        Ok(i) => i,
        Err(e) => return rpc_response(StatusCode::OK, id, &to_rpc_error(&e)),
    };
    let client_caps = params
        .and_then(|p| p.get("capabilities"))
        .filter(|c| c.is_object())
        .cloned()
        .unwrap_or_else(|| json!({}));
    let session = match inner.sessions.open(principal, ep, client_caps) {
        Ok(s) => s,
        Err(full) => {
            return rpc_response(
                StatusCode::SERVICE_UNAVAILABLE,
                id,
                &rpc_error(GATEWAY_BUSY, full.to_string()),
            )
        }
    };
    let mut result = json!({
        "protocolVersion": version,
        "capabilities": info.capabilities,
        "serverInfo": info.server_info,
    });
    if let Some(i) = info.instructions {
        result["instructions"] = json!(i);
    }
    let mut r = Json(result_message(id, result)).into_response();
    r.headers_mut().insert(
        H_SESSION,
        HeaderValue::from_str(&session.id).expect("hex is a valid header value"),
    );
    r
}

fn unknown_session(id: &Value) -> Response {
    rpc_response(
        StatusCode::NOT_FOUND,
        id,
        &rpc_error(
            INVALID_REQUEST,
            "unknown or expired MCP session; send initialize again",
        ),
    )
}

/// The error answer to a request the client cancelled.
const REQUEST_CANCELLED: i64 = -32800;

fn legacy_status(code: i64) -> StatusCode {
    match code {
        PARSE_ERROR | INVALID_REQUEST => StatusCode::BAD_REQUEST,
        _ => StatusCode::OK,
    }
}

async fn legacy_post(
    inner: Arc<Inner>,
    ep: Endpoint,
    principal: Principal,
    sid: &str,
    headers: &HeaderMap,
    msg: Incoming,
) -> Response {
    let id_of = |m: &Incoming| match m {
        Incoming::Request { id, .. } | Incoming::Response { id, .. } => id.clone(),
        Incoming::Notification { .. } => Value::Null,
    };
    let Some(session) = inner.sessions.get(sid, &principal, &ep) else {
        return unknown_session(&id_of(&msg));
    };
    if let Some(v) = header(headers, H_PROTOCOL_VERSION) {
        if !LEGACY_VERSIONS.contains(&v) {
            return bad(
                &id_of(&msg),
                INVALID_REQUEST,
                format!(
                    "MCP-Protocol-Version `{}` is not one this session can speak",
                    crate::model::shown(v, 40)
                ),
            );
        }
    }
    session.touch();
    let (id, method, params) = match msg {
        Incoming::Notification { method, params } => {
            match method.as_str() {
                "notifications/cancelled" => {
                    if let Some(rid) = params.as_ref().and_then(|p| p.get("requestId")) {
                        session.cancel(rid);
                    }
                }
                "notifications/roots/list_changed" => notify_all(&inner, &ep, &method).await,
                _ => {}
            }
            return accepted();
        }
        Incoming::Response { id, outcome } => {
            return if session.answer(&id, outcome) {
                accepted()
            } else {
                bad(
                    &id,
                    INVALID_REQUEST,
                    "no request with this id waits for this client's answer",
                )
            };
        }
        Incoming::Request { id, method, params } => (id, method, params),
    };
    match method.as_str() {
        "initialize" => bad(&id, INVALID_REQUEST, "this session is initialized already"),
        "ping" => Json(result_message(&id, json!({}))).into_response(),
        _ => {
            if matches!(
                method.as_str(),
                "resources/subscribe" | "resources/unsubscribe"
            ) {
                return match subscription(&inner, &session, &method, params.as_ref()).await {
                    Ok(v) => Json(result_message(&id, v)).into_response(),
                    Err(e) => rpc_response(legacy_status(e.code), &id, &e),
                };
            }
            let sse = accepts_sse(headers)
                && (may_need_input(&method)
                    || method == "completion/complete"
                    || has_progress_token(params.as_ref()));
            let busy = session.busy();
            let peer_timeout = inner.config.held_ttl;
            let call_id = id.clone();
            respond(sse, id, legacy_status, move |out| async move {
                let _busy = busy;
                let waits = Arc::new(HumanWaits::default());
                let peer = Arc::new(LegacyPeer {
                    session: session.clone(),
                    call_stream: out.clone(),
                    timeout: peer_timeout,
                    waits: waits.clone(),
                });
                let (ptx, prx) = match out {
                    Some(_) => {
                        let (t, r) = mpsc::channel(32);
                        (Some(t), Some(r))
                    }
                    None => (None, None),
                };
                let ctx = CallCtx {
                    progress: ptx,
                    peer: Some(peer),
                    waits: Some(waits),
                    ..CallCtx::default()
                };
                let (abort, reg) = AbortHandle::new_pair();
                let _inflight = session.start_call(&call_id, abort);
                let work = async {
                    let first = inner
                        .call(&ep, &method, params.clone(), ctx.clone())
                        .await?;
                    inner
                        .complete_inputs(&ep, &method, params, first, ctx)
                        .await
                };
                match Abortable::new(pump(out, prx, work), reg).await {
                    Ok(r) => r.map_err(|e| to_rpc_error(&e)),
                    Err(_) => Err(rpc_error(
                        REQUEST_CANCELLED,
                        "request cancelled by the client",
                    )),
                }
            })
            .await
        }
    }
}

/// Resource subscriptions a client holds at most.
const MAX_SUBSCRIPTIONS_PER_CLIENT: usize = 1024;

/// A handshake-era client's `resources/subscribe` or `resources/unsubscribe`.
/// The server is subscribed once for all the gateway's clients (by the
/// service's follower); this records the client's interest, and on its first
/// subscription to a URI waits for the server's answer.
async fn subscription(
    inner: &Inner,
    session: &sessions::ClientSession,
    method: &str,
    params: Option<&Map<String, Value>>,
) -> Result<Value, RpcError> {
    let Some(uri) = params.and_then(|p| p.get("uri")).and_then(Value::as_str) else {
        return Err(rpc_error(INVALID_PARAMS, "params.uri must be a string"));
    };
    let subs = || session.subscriptions.lock().expect("poisoned");
    if method == "resources/unsubscribe" {
        subs().remove(uri);
        return Ok(json!({}));
    }
    if subs().contains_key(uri) {
        return Ok(json!({}));
    }
    if subs().len() >= MAX_SUBSCRIPTIONS_PER_CLIENT {
        return Err(rpc_error(
            GATEWAY_BUSY,
            format!("a client holds at most {MAX_SUBSCRIPTIONS_PER_CLIENT} resource subscriptions"),
        ));
    }
    let (key, own) = inner
        .resource_target(&session.endpoint, uri)
        .map_err(|e| to_rpc_error(&e))?;
    let (guard, outcome) = inner
        .followers
        .subscribe(&key, &own)
        .map_err(|SubscriptionsFull| {
            rpc_error(
                GATEWAY_BUSY,
                format!("service {key} has too many resource subscriptions"),
            )
        })?;
    if let Some(outcome) = outcome {
        let wait = inner.upstreams.call_timeout(&key);
        match tokio::time::timeout(wait, outcome).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => return Err(e),
            Ok(Err(_)) => {
                return Err(rpc_error(
                    INTERNAL_ERROR,
                    "the subscription ended before the server answered",
                ))
            }
            Err(_) => {
                return Err(rpc_error(
                    UPSTREAM_TIMEOUT,
                    format!(
                        "the server did not take the subscription within {}ms",
                        wait.as_millis()
                    ),
                ))
            }
        }
    }
    subs().insert(uri.to_owned(), guard);
    Ok(json!({}))
}

/// A client notification every upstream of the endpoint gets.
async fn notify_all(inner: &Inner, ep: &Endpoint, method: &str) {
    let keys: Vec<ServiceKey> = match ep {
        Endpoint::Service(k) => vec![k.clone()],
        Endpoint::Mesh(m) => inner
            .upstreams
            .running(m)
            .into_iter()
            .map(|name| ServiceKey {
                mesh: m.clone(),
                name,
            })
            .collect(),
    };
    for k in keys {
        if let Ok(up) = inner.upstream_of(&k).await {
            let _ = up.notify(method, None);
        }
    }
}

// ---------------------------------------------------------------- GET, DELETE

fn not_allowed() -> Response {
    let mut r = rpc_response(
        StatusCode::METHOD_NOT_ALLOWED,
        &Value::Null,
        &rpc_error(
            INVALID_REQUEST,
            "GET and DELETE need an Mcp-Session-Id (protocol 2026-07-28 has neither)",
        ),
    );
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("POST"));
    r
}

/// The session a GET or DELETE names: the endpoint as this caller may
/// reach it, and its session by `Mcp-Session-Id` (405 without the header,
/// 404 for a session that is not this caller's on this endpoint).
async fn named_session(
    inner: &Inner,
    path: &HashMap<String, String>,
    principal: Option<Extension<Principal>>,
    headers: &HeaderMap,
) -> Result<(Endpoint, String, Arc<sessions::ClientSession>), Response> {
    let principal = principal_of(principal);
    let ep = endpoint_of(inner, path, &principal).await?;
    let sid = header(headers, H_SESSION).ok_or_else(not_allowed)?;
    let session = inner
        .sessions
        .get(sid, &principal, &ep)
        .ok_or_else(|| unknown_session(&Value::Null))?;
    Ok((ep, sid.to_owned(), session))
}

async fn get_mcp(
    State(inner): St,
    Path(path): Path<HashMap<String, String>>,
    principal: Option<Extension<Principal>>,
    headers: HeaderMap,
) -> Response {
    let (ep, _, session) = match named_session(&inner, &path, principal, &headers).await {
        Ok(named) => named,
        Err(r) => return r,
    };
    if !accepts_sse(&headers) {
        return rpc_response(
            StatusCode::NOT_ACCEPTABLE,
            &Value::Null,
            &rpc_error(INVALID_REQUEST, "the GET stream is text/event-stream"),
        );
    }
    let (tx, rx) = mpsc::channel(64);
    if !session.open_stream(tx) {
        return rpc_response(
            StatusCode::CONFLICT,
            &Value::Null,
            &rpc_error(
                INVALID_REQUEST,
                "this session has a GET stream open already",
            ),
        );
    }
    inner.hub(&ep);
    let busy = session.busy();
    sse_response(rx, busy)
}

async fn delete_mcp(
    State(inner): St,
    Path(path): Path<HashMap<String, String>>,
    principal: Option<Extension<Principal>>,
    headers: HeaderMap,
) -> Response {
    let sid = match named_session(&inner, &path, principal, &headers).await {
        Ok((_, sid, _)) => sid,
        Err(r) => return r,
    };
    inner.sessions.remove(&sid);
    inner.count_sessions();
    StatusCode::NO_CONTENT.into_response()
}

#[cfg(test)]
mod tests;
