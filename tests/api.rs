//! End-to-end: `meshbox serve` on 127.0.0.1:0, driven over HTTP against the
//! fixture MCP servers (process backend).

mod common;

use std::time::{Duration, Instant};

use common::{fixture, pid_alive, text_of, Daemon};
use serde_json::{json, Value};

const UP: Duration = Duration::from_secs(20);

#[tokio::test]
async fn deploy_lists_all_pages_and_reports_honest_status() {
    let d = Daemon::start();
    let (code, health) = d.get("/v1/health").await;
    assert_eq!(code, 200);
    assert_eq!(health["ok"], true);
    assert_eq!(health["backend"], "process");
    assert_eq!(health["services"], 0);

    let (code, st) = d
        .deploy_py(
            "acme",
            "py",
            &[],
            json!({"health": {"interval_s": 1, "timeout_s": 2, "failure_threshold": 3}}),
        )
        .await;
    assert_eq!(code, 200, "{st}");
    assert_eq!(st["status"], "running");
    // Nothing has been probed yet: nothing is claimed.
    assert_eq!(st["health"], "unknown", "{st}");
    assert_eq!(st["protocol"], "2025-11-25", "{st}");
    assert_eq!(st["backend"], "process");
    assert_eq!(st["runtime"], "python");
    assert_eq!(st["mesh"], "acme");
    assert_eq!(st["name"], "py");
    assert_eq!(st["restarts"], 0);
    assert!(st["pid"].as_u64().is_some());
    assert!(st["started_at"].as_str().is_some());
    // FIXTURE_TOOLS tools served 2 per page: every page followed.
    let tools = st["tools"].as_array().unwrap();
    assert_eq!(tools.len(), common::FIXTURE_TOOLS, "{st}");
    assert_eq!(tools[common::FIXTURE_TOOLS - 1]["name"], "threads");
    // Nothing was asked, so nothing is claimed.
    assert_eq!(st["limits"]["enforced"]["memory"], false);
    assert_eq!(st["limits"]["enforced"]["cpus"], false);
    // Healthy once the first liveness probe has passed.
    d.wait_status("acme", "py", UP, |s| s["health"] == "healthy")
        .await;

    let (code, t) = d.get("/v1/meshes/acme/services/py/tools").await;
    assert_eq!(code, 200);
    assert_eq!(t["tools"].as_array().unwrap().len(), common::FIXTURE_TOOLS);
    let (code, list) = d.get("/v1/meshes/acme/services").await;
    assert_eq!(code, 200);
    assert_eq!(list["services"].as_array().unwrap().len(), 1);
    let (_, other) = d.get("/v1/meshes/other/services").await;
    assert_eq!(other["services"].as_array().unwrap().len(), 0);

    let (code, r) = d.call("acme", "py", "add", json!({"a": 2, "b": 40})).await;
    assert_eq!(code, 200, "{r}");
    assert_eq!(text_of(&r), "42");

    // isError is still a 200; a JSON-RPC error is a 502 with its code.
    let (code, r) = d.call("acme", "py", "fail", json!({})).await;
    assert_eq!(code, 200);
    assert_eq!(r["result"]["isError"], true);
    let (code, r) = d.call("acme", "py", "rpc_error", json!({})).await;
    assert_eq!(code, 502, "{r}");
    assert_eq!(r["code"], -32000);
    assert!(r["error"].as_str().unwrap().contains("tool blew up"));

    let (code, logs) = d.get("/v1/meshes/acme/services/py/logs?lines=50").await;
    assert_eq!(code, 200);
    let lines = logs["lines"].as_array().unwrap();
    let started = lines
        .iter()
        .filter_map(Value::as_str)
        .find(|l| l.contains("py-fixture started"));
    let started = started.unwrap_or_else(|| panic!("{logs}"));
    assert!(started.contains(" [stderr] "), "{started}");
    assert!(
        humantime::parse_rfc3339(started.split(' ').next().unwrap()).is_ok(),
        "{started}"
    );

    let (code, _) = d.delete("/v1/meshes/acme/services/py").await;
    assert_eq!(code, 204);
    let (code, _) = d.delete("/v1/meshes/acme/services/py").await;
    assert_eq!(code, 404);
    let (code, e) = d.get("/v1/meshes/acme/services/py").await;
    assert_eq!(code, 404);
    assert!(e["error"].as_str().unwrap().contains("acme/py"));
}

