//! The seed's production topology, as the README describes it: one meshbox
//! per mesh inside a container from the runner image, listening on 0.0.0.0
//! with no token (`--insecure-no-auth`), reached only by a broker on a
//! private docker network. A broker-like client in a second container drives
//! the legacy routes without any `Authorization` header.
//!
//! Lane: `needs docker` (an engine, the docker CLI, `meshbox/runner-python`).
//! The container runs this build's meshbox (bind-mounted over the image's).

mod common;

use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use common::{fixture, meshbox_bin};
use serde_json::Value;

const IMAGE: &str = "meshbox/runner-python:latest";

fn docker(args: &[&str]) -> std::process::Output {
    Command::new("docker")
        .args(args)
        .output()
        .expect("needs the docker CLI")
}

/// Removes what the test created, however it ends.
struct Cleanup {
    containers: Vec<String>,
    network: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = docker(&["rm", "-f", c]);
        }
        let _ = docker(&["network", "rm", &self.network]);
    }
}

/// The broker: waits for the runner, then speaks the seed's legacy API with
/// no token, and prints what it got as one JSON object.
const BROKER: &str = r#"
import json, sys, time, urllib.request, urllib.error
base = sys.argv[1]
def req(method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    r = urllib.request.Request(base + path, data=data, method=method,
                               headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(r, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
deadline = time.time() + 60
while True:
    try:
        health = req("GET", "/v1/health")
        break
    except Exception:
        if time.time() > deadline:
            raise
        time.sleep(0.2)
out = {"v1_health": health}
out["load"] = req("POST", "/load", {"name": "time", "sourcePath": "/srv/py_server",
                                     "runtime": "python", "env": {"A": 1}, "meshId": "m-1"})
out["call"] = req("POST", "/call", {"name": "time", "tool": "add", "args": {"a": 20, "b": 22}})
out["list"] = req("GET", "/list?name=time")
out["health"] = req("GET", "/health")
out["unload"] = req("POST", "/unload", {"name": "time"})
print(json.dumps(out))
"#;

#[test]
#[ignore = "needs docker"]
fn a_broker_reaches_the_legacy_routes_of_a_meshbox_in_a_container_without_a_token() {
    let info = docker(&["info", "--format", "{{.ServerVersion}}"]);
    assert!(info.status.success(), "needs a docker engine");
    assert!(
        docker(&["image", "inspect", IMAGE]).status.success(),
        "needs {IMAGE} (make images-local)"
    );
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let tag = format!("{}-{nanos:08x}", std::process::id());
    let network = format!("meshbox-topo-{tag}");
    let runner = format!("meshbox-topo-runner-{tag}");
    let mut cleanup = Cleanup {
        containers: vec![runner.clone()],
        network: network.clone(),
    };
    // A private network: the broker and the runner, no way out.
    let net = docker(&["network", "create", "--internal", &network]);
    assert!(
        net.status.success(),
        "{}",
        String::from_utf8_lossy(&net.stderr)
    );
    let bin_mount = format!("{}:/usr/local/bin/meshbox:ro", meshbox_bin());
    let fixture_mount = format!("{}:/srv/py_server:ro", fixture("py_server").display());
    let started = docker(&[
        "run",
        "-d",
        "--name",
        &runner,
        "--network",
        &network,
        "-v",
        &bin_mount,
        "-v",
        &fixture_mount,
        IMAGE,
        "meshbox",
        "serve",
        "--backend",
        "process",
        "--listen",
        "0.0.0.0:7901",
        "--insecure-no-auth",
        "--data-dir",
        "/tmp/meshbox",
    ]);
    assert!(
        started.status.success(),
        "{}",
        String::from_utf8_lossy(&started.stderr)
    );
    let broker = format!("meshbox-topo-broker-{tag}");
    cleanup.containers.push(broker.clone());
    let url = format!("http://{runner}:7901");
    let out = docker(&[
        "run",
        "--name",
        &broker,
        "--network",
        &network,
        IMAGE,
        "python3",
        "-c",
        BROKER,
        &url,
    ]);
    let logs = docker(&["logs", &runner]);
    let runner_log = format!(
        "{}{}",
        String::from_utf8_lossy(&logs.stdout),
        String::from_utf8_lossy(&logs.stderr)
    );
    assert!(
        out.status.success(),
        "broker failed: {}\nrunner: {runner_log}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));

    // The operator was warned, at start and in the health answer.
    assert!(
        runner_log.contains("warning: no authentication"),
        "{runner_log}"
    );
    let (code, health) = (&got["v1_health"][0], &got["v1_health"][1]);
    assert_eq!(code, 200);
    assert!(
        health["warning"]
            .as_str()
            .is_some_and(|w| w.contains("--insecure-no-auth")),
        "{health}"
    );
    // The legacy routes work with no Authorization header.
    assert_eq!(got["load"][0], 200, "{}", got["load"]);
    assert_eq!(got["load"][1]["status"], "running");
    assert_eq!(
        got["load"][1]["tools"].as_array().map(Vec::len),
        Some(common::FIXTURE_TOOLS)
    );
    assert_eq!(got["call"][0], 200);
    assert_eq!(got["call"][1]["result"]["content"][0]["text"], "42");
    assert_eq!(
        got["list"][1]["tools"].as_array().map(Vec::len),
        Some(common::FIXTURE_TOOLS)
    );
    assert_eq!(got["health"][1]["services"][0]["status"], "running");
    assert_eq!(got["unload"][0], 200);
    assert_eq!(got["unload"][1]["ok"], true);
    drop(cleanup);
}
