//! `/v1` routes: the contract of DESIGN.md.

use std::time::Duration;

use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{ApiError, AppState, JsonBody};
use crate::config::{validate_name, ServiceSpec};
use crate::supervisor::ServiceKey;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/meshes", get(meshes))
        .route("/metrics", get(metrics))
        .route("/v1/meshes/{mesh}/services", get(list))
        .route(
            "/v1/meshes/{mesh}/services/{name}",
            get(status).put(deploy).delete(undeploy),
        )
        .route("/v1/meshes/{mesh}/services/{name}/restart", post(restart))
        .route("/v1/meshes/{mesh}/services/{name}/tools", get(tools))
        .route("/v1/meshes/{mesh}/services/{name}/call", post(call))
        .route("/v1/meshes/{mesh}/services/{name}/logs", get(logs))
}

/// `{mesh}/services/{name}` from the path, validated.
pub struct Key(pub ServiceKey);

impl<S: Send + Sync> FromRequestParts<S> for Key {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path((mesh, name)) = Path::<(String, String)>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::BadRequest(e.body_text()))?;
        Ok(Key(
            ServiceKey::parse(&mesh, &name).map_err(|e| ApiError::BadRequest(e.to_string()))?
        ))
    }
}

async fn health(State(st): State<AppState>) -> Json<Value> {
    let mut v = json!({
        "ok": true,
        "version": env!("CARGO_PKG_VERSION"),
        "backend": st.supervisor.backend(),
        "services": st.supervisor.len(),
    });
    if let Some(w) = &st.warning {
        v["warning"] = json!(w.as_ref());
    }
    Json(v)
}

/// Every mesh with at least one service, and how many it has.
async fn meshes(State(st): State<AppState>) -> Json<Value> {
    let meshes: Vec<Value> = st
        .supervisor
        .meshes()
        .into_iter()
        .map(|(name, services)| json!({ "name": name, "services": services }))
        .collect();
    Json(json!({ "meshes": meshes }))
}

/// The Prometheus exposition, with usage sampled now.
async fn metrics(State(st): State<AppState>) -> Result<axum::response::Response, ApiError> {
    let m = st.supervisor.metrics();
    if !m.is_enabled() {
        return Err(ApiError::NotFound(
            "metrics are turned off (serve --no-metrics)".into(),
        ));
    }
    st.supervisor.sample_usage().await;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            crate::metrics::CONTENT_TYPE,
        )],
        m.encode(),
    )
        .into_response())
}

async fn list(
    State(st): State<AppState>,
    mesh: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let Path(mesh) = mesh.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    validate_name("mesh", &mesh).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    Ok(Json(json!({ "services": st.supervisor.list(Some(&mesh)) })))
}

async fn status(State(st): State<AppState>, Key(key): Key) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(st.supervisor.get(&key)?.status()))
}

async fn deploy(
    State(st): State<AppState>,
    principal: Option<axum::Extension<crate::model::Principal>>,
    Key(key): Key,
    JsonBody(spec): JsonBody<ServiceSpec>,
) -> Result<impl IntoResponse, ApiError> {
    // The auth layer always sets it; without one the caller is the operator.
    let principal = principal.map_or(crate::model::Principal::Open, |p| p.0);
    Ok(Json(st.supervisor.deploy_as(&principal, key, spec).await?))
}

async fn undeploy(State(st): State<AppState>, Key(key): Key) -> Result<StatusCode, ApiError> {
    st.supervisor.undeploy(&key).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn restart(State(st): State<AppState>, Key(key): Key) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(st.supervisor.restart(&key).await?))
}

async fn tools(State(st): State<AppState>, Key(key): Key) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({ "tools": st.supervisor.get(&key)?.tools() })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CallBody {
    tool: String,
    #[serde(default = "empty_object")]
    arguments: Value,
    #[serde(default)]
    timeout_ms: Option<u64>,
}

fn empty_object() -> Value {
    Value::Object(Default::default())
}

pub(crate) fn check_call(
    tool: &str,
    arguments: &Value,
    timeout_ms: Option<u64>,
) -> Result<(), ApiError> {
    if tool.is_empty() || tool.len() > 256 || tool.chars().any(char::is_control) {
        return Err(ApiError::BadRequest(
            "field `tool` must be 1 to 256 characters without control characters".into(),
        ));
    }
    if !arguments.is_object() {
        return Err(ApiError::BadRequest(
            "field `arguments` must be a JSON object".into(),
        ));
    }
    if let Some(t) = timeout_ms {
        if !(1..=3_600_000).contains(&t) {
            return Err(ApiError::BadRequest(
                "field `timeout_ms` must be between 1 and 3600000".into(),
            ));
        }
    }
    Ok(())
}

async fn call(
    State(st): State<AppState>,
    Key(key): Key,
    headers: HeaderMap,
    JsonBody(body): JsonBody<CallBody>,
) -> Result<axum::response::Response, ApiError> {
    check_call(&body.tool, &body.arguments, body.timeout_ms)?;
    let call = st.supervisor.call_raw(
        &key,
        &body.tool,
        body.arguments,
        body.timeout_ms.map(Duration::from_millis),
    );
    let result = super::traced_call(&key, &body.tool, &headers, call).await?;
    Ok(super::result_response(&result))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LogsQuery {
    lines: Option<usize>,
    /// Sequence number from a previous answer's `next`: only newer lines.
    since: Option<u64>,
}

async fn logs(
    State(st): State<AppState>,
    Key(key): Key,
    q: Result<Query<LogsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let svc = st.supervisor.get(&key)?;
    let n = q.lines.unwrap_or(100);
    let (mut lines, next) = match q.since {
        Some(s) => svc.logs.since(s),
        None => svc.logs.tail(n),
    };
    if lines.len() > n {
        lines.drain(..lines.len() - n);
    }
    Ok(Json(json!({ "lines": lines, "next": next })))
}
