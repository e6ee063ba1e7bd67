//! Install steps: per-request timeouts (SIGTERM, then SIGKILL to the whole
//! group), dropped installs leave no process, install environments, a
//! cross-process lock per cache entry, and `path:` dependencies in the cache
//! (the user's files untouched). Fake installers on PATH: no registry.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{fixture, Daemon};
use meshbox::acquire::{AcquireError, AcquireRequest, InstallConfig, Installer, Source};
use serde_json::json;

/// A directory holding a fake `npm`, and the PATH that finds it first.
fn fake_npm(script: &str) -> (tempfile::TempDir, String) {
    let bin = tempfile::tempdir().unwrap();
    let npm = bin.path().join("npm");
    std::fs::write(&npm, format!("#!/bin/sh\n{script}")).unwrap();
    let mut perms = std::fs::metadata(&npm).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&npm, perms).unwrap();
    let path = format!("{}:/usr/local/bin:/usr/bin:/bin", bin.path().display());
    (bin, path)
}

/// Makes the package `npm install --prefix P fake-pkg@1.0.0` would.
const INSTALL_FAKE_PKG: &str = r#"
prefix=""
while [ $# -gt 0 ]; do
  case "$1" in --prefix) prefix="$2"; shift;; esac
  shift
done
mkdir -p "$prefix/node_modules/fake-pkg"
echo '{"name":"fake-pkg","version":"1.0.0","bin":{"fake-pkg":"cli.js"}}' > "$prefix/node_modules/fake-pkg/package.json"
echo 'console.log(1)' > "$prefix/node_modules/fake-pkg/cli.js"
"#;

/// Live (non-zombie) processes in process group `pgid`.
fn group_members(pgid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f[0] != "Z" && f[2].parse::<i32>() == Ok(pgid) {
            out.push(pid);
        }
    }
    out
}

fn wait_for_lines(file: &Path, n: usize, limit: Duration) -> Vec<i32> {
    let started = Instant::now();
    loop {
        let pids: Vec<i32> = std::fs::read_to_string(file)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        if pids.len() >= n {
            return pids;
        }
        assert!(
            started.elapsed() < limit,
            "the fake installer never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn installer(cache: &Path, path: &str) -> Installer {
    let mut config = InstallConfig::new(cache.to_path_buf());
    config.path = path.to_owned();
    Installer::new(config)
}

fn npm_source() -> Source {
    "npm:fake-pkg@1.0.0".parse().unwrap()
}

fn request<'a>(
    source: &'a Source,
    env: &'a BTreeMap<String, String>,
    timeout: Option<Duration>,
) -> AcquireRequest<'a> {
    AcquireRequest {
        source,
        runtime: None,
        command: None,
        args: &[],
        install_env: env,
        install_timeout: timeout,
        plan: None,
    }
}

