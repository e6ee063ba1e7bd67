//! The CLI: `meshbox run` as an MCP client's command, and the client
//! commands against a live daemon.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use common::{fixture, meshbox_bin, Daemon};
use serde_json::{json, Value};

fn cli(d: &Daemon, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(meshbox_bin())
        .args(args)
        .env("MESHBOX_URL", &d.url)
        .env_remove("MESHBOX_TOKEN")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn run_bridges_stdio_to_the_sandboxed_server() {
    // A relative path, as an MCP client config would give it.
    let mut child = Command::new(meshbox_bin())
        .current_dir(fixture(""))
        .args([
            "run",
            "--memory",
            "256m",
            "path:py_server",
            "--page-size",
            "100",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut send = |v: Value| writeln!(stdin, "{v}").unwrap();
    send(
        json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}}),
    );
    send(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
    send(json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}));
    send(
        json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "add", "arguments": {"a": 20, "b": 22}}}),
    );
    let mut read = || {
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        serde_json::from_str::<Value>(&line).unwrap()
    };
    assert_eq!(read()["result"]["protocolVersion"], "2025-06-18");
    assert_eq!(
        read()["result"]["tools"].as_array().unwrap().len(),
        common::FIXTURE_TOOLS
    );
    assert_eq!(read()["result"]["content"][0]["text"], "42");
    drop(stdin); // the client goes away: the server sees EOF and exits
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(
        err.contains("py-fixture started"),
        "server stderr passes through: {err}"
    );
}

