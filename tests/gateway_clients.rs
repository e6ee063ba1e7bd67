//! Real MCP clients against the gateway of `meshbox serve`: the official
//! TypeScript SDK 2.x and Python SDK 2.x clients (automatic era negotiation
//! and legacy mode)
//! on the service and the mesh endpoint, fronting a stateless-era server
//! written with the TypeScript SDK 2.x (tests/fixtures/stateless_server) and
//! `npm:@modelcontextprotocol/server-everything` (handshake era). Each run
//! lists tools, calls one, receives progress, answers an elicitation (and a
//! sampling request where the server has one), reads a resource, gets a
//! prompt and cancels a long call.
//!
//! Needs `scripts/mcp-clients.sh` (node, npm, python3) and the registries
//! (the servers are installed by meshbox): `cargo test --test gateway_clients -- --ignored`.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{fixture, Daemon};
use serde_json::{json, Value};

fn clients_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/mcp-clients");
    assert!(
        dir.join("node_modules/@modelcontextprotocol/client")
            .is_dir(),
        "the MCP clients are not installed: run scripts/mcp-clients.sh first"
    );
    dir
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    /// `@modelcontextprotocol/client` 2.x (tests/clients/ts_client.mjs).
    TypeScript,
    /// PyPI `mcp` 2.x (tests/clients/py_client.py).
    Python,
}

/// Runs one client against `url`; what it saw.
fn client(kind: Kind, url: &str, mode: &str, plan: &Value) -> Value {
    let dir = clients_dir();
    let mut cmd = match kind {
        Kind::TypeScript => {
            // Copied next to its node_modules so the SDK resolves.
            let script = dir.join("ts_client.mjs");
            std::fs::copy(fixture("../clients/ts_client.mjs"), &script).unwrap();
            let mut c = Command::new("node");
            c.arg(script);
            c
        }
        Kind::Python => {
            let mut c = Command::new(dir.join("venv/bin/python"));
            c.arg(fixture("../clients/py_client.py"));
            c
        }
    };
    let out = cmd
        .args([url, mode, &plan.to_string()])
        .current_dir(&dir)
        .output()
        .expect("the client runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{kind:?} client ({mode}) on {url} failed:\n{}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or("null")).unwrap()
}

async fn deploy(d: &Daemon, name: &str, spec: Value) {
    let (code, st) = d
        .put(&format!("/v1/meshes/acme/services/{name}"), spec)
        .await;
    assert_eq!(code, 200, "deploying {name}: {st}");
}

fn prefixed(plan: &Value, service: &str) -> Value {
    let mut p = plan.clone();
    for k in ["call", "progress", "elicit", "sample", "prompt", "slow"] {
        if let Some(n) = p[k]["name"].as_str() {
            p[k]["name"] = json!(format!("{service}__{n}"));
        }
    }
    if let Some(u) = p["resource"].as_str() {
        p["resource"] = json!(format!("{service}__{u}"));
    }
    p
}

#[tokio::test]
#[ignore = "needs clients"]
async fn sdk_clients_in_both_modes_on_both_endpoints_and_eras() {
    clients_dir();
    let d = Daemon::start();
    deploy(
        &d,
        "stateless",
        json!({"source": format!("path:{}", fixture("stateless_server").display())}),
    )
    .await;
    deploy(
        &d,
        "everything",
        json!({"source": "npm:@modelcontextprotocol/server-everything", "args": ["stdio"]}),
    )
    .await;
    let stateless_plan = json!({
        "call": {"name": "echo", "arguments": {"text": "hi"}, "expect": "hi"},
        "progress": {"name": "progress", "arguments": {}},
        "elicit": {"name": "ask", "arguments": {}, "expect": "hello Meshbox"},
        "resource": "mem://greeting",
        "prompt": {"name": "greet", "arguments": {"name": "x"}},
        "slow": {"name": "slow", "arguments": {"ms": 60000}}
    });
    let everything_plan = json!({
        "call": {"name": "echo", "arguments": {"message": "hi"}, "expect": "Echo: hi"},
        "progress": {"name": "trigger-long-running-operation", "arguments": {"duration": 1, "steps": 2}},
        "elicit": {"name": "trigger-elicitation-request", "arguments": {}, "expect": "User provided"},
        "sample": {"name": "trigger-sampling-request", "arguments": {"prompt": "x"}, "expect": "sampled by meshbox test"},
        "resource": "demo://resource/dynamic/text/1",
        "prompt": {"name": "simple-prompt", "arguments": {}},
        "slow": {"name": "trigger-long-running-operation", "arguments": {"duration": 60, "steps": 60}}
    });
    for (service, plan) in [
        ("stateless", &stateless_plan),
        ("everything", &everything_plan),
    ] {
        for (kind, mode) in [
            (Kind::TypeScript, "auto"),
            (Kind::TypeScript, "legacy"),
            (Kind::Python, "auto"),
            (Kind::Python, "legacy"),
        ] {
            let url = format!("{}/mcp/acme/{service}", d.url);
            let seen = client(kind, &url, mode, plan);
            assert!(seen["cancelled_after_ms"].as_u64().is_some(), "{seen}");
            let url = format!("{}/mcp/acme", d.url);
            let seen = client(kind, &url, mode, &prefixed(plan, service));
            assert!(
                seen["tools"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|t| t == &json!(format!("{service}__echo"))),
                "{seen}"
            );
        }
    }
}