#[tokio::test]
async fn a_dropped_install_leaves_no_process() {
    // The installer and a child it started both sleep; their pids go to $HOME/pids.
    let (_bin, path) = fake_npm(
        "echo $$ >> \"$HOME/pids\"\nsleep 1000 &\necho $! >> \"$HOME/pids\"\nsleep 1000\n",
    );
    let cache = tempfile::tempdir().unwrap();
    let installer = std::sync::Arc::new(installer(cache.path(), &path));
    let task = {
        let installer = installer.clone();
        tokio::spawn(async move {
            let source = npm_source();
            let env = BTreeMap::new();
            let progress = meshbox::acquire::install::quiet();
            installer
                .acquire(&request(&source, &env, None), None, &progress)
                .await
        })
    };
    let pids_file = cache.path().join("home/pids");
    let pids =
        tokio::task::spawn_blocking(move || wait_for_lines(&pids_file, 2, Duration::from_secs(30)))
            .await
            .unwrap();
    let pgid = pids[0];
    assert_eq!(
        group_members(pgid).len(),
        3,
        "installer, its child, its sleep"
    );
    task.abort(); // a cancelled deploy drops the install future
    let _ = task.await;
    let started = Instant::now();
    while !group_members(pgid).is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "left running after the install was dropped: {:?}",
            group_members(pgid)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_request_timeout_terms_then_kills_the_group() {
    let (_bin, path) = fake_npm(
        "trap 'echo term >> \"$HOME/log\"' TERM\necho $$ >> \"$HOME/pids\"\nsleep 1000 &\necho $! >> \"$HOME/pids\"\nwhile :; do sleep 0.1; done\n",
    );
    let cache = tempfile::tempdir().unwrap();
    let installer = installer(cache.path(), &path);
    let source = npm_source();
    let env = BTreeMap::new();
    let started = Instant::now();
    let progress = meshbox::acquire::install::quiet();
    let err = installer
        .acquire(
            &request(&source, &env, Some(Duration::from_secs(1))),
            None,
            &progress,
        )
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(
        matches!(err, AcquireError::InstallTimeout { secs: 1, .. }),
        "{err}"
    );
    // 1 s budget, then SIGTERM (trapped), then SIGKILL 2 s later.
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(15),
        "{took:?}"
    );
    let log = std::fs::read_to_string(cache.path().join("home/log")).unwrap_or_default();
    assert!(log.contains("term"), "the installer never saw SIGTERM");
    let pids = wait_for_lines(&cache.path().join("home/pids"), 2, Duration::from_secs(1));
    // SIGKILLed processes may take a moment to go.
    let started = Instant::now();
    while !group_members(pids[0]).is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "left running after the timeout: {:?}",
            group_members(pids[0])
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn install_env_merges_the_operators_and_the_specs() {
    let (_bin, path) = fake_npm(&format!("env > \"$HOME/env\"\n{INSTALL_FAKE_PKG}"));
    let cache = tempfile::tempdir().unwrap();
    let mut config = InstallConfig::new(cache.path().to_path_buf());
    config.path = path;
    config.env = BTreeMap::from([
        ("FROM_OPERATOR".to_owned(), "op".to_owned()),
        ("BOTH".to_owned(), "op".to_owned()),
    ]);
    let installer = Installer::new(config);
    let source = npm_source();
    let env = BTreeMap::from([("BOTH".to_owned(), "spec".to_owned())]);
    let progress = meshbox::acquire::install::quiet();
    let launch = installer
        .acquire(&request(&source, &env, None), None, &progress)
        .await
        .unwrap();
    assert!(launch.argv[1].ends_with("fake-pkg/cli.js"), "{launch:?}");
    let seen = std::fs::read_to_string(cache.path().join("home/env")).unwrap();
    assert!(seen.lines().any(|l| l == "FROM_OPERATOR=op"), "{seen}");
    assert!(seen.lines().any(|l| l == "BOTH=spec"), "{seen}");
    if meshbox::environ::system_ca_bundle().is_some() {
        // The system store is trusted in addition to npm's own.
        assert!(
            seen.lines().any(|l| l.starts_with("NODE_EXTRA_CA_CERTS=")),
            "{seen}"
        );
    }
}

#[test]
fn two_processes_install_one_package_once() {
    // Fails when run twice at once; counts its runs.
    let (_bin, path) = fake_npm(&format!(
        "mkdir \"$HOME/running\" || {{ echo concurrent install >&2; exit 1; }}\nsleep 1\necho run >> \"$HOME/runs\"\n{INSTALL_FAKE_PKG}\nrmdir \"$HOME/running\"\n"
    ));
    let cache = tempfile::tempdir().unwrap();
    let spawn = || {
        Command::new(common::meshbox_bin())
            .args(["install", "--cache"])
            .arg(cache.path())
            .arg("npm:fake-pkg@1.0.0")
            .env("PATH", &path)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    for child in [a, b] {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("fake-pkg/cli.js"));
    }
    let runs = std::fs::read_to_string(cache.path().join("home/runs")).unwrap();
    assert_eq!(runs.lines().count(), 1, "installed twice");
}

/// Every file under `dir` with its content, for "untouched" checks.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            if meta.is_dir() {
                stack.push(p.clone());
                out.insert(p, Vec::new());
            } else {
                out.insert(p.clone(), std::fs::read(&p).unwrap_or_default());
            }
        }
    }
    out
}

async fn logs(d: &Daemon, name: &str) -> String {
    d.get(&format!("/v1/meshes/p/services/{name}/logs?lines=200"))
        .await
        .1
        .to_string()
}

