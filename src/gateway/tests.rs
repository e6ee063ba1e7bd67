//! The gateway's HTTP side against an in-process fake upstream: both eras,
//! sessions, mesh routing, the input bridge, cancellation, hostile input.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tokio::sync::broadcast;
use tokio::time::Instant;
use tower::ServiceExt;

use super::protocol::*;
use super::upstream::*;
use super::{Gateway, GatewayConfig};
use crate::model::Protocol;

// ------------------------------------------------------------------ fake upstream

struct Fake {
    name: String,
    protocol: Protocol,
    notes: broadcast::Sender<Arc<Value>>,
    /// Calls of `slow` whose future was dropped before it finished.
    cancelled: AtomicUsize,
    started: AtomicUsize,
    seen: Mutex<Vec<(String, Value)>>,
    /// `subscriptions/listen` requests in flight (stateless era).
    listening: Arc<AtomicUsize>,
}

impl Fake {
    fn new(name: &str, protocol: Protocol) -> Arc<Self> {
        Arc::new(Fake {
            name: name.into(),
            protocol,
            notes: broadcast::channel(64).0,
            cancelled: AtomicUsize::new(0),
            started: AtomicUsize::new(0),
            seen: Mutex::new(Vec::new()),
            listening: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// Sends a server notification the way the real server would: a
    /// stateless server sends change notifications only on an open
    /// `subscriptions/listen` stream. Whether it went out.
    fn emit(&self, msg: Value) -> bool {
        let change = msg["method"].as_str().is_some_and(|m| {
            m.ends_with("/list_changed") || m == "notifications/resources/updated"
        });
        if self.protocol == Protocol::Stateless
            && change
            && self.listening.load(Ordering::SeqCst) == 0
        {
            return false;
        }
        self.notes.send(Arc::new(msg)).is_ok()
    }

    /// How many times `method` was requested.
    fn count(&self, method: &str) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(m, _)| m == method)
            .count()
    }

    /// The params of the last `method` request.
    fn last(&self, method: &str) -> Option<Value> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|(m, _)| m == method)
            .map(|(_, p)| p.clone())
    }
}

/// Counts down a gauge when dropped.
struct Gauge(Arc<AtomicUsize>);
impl Drop for Gauge {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

struct DropCount<'a>(&'a AtomicUsize, bool);
impl Drop for DropCount<'_> {
    fn drop(&mut self) {
        if !self.1 {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

fn text(t: impl Into<String>) -> Value {
    json!({ "content": [{ "type": "text", "text": t.into() }] })
}

#[async_trait]
impl Upstream for Fake {
    fn info(&self) -> ServerInfo {
        ServerInfo {
            protocol: self.protocol,
            protocol_version: match self.protocol {
                Protocol::Handshake => "2025-11-25".into(),
                Protocol::Stateless => "2026-07-28".into(),
            },
            server_info: json!({ "name": self.name, "version": "1.0.0" }),
            capabilities: json!({
                "tools": { "listChanged": true },
                "prompts": { "listChanged": true },
                "resources": { "subscribe": true, "listChanged": true },
                "completions": {},
                "logging": {}
            }),
            instructions: Some(format!("fake {}", self.name)),
            discover: None,
        }
    }

    fn tools(&self) -> Arc<Vec<Value>> {
        Arc::new(vec![
            json!({ "name": "echo", "inputSchema": {"type": "object"} }),
            json!({ "name": "ask", "inputSchema": {"type": "object"} }),
            json!({ "name": "route", "inputSchema": {"type": "object", "properties": {
                "region": {"type": "string", "x-mcp-header": "Region"},
                "level": {"type": "integer", "x-mcp-header": "Level"},
                "on": {"type": "boolean", "x-mcp-header": "On"},
                "nested": {"type": "object", "properties": {"zone": {"type": "string", "x-mcp-header": "Zone"}}},
                "list": {"type": "array", "items": {"type": "string", "x-mcp-header": "Item"}},
                "query": {"type": "string"}
            }} }),
        ])
    }

    async fn request(
        &self,
        method: &str,
        params: Option<Value>,
        opts: CallOptions,
    ) -> Result<Value, UpstreamError> {
        // The real session's deadline covers the whole call.
        let timeout = opts.timeout;
        tokio::time::timeout(timeout, self.answer(method, params, opts))
            .await
            .unwrap_or(Err(UpstreamError::Timeout(timeout)))
    }

    fn notify(&self, method: &str, params: Option<Value>) -> Result<(), UpstreamError> {
        self.seen
            .lock()
            .unwrap()
            .push((method.to_owned(), params.unwrap_or(Value::Null)));
        Ok(())
    }

    fn notifications(&self) -> broadcast::Receiver<Arc<Value>> {
        self.notes.subscribe()
    }

    fn is_closed(&self) -> bool {
        false
    }
}

impl Fake {
    async fn answer(
        &self,
        method: &str,
        params: Option<Value>,
        opts: CallOptions,
    ) -> Result<Value, UpstreamError> {
        let p = params.unwrap_or(json!({}));
        self.seen
            .lock()
            .unwrap()
            .push((method.to_owned(), p.clone()));
        let args = p.get("arguments").cloned().unwrap_or(json!({}));
        match method {
            "tools/list" => {
                if p.get("cursor").is_none() {
                    Ok(
                        json!({ "tools": [{ "name": "echo", "inputSchema": {"type": "object"} }], "nextCursor": "2" }),
                    )
                } else {
                    Ok(json!({ "tools": [{ "name": "ask", "inputSchema": {"type": "object"} }] }))
                }
            }
            "prompts/list" => Ok(json!({ "prompts": [{ "name": "greet" }] })),
            "prompts/get" => Ok(
                json!({ "messages": [{ "role": "user", "content": { "type": "text", "text": format!("{}:{}", self.name, p["name"]) } }] }),
            ),
            "resources/list" => Ok(json!({ "resources": [{ "uri": "mem://a", "name": "a" }] })),
            "resources/templates/list" => {
                Ok(json!({ "resourceTemplates": [{ "uriTemplate": "mem://{x}", "name": "t" }] }))
            }
            "resources/read" => Ok(
                json!({ "contents": [{ "uri": p["uri"], "text": format!("{} read {}", self.name, p["uri"].as_str().unwrap_or("")) }] }),
            ),
            "resources/subscribe" | "resources/unsubscribe" | "logging/setLevel"
                if self.protocol == Protocol::Handshake =>
            {
                Ok(json!({}))
            }
            "subscriptions/listen" if self.protocol == Protocol::Stateless => {
                self.listening.fetch_add(1, Ordering::SeqCst);
                let _open = Gauge(self.listening.clone());
                let _ = self.notes.send(Arc::new(json!({
                    "jsonrpc": "2.0",
                    "method": "notifications/subscriptions/acknowledged",
                    "params": { "_meta": { META_SUBSCRIPTION_ID: 7 }, "notifications": p["notifications"] }
                })));
                tokio::time::sleep(Duration::from_secs(24 * 3600)).await;
                Ok(json!({}))
            }
            "completion/complete" => Ok(
                json!({ "completion": { "values": [format!("{}", p["ref"]["name"].as_str().or(p["ref"]["uri"].as_str()).unwrap_or(""))] } }),
            ),
            "tools/call" => {
                match p["name"].as_str().unwrap_or_default() {
                    "route" => Ok(text(format!("routed {}", args))),
                    "echo" => Ok(text(format!(
                        "{}:{}",
                        self.name,
                        args["text"].as_str().unwrap_or("")
                    ))),
                    "fail" => Err(UpstreamError::Rpc(rpc_error(-32602, "bad arguments"))),
                    "slow" => {
                        self.started.fetch_add(1, Ordering::SeqCst);
                        let mut guard = DropCount(&self.cancelled, false);
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                        guard.1 = true;
                        Ok(text("done"))
                    }
                    "progress" => {
                        let token = p.pointer("/_meta/progressToken").cloned();
                        if let (Some(token), Some(tx)) = (token, &opts.progress) {
                            for i in 1..=3 {
                                let _ = tx.send(json!({ "progressToken": token, "progress": i, "total": 3 })).await;
                            }
                        }
                        Ok(text(format!(
                            "progress for {}",
                            args["who"].as_str().unwrap_or("")
                        )))
                    }
                    "ask" => match self.protocol {
                        Protocol::Handshake => {
                            self.started.fetch_add(1, Ordering::SeqCst);
                            let mut guard = DropCount(&self.cancelled, false);
                            let Some(peer) = &opts.peer else {
                                return Err(UpstreamError::Rpc(rpc_error(-32603, "no peer")));
                            };
                            let answer = peer
                            .request(
                                "elicitation/create",
                                Some(json!({ "message": format!("who is {}?", args["who"].as_str().unwrap_or("")), "requestedSchema": {"type": "object"} })),
                            )
                            .await
                            .map_err(UpstreamError::Rpc)?;
                            guard.1 = true;
                            Ok(text(format!(
                                "{} answered {}",
                                args["who"].as_str().unwrap_or(""),
                                answer["content"]["name"].as_str().unwrap_or("?")
                            )))
                        }
                        // The stateless server: multi round-trip.
                        Protocol::Stateless => match p.get("inputResponses") {
                            None => Ok(json!({
                                "resultType": "input_required",
                                "inputRequests": { "who": { "method": "elicitation/create", "params": { "message": "who?" } } },
                                "requestState": format!("st-{}", args["who"].as_str().unwrap_or(""))
                            })),
                            Some(r) => Ok(text(format!(
                                "{} answered {} ({})",
                                args["who"].as_str().unwrap_or(""),
                                r["who"]["content"]["name"].as_str().unwrap_or("?"),
                                p["requestState"].as_str().unwrap_or("")
                            ))),
                        },
                    },
                    _ => Err(UpstreamError::Rpc(rpc_error(-32602, "unknown tool"))),
                }
            }
            _ => Err(UpstreamError::Rpc(rpc_error(
                METHOD_NOT_FOUND,
                "method not found",
            ))),
        }
    }
}

struct Fakes {
    services: Mutex<HashMap<ServiceKey, (Arc<Fake>, bool)>>,
    events: Option<broadcast::Sender<ServiceEvent>>,
    call_timeout: Mutex<Duration>,
}

impl Fakes {
    fn new() -> Arc<Self> {
        Arc::new(Fakes {
            services: Mutex::new(HashMap::new()),
            events: Some(broadcast::channel(64).0),
            call_timeout: Mutex::new(Duration::from_secs(3600)),
        })
    }

    /// The service's server restarts: a new session (a fresh fake).
    fn restart(&self, mesh: &str, name: &str) -> Arc<Fake> {
        let protocol = self.services.lock().unwrap()[&key(mesh, name)].0.protocol;
        self.set_up(mesh, name, false);
        self.add(mesh, name, protocol)
    }

    fn add(&self, mesh: &str, name: &str, protocol: Protocol) -> Arc<Fake> {
        let f = Fake::new(name, protocol);
        let key = key(mesh, name);
        self.services
            .lock()
            .unwrap()
            .insert(key.clone(), (f.clone(), true));
        let _ = self
            .events
            .as_ref()
            .unwrap()
            .send(ServiceEvent { key, up: true });
        f
    }

    fn set_up(&self, mesh: &str, name: &str, up: bool) {
        let key = key(mesh, name);
        self.services.lock().unwrap().get_mut(&key).unwrap().1 = up;
        let _ = self.events.as_ref().unwrap().send(ServiceEvent { key, up });
    }
}

fn key(mesh: &str, name: &str) -> ServiceKey {
    ServiceKey::parse(mesh, name).unwrap()
}

#[async_trait]
impl Upstreams for Fakes {
    async fn upstream(
        &self,
        key: &ServiceKey,
        _deadline: Instant,
    ) -> Result<Arc<dyn Upstream>, UpstreamError> {
        match self.services.lock().unwrap().get(key) {
            Some((f, true)) => Ok(f.clone()),
            Some((_, false)) => Err(UpstreamError::Unavailable {
                key: key.clone(),
                reason: "stopped".into(),
            }),
            None => Err(UpstreamError::NotFound { key: key.clone() }),
        }
    }

    fn exists(&self, key: &ServiceKey) -> bool {
        self.services.lock().unwrap().contains_key(key)
    }

    fn running(&self, mesh: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .services
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, (_, up))| k.mesh == mesh && *up)
            .map(|(k, _)| k.name.clone())
            .collect();
        v.sort();
        v
    }

    fn call_timeout(&self, _key: &ServiceKey) -> Duration {
        *self.call_timeout.lock().unwrap()
    }

    fn events(&self) -> broadcast::Receiver<ServiceEvent> {
        self.events.as_ref().unwrap().subscribe()
    }
}

