//! Sources from npm, PyPI and git (real registries, a local file:// repo),
//! dependency installs for path sources, the warm cache, and hostile sources.

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
async fn npm_server_everything_installs_once() {
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

    // A second daemon on the same data dir with the registry unreachable:
    // the deploy still works, so it downloaded nothing.
    let data = d.data.path().to_path_buf();
    let offline = Daemon::start_on(&data, &[("npm_config_registry", "http://127.0.0.1:9/")]);
    let (code, st) = offline.put("/v1/meshes/reg/services/again", spec).await;
    assert_eq!(code, 200, "{st}");
    let (_, logs) = offline
        .get("/v1/meshes/reg/services/again/logs?lines=100")
        .await;
    assert!(!logs["lines"].to_string().contains("installing"), "{logs}");
}

#[tokio::test]
async fn pypi_mcp_server_time_installs_once() {
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

#[tokio::test]
async fn path_sources_install_dependencies_and_build() {
    let d = Daemon::start();
    // Node: a dependency to install and a build step that makes the entry.
    let dir = tempfile::tempdir().unwrap();
    let server = std::fs::read_to_string(fixture("node_server/server.js")).unwrap();
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
    let (code, st) = d
        .put(
            "/v1/meshes/p/services/node",
            json!({"source": format!("path:{}", dir.path().display())}),
        )
        .await;
    assert_eq!(code, 200, "{st}");
    assert!(dir.path().join("node_modules/is-number").is_dir());
    assert!(dir.path().join("dist/index.js").is_file());
    let (_, r) = d.call("p", "node", "add", json!({"a": 2, "b": 2})).await;
    assert_eq!(text_of(&r), "4");

    // Python: requirements.txt goes into a .venv that runs the server.
    let py = tempfile::tempdir().unwrap();
    std::fs::copy(fixture("py_server/server.py"), py.path().join("server.py")).unwrap();
    std::fs::write(py.path().join("requirements.txt"), "six\n").unwrap();
    let (code, st) = d
        .put(
            "/v1/meshes/p/services/py",
            json!({"source": format!("path:{}", py.path().display())}),
        )
        .await;
    assert_eq!(code, 200, "{st}");
    assert!(py.path().join(".venv/bin/python").exists());
    let (_, r) = d.call("p", "py", "env", json!({})).await;
    assert_eq!(code, 200, "{r}");
}

#[tokio::test]
async fn install_failures_fail_the_service_with_the_installer_output() {
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
async fn legacy_npx_and_uvx_packages() {
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
