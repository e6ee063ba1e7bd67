//! The HTTP API: `/v1` and the seed-compatible legacy routes.
//!
//! Owns routing, authentication, body limits and the mapping of errors to
//! status codes. Every handler validates its input fully before calling the
//! supervisor, which it holds as its only dependency.

mod auth;
mod error;
mod legacy;
pub mod listen;
#[cfg(test)]
mod route_tests;
mod v1;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Request};
use axum::http::{header, StatusCode};
use axum::middleware;
use axum::response::IntoResponse;
use axum::Router;
use serde::de::DeserializeOwned;

pub use auth::{parse_mesh_tokens, MeshTokensError, Tokens};
pub use error::ApiError;
pub use listen::ServeConfig;

use crate::supervisor::Supervisor;

/// Default request body limit: 1 MiB.
pub const DEFAULT_BODY_LIMIT: usize = 1024 * 1024;

#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Bearer token every route but `/v1/health` requires, when set.
    pub token: Option<String>,
    /// `(mesh, token)` pairs from `--mesh-tokens-file`: each reaches only its mesh.
    pub mesh_tokens: Vec<(String, String)>,
    pub body_limit: usize,
    /// The MCP gateway's routes (`/mcp/…`), served behind the same auth,
    /// body limit and server hardening as the REST API.
    pub mcp: Option<Router>,
    /// Said by `/v1/health` to whoever asks: the operator chose to run
    /// without protection (`--insecure-no-auth` on a non-loopback address).
    pub warning: Option<String>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            token: None,
            mesh_tokens: Vec::new(),
            body_limit: DEFAULT_BODY_LIMIT,
            mcp: None,
            warning: None,
        }
    }
}

#[derive(Clone)]
pub struct AppState {
    pub supervisor: Arc<Supervisor>,
    tokens: Tokens,
    body_limit: usize,
    warning: Option<Arc<str>>,
}

pub fn router(supervisor: Arc<Supervisor>, config: ApiConfig) -> Router {
    let state = AppState {
        supervisor,
        tokens: Tokens::new(config.token, config.mesh_tokens),
        body_limit: config.body_limit,
        warning: config.warning.map(Arc::from),
    };
    let mut routes = Router::new()
        .merge(v1::routes())
        .merge(legacy::routes())
        .method_not_allowed_fallback(|method: axum::http::Method| async move {
            ApiError::MethodNotAllowed(method)
        });
    if let Some(mcp) = config.mcp {
        routes = routes.nest_service("/mcp", mcp);
    }
    routes
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .layer(middleware::from_fn_with_state(state.clone(), auth::auth))
        .layer(DefaultBodyLimit::max(config.body_limit))
        .with_state(state)
}

/// A JSON body parsed by serde_json directly, so errors name the field, and
/// an oversized body is a 413 with a JSON answer.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|r| {
            if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge(state.body_limit)
            } else {
                ApiError::BadRequest(r.body_text())
            }
        })?;
        parse_json(&bytes).map(JsonBody)
    }
}

pub(crate) fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::BadRequest(
            "request body is empty; expected JSON".into(),
        ));
    }
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
}

/// `{"result": <raw>}`: a tool's result passed on without re-encoding it.
pub(crate) fn result_response(raw: &serde_json::value::RawValue) -> axum::response::Response {
    let mut body = String::with_capacity(raw.get().len() + 12);
    body.push_str("{\"result\":");
    body.push_str(raw.get());
    body.push('}');
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// Runs one tool call in its span, continuing the caller's `traceparent`
/// (which reaches the server in `_meta` even when meshbox exports no spans).
pub(crate) async fn traced_call<F: std::future::Future>(
    key: &crate::supervisor::ServiceKey,
    tool: &str,
    headers: &axum::http::HeaderMap,
    call: F,
) -> F::Output {
    let span = tracing::debug_span!(
        "tools/call",
        otel.kind = "server",
        mesh = %key.mesh,
        service = %key.name,
        tool = %tool,
        outcome = tracing::field::Empty,
    );
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    crate::telemetry::traced(span, header, call).await
}

/// Serves `router` with the connection bounds of a [`ServeConfig`] (header,
/// body and idle timeouts, a cap on connections): the one entry for every
/// route meshbox serves.
pub use listen::serve;
