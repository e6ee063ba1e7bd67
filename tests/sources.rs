//! Sources from npm, PyPI and git (real registries, a local file:// repo),
//! dependency installs for path sources, the warm cache, and hostile sources.
//!
//! Tests that reach npm or PyPI are `#[ignore = "needs registry"]`: run them
//! with `cargo test --test sources -- --ignored`; they need node, npm and
//! python3 on PATH and the registries reachable, and fail when they are not.

mod common;

use std::path::Path;
use std::process::Command;

use common::{fixture, text_of, Daemon};
use serde_json::{json, Value};

/// Lists every file under `dir`, relative, for "nothing was written" checks.
fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p.clone());
            }
            out.push(p.strip_prefix(dir).unwrap().display().to_string());
        }
    }
    out
}

/// Fails the test clearly when the registry lane's tools are missing.
fn needs_registry() {
    for tool in ["node", "npm", "python3"] {
        let found = Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(found, "needs registry: `{tool}` is not on PATH");
    }
}

fn tool_names(st: &Value) -> Vec<String> {
    st["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_owned())
        .collect()
}

fn git(dir: &Path, args: &[&str]) {
    let ok = Command::new("git")
        .args([
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .current_dir(dir)
        .status()
        .unwrap()
        .success();
    assert!(ok, "git {args:?}");
}

#[tokio::test]
#[ignore = "needs registry"]
async fn npm_server_everything_installs_once() {
    needs_registry();
    let d = Daemon::start();
    let spec = json!({"source": "npm:@modelcontextprotocol/server-everything", "args": ["stdio"]});
    let (code, st) = d
        .put("/v1/meshes/reg/services/everything", spec.clone())
        .await;
    assert_eq!(code, 200, "{st}");
    assert_eq!(st["runtime"], "node");
    let names = tool_names(&st);
    assert!(
        names.contains(&"echo".to_owned()) && names.contains(&"get-sum".to_owned()),
        "{names:?}"
    );
    let (code, r) = d
        .call("reg", "everything", "get-sum", json!({"a": 2, "b": 3}))
        .await;
    assert_eq!(code, 200, "{r}");
    assert!(text_of(&r).contains('5'), "{r}");
    let (_, logs) = d
        .get("/v1/meshes/reg/services/everything/logs?lines=100")
        .await;
    assert!(
        logs["lines"]
            .to_string()
            .contains("installing npm @modelcontextprotocol/server-everything@"),
        "{logs}"
    );

    // Keyed by resolved name@version in the cache.
    let npm = d.data.path().join("cache/npm");
    let entries: Vec<String> = std::fs::read_dir(&npm)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert!(
        entries[0].starts_with("@modelcontextprotocol+server-everything@"),
        "{entries:?}"
    );
    drop(d.delete("/v1/meshes/reg/services/everything").await);

    // A second daemon on the same data dir (the first gone: one daemon per
    // data dir) with the registry unreachable: the deploy still works, so it
    // downloaded nothing.
    let data = d.data.path().to_path_buf();
    let mut d = d;
    d.terminate();
    let offline = Daemon::start_on(&data, &[("npm_config_registry", "http://127.0.0.1:9/")]);
    let (code, st) = offline.put("/v1/meshes/reg/services/again", spec).await;
    assert_eq!(code, 200, "{st}");
    let (_, logs) = offline
        .get("/v1/meshes/reg/services/again/logs?lines=100")
        .await;
    assert!(!logs["lines"].to_string().contains("installing"), "{logs}");
}

#[tokio::test]
#[ignore = "needs registry"]
async fn pypi_mcp_server_time_installs_once() {
    needs_registry();
    let mut d = Daemon::start();
    let spec = json!({"source": "pypi:mcp-server-time"});
    let (code, st) = d.put("/v1/meshes/reg/services/time", spec.clone()).await;
    assert_eq!(code, 200, "{st}");
    assert_eq!(st["runtime"], "python");
    assert!(
        tool_names(&st).contains(&"get_current_time".to_owned()),
        "{st}"
    );
    let (code, r) = d
        .call(
            "reg",
            "time",
            "get_current_time",
            json!({"timezone": "UTC"}),
        )
        .await;
    assert_eq!(code, 200, "{r}");
    assert!(text_of(&r).contains("UTC"), "{r}");

    let data = d.data.path().to_path_buf();
    d.kill(); // its data dir lives on with `d`
    let offline = Daemon::start_on(
        &data,
        &[
            ("PIP_INDEX_URL", "http://127.0.0.1:9/simple"),
            ("PIP_FIND_LINKS", "/nonexistent"),
        ],
    );
    let (code, st) = offline.put("/v1/meshes/reg/services/time2", spec).await;
    assert_eq!(code, 200, "{st}");
}

#[tokio::test]
async fn git_file_repo_clones_by_commit_and_reuses_it() {
    let d = Daemon::start();
    let repo = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("py_server/server.py"),
        repo.path().join("server.py"),
    )
    .unwrap();
    git(repo.path(), &["init", "--quiet"]);
    git(repo.path(), &["add", "."]);
    git(repo.path(), &["commit", "--quiet", "-m", "server"]);
    git(repo.path(), &["tag", "v1"]);
    let url = format!("file://{}", repo.path().display());

    let (code, st) = d
        .put(
            "/v1/meshes/g/services/s",
            json!({"source": format!("git:{url}#main")}),
        )
        .await;
    assert_eq!(code, 200, "{st}");
    assert_eq!(st["runtime"], "python");
    let (_, r) = d.call("g", "s", "add", json!({"a": 1, "b": 2})).await;
    assert_eq!(text_of(&r), "3");
    let sha = String::from_utf8(
        Command::new("git")
            .args(["rev-parse", "HEAD"])
            .current_dir(repo.path())
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let cached = d.data.path().join("cache/git").join(sha.trim());
    assert!(
        cached.join("server.py").is_file(),
        "cache keyed by commit sha"
    );

    // The tag names the same commit: no second clone.
    let (code, _) = d
        .put(
            "/v1/meshes/g/services/t",
            json!({"source": format!("git:{url}#v1")}),
        )
        .await;
    assert_eq!(code, 200);
    let (_, logs) = d.get("/v1/meshes/g/services/t/logs").await;
    assert!(!logs["lines"].to_string().contains("cloning"), "{logs}");
    // A commit sha as the ref works, and an unknown ref fails the deploy cleanly.
    let (code, st) = d
        .put(
            "/v1/meshes/g/services/u",
            json!({"source": format!("git:{url}#{}", sha.trim())}),
        )
        .await;
    assert_eq!(code, 200, "{st}");
    let (code, e) = d
        .put(
            "/v1/meshes/g/services/v",
            json!({"source": format!("git:{url}#nope")}),
        )
        .await;
    assert_eq!(code, 502, "{e}");
    assert!(
        e["error"].as_str().unwrap().contains("`nope` not found"),
        "{e}"
    );

    // Legacy /load with gitUrl + gitBranch.
    let (code, r) = d
        .post(
            "/load",
            json!({"name": "legacy-git", "gitUrl": url, "gitBranch": "main"}),
        )
        .await;
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["status"], "running");
}

/// Every file under `dir` with its content, for "untouched" checks.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = files_under(dir)
        .into_iter()
        .map(|f| {
            let bytes = std::fs::read(dir.join(&f)).unwrap_or_default();
            (f, bytes)
        })
        .collect();
    out.sort();
    out
}

#[tokio::test]
#[ignore = "needs registry"]
async fn path_sources_install_dependencies_and_build() {
    needs_registry();
    let d = Daemon::start();
    let server = std::fs::read_to_string(fixture("node_server/server.js")).unwrap();
    // Node: a dependency to install and a build step that makes the entry,
    // both in meshbox's cache; the directory is left as it was.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("server.src.js"),
        format!("{server}\nrequire('is-number');\n"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("build.js"),
        "const fs=require('fs');fs.mkdirSync('dist',{recursive:true});fs.copyFileSync('server.src.js','dist/index.js');",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("package.json"),
        r#"{"name":"built","version":"1.0.0","private":true,"dependencies":{"is-number":"7.0.0"},"scripts":{"build":"node build.js"}}"#,
    )
    .unwrap();
    let before = snapshot(dir.path());
    let (code, st) = d
        .put(
            "/v1/meshes/p/services/node",
            json!({"source": format!("path:{}", dir.path().display())}),
        )
        .await;
    assert_eq!(code, 200, "{st}");
    assert_eq!(
        snapshot(dir.path()),
        before,
        "the build wrote into the directory"
    );
    let (_, r) = d.call("p", "node", "add", json!({"a": 2, "b": 2})).await;
    assert_eq!(text_of(&r), "4");

    // Node, no build: CommonJS and ES modules find the cached dependency.
    for (name, pkg, code_js) in [
        (
            "cjs",
            r#"{"name":"cjs","version":"1.0.0","main":"server.js","dependencies":{"is-number":"7.0.0"}}"#,
            format!("{server}\nif (!require('is-number')(1)) process.exit(3);\n"),
        ),
        (
            "esm",
            r#"{"name":"esm","version":"1.0.0","type":"module","main":"server.js","dependencies":{"is-number":"7.0.0"}}"#,
            server
                .replace("#!/usr/bin/env node\n", "")
                .replace(
                    "const readline = require(\"node:readline\");",
                    "import readline from \"node:readline\";\nimport isNumber from \"is-number\";\nif (!isNumber(1)) process.exit(3);",
                ),
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("package.json"), pkg).unwrap();
        std::fs::write(dir.path().join("server.js"), code_js).unwrap();
        let before = snapshot(dir.path());
        let (code, st) = d
            .put(
                &format!("/v1/meshes/p/services/{name}"),
                json!({"source": format!("path:{}", dir.path().display())}),
            )
            .await;
        assert_eq!(code, 200, "{name}: {st}");
        assert_eq!(snapshot(dir.path()), before, "{name}: directory changed");
        let (_, r) = d.call("p", name, "add", json!({"a": 1, "b": 2})).await;
        assert_eq!(text_of(&r), "3", "{name}");
    }

    // Python: requirements.txt goes into a venv in the cache that runs the
    // server; the directory gets no .venv.
    let py = tempfile::tempdir().unwrap();
    std::fs::copy(fixture("py_server/server.py"), py.path().join("server.py")).unwrap();
    std::fs::write(py.path().join("requirements.txt"), "six\n").unwrap();
    let before = snapshot(py.path());
    let (code, st) = d
        .put(
            "/v1/meshes/p/services/py",
            json!({"source": format!("path:{}", py.path().display())}),
        )
        .await;
    assert_eq!(code, 200, "{st}");
    assert_eq!(snapshot(py.path()), before);
    let (code, r) = d.call("p", "py", "env", json!({})).await;
    assert_eq!(code, 200, "{r}");
}

/// `meshbox run` started the way an MCP client starts it, with nothing but
/// PATH and HOME: the install still trusts the system CA store (a
/// TLS-intercepting proxy's CA lives there) and the server answers.
fn run_with_bare_environment(source: &str, server_args: &[&str]) {
    let home = tempfile::tempdir().unwrap();
    run_in_home(home.path(), source, server_args);
}

fn run_in_home(home: &Path, source: &str, server_args: &[&str]) {
    use std::io::{BufRead, BufReader, Write};
    needs_registry();
    let mut child = Command::new(common::meshbox_bin())
        .arg("run")
        .arg(source)
        .arg("--")
        .args(server_args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap())
        .env("HOME", home)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(
            br#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}
"#,
        )
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains(r#""id":1"#) {
                let _ = tx.send(line);
                return;
            }
        }
    });
    let answer = rx.recv_timeout(std::time::Duration::from_secs(300));
    drop(stdin);
    let _ = child.kill();
    let _ = child.wait();
    let answer = answer.unwrap_or_else(|_| panic!("{source}: no initialize answer within 300 s"));
    assert!(answer.contains(r#""result""#), "{source}: {answer}");
}

#[test]
#[ignore = "needs registry"]
fn run_installs_npm_with_only_path_and_home() {
    run_with_bare_environment("npm:@modelcontextprotocol/server-everything", &["stdio"]);
}

#[test]
#[ignore = "needs registry"]
fn run_installs_pypi_with_only_path_and_home() {
    run_with_bare_environment("pypi:mcp-server-time", &[]);
}

#[tokio::test]
#[ignore = "needs registry"]
async fn install_failures_fail_the_service_with_the_installer_output() {
    needs_registry();
    let d = Daemon::start();
    let (code, e) = d
        .put(
            "/v1/meshes/f/services/x",
            json!({"source": "npm:@meshbox-test-nonexistent/no-such-package-zz"}),
        )
        .await;
    assert_eq!(code, 502, "{e}");
    let msg = e["error"].as_str().unwrap();
    assert!(msg.contains("npm view") && msg.contains("404"), "{msg}");
    let st = d.status("f", "x").await;
    assert_eq!(st["status"], "failed");
    assert!(st["last_error"].as_str().unwrap().contains("404"), "{st}");
    // A broken dependency in a path source: npm's own stderr tail.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("index.js"), "").unwrap();
    std::fs::write(
        dir.path().join("package.json"),
        r#"{"name":"x","version":"1.0.0","main":"index.js","dependencies":{"@meshbox-test-nonexistent/zz":"1.0.0"}}"#,
    )
    .unwrap();
    let (code, e) = d
        .put(
            "/v1/meshes/f/services/y",
            json!({"source": format!("path:{}", dir.path().display())}),
        )
        .await;
    assert_eq!(code, 502, "{e}");
    assert!(
        e["error"].as_str().unwrap().contains("npm install failed"),
        "{e}"
    );
}

#[tokio::test]
async fn hostile_sources_are_refused_and_leave_nothing_on_disk() {
    let d = Daemon::start();
    let before = files_under(d.data.path());
    for source in [
        "npm:../../x",
        "npm:@evil/../../x",
        "npm:x; rm -rf /",
        "pypi:foo; rm -rf /",
        "pypi:foo @ file:///etc",
        "pypi:-r/etc/passwd",
        "git:ext::sh -c touch% /tmp/pwned",
        "git:--upload-pack=touch /tmp/pwned",
        "git:https://example.com/r.git#--upload-pack=touch",
        "git:file:///tmp/x#a..b",
        "git:http://example.com/r.git",
        "path:relative/dir",
        "path:/tmp/../etc",
        "unknown:thing",
    ] {
        let (code, e) = d
            .put("/v1/meshes/h/services/x", json!({"source": source}))
            .await;
        assert_eq!(code, 400, "{source}: {e}");
    }
    let (code, e) = d
        .post("/load", json!({"name": "x", "npxPackage": "../../x"}))
        .await;
    assert_eq!(code, 400, "{e}");
    let (code, e) = d
        .post("/load", json!({"name": "x", "uvxPackage": "foo; rm -rf /"}))
        .await;
    assert_eq!(code, 400, "{e}");
    let (code, e) = d
        .post(
            "/load",
            json!({"name": "x", "gitUrl": "https://h/r", "gitBranch": "--upload-pack=x"}),
        )
        .await;
    assert_eq!(code, 400, "{e}");
    assert_eq!(files_under(d.data.path()), before);
    assert!(!Path::new("/tmp/pwned").exists());
    let (_, h) = d.get("/v1/health").await;
    assert_eq!(h["services"], 0);
}

#[tokio::test]
#[ignore = "needs registry"]
async fn legacy_npx_and_uvx_packages() {
    needs_registry();
    let d = Daemon::start();
    let (code, r) = d
        .post(
            "/load",
            json!({"name": "everything", "npxPackage": "@modelcontextprotocol/server-everything"}),
        )
        .await;
    // Without arguments server-everything starts its default stdio transport.
    assert_eq!(code, 200, "{r}");
    assert!(r["tools"].to_string().contains("get-sum"), "{r}");
    let (code, r) = d
        .post(
            "/load",
            json!({"name": "time", "uvxPackage": "mcp-server-time"}),
        )
        .await;
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["status"], "running");
    let (_, r) = d
        .post(
            "/call",
            json!({"name": "time", "tool": "get_current_time", "args": {"timezone": "UTC"}}),
        )
        .await;
    assert!(text_of(&r).contains("UTC"), "{r}");
}

#[test]
#[ignore = "needs registry"]
fn two_runs_of_one_cold_package_at_once_both_start() {
    // One HOME, so one data dir and one cache: the installs meet there.
    let home = tempfile::tempdir().unwrap();
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                run_in_home(
                    home.path(),
                    "npm:@modelcontextprotocol/server-everything",
                    &["stdio"],
                )
            });
        }
    });
}
