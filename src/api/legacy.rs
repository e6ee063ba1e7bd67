//! The seed runner supervisor's routes (mesh `default`), so a broker written
//! for it works unchanged.
//!
//! As lenient as the seed was about shape: unknown body fields and query
//! parameters are ignored, `null` is taken as absent or empty, non-string env
//! values are stringified, an empty `?name=` lists everything. As strict as
//! `/v1` about safety: names, sources, paths, env keys and sizes go through
//! the same checks, and a wrong type is a 400 naming the field. Owns only the
//! translation of these bodies into supervisor calls; `/v1` stays strict.

use std::collections::{BTreeMap, HashMap};

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Map, Value};

use super::{ApiError, AppState, JsonBody};
use crate::config::{EnvValue, Runtime, ServiceSpec};
use crate::model::shown;
use crate::supervisor::{ErrorKind, ServiceKey, SupervisorError};

const MESH: &str = "default";
/// Lines `/logs` answers when `lines` is not given (the seed's default).
const DEFAULT_LINES: usize = 50;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/load", post(load))
        .route("/call", post(call))
        .route("/unload", post(unload))
        .route("/health", get(health))
        .route("/list", get(list))
        .route("/logs", get(logs))
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::BadRequest(msg.into())
}

/// A legacy body: a JSON object whose unknown fields are ignored.
struct Body(Map<String, Value>);

impl Body {
    fn parse(v: Value) -> Result<Self, ApiError> {
        match v {
            Value::Object(m) => Ok(Body(m)),
            _ => Err(bad("request body must be a JSON object")),
        }
    }

    /// A string field; absent, `null` and `""` are all "not given".
    fn opt_str(&self, field: &str) -> Result<Option<&str>, ApiError> {
        match self.0.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(bad(format!("field `{field}` must be a string"))),
        }
    }

    fn str(&self, field: &str) -> Result<&str, ApiError> {
        self.opt_str(field)?
            .ok_or_else(|| bad(format!("field `{field}` is required")))
    }

    fn key(&self) -> Result<ServiceKey, ApiError> {
        key(self.str("name")?)
    }

    /// `env`: absent or `null` is empty; numbers and booleans are
    /// stringified as the seed's child environment did; a `null` value is
    /// left out; `{"file": "/abs"}` is a secret file as on `/v1`.
    fn env(&self) -> Result<BTreeMap<String, EnvValue>, ApiError> {
        let map = match self.0.get("env") {
            None | Some(Value::Null) => return Ok(BTreeMap::new()),
            Some(Value::Object(m)) => m,
            Some(_) => return Err(bad("field `env` must be an object")),
        };
        let mut env = BTreeMap::new();
        for (k, v) in map {
            let value = match v {
                Value::Null => continue,
                Value::String(s) => EnvValue::Literal(s.clone()),
                Value::Number(n) => EnvValue::Literal(n.to_string()),
                Value::Bool(b) => EnvValue::Literal(b.to_string()),
                Value::Object(o) if o.len() == 1 && o.get("file").is_some_and(Value::is_string) => {
                    EnvValue::File {
                        file: o["file"].as_str().unwrap_or_default().into(),
                    }
                }
                _ => {
                    return Err(bad(format!(
                        "env `{}`: value must be a string, number, boolean or {{\"file\": \"/abs/path\"}}",
                        shown(k, 64)
                    )))
                }
            };
            env.insert(k.clone(), value);
        }
        Ok(env)
    }

    /// `command`: the program and its arguments, as on `/v1`.
    fn command(&self) -> Result<Option<Vec<String>>, ApiError> {
        let not_argv = || bad("field `command` must be an array of strings (argv)");
        match self.0.get("command") {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| v.as_str().map(str::to_owned).ok_or_else(not_argv))
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(_) => Err(not_argv()),
        }
    }

    fn runtime(&self) -> Result<Option<Runtime>, ApiError> {
        self.opt_str("runtime")?
            .map(|r| r.parse().map_err(|e| bad(format!("field `runtime` {e}"))))
            .transpose()
    }

    /// The source string of the seed's source fields; exactly one may be given.
    fn source(&self) -> Result<String, ApiError> {
        let path = self.opt_str("sourcePath")?;
        let git = self.opt_str("gitUrl")?;
        let branch = self.opt_str("gitBranch")?;
        let npx = self.opt_str("npxPackage")?;
        let uvx = self.opt_str("uvxPackage")?;
        let given = [path, git, npx, uvx].iter().filter(|g| g.is_some()).count();
        if given == 0 {
            return Err(bad(
                "one of sourcePath, gitUrl, npxPackage or uvxPackage is required",
            ));
        }
        if given > 1 {
            return Err(bad(
                "give only one of sourcePath, gitUrl, npxPackage or uvxPackage",
            ));
        }
        // The seed used gitBranch only with gitUrl and ignored it otherwise.
        Ok(match (path, git, npx, uvx) {
            (Some(p), ..) => format!("path:{p}"),
            (_, Some(u), ..) => match branch {
                Some(b) => format!("git:{u}#{b}"),
                None => format!("git:{u}"),
            },
            (_, _, Some(p), _) => format!("npm:{p}"),
            (.., Some(r)) => format!("pypi:{r}"),
            _ => unreachable!("one source is given"),
        })
    }
}

