//! `meshbox run` as a drop-in for `npx -y`/`uvx` in an MCP client's config:
//! its argument grammar, the environment it passes, how it reports, and that
//! it ends — leaving nothing behind — within a second of SIGTERM, SIGINT or
//! its stdin closing, in every phase (install included).
//!
//! The lanes: this file runs in plain `cargo test` (python3, node, npm and
//! git on PATH; no network: registries are replaced by a local listener that
//! never answers). OOM needs a memory cgroup (`needs root`), docker needs an
//! engine and the runner images (`needs docker`).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{fixture, meshbox_bin, pid_alive};
use serde_json::{json, Value};

/// The target is one second; the bound leaves room for a loaded machine.
const STOP_BOUND: Duration = Duration::from_secs(2);

struct Run {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    stderr: Arc<Mutex<String>>,
    _data: tempfile::TempDir,
    data: PathBuf,
}

impl Run {
    /// `meshbox run ARGS…` with its own data dir and the given environment.
    fn start(args: &[&str], env: &[(&str, &str)]) -> Run {
        Self::start_in(args, env, None)
    }

    fn start_in(args: &[&str], env: &[(&str, &str)], cwd: Option<&Path>) -> Run {
        let data = tempfile::tempdir().unwrap();
        let mut cmd = Command::new(meshbox_bin());
        cmd.arg("run")
            .args(args)
            .env("MESHBOX_DATA_DIR", data.path())
            .env("MESHBOX_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(dir) = cwd {
            cmd.current_dir(dir);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start meshbox run");
        let stdin = child.stdin.take();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        {
            let stderr = stderr.clone();
            let mut err = child.stderr.take().unwrap();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = err.read(&mut buf) {
                    if n == 0 {
                        return;
                    }
                    stderr
                        .lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
        }
        let path = data.path().to_path_buf();
        Run {
            child,
            stdin,
            lines,
            stderr,
            _data: data,
            data: path,
        }
    }

    fn send(&mut self, v: Value) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{v}").unwrap();
        stdin.flush().unwrap();
    }

    fn read(&self) -> Value {
        let line = self
            .lines
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("no answer; stderr: {}", self.stderr()));
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits until stderr holds `needle`.
    fn wait_stderr(&self, needle: &str, limit: Duration) {
        let start = Instant::now();
        while !self.stderr().contains(needle) {
            if start.elapsed() > limit {
                panic!("stderr never said {needle:?}: {}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The MCP handshake, then tools/call `tool`; the call's result.
    fn handshake_and_call(&mut self, tool: &str, args: Value) -> Value {
        self.send(json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}}));
        assert!(self.read()["result"]["protocolVersion"].is_string());
        self.send(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
        self.call(2, tool, args)
    }

    fn call(&mut self, id: u64, tool: &str, args: Value) -> Value {
        self.send(json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": tool, "arguments": args}}));
        let v = self.read();
        assert_eq!(v["id"], id, "{v}");
        v["result"].clone()
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }

    /// The pid the server printed on stderr after `prefix`.
    /// The host pid of the server that printed `prefix` and its pid: the
    /// server sees its own pid namespace, so its number is looked up among
    /// meshbox run's descendants (`NSpid`).
    fn pid_after(&self, prefix: &str) -> u32 {
        self.wait_stderr(prefix, Duration::from_secs(60));
        let err = self.stderr();
        let tail = err.split(prefix).nth(1).unwrap();
        let own: u32 = tail.split_whitespace().next().unwrap().parse().unwrap();
        host_pid(self.child.id(), own).unwrap_or_else(|| panic!("no descendant has pid {own}"))
    }

    /// Asks meshbox to end (`eof` closes its stdin, else a `kill` signal
    /// like `-TERM`) and checks it did in time; its exit code.
    fn stop_by(&mut self, how: &str) -> Option<i32> {
        if how == "eof" {
            self.stdin.take();
        } else {
            self.signal(how);
        }
        let (code, took) = self.wait_exit(Duration::from_secs(30));
        assert!(took < STOP_BOUND, "{how}: exited after {took:?}");
        code
    }

    fn wait_exit_code(mut self) -> Option<i32> {
        self.wait_exit(Duration::from_secs(30)).0
    }

    /// Waits for the exit; its code and how long it took.
    fn wait_exit(&mut self, limit: Duration) -> (Option<i32>, Duration) {
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return (st.code(), start.elapsed());
            }
            if start.elapsed() > limit {
                let _ = self.child.kill();
                panic!(
                    "meshbox run still running after {limit:?}; stderr: {}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn text(result: &Value) -> String {
    result["content"][0]["text"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// The server's pid, from the fixture's start line on stderr.
/// The host pid of `root`'s descendant whose innermost pid is `own`.
fn host_pid(root: u32, own: u32) -> Option<u32> {
    let status = |pid: u32, field: &str| -> Option<String> {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix(field).map(|v| v.trim().to_owned()))
    };
    let descends = |mut pid: u32| {
        for _ in 0..16 {
            match status(pid, "PPid:").and_then(|p| p.parse::<u32>().ok()) {
                Some(p) if p == root => return true,
                Some(p) if p > 1 => pid = p,
                _ => return false,
            }
        }
        false
    };
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            status(*pid, "NSpid:").and_then(|ns| ns.split_whitespace().last()?.parse::<u32>().ok())
                == Some(own)
        })
        .find(|pid| descends(*pid))
}

fn fixture_pid(run: &Run) -> u32 {
    run.pid_after("py-fixture started pid=")
}

/// Live processes whose command line or working directory mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(pid_n) = pid.parse::<u32>() else {
            continue;
        };
        if pid_n == std::process::id() || !pid_alive(pid_n) {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        let cwd = std::fs::read_link(entry.path().join("cwd"))
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        if cmdline.contains(needle) || cwd.contains(needle) {
            found.push(format!("{pid}: {cmdline} (cwd {cwd})"));
        }
    }
    found
}

/// Waits (briefly) for every process mentioning `needle` to be gone.
fn assert_none_left(needle: &str) {
    let start = Instant::now();
    loop {
        let left = processes_mentioning(needle);
        if left.is_empty() {
            return;
        }
        if start.elapsed() > Duration::from_secs(2) {
            panic!("left running: {left:#?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A TCP listener that accepts and never answers: a registry that hangs.
struct Blackhole {
    port: u16,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Blackhole {
    fn start() -> Blackhole {
        Self::start_on("127.0.0.1:0")
    }

    fn start_on(addr: &str) -> Blackhole {
        let listener = std::net::TcpListener::bind(addr).unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok((c, _)) = listener.accept() {
                    held.push(c);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Blackhole { port, stop }
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A node project whose `npm install` hangs in a `git` grandchild of npm,
/// fetching a dependency from `hole`.
fn hanging_node_project(hole: &Blackhole) -> tempfile::TempDir {
    hanging_node_project_at("127.0.0.1", hole)
}

fn hanging_node_project_at(host: &str, hole: &Blackhole) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let pkg = json!({
        "name": "hangs-in-install",
        "version": "1.0.0",
        "bin": {"hangs-in-install": "index.js"},
        "dependencies": {"slow": format!("git+https://{host}:{}/slow.git", hole.port)}
    });
    std::fs::write(dir.path().join("package.json"), pkg.to_string()).unwrap();
    std::fs::write(dir.path().join("index.js"), "process.stdin.resume();\n").unwrap();
    dir
}

#[test]
fn server_args_follow_the_source_without_a_double_dash() {
    // As an MCP client (and the Inspector, which drops `--`) would write it.
    let mut run = Run::start_in(
        &["--memory", "256m", "path:py_server", "--page-size", "100"],
        &[],
        Some(&fixture("")),
    );
    run.send(json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}}));
    run.read();
    run.send(json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}));
    let tools = run.read();
    assert_eq!(
        tools["result"]["tools"].as_array().unwrap().len(),
        common::FIXTURE_TOOLS,
        "--page-size 100 reached the server: one page"
    );
    assert!(tools["result"].get("nextCursor").is_none());
}

#[test]
fn env_comes_from_flags_files_and_meshbox_own_environment() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "s3cret\n").unwrap();
    let env_file = dir.path().join("env");
    std::fs::write(
        &env_file,
        format!(
            "# from a file\nFROM_FILE=f\nSECRET={{\"file\": \"{}\"}}\nPASSED_BY_FILE\n",
            secret.display()
        ),
    )
    .unwrap();
    let py = format!("path:{}", fixture("py_server").display());
    let mut run = Run::start(
        &[
            "-e",
            "API_KEY",
            "-e",
            "SET=v=1",
            "-e",
            "NOT_SET_ANYWHERE",
            "--env-file",
            env_file.to_str().unwrap(),
            &py,
        ],
        &[
            ("API_KEY", "from-client-config"),
            ("PASSED_BY_FILE", "pf"),
            ("NOT_PASSED", "x"),
        ],
    );
    let env: Value =
        serde_json::from_str(&text(&run.handshake_and_call("env", json!({})))).unwrap();
    assert_eq!(env["API_KEY"], "from-client-config");
    assert_eq!(env["SET"], "v=1");
    assert_eq!(env["FROM_FILE"], "f");
    assert_eq!(env["SECRET"], "s3cret");
    assert_eq!(env["PASSED_BY_FILE"], "pf");
    assert!(env.get("NOT_PASSED").is_none(), "only what -e names: {env}");
    assert!(env.get("NOT_SET_ANYWHERE").is_none(), "{env}");
    assert!(env.get("MESHBOX_DATA_DIR").is_none(), "{env}");
    // MESHBOX_DATA_DIR is honoured: the server's home lives there.
    let home = env["HOME"].as_str().unwrap();
    assert!(
        Path::new(home).starts_with(&run.data),
        "HOME {home} not under {}",
        run.data.display()
    );
}

#[test]
fn ends_within_a_second_of_sigterm_sigint_or_stdin_eof_while_serving() {
    for how in ["-TERM", "-INT", "eof"] {
        let py = format!("path:{}", fixture("py_server").display());
        let mut run = Run::start(&[&py], &[]);
        let pid = fixture_pid(&run);
        assert_eq!(
            text(&run.handshake_and_call("add", json!({"a": 1, "b": 2}))),
            "3"
        );
        let code = run.stop_by(how);
        assert_eq!(code, Some(0), "{how}: {}", run.stderr());
        assert!(!pid_alive(pid), "{how}: server {pid} left running");
    }
}

/// `meshbox run` starts one server: it takes the sandbox init loaded ahead
/// of it and loads no other (only `serve` keeps one ahead of every start).
#[test]
fn run_keeps_no_sandbox_init_loaded_once_its_server_runs() {
    let py = format!("path:{}", fixture("py_server").display());
    let mut run = Run::start(&[&py], &[]);
    assert_eq!(
        text(&run.handshake_and_call("add", json!({"a": 1, "b": 2}))),
        "3"
    );
    // Longer than `serve` waits before it loads the next one.
    std::thread::sleep(Duration::from_secs(1));
    let waiting = common::waiting_inits(run.child.id());
    assert!(waiting.is_empty(), "inits left waiting: {waiting:?}");
    assert_eq!(run.stop_by("eof"), Some(0), "{}", run.stderr());
}

#[test]
fn a_server_ignoring_eof_and_sigterm_is_killed_in_time() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("server.py"),
        "import os, signal, sys, time\n\
         signal.signal(signal.SIGTERM, signal.SIG_IGN)\n\
         sys.stderr.write('stubborn pid=%d\\n' % os.getpid()); sys.stderr.flush()\n\
         while True: time.sleep(1)\n",
    )
    .unwrap();
    let src = format!("path:{}", dir.path().display());
    for how in ["-TERM", "eof"] {
        let mut run = Run::start(&[&src], &[]);
        let pid = run.pid_after("stubborn pid=");
        run.stop_by(how);
        assert!(!pid_alive(pid), "{how}: server {pid} left running");
    }
}

#[test]
fn a_signal_kill_is_said_on_stderr() {
    let py = format!("path:{}", fixture("py_server").display());
    let mut run = Run::start(&[&py], &[]);
    let pid = fixture_pid(&run);
    run.handshake_and_call("echo", json!({"text": "x"}));
    assert!(Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    let (code, _) = run.wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(137));
    assert!(
        run.stderr().contains("meshbox: server killed by signal 9"),
        "{}",
        run.stderr()
    );
}

#[test]
#[ignore = "needs root"]
fn an_oom_kill_is_said_on_stderr() {
    assert!(common::is_root(), "needs root (a memory cgroup)");
    let py = format!("path:{}", fixture("py_server").display());
    let mut run = Run::start(&["--memory", "64m", &py], &[]);
    run.handshake_and_call("echo", json!({"text": "x"}));
    run.send(json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "alloc", "arguments": {"mb": 400}}}));
    let (code, _) = run.wait_exit(Duration::from_secs(60));
    assert_eq!(code, Some(137), "{}", run.stderr());
    assert!(
        run.stderr()
            .contains("meshbox: server killed: out of memory"),
        "{}",
        run.stderr()
    );
}

