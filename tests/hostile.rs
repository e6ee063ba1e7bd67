//! A table of hostile inputs across the API (v1 and legacy) and the CLI:
//! each gets a 4xx (or a clean one-line CLI error) and nothing is created —
//! not on disk, not in the registry of services, not in Docker.

mod common;

use std::path::Path;
use std::process::Command;

use common::{fixture, meshbox_bin, Daemon};
use serde_json::{json, Value};

fn snapshot(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            let name = p.strip_prefix(dir).unwrap().display().to_string();
            // The state database's own journal files change on every open.
            if name.starts_with("meshbox.db") {
                continue;
            }
            if p.is_dir() {
                stack.push(p.clone());
            }
            out.push(name);
        }
    }
    out.sort();
    out
}

/// (method, path, body) cases; every one must be refused with a 4xx.
fn cases() -> Vec<(&'static str, String, Value)> {
    let py = format!("path:{}", fixture("py_server").display());
    let put = |body: Value| ("PUT", "/v1/meshes/acme/services/x".to_owned(), body);
    let with = |k: &str, v: Value| {
        let mut b = json!({"source": py});
        b[k] = v;
        put(b)
    };
    let mut c = vec![
        // Names in the path.
        (
            "PUT",
            "/v1/meshes/acme/services/a;rm%20-rf%20%2F".into(),
            json!({"source": py}),
        ),
        (
            "PUT",
            "/v1/meshes/acme/services/%2e%2e".into(),
            json!({"source": py}),
        ),
        (
            "PUT",
            "/v1/meshes/%2e%2e%2fetc/services/x".into(),
            json!({"source": py}),
        ),
        (
            "PUT",
            "/v1/meshes/acme/services/x%00y".into(),
            json!({"source": py}),
        ),
        (
            "PUT",
            "/v1/meshes/%D0%B0cme/services/x".into(),
            json!({"source": py}),
        ), // Cyrillic а
        (
            "PUT",
            format!("/v1/meshes/acme/services/{}", "n".repeat(65)),
            json!({"source": py}),
        ),
        (
            "PUT",
            "/v1/meshes/-acme/services/x".into(),
            json!({"source": py}),
        ),
        (
            "PUT",
            "/v1/meshes/ac%20me/services/x".into(),
            json!({"source": py}),
        ),
        // Sources.
        put(json!({"source": "npm:../../x"})),
        put(json!({"source": "npm:@scope/../x"})),
        put(json!({"source": "npm:lodash; curl evil"})),
        put(json!({"source": "npm:lodash$(id)"})),
        put(json!({"source": "npm:\u{ff4c}odash"})), // fullwidth l
        put(json!({"source": "pypi:foo; rm -rf /"})),
        put(json!({"source": "pypi:foo @ file:///etc/passwd"})),
        put(json!({"source": "pypi:--index-url=http://evil"})),
        put(json!({"source": "pypi:foo\nbar"})),
        put(json!({"source": "git:ext::sh -c id"})),
        put(json!({"source": "git:--upload-pack=id"})),
        put(json!({"source": "git:https://h/r#--upload-pack=id"})),
        put(json!({"source": "git:https://h/r#a..b"})),
        put(json!({"source": "git:fd::3"})),
        put(json!({"source": "git:http://h/r"})),
        put(json!({"source": "git:https://h/`id`"})),
        put(json!({"source": "path:relative/dir"})),
        put(json!({"source": "path:/tmp/../etc"})),
        put(json!({"source": "path:/nonexistent/meshbox"})),
        put(json!({"source": ""})),
        put(json!({"source": "x".repeat(5000)})),
        put(json!({"source": format!("{py}\u{0}")})),
        put(json!({"source": "path:\u{202e}/tmp"})),
        // Every other string field.
        with("args", json!(["ok", "nul\u{0}"])),
        with("args", json!("not-a-list")),
        with("command", json!([])),
        with("command", json!([""])),
        with("env", json!({"A=B": "v"})),
        with("env", json!({"$(id)": "v"})),
        with("env", json!({"K": {"file": "relative/secret"}})),
        with("env", json!({"K": "nul\u{0}"})),
        with("env", json!({"K": 5})),
        with("runtime", json!("perl")),
        with("memory_mb", json!(-1)),
        with("memory_mb", json!(1_000_000_000_000u64)),
        with("cpus", json!("lots")),
        with("cpus", json!(0)),
        with("pids", json!(0)),
        with("network", json!("bridge")),
        with("network", json!({"allow": ["*:443"]})),
        with("network", json!({"allow": ["evil.com"]})),
        with("call_timeout_ms", json!(0)),
        with("health", json!({"interval_s": 0})),
        with("health", json!({"tool": "x", "bogus": 1})),
        with("surprise", json!(true)),
        (
            "PUT",
            "/v1/meshes/acme/services/x".into(),
            json!(["not", "an", "object"]),
        ),
        // Calls.
        (
            "POST",
            "/v1/meshes/acme/services/x/call".into(),
            json!({"tool": "nul\u{0}"}),
        ),
        (
            "POST",
            "/v1/meshes/acme/services/x/call".into(),
            json!({"tool": ""}),
        ),
        (
            "POST",
            "/v1/meshes/acme/services/x/call".into(),
            json!({"tool": "t", "arguments": "str"}),
        ),
        (
            "POST",
            "/v1/meshes/acme/services/x/call".into(),
            json!({"tool": "t", "timeout_ms": 0}),
        ),
        // Legacy routes validate the same way.
        (
            "POST",
            "/load".into(),
            json!({"name": "../x", "sourcePath": fixture("py_server")}),
        ),
        (
            "POST",
            "/load".into(),
            json!({"name": "x", "npxPackage": "../x"}),
        ),
        (
            "POST",
            "/load".into(),
            json!({"name": "x", "uvxPackage": "x; y"}),
        ),
        (
            "POST",
            "/load".into(),
            json!({"name": "x", "gitUrl": "https://h/r", "gitBranch": "--x"}),
        ),
        (
            "POST",
            "/load".into(),
            json!({"name": "x", "gitUrl": "ext::sh -c id"}),
        ),
        (
            "POST",
            "/load".into(),
            json!({"name": "x", "sourcePath": "relative"}),
        ),
        (
            "POST",
            "/load".into(),
            json!({"name": "x", "sourcePath": fixture("py_server"), "env": {"A B": "v"}}),
        ),
        ("POST", "/call".into(), json!({"name": "x/y", "tool": "t"})),
        ("POST", "/unload".into(), json!({"name": "a/b"})),
    ];
    c.push((
        "POST",
        "/load".into(),
        // Lenient about unknown fields (as the seed was), never about values.
        json!({"name": "x", "sourcePath": fixture("py_server"), "evil": 1, "env": {"K": ["v"]}}),
    ));
    c
}