#[tokio::test]
async fn fifty_concurrent_calls_overlap() {
    let d = Daemon::start();
    let (code, st) = d.deploy_py("m", "c", &[], json!({})).await;
    assert_eq!(code, 200, "{st}");
    let started = Instant::now();
    let calls = (0..50).map(|i| {
        let d = &d;
        async move {
            let ms = 400 - (i % 10) * 30; // replies come back out of order
            let (code, r) = d.call("m", "c", "slow", json!({"ms": ms})).await;
            assert_eq!(code, 200, "{r}");
            assert_eq!(text_of(&r), format!("slept {ms}"));
        }
    });
    futures_util::future::join_all(calls).await;
    // Run one after another they would take 50 × ≥130 ms = 6.5 s or more.
    assert!(
        started.elapsed() < Duration::from_millis(6500),
        "calls did not overlap: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn crash_mid_call_fails_fast_and_restarts() {
    let d = Daemon::start();
    let (code, st) = d.deploy_py("m", "crashy", &[], json!({})).await;
    assert_eq!(code, 200, "{st}");
    let pid = st["pid"].as_u64().unwrap();

    let slow = d.call("m", "crashy", "slow", json!({"ms": 20000}));
    let crash = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        d.call("m", "crashy", "crash", json!({})).await
    };
    let started = Instant::now();
    let ((slow_code, slow_body), (crash_code, crash_body)) = tokio::join!(slow, crash);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "pending calls waited {:?}",
        started.elapsed()
    );
    assert_eq!(crash_code, 503, "{crash_body}");
    assert!(
        crash_body["error"]
            .as_str()
            .unwrap()
            .contains("exit code 1"),
        "{crash_body}"
    );
    assert_eq!(slow_code, 503, "{slow_body}");

    // A call made while it restarts waits for it instead of failing.
    let (code, r) = d.call("m", "crashy", "echo", json!({"text": "back"})).await;
    assert_eq!(code, 200, "{r}");
    assert_eq!(text_of(&r), "back");
    let st = d.status("m", "crashy").await;
    assert_eq!(st["status"], "running");
    assert_eq!(st["restarts"], 1);
    assert_eq!(st["last_exit"]["code"], 1);
    assert_eq!(st["last_exit"]["oom_killed"], false);
    assert_ne!(st["pid"].as_u64().unwrap(), pid);
    let (_, logs) = d.get("/v1/meshes/m/services/crashy/logs?lines=100").await;
    let all = logs["lines"].to_string();
    assert!(all.contains("crashing on purpose"), "{all}");
    assert!(
        all.contains("[meshbox] server exited: exit code 1"),
        "{all}"
    );
}

#[tokio::test]
async fn silent_server_times_out_and_stays_usable() {
    let d = Daemon::start();
    let (code, _) = d
        .deploy_py("m", "hang", &[], json!({"call_timeout_ms": 800}))
        .await;
    assert_eq!(code, 200);
    let (code, r) = d.call("m", "hang", "hang", json!({})).await;
    assert_eq!(code, 504, "{r}");
    assert!(r["error"].as_str().unwrap().contains("800ms"), "{r}");
    // A per-call timeout overrides the spec's.
    let (code, _) = d
        .post(
            "/v1/meshes/m/services/hang/call",
            json!({"tool": "hang", "timeout_ms": 100}),
        )
        .await;
    assert_eq!(code, 504);
    let (code, r) = d
        .call("m", "hang", "echo", json!({"text": "still here"}))
        .await;
    assert_eq!(code, 200);
    assert_eq!(text_of(&r), "still here");
    // The server was told about the cancellation.
    let (_, logs) = d.get("/v1/meshes/m/services/hang/logs").await;
    assert!(logs["lines"].to_string().contains("cancelled"), "{logs}");
    assert_eq!(d.status("m", "hang").await["restarts"], 0);
}

