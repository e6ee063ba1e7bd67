//! Where a client's request goes: one service, or (mesh endpoint) the
//! service its prefixed name points at, or every running service of the mesh
//! for list requests, whose items come back prefixed.

use std::sync::Arc;

use futures_util::future::join_all;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::debug;

use super::bridge::{HumanWaits, MAX_HUMAN_WAITS};
use super::names;
use super::protocol::{self, rpc_error, ParamHeaders, INVALID_PARAMS, METHOD_NOT_FOUND};
use super::upstream::{
    CallOptions, ClientPeer, RpcError, ServerInfo, ServiceKey, Upstream, UpstreamError,
};
use super::Inner;
use crate::model::Protocol;

/// Which MCP endpoint a request came to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `/mcp/{mesh}/{name}`
    Service(ServiceKey),
    /// `/mcp/{mesh}`
    Mesh(String),
}

impl Endpoint {
    pub fn mesh(&self) -> &str {
        match self {
            Endpoint::Service(k) => &k.mesh,
            Endpoint::Mesh(m) => m,
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Service(k) => write!(f, "{k}"),
            Endpoint::Mesh(m) => write!(f, "{m}"),
        }
    }
}

/// What travels with one forwarded request.
#[derive(Clone, Default)]
pub struct CallCtx {
    pub progress: Option<mpsc::Sender<Value>>,
    pub peer: Option<Arc<dyn ClientPeer>>,
    /// A stateless `tools/call`'s `Mcp-Param-*` headers, checked against the
    /// arguments for the parameters the tool mirrors (SEP-2243).
    pub param_headers: Option<ParamHeaders>,
    /// The call's waits for its client's answers (with `peer`): they do not
    /// count against the call timeout.
    pub waits: Option<Arc<HumanWaits>>,
    /// The service's session, when the caller looked it up already.
    pub upstream: Option<(ServiceKey, Arc<dyn Upstream>)>,
}

/// Pages of one list a mesh endpoint follows per service, at most.
const MAX_PAGES: usize = 20;

/// List methods: the result key and the field that is prefixed.
fn list_shape(method: &str) -> Option<(&'static str, &'static str)> {
    match method {
        "tools/list" => Some(("tools", "name")),
        "prompts/list" => Some(("prompts", "name")),
        "resources/list" => Some(("resources", "uri")),
        "resources/templates/list" => Some(("resourceTemplates", "uriTemplate")),
        _ => None,
    }
}

impl Inner {
    /// The live upstream of a deployed service.
    pub(super) async fn upstream_of(
        &self,
        key: &ServiceKey,
    ) -> Result<Arc<dyn Upstream>, UpstreamError> {
        let wait = self
            .upstreams
            .call_timeout(key)
            .min(self.config.upstream_wait);
        self.upstreams.upstream(key, Instant::now() + wait).await
    }

    /// One request to one service.
    pub(super) async fn call_service(
        &self,
        key: &ServiceKey,
        method: &str,
        params: Option<Map<String, Value>>,
        ctx: CallCtx,
    ) -> Result<Value, UpstreamError> {
        let up = match ctx.upstream {
            Some((k, up)) if k == *key => up,
            _ => self.upstream_of(key).await?,
        };
        if let (Some(headers), Some(p)) = (&ctx.param_headers, &params) {
            check_param_headers(&*up, headers, p)?;
        }
        let mut params = params;
        if up.protocol() == Protocol::Handshake {
            if let Some(p) = params.as_mut() {
                strip_envelope(p);
            }
        }
        let budget = self.upstreams.call_timeout(key);
        let Some(waits) = ctx.waits else {
            let opts = CallOptions {
                timeout: budget,
                progress: ctx.progress,
                peer: ctx.peer,
                meta: None,
            };
            return up.request(method, params.map(Value::Object), opts).await;
        };
        // The session's deadline is only the backstop: `bounded` ends the
        // call once the server's own time is spent.
        let opts = CallOptions {
            timeout: budget + self.config.held_ttl * MAX_HUMAN_WAITS,
            progress: ctx.progress,
            peer: ctx.peer,
            meta: None,
        };
        waits
            .bounded(budget, up.request(method, params.map(Value::Object), opts))
            .await
    }

    /// The service an exposed resource URI belongs to, and its own URI.
    pub(super) fn resource_target(
        &self,
        ep: &Endpoint,
        uri: &str,
    ) -> Result<(ServiceKey, String), UpstreamError> {
        match ep {
            Endpoint::Service(k) => Ok((k.clone(), uri.to_owned())),
            Endpoint::Mesh(mesh) => self.route(mesh, uri),
        }
    }