async fn refuse_all(d: &Daemon) {
    let before = snapshot(d.data.path());
    let cases = cases();
    assert!(cases.len() >= 40, "{} cases", cases.len());
    for (method, path, body) in cases {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let (code, r) = d.req(m, &path, Some(body.clone())).await;
        assert!(
            (400..500).contains(&code),
            "{method} {path} {body}: {code} {r}"
        );
        assert!(
            r["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{method} {path}: no message: {r}"
        );
    }
    // Oversized and deeply nested bodies.
    // (On its own client: the server closes a connection it answered 413 on.)
    let big = json!({"source": "npm:x", "args": ["a".repeat(2 << 20)]});
    let resp = reqwest::Client::new()
        .put(format!("{}/v1/meshes/acme/services/x", d.url))
        .json(&big)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    let deep = format!("{}1{}", "[".repeat(5000), "]".repeat(5000));
    let resp = d
        .http
        .put(format!("{}/v1/meshes/acme/services/x", d.url))
        .header("content-type", "application/json")
        .body(deep)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);

    let (_, h) = d.get("/v1/health").await;
    assert_eq!(h["services"], 0, "a service was registered");
    assert_eq!(
        snapshot(d.data.path()),
        before,
        "something was written to the data dir"
    );
}

#[tokio::test]
async fn hostile_api_inputs_change_nothing() {
    let d = Daemon::start();
    refuse_all(&d).await;
}