#[tokio::test]
async fn garbage_on_stdout_is_logged_not_fatal() {
    let d = Daemon::start();
    let (code, st) = d.deploy_py("m", "g", &["--garbage"], json!({})).await;
    assert_eq!(code, 200, "{st}");
    assert_eq!(st["tools"].as_array().unwrap().len(), common::FIXTURE_TOOLS);
    for i in 0..5 {
        let (code, r) = d
            .call("m", "g", "echo", json!({"text": format!("n{i}")}))
            .await;
        assert_eq!(code, 200);
        assert_eq!(text_of(&r), format!("n{i}"));
    }
    let (_, logs) = d.get("/v1/meshes/m/services/g/logs?lines=1000").await;
    let all = logs["lines"].to_string();
    assert!(all.contains("[stdout] this is not json"), "{all}");
    assert!(all.contains("[stdout] {broken json"), "{all}");
}

#[tokio::test]
async fn ten_megabyte_reply() {
    let d = Daemon::start();
    let (code, _) = d.deploy_py("m", "big", &[], json!({})).await;
    assert_eq!(code, 200);
    let (code, r) = d
        .call("m", "big", "big", json!({"bytes": 10_000_000}))
        .await;
    assert_eq!(code, 200);
    assert_eq!(text_of(&r).len(), 10_000_000);
    let (code, r) = d.call("m", "big", "echo", json!({"text": "after"})).await;
    assert_eq!(code, 200);
    assert_eq!(text_of(&r), "after");
}

#[tokio::test]
async fn exit_during_initialize_fails_with_log_tail() {
    let d = Daemon::start();
    let (code, e) = d
        .deploy_py("m", "dead", &["--exit-during-init"], json!({}))
        .await;
    assert_eq!(code, 502, "{e}");
    let msg = e["error"].as_str().unwrap();
    assert!(
        msg.contains("exited during initialize") && msg.contains("exit code 3"),
        "{msg}"
    );
    let logs = e["logs"].to_string();
    assert!(
        logs.contains("fixture: exiting during initialize"),
        "{logs}"
    );
    let st = d.status("m", "dead").await;
    assert_eq!(st["status"], "failed");
    assert_eq!(st["last_exit"]["code"], 3);
    // Calls to a failed service get 503 at once.
    let (code, r) = d.call("m", "dead", "echo", json!({})).await;
    assert_eq!(code, 503, "{r}");
}

#[tokio::test]
async fn node_fixture_serves_tools() {
    let d = Daemon::start();
    let (code, st) = d
        .put(
            "/v1/meshes/m/services/node",
            json!({"source": format!("path:{}", fixture("node_server").display())}),
        )
        .await;
    assert_eq!(code, 200, "{st}");
    assert_eq!(st["runtime"], "node");
    assert_eq!(st["tools"].as_array().unwrap().len(), 4);
    let (code, r) = d.call("m", "node", "add", json!({"a": 1, "b": 2})).await;
    assert_eq!(code, 200);
    assert_eq!(text_of(&r), "3");
}

#[tokio::test]
async fn redeploy_replaces_and_restart_restarts() {
    let d = Daemon::start();
    let (_, first) = d.deploy_py("m", "r", &[], json!({})).await;
    let (code, second) = d
        .deploy_py("m", "r", &[], json!({"call_timeout_ms": 1000}))
        .await;
    assert_eq!(code, 200);
    assert_ne!(first["pid"], second["pid"]);
    assert!(
        !pid_alive(first["pid"].as_u64().unwrap() as u32),
        "old server left running"
    );
    let (_, list) = d.get("/v1/meshes/m/services").await;
    assert_eq!(list["services"].as_array().unwrap().len(), 1);

    let (code, st) = d.post("/v1/meshes/m/services/r/restart", json!(null)).await;
    assert_eq!(code, 200, "{st}");
    assert_eq!(st["status"], "running");
    assert_ne!(st["pid"], second["pid"]);
    assert_eq!(st["restarts"], 1);
}

#[tokio::test]
async fn failing_pings_restart_the_server() {
    let d = Daemon::start();
    let health = json!({"health": {"interval_s": 1, "timeout_s": 1, "failure_threshold": 2}});
    let (code, st) = d.deploy_py("m", "deaf", &["--no-ping"], health).await;
    assert_eq!(code, 200, "{st}");
    let first = st["pid"].clone();
    let st = d
        .wait_status("m", "deaf", UP, |s| {
            s["restarts"].as_u64() >= Some(1) && s["status"] == "running"
        })
        .await;
    assert_ne!(st["pid"], first);
    let (_, logs) = d.get("/v1/meshes/m/services/deaf/logs?lines=200").await;
    assert!(
        logs["lines"].to_string().contains("liveness checks failed"),
        "{logs}"
    );
}