    /// Checks a `tools/call`'s `Mcp-Param-*` headers without calling.
    pub(super) async fn check_tool_headers(
        &self,
        ep: &Endpoint,
        headers: &ParamHeaders,
        params: &Map<String, Value>,
    ) -> Result<(), UpstreamError> {
        let exposed = params
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let (key, name) = match ep {
            Endpoint::Service(k) => (k.clone(), exposed.to_owned()),
            Endpoint::Mesh(mesh) => self.route(mesh, exposed)?,
        };
        let mut own = params.clone();
        own.insert("name".into(), json!(name));
        check_param_headers(&*self.upstream_of(&key).await?, headers, &own)
    }

    /// One request to an endpoint: the service itself, or routed and
    /// rewritten for a mesh.
    pub(super) async fn call(
        &self,
        ep: &Endpoint,
        method: &str,
        params: Option<Map<String, Value>>,
        ctx: CallCtx,
    ) -> Result<Value, UpstreamError> {
        match ep {
            Endpoint::Service(key) => self.call_service(key, method, params, ctx).await,
            Endpoint::Mesh(mesh) => self.call_mesh(mesh, method, params, ctx).await,
        }
    }

    async fn call_mesh(
        &self,
        mesh: &str,
        method: &str,
        params: Option<Map<String, Value>>,
        ctx: CallCtx,
    ) -> Result<Value, UpstreamError> {
        if let Some((key, field)) = list_shape(method) {
            return Ok(self.aggregate(mesh, method, key, field, params).await);
        }
        let mut params = params.unwrap_or_default();
        let routed_field = match method {
            "tools/call" | "prompts/get" => Some("name"),
            "resources/read" => Some("uri"),
            _ => None,
        };
        if let Some(field) = routed_field {
            let exposed = params
                .get(field)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            let (key, inner) = self.route(mesh, &exposed)?;
            params.insert(field.into(), json!(inner));
            let mut result = self.call_service(&key, method, Some(params), ctx).await?;
            if method == "resources/read" {
                prefix_contents(&key.name, &mut result);
            }
            return Ok(result);
        }
        match method {
            "completion/complete" => {
                let r = params.get_mut("ref").and_then(Value::as_object_mut);
                let Some(r) = r else {
                    return Err(rpc(INVALID_PARAMS, "params.ref must be an object"));
                };
                let field = if r.contains_key("uri") { "uri" } else { "name" };
                let exposed = r
                    .get(field)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
                let (key, inner) = self.route(mesh, &exposed)?;
                r.insert(field.into(), json!(inner));
                self.call_service(&key, method, Some(params), ctx).await
            }
            "ping" => Ok(json!({})),
            "logging/setLevel" => {
                let calls = self.upstreams.running(mesh).into_iter().map(|name| {
                    let params = params.clone();
                    async move {
                        let key = ServiceKey {
                            mesh: mesh.to_owned(),
                            name,
                        };
                        let _ = self
                            .call_service(
                                &key,
                                "logging/setLevel",
                                Some(params),
                                CallCtx::default(),
                            )
                            .await;
                    }
                });
                join_all(calls).await;
                Ok(json!({}))
            }
            other => Err(rpc(
                METHOD_NOT_FOUND,
                format!(
                    "method `{}` is not available on a mesh endpoint",
                    crate::model::shown(other, 60)
                ),
            )),
        }
    }

    /// The running service and inner name an exposed mesh name points at.
    pub(super) fn route(
        &self,
        mesh: &str,
        exposed: &str,
    ) -> Result<(ServiceKey, String), UpstreamError> {
        let unknown = || {
            rpc(
                INVALID_PARAMS,
                format!(
                    "`{}` names no running service of mesh {mesh} (expected SERVICE__NAME)",
                    crate::model::shown(exposed, 80)
                ),
            )
        };
        let (svc, inner) = names::decode(exposed).ok_or_else(unknown)?;
        if !self.upstreams.running(mesh).contains(&svc) {
            return Err(unknown());
        }
        Ok((
            ServiceKey {
                mesh: mesh.to_owned(),
                name: svc,
            },
            inner.to_owned(),
        ))
    }