#[test]
fn ends_within_a_second_during_install_and_leaves_no_installer() {
    for how in ["-TERM", "-INT", "eof"] {
        let hole = Blackhole::start();
        let project = hanging_node_project(&hole);
        let src = format!("path:{}", project.path().display());
        let mut run = Run::start(&[&src], &[]);
        // On a pipe, plain status lines say what is happening.
        run.wait_stderr("meshbox: installing dependencies", Duration::from_secs(60));
        let needle = format!("127.0.0.1:{}", hole.port);
        let start = Instant::now();
        while processes_mentioning(&needle).is_empty() {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "npm never reached its git step: {}",
                run.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let code = run.stop_by(how);
        if how == "eof" {
            assert_eq!(code, Some(0));
        } else {
            assert_ne!(code, Some(0), "stopped before the server ran");
        }
        // npm, and the git it started, are gone with the install.
        assert_none_left(&needle);
        assert_none_left(&project.path().display().to_string());
    }
}

#[test]
fn a_failed_install_ends_promptly_with_the_installers_last_lines() {
    let dir = tempfile::tempdir().unwrap();
    let pkg = json!({
        "name": "broken-dep",
        "version": "1.0.0",
        "bin": {"broken-dep": "index.js"},
        "dependencies": {"gone": "file:./no-such.tgz"}
    });
    std::fs::write(dir.path().join("package.json"), pkg.to_string()).unwrap();
    std::fs::write(dir.path().join("index.js"), "").unwrap();
    let src = format!("path:{}", dir.path().display());
    let mut run = Run::start(&[&src], &[]);
    run.wait_stderr("meshbox: installing dependencies", Duration::from_secs(60));
    let (code, took) = run.wait_exit(Duration::from_secs(60));
    assert_eq!(code, Some(1), "{}", run.stderr());
    // npm gives up on a missing file: dependency in a second or two.
    assert!(
        took < Duration::from_secs(20),
        "exited {took:?} after the install began"
    );
    let err = run.stderr();
    assert!(
        err.contains("error: npm install failed (exit code"),
        "{err}"
    );
    assert!(
        err.contains("no-such.tgz"),
        "the installer's own words: {err}"
    );
}

#[test]
fn install_env_reaches_the_install_step_only() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("seen");
    std::fs::create_dir(dir.path().join("dep")).unwrap();
    std::fs::write(
        dir.path().join("dep/package.json"),
        r#"{"name":"dep","version":"1.0.0"}"#,
    )
    .unwrap();
    let record = "require('fs').writeFileSync(process.env.OUT, String(process.env.SKIP_DOWNLOAD))";
    let pkg = json!({
        "name": "records-install-env",
        "version": "1.0.0",
        "bin": {"records-install-env": "index.js"},
        "dependencies": {"dep": "file:./dep"},
        "scripts": {"preinstall": format!("node -e \"{record}\"")}
    });
    std::fs::write(dir.path().join("package.json"), pkg.to_string()).unwrap();
    std::fs::write(
        dir.path().join("index.js"),
        "process.stderr.write('SKIP=' + process.env.SKIP_DOWNLOAD + '\\n'); process.stdin.resume();\n",
    )
    .unwrap();
    let src = format!("path:{}", dir.path().display());
    let out_kv = format!("OUT={}", out.display());
    let mut run = Run::start(
        &[
            "--install-env",
            "SKIP_DOWNLOAD=1",
            "--install-env",
            &out_kv,
            &src,
        ],
        &[],
    );
    run.wait_stderr("SKIP=", Duration::from_secs(60));
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "1",
        "{}",
        run.stderr()
    );
    assert!(
        run.stderr().contains("SKIP=undefined"),
        "the server does not get it: {}",
        run.stderr()
    );
    assert_eq!(run.stop_by("eof"), Some(0));
    let bad = Run::start(&["--install-env", "NOEQUALS", &src], &[]).wait_exit_code();
    assert_eq!(bad, Some(2));
}

