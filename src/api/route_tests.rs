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
    send_raw(app, method, path, body.map(|b| b.to_string()), token).await
}

/// A request with a body sent verbatim (not JSON, or not an object).
async fn send_raw(
    app: &App,
    method: Method,
    path: &str,
    body: Option<String>,
    token: Option<&str>,
) -> (StatusCode, Value) {
    let mut req = Request::builder().method(method).uri(path);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let body = match body {
        Some(b) => {
            req = req.header("content-type", "application/json");
            Body::from(b)
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

#[tokio::test]
async fn wrong_methods_and_unknown_routes_answer_json() {
    let a = app();
    for (m, uri) in [
        (Method::GET, "/load"),
        (Method::POST, "/health"),
        (Method::DELETE, "/list"),
        (Method::POST, "/v1/health"),
        (Method::PATCH, "/v1/meshes/m/services/s"),
    ] {
        let (code, v) = send(&a, m.clone(), uri, None, None).await;
        assert_eq!(code, StatusCode::METHOD_NOT_ALLOWED, "{m} {uri}");
        assert!(v["error"].as_str().unwrap().contains(m.as_str()), "{v}");
    }
    let (code, v) = send(&a, Method::GET, "/nope", None, None).await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    assert!(v["error"].is_string(), "{v}");
}

#[tokio::test]
async fn health_carries_the_operators_warning() {
    let (_, v) = send(&app(), Method::GET, "/v1/health", None, None).await;
    assert!(v.get("warning").is_none(), "{v}");
    let warned = app_with(ApiConfig {
        warning: Some("no authentication".into()),
        ..Default::default()
    });
    let (code, v) = send(&warned, Method::GET, "/v1/health", None, None).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(
        (&v["warning"], &v["ok"]),
        (&json!("no authentication"), &json!(true))
    );
}

#[tokio::test]
async fn meshes_lists_every_mesh_for_the_admin_only() {
    let a = app_with(ApiConfig {
        token: Some("t0k".into()),
        mesh_tokens: vec![("acme".into(), "acme-t0k".into())],
        ..Default::default()
    });
    let (_, v) = send(&a, Method::GET, "/v1/meshes", None, Some("t0k")).await;
    assert_eq!(v, json!({"meshes": []}));
    for path in [
        "/v1/meshes/acme/services/a",
        "/v1/meshes/acme/services/b",
        "/v1/meshes/beta/services/c",
    ] {
        let (code, st) = send(&a, Method::PUT, path, Some(spec(&a)), Some("t0k")).await;
        assert_eq!(code, StatusCode::OK, "{st}");
    }
    let (code, v) = send(&a, Method::GET, "/v1/meshes", None, Some("t0k")).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(
        v,
        json!({"meshes": [{"name": "acme", "services": 2}, {"name": "beta", "services": 1}]})
    );
    let (code, _) = send(&a, Method::GET, "/v1/meshes", None, None).await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
    // A mesh-scoped token does not learn which other meshes exist.
    let (code, _) = send(&a, Method::GET, "/v1/meshes", None, Some("acme-t0k")).await;
    assert_eq!(code, StatusCode::FORBIDDEN);
    // Legacy routes need the admin token too when one is set.
    let (code, _) = send(&a, Method::GET, "/health", None, None).await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn legacy_routes_ignore_unknown_shape_but_not_bad_input() {
    let a = app();
    // Unknown query parameters and an empty name: everything, as the seed did.
    let (code, v) = send(&a, Method::GET, "/list?name=&meshId=m", None, None).await;
    assert_eq!((code, v), (StatusCode::OK, json!({})));
    let (code, v) = send(&a, Method::GET, "/health?meshId=m", None, None).await;
    assert_eq!(
        (code, v),
        (StatusCode::OK, json!({"ok": true, "services": []}))
    );
    let (code, _) = send(&a, Method::GET, "/logs?name=nope&x=1", None, None).await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    // Unknown fields and null args are taken as the seed took them.
    let (code, st) = send(
        &a,
        Method::POST,
        "/load",
        Some(
            json!({"name": "svc", "sourcePath": a.dir.path(), "command": ["fake-server"],
                    "env": {"N": 5, "B": true, "Z": null}, "env_extra": 1, "meshId": "m"}),
        ),
        None,
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{st}");
    assert_eq!(st["status"], "running");
    let (code, r) = send(
        &a,
        Method::POST,
        "/call",
        Some(json!({"name": "svc", "tool": "t", "args": null, "meshId": "m"})),
        None,
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{r}");
    assert_eq!(r["result"]["content"][0]["text"], "ok");
    let (code, r) = send(
        &a,
        Method::POST,
        "/unload",
        Some(json!({"name": "svc", "meshId": "m"})),
        None,
    )
    .await;
    assert_eq!((code, r), (StatusCode::OK, json!({"ok": true})));
    // Safety stays strict, and every refusal names what is wrong.
    let before = a.fake.count(|_| true);
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
        (
            "/load",
            r#"{"name":"x","sourcePath":"/a","npxPackage":"b"}"#,
            "only one",
        ),
        ("/load", r#"{"name":"x"}"#, "sourcePath"),
        ("/load", r#"[1]"#, "object"),
        ("/load", "not json", "invalid JSON"),
        ("/call", r#"{"name":"x","tool":"t","args":"s"}"#, "args"),
        ("/call", r#"{"name":"x","args":{}}"#, "`tool`"),
        ("/unload", r#"{"name":7}"#, "`name`"),
    ] {
        let (code, v) = send_raw(&a, Method::POST, uri, Some(body.to_owned()), None).await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{uri} {body}: {v}");
        let e = v["error"].as_str().unwrap();
        assert!(e.contains(needle), "{uri} {body}: {e}");
    }
    let (code, v) = send(&a, Method::GET, "/logs", None, None).await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert!(v["error"].as_str().unwrap().contains("`name`"), "{v}");
    assert_eq!(a.fake.count(|_| true), before, "nothing was started");
    assert!(a.sup.list(None).is_empty(), "nothing was registered");
}