    /// Every running service's list, prefixed, in one page. A service that
    /// fails to answer is left out (and logged), never the whole list.
    async fn aggregate(
        &self,
        mesh: &str,
        method: &str,
        key: &str,
        field: &str,
        params: Option<Map<String, Value>>,
    ) -> Value {
        let base = params.map(|mut p| {
            p.remove("cursor");
            p
        });
        let per_service = self.upstreams.running(mesh).into_iter().map(|name| {
            let base = base.clone();
            async move {
                let skey = ServiceKey { mesh: mesh.to_owned(), name };
                let mut items = Vec::new();
                let mut cursor: Option<Value> = None;
                for _ in 0..MAX_PAGES {
                    let mut p = base.clone().unwrap_or_default();
                    if let Some(c) = cursor.take() {
                        p.insert("cursor".into(), c);
                    }
                    match self.call_service(&skey, method, Some(p), CallCtx::default()).await {
                        Ok(mut page) => {
                            if let Some(Value::Array(list)) = page.get_mut(key).map(Value::take) {
                                items.extend(list.into_iter().filter_map(|mut item| {
                                    let inner = item.get(field)?.as_str()?.to_owned();
                                    item[field] = json!(names::encode(&skey.name, &inner));
                                    Some(item)
                                }));
                            }
                            match page.get("nextCursor") {
                                Some(c) if !c.is_null() => cursor = Some(c.clone()),
                                _ => break,
                            }
                        }
                        Err(e) => {
                            debug!(service = %skey, method, error = %e, "left out of the mesh list");
                            break;
                        }
                    }
                }
                items
            }
        });
        let all: Vec<Value> = join_all(per_service).await.into_iter().flatten().collect();
        json!({ key: all })
    }

    /// What a service endpoint says about itself (or, for a mesh, the union).
    pub(super) async fn describe(&self, ep: &Endpoint) -> Result<ServerInfo, UpstreamError> {
        match ep {
            Endpoint::Service(key) => Ok(self.upstream_of(key).await?.info()),
            Endpoint::Mesh(mesh) => Ok(ServerInfo {
                discover: None,
                protocol: Protocol::Handshake,
                protocol_version: protocol::LEGACY_VERSIONS[0].into(),
                server_info: json!({ "name": format!("meshbox mesh {mesh}"), "version": env!("CARGO_PKG_VERSION") }),
                capabilities: json!({
                    "tools": { "listChanged": true },
                    "prompts": { "listChanged": true },
                    "resources": { "listChanged": true, "subscribe": true },
                    "completions": {},
                    "logging": {}
                }),
                instructions: Some(format!(
                    "Tools, prompts and resources of the services of mesh {mesh}, each named SERVICE__NAME."
                )),
            }),
        }
    }
}

/// Drops a stateless client's per-request envelope (protocol version,
/// capabilities, client info) from `_meta`: a handshake-era server
/// negotiated its version in `initialize` and has no use for it.
fn strip_envelope(params: &mut Map<String, Value>) {
    let Some(Value::Object(meta)) = params.get_mut("_meta") else {
        return;
    };
    for k in [
        protocol::META_PROTOCOL_VERSION,
        protocol::META_CLIENT_CAPABILITIES,
        protocol::META_CLIENT_INFO,
    ] {
        meta.remove(k);
    }
    if meta.is_empty() {
        params.remove("_meta");
    }
}

/// Checks a `tools/call`'s `Mcp-Param-*` headers against the definition of
/// the tool on `up` (an unknown tool declares nothing; the server decides).
pub(super) fn check_param_headers(
    up: &dyn Upstream,
    headers: &ParamHeaders,
    params: &Map<String, Value>,
) -> Result<(), UpstreamError> {
    let Some(name) = params.get("name").and_then(Value::as_str) else {
        return Ok(());
    };
    let tools = up.tools();
    match tools
        .iter()
        .find(|t| t.get("name").and_then(Value::as_str) == Some(name))
    {
        Some(tool) => headers
            .check(tool, params.get("arguments"))
            .map_err(UpstreamError::Rpc),
        None => Ok(()),
    }
}

/// Prefixes `contents[].uri` of a `resources/read` result.
fn prefix_contents(service: &str, result: &mut Value) {
    if let Some(Value::Array(contents)) = result.get_mut("contents") {
        for c in contents {
            if let Some(uri) = c.get("uri").and_then(Value::as_str).map(str::to_owned) {
                c["uri"] = json!(names::encode(service, &uri));
            }
        }
    }
}

pub(super) fn rpc(code: i64, message: impl Into<String>) -> UpstreamError {
    UpstreamError::Rpc(rpc_error(code, message))
}

/// The JSON-RPC error a client sees for a failed upstream call.
pub(super) fn to_rpc_error(e: &UpstreamError) -> RpcError {
    use super::protocol::{GATEWAY_BUSY, UPSTREAM_TIMEOUT, UPSTREAM_UNAVAILABLE};
    match e {
        UpstreamError::Rpc(r) => r.clone(),
        UpstreamError::Timeout(_) => rpc_error(UPSTREAM_TIMEOUT, e.to_string()),
        UpstreamError::NotFound { .. } | UpstreamError::Unavailable { .. } => {
            rpc_error(UPSTREAM_UNAVAILABLE, e.to_string())
        }
        UpstreamError::Busy { .. } => rpc_error(GATEWAY_BUSY, e.to_string()),
        UpstreamError::Protocol(_) => rpc_error(protocol::INTERNAL_ERROR, e.to_string()),
    }
}