#[test]
fn a_missing_secret_fails_before_any_install() {
    let py = format!("path:{}", fixture("py_server").display());
    let mut run = Run::start(&["-e", r#"K={"file": "/nonexistent/secret"}"#, &py], &[]);
    let (code, _) = run.wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(1));
    assert!(run.stderr().contains("env `K`"), "{}", run.stderr());
}

#[test]
#[ignore = "needs docker"]
fn backend_docker_runs_the_server_in_a_hardened_container() {
    assert!(
        Command::new("docker")
            .arg("info")
            .output()
            .is_ok_and(|o| o.status.success()),
        "needs a docker engine"
    );
    let py = format!("path:{}", fixture("py_server").display());
    let mut run = Run::start(
        &["--backend", "docker", "--memory", "128m", &py],
        &[("SEEN", "1")],
    );
    let env: Value =
        serde_json::from_str(&text(&run.handshake_and_call("env", json!({})))).unwrap();
    // Inside the container: its own HOME (the tmpfs), the image's PATH.
    assert_eq!(env["HOME"], "/tmp", "{env}");
    assert!(env.get("SEEN").is_none());
    let uid = Command::new("docker")
        .args([
            "ps",
            "--format",
            "{{.ID}}",
            "--filter",
            "label=meshbox.role=server",
        ])
        .arg("--filter")
        .arg(format!("label=meshbox.service=run-{}", run.child.id()))
        .output()
        .unwrap();
    let ids = String::from_utf8_lossy(&uid.stdout).to_string();
    let id = ids
        .lines()
        .next()
        .expect("a container runs the server")
        .to_owned();
    let inspect = Command::new("docker")
        .args([
            "inspect",
            "--format",
            "{{.Config.User}} {{.HostConfig.ReadonlyRootfs}} {{.HostConfig.CapDrop}} {{.HostConfig.Memory}}",
            &id,
        ])
        .output()
        .unwrap();
    let got = String::from_utf8_lossy(&inspect.stdout).trim().to_owned();
    assert_eq!(got, format!("10001 true [ALL] {}", 128 << 20));
    run.signal("-TERM");
    let (code, took) = run.wait_exit(Duration::from_secs(60));
    assert_eq!(code, Some(0), "{}", run.stderr());
    eprintln!("docker run stopped in {took:?}");
    let start = Instant::now();
    loop {
        let ps = Command::new("docker")
            .args([
                "ps",
                "-a",
                "--filter",
                &format!("id={id}"),
                "--format",
                "{{.ID}}",
            ])
            .output()
            .unwrap();
        if String::from_utf8_lossy(&ps.stdout).trim().is_empty() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "container {id} left behind"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

// ---- real MCP clients (`needs clients`: scripts/mcp-clients.sh installs the
// Python SDK, uv and the MCP Inspector under target/mcp-clients; the npm/PyPI
// servers come from the registries) ------------------------------------------

struct Clients {
    python: PathBuf,
    uvx: PathBuf,
    inspector: PathBuf,
}

/// Where scripts/mcp-clients.sh installed the clients.
fn clients() -> Clients {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/mcp-clients");
    let c = Clients {
        python: dir.join("venv/bin/python"),
        uvx: dir.join("venv/bin/uvx"),
        inspector: dir.join("node_modules/.bin/mcp-inspector"),
    };
    for p in [&c.python, &c.uvx, &c.inspector] {
        assert!(
            p.is_file(),
            "needs clients: {} is missing; run scripts/mcp-clients.sh first",
            p.display()
        );
    }
    c
}

/// The CA-bundle variables of this environment: on a network that
/// intercepts TLS, `npx` and `uvx` entries need them in their `env` too.
fn ca_env() -> serde_json::Map<String, Value> {
    [
        "NODE_EXTRA_CA_CERTS",
        "SSL_CERT_FILE",
        "REQUESTS_CA_BUNDLE",
        "PIP_CERT",
    ]
    .iter()
    .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), json!(v))))
    .collect()
}

