//! Issue 13 end to end, against a real `meshbox serve`: the Prometheus
//! exposition at `/metrics`, OTLP span export into a receiver that decodes
//! what meshbox sends (a caller's `traceparent` continued and passed to the
//! server in `_meta`), JSON logs, and a real Prometheus scraping meshbox
//! (`#[ignore = "needs prometheus"]`).

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::routing::post;
use common::{fixture, meshbox_bin, Daemon};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message;
use serde_json::{json, Value};

/// The value of the one sample line starting with `series`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.split(' ').next().unwrap().parse().unwrap())
}

async fn scrape(d: &Daemon) -> String {
    let r = d
        .http
        .get(format!("{}/metrics", d.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let ct = r.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    r.text().await.unwrap()
}

async fn stateless_call(d: &Daemon, path: &str, tool: &str, traceparent: Option<&str>) -> Value {
    let mut req = d
        .http
        .post(format!("{}{path}", d.url))
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2026-07-28")
        .header("mcp-method", "tools/call")
        .header("mcp-name", tool);
    if let Some(tp) = traceparent {
        req = req.header("traceparent", tp);
    }
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
        "name": tool, "arguments": {"text": "hi"},
        "_meta": {
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {},
            "io.modelcontextprotocol/clientInfo": {"name": "it", "version": "0"}
        }
    }});
    let r = req.json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