#[tokio::test]
async fn hostile_api_inputs_change_nothing_in_docker() {
    let Ok(docker) = bollard::Docker::connect_with_local_defaults() else {
        eprintln!("skipping: no docker engine");
        return;
    };
    let Ok(docker) = docker.negotiate_version().await else {
        assert!(
            std::env::var("MESHBOX_REQUIRE_DOCKER").ok().as_deref() != Some("1"),
            "no docker engine"
        );
        eprintln!("skipping: no docker engine");
        return;
    };
    let count = || async {
        let c = docker
            .list_containers(Some(
                bollard::query_parameters::ListContainersOptionsBuilder::default()
                    .all(true)
                    .build(),
            ))
            .await
            .unwrap()
            .len();
        let v = docker
            .list_volumes(None::<bollard::query_parameters::ListVolumesOptions>)
            .await
            .unwrap()
            .volumes
            .unwrap_or_default()
            .len();
        let n = docker
            .list_networks(None::<bollard::query_parameters::ListNetworksOptions>)
            .await
            .unwrap()
            .len();
        (c, v, n)
    };
    let before = count().await;
    let d = Daemon::start_docker(&[]);
    refuse_all(&d).await;
    // Other tests may run containers meanwhile; ours would carry this data dir's instance.
    let instance = std::fs::read_to_string(d.data.path().join("instance-id")).unwrap_or_default();
    let ours = docker
        .list_containers(Some(
            bollard::query_parameters::ListContainersOptionsBuilder::default()
                .all(true)
                .filters(&std::collections::HashMap::from([(
                    "label".to_owned(),
                    vec![format!("meshbox.instance={instance}")],
                )]))
                .build(),
        ))
        .await
        .unwrap();
    assert!(ours.is_empty(), "containers created: {ours:?}");
    let _ = before;
}

#[tokio::test]
async fn hostile_cli_inputs_fail_cleanly() {
    let d = Daemon::start();
    let before = snapshot(d.data.path());
    let py = format!("path:{}", fixture("py_server").display());
    let cases: Vec<Vec<String>> = vec![
        vec!["deploy".into(), "acme".into(), py.clone()],
        vec!["deploy".into(), "acme/a;b".into(), py.clone()],
        vec!["deploy".into(), "../x/y".into(), py.clone()],
        vec!["deploy".into(), "acme/x".into(), "npm:../../x".into()],
        vec!["deploy".into(), "acme/x".into(), "git:ext::sh -c id".into()],
        vec![
            "deploy".into(),
            "acme/x".into(),
            "pypi:foo; rm -rf /".into(),
        ],
        vec![
            "deploy".into(),
            "acme/x".into(),
            py.clone(),
            "--memory".into(),
            "lots".into(),
        ],
        vec![
            "deploy".into(),
            "acme/x".into(),
            py.clone(),
            "--memory".into(),
            "1k".into(),
        ],
        vec![
            "deploy".into(),
            "acme/x".into(),
            py.clone(),
            "--cpus".into(),
            "100".into(),
        ],
        vec![
            "deploy".into(),
            "acme/x".into(),
            py.clone(),
            "--network".into(),
            "bridge".into(),
        ],
        vec![
            "deploy".into(),
            "acme/x".into(),
            py.clone(),
            // (`--env KEY` alone passes KEY from the environment, as docker does.)
            "--env".into(),
            "=no-key".into(),
        ],
        vec![
            "deploy".into(),
            "acme/x".into(),
            py.clone(),
            "--env".into(),
            "A B=c".into(),
        ],
        vec![
            "deploy".into(),
            "acme/x".into(),
            py.clone(),
            "--runtime".into(),
            "perl".into(),
        ],
        vec![
            "call".into(),
            "acme/x".into(),
            "t".into(),
            "{not json".into(),
        ],
        vec!["status".into(), "acme/\u{0430}".into()],
        vec!["run".into(), "npm:../../x".into()],
        vec!["run".into(), "git:--upload-pack=id".into()],
    ];
    for args in cases {
        let out = Command::new(meshbox_bin())
            .args(&args)
            .env("MESHBOX_URL", &d.url)
            .env("MESHBOX_DATA_DIR", d.data.path())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.starts_with("error: "), "{args:?}: {err}");
    }
    let (_, h) = d.get("/v1/health").await;
    assert_eq!(h["services"], 0);
    assert_eq!(snapshot(d.data.path()), before);
}