#[tokio::test]
async fn readiness_tool_error_marks_unhealthy_without_a_restart() {
    let d = Daemon::start();
    let health = json!({"health": {"interval_s": 1, "timeout_s": 2, "failure_threshold": 2, "tool": "fail"}});
    let (code, st) = d.deploy_py("m", "unready", &[], health).await;
    assert_eq!(code, 200);
    let pid = st["pid"].clone();
    let st = d
        .wait_status("m", "unready", UP, |s| s["health"] == "unhealthy")
        .await;
    // The probe's own message, and the same process: readiness never restarts.
    assert!(
        st["health_error"]
            .as_str()
            .unwrap_or("")
            .contains("isError"),
        "{st}"
    );
    assert_eq!((st["restarts"].clone(), st["pid"].clone()), (json!(0), pid));
    assert_eq!(st["status"], "running");
    // A readiness tool that succeeds keeps it healthy.
    let health = json!({"health": {"interval_s": 1, "timeout_s": 2, "failure_threshold": 1, "tool": "echo", "arguments": {"text": "ok"}}});
    let (code, _) = d.deploy_py("m", "ready", &[], health).await;
    assert_eq!(code, 200);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let st = d.status("m", "ready").await;
    assert_eq!(
        (st["restarts"].clone(), st["health"].clone()),
        (json!(0), json!("healthy")),
        "{st}"
    );
}

#[tokio::test]
async fn servers_get_a_curated_environment() {
    let d = Daemon::start_with(
        &[],
        &[
            ("AWS_SECRET_ACCESS_KEY", "leak-me"),
            ("MESHBOX_SECRET_TEST", "x"),
        ],
    );
    let secret = d.data.path().join("secrets/secret.txt");
    std::fs::write(&secret, "from-file\n").unwrap();
    let (code, st) = d
        .deploy_py(
            "m",
            "env",
            &[],
            json!({"env": {"API_KEY": "k1", "FROM_FILE": {"file": secret}}}),
        )
        .await;
    assert_eq!(code, 200, "{st}");
    assert_eq!(st["env"], json!(["API_KEY", "FROM_FILE"]), "keys only");
    assert!(!st.to_string().contains("k1") && !st.to_string().contains("from-file"));
    let (_, r) = d.call("m", "env", "env", json!({})).await;
    let env: Value = serde_json::from_str(&text_of(&r)).unwrap();
    assert_eq!(env["API_KEY"], "k1");
    assert_eq!(env["FROM_FILE"], "from-file");
    assert_eq!(env["LANG"], "C.UTF-8");
    assert!(env["HOME"]
        .as_str()
        .unwrap()
        .starts_with(d.data.path().to_str().unwrap()));
    for leaked in [
        "AWS_SECRET_ACCESS_KEY",
        "MESHBOX_SECRET_TEST",
        "MESHBOX_LOG",
        "CARGO_MANIFEST_DIR",
    ] {
        assert!(env.get(leaked).is_none(), "{leaked} leaked into the server");
    }
    // A missing secret fails the deploy, naming the key and no value.
    let (code, e) = d
        .deploy_py(
            "m",
            "nosecret",
            &[],
            json!({"env": {"TOKEN": {"file": d.data.path().join("secrets/missing")}}}),
        )
        .await;
    assert_eq!(code, 502, "{e}");
    assert!(e["error"].as_str().unwrap().contains("TOKEN"), "{e}");
    assert_eq!(d.status("m", "nosecret").await["status"], "failed");
}

/// Host pids of `root`'s descendants whose command line contains `needle`
/// (a server in a pid namespace only knows its own pids).
fn descendants_running(root: u32, needle: &str) -> Vec<u32> {
    let ppid = |pid: u32| -> Option<u32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit_once(") ")?.1.split(' ').nth(1)?.parse().ok()
    };
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
        })
        .filter(|pid| {
            let mut cur = *pid;
            for _ in 0..64 {
                match ppid(cur) {
                    Some(p) if p == root => return true,
                    Some(p) if p > 1 => cur = p,
                    _ => return false,
                }
            }
            false
        })
        .filter(|pid| pid_alive(*pid))
        .collect()
}

