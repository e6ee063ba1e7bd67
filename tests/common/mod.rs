//! Shared harness for integration tests: a real `meshbox serve` on
//! 127.0.0.1:0 with its own data dir, and a small HTTP client.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// How many tools the python fixture serves.
pub const FIXTURE_TOOLS: usize = 16;

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

pub fn meshbox_bin() -> &'static str {
    env!("CARGO_BIN_EXE_meshbox")
}

/// The daemon's data dir: a temporary one, or one shared with an earlier daemon.
pub struct DataDir {
    path: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl DataDir {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

pub struct Daemon {
    child: Child,
    pub url: String,
    pub data: DataDir,
    pub http: reqwest::Client,
    pub token: Option<String>,
}

impl Daemon {
    pub fn start() -> Daemon {
        Self::start_with(&[], &[])
    }

    /// Starts `meshbox serve` with extra args and environment.
    pub fn start_with(args: &[&str], env: &[(&str, &str)]) -> Daemon {
        let mut all = vec!["--backend", "process"];
        all.extend_from_slice(args);
        Self::start_in_tmp(&all, env)
    }

    /// A daemon on the docker backend that removes its containers when it stops.
    pub fn start_docker(args: &[&str]) -> Daemon {
        let mut all = vec!["--backend", "docker", "--stop-containers-on-exit"];
        all.extend_from_slice(args);
        Self::start_in_tmp(&all, &[])
    }

    fn start_in_tmp(args: &[&str], env: &[(&str, &str)]) -> Daemon {
        let tmp = tempfile::tempdir().unwrap();
        let data = DataDir {
            path: tmp.path().to_path_buf(),
            _tmp: Some(tmp),
        };
        Self::spawn(data, args, env)
    }

    /// A daemon on an existing data dir (the caller keeps it alive).
    pub fn start_on(dir: &Path, env: &[(&str, &str)]) -> Daemon {
        let data = DataDir {
            path: dir.to_path_buf(),
            _tmp: None,
        };
        Self::spawn(data, &["--backend", "process"], env)
    }

    /// A daemon on an existing data dir with extra serve arguments (after
    /// `--backend process`) and environment.
    pub fn start_in(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        let data = DataDir {
            path: dir.to_path_buf(),
            _tmp: None,
        };
        let mut all = vec!["--backend", "process"];
        all.extend_from_slice(args);
        Self::spawn(data, &all, env)
    }

    /// A daemon on an existing data dir with explicit serve arguments.
    pub fn start_on_with(dir: &Path, args: &[&str]) -> Daemon {
        let data = DataDir {
            path: dir.to_path_buf(),
            _tmp: None,
        };
        Self::spawn(data, args, &[])
    }

    /// A process-backend daemon started through `wrapper` (e.g. `prlimit --nofile=1024 --`).
    pub fn start_wrapped(wrapper: &[&str], args: &[&str]) -> Daemon {
        let tmp = tempfile::tempdir().unwrap();
        let data = DataDir {
            path: tmp.path().to_path_buf(),
            _tmp: Some(tmp),
        };
        let mut all = vec!["--backend", "process"];
        all.extend_from_slice(args);
        Self::spawn_via(wrapper, data, &all, &[])
    }

    /// A process-backend daemon started through `wrapper` (e.g. `setpriv
    /// --reuid=…`), on an existing data dir, with extra environment.
    pub fn start_wrapped_in(
        wrapper: &[&str],
        dir: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Daemon {
        let data = DataDir {
            path: dir.to_path_buf(),
            _tmp: None,
        };
        let mut all = vec!["--backend", "process"];
        all.extend_from_slice(args);
        Self::spawn_via(wrapper, data, &all, env)
    }

    fn spawn(data: DataDir, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        Self::spawn_via(&[], data, args, env)
    }

    fn spawn_via(wrapper: &[&str], data: DataDir, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        let mut cmd = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(meshbox_bin());
                c
            }
            None => Command::new(meshbox_bin()),
        };
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data.path())
            .args(args)
            .env_remove("MESHBOX_TOKEN")
            .env("MESHBOX_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start meshbox serve");
        let stderr = child.stderr.take().unwrap();
        let mut reader = BufReader::new(stderr);
        let mut url = None;
        let mut line = String::new();
        while reader.read_line(&mut line).unwrap_or(0) > 0 {
            if let Some(u) = line.trim().strip_prefix("meshbox listening on ") {
                url = Some(u.to_owned());
                break;
            }
            line.clear();
        }
        // Keep draining stderr so the daemon never blocks on it.
        std::thread::spawn(move || {
            let mut sink = String::new();
            while reader.read_line(&mut sink).unwrap_or(0) > 0 {
                eprint!("[meshbox] {sink}");
                sink.clear();
            }
        });
        let url =
            url.unwrap_or_else(|| panic!("meshbox serve did not start: {:?}", child.try_wait()));
        let token = env
            .iter()
            .find(|(k, _)| *k == "MESHBOX_TOKEN")
            .map(|(_, v)| v.to_string());
        Daemon {
            child,
            url,
            data,
            http: reqwest::Client::new(),
            token,
        }
    }