// ------------------------------------------------------------------ helpers

fn gateway(fakes: &Arc<Fakes>, config: GatewayConfig) -> (Gateway, Router) {
    let g = Gateway::new(fakes.clone(), config);
    let r = Router::new().nest_service("/mcp", g.router());
    (g, r)
}

fn meta(caps: Value) -> Value {
    json!({
        META_PROTOCOL_VERSION: "2026-07-28",
        META_CLIENT_CAPABILITIES: caps,
        META_CLIENT_INFO: { "name": "test", "version": "0" }
    })
}

/// A stateless request with conformant headers.
fn modern(path: &str, id: Value, method: &str, mut params: Value) -> Request<Body> {
    if params.get("_meta").is_none() {
        params["_meta"] = meta(json!({}));
    }
    let mut b = Request::post(path)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2026-07-28")
        .header("mcp-method", method);
    if let Some(n) = params
        .get("name")
        .or(params.get("uri"))
        .and_then(Value::as_str)
    {
        b = b.header("mcp-name", n);
    }
    b.body(Body::from(
        json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params }).to_string(),
    ))
    .unwrap()
}

fn raw(path: &str, headers: &[(&str, &str)], body: impl Into<Body>) -> Request<Body> {
    let mut b = Request::post(path)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(body.into()).unwrap()
}

struct Answer {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    /// The JSON body, or the last message of an SSE stream.
    body: Value,
    /// Every SSE message, in order.
    events: Vec<Value>,
}

fn sse_messages(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .filter_map(|d| serde_json::from_str(d.trim()).ok())
        .collect()
}

async fn send(app: &Router, req: Request<Body>) -> Answer {
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&bytes).to_string();
    let is_sse = headers
        .get("content-type")
        .is_some_and(|v| v.to_str().unwrap().contains("event-stream"));
    let events = if is_sse {
        sse_messages(&text)
    } else {
        Vec::new()
    };
    let body = if is_sse {
        events.last().cloned().unwrap_or(Value::Null)
    } else {
        serde_json::from_str(&text).unwrap_or(Value::Null)
    };
    Answer {
        status,
        headers,
        body,
        events,
    }
}

async fn initialize(app: &Router, path: &str, caps: Value) -> String {
    let a = send(
        app,
        raw(
            path,
            &[],
            json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{
                "protocolVersion":"2025-11-25","capabilities":caps,"clientInfo":{"name":"t","version":"0"}}})
            .to_string(),
        ),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(a.body["result"]["protocolVersion"], "2025-11-25");
    a.headers["mcp-session-id"].to_str().unwrap().to_owned()
}

fn legacy(path: &str, sid: &str, body: Value) -> Request<Body> {
    raw(
        path,
        &[
            ("mcp-session-id", sid),
            ("mcp-protocol-version", "2025-11-25"),
        ],
        body.to_string(),
    )
}

// ------------------------------------------------------------------ stateless era