/// A client config (Claude Desktop's `mcpServers` shape) written to a file.
fn client_config(dir: &Path, servers: Value) -> PathBuf {
    let path = dir.join("mcp.json");
    std::fs::write(&path, json!({ "mcpServers": servers }).to_string()).unwrap();
    path
}

/// The Python SDK against one entry: `{"tools": [names], "call": …}`.
fn python_sdk(c: &Clients, config: &Path, server: &str, call: Option<(&str, Value)>) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/stdio_client.py");
    let mut cmd = Command::new(&c.python);
    cmd.arg(script).arg(config).arg(server);
    if let Some((tool, args)) = call {
        cmd.arg(tool).arg(args.to_string());
    }
    let out = cmd.stderr(Stdio::inherit()).output().unwrap();
    assert!(out.status.success(), "python SDK client failed on {server}");
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// The MCP Inspector CLI against one entry.
fn inspector(c: &Clients, config: &Path, server: &str, method: &[&str]) -> Value {
    let out = Command::new(&c.inspector)
        .args(["--cli", "--config"])
        .arg(config)
        .args(["--server", server, "--method"])
        .args(method)
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "inspector failed on {server} {method:?}"
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

fn names(tools: &Value) -> Vec<String> {
    let mut n: Vec<String> = tools
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_owned())
        .collect();
    n.sort();
    n
}