#[tokio::test]
async fn path_dependencies_go_to_the_cache_and_the_users_venv_survives() {
    let d = Daemon::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture("py_server/server.py"), dir.path().join("server.py")).unwrap();
    std::fs::write(
        dir.path().join("requirements.txt"),
        "# no dependencies yet\n",
    )
    .unwrap();
    std::fs::create_dir_all(dir.path().join(".venv/bin")).unwrap();
    std::fs::write(dir.path().join(".venv/marker"), "mine").unwrap();
    let before = snapshot(dir.path());
    let spec = json!({"source": format!("path:{}", dir.path().display())});
    let (code, st) = d.put("/v1/meshes/p/services/py", spec.clone()).await;
    assert_eq!(code, 200, "{st}");
    assert_eq!(snapshot(dir.path()), before, "the user's directory changed");
    assert!(logs(&d, "py").await.contains("installing dependencies"));
    // The server runs with the cache's venv.
    let cache = d.data.path().join("cache/path");
    let pid = st["pid"].as_u64().expect("pid");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let argv0 = String::from_utf8_lossy(cmdline.split(|b| *b == 0).next().unwrap()).into_owned();
    assert!(
        argv0.starts_with(cache.to_str().unwrap()) && argv0.ends_with("venv/bin/python"),
        "{argv0}"
    );
    let entries = || -> Vec<String> {
        std::fs::read_dir(&cache)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("-python-"))
            .collect()
    };
    assert_eq!(entries().len(), 1, "{:?}", entries());

    // Same manifest: nothing installed again.
    let (code, st) = d.put("/v1/meshes/p/services/py2", spec.clone()).await;
    assert_eq!(code, 200, "{st}");
    assert!(!logs(&d, "py2").await.contains("installing"));

    // A changed manifest installs again, into a new entry.
    std::fs::write(
        dir.path().join("requirements.txt"),
        "# no dependencies yet\n# still none\n",
    )
    .unwrap();
    let (code, st) = d.put("/v1/meshes/p/services/py3", spec).await;
    assert_eq!(code, 200, "{st}");
    assert!(logs(&d, "py3").await.contains("installing dependencies"));
    assert_eq!(entries().len(), 2, "{:?}", entries());
    assert_eq!(
        std::fs::read_to_string(dir.path().join(".venv/marker")).unwrap(),
        "mine"
    );
}

/// A fake `npm` for a directory's dependencies: run in the cache entry, it
/// makes one ES-module package and one CommonJS package there.
const INSTALL_FAKE_DEPS: &str = r#"
[ -f package.json ] || { echo "no package.json in $PWD" >&2; exit 1; }
echo run >> "$HOME/dep-runs"
mkdir -p node_modules/dep-esm node_modules/dep-cjs
echo '{"name":"dep-esm","version":"1.0.0","type":"module","exports":"./index.js"}' > node_modules/dep-esm/package.json
echo 'export default function add(a, b) { return a + b; }' > node_modules/dep-esm/index.js
echo '{"name":"dep-cjs","version":"1.0.0","main":"index.js"}' > node_modules/dep-cjs/package.json
echo 'module.exports = (a, b) => a + b;' > node_modules/dep-cjs/index.js
"#;

#[tokio::test]
async fn node_path_sources_find_cached_dependencies_from_es_and_commonjs_modules() {
    let (_bin, path) = fake_npm(INSTALL_FAKE_DEPS);
    let d = Daemon::start_with(&[], &[("PATH", &path)]);
    let server = std::fs::read_to_string(fixture("node_server/server.js")).unwrap();
    let esm = server.replace("#!/usr/bin/env node\n", "").replace(
        "const readline = require(\"node:readline\");",
        "import readline from \"node:readline\";\nimport add from \"dep-esm\";\nif (add(1, 2) !== 3) process.exit(3);",
    );
    let cjs = format!("{server}\nif (require('dep-cjs')(1, 2) !== 3) process.exit(3);\n");
    for (name, kind, code) in [("esm", r#""type":"module","#, esm), ("cjs", "", cjs)] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("package.json"),
            format!(r#"{{"name":"{name}","version":"1.0.0",{kind}"main":"server.js","dependencies":{{"dep-esm":"1.0.0","dep-cjs":"1.0.0"}}}}"#),
        )
        .unwrap();
        std::fs::write(dir.path().join("server.js"), code).unwrap();
        let before = snapshot(dir.path());
        let (code, st) = d
            .put(
                &format!("/v1/meshes/p/services/{name}"),
                json!({"source": format!("path:{}", dir.path().display())}),
            )
            .await;
        assert_eq!(code, 200, "{name}: {st}");
        assert_eq!(
            snapshot(dir.path()),
            before,
            "{name}: the directory changed"
        );
        let (_, r) = d.call("p", name, "add", json!({"a": 2, "b": 2})).await;
        assert_eq!(common::text_of(&r), "4", "{name}");
    }
    let runs = std::fs::read_to_string(d.data.path().join("cache/home/dep-runs")).unwrap();
    assert_eq!(runs.lines().count(), 2, "one install per directory");
}