#[tokio::test]
async fn wrapper_children_are_killed_with_the_group() {
    // The wrapper runs a server outside its own source: it is mounted in.
    let fixtures = fixture("");
    let d = Daemon::start_with(&["--mount-root", fixtures.to_str().unwrap()], &[]);
    let (code, st) = d
        .put(
            "/v1/meshes/m/services/wrapped",
            json!({"source": format!("path:{}", fixture("wrapper").display()),
                   "mounts": [{"path": fixture("py_server"), "read_only": true}]}),
        )
        .await;
    assert_eq!(code, 200, "{st}");
    let wrapper_pid = st["pid"].as_u64().unwrap() as u32;
    let (_, r) = d.call("m", "wrapped", "pid", json!({})).await;
    let _: u32 = text_of(&r).parse().unwrap_or_else(|_| panic!("{r}"));
    let children = descendants_running(wrapper_pid, "py_server/server.py");
    assert_eq!(
        children.len(),
        1,
        "the tool did not run in the wrapper's child"
    );
    let child_pid = children[0];
    let (code, _) = d.delete("/v1/meshes/m/services/wrapped").await;
    assert_eq!(code, 204);
    assert!(!pid_alive(wrapper_pid), "wrapper left behind");
    assert!(!pid_alive(child_pid), "wrapper's child left behind");
}

#[tokio::test]
async fn shutdown_stops_every_server() {
    let mut d = Daemon::start();
    let (_, a) = d.deploy_py("m", "a", &[], json!({})).await;
    let (_, b) = d.deploy_py("n", "b", &[], json!({})).await;
    let status = d.terminate();
    assert!(status.success(), "{status:?}");
    for st in [a, b] {
        assert!(!pid_alive(st["pid"].as_u64().unwrap() as u32));
    }
}

#[tokio::test]
async fn legacy_routes_work_like_the_seed_runner() {
    let d = Daemon::start();
    let (code, r) = d
        .post(
            "/load",
            json!({"name": "time", "sourcePath": fixture("py_server"), "env": {"A": "1"}}),
        )
        .await;
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["status"], "running");
    assert_eq!(r["tools"].as_array().unwrap().len(), common::FIXTURE_TOOLS);
    let (code, r) = d
        .post(
            "/call",
            json!({"name": "time", "tool": "add", "args": {"a": 1, "b": 1}}),
        )
        .await;
    assert_eq!(code, 200);
    assert_eq!(text_of(&r), "2");
    let (code, r) = d
        .post(
            "/call",
            json!({"name": "time", "tool": "rpc_error", "args": {}}),
        )
        .await;
    assert_eq!(code, 200);
    assert_eq!(r["error"], "tool blew up");
    let (code, r) = d
        .post("/call", json!({"name": "nope", "tool": "add"}))
        .await;
    assert_eq!(code, 404, "{r}");
    let (_, h) = d.get("/health").await;
    assert_eq!(h["ok"], true);
    assert_eq!(h["services"][0]["name"], "time");
    assert_eq!(h["services"][0]["status"], "running");
    assert_eq!(h["services"][0]["tools"], common::FIXTURE_TOOLS);
    assert!(h["services"][0]["pid"].as_u64().is_some());
    let (_, l) = d.get("/list?name=time").await;
    assert_eq!(l["tools"].as_array().unwrap().len(), common::FIXTURE_TOOLS);
    let (_, all) = d.get("/list").await;
    assert_eq!(all["time"].as_array().unwrap().len(), common::FIXTURE_TOOLS);
    let (code, logs) = d.get("/logs?name=time&lines=5").await;
    assert_eq!(code, 200);
    assert!(logs["lines"].as_array().unwrap().len() <= 5);
    // It is the same registry as /v1, under mesh `default`.
    assert_eq!(d.status("default", "time").await["status"], "running");
    let (code, r) = d.post("/unload", json!({"name": "time"})).await;
    assert_eq!((code, r), (200, json!({"ok": true})));
    let (code, _) = d.post("/unload", json!({"name": "time"})).await;
    assert_eq!(code, 404);
    // Bad input is refused the same way as on /v1.
    let (code, r) = d
        .post("/load", json!({"name": "../x", "sourcePath": "/tmp"}))
        .await;
    assert_eq!(code, 400, "{r}");
    let (code, r) = d.post("/load", json!({"name": "x"})).await;
    assert_eq!(code, 400);
    assert!(r["error"].as_str().unwrap().contains("sourcePath"));
    let (code, r) = d
        .post("/load", json!({"name": "x", "sourcePath": "relative"}))
        .await;
    assert_eq!(code, 400, "{r}");
    let (code, r) = d
        .post("/load", json!({"name": "x", "gitUrl": "ext::sh -c id"}))
        .await;
    assert_eq!(code, 400, "{r}");
    // Unknown fields are ignored, as the seed did (tests/legacy.rs has the rest).
    let (code, r) = d
        .post(
            "/load",
            json!({"name": "x", "sourcePath": "relative", "bogus": 1}),
        )
        .await;
    assert_eq!(code, 400);
    assert!(!r["error"].as_str().unwrap().contains("bogus"), "{r}");
    let (code, r) = d.post("/load", json!({"name": "x", "sourcePath": fixture("py_server"), "runtime": "python", "env": {"B": "2"}})).await;
    assert_eq!(code, 200, "{r}");
    let (code, r) = d
        .post(
            "/load",
            json!({"name": "y", "sourcePath": fixture("py_server"), "uvxPackage": "x"}),
        )
        .await;
    assert_eq!(code, 400, "{r}");
}

