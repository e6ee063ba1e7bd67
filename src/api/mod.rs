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

use std::future::Future;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Request};
use axum::http::{header, StatusCode};
use axum::middleware;
use axum::response::IntoResponse;
use axum::Router;
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;

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

/// Serves `router` on `listener` until `shutdown` resolves, with the
/// connection bounds of `config` (header, body and idle timeouts, a cap on
/// connections): the one entry for every route meshbox serves.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    config: ServeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    listen::serve(listener, router, config, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::{Method, Request as HttpRequest};
    use http_body_util::BodyExt;
    use serde_json::{json, Value};
    use tower::ServiceExt;

    use crate::orchestrator::process::{ProcessBackend, ProcessConfig};
    use crate::supervisor::SupervisorConfig;

    fn app(config: ApiConfig) -> (Router, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let backend = Arc::new(ProcessBackend::new(ProcessConfig {
            cgroups: false,
            ..Default::default()
        }));
        let sup = Supervisor::new(backend, SupervisorConfig::new(dir.path().to_path_buf()));
        (router(Arc::new(sup), config), dir)
    }

    async fn send(
        app: &Router,
        method: Method,
        uri: &str,
        body: Option<&str>,
        token: Option<&str>,
    ) -> (StatusCode, Value) {
        let mut req = HttpRequest::builder().method(method).uri(uri);
        if let Some(t) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = req
            .body(body.map_or_else(Body::empty, |b| Body::from(b.to_owned())))
            .unwrap();
        let resp = app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let v = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| panic!("{uri}: not JSON: {:?}", String::from_utf8_lossy(&bytes)));
        (status, v)
    }

    #[tokio::test]
    async fn wrong_methods_and_unknown_routes_answer_json() {
        let (app, _dir) = app(ApiConfig::default());
        for (m, uri) in [
            (Method::GET, "/load"),
            (Method::POST, "/health"),
            (Method::DELETE, "/list"),
            (Method::POST, "/v1/health"),
            (Method::PATCH, "/v1/meshes/m/services/s"),
        ] {
            let (code, v) = send(&app, m.clone(), uri, None, None).await;
            assert_eq!(code, StatusCode::METHOD_NOT_ALLOWED, "{m} {uri}");
            assert!(v["error"].as_str().unwrap().contains(m.as_str()), "{v}");
        }
        let (code, v) = send(&app, Method::GET, "/nope", None, None).await;
        assert_eq!(code, StatusCode::NOT_FOUND);
        assert!(v["error"].is_string(), "{v}");
    }

    #[tokio::test]
    async fn health_carries_the_operators_warning() {
        let (plain, _d1) = app(ApiConfig::default());
        let (_, v) = send(&plain, Method::GET, "/v1/health", None, None).await;
        assert!(v.get("warning").is_none(), "{v}");
        let (warned, _d2) = app(ApiConfig {
            warning: Some("no authentication".into()),
            ..Default::default()
        });
        let (code, v) = send(&warned, Method::GET, "/v1/health", None, None).await;
        assert_eq!(code, StatusCode::OK);
        assert_eq!(v["warning"], "no authentication");
        assert_eq!(v["ok"], true);
    }

    #[tokio::test]
    async fn meshes_list_is_empty_then_guarded_by_the_token() {
        let (app, _dir) = app(ApiConfig {
            token: Some("t0k".into()),
            ..Default::default()
        });
        let (code, _) = send(&app, Method::GET, "/v1/meshes", None, None).await;
        assert_eq!(code, StatusCode::UNAUTHORIZED);
        let (code, v) = send(&app, Method::GET, "/v1/meshes", None, Some("t0k")).await;
        assert_eq!((code, v), (StatusCode::OK, json!({"meshes": []})));
        // Legacy routes need the token too when one is set.
        let (code, _) = send(&app, Method::GET, "/health", None, None).await;
        assert_eq!(code, StatusCode::UNAUTHORIZED);
    }

    #[tokio::test]
    async fn legacy_routes_ignore_unknown_shape_but_not_bad_input() {
        let (app, _dir) = app(ApiConfig::default());
        // Unknown query parameters and an empty name: everything, as the seed did.
        let (code, v) = send(&app, Method::GET, "/list?name=&meshId=m", None, None).await;
        assert_eq!((code, v), (StatusCode::OK, json!({})));
        let (code, v) = send(&app, Method::GET, "/health?meshId=m", None, None).await;
        assert_eq!(
            (code, v),
            (StatusCode::OK, json!({"ok": true, "services": []}))
        );
        let (code, _) = send(&app, Method::GET, "/logs?name=nope&x=1", None, None).await;
        assert_eq!(code, StatusCode::NOT_FOUND);
        // Unknown fields are ignored; the service simply is not there.
        let (code, _) = send(
            &app,
            Method::POST,
            "/call",
            Some(r#"{"name":"nope","tool":"t","args":null,"meshId":"m"}"#),
            None,
        )
        .await;
        assert_eq!(code, StatusCode::NOT_FOUND);
        let (code, _) = send(
            &app,
            Method::POST,
            "/unload",
            Some(r#"{"name":"nope","meshId":"m"}"#),
            None,
        )
        .await;
        assert_eq!(code, StatusCode::NOT_FOUND);
        // Safety stays strict, and every refusal names what is wrong.
        for (uri, body, needle) in [
            (
                "/load",
                r#"{"name":"../x","sourcePath":"/tmp"}"#,
                "invalid service name",
            ),
            ("/load", r#"{"name":"x","sourcePath":"rel"}"#, "absolute"),
            (
                "/load",
                r#"{"name":"x","sourcePath":"/tmp","env":{"A B":"v"}}"#,
                "A B",
            ),
            (
                "/load",
                r#"{"name":"x","sourcePath":"/tmp","env":{"K":[1]}}"#,
                "env `K`",
            ),
            (
                "/load",
                r#"{"name":"x","sourcePath":"/tmp","command":"sh -c x"}"#,
                "command",
            ),
            (
                "/load",
                r#"{"name":"x","sourcePath":"/tmp","runtime":"ruby"}"#,
                "runtime",
            ),
            (
                "/load",
                r#"{"name":"x","gitUrl":"ext::sh -c id"}"#,
                "invalid source",
            ),
            ("/load", r#"{"name":"x"}"#, "sourcePath"),
            ("/load", r#"[1]"#, "object"),
            ("/load", "not json", "invalid JSON"),
            ("/call", r#"{"name":"x","tool":"t","args":"s"}"#, "args"),
            ("/call", r#"{"name":"x","args":{}}"#, "`tool`"),
            ("/unload", r#"{"name":7}"#, "`name`"),
            ("/logs", "", "`name`"),
        ] {
            let (m, b) = if uri == "/logs" {
                (Method::GET, None)
            } else {
                (Method::POST, Some(body))
            };
            let (code, v) = send(&app, m, uri, b, None).await;
            assert_eq!(code, StatusCode::BAD_REQUEST, "{uri} {body}: {v}");
            let e = v["error"].as_str().unwrap();
            assert!(e.contains(needle), "{uri} {body}: {e}");
        }
        let (_, v) = send(&app, Method::GET, "/v1/health", None, None).await;
        assert_eq!(v["services"], 0, "nothing was deployed");
    }
}
