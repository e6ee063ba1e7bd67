//! End-to-end: the MCP gateway of a real `meshbox serve` (process backend)
//! fronting the python fixture server (handshake era), driven over HTTP by
//! both a handshake-era and a stateless client, on the service and the mesh
//! endpoint.

mod common;

use std::time::Duration;

use common::Daemon;
use serde_json::{json, Value};

fn meta() -> Value {
    json!({
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": { "roots": {} },
        "io.modelcontextprotocol/clientInfo": { "name": "it", "version": "0" }
    })
}

/// The last JSON-RPC message of a JSON or SSE answer, and every SSE message.
async fn messages(resp: reqwest::Response) -> (u16, Vec<Value>) {
    let status = resp.status().as_u16();
    let sse = resp
        .headers()
        .get("content-type")
        .is_some_and(|v| v.to_str().unwrap().contains("event-stream"));
    let text = resp.text().await.unwrap();
    let msgs = if sse {
        text.lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .filter_map(|d| serde_json::from_str(d.trim()).ok())
            .collect()
    } else {
        vec![serde_json::from_str(&text).unwrap_or(Value::Null)]
    };
    (status, msgs)
}

async fn stateless(
    d: &Daemon,
    path: &str,
    id: i64,
    method: &str,
    mut params: Value,
) -> (u16, Value) {
    params["_meta"] = meta();
    let mut req = d
        .http
        .post(format!("{}{path}", d.url))
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2026-07-28")
        .header("mcp-method", method);
    if let Some(n) = params.get("name").and_then(Value::as_str) {
        req = req.header("mcp-name", n);
    }
    let resp = req
        .json(&json!({"jsonrpc":"2.0","id":id,"method":method,"params":params}))
        .send()
        .await
        .unwrap();
    let (status, mut msgs) = messages(resp).await;
    (status, msgs.pop().unwrap_or(Value::Null))
}

#[tokio::test]
async fn gateway_serves_a_real_server_in_both_eras() {
    let d = Daemon::start();
    let (code, st) = d.deploy_py("acme", "py", &[], json!({})).await;
    assert_eq!(code, 200, "{st}");
    let svc = format!("{}/mcp/acme/py", d.url);

    // Stateless client.
    let (code, r) = stateless(&d, "/mcp/acme/py", 1, "server/discover", json!({})).await;
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["result"]["supportedVersions"], json!(["2026-07-28"]));
    assert_eq!(
        r["result"]["_meta"]["io.modelcontextprotocol/serverInfo"]["name"],
        "py-fixture"
    );
    let (_, r) = stateless(&d, "/mcp/acme/py", 2, "tools/list", json!({})).await;
    let tools = r["result"]["tools"].as_array().expect("tools");
    assert!(tools.iter().any(|t| t["name"] == "echo"), "{r}");
    assert_eq!(r["result"]["cacheScope"], "private");
    let (_, r) = stateless(
        &d,
        "/mcp/acme/py",
        3,
        "tools/call",
        json!({"name":"echo","arguments":{"text":"hi"}}),
    )
    .await;
    assert_eq!(r["result"]["content"][0]["text"], "hi", "{r}");
    // The server asks for roots mid-call: input_required, then the retry completes it.
    let (_, r) = stateless(
        &d,
        "/mcp/acme/py",
        4,
        "tools/call",
        json!({"name":"roots","arguments":{}}),
    )
    .await;
    assert_eq!(r["result"]["resultType"], "input_required", "{r}");
    let (key, req) = r["result"]["inputRequests"]
        .as_object()
        .unwrap()
        .iter()
        .next()
        .unwrap();
    assert_eq!(req["method"], "roots/list");
    let retry = json!({"name":"roots","arguments":{},"requestState": r["result"]["requestState"],
        "inputResponses": { key.clone(): {"roots":[{"uri":"file:///it","name":"it"}]} }});
    let (_, r) = stateless(&d, "/mcp/acme/py", 5, "tools/call", retry).await;
    assert!(
        r["result"]["content"][0]["text"]
            .as_str()
            .unwrap_or("")
            .contains("file:///it"),
        "{r}"
    );
    // The mesh endpoint.
    let (_, r) = stateless(
        &d,
        "/mcp/acme",
        6,
        "tools/call",
        json!({"name":"py__add","arguments":{"a":2,"b":3}}),
    )
    .await;
    assert_eq!(r["result"]["content"][0]["text"], "5", "{r}");

    // Handshake-era client: initialize, call, a roots/list request over the call's stream.
    let init = d
        .http
        .post(&svc)
        .header("accept", "application/json, text/event-stream")
        .json(&json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{
            "protocolVersion":"2025-06-18","capabilities":{"roots":{}},"clientInfo":{"name":"it","version":"0"}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(init.status(), 200);
    let sid = init.headers()["mcp-session-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let body: Value = init.json().await.unwrap();
    assert_eq!(body["result"]["protocolVersion"], "2025-06-18");
    let post = |body: Value| {
        d.http
            .post(&svc)
            .header("accept", "application/json, text/event-stream")
            .header("mcp-session-id", &sid)
            .header("mcp-protocol-version", "2025-06-18")
            .json(&body)
            .send()
    };
    let (_, m) = messages(post(json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"add","arguments":{"a":1,"b":1}}})).await.unwrap()).await;
    assert_eq!(m.last().unwrap()["result"]["content"][0]["text"], "2");
    let mut call = post(json!({"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"roots","arguments":{}}}))
        .await
        .unwrap();
    let mut text = String::new();
    let ask = loop {
        let chunk = tokio::time::timeout(Duration::from_secs(30), call.chunk())
            .await
            .expect("no roots/list request")
            .unwrap()
            .expect("stream ended");
        text.push_str(&String::from_utf8_lossy(&chunk));
        let found = text
            .lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .filter_map(|d| serde_json::from_str::<Value>(d.trim()).ok())
            .find(|m| m["method"] == "roots/list");
        if let Some(m) = found {
            break m;
        }
    };
    let answer =
        post(json!({"jsonrpc":"2.0","id":ask["id"],"result":{"roots":[{"uri":"file:///legacy"}]}}))
            .await
            .unwrap();
    assert_eq!(answer.status(), 202);
    let mut rest = String::new();
    while let Some(c) = call.chunk().await.unwrap() {
        rest.push_str(&String::from_utf8_lossy(&c));
    }
    assert!(rest.contains("file:///legacy"), "{rest}");
    let del = d
        .http
        .delete(&svc)
        .header("mcp-session-id", &sid)
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 204);
}