#[tokio::test]
async fn bad_input_is_refused_and_changes_nothing() {
    let d = Daemon::start();
    let py = format!("path:{}", fixture("py_server").display());
    let cases: Vec<(&str, String, Value, &str)> = vec![
        (
            "PUT",
            "/v1/meshes/acme/services/bad%20name".into(),
            json!({"source": py}),
            "service name",
        ),
        (
            "PUT",
            "/v1/meshes/-acme/services/x".into(),
            json!({"source": py}),
            "mesh",
        ),
        (
            "PUT",
            format!("/v1/meshes/{}/services/x", "a".repeat(65)),
            json!({"source": py}),
            "mesh",
        ),
        (
            "PUT",
            "/v1/meshes/acme/services/x".into(),
            json!({"source": py, "bogus": true}),
            "bogus",
        ),
        (
            "PUT",
            "/v1/meshes/acme/services/x".into(),
            json!({"source": py, "memory_mb": 1}),
            "memory_mb",
        ),
        (
            "PUT",
            "/v1/meshes/acme/services/x".into(),
            json!({"source": py, "cpus": 0}),
            "cpus",
        ),
        (
            "PUT",
            "/v1/meshes/acme/services/x".into(),
            json!({"source": py, "pids": 1_000_000}),
            "pids",
        ),
        (
            "PUT",
            "/v1/meshes/acme/services/x".into(),
            json!({"source": py, "call_timeout_ms": 0}),
            "call_timeout_ms",
        ),
        (
            "PUT",
            "/v1/meshes/acme/services/x".into(),
            json!({"source": py, "args": "notalist"}),
            "invalid type",
        ),
        (
            "PUT",
            "/v1/meshes/acme/services/x".into(),
            json!({"source": "path:relative"}),
            "absolute",
        ),
        (
            "PUT",
            "/v1/meshes/acme/services/x".into(),
            json!({"source": "path:/nonexistent/dir"}),
            "does not exist",
        ),
        (
            "PUT",
            "/v1/meshes/acme/services/x".into(),
            json!({"source": "npm:../../x"}),
            "npm",
        ),
        (
            "PUT",
            "/v1/meshes/acme/services/x".into(),
            json!({"source": "pypi:foo; rm -rf /"}),
            "PyPI",
        ),
        (
            "PUT",
            "/v1/meshes/acme/services/x".into(),
            json!({"source": "git:ext::sh -c id"}),
            "git",
        ),
        (
            "PUT",
            "/v1/meshes/acme/services/x".into(),
            json!({"source": "git:https://h/r#--upload-pack=x"}),
            "ref",
        ),
        (
            "PUT",
            "/v1/meshes/acme/services/x".into(),
            json!({"source": "image:x"}),
            "image",
        ),
        (
            "PUT",
            "/v1/meshes/acme/services/x".into(),
            json!({"source": py, "network": {"allow": ["not a host"]}}),
            "network.allow",
        ),
        (
            "PUT",
            "/v1/meshes/acme/services/x".into(),
            json!({"source": py, "mounts": [{"path": "/etc"}]}),
            "mount-root",
        ),
        (
            "PUT",
            "/v1/meshes/acme/services/x".into(),
            json!({"source": py, "env": {"BAD KEY": "v"}}),
            "env",
        ),
        (
            "PUT",
            "/v1/meshes/acme/services/x".into(),
            json!({"source": format!("{py}\u{0}")}),
            "NUL",
        ),
        (
            "POST",
            "/v1/meshes/acme/services/x/call".into(),
            json!({"tool": "echo", "extra": 1}),
            "extra",
        ),
        (
            "POST",
            "/v1/meshes/acme/services/x/call".into(),
            json!({"tool": "echo", "arguments": [1]}),
            "arguments",
        ),
    ];
    for (method, path, body, needle) in cases {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let (code, r) = d.req(m, &path, Some(body.clone())).await;
        assert!(
            (400..500).contains(&code),
            "{method} {path} {body}: {code} {r}"
        );
        let msg = r["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error field: {r}"));
        assert!(
            msg.contains(needle),
            "{method} {path}: `{msg}` does not mention `{needle}`"
        );
    }
    // Not JSON, empty, and too deep.
    let raw = |body: Vec<u8>| {
        d.http
            .put(format!("{}/v1/meshes/acme/services/x", d.url))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    assert_eq!(raw(b"{not json".to_vec()).await.unwrap().status(), 400);
    assert_eq!(raw(Vec::new()).await.unwrap().status(), 400);
    let deep = format!(
        "{{\"source\":{}1{}}}",
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    assert_eq!(raw(deep.into_bytes()).await.unwrap().status(), 400);
    // Past the 1 MiB body limit.
    let huge = json!({"source": py, "args": ["x".repeat(2 * 1024 * 1024)]}).to_string();
    // A fresh client: the server closes the connection it answered 413 on.
    let resp = reqwest::Client::new()
        .put(format!("{}/v1/meshes/acme/services/x", d.url))
        .header("content-type", "application/json")
        .body(huge.into_bytes())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    let body: Value = resp.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("limit"), "{body}");

    // Nothing was created.
    let (_, h) = d.get("/v1/health").await;
    assert_eq!(h["services"], 0, "{h}");
    let homes = d.data.path().join("home");
    assert!(!homes.exists() || std::fs::read_dir(&homes).unwrap().next().is_none());
}