#[test]
#[ignore = "needs clients"]
fn mcp_clients_use_meshbox_where_they_used_npx_and_uvx() {
    let c = clients();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut env = ca_env();
    let mut ours = env.clone();
    ours.insert("MESHBOX_DATA_DIR".into(), json!(data));
    let meshbox = meshbox_bin();
    // The same entries, meshbox's spelled `meshbox run SOURCE ARGS…`.
    let config = client_config(
        dir.path(),
        json!({
            "everything-npx": {"command": "npx", "args": ["-y", "@modelcontextprotocol/server-everything", "stdio"], "env": env},
            "everything": {"command": meshbox, "args": ["run", "npm:@modelcontextprotocol/server-everything", "stdio"], "env": ours},
            "time-uvx": {"command": c.uvx.display().to_string(), "args": ["mcp-server-time"], "env": env},
            "time": {"command": meshbox, "args": ["run", "pypi:mcp-server-time"], "env": ours},
        }),
    );
    env.clear();

    // The Python SDK on each pair: the same tools, and a call through meshbox;
    // then the Inspector CLI (which drops `--`) on meshbox's, now cached.
    for (reference, ours, tool, args, answer) in [
        (
            "everything-npx",
            "everything",
            "echo",
            json!({"message": "hi"}),
            "Echo: hi",
        ),
        (
            "time-uvx",
            "time",
            "get_current_time",
            json!({"timezone": "UTC"}),
            "UTC",
        ),
    ] {
        let want = python_sdk(&c, &config, reference, None);
        let got = python_sdk(&c, &config, ours, Some((tool, args)));
        assert_eq!(got["tools"], want["tools"], "{ours}");
        let text = got["call"]["content"][0]["text"].as_str().unwrap_or("");
        assert!(text.contains(answer), "{ours}: {got}");
        // The Inspector declares roots, so a server may offer it more tools
        // than the SDK client: compare it with itself on the reference.
        let listed = inspector(&c, &config, ours, &["tools/list"]);
        let want = inspector(&c, &config, reference, &["tools/list"]);
        assert_eq!(names(&listed["tools"]), names(&want["tools"]), "{ours}");
    }
    let called = inspector(
        &c,
        &config,
        "everything",
        &[
            "tools/call",
            "--tool-name",
            "echo",
            "--tool-arg",
            "message=hi",
        ],
    );
    assert_eq!(called["content"][0]["text"], "Echo: hi", "{called}");
    // Every client is gone, and so is everything meshbox started for it.
    assert_none_left(&data.display().to_string());
}

