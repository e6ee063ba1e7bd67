//! The `/v1` routes through `Router::oneshot`, over the recording fake
//! backend: status codes, error bodies, auth, and that bad input changes
//! nothing.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

use super::{router, ApiConfig};
use crate::orchestrator::fake::{Fake, Record, Script};
use crate::supervisor::{Supervisor, SupervisorConfig};

struct App {
    router: axum::Router,
    fake: Arc<Fake>,
    sup: Arc<Supervisor>,
    dir: tempfile::TempDir,
}

fn app_with(config: ApiConfig) -> App {
    let fake = Fake::new(Script::Healthy);
    let dir = tempfile::tempdir().unwrap();
    let sup = Arc::new(Supervisor::new(
        fake.clone(),
        SupervisorConfig::new(dir.path().to_path_buf()),
    ));
    App {
        router: router(sup.clone(), config),
        fake,
        sup,
        dir,
    }
}

fn app() -> App {
    app_with(ApiConfig::default())
}

async fn send(
    app: &App,
    method: Method,
    path: &str,
    body: Option<Value>,
    token: Option<&str>,
) -> (StatusCode, Value) {
    let mut req = Request::builder().method(method).uri(path);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let body = match body {
        Some(b) => {
            req = req.header("content-type", "application/json");
            Body::from(b.to_string())
        }
        None => Body::empty(),
    };
    let resp = app
        .router
        .clone()
        .oneshot(req.body(body).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let v = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap_or_else(|_| json!(String::from_utf8_lossy(&bytes)))
    };
    (status, v)
}

fn spec(app: &App) -> Value {
    json!({"source": format!("path:{}", app.dir.path().display()), "command": ["fake-server"]})
}