#[tokio::test]
async fn bearer_token_guards_everything_but_health() {
    let d = Daemon::start_with(&[], &[("MESHBOX_TOKEN", "s3cret")]);
    let anon = reqwest::Client::new();
    let r = anon
        .get(format!("{}/v1/health", d.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for path in ["/v1/meshes/m/services", "/health", "/list"] {
        let r = anon.get(format!("{}{path}", d.url)).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path}");
        let r = anon
            .get(format!("{}{path}", d.url))
            .bearer_auth("s3cre")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{path}");
    }
    let (code, _) = d.get("/v1/meshes/m/services").await;
    assert_eq!(code, 200);
    // The runner's token is invisible to the servers it runs.
    let (code, st) = d.deploy_py("m", "env", &[], json!({})).await;
    assert_eq!(code, 200, "{st}");
    let (_, r) = d.call("m", "env", "env", json!({})).await;
    let env: Value = serde_json::from_str(&text_of(&r)).unwrap();
    assert!(env.get("MESHBOX_TOKEN").is_none(), "{env}");
    assert!(!text_of(&r).contains("s3cret"));
}

#[test]
fn non_loopback_listen_without_token_is_refused() {
    let out = std::process::Command::new(common::meshbox_bin())
        .args([
            "serve",
            "--listen",
            "0.0.0.0:0",
            "--data-dir",
            "/tmp/meshbox-refuse-test",
        ])
        .env_remove("MESHBOX_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("error: refusing to listen on 0.0.0.0:0 without a token"),
        "{err}"
    );
}