#[test]
fn run_reports_bad_sources_as_one_error_line() {
    let out = Command::new(meshbox_bin())
        .args(["run", "npm:../../x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("error: invalid source"), "{err}");
}

#[tokio::test]
async fn client_commands_drive_the_daemon() {
    let d = Daemon::start();
    let dir = fixture("py_server");
    let dir = dir.to_str().unwrap();
    let (code, out, err) = cli(
        &d,
        &[
            "deploy",
            "acme/time",
            &format!("path:{dir}"),
            "--memory",
            "128m",
            "--env",
            "A=1",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!(
            "acme/time running ({} tools",
            common::FIXTURE_TOOLS
        )),
        "{out}"
    );

    let (code, out, _) = cli(&d, &["ls", "acme"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("acme/time") && out.contains("running"),
        "{out}"
    );

    let (code, out, _) = cli(&d, &["status", "acme/time"]);
    assert_eq!(code, 0);
    let st: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(st["limits"]["memory_mb"], 128);
    assert_eq!(st["env"], json!(["A"]));

    let (code, out, _) = cli(&d, &["tools", "acme/time"]);
    assert_eq!(code, 0);
    assert!(out.lines().any(|l| l.starts_with("echo")), "{out}");

    let (code, out, _) = cli(&d, &["call", "acme/time", "add", r#"{"a":1,"b":2}"#]);
    assert_eq!(code, 0);
    let r: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["content"][0]["text"], "3");

    let (code, _, err) = cli(&d, &["call", "acme/time", "fail"]);
    assert_eq!(code, 1, "isError exits non-zero");
    assert!(err.contains("error: the tool reported an error"), "{err}");

    let (code, _, err) = cli(&d, &["call", "acme/time", "rpc_error"]);
    assert_eq!(code, 1);
    assert!(err.contains("tool blew up"), "{err}");

    let (code, out, _) = cli(&d, &["logs", "acme/time"]);
    assert_eq!(code, 0);
    assert!(out.contains("[stderr] py-fixture started"), "{out}");
    let total = out.lines().count();
    let (code, out, _) = cli(&d, &["logs", "acme/time", "-n", "1"]);
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 1.min(total), "{out}");

    let (code, out, _) = cli(&d, &["restart", "acme/time"]);
    assert_eq!(code, 0);
    assert!(out.contains("running"), "{out}");

    // `logs -f` prints lines as they come.
    let mut follow = Command::new(meshbox_bin())
        .args(["logs", "acme/time", "-f", "-n", "0"])
        .env("MESHBOX_URL", &d.url)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = follow.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    std::thread::sleep(std::time::Duration::from_millis(700));
    let (code, _, _) = cli(&d, &["call", "acme/time", "crash"]);
    assert_eq!(code, 1);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|l: &String| l.contains("[meshbox] server exited: exit code 1"))
    {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => seen.push(l),
            Err(_) => panic!("logs -f never showed the exit: {seen:?}"),
        }
    }
    follow.kill().unwrap();
    let _ = follow.wait();

    let (code, _, _) = cli(&d, &["rm", "acme/time"]);
    assert_eq!(code, 0);
    let (code, _, err) = cli(&d, &["status", "acme/time"]);
    assert_eq!(code, 1);
    assert_eq!(
        err.lines().next().unwrap(),
        "error: service acme/time not found"
    );

    // Usage errors: one error line, exit 2, nothing sent.
    let (code, _, err) = cli(&d, &["deploy", "no-slash", "path:/tmp"]);
    assert_eq!(code, 2);
    assert!(
        err.starts_with("error: `no-slash`: expected MESH/NAME"),
        "{err}"
    );
    let (code, _, err) = cli(&d, &["deploy", "a/b c", "path:/tmp"]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = cli(&d, &["deploy", "a/b", "path:/tmp", "--memory", "lots"]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = cli(&d, &["call", "a/b", "t", "{not json"]);
    assert_eq!(code, 2);
    assert!(err.contains("not valid JSON"), "{err}");
    // A failed deploy prints the error and the server's last log lines.
    let (code, _, err) = cli(
        &d,
        &[
            "deploy",
            "acme/dead",
            &format!("path:{dir}"),
            "--",
            "--exit-during-init",
        ],
    );
    assert_eq!(code, 1);
    assert!(
        err.starts_with("error: service acme/dead failed to start"),
        "{err}"
    );
    assert!(err.contains("fixture: exiting during initialize"), "{err}");
}

#[test]
fn unreachable_daemon_is_one_clear_error() {
    let out = Command::new(meshbox_bin())
        .args(["ls"])
        .env("MESHBOX_URL", "http://127.0.0.1:9")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("error: cannot reach meshbox at http://127.0.0.1:9"),
        "{err}"
    );
    assert!(err.contains("caused by:"), "{err}");
}

#[tokio::test]
async fn listing_json_closed_pipes_and_failed_deploys() {
    let d = Daemon::start();
    let py = format!("path:{}", fixture("py_server").display());
    for key in ["acme/a", "acme/b", "beta/c"] {
        let (code, _, err) = cli(&d, &["deploy", key, &py]);
        assert_eq!(code, 0, "{err}");
    }
    // `ls` with no argument lists every mesh.
    let (code, out, _) = cli(&d, &["ls"]);
    assert_eq!(code, 0);
    let rows: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows,
        vec![
            vec!["MESH", "SERVICES"],
            vec!["acme", "2"],
            vec!["beta", "1"]
        ],
        "{out}"
    );
    let (code, out, _) = cli(&d, &["ls", "--json"]);
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v,
        json!({"meshes": [{"name": "acme", "services": 2}, {"name": "beta", "services": 1}]})
    );
    // `ls MESH` stays the table scripts read; `--json` is the API's answer.
    let (_, out, _) = cli(&d, &["ls", "acme"]);
    assert!(out.starts_with("NAME"), "{out}");
    assert_eq!(out.lines().count(), 3, "{out}");
    let (_, out, _) = cli(&d, &["ls", "acme", "--json"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["services"].as_array().unwrap().len(), 2);
    let (_, out, _) = cli(&d, &["tools", "acme/a", "--json"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["tools"].as_array().unwrap().len(), common::FIXTURE_TOOLS);
    assert!(v["tools"][0]["inputSchema"].is_object());
    let (_, out, _) = cli(&d, &["status", "acme/a", "--json"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["status"], "running");

    // `meshbox tools X | head -1`: the reader goes away; no panic, no noise.
    for args in [
        vec!["tools", "acme/a"],
        vec!["ls", "acme"],
        vec!["logs", "acme/a"],
        vec!["status", "acme/a"],
    ] {
        let mut child = Command::new(meshbox_bin())
            .args(&args)
            .env("MESHBOX_URL", &d.url)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
        assert!(err.is_empty(), "{args:?}: {err}");
    }

    // A server that explains itself on stderr and exits: the reason is shown
    // under the error, not only in `meshbox logs`.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("package.json"),
        r#"{"name":"needs-key","version":"1.0.0","bin":{"needs-key":"index.js"}}"#,
    )
    .unwrap();
    std::fs::write(
        dir.path().join("index.js"),
        "console.error('BRAVE_API_KEY environment variable is required');\nprocess.exit(1);\n",
    )
    .unwrap();
    let (code, _, err) = cli(
        &d,
        &[
            "deploy",
            "acme/brave",
            &format!("path:{}", dir.path().display()),
        ],
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.starts_with("error: service acme/brave failed to start"),
        "{err}"
    );
    let under = err
        .split_once("server stderr (last lines):\n")
        .map(|(_, rest)| rest)
        .unwrap_or_else(|| panic!("no stderr section: {err}"));
    assert!(
        under.contains("  BRAVE_API_KEY environment variable is required"),
        "{err}"
    );
}

#[test]
fn runtime_failures_exit_1_and_usage_errors_2() {
    let out = Command::new(meshbox_bin())
        .args(["images", "build", "node"])
        .env("DOCKER_HOST", "unix:///nonexistent/docker.sock")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with("error: cannot reach the docker engine"),
        "{err}"
    );
    let out = Command::new(meshbox_bin())
        .args(["images", "build", "ruby"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    // A data dir that is a file: a runtime failure, not a usage error.
    let f = tempfile::NamedTempFile::new().unwrap();
    let out = Command::new(meshbox_bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(f.path())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(meshbox_bin())
        .args(["serve"])
        .env("RUNNER_PORT", "not-a-port")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("RUNNER_PORT"));
}

#[test]
fn doctor_reports_the_tools_installs_need() {
    let out = Command::new(meshbox_bin())
        .arg("doctor")
        .env("DOCKER_HOST", "unix:///nonexistent/docker.sock")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    for tool in ["node", "npm", "python3", "uv", "git", "bun"] {
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{tool} ")))
            .unwrap_or_else(|| panic!("no line for {tool}: {text}"));
        let found = Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if found {
            assert!(!line.contains("not found"), "{line}");
            assert!(
                line.chars().any(|c| c.is_ascii_digit()),
                "a version: {line}"
            );
        } else {
            assert!(line.contains("not found: "), "{line}");
        }
    }
    // What a missing uv costs is said, whether or not it is here.
    assert!(text.contains("docker engine: not reachable"), "{text}");
    // Without PATH, nothing is found and each says what is lost.
    let out = Command::new(meshbox_bin())
        .arg("doctor")
        .env("PATH", "/nonexistent")
        .env("DOCKER_HOST", "unix:///nonexistent/docker.sock")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("uv       not found: pypi: installs fall back to python3 -m venv + pip"),
        "{text}"
    );
    assert!(
        text.contains("git      not found: git: sources cannot be cloned"),
        "{text}"
    );
}
