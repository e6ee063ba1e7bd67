//! The seed runner supervisor's routes (mesh `default`), so a broker written
//! for it works unchanged. They validate exactly as `/v1` does.

use std::collections::BTreeMap;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{ApiError, AppState, JsonBody};
use crate::config::{EnvValue, Runtime, ServiceSpec};
use crate::supervisor::{ErrorKind, ServiceKey, SupervisorError};

const MESH: &str = "default";

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/load", post(load))
        .route("/call", post(call))
        .route("/unload", post(unload))
        .route("/health", get(health))
        .route("/list", get(list))
        .route("/logs", get(logs))
}

fn key(name: &str) -> Result<ServiceKey, ApiError> {
    ServiceKey::parse(MESH, name).map_err(|e| ApiError::BadRequest(e.to_string()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct LoadBody {
    name: String,
    source_path: Option<String>,
    git_url: Option<String>,
    git_branch: Option<String>,
    npx_package: Option<String>,
    uvx_package: Option<String>,
    #[serde(default)]
    env: BTreeMap<String, EnvValue>,
    runtime: Option<Runtime>,
}

impl LoadBody {
    fn source(&self) -> Result<String, ApiError> {
        let given = [
            self.source_path.is_some(),
            self.git_url.is_some(),
            self.npx_package.is_some(),
            self.uvx_package.is_some(),
        ];
        match given.iter().filter(|g| **g).count() {
            0 => {
                return Err(ApiError::BadRequest(
                    "one of sourcePath, gitUrl, npxPackage or uvxPackage is required".into(),
                ))
            }
            1 => {}
            _ => {
                return Err(ApiError::BadRequest(
                    "give only one of sourcePath, gitUrl, npxPackage or uvxPackage".into(),
                ))
            }
        }
        if self.git_branch.is_some() && self.git_url.is_none() {
            return Err(ApiError::BadRequest("gitBranch needs gitUrl".into()));
        }
        Ok(if let Some(p) = &self.source_path {
            format!("path:{p}")
        } else if let Some(u) = &self.git_url {
            match &self.git_branch {
                Some(b) => format!("git:{u}#{b}"),
                None => format!("git:{u}"),
            }
        } else if let Some(p) = &self.npx_package {
            format!("npm:{p}")
        } else {
            format!("pypi:{}", self.uvx_package.as_deref().unwrap_or_default())
        })
    }
}

async fn load(State(st): State<AppState>, JsonBody(body): JsonBody<LoadBody>) -> Response {
    let result = async {
        let key = key(&body.name)?;
        let spec = ServiceSpec {
            source: body.source()?,
            env: body.env.clone(),
            runtime: body.runtime,
            ..Default::default()
        };
        Ok::<_, ApiError>(st.supervisor.deploy(key, spec).await?)
    }
    .await;
    match result {
        Ok(status) => Json(json!({"status": "running", "tools": status.tools})).into_response(),
        // The seed answered start failures with 500 {error, logs}.
        Err(e @ ApiError::Supervisor(SupervisorError::StartFailed { .. })) => {
            (StatusCode::INTERNAL_SERVER_ERROR, Json(e.body())).into_response()
        }
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CallBody {
    name: String,
    tool: String,
    #[serde(default = "empty_object")]
    args: Value,
}

fn empty_object() -> Value {
    Value::Object(Default::default())
}

async fn call(State(st): State<AppState>, JsonBody(body): JsonBody<CallBody>) -> Response {
    let key = match key(&body.name) {
        Ok(k) => k,
        Err(e) => return e.into_response(),
    };
    if let Err(e) = super::v1::check_call(&body.tool, &body.args, None) {
        return e.into_response();
    }
    match st
        .supervisor
        .call_raw(&key, &body.tool, body.args, None)
        .await
    {
        Ok(result) => super::result_response(&result),
        // The seed answered call failures with 200 {error}; keep that.
        Err(e @ SupervisorError::Call { .. }) => {
            let msg = match (e.kind(), e.upstream_message()) {
                (ErrorKind::Timeout, _) => "timeout".to_owned(),
                (_, Some(m)) => m.to_owned(),
                _ => crate::error_chain(&e),
            };
            Json(json!({ "error": msg })).into_response()
        }
        Err(e) => ApiError::from(e).into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UnloadBody {
    name: String,
}

async fn unload(
    State(st): State<AppState>,
    JsonBody(body): JsonBody<UnloadBody>,
) -> Result<Json<Value>, ApiError> {
    st.supervisor.undeploy(&key(&body.name)?).await?;
    Ok(Json(json!({"ok": true})))
}

async fn health(State(st): State<AppState>) -> Json<Value> {
    let services: Vec<Value> = st
        .supervisor
        .list(Some(MESH))
        .into_iter()
        .map(|s| {
            json!({
                "name": s.name,
                "status": s.status,
                "pid": s.pid,
                "tools": s.tools.len(),
                "restarts": s.restarts,
            })
        })
        .collect();
    Json(json!({"ok": true, "services": services}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NameQuery {
    name: Option<String>,
    lines: Option<usize>,
}

type QueryResult = Result<Query<NameQuery>, axum::extract::rejection::QueryRejection>;

async fn list(State(st): State<AppState>, q: QueryResult) -> Result<Json<Value>, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    if let Some(name) = q.name {
        let svc = st.supervisor.get(&key(&name)?)?;
        return Ok(Json(json!({"tools": svc.tools()})));
    }
    let all: serde_json::Map<String, Value> = st
        .supervisor
        .list(Some(MESH))
        .into_iter()
        .map(|s| (s.name, json!(s.tools)))
        .collect();
    Ok(Json(Value::Object(all)))
}

async fn logs(State(st): State<AppState>, q: QueryResult) -> Result<Json<Value>, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let name = q
        .name
        .ok_or_else(|| ApiError::BadRequest("query parameter `name` is required".into()))?;
    let svc = st.supervisor.get(&key(&name)?)?;
    Ok(Json(
        json!({"lines": svc.logs.tail(q.lines.unwrap_or(50)).0}),
    ))
}