#[tokio::test]
async fn stateless_discover_lists_and_cache_hints() {
    let fakes = Fakes::new();
    fakes.add("acme", "time", Protocol::Handshake);
    let (_g, app) = gateway(&fakes, GatewayConfig::default());
    let a = send(
        &app,
        modern("/mcp/acme/time", json!(1), "server/discover", json!({})),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    let r = &a.body["result"];
    assert_eq!(r["supportedVersions"], json!(["2026-07-28"]));
    assert_eq!(r["capabilities"]["tools"]["listChanged"], true);
    assert_eq!(r["_meta"][META_SERVER_INFO]["name"], "time");
    assert_eq!(r["resultType"], "complete");
    assert!(r["ttlMs"].as_u64().is_some());
    assert_eq!(r["cacheScope"], "private");

    let a = send(
        &app,
        modern("/mcp/acme/time", json!("t"), "tools/list", json!({})),
    )
    .await;
    assert_eq!(a.body["id"], "t");
    assert_eq!(a.body["result"]["tools"][0]["name"], "echo");
    assert_eq!(a.body["result"]["ttlMs"], 10_000);
    assert_eq!(a.body["result"]["cacheScope"], "private");
    assert_eq!(a.body["result"]["resultType"], "complete");

    let a = send(
        &app,
        modern(
            "/mcp/acme/time",
            json!(2),
            "tools/call",
            json!({"name":"echo","arguments":{"text":"hi"}}),
        ),
    )
    .await;
    assert_eq!(a.body["result"]["content"][0]["text"], "time:hi");
    assert_eq!(a.body["result"]["resultType"], "complete");
    assert!(a.body["result"].get("ttlMs").is_none());
}

#[tokio::test]
async fn stateless_checks_headers_meta_and_methods() {
    let fakes = Fakes::new();
    fakes.add("acme", "time", Protocol::Handshake);
    let (_g, app) = gateway(&fakes, GatewayConfig::default());
    let p = "/mcp/acme/time";
    let hdr = [
        ("mcp-protocol-version", "2026-07-28"),
        ("mcp-method", "tools/list"),
    ];

    // No _meta at all: 400 + -32602, id echoed.
    let a = send(
        &app,
        raw(
            p,
            &hdr,
            r#"{"jsonrpc":"2.0","id":101,"method":"tools/list","params":{}}"#,
        ),
    )
    .await;
    assert_eq!(
        (a.status, a.body["error"]["code"].as_i64()),
        (StatusCode::BAD_REQUEST, Some(INVALID_PARAMS))
    );
    assert_eq!(a.body["id"], 101);

    // Header and body disagree on the version.
    let body = json!({"jsonrpc":"2.0","id":3,"method":"tools/list","params":{"_meta": {
        META_PROTOCOL_VERSION: "1999-01-01", META_CLIENT_CAPABILITIES: {}}}});
    let a = send(&app, raw(p, &hdr, body.to_string())).await;
    assert_eq!(
        (a.status, a.body["error"]["code"].as_i64()),
        (StatusCode::BAD_REQUEST, Some(HEADER_MISMATCH))
    );

    // An unknown version in both: -32022 naming what is supported.
    let a = send(
        &app,
        raw(
            p,
            &[
                ("mcp-protocol-version", "1999-01-01"),
                ("mcp-method", "tools/list"),
            ],
            body.to_string(),
        ),
    )
    .await;
    assert_eq!(
        (a.status, a.body["error"]["code"].as_i64()),
        (StatusCode::BAD_REQUEST, Some(UNSUPPORTED_VERSION))
    );
    assert_eq!(a.body["error"]["data"]["supported"], json!(["2026-07-28"]));
    assert_eq!(a.body["id"], 3);

    // Mcp-Method and Mcp-Name against the body.
    let mut r = modern(
        p,
        json!(4),
        "tools/call",
        json!({"name":"echo","arguments":{}}),
    );
    r.headers_mut().insert("mcp-name", "other".parse().unwrap());
    let a = send(&app, r).await;
    assert_eq!(
        (a.status, a.body["error"]["code"].as_i64()),
        (StatusCode::BAD_REQUEST, Some(HEADER_MISMATCH))
    );
    let mut r = modern(p, json!(5), "tools/list", json!({}));
    r.headers_mut()
        .insert("mcp-method", "prompts/list".parse().unwrap());
    let a = send(&app, r).await;
    assert_eq!(a.body["error"]["code"], HEADER_MISMATCH);

    // Removed and unknown methods: 404 + -32601.
    for m in [
        "initialize",
        "ping",
        "logging/setLevel",
        "resources/subscribe",
        "unknown/method",
    ] {
        let a = send(&app, modern(p, json!(500), m, json!({}))).await;
        assert_eq!(
            (a.status, a.body["error"]["code"].as_i64()),
            (StatusCode::NOT_FOUND, Some(METHOD_NOT_FOUND)),
            "{m}"
        );
        assert_eq!(a.body["id"], 500);
    }

    // GET and DELETE without a session: 405.
    for m in ["GET", "DELETE"] {
        let r = Request::builder()
            .method(m)
            .uri(p)
            .header("accept", "text/event-stream")
            .body(Body::empty())
            .unwrap();
        assert_eq!(
            send(&app, r).await.status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{m}"
        );
    }
    // A notification: 202.
    let a = send(
        &app,
        raw(
            p,
            &hdr,
            r#"{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":1}}"#,
        ),
    )
    .await;
    assert_eq!(a.status, StatusCode::ACCEPTED);
    // An unknown service: 404.
    let a = send(
        &app,
        modern("/mcp/acme/nope", json!(1), "tools/list", json!({})),
    )
    .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn hostile_bodies_get_protocol_errors() {
    let fakes = Fakes::new();
    let fake = fakes.add("acme", "time", Protocol::Handshake);
    let (_g, app) = gateway(&fakes, GatewayConfig::default());
    let p = "/mcp/acme/time";
    let hdr = [
        ("mcp-protocol-version", "2026-07-28"),
        ("mcp-method", "tools/list"),
    ];
    let deep = format!("{}{}", "[".repeat(50_000), "]".repeat(50_000));
    let cases: Vec<(String, StatusCode, i64)> = vec![
        ("{".into(), StatusCode::BAD_REQUEST, PARSE_ERROR),
        (deep, StatusCode::BAD_REQUEST, PARSE_ERROR),
        (
            r#"[{"jsonrpc":"2.0","id":1,"method":"tools/list"}]"#.into(),
            StatusCode::BAD_REQUEST,
            INVALID_REQUEST,
        ),
        (
            r#"{"jsonrpc":"2.0","id":{"x":1},"method":"tools/list"}"#.into(),
            StatusCode::BAD_REQUEST,
            INVALID_REQUEST,
        ),
        (
            r#"{"jsonrpc":"2.0","id":1,"method":["tools/list"]}"#.into(),
            StatusCode::BAD_REQUEST,
            INVALID_REQUEST,
        ),
        (
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","params":"x"}"#.into(),
            StatusCode::BAD_REQUEST,
            INVALID_PARAMS,
        ),
        (
            format!(
                r#"{{"jsonrpc":"2.0","id":"{}","method":"tools/list"}}"#,
                "x".repeat(1000)
            ),
            StatusCode::BAD_REQUEST,
            INVALID_REQUEST,
        ),
        // A forged response from a stateless client.
        (
            r#"{"jsonrpc":"2.0","id":"meshbox-1","result":{}}"#.into(),
            StatusCode::BAD_REQUEST,
            INVALID_REQUEST,
        ),
    ];
    for (body, status, code) in cases {
        let a = send(&app, raw(p, &hdr, body.clone())).await;
        assert_eq!(
            (a.status, a.body["error"]["code"].as_i64()),
            (status, Some(code)),
            "{}",
            &body[..body.len().min(80)]
        );
    }
    // Nothing reached the server.
    assert!(fake.seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn origins_of_other_pages_are_refused() {
    let fakes = Fakes::new();
    fakes.add("acme", "time", Protocol::Handshake);
    let config = GatewayConfig {
        allowed_origins: vec!["https://app.example.com".into()],
        ..Default::default()
    };
    let (_g, app) = gateway(&fakes, config);
    for (origin, ok) in [
        ("https://evil.example", false),
        ("http://evil.com:7901", false),
        ("null", false),
        ("http://localhost:5173", true),
        ("http://127.0.0.1:7901", true),
        ("http://[::1]:7901", true),
        ("https://app.example.com", true),
    ] {
        let mut r = modern("/mcp/acme/time", json!(1), "tools/list", json!({}));
        r.headers_mut().insert("origin", origin.parse().unwrap());
        let a = send(&app, r).await;
        assert_eq!(
            a.status == StatusCode::FORBIDDEN,
            !ok,
            "{origin}: {}",
            a.status
        );
    }
}

// ------------------------------------------------------------------ handshake era

#[tokio::test]
async fn handshake_session_get_stream_and_delete() {
    let fakes = Fakes::new();
    let fake = fakes.add("acme", "time", Protocol::Handshake);
    let (g, app) = gateway(&fakes, GatewayConfig::default());
    let p = "/mcp/acme/time";
    let sid = initialize(&app, p, json!({})).await;
    assert_eq!(g.sessions(), 1);
    let a = send(
        &app,
        legacy(
            p,
            &sid,
            json!({"jsonrpc":"2.0","method":"notifications/initialized"}),
        ),
    )
    .await;
    assert_eq!(a.status, StatusCode::ACCEPTED);
    let a = send(&app, legacy(p, &sid, json!({"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"echo","arguments":{"text":"x"}}}))).await;
    assert_eq!(a.body["id"], 7);
    assert_eq!(a.body["result"]["content"][0]["text"], "time:x");
    let a = send(
        &app,
        legacy(p, &sid, json!({"jsonrpc":"2.0","id":8,"method":"ping"})),
    )
    .await;
    assert_eq!(a.body["result"], json!({}));

    // The GET stream carries list_changed; a second one is refused.
    let get = |sid: &str| {
        Request::get(p)
            .header("mcp-session-id", sid)
            .header("accept", "text/event-stream")
            .body(Body::empty())
            .unwrap()
    };
    let resp = app.clone().oneshot(get(&sid)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    assert_eq!(
        app.clone().oneshot(get(&sid)).await.unwrap().status(),
        StatusCode::CONFLICT
    );
    // The hub subscribes asynchronously: send until one arrives.
    let mut got = String::new();
    for _ in 0..50 {
        let _ = fake.notes.send(Arc::new(
            json!({"jsonrpc":"2.0","method":"notifications/tools/list_changed"}),
        ));
        if let Ok(Some(Ok(frame))) =
            tokio::time::timeout(Duration::from_millis(100), body.frame()).await
        {
            if let Ok(d) = frame.into_data() {
                got.push_str(&String::from_utf8_lossy(&d));
                if got.contains("list_changed") {
                    break;
                }
            }
        }
    }
    assert!(got.contains("notifications/tools/list_changed"), "{got}");

    // A foreign or unknown session id: 404; DELETE ends the session.
    let a = send(
        &app,
        legacy(p, "0123", json!({"jsonrpc":"2.0","id":1,"method":"ping"})),
    )
    .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    let del = Request::delete(p)
        .header("mcp-session-id", &sid)
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&app, del).await.status, StatusCode::NO_CONTENT);
    assert_eq!(g.sessions(), 0);
    let a = send(
        &app,
        legacy(p, &sid, json!({"jsonrpc":"2.0","id":1,"method":"ping"})),
    )
    .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    // The session of one endpoint is not valid on another.
    fakes.add("acme", "other", Protocol::Handshake);
    let sid2 = initialize(&app, p, json!({})).await;
    let a = send(
        &app,
        legacy(
            "/mcp/acme/other",
            &sid2,
            json!({"jsonrpc":"2.0","id":1,"method":"ping"}),
        ),
    )
    .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
}

#[tokio::test(start_paused = true)]
async fn idle_sessions_expire_and_a_flood_is_bounded() {
    let fakes = Fakes::new();
    fakes.add("acme", "time", Protocol::Handshake);
    let config = GatewayConfig {
        max_sessions: 8,
        session_idle: Duration::from_secs(60),
        ..Default::default()
    };
    let (g, app) = gateway(&fakes, config);
    let p = "/mcp/acme/time";
    for _ in 0..8 {
        initialize(&app, p, json!({})).await;
    }
    // The ninth is refused while the others are fresh.
    let a = send(
        &app,
        raw(p, &[], json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{}}}).to_string()),
    )
    .await;
    assert_eq!(
        (a.status, a.body["error"]["code"].as_i64()),
        (StatusCode::SERVICE_UNAVAILABLE, Some(GATEWAY_BUSY))
    );
    assert_eq!(g.sessions(), 8);
    tokio::time::advance(Duration::from_secs(61)).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(g.sessions(), 0);
    initialize(&app, p, json!({})).await;
    assert_eq!(g.sessions(), 1);
}

// ------------------------------------------------------------------ mesh endpoint

#[tokio::test]
async fn mesh_prefixes_routes_and_follows_services() {
    let fakes = Fakes::new();
    fakes.add("acme", "time", Protocol::Handshake);
    fakes.add("acme", "my_fs", Protocol::Stateless);
    fakes.add("other", "secret", Protocol::Handshake);
    let (_g, app) = gateway(&fakes, GatewayConfig::default());
    let p = "/mcp/acme";
    let a = send(&app, modern(p, json!(1), "tools/list", json!({}))).await;
    let mut names: Vec<String> = a.body["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_owned())
        .collect();
    names.sort();
    // Both pages of each service; the underscore escaped; no other mesh.
    assert_eq!(
        names,
        ["my_0fs__ask", "my_0fs__echo", "time__ask", "time__echo"]
    );
    let a = send(
        &app,
        modern(
            p,
            json!(2),
            "tools/call",
            json!({"name":"my_0fs__echo","arguments":{"text":"q"}}),
        ),
    )
    .await;
    assert_eq!(a.body["result"]["content"][0]["text"], "my_fs:q");
    let a = send(
        &app,
        modern(
            p,
            json!(3),
            "resources/read",
            json!({"uri":"time__mem://a"}),
        ),
    )
    .await;
    assert_eq!(a.body["result"]["contents"][0]["uri"], "time__mem://a");
    assert_eq!(a.body["result"]["contents"][0]["text"], "time read mem://a");
    let a = send(
        &app,
        modern(p, json!(4), "prompts/get", json!({"name":"time__greet"})),
    )
    .await;
    assert_eq!(
        a.body["result"]["messages"][0]["content"]["text"],
        "time:\"greet\""
    );
    let a = send(
        &app,
        modern(p, json!(5), "resources/templates/list", json!({})),
    )
    .await;
    assert_eq!(
        a.body["result"]["resourceTemplates"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let a = send(&app, modern(p, json!(6), "completion/complete", json!({"ref":{"type":"ref/prompt","name":"time__greet"},"argument":{"name":"a","value":""}}))).await;
    assert_eq!(a.body["result"]["completion"]["values"][0], "greet");
    // Another mesh's service cannot be named.
    let a = send(
        &app,
        modern(
            p,
            json!(7),
            "tools/call",
            json!({"name":"secret__echo","arguments":{}}),
        ),
    )
    .await;
    assert_eq!(a.body["error"]["code"], INVALID_PARAMS);

    // A legacy client's GET stream hears list_changed when a service goes down.
    let sid = initialize(&app, p, json!({})).await;
    let resp = app
        .clone()
        .oneshot(
            Request::get(p)
                .header("mcp-session-id", &sid)
                .header("accept", "text/event-stream")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let mut body = resp.into_body();
    tokio::time::sleep(Duration::from_millis(50)).await;
    fakes.set_up("acme", "time", false);
    let mut got = String::new();
    while !got.contains("tools/list_changed") {
        let f = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("no list_changed")
            .unwrap()
            .unwrap();
        if let Ok(d) = f.into_data() {
            got.push_str(&String::from_utf8_lossy(&d));
        }
    }
    let a = send(&app, modern(p, json!(8), "tools/list", json!({}))).await;
    let n = a.body["result"]["tools"].as_array().unwrap().len();
    assert_eq!(n, 2, "{}", a.body);
    // The endpoint stays up with no service; a later one appears.
    fakes.set_up("acme", "my_fs", false);
    let a = send(&app, modern(p, json!(9), "tools/list", json!({}))).await;
    assert_eq!(a.body["result"]["tools"], json!([]));
    fakes.add("acme", "late", Protocol::Handshake);
    let a = send(&app, modern(p, json!(10), "tools/list", json!({}))).await;
    assert_eq!(a.body["result"]["tools"][0]["name"], "late__echo");
}

// ------------------------------------------------------------------ input bridge

fn ask(id: i64, who: &str, caps: Value) -> Request<Body> {
    modern(
        "/mcp/acme/time",
        json!(id),
        "tools/call",
        json!({"name":"ask","arguments":{"who":who},"_meta": meta(caps)}),
    )
}

#[tokio::test]
async fn stateless_client_answers_a_handshake_server_through_input_required() {
    let fakes = Fakes::new();
    let fake = fakes.add("acme", "time", Protocol::Handshake);
    let (g, app) = gateway(&fakes, GatewayConfig::default());
    let a = send(&app, ask(1, "ann", json!({"elicitation": {}}))).await;
    let r = &a.body["result"];
    assert_eq!(r["resultType"], "input_required", "{}", a.body);
    let (key, req) = r["inputRequests"]
        .as_object()
        .unwrap()
        .iter()
        .next()
        .unwrap();
    assert_eq!(req["method"], "elicitation/create");
    assert_eq!(req["params"]["message"], "who is ann?");
    let state = r["requestState"].as_str().unwrap().to_owned();
    assert_eq!(g.held_calls(), 1);

    // A retry naming another call's state, or another tool, is refused.
    let mut wrong = json!({"name":"echo","arguments":{},"requestState": state,"inputResponses":{}});
    wrong["_meta"] = meta(json!({"elicitation": {}}));
    let a2 = send(
        &app,
        modern("/mcp/acme/time", json!(2), "tools/call", wrong),
    )
    .await;
    assert_eq!(a2.body["error"]["code"], INVALID_PARAMS);
    assert_eq!(g.held_calls(), 1);

    let mut retry = json!({"name":"ask","arguments":{"who":"ann"},"requestState": state,
        "inputResponses": { key.clone(): {"action":"accept","content":{"name":"Ann"}} }});
    retry["_meta"] = meta(json!({"elicitation": {}}));
    let a = send(
        &app,
        modern("/mcp/acme/time", json!(3), "tools/call", retry.clone()),
    )
    .await;
    assert_eq!(
        a.body["result"]["content"][0]["text"], "ann answered Ann",
        "{}",
        a.body
    );
    assert_eq!(a.body["result"]["resultType"], "complete");
    assert_eq!(g.held_calls(), 0);
    // The same state again: gone.
    let a = send(
        &app,
        modern("/mcp/acme/time", json!(4), "tools/call", retry),
    )
    .await;
    assert_eq!(a.body["error"]["code"], INVALID_PARAMS);
    assert_eq!(fake.cancelled.load(Ordering::SeqCst), 0);

    // A client without the capability: -32021, 400, and the upstream call is dropped.
    let a = send(&app, ask(5, "bob", json!({}))).await;
    assert_eq!(
        (a.status, a.body["error"]["code"].as_i64()),
        (StatusCode::BAD_REQUEST, Some(MISSING_CLIENT_CAPABILITY))
    );
    assert_eq!(
        a.body["error"]["data"]["requiredCapabilities"],
        json!({"elicitation": {}})
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(fake.cancelled.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn held_calls_are_bounded_in_count_and_time() {
    let fakes = Fakes::new();
    let fake = fakes.add("acme", "time", Protocol::Handshake);
    let config = GatewayConfig {
        max_held: 2,
        held_ttl: Duration::from_secs(30),
        ..Default::default()
    };
    let (g, app) = gateway(&fakes, config);
    for i in 0..2 {
        let a = send(&app, ask(i, "x", json!({"elicitation": {}}))).await;
        assert_eq!(a.body["result"]["resultType"], "input_required");
    }
    let a = send(&app, ask(9, "x", json!({"elicitation": {}}))).await;
    assert_eq!(a.body["error"]["code"], GATEWAY_BUSY);
    assert_eq!(g.held_calls(), 2);
    tokio::time::advance(Duration::from_secs(31)).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(g.held_calls(), 0);
    // Dropping them cancelled the upstream calls (the refused one too).
    assert_eq!(fake.cancelled.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn handshake_client_answers_a_stateless_server_and_progress_is_streamed() {
    let fakes = Fakes::new();
    fakes.add("acme", "time", Protocol::Stateless);
    let (_g, app) = gateway(&fakes, GatewayConfig::default());
    let p = "/mcp/acme/time";
    let sid = initialize(&app, p, json!({"elicitation": {}})).await;
    // The call's SSE stream carries the elicitation; the client answers by POST.
    let resp = app
        .clone()
        .oneshot(legacy(p, &sid, json!({"jsonrpc":"2.0","id":"c1","method":"tools/call","params":{"name":"ask","arguments":{"who":"cy"}}})))
        .await
        .unwrap();
    let mut body = resp.into_body();
    let mut text = String::new();
    let request = loop {
        let f = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        text.push_str(&String::from_utf8_lossy(&f.into_data().unwrap()));
        if let Some(m) = sse_messages(&text)
            .into_iter()
            .find(|m| m["method"] == "elicitation/create")
        {
            break m;
        }
    };
    let a = send(&app, legacy(p, &sid, json!({"jsonrpc":"2.0","id": request["id"],"result":{"action":"accept","content":{"name":"Cy"}}}))).await;
    assert_eq!(a.status, StatusCode::ACCEPTED);
    // A forged answer id is refused.
    let a = send(
        &app,
        legacy(
            p,
            &sid,
            json!({"jsonrpc":"2.0","id":"meshbox-999","result":{}}),
        ),
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    let rest = body.collect().await.unwrap().to_bytes();
    text.push_str(&String::from_utf8_lossy(&rest));
    let last = sse_messages(&text).pop().unwrap();
    assert_eq!(last["id"], "c1");
    assert_eq!(
        last["result"]["content"][0]["text"],
        "cy answered Cy (st-cy)"
    );

    // Progress reaches the caller with its own token.
    let a = send(
        &app,
        legacy(p, &sid, json!({"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"progress","arguments":{"who":"p"},"_meta":{"progressToken":"tok"}}})),
    )
    .await;
    let progress: Vec<&Value> = a
        .events
        .iter()
        .filter(|m| m["method"] == "notifications/progress")
        .collect();
    assert_eq!(progress.len(), 3);
    assert!(progress
        .iter()
        .all(|m| m["params"]["progressToken"] == "tok"));
    assert_eq!(a.body["result"]["content"][0]["text"], "progress for p");
}

// ------------------------------------------------------------------ cancellation

#[tokio::test]
async fn closing_the_stream_or_cancelling_drops_the_upstream_call() {
    let fakes = Fakes::new();
    let fake = fakes.add("acme", "time", Protocol::Handshake);
    let (_g, app) = gateway(&fakes, GatewayConfig::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let url = format!("http://{addr}/mcp/acme/time");
    let client = reqwest::Client::new();
    let wait_for = |n: usize, what: &'static str, c: &'static str| {
        let fake = fake.clone();
        async move {
            for _ in 0..500 {
                let v = if c == "started" {
                    &fake.started
                } else {
                    &fake.cancelled
                };
                if v.load(Ordering::SeqCst) >= n {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("{what}");
        }
    };
    // Stateless, JSON answer: the client goes away.
    let body = json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"slow","arguments":{},"_meta": meta(json!({}))}});
    let call = client
        .post(&url)
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2026-07-28")
        .header("mcp-method", "tools/call")
        .header("mcp-name", "slow")
        .json(&body)
        .send();
    let pending = tokio::spawn(call);
    wait_for(1, "slow call never started", "started").await;
    pending.abort();
    wait_for(
        1,
        "closing the connection did not cancel upstream",
        "cancelled",
    )
    .await;

    // Stateless, SSE answer (progress token): the stream is closed.
    let mut body2 = body.clone();
    body2["params"]["_meta"]["progressToken"] = json!(1);
    let resp = client
        .post(&url)
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2026-07-28")
        .header("mcp-method", "tools/call")
        .header("mcp-name", "slow")
        .json(&body2)
        .send()
        .await
        .unwrap();
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .contains("event-stream"));
    wait_for(2, "second slow call never started", "started").await;
    drop(resp);
    wait_for(
        2,
        "closing the SSE stream did not cancel upstream",
        "cancelled",
    )
    .await;

    // Handshake era: notifications/cancelled.
    let init = client
        .post(&url)
        .header("accept", "application/json, text/event-stream")
        .json(&json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{}}}))
        .send()
        .await
        .unwrap();
    let sid = init.headers()["mcp-session-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let c2 = client.clone();
    let (u2, s2) = (url.clone(), sid.clone());
    let call = tokio::spawn(async move {
        c2.post(&u2)
            .header("accept", "application/json")
            .header("mcp-session-id", s2)
            .json(&json!({"jsonrpc":"2.0","id":"slow-1","method":"tools/call","params":{"name":"slow","arguments":{}}}))
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    });
    wait_for(3, "third slow call never started", "started").await;
    let r = client
        .post(&url)
        .header("accept", "application/json")
        .header("mcp-session-id", &sid)
        .json(&json!({"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":"slow-1"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    wait_for(
        3,
        "notifications/cancelled did not cancel upstream",
        "cancelled",
    )
    .await;
    let answer = call.await.unwrap();
    assert_eq!(answer["error"]["code"], -32800);
    server.abort();
}

// ------------------------------------------------------------------ many clients

#[tokio::test]
async fn twenty_clients_interleave_without_cross_talk() {
    let fakes = Fakes::new();
    fakes.add("acme", "time", Protocol::Handshake);
    let (_g, app) = gateway(&fakes, GatewayConfig::default());
    let p = "/mcp/acme/time";
    let clients = (0..20).map(|i| {
        let app = app.clone();
        async move {
            let who = format!("client{i}");
            if i % 2 == 0 {
                // Handshake era: elicitation over the call's stream, progress with its own token.
                let sid = initialize(&app, p, json!({"elicitation": {}})).await;
                let a = send(&app, legacy(p, &sid, json!({"jsonrpc":"2.0","id":i,"method":"tools/call","params":{"name":"progress","arguments":{"who":who},"_meta":{"progressToken":format!("pt-{i}")}}}))).await;
                let progress: Vec<&Value> = a.events.iter().filter(|m| m["method"] == "notifications/progress").collect();
                assert_eq!(progress.len(), 3, "{who}");
                assert!(progress.iter().all(|m| m["params"]["progressToken"] == format!("pt-{i}")), "{who}");
                assert_eq!(a.body["result"]["content"][0]["text"], format!("progress for {who}"));
                let resp = app
                    .clone()
                    .oneshot(legacy(p, &sid, json!({"jsonrpc":"2.0","id":1000 + i,"method":"tools/call","params":{"name":"ask","arguments":{"who":who}}})))
                    .await
                    .unwrap();
                let mut body = resp.into_body();
                let mut text = String::new();
                let req = loop {
                    let f = tokio::time::timeout(Duration::from_secs(20), body.frame()).await.unwrap().unwrap().unwrap();
                    text.push_str(&String::from_utf8_lossy(&f.into_data().unwrap()));
                    if let Some(m) = sse_messages(&text).into_iter().find(|m| m["method"] == "elicitation/create") {
                        break m;
                    }
                };
                assert_eq!(req["params"]["message"], format!("who is {who}?"));
                let a = send(&app, legacy(p, &sid, json!({"jsonrpc":"2.0","id":req["id"],"result":{"action":"accept","content":{"name":format!("N{i}")}}}))).await;
                assert_eq!(a.status, StatusCode::ACCEPTED);
                let rest = body.collect().await.unwrap().to_bytes();
                text.push_str(&String::from_utf8_lossy(&rest));
                let last = sse_messages(&text).pop().unwrap();
                assert_eq!(last["id"], 1000 + i);
                assert_eq!(last["result"]["content"][0]["text"], format!("{who} answered N{i}"));
            } else {
                // Stateless: progress over SSE, elicitation through input_required.
                let a = send(&app, modern(p, json!(i), "tools/call", json!({"name":"progress","arguments":{"who":who},"_meta":{"progressToken":i, META_PROTOCOL_VERSION:"2026-07-28", META_CLIENT_CAPABILITIES:{}}}))).await;
                let progress: Vec<&Value> = a.events.iter().filter(|m| m["method"] == "notifications/progress").collect();
                assert_eq!(progress.len(), 3, "{who}");
                assert!(progress.iter().all(|m| m["params"]["progressToken"] == i), "{who}");
                let a = send(&app, ask(i, &who, json!({"elicitation": {}}))).await;
                let r = &a.body["result"];
                let (key, req) = r["inputRequests"].as_object().unwrap().iter().next().unwrap();
                assert_eq!(req["params"]["message"], format!("who is {who}?"));
                let mut retry = json!({"name":"ask","arguments":{"who":who},"requestState": r["requestState"],
                    "inputResponses": { key.clone(): {"action":"accept","content":{"name":format!("N{i}")}} }});
                retry["_meta"] = meta(json!({"elicitation": {}}));
                let a = send(&app, modern(p, json!(i + 100), "tools/call", retry)).await;
                assert_eq!(a.body["result"]["content"][0]["text"], format!("{who} answered N{i}"));
            }
        }
    });
    futures_util::future::join_all(clients).await;
}

// ------------------------------------------------------------------ auth, through the API router

#[tokio::test]
async fn mesh_tokens_reach_only_their_mesh() {
    use crate::api::{self, ApiConfig};
    use crate::orchestrator::process::{ProcessBackend, ProcessConfig};
    use crate::supervisor::{Supervisor, SupervisorConfig};

    let fakes = Fakes::new();
    fakes.add("acme", "time", Protocol::Handshake);
    fakes.add("beta", "time", Protocol::Handshake);
    let g = Gateway::new(fakes.clone(), GatewayConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let sup = Arc::new(Supervisor::new(
        Arc::new(ProcessBackend::new(ProcessConfig::default())),
        SupervisorConfig::new(dir.path().to_path_buf()),
    ));
    let app = api::router(
        sup,
        ApiConfig {
            token: Some("admin".into()),
            mesh_tokens: vec![("acme".into(), "acme-token".into())],
            mcp: Some(g.router()),
            body_limit: 4096,
            warning: None,
        },
    );
    let with = |path: &str, token: Option<&str>| {
        let mut r = modern(path, json!(1), "tools/list", json!({}));
        if let Some(t) = token {
            r.headers_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        r
    };
    assert_eq!(
        send(&app, with("/mcp/acme/time", None)).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        send(&app, with("/mcp/acme/time", Some("wrong")))
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        send(&app, with("/mcp/acme/time", Some("acme-token")))
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        send(&app, with("/mcp/acme", Some("acme-token")))
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        send(&app, with("/mcp/beta/time", Some("acme-token")))
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        send(&app, with("/mcp/beta", Some("acme-token")))
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        send(&app, with("/mcp/beta/time", Some("admin")))
            .await
            .status,
        StatusCode::OK
    );
    let rest = |path: &str, t: &str| {
        Request::get(path)
            .header("authorization", format!("Bearer {t}"))
            .body(Body::empty())
            .unwrap()
    };
    assert_eq!(
        send(&app, rest("/v1/meshes/acme/services", "acme-token"))
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        send(&app, rest("/v1/meshes/beta/services", "acme-token"))
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        send(&app, rest("/list", "acme-token")).await.status,
        StatusCode::FORBIDDEN
    );
    // The body limit applies to /mcp too.
    let big = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{{"x":"{}"}}}}"#,
        "a".repeat(10_000)
    );
    let mut r = raw(
        "/mcp/acme/time",
        &[
            ("mcp-protocol-version", "2026-07-28"),
            ("mcp-method", "tools/list"),
        ],
        big,
    );
    r.headers_mut()
        .insert("authorization", "Bearer admin".parse().unwrap());
    assert_eq!(send(&app, r).await.status, StatusCode::PAYLOAD_TOO_LARGE);
}

// ------------------------------------------------------------------ server notifications and subscriptions

/// Opens the GET stream of a handshake-era session.
async fn get_stream(app: &Router, path: &str, sid: &str) -> Body {
    let resp = app
        .clone()
        .oneshot(
            Request::get(path)
                .header("mcp-session-id", sid)
                .header("accept", "text/event-stream")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    resp.into_body()
}

/// Calls `poke` until a message matching `want` arrives on `body`
/// (subscriptions are set up asynchronously); that message.
async fn poke_until(
    body: &mut Body,
    mut poke: impl FnMut(),
    want: impl Fn(&Value) -> bool,
) -> Value {
    let mut text = String::new();
    for _ in 0..100 {
        poke();
        if let Ok(Some(Ok(frame))) =
            tokio::time::timeout(Duration::from_millis(100), body.frame()).await
        {
            if let Ok(d) = frame.into_data() {
                text.push_str(&String::from_utf8_lossy(&d));
                if let Some(m) = sse_messages(&text).into_iter().find(|m| want(m)) {
                    return m;
                }
            }
        }
    }
    panic!("never arrived; the stream carried: {text}");
}

/// Waits (real time, generously) until `cond` holds.
async fn eventually(what: &str, cond: impl Fn() -> bool) {
    for _ in 0..500 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{what}");
}

fn subscribe(path: &str, sid: &str, id: i64, method: &str, uri: &str) -> Request<Body> {
    legacy(
        path,
        sid,
        json!({"jsonrpc":"2.0","id":id,"method":method,"params":{"uri":uri}}),
    )
}

#[tokio::test]
async fn a_stateless_servers_list_changed_reaches_listeners_of_both_eras() {
    let fakes = Fakes::new();
    let fake = fakes.add("acme", "st", Protocol::Stateless);
    let (_g, app) = gateway(&fakes, GatewayConfig::default());
    let p = "/mcp/acme/st";
    // A stateless client's subscriptions/listen stream.
    let resp = app
        .clone()
        .oneshot(modern(
            p,
            json!("L1"),
            "subscriptions/listen",
            json!({"notifications": {"toolsListChanged": true}}),
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut listen = resp.into_body();
    let note = json!({"jsonrpc":"2.0","method":"notifications/tools/list_changed"});
    let m = poke_until(
        &mut listen,
        || {
            fake.emit(note.clone());
        },
        |m| m["method"] == "notifications/tools/list_changed",
    )
    .await;
    assert_eq!(m["params"]["_meta"][META_SUBSCRIPTION_ID], "L1");
    // The gateway keeps one upstream subscription, asking for what the server offers.
    let upstream = fake.last("subscriptions/listen").unwrap();
    assert_eq!(upstream["notifications"]["toolsListChanged"], true);
    assert_eq!(upstream["notifications"]["promptsListChanged"], true);

    // A handshake-era client's GET stream hears it too, without the
    // upstream's subscription id.
    let sid = initialize(&app, p, json!({})).await;
    let mut get = get_stream(&app, p, &sid).await;
    let m = poke_until(
        &mut get,
        || {
            fake.emit(note.clone());
        },
        |m| m["method"] == "notifications/tools/list_changed",
    )
    .await;
    assert!(m.pointer("/params/_meta").is_none(), "{m}");

    // Nobody listens: the upstream subscription is closed.
    drop(listen);
    drop(get);
    let d = Request::delete(p)
        .header("mcp-session-id", &sid)
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&app, d).await.status, StatusCode::NO_CONTENT);
    tokio::time::pause();
    for _ in 0..4 {
        tokio::time::advance(Duration::from_secs(6)).await;
        tokio::task::yield_now().await;
    }
    tokio::time::resume();
    eventually("the upstream listen was never cancelled", || {
        fake.listening.load(Ordering::SeqCst) == 0
    })
    .await;
}

#[tokio::test]
async fn resource_subscriptions_are_shared_released_and_sent_again_after_a_restart() {
    let fakes = Fakes::new();
    let fake = fakes.add("acme", "time", Protocol::Handshake);
    let (g, app) = gateway(&fakes, GatewayConfig::default());
    let p = "/mcp/acme/time";
    let s1 = initialize(&app, p, json!({})).await;
    let s2 = initialize(&app, p, json!({})).await;
    for (sid, id) in [(&s1, 1), (&s2, 2)] {
        let a = send(
            &app,
            subscribe(p, sid, id, "resources/subscribe", "mem://a"),
        )
        .await;
        assert_eq!(a.body["result"], json!({}), "{}", a.body);
    }
    // One upstream subscription for both clients.
    assert_eq!(fake.count("resources/subscribe"), 1);
    // One client leaving does not unsubscribe the other.
    let a = send(
        &app,
        subscribe(p, &s1, 3, "resources/unsubscribe", "mem://a"),
    )
    .await;
    assert_eq!(a.body["result"], json!({}));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(fake.count("resources/unsubscribe"), 0);
    // Only s2 hears updates of mem://a.
    let mut get1 = get_stream(&app, p, &s1).await;
    let mut get2 = get_stream(&app, p, &s2).await;
    let updated = json!({"jsonrpc":"2.0","method":"notifications/resources/updated","params":{"uri":"mem://a"}});
    poke_until(
        &mut get2,
        || {
            fake.emit(updated.clone());
        },
        |m| m["method"] == "notifications/resources/updated",
    )
    .await;
    assert!(
        tokio::time::timeout(Duration::from_millis(200), get1.frame())
            .await
            .is_err(),
        "an unsubscribed client got the update"
    );
    // The last subscriber's session ends: unsubscribed upstream.
    let d = Request::delete(p)
        .header("mcp-session-id", &s2)
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&app, d).await.status, StatusCode::NO_CONTENT);
    eventually(
        "the last subscriber left but nothing was unsubscribed",
        || fake.count("resources/unsubscribe") == 1,
    )
    .await;
    assert_eq!(
        fake.last("resources/unsubscribe").unwrap()["uri"],
        "mem://a"
    );

    // A subscription made on one server process is made again on the next.
    let a = send(&app, subscribe(p, &s1, 4, "resources/subscribe", "mem://b")).await;
    assert_eq!(a.body["result"], json!({}));
    let fresh = fakes.restart("acme", "time");
    eventually(
        "the subscription was not sent again after a restart",
        || {
            fresh
                .last("resources/subscribe")
                .is_some_and(|p| p["uri"] == "mem://b")
        },
    )
    .await;
    drop(get1);
    assert_eq!(g.sessions(), 1);
}

#[tokio::test]
async fn resource_subscriptions_of_a_stateless_server_ride_its_listen_stream() {
    let fakes = Fakes::new();
    let fake = fakes.add("acme", "st", Protocol::Stateless);
    let (_g, app) = gateway(&fakes, GatewayConfig::default());
    // Through the mesh endpoint: names are prefixed there.
    let p = "/mcp/acme";
    let sid = initialize(&app, p, json!({})).await;
    let a = send(
        &app,
        subscribe(p, &sid, 1, "resources/subscribe", "st__mem://a"),
    )
    .await;
    assert_eq!(a.body["result"], json!({}), "{}", a.body);
    // The stateless server has no resources/subscribe: the filter of the
    // gateway's listen stream carries the URI instead.
    assert_eq!(fake.count("resources/subscribe"), 0);
    eventually("no upstream listen carries the subscription", || {
        fake.last("subscriptions/listen")
            .is_some_and(|p| p["notifications"]["resourceSubscriptions"] == json!(["mem://a"]))
    })
    .await;
    let mut get = get_stream(&app, p, &sid).await;
    let m = poke_until(
        &mut get,
        || {
            fake.emit(json!({"jsonrpc":"2.0","method":"notifications/resources/updated","params":{"uri":"mem://a"}}));
        },
        |m| m["method"] == "notifications/resources/updated",
    )
    .await;
    assert_eq!(m["params"]["uri"], "st__mem://a");
    // Unsubscribing drops the URI from the upstream filter.
    let a = send(
        &app,
        subscribe(p, &sid, 2, "resources/unsubscribe", "st__mem://a"),
    )
    .await;
    assert_eq!(a.body["result"], json!({}));
    eventually("the URI stayed in the upstream filter", || {
        fake.last("subscriptions/listen").is_some_and(|p| {
            p["notifications"]["resourceSubscriptions"]
                .as_array()
                .is_none_or(|a| a.is_empty())
        })
    })
    .await;
}

// ------------------------------------------------------------------ Mcp-Param-* headers

/// A stateless `tools/call` of `route` with extra headers.
fn routed(path: &str, name: &str, args: Value, extra: &[(&str, &str)]) -> Request<Body> {
    let mut r = modern(
        path,
        json!(1),
        "tools/call",
        json!({"name": name, "arguments": args}),
    );
    for (k, v) in extra {
        r.headers_mut().append(
            axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            axum::http::HeaderValue::from_bytes(v.as_bytes()).unwrap(),
        );
    }
    r
}

#[tokio::test]
async fn param_headers_are_checked_against_the_arguments() {
    let fakes = Fakes::new();
    fakes.add("acme", "time", Protocol::Handshake);
    let (_g, app) = gateway(&fakes, GatewayConfig::default());
    let ok = |a: &Answer| {
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
        assert!(a.body["result"]["content"][0]["text"]
            .as_str()
            .unwrap()
            .starts_with("routed"));
    };
    let refused = |a: &Answer, what: &str| {
        assert_eq!(
            (a.status, a.body["error"]["code"].as_i64()),
            (StatusCode::BAD_REQUEST, Some(HEADER_MISMATCH)),
            "{what}: {}",
            a.body
        );
    };
    for p in ["/mcp/acme/time", "/mcp/acme"] {
        let tool = if p == "/mcp/acme" {
            "time__route"
        } else {
            "route"
        };
        let call = |args: Value, extra: &[(&str, &str)]| routed(p, tool, args, extra);
        // Plain, Base64 and case-insensitive names; integers compare as numbers.
        ok(&send(
            &app,
            call(
                json!({"region": "us-west1"}),
                &[("Mcp-Param-Region", "us-west1")],
            ),
        )
        .await);
        ok(&send(
            &app,
            call(
                json!({"region": "Hello"}),
                &[("mcp-param-region", "=?base64?SGVsbG8=?=")],
            ),
        )
        .await);
        ok(&send(
            &app,
            call(
                json!({"region": " padded "}),
                &[("Mcp-Param-Region", "=?base64?IHBhZGRlZCA=?=")],
            ),
        )
        .await);
        ok(&send(
            &app,
            call(json!({"level": 42}), &[("Mcp-Param-Level", "42.0")]),
        )
        .await);
        ok(&send(&app, call(json!({"on": true}), &[("Mcp-Param-On", "true")])).await);
        ok(&send(
            &app,
            call(
                json!({"nested": {"zone": "z1"}}),
                &[("Mcp-Param-Zone", "z1")],
            ),
        )
        .await);
        // Not in the body (or null): no header expected.
        ok(&send(&app, call(json!({"query": "q", "region": null}), &[])).await);
        // A value without the whole sentinel is literal.
        ok(&send(
            &app,
            call(
                json!({"region": "=?base64?SGVsbG8="}),
                &[("Mcp-Param-Region", "=?base64?SGVsbG8=")],
            ),
        )
        .await);
        // Annotations behind `items` are not recognized: nothing expected.
        ok(&send(&app, call(json!({"list": ["a"]}), &[])).await);

        refused(
            &send(&app, call(json!({"region": "us-west1"}), &[])).await,
            "missing header",
        );
        refused(
            &send(
                &app,
                call(json!({"region": "us-west1"}), &[("Mcp-Param-Region", "eu")]),
            )
            .await,
            "other value",
        );
        refused(
            &send(
                &app,
                call(
                    json!({"region": "Hello"}),
                    &[("Mcp-Param-Region", "=?base64?SGVsbG8?=")],
                ),
            )
            .await,
            "bad padding",
        );
        refused(
            &send(
                &app,
                call(
                    json!({"region": "Hello"}),
                    &[("Mcp-Param-Region", "=?base64?SGVs!!!bG8=?=")],
                ),
            )
            .await,
            "bad alphabet",
        );
        refused(
            &send(
                &app,
                call(json!({"region": "é"}), &[("Mcp-Param-Region", "\u{e9}")]),
            )
            .await,
            "raw non-ASCII",
        );
        refused(
            &send(
                &app,
                call(json!({"level": 42}), &[("Mcp-Param-Level", "43")]),
            )
            .await,
            "other number",
        );
        refused(
            &send(&app, call(json!({"on": true}), &[("Mcp-Param-On", "1")])).await,
            "boolean spelled otherwise",
        );
        refused(
            &send(&app, call(json!({}), &[("Mcp-Param-Region", "us-west1")])).await,
            "header without an argument",
        );
        refused(
            &send(
                &app,
                call(
                    json!({"region": "a"}),
                    &[("Mcp-Param-Region", "a"), ("Mcp-Param-Region", "a")],
                ),
            )
            .await,
            "repeated header",
        );
        // Headers the tool does not declare are ignored.
        ok(&send(
            &app,
            call(json!({"query": "q"}), &[("Mcp-Param-Other", "x")]),
        )
        .await);
    }
}

// ------------------------------------------------------------------ a human's time

#[tokio::test(start_paused = true)]
async fn a_call_waiting_on_a_human_is_bounded_by_the_hold_time_not_the_call_timeout() {
    let fakes = Fakes::new();
    fakes.add("acme", "time", Protocol::Handshake);
    *fakes.call_timeout.lock().unwrap() = Duration::from_secs(2);
    let config = GatewayConfig {
        held_ttl: Duration::from_secs(300),
        ..Default::default()
    };
    let (_g, app) = gateway(&fakes, config);
    let p = "/mcp/acme/time";

    // The server's own work still ends at the call timeout.
    let a = send(
        &app,
        modern(
            p,
            json!(1),
            "tools/call",
            json!({"name":"slow","arguments":{}}),
        ),
    )
    .await;
    assert_eq!(a.body["error"]["code"], UPSTREAM_TIMEOUT, "{}", a.body);

    // A stateless client takes a minute to answer an elicitation.
    let a = send(&app, ask(2, "sy", json!({"elicitation": {}}))).await;
    let r = &a.body["result"];
    assert_eq!(r["resultType"], "input_required", "{}", a.body);
    let key = r["inputRequests"]
        .as_object()
        .unwrap()
        .keys()
        .next()
        .unwrap()
        .clone();
    tokio::time::sleep(Duration::from_secs(60)).await;
    let mut retry = json!({"name":"ask","arguments":{"who":"sy"},"requestState": r["requestState"],
        "inputResponses": { key: {"action":"accept","content":{"name":"Sy"}} }});
    retry["_meta"] = meta(json!({"elicitation": {}}));
    let a = send(&app, modern(p, json!(3), "tools/call", retry)).await;
    assert_eq!(
        a.body["result"]["content"][0]["text"], "sy answered Sy",
        "{}",
        a.body
    );

    // So does a handshake-era client.
    let sid = initialize(&app, p, json!({"elicitation": {}})).await;
    let resp = app
        .clone()
        .oneshot(legacy(p, &sid, json!({"jsonrpc":"2.0","id":"h1","method":"tools/call","params":{"name":"ask","arguments":{"who":"hy"}}})))
        .await
        .unwrap();
    let mut body = resp.into_body();
    let mut text = String::new();
    let request = loop {
        let f = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        text.push_str(&String::from_utf8_lossy(&f.into_data().unwrap()));
        if let Some(m) = sse_messages(&text)
            .into_iter()
            .find(|m| m["method"] == "elicitation/create")
        {
            break m;
        }
    };
    tokio::time::sleep(Duration::from_secs(60)).await;
    let a = send(&app, legacy(p, &sid, json!({"jsonrpc":"2.0","id": request["id"],"result":{"action":"accept","content":{"name":"Hy"}}}))).await;
    assert_eq!(a.status, StatusCode::ACCEPTED);
    let rest = body.collect().await.unwrap().to_bytes();
    text.push_str(&String::from_utf8_lossy(&rest));
    let last = sse_messages(&text).pop().unwrap();
    assert_eq!(
        last["result"]["content"][0]["text"], "hy answered Hy",
        "{last}"
    );
}

#[tokio::test]
async fn one_mesh_cannot_take_every_session() {
    let fakes = Fakes::new();
    fakes.add("acme", "time", Protocol::Handshake);
    fakes.add("beta", "time", Protocol::Handshake);
    let config = GatewayConfig {
        max_sessions: 100,
        max_sessions_per_mesh: 4,
        ..Default::default()
    };
    let (g, app) = gateway(&fakes, config);
    for p in ["/mcp/acme/time", "/mcp/acme", "/mcp/acme/time", "/mcp/acme"] {
        initialize(&app, p, json!({})).await;
    }
    let init = json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{}}});
    let a = send(&app, raw("/mcp/acme", &[], init.to_string())).await;
    assert_eq!(
        (a.status, a.body["error"]["code"].as_i64()),
        (StatusCode::SERVICE_UNAVAILABLE, Some(GATEWAY_BUSY))
    );
    assert!(
        a.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("acme"),
        "{}",
        a.body
    );
    // Another mesh is not locked out.
    initialize(&app, "/mcp/beta/time", json!({})).await;
    assert_eq!(g.sessions(), 5);
}

#[tokio::test]
async fn a_handshake_server_gets_no_stateless_envelope_but_the_rest_of_meta() {
    let fakes = Fakes::new();
    let fake = fakes.add("acme", "time", Protocol::Handshake);
    let stateless = fakes.add("acme", "st", Protocol::Stateless);
    let (_g, app) = gateway(&fakes, GatewayConfig::default());
    let mut m = meta(json!({}));
    m["progressToken"] = json!("p1");
    m["traceparent"] = json!("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
    for (p, f) in [("/mcp/acme/time", &fake), ("/mcp/acme/st", &stateless)] {
        let a = send(
            &app,
            modern(
                p,
                json!(1),
                "tools/call",
                json!({"name":"echo","arguments":{"text":"x"},"_meta": m}),
            ),
        )
        .await;
        assert!(a.body["result"].is_object(), "{}", a.body);
        let sent = f.last("tools/call").unwrap();
        assert_eq!(sent["_meta"]["progressToken"], "p1", "{sent}");
        assert_eq!(sent["_meta"]["traceparent"], m["traceparent"], "{sent}");
        let envelope = sent["_meta"].get(META_PROTOCOL_VERSION).is_some();
        // Only the stateless server needs the envelope.
        assert_eq!(envelope, f.protocol == Protocol::Stateless, "{sent}");
    }
}
