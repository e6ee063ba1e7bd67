//! `make bench`, sources part: installs measured against the tools they replace.
//!
//! 1. Cold: deploy of `npm:@modelcontextprotocol/server-everything` and
//!    `pypi:mcp-server-time` into an empty cache vs `npx -y` / `uvx` of the
//!    same package with an empty cache, each until its handshake is done.
//! 2. Warm: a second deploy (cache filled) vs the bare process start of the
//!    installed entry + handshake.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{median, Daemon, Direct};
use serde_json::json;

const WARM_RUNS: usize = 5;
const NPM_PKG: &str = "@modelcontextprotocol/server-everything";
const PYPI_PKG: &str = "mcp-server-time";

/// Variables a package client here needs to reach its registry (CA bundle, index).
fn registry_env() -> Vec<(String, String)> {
    [
        "NODE_EXTRA_CA_CERTS",
        "SSL_CERT_FILE",
        "REQUESTS_CA_BUNDLE",
        "PIP_CERT",
        "HTTPS_PROXY",
        "HTTP_PROXY",
        "NO_PROXY",
        "PIP_INDEX_URL",
        "UV_INDEX_URL",
        "npm_config_registry",
    ]
    .iter()
    .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v)))
    .collect()
}

/// `uv` for the `uvx` baseline: from PATH, else installed from PyPI into target/.
fn find_uv() -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    if let Some(p) = path
        .split(':')
        .map(|d| Path::new(d).join("uv"))
        .find(|p| p.is_file())
    {
        return Some(p);
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-tools/uv");
    let uv = venv.join("bin/uv");
    if !uv.is_file() {
        let ok = std::process::Command::new("python3")
            .arg("-m")
            .arg("venv")
            .arg(&venv)
            .status()
            .ok()?
            .success()
            && std::process::Command::new(venv.join("bin/pip"))
                .args(["install", "--quiet", "uv"])
                .status()
                .ok()?
                .success();
        if !ok {
            return None;
        }
    }
    uv.is_file().then_some(uv)
}

async fn put(http: &reqwest::Client, base: &str, name: &str, spec: &serde_json::Value) -> Duration {
    let t = Instant::now();
    let r = http
        .put(format!("{base}/v1/meshes/bench/services/{name}"))
        .json(spec)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let body = r.text().await.unwrap();
    assert_eq!(status, 200, "{body}");
    t.elapsed()
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn find_file(dir: &Path, suffix: &str) -> Option<PathBuf> {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).ok()?.flatten() {
            let p = e.path();
            if p.to_string_lossy().ends_with(suffix) && p.is_file() {
                return Some(p);
            }
            if p.is_dir() && !p.is_symlink() {
                stack.push(p);
            }
        }
    }
    None
}

#[tokio::main]
async fn main() {
    let http = reqwest::Client::new();
    let uv = find_uv();
    let base_path = std::env::var("PATH").unwrap_or_default();
    // meshbox uses uv when it is on PATH: give it the same uv the baseline uses.
    let path = match &uv {
        Some(u) => format!("{}:{base_path}", u.parent().unwrap().display()),
        None => base_path,
    };
    let scratch = tempfile::tempdir().unwrap();
    println!("meshbox bench — sources (process backend)");

    // ---- npm ----
    println!();
    println!("== npm:{NPM_PKG} ==");
    let npm_cache = scratch.path().join("npx-cache");
    let mut env = registry_env();
    env.push(("npm_config_cache".into(), npm_cache.display().to_string()));
    let t = Instant::now();
    let npx = Direct::spawn_with(&["npx", "-y", NPM_PKG, "stdio"], scratch.path(), &env).await;
    npx.handshake().await;
    let npx_cold = t.elapsed();
    drop(npx);

    let data = scratch.path().join("data-npm");
    let daemon = Daemon::start(data.clone(), Some(path.clone())).await;
    let spec = json!({"source": format!("npm:{NPM_PKG}"), "args": ["stdio"]});
    let cold = put(&http, &daemon.base, "cold", &spec).await;
    println!(
        "cold: npx -y {:>6.2} s | meshbox deploy {:>6.2} s | ratio {:.2}x",
        secs(npx_cold),
        secs(cold),
        secs(cold) / secs(npx_cold)
    );
    let entry = find_file(&data.join("cache/npm"), "server-everything/dist/index.js")
        .expect("installed entry");
    let mut bare = Vec::new();
    let mut warm = Vec::new();
    for i in 0..WARM_RUNS {
        let t = Instant::now();
        let d = Direct::spawn(
            &["node", entry.to_str().unwrap(), "stdio"],
            entry.parent().unwrap(),
        )
        .await;
        d.handshake().await;
        bare.push(t.elapsed());
        drop(d);
        warm.push(put(&http, &daemon.base, &format!("warm{i}"), &spec).await);
    }
    let (b, w) = (median(bare), median(warm));
    println!(
        "warm: bare start+handshake {:>6.1} ms | meshbox deploy-to-running {:>6.1} ms | ratio {:.2}x (target ≤ 1.20x)",
        secs(b) * 1e3,
        secs(w) * 1e3,
        secs(w) / secs(b)
    );
    daemon.stop().await;

    // ---- PyPI ----
    println!();
    println!("== pypi:{PYPI_PKG} ==");
    let uvx_cold = match &uv {
        Some(uv) => {
            let mut env = registry_env();
            env.push((
                "UV_CACHE_DIR".into(),
                scratch.path().join("uv-cache").display().to_string(),
            ));
            env.push((
                "UV_TOOL_DIR".into(),
                scratch.path().join("uv-tools").display().to_string(),
            ));
            let t = Instant::now();
            let uvx = Direct::spawn_with(
                &[uv.to_str().unwrap(), "tool", "run", PYPI_PKG],
                scratch.path(),
                &env,
            )
            .await;
            uvx.handshake().await;
            Some(t.elapsed())
        }
        None => None,
    };
    let data = scratch.path().join("data-pypi");
    let daemon = Daemon::start(data.clone(), Some(path.clone())).await;
    let spec = json!({"source": format!("pypi:{PYPI_PKG}")});
    let cold = put(&http, &daemon.base, "cold", &spec).await;
    match uvx_cold {
        Some(u) => println!(
            "cold: uvx {:>6.2} s | meshbox deploy (uv) {:>6.2} s | ratio {:.2}x",
            secs(u),
            secs(cold),
            secs(cold) / secs(u)
        ),
        None => println!(
            "cold: uvx unavailable (uv could not be installed) | meshbox deploy (pip) {:>6.2} s",
            secs(cold)
        ),
    }
    let script =
        find_file(&data.join("cache/pypi"), "bin/mcp-server-time").expect("installed script");
    let mut bare = Vec::new();
    let mut warm = Vec::new();
    for i in 0..WARM_RUNS {
        let t = Instant::now();
        let d = Direct::spawn(&[script.to_str().unwrap()], scratch.path()).await;
        d.handshake().await;
        bare.push(t.elapsed());
        drop(d);
        warm.push(put(&http, &daemon.base, &format!("warm{i}"), &spec).await);
    }
    let (b, w) = (median(bare), median(warm));
    println!(
        "warm: bare start+handshake {:>6.1} ms | meshbox deploy-to-running {:>6.1} ms | ratio {:.2}x (target ≤ 1.20x)",
        secs(b) * 1e3,
        secs(w) * 1e3,
        secs(w) / secs(b)
    );
    daemon.stop().await;
}