    pub async fn req(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut r = self.http.request(method, format!("{}{}", self.url, path));
        if let Some(t) = &self.token {
            r = r.bearer_auth(t);
        }
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.expect("request");
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.unwrap();
        let v = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        (status, v)
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.req(reqwest::Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.req(reqwest::Method::POST, path, Some(body)).await
    }

    pub async fn put(&self, path: &str, body: Value) -> (u16, Value) {
        self.req(reqwest::Method::PUT, path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> (u16, Value) {
        self.req(reqwest::Method::DELETE, path, None).await
    }

    /// Deploys the python fixture as `mesh/name` with extra server args and spec fields.
    pub async fn deploy_py(
        &self,
        mesh: &str,
        name: &str,
        args: &[&str],
        extra: Value,
    ) -> (u16, Value) {
        let mut spec = json!({
            "source": format!("path:{}", fixture("py_server").display()),
            "args": args,
        });
        if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                s.insert(k.clone(), v.clone());
            }
        }
        self.put(&format!("/v1/meshes/{mesh}/services/{name}"), spec)
            .await
    }

    pub async fn call(&self, mesh: &str, name: &str, tool: &str, args: Value) -> (u16, Value) {
        self.post(
            &format!("/v1/meshes/{mesh}/services/{name}/call"),
            json!({"tool": tool, "arguments": args}),
        )
        .await
    }

    pub async fn status(&self, mesh: &str, name: &str) -> Value {
        self.get(&format!("/v1/meshes/{mesh}/services/{name}"))
            .await
            .1
    }

    /// Polls the status until `pred` holds, or panics after `limit`.
    pub async fn wait_status(
        &self,
        mesh: &str,
        name: &str,
        limit: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let start = Instant::now();
        loop {
            let s = self.status(mesh, name).await;
            if pred(&s) {
                return s;
            }
            if start.elapsed() > limit {
                panic!("status never matched: {s}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The daemon's own pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY-free: the pid is our own child.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        self.child.wait().unwrap()
    }
}

impl Drop for Daemon {
    /// SIGTERM so the daemon stops its servers (and containers); SIGKILL if it hangs.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(self.child.id().to_string())
                .status();
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(15) {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.kill();
    }
}

pub fn text_of(result: &Value) -> String {
    result["result"]["content"][0]["text"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// The live sandbox inits among `parent`'s children that wait for a plan
/// (loaded ahead of the next start): an init with no child, or whose one
/// child is the pid namespace's init, itself with no child yet. A running
/// sandbox's init has the server below it.
pub fn waiting_inits(parent: u32) -> Vec<u32> {
    // Of every thread: a runtime's worker may have started it.
    let children = |pid: u32| -> Vec<u32> {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
            .flat_map(|t| {
                std::fs::read_to_string(t.path().join("children"))
                    .unwrap_or_default()
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect::<Vec<u32>>()
            })
            .collect()
    };
    let is_init = |pid: u32| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains("sandbox-init"))
    };
    children(parent)
        .into_iter()
        .filter(|p| is_init(*p) && pid_alive(*p))
        .filter(|p| {
            children(*p)
                .into_iter()
                .all(|c| is_init(c) && children(c).is_empty())
        })
        .collect()
}

pub fn pid_alive(pid: u32) -> bool {
    // A zombie still has /proc/PID; read its state.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s.split(") ").nth(1).is_some_and(|r| r.starts_with('Z')),
        Err(_) => false,
    }
}

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// Resident memory of `pid` in KiB (VmRSS).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Samples `pid`'s RSS every few ms until dropped; `max()` is the peak.
pub struct RssSampler {
    peak: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl RssSampler {
    pub fn start(pid: u32) -> RssSampler {
        use std::sync::atomic::Ordering;
        let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (p, s) = (peak.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(rss_kib(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        RssSampler { peak, stop }
    }

    pub fn max_kib(&self) -> u64 {
        self.peak.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}