#[test]
#[ignore = "needs clients"]
fn a_client_configs_env_reaches_the_server_through_dash_e() {
    let c = clients();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let py = format!("path:{}", fixture("py_server").display());
    let config = client_config(
        dir.path(),
        json!({
            "fixture": {
                "command": meshbox_bin(),
                // Server arguments follow the source, as after `npx -y PKG`.
                "args": ["run", "-e", "API_KEY", "-e", "MODE=strict", &py, "--page-size", "100"],
                "env": {"API_KEY": "from-the-config", "OTHER": "not passed", "MESHBOX_DATA_DIR": data}
            }
        }),
    );
    let got = python_sdk(&c, &config, "fixture", Some(("env", json!({}))));
    let env: Value =
        serde_json::from_str(got["call"]["content"][0]["text"].as_str().unwrap()).unwrap();
    assert_eq!(env["API_KEY"], "from-the-config");
    assert_eq!(env["MODE"], "strict");
    assert!(env.get("OTHER").is_none(), "{env}");
    assert_eq!(
        got["tools"].as_array().unwrap().len(),
        common::FIXTURE_TOOLS
    );
    let listed = inspector(&c, &config, "fixture", &["tools/list"]);
    assert_eq!(names(&listed["tools"]).len(), common::FIXTURE_TOOLS);
    assert_none_left(&data.display().to_string());
}