fn key(name: &str) -> Result<ServiceKey, ApiError> {
    ServiceKey::parse(MESH, name).map_err(|e| bad(e.to_string()))
}

async fn load(State(st): State<AppState>, JsonBody(body): JsonBody<Value>) -> Response {
    let result = async {
        let body = Body::parse(body)?;
        let key = body.key()?;
        let spec = ServiceSpec {
            source: body.source()?,
            command: body.command()?,
            env: body.env()?,
            runtime: body.runtime()?,
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

async fn call(
    State(st): State<AppState>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<Value>,
) -> Response {
    let parsed = (|| {
        let body = Body::parse(body)?;
        let key = body.key()?;
        let tool = body.str("tool")?.to_owned();
        let args = match body.0.get("args") {
            None | Some(Value::Null) => Value::Object(Map::new()),
            Some(v @ Value::Object(_)) => v.clone(),
            Some(_) => return Err(bad("field `args` must be a JSON object")),
        };
        super::v1::check_call(&tool, &args, None)?;
        Ok::<_, ApiError>((key, tool, args))
    })();
    let (key, tool, args) = match parsed {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let call = st.supervisor.call_raw(&key, &tool, args, None);
    match super::traced_call(&key, &tool, &headers, call).await {
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

async fn unload(
    State(st): State<AppState>,
    JsonBody(body): JsonBody<Value>,
) -> Result<Json<Value>, ApiError> {
    let key = Body::parse(body)?.key()?;
    st.supervisor.undeploy(&key).await?;
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

/// Query parameters, unknown ones ignored.
type Params = Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>;

fn params(q: Params) -> Result<HashMap<String, String>, ApiError> {
    q.map(|Query(q)| q).map_err(|e| bad(e.body_text()))
}

/// `name`, where an empty value means "not given", as it did for the seed.
fn name_param(q: &HashMap<String, String>) -> Option<&str> {
    q.get("name").map(String::as_str).filter(|n| !n.is_empty())
}

async fn list(State(st): State<AppState>, q: Params) -> Result<Json<Value>, ApiError> {
    let q = params(q)?;
    if let Some(name) = name_param(&q) {
        let svc = st.supervisor.get(&key(name)?)?;
        return Ok(Json(json!({"tools": svc.tools()})));
    }
    let all: Map<String, Value> = st
        .supervisor
        .list(Some(MESH))
        .into_iter()
        .map(|s| (s.name, json!(s.tools)))
        .collect();
    Ok(Json(Value::Object(all)))
}

/// `lines` read the way the seed's `parseInt` did: leading digits count; a
/// missing value is 50; zero, a negative number or no number means all.
fn lines_param(q: &HashMap<String, String>) -> usize {
    let Some(raw) = q.get("lines") else {
        return DEFAULT_LINES;
    };
    let digits: String = raw
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    // Too many digits to count is as good as "all".
    digits
        .parse::<usize>()
        .ok()
        .filter(|n| *n > 0)
        .unwrap_or(usize::MAX)
}

async fn logs(State(st): State<AppState>, q: Params) -> Result<Json<Value>, ApiError> {
    let q = params(q)?;
    let name = name_param(&q).ok_or_else(|| bad("query parameter `name` is required"))?;
    let svc = st.supervisor.get(&key(name)?)?;
    Ok(Json(json!({"lines": svc.logs.tail(lines_param(&q)).0})))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(v: Value) -> Body {
        Body::parse(v).unwrap()
    }

    #[test]
    fn env_is_as_lenient_as_the_seed() {
        let b = body(json!({"env": {"S": "x", "N": 5, "F": 1.5, "B": true, "Z": null}}));
        let env = b.env().unwrap();
        let lit = |k: &str| match &env[k] {
            EnvValue::Literal(s) => s.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            (lit("S"), lit("N"), lit("F"), lit("B")),
            ("x".into(), "5".into(), "1.5".into(), "true".into())
        );
        assert!(!env.contains_key("Z"), "a null value is left out");
        assert!(body(json!({"env": null})).env().unwrap().is_empty());
        assert!(body(json!({})).env().unwrap().is_empty());
        let file = body(json!({"env": {"K": {"file": "/s/k"}}})).env().unwrap();
        assert_eq!(
            file["K"],
            EnvValue::File {
                file: "/s/k".into()
            }
        );
        for bad in [
            json!({"env": {"K": [1]}}),
            json!({"env": {"K": {"x": 1}}}),
            json!({"env": "A=1"}),
        ] {
            let e = body(bad.clone()).env().unwrap_err();
            assert!(matches!(e, ApiError::BadRequest(_)), "{bad}: {e}");
        }
    }

    #[test]
    fn sources_follow_the_seed_fields() {
        let src = |v: Value| body(v).source();
        assert_eq!(src(json!({"sourcePath": "/srv/x"})).unwrap(), "path:/srv/x");
        assert_eq!(
            src(json!({"gitUrl": "https://h/r", "gitBranch": "main"})).unwrap(),
            "git:https://h/r#main"
        );
        assert_eq!(src(json!({"npxPackage": "pkg"})).unwrap(), "npm:pkg");
        assert_eq!(src(json!({"uvxPackage": "req"})).unwrap(), "pypi:req");
        // null and "" are "not given", as the seed's falsy checks had it.
        assert_eq!(
            src(json!({"sourcePath": "/srv/x", "gitUrl": null, "npxPackage": "", "gitBranch": "main"}))
                .unwrap(),
            "path:/srv/x"
        );
        assert!(src(json!({})).is_err());
        assert!(src(json!({"sourcePath": "/a", "npxPackage": "b"})).is_err());
        assert!(src(json!({"sourcePath": 5})).is_err());
    }

    #[test]
    fn command_is_an_argv() {
        assert_eq!(body(json!({})).command().unwrap(), None);
        assert_eq!(body(json!({"command": null})).command().unwrap(), None);
        assert_eq!(
            body(json!({"command": ["node", "x.js"]}))
                .command()
                .unwrap(),
            Some(vec!["node".to_owned(), "x.js".to_owned()])
        );
        assert!(body(json!({"command": "node x.js"})).command().is_err());
        assert!(body(json!({"command": ["node", 1]})).command().is_err());
    }

    #[test]
    fn lines_read_like_parse_int() {
        let q = |s: &str| HashMap::from([("lines".to_owned(), s.to_owned())]);
        assert_eq!(lines_param(&HashMap::new()), DEFAULT_LINES);
        assert_eq!(lines_param(&q("5")), 5);
        assert_eq!(lines_param(&q("7abc")), 7);
        assert_eq!(lines_param(&q("abc")), usize::MAX);
        assert_eq!(lines_param(&q("0")), usize::MAX);
        assert_eq!(lines_param(&q("-3")), usize::MAX);
        assert_eq!(lines_param(&q("99999999999999999999999")), usize::MAX);
    }

    #[test]
    fn bodies_must_be_objects_with_typed_fields() {
        assert!(Body::parse(json!([])).is_err());
        assert!(Body::parse(json!("x")).is_err());
        let b = body(json!({"name": 5, "extra": {"ignored": true}}));
        let e = b.key().unwrap_err();
        assert!(e.to_string().contains("`name`"), "{e}");
        let e = body(json!({})).key().unwrap_err();
        assert!(e.to_string().contains("required"), "{e}");
        assert!(body(json!({"name": "../x"})).key().is_err());
    }
}