#[tokio::test]
async fn metrics_endpoint_counts_calls_bounds_labels_and_forgets_removed_services() {
    let d = Daemon::start();
    let (code, st) = d.deploy_py("acme", "py", &[], json!({})).await;
    assert_eq!(code, 200, "{st}");
    for _ in 0..3 {
        assert_eq!(
            d.call("acme", "py", "echo", json!({"text": "a"})).await.0,
            200
        );
    }
    assert_eq!(d.call("acme", "py", "fail", json!({})).await.0, 200);
    assert_eq!(d.call("acme", "py", "rpc_error", json!({})).await.0, 502);
    // A caller inventing tool names gets no series per name.
    for i in 0..40 {
        assert_eq!(
            d.call("acme", "py", &format!("nope{i}"), json!({})).await.0,
            502
        );
    }
    let (code, _) = d
        .post(
            "/v1/meshes/acme/services/py/call",
            json!({"tool": "slow", "arguments": {"ms": 3000}, "timeout_ms": 100}),
        )
        .await;
    assert_eq!(code, 504);
    // The gateway records too (stateless era).
    let r = stateless_call(&d, "/mcp/acme/py", "echo", None).await;
    assert_eq!(r["result"]["content"][0]["text"], "hi", "{r}");

    let text = scrape(&d).await;
    let l = r#"mesh="acme",service="py""#;
    for (series, want) in [
        (
            format!(r#"meshbox_tool_calls_total{{{l},tool="echo",outcome="ok"}}"#),
            4.0,
        ),
        (
            format!(r#"meshbox_tool_calls_total{{{l},tool="fail",outcome="tool_error"}}"#),
            1.0,
        ),
        (
            format!(r#"meshbox_tool_calls_total{{{l},tool="other",outcome="rpc_error"}}"#),
            41.0,
        ),
        (
            format!(r#"meshbox_tool_calls_total{{{l},tool="other",outcome="timeout"}}"#),
            1.0,
        ),
        (
            format!(r#"meshbox_tool_call_duration_seconds_count{{{l},tool="echo"}}"#),
            4.0,
        ),
        (format!(r#"meshbox_tool_calls_in_flight{{{l}}}"#), 0.0),
        (format!(r#"meshbox_service_restarts_total{{{l}}}"#), 0.0),
        (format!(r#"meshbox_service_oom_kills_total{{{l}}}"#), 0.0),
        (
            r#"meshbox_install_cache_total{kind="path",result="hit"}"#.into(),
            1.0,
        ),
        (
            r#"meshbox_gateway_requests_total{era="stateless"}"#.into(),
            1.0,
        ),
    ] {
        assert_eq!(sample(&text, &series), Some(want), "{series} in\n{text}");
    }
    assert!(!text.contains("nope"), "{text}");
    // /metrics needs no token, like /v1/health.
    assert!(text.contains("# TYPE meshbox_service_health gauge"));

    let (code, _) = d.delete("/v1/meshes/acme/services/py").await;
    assert_eq!(code, 204);
    let text = scrape(&d).await;
    assert!(!text.contains(l), "removed service still exported:\n{text}");
}

#[tokio::test]
async fn metrics_can_be_turned_off() {
    let d = Daemon::start_with(&["--no-metrics"], &[]);
    let (code, _) = d.get("/metrics").await;
    assert_eq!(code, 404);
}

#[tokio::test]
#[ignore = "needs root"]
async fn usage_of_a_process_sandbox_is_read_from_its_cgroup() {
    assert!(common::is_root(), "this test needs root (cgroups)");
    let d = Daemon::start();
    let (code, st) = d
        .deploy_py("acme", "mem", &[], json!({"memory_mb": 256, "cpus": 1.0}))
        .await;
    assert_eq!(code, 200, "{st}");
    assert_eq!(
        d.call("acme", "mem", "alloc", json!({"mb": 40})).await.0,
        200
    );
    let text = scrape(&d).await;
    let mem = sample(
        &text,
        r#"meshbox_service_memory_bytes{mesh="acme",service="mem"}"#,
    )
    .unwrap_or_else(|| panic!("no memory series:\n{text}"));
    assert!(mem > 40.0 * 1024.0 * 1024.0, "{mem}");
    let cpu = sample(
        &text,
        r#"meshbox_service_cpu_seconds_total{mesh="acme",service="mem"}"#,
    )
    .unwrap_or_else(|| panic!("no cpu series:\n{text}"));
    assert!(cpu > 0.0);
}

/// Spans an OTLP/HTTP receiver got, by name.
#[derive(Debug, Clone)]
struct Got {
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
    attrs: HashMap<String, String>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// An OTLP/HTTP protobuf receiver on 127.0.0.1:0.
async fn receiver() -> (String, Arc<Mutex<Vec<Got>>>) {
    let got: Arc<Mutex<Vec<Got>>> = Arc::default();
    let sink = got.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        post(move |body: Bytes| {
            let sink = sink.clone();
            async move {
                let req = ExportTraceServiceRequest::decode(body).expect("an OTLP trace request");
                let mut out = sink.lock().unwrap();
                for rs in req.resource_spans {
                    for ss in rs.scope_spans {
                        for s in ss.spans {
                            let attrs = s
                                .attributes
                                .iter()
                                .filter_map(|kv| {
                                    let v = match kv.value.as_ref()?.value.as_ref()? {
                                        AnyValue::StringValue(s) => s.clone(),
                                        AnyValue::IntValue(i) => i.to_string(),
                                        AnyValue::BoolValue(b) => b.to_string(),
                                        other => format!("{other:?}"),
                                    };
                                    Some((kv.key.clone(), v))
                                })
                                .collect();
                            out.push(Got {
                                name: s.name,
                                trace_id: hex(&s.trace_id),
                                span_id: hex(&s.span_id),
                                parent: hex(&s.parent_span_id),
                                attrs,
                            });
                        }
                    }
                }
                // An empty ExportTraceServiceResponse.
                (
                    [("content-type", "application/x-protobuf")],
                    Vec::<u8>::new(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, got)
}

async fn wait_for_span(got: &Mutex<Vec<Got>>, what: &str, pred: impl Fn(&Got) -> bool) -> Got {
    let start = Instant::now();
    loop {
        if let Some(s) = got.lock().unwrap().iter().find(|s| pred(s)) {
            return s.clone();
        }
        if start.elapsed() > Duration::from_secs(60) {
            let names: Vec<_> = got
                .lock()
                .unwrap()
                .iter()
                .map(|s| (s.name.clone(), s.trace_id.clone()))
                .collect();
            panic!("no span {what} among {names:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn logged_meta(d: &Daemon, service: &str) -> Vec<Value> {
    let (_, logs) = d
        .get(&format!(
            "/v1/meshes/acme/services/{service}/logs?lines=500"
        ))
        .await;
    logs["lines"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l.as_str()?.split_once("] meta ").map(|(_, m)| m.to_owned()))
        .map(|m| serde_json::from_str(&m).unwrap())
        .collect()
}

#[tokio::test]
async fn spans_continue_the_callers_trace_and_reach_the_server_in_meta() {
    let (otlp, got) = receiver().await;
    let d = Daemon::start_with(
        &["--otlp-endpoint", &otlp],
        &[("OTEL_BSP_SCHEDULE_DELAY", "200")],
    );
    let (code, st) = d.deploy_py("acme", "py", &["--log-meta"], json!({})).await;
    assert_eq!(code, 200, "{st}");

    // REST: the caller's trace, continued.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let r = d
        .http
        .post(format!("{}/v1/meshes/acme/services/py/call", d.url))
        .header("traceparent", format!("00-{trace}-{caller_span}-01"))
        .json(&json!({"tool": "echo", "arguments": {"text": "x"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let call = wait_for_span(&got, "tools/call in the caller's trace", |s| {
        s.name == "tools/call" && s.trace_id == trace
    })
    .await;
    assert_eq!(call.parent, caller_span, "{call:?}");
    for (k, v) in [
        ("mesh", "acme"),
        ("service", "py"),
        ("tool", "echo"),
        ("outcome", "ok"),
    ] {
        assert_eq!(call.attrs.get(k).map(String::as_str), Some(v), "{call:?}");
    }
    for child in ["queue", "upstream"] {
        let c = wait_for_span(&got, child, |s| s.name == child && s.trace_id == trace).await;
        assert_eq!(
            c.parent, call.span_id,
            "{child} is a child of the call: {c:?}"
        );
    }
    // The server got the trace in `_meta`, with the round trip as parent.
    let metas = logged_meta(&d, "py").await;
    let tp = metas
        .iter()
        .find_map(|m| m["traceparent"].as_str())
        .unwrap_or_else(|| panic!("no traceparent in {metas:?}"));
    let upstream = wait_for_span(&got, "upstream", |s| {
        s.name == "upstream" && s.trace_id == trace
    })
    .await;
    assert_eq!(tp, format!("00-{trace}-{}-01", upstream.span_id));

    // A call with no traceparent starts a trace of its own.
    assert_eq!(
        d.call("acme", "py", "add", json!({"a": 1, "b": 2})).await.0,
        200
    );
    let own = wait_for_span(&got, "a root call span", |s| {
        s.name == "tools/call" && s.attrs.get("tool").map(String::as_str) == Some("add")
    })
    .await;
    assert_ne!(own.trace_id, trace);
    assert_eq!(own.parent, "", "a root span");

    // The gateway continues a trace the same way.
    let gtrace = "0af7651916cd43dd8448eb211c80319c";
    let r = stateless_call(
        &d,
        "/mcp/acme/py",
        "echo",
        Some(&format!("00-{gtrace}-b7ad6b7169203331-01")),
    )
    .await;
    assert_eq!(r["result"]["content"][0]["text"], "hi", "{r}");
    let req = wait_for_span(&got, "gateway request", |s| {
        s.name == "mcp.request" && s.trace_id == gtrace
    })
    .await;
    assert_eq!(
        req.attrs.get("tool").map(String::as_str),
        Some("echo"),
        "{req:?}"
    );
    assert_eq!(
        req.attrs.get("outcome").map(String::as_str),
        Some("ok"),
        "{req:?}"
    );
    let metas = logged_meta(&d, "py").await;
    assert!(
        metas.iter().any(|m| m["traceparent"]
            .as_str()
            .is_some_and(|t| t.starts_with(&format!("00-{gtrace}-")))),
        "{metas:?}"
    );

    // Deploy phases.
    for phase in ["acquire", "spawn", "connect"] {
        let s = wait_for_span(&got, phase, |s| s.name == phase).await;
        assert!(
            !s.parent.is_empty(),
            "{phase} sits in the service's lifecycle span"
        );
    }
}

#[test]
fn json_logs_carry_mesh_and_service() {
    let tmp = tempfile::tempdir().unwrap();
    let mut child = Command::new(meshbox_bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--backend", "process"])
        .args(["--log-format", "json", "--data-dir"])
        .arg(tmp.path())
        .env("MESHBOX_LOG", "info")
        .env_remove("MESHBOX_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let url = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("serve starts");
        if let Some(u) = line.strip_prefix("meshbox listening on ") {
            break u.to_owned();
        }
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let http = reqwest::Client::new();
        let spec = json!({"source": format!("path:{}", fixture("py_server").display())});
        let r = http
            .put(format!("{url}/v1/meshes/acme/svc"))
            .json(&spec)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "wrong route first: a log-free 404");
        let r = http
            .put(format!("{url}/v1/meshes/acme/services/svc"))
            .json(&spec)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        // A server that exits during initialize: its start fails (a warning).
        let bad = json!({
            "source": format!("path:{}", fixture("py_server").display()),
            "args": ["--exit-during-init"],
        });
        let r = http
            .put(format!("{url}/v1/meshes/acme/services/svc2"))
            .json(&bad)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_server_error(), "{}", r.status());
        let r = http
            .delete(format!("{url}/v1/meshes/acme/services/svc"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204);
    });
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let _ = child.wait();
    let mut about_service = 0;
    for line in rx.try_iter() {
        if line.starts_with("meshbox listening on") {
            continue;
        }
        let v: Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        let text = v.to_string();
        if !text.contains("svc") {
            continue;
        }
        about_service += 1;
        // The event's own fields or the spans it happened in.
        let mut scopes = vec![v.clone()];
        scopes.extend(v["spans"].as_array().cloned().unwrap_or_default());
        let has = |k: &str, want: &str| scopes.iter().any(|s| s[k] == want);
        assert!(
            has("mesh", "acme") && (has("service", "svc") || has("service", "svc2")),
            "a line about the service without mesh and service fields: {line}"
        );
    }
    assert!(
        about_service >= 3,
        "running, start failed, undeployed: {about_service}"
    );
}

/// A Prometheus server of its own, killed on drop.
struct Prometheus {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts `prometheus` scraping `target` (host:port) every second.
fn start_prometheus(target: &str) -> Prometheus {
    let bin = ["/usr/bin/prometheus", "/usr/local/bin/prometheus"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("this test needs the `prometheus` binary (Debian package `prometheus`)");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
             scrape_configs:\n  - job_name: meshbox\n    metrics_path: /metrics\n    \
             static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .unwrap();
    let port = free_port();
    let child = Command::new(bin)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start prometheus");
    Prometheus {
        child,
        url: format!("http://127.0.0.1:{port}"),
        _dir: dir,
    }
}

#[tokio::test]
async fn a_callers_trace_reaches_the_server_without_an_exporter() {
    // No OTLP endpoint: meshbox makes no spans of its own, but a caller's
    // W3C trace context still reaches the server, as sent.
    let d = Daemon::start();
    let (code, st) = d.deploy_py("acme", "py", &["--log-meta"], json!({})).await;
    assert_eq!(code, 200, "{st}");
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let post = |tp: &str| {
        d.http
            .post(format!("{}/v1/meshes/acme/services/py/call", d.url))
            .header("traceparent", tp)
            .header("tracestate", "vendor=abc")
            .json(&json!({"tool": "echo", "arguments": {"text": "x"}}))
            .send()
    };
    // A malformed one goes nowhere (and fails nothing).
    for bad in [
        "00-zz-yy-01",
        &format!("00-{}-00f067aa0ba902b7-01", "0".repeat(32)),
    ] {
        assert_eq!(post(bad).await.unwrap().status(), 200);
    }
    assert_eq!(post(traceparent).await.unwrap().status(), 200);
    let metas = logged_meta(&d, "py").await;
    let sent: Vec<_> = metas
        .iter()
        .filter_map(|m| m["traceparent"].as_str())
        .collect();
    assert_eq!(sent, [traceparent], "REST: {metas:?}");
    assert_eq!(
        metas.last().unwrap()["tracestate"],
        "vendor=abc",
        "{metas:?}"
    );

    // The gateway: from the header when the client's `_meta` has none.
    let gateway_tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let r = stateless_call(&d, "/mcp/acme/py", "echo", Some(gateway_tp)).await;
    assert_eq!(r["result"]["content"][0]["text"], "hi", "{r}");
    let metas = logged_meta(&d, "py").await;
    assert_eq!(
        metas.last().unwrap()["traceparent"],
        gateway_tp,
        "gateway: {metas:?}"
    );
}

/// Polls Prometheus' query API until `query` has a sample equal to `want`.
async fn wait_query(p: &Prometheus, query: &str, want: f64) {
    let http = reqwest::Client::new();
    let start = Instant::now();
    let mut last = Value::Null;
    while start.elapsed() < Duration::from_secs(120) {
        if let Ok(r) = http
            .get(format!("{}/api/v1/query", p.url))
            .query(&[("query", query)])
            .send()
            .await
        {
            if let Ok(v) = r.json::<Value>().await {
                let got = v["data"]["result"][0]["value"][1]
                    .as_str()
                    .and_then(|s| s.parse::<f64>().ok());
                if got == Some(want) {
                    return;
                }
                last = v;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("prometheus never answered {want} to `{query}`; last answer: {last}");
}

#[tokio::test]
#[ignore = "needs prometheus"]
async fn prometheus_scrapes_meshbox() {
    let d = Daemon::start();
    let (code, st) = d.deploy_py("acme", "py", &[], json!({})).await;
    assert_eq!(code, 200, "{st}");
    for _ in 0..3 {
        assert_eq!(
            d.call("acme", "py", "echo", json!({"text": "a"})).await.0,
            200
        );
    }
    assert_eq!(d.call("acme", "py", "fail", json!({})).await.0, 200);
    let target = d.url.trim_start_matches("http://").to_owned();
    let p = start_prometheus(&target);
    wait_query(&p, r#"up{job="meshbox"}"#, 1.0).await;
    wait_query(
        &p,
        r#"meshbox_tool_calls_total{mesh="acme",service="py",tool="echo",outcome="ok"}"#,
        3.0,
    )
    .await;
    wait_query(
        &p,
        r#"meshbox_tool_calls_total{mesh="acme",service="py",tool="fail",outcome="tool_error"}"#,
        1.0,
    )
    .await;
    wait_query(
        &p,
        r#"sum(meshbox_tool_call_duration_seconds_count{mesh="acme",service="py"})"#,
        4.0,
    )
    .await;
    wait_query(
        &p,
        r#"meshbox_service_health{mesh="acme",service="py",state="unknown"}"#,
        1.0,
    )
    .await;
    // New calls show up in the next scrapes.
    for _ in 0..2 {
        assert_eq!(
            d.call("acme", "py", "echo", json!({"text": "b"})).await.0,
            200
        );
    }
    wait_query(
        &p,
        r#"meshbox_tool_calls_total{mesh="acme",service="py",tool="echo",outcome="ok"}"#,
        5.0,
    )
    .await;
}

#[tokio::test]
#[ignore = "needs docker"]
async fn usage_of_a_container_is_read_from_the_engine() {
    let docker = bollard::Docker::connect_with_local_defaults()
        .unwrap_or_else(|e| panic!("needs docker: cannot connect to a docker engine: {e}"))
        .negotiate_version()
        .await
        .unwrap_or_else(|e| panic!("needs docker: no docker engine answers: {e}"));
    if let Err(e) = docker.inspect_image("meshbox/runner-python:latest").await {
        panic!("needs docker: runner image meshbox/runner-python is missing (run `make images-local`): {e}");
    }
    let d = Daemon::start_docker(&[]);
    let spec = json!({
        "source": format!("path:{}", fixture("py_server").display()),
        "memory_mb": 256,
    });
    let (code, st) = d.put("/v1/meshes/dk/services/use", spec).await;
    assert_eq!(code, 200, "{st}");
    assert_eq!(d.call("dk", "use", "alloc", json!({"mb": 40})).await.0, 200);
    let text = scrape(&d).await;
    let mem = sample(
        &text,
        r#"meshbox_service_memory_bytes{mesh="dk",service="use"}"#,
    )
    .unwrap_or_else(|| panic!("no memory series:\n{text}"));
    assert!(mem > 40.0 * 1024.0 * 1024.0, "{mem}");
    let cpu = sample(
        &text,
        r#"meshbox_service_cpu_seconds_total{mesh="dk",service="use"}"#,
    )
    .unwrap_or_else(|| panic!("no cpu series:\n{text}"));
    assert!(cpu > 0.0);
}