/// Containers of one `meshbox run` (its owner label), running or not.
fn run_containers(run: &Run) -> Vec<String> {
    let out = Command::new("docker")
        .args(["ps", "-a", "--format", "{{.Names}}", "--filter"])
        .arg(format!("label=meshbox.service=run-{}", run.child.id()))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The engine may still be finishing a removal meshbox asked for on its way
/// out: gone within moments, never left behind.
fn no_containers_soon(run: &Run) {
    let left = run_containers(run);
    let start = Instant::now();
    while !run_containers(run).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "containers left: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
#[ignore = "needs docker"]
fn backend_docker_leaves_no_install_container_failed_or_interrupted() {
    let gateway = Command::new("docker")
        .args([
            "network",
            "inspect",
            "bridge",
            "--format",
            "{{(index .IPAM.Config 0).Gateway}}",
        ])
        .output()
        .expect("needs the docker CLI");
    assert!(gateway.status.success(), "needs a docker engine");
    let gateway = String::from_utf8_lossy(&gateway.stdout).trim().to_owned();
    // Failed: the install container's error comes back, the container goes.
    let dir = tempfile::tempdir().unwrap();
    let pkg = json!({"name": "broken", "version": "1.0.0", "bin": {"broken": "index.js"},
                     "dependencies": {"gone": "file:./no-such.tgz"}});
    std::fs::write(dir.path().join("package.json"), pkg.to_string()).unwrap();
    std::fs::write(dir.path().join("index.js"), "").unwrap();
    let src = format!("path:{}", dir.path().display());
    let mut run = Run::start(&["--backend", "docker", &src], &[]);
    let (code, _) = run.wait_exit(Duration::from_secs(120));
    assert_eq!(code, Some(1), "{}", run.stderr());
    assert!(run.stderr().contains("no-such.tgz"), "{}", run.stderr());
    no_containers_soon(&run);
    // Interrupted: the install container hangs fetching from the host.
    let hole = Blackhole::start_on("0.0.0.0:0");
    let project = hanging_node_project_at(&gateway, &hole);
    let src = format!("path:{}", project.path().display());
    let mut run = Run::start(&["--backend", "docker", &src], &[]);
    run.wait_stderr("in a node container", Duration::from_secs(60));
    let start = Instant::now();
    while run_containers(&run).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no install container"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
    let code = run.stop_by("-TERM");
    assert_ne!(code, Some(0));
    no_containers_soon(&run);
}