#[tokio::test]
async fn deploy_call_status_logs_and_undeploy() {
    let a = app();
    let (code, st) = send(
        &a,
        Method::PUT,
        "/v1/meshes/m/services/s",
        Some(spec(&a)),
        None,
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{st}");
    assert_eq!(
        (st["status"].clone(), st["backend"].clone()),
        (json!("running"), json!("fake"))
    );
    let (code, r) = send(
        &a,
        Method::POST,
        "/v1/meshes/m/services/s/call",
        Some(json!({"tool": "t", "arguments": {}})),
        None,
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{r}");
    assert_eq!(r["result"]["content"][0]["text"], "ok");
    let (code, l) = send(&a, Method::GET, "/v1/meshes/m/services", None, None).await;
    assert_eq!(
        (code, l["services"].as_array().unwrap().len()),
        (StatusCode::OK, 1)
    );
    let (code, t) = send(&a, Method::GET, "/v1/meshes/m/services/s/tools", None, None).await;
    assert_eq!(
        (code, t["tools"][0]["name"].clone()),
        (StatusCode::OK, json!("t"))
    );
    let (code, logs) = send(
        &a,
        Method::GET,
        "/v1/meshes/m/services/s/logs?lines=5",
        None,
        None,
    )
    .await;
    assert_eq!(code, StatusCode::OK);
    assert!(logs["lines"].is_array());
    let (code, _) = send(&a, Method::DELETE, "/v1/meshes/m/services/s", None, None).await;
    assert_eq!(code, StatusCode::NO_CONTENT);
    let (code, e) = send(&a, Method::GET, "/v1/meshes/m/services/s", None, None).await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    assert!(e["error"].as_str().unwrap().contains("m/s"), "{e}");
    let (code, _) = send(&a, Method::DELETE, "/v1/meshes/m/services/s", None, None).await;
    assert_eq!(code, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn bad_input_is_a_4xx_naming_the_problem_and_changes_nothing() {
    let a = app();
    let cases: Vec<(Method, &str, Option<Value>, StatusCode, &str)> = vec![
        (
            Method::PUT,
            "/v1/meshes/bad%20name/services/s",
            Some(spec(&a)),
            StatusCode::BAD_REQUEST,
            "",
        ),
        (
            Method::PUT,
            "/v1/meshes/m/services/-s",
            Some(spec(&a)),
            StatusCode::BAD_REQUEST,
            "service name",
        ),
        (
            Method::PUT,
            "/v1/meshes/m/services/s",
            Some(json!({"source": "npm:x", "bogus": 1})),
            StatusCode::BAD_REQUEST,
            "bogus",
        ),
        (
            Method::PUT,
            "/v1/meshes/m/services/s",
            Some(json!({"source": "npm:x", "memory_mb": 1})),
            StatusCode::BAD_REQUEST,
            "memory_mb",
        ),
        (
            Method::PUT,
            "/v1/meshes/m/services/s",
            Some(json!({"source": "git:ext::sh"})),
            StatusCode::BAD_REQUEST,
            "git",
        ),
        (
            Method::PUT,
            "/v1/meshes/m/services/s",
            None,
            StatusCode::BAD_REQUEST,
            "empty",
        ),
        (
            Method::PUT,
            "/v1/meshes/m/services/s",
            Some(json!({"source": "image:x"})),
            StatusCode::BAD_REQUEST,
            "image",
        ),
        (
            Method::POST,
            "/v1/meshes/m/services/s/call",
            Some(json!({"tool": ""})),
            StatusCode::BAD_REQUEST,
            "tool",
        ),
        (
            Method::POST,
            "/v1/meshes/m/services/s/call",
            Some(json!({"tool": "t", "arguments": []})),
            StatusCode::BAD_REQUEST,
            "arguments",
        ),
        (
            Method::POST,
            "/v1/meshes/m/services/s/call",
            Some(json!({"tool": "t", "timeout_ms": 0})),
            StatusCode::BAD_REQUEST,
            "timeout_ms",
        ),
        (
            Method::POST,
            "/v1/meshes/m/services/nope/call",
            Some(json!({"tool": "t"})),
            StatusCode::NOT_FOUND,
            "not found",
        ),
        (
            Method::GET,
            "/v1/meshes/m/services/s/logs?lines=x",
            None,
            StatusCode::BAD_REQUEST,
            "",
        ),
        (
            Method::GET,
            "/v1/nothing-here",
            None,
            StatusCode::NOT_FOUND,
            "no such route",
        ),
    ];
    for (method, path, body, want, mentions) in cases {
        let (code, e) = send(&a, method.clone(), path, body, None).await;
        assert_eq!(code, want, "{method} {path}: {e}");
        let msg = e["error"].as_str().unwrap_or_default().to_lowercase();
        assert!(
            msg.contains(mentions),
            "{method} {path}: `{msg}` should mention `{mentions}`"
        );
    }
    assert!(a.sup.is_empty(), "nothing registered");
    assert_eq!(
        a.fake.count(|r| matches!(r, Record::Spawn { .. })),
        0,
        "nothing started"
    );
}

#[tokio::test]
async fn a_json_rpc_error_is_a_502_with_its_code_and_another_mesh_a_404() {
    let a = app();
    let (code, _) = send(
        &a,
        Method::PUT,
        "/v1/meshes/m/services/s",
        Some(spec(&a)),
        None,
    )
    .await;
    assert_eq!(code, StatusCode::OK);
    let (code, e) = send(
        &a,
        Method::POST,
        "/v1/meshes/m/services/s/call",
        Some(json!({"tool": "rpc_error"})),
        None,
    )
    .await;
    assert_eq!(code, StatusCode::BAD_GATEWAY, "{e}");
    assert_eq!(e["code"], -32000, "{e}");
    assert!(e["error"].as_str().unwrap().contains("boom"), "{e}");
    let (code, e) = send(
        &a,
        Method::POST,
        "/v1/meshes/other/services/s/call",
        Some(json!({"tool": "t"})),
        None,
    )
    .await;
    assert_eq!(code, StatusCode::NOT_FOUND, "{e}");
}

#[tokio::test]
async fn the_token_guards_everything_but_health() {
    let a = app_with(ApiConfig {
        token: Some("s3cret".into()),
        ..Default::default()
    });
    let (code, h) = send(&a, Method::GET, "/v1/health", None, None).await;
    assert_eq!((code, h["ok"].clone()), (StatusCode::OK, json!(true)));
    for token in [None, Some("wrong"), Some("s3cret2")] {
        let (code, _) = send(&a, Method::GET, "/v1/meshes/m/services", None, token).await;
        assert_eq!(code, StatusCode::UNAUTHORIZED, "{token:?}");
        let (code, _) = send(
            &a,
            Method::PUT,
            "/v1/meshes/m/services/s",
            Some(spec(&a)),
            token,
        )
        .await;
        assert_eq!(code, StatusCode::UNAUTHORIZED, "{token:?}");
    }
    assert!(a.sup.is_empty());
    let (code, _) = send(
        &a,
        Method::GET,
        "/v1/meshes/m/services",
        None,
        Some("s3cret"),
    )
    .await;
    assert_eq!(code, StatusCode::OK);
}

#[tokio::test]
async fn oversized_bodies_are_413() {
    let a = app_with(ApiConfig {
        body_limit: 1024,
        ..Default::default()
    });
    let big = json!({"source": "npm:x", "args": ["a".repeat(4096)]});
    let (code, e) = send(&a, Method::PUT, "/v1/meshes/m/services/s", Some(big), None).await;
    assert_eq!(code, StatusCode::PAYLOAD_TOO_LARGE, "{e}");
    assert!(a.sup.is_empty());
}

/// A mesh-scoped token can never read host files: `path:` and `git:file://`
/// sources only under the operator's source roots.
#[tokio::test]
async fn mesh_tokens_may_not_deploy_host_directories() {
    let fake = Fake::new(Script::Healthy);
    let dir = tempfile::tempdir().unwrap();
    let allowed = tempfile::tempdir().unwrap();
    let mut config = SupervisorConfig::new(dir.path().to_path_buf());
    config.source_roots = vec![allowed.path().to_path_buf()];
    let sup = Arc::new(Supervisor::new(fake.clone(), config));
    let a = App {
        router: router(
            sup.clone(),
            ApiConfig {
                token: Some("admin".into()),
                mesh_tokens: vec![("acme".into(), "acme-token".into())],
                ..Default::default()
            },
        ),
        fake,
        sup,
        dir,
    };
    let outside =
        json!({"source": format!("path:{}", a.dir.path().display()), "command": ["fake-server"]});
    let (code, e) = send(
        &a,
        Method::PUT,
        "/v1/meshes/acme/services/s",
        Some(outside.clone()),
        Some("acme-token"),
    )
    .await;
    assert_eq!(code, StatusCode::FORBIDDEN, "{e}");
    assert!(e["error"].as_str().unwrap().contains("source roots"), "{e}");
    let git = json!({"source": format!("git:file://{}", a.dir.path().display())});
    let (code, _) = send(
        &a,
        Method::PUT,
        "/v1/meshes/acme/services/g",
        Some(git),
        Some("acme-token"),
    )
    .await;
    assert_eq!(code, StatusCode::FORBIDDEN);
    // A link inside the root pointing out of it leads nowhere.
    std::os::unix::fs::symlink(a.dir.path(), allowed.path().join("escape")).unwrap();
    let link = json!({"source": format!("path:{}/escape", allowed.path().display()), "command": ["fake-server"]});
    let (code, _) = send(
        &a,
        Method::PUT,
        "/v1/meshes/acme/services/l",
        Some(link),
        Some("acme-token"),
    )
    .await;
    assert_eq!(code, StatusCode::FORBIDDEN);
    assert!(a.sup.is_empty());
    // Under the root: fine. And the admin may deploy any directory.
    let inside =
        json!({"source": format!("path:{}", allowed.path().display()), "command": ["fake-server"]});
    let (code, e) = send(
        &a,
        Method::PUT,
        "/v1/meshes/acme/services/s",
        Some(inside),
        Some("acme-token"),
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{e}");
    let (code, e) = send(
        &a,
        Method::PUT,
        "/v1/meshes/acme/services/t",
        Some(outside),
        Some("admin"),
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{e}");
}
