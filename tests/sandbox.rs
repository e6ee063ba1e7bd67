//! The process sandbox, proved from the inside: a hostile server
//! (`tests/fixtures/hostile`) tries each attack of issue 11 against a real
//! `meshbox serve --backend process`, and each test fails when the layer
//! that stops it is missing. Also: whole process trees die (a `setsid`
//! double fork) on undeploy, crash-restart, SIGTERM and SIGKILL + restart,
//! and an unprivileged meshbox still gets a user namespace, Landlock and seccomp.
//!
//! Lane: `#[ignore = "needs root"]` (CI runs these as root); they panic when
//! run without it.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{fixture, is_root, text_of, Daemon};
use serde_json::{json, Value};

const SECRET: &str = "runner-home-secret";

fn require_root() {
    assert!(
        is_root(),
        "this test needs root (run the root lane as root, or with sudo)"
    );
}

/// A daemon whose invoking user has a fake home holding a planted secret,
/// with a token file in its data dir.
struct Host {
    d: Daemon,
    home: tempfile::TempDir,
    data: tempfile::TempDir,
}

impl Host {
    fn start(extra: &[&str]) -> Host {
        Host::start_env(extra, &[])
    }

    fn start_env(extra: &[&str], env: &[(&str, &str)]) -> Host {
        let data = tempfile::tempdir().unwrap();
        let home = tempfile::tempdir().unwrap();
        std::fs::write(home.path().join("secret.txt"), SECRET).unwrap();
        let token_file = data.path().join("token");
        std::fs::write(&token_file, "sandbox-test-token").unwrap();
        let token_arg = token_file.to_string_lossy().into_owned();
        let mut args = vec!["--token-file", token_arg.as_str()];
        args.extend_from_slice(extra);
        let mut vars = vec![("HOME", home.path().to_str().unwrap())];
        vars.extend_from_slice(env);
        let mut d = Daemon::start_in(data.path(), &args, &vars);
        d.token = Some("sandbox-test-token".into());
        Host { d, home, data }
    }

    async fn deploy(&self, mesh: &str, name: &str, extra: Value) -> Value {
        let mut spec = json!({"source": format!("path:{}", fixture("hostile").display())});
        for (k, v) in extra.as_object().cloned().unwrap_or_default() {
            spec[k] = v;
        }
        let (code, st) = self
            .d
            .put(&format!("/v1/meshes/{mesh}/services/{name}"), spec)
            .await;
        assert_eq!(code, 200, "{st}");
        st
    }

    /// Calls an attack tool; its text ("ok …" or "denied: …").
    async fn attack(&self, mesh: &str, name: &str, tool: &str, args: Value) -> String {
        let (code, r) = self.d.call(mesh, name, tool, args).await;
        assert_eq!(code, 200, "{tool}: {r}");
        text_of(&r)
    }

    fn home_of(&self, mesh: &str, name: &str) -> PathBuf {
        self.data.path().join("home").join(mesh).join(name)
    }
}

/// A file must be unreadable; a directory may at most show the empty
/// skeleton the sandbox's own paths are carried over in.
fn assert_hidden(path: &Path, got: &str) {
    if got.starts_with("denied") {
        return;
    }
    assert!(
        path.is_dir() && got.starts_with("ok ["),
        "{} readable: {got}",
        path.display()
    );
    for leak in ["meshbox.db", "token", "secret", "uids", "private", "victim"] {
        assert!(
            !got.contains(leak),
            "{} shows {leak}: {got}",
            path.display()
        );
    }
}

fn assert_denied(what: &str, got: &str) {
    assert!(got.starts_with("denied"), "{what} was not denied: {got}");
}

#[tokio::test]
#[ignore = "needs root"]
async fn runs_as_its_own_uid_without_capabilities_in_namespaces() {
    require_root();
    let h = Host::start(&[]);
    let st = h.deploy("acme", "evil", json!({})).await;
    assert_eq!(
        st["limits"]["enforced"]["filesystem"], true,
        "Landlock not reported: {st}"
    );
    let isolation = &st["limits"]["isolation"];
    assert_eq!(isolation["missing"], json!([]), "{st}");
    assert_eq!(
        isolation["applied"],
        json!([
            "uid",
            "pid-namespace",
            "mount-namespace",
            "ipc-namespace",
            "uts-namespace",
            "no-capabilities",
            "no-new-privs",
            "landlock",
            "seccomp"
        ]),
        "{st}"
    );
    let me: Value =
        serde_json::from_str(&h.attack("acme", "evil", "whoami", json!({})).await).unwrap();
    let uid = me["uid"].as_u64().unwrap();
    assert!(uid >= 1_800_000_000, "not a per-service uid: {me}");
    assert_eq!(me["gid"], me["uid"], "{me}");
    assert_eq!(me["groups"], json!([]), "supplementary groups kept: {me}");
    assert_eq!(me["CapEff"], "0000000000000000", "{me}");
    assert_eq!(me["CapPrm"], "0000000000000000", "{me}");
    assert_eq!(me["CapBnd"], "0000000000000000", "{me}");
    assert_eq!(me["NoNewPrivs"], "1", "{me}");
    assert_eq!(me["Seccomp"], "2", "no seccomp filter: {me}");
    assert_eq!(me["hostname"], "meshbox", "no uts namespace: {me}");
    // A pid namespace of its own: pid 1 is the sandbox's init, and only its
    // own processes are visible.
    let procs = me["procs"].as_array().unwrap();
    assert!(procs.contains(&json!(1)), "{me}");
    assert!(procs.len() < 10, "sees the host's processes: {me}");
    // The same service keeps its uid across a restart.
    let (code, _) =
        h.d.post("/v1/meshes/acme/services/evil/restart", json!({}))
            .await;
    assert_eq!(code, 200);
    let again: Value =
        serde_json::from_str(&h.attack("acme", "evil", "whoami", json!({})).await).unwrap();
    assert_eq!(again["uid"], me["uid"]);
}

#[tokio::test]
#[ignore = "needs root"]
async fn cannot_read_the_runner_home_data_dir_database_or_token() {
    require_root();
    let h = Host::start(&[]);
    h.deploy("acme", "evil", json!({})).await;
    let data = h.data.path();
    let targets = [
        h.home.path().join("secret.txt"),
        h.home.path().to_path_buf(),
        data.to_path_buf(),
        data.join("meshbox.db"),
        data.join("meshbox.db-wal"),
        data.join("token"),
        data.join("sandbox-uids.json"),
        PathBuf::from("/root"),
    ];
    for t in targets {
        let got = h.attack("acme", "evil", "read", json!({"path": t})).await;
        assert_hidden(&t, &got);
    }
    // Its own home is readable and writable.
    let own = h.home_of("acme", "evil").join("note");
    assert_eq!(
        h.attack("acme", "evil", "write", json!({"path": own}))
            .await,
        "ok"
    );
    assert_eq!(
        h.attack("acme", "evil", "read", json!({"path": own})).await,
        "ok 1 bytes"
    );
}

#[tokio::test]
#[ignore = "needs root"]
async fn writes_only_its_home_and_a_private_tmp() {
    require_root();
    let h = Host::start(&[]);
    h.deploy("acme", "evil", json!({})).await;
    for path in [
        PathBuf::from("/etc/meshbox-evil"),
        PathBuf::from("/var/meshbox-evil"),
        PathBuf::from("/usr/local/meshbox-evil"),
        h.data.path().join("meshbox-evil"),
        h.home.path().join("meshbox-evil"),
    ] {
        let got = h
            .attack("acme", "evil", "write", json!({"path": path}))
            .await;
        assert_denied(&format!("writing {}", path.display()), &got);
        assert!(!path.exists(), "{} was written", path.display());
    }
    // Its source is writable only in a private layer: the host's copy,
    // which other services run, stays as it was.
    let source = fixture("hostile").join("planted.py");
    let mark = "meshbox-private-layer";
    assert_eq!(
        h.attack(
            "acme",
            "evil",
            "write",
            json!({"path": source, "text": mark})
        )
        .await,
        "ok"
    );
    assert!(!source.exists(), "the source was written on the host");
    assert_eq!(
        files_holding(&h.home_of("acme", "evil"), mark).len(),
        1,
        "the write is not in the service's home"
    );
    // /tmp is writable, but private: the host's /tmp does not see it.
    let name = format!("meshbox-sandbox-{}", std::process::id());
    let tmp = Path::new("/tmp").join(&name);
    assert_eq!(
        h.attack("acme", "evil", "write", json!({"path": tmp}))
            .await,
        "ok"
    );
    assert!(!tmp.exists(), "/tmp is the host's");
}

#[tokio::test]
#[ignore = "needs root"]
async fn cannot_write_its_cgroup() {
    require_root();
    let h = Host::start(&[]);
    h.deploy("acme", "evil", json!({"memory_mb": 128, "pids": 64}))
        .await;
    let got = h.attack("acme", "evil", "cgroup_join", json!({})).await;
    let results: Vec<String> = serde_json::from_str(&got).unwrap();
    assert!(!results.is_empty(), "found no cgroup to attack");
    for r in results {
        assert_denied("writing cgroup.procs", &r);
    }
}

#[tokio::test]
#[ignore = "needs root"]
async fn cannot_signal_meshbox_or_another_service() {
    require_root();
    let h = Host::start(&[]);
    h.deploy("acme", "evil", json!({})).await;
    let other = h.deploy("other", "victim", json!({})).await;
    let victim_pid = other["pid"].as_u64().unwrap();
    for pid in [h.d.pid() as u64, victim_pid, 1] {
        let got = h
            .attack("acme", "evil", "signal", json!({"pid": pid, "signal": 9}))
            .await;
        assert_denied(&format!("kill -9 {pid}"), &got);
    }
    // Everything still runs.
    let (code, _) = h.d.get("/v1/health").await;
    assert_eq!(code, 200);
    let me = h.attack("other", "victim", "whoami", json!({})).await;
    assert!(me.contains("\"uid\""), "{me}");
    assert_eq!(h.d.status("other", "victim").await["restarts"], 0);
}

#[tokio::test]
#[ignore = "needs root"]
async fn cannot_ptrace_or_use_denied_syscalls() {
    require_root();
    let h = Host::start(&[]);
    h.deploy("acme", "evil", json!({})).await;
    let other = h.deploy("other", "victim", json!({})).await;
    // Even its own child: only the seccomp filter stops this one.
    assert_denied(
        "ptrace of its own child",
        &h.attack("acme", "evil", "ptrace", json!({})).await,
    );
    assert_denied(
        "ptrace of another service",
        &h.attack("acme", "evil", "ptrace", json!({"pid": other["pid"]}))
            .await,
    );
    let got: Value =
        serde_json::from_str(&h.attack("acme", "evil", "syscalls", json!({})).await).unwrap();
    for (call, result) in got.as_object().unwrap() {
        assert_denied(call, result.as_str().unwrap());
        assert_eq!(result, "denied: EPERM", "{call} not denied by seccomp");
    }
}

#[tokio::test]
#[ignore = "needs root"]
async fn limits_hold_against_the_server() {
    require_root();
    let h = Host::start(&[]);
    let st = h
        .deploy("acme", "evil", json!({"memory_mb": 64, "pids": 16}))
        .await;
    assert_eq!(st["limits"]["enforced"]["memory"], true, "{st}");
    assert_eq!(st["limits"]["enforced"]["pids"], true, "{st}");
    // Past the memory limit the server dies (OOM) and is restarted.
    let (code, r) = h.d.call("acme", "evil", "alloc", json!({"mb": 400})).await;
    assert!(code == 503 || text_of(&r).starts_with("denied"), "{r}");
    let st =
        h.d.wait_status("acme", "evil", Duration::from_secs(30), |s| {
            s["status"] == "running" && s["restarts"].as_u64() >= Some(1)
        })
        .await;
    assert_eq!(st["last_exit"]["oom_killed"], true, "{st}");
    // The restarted server cannot start more threads than its pids limit.
    let started: u64 = h
        .attack("acme", "evil", "threads", json!({"n": 100}))
        .await
        .parse()
        .unwrap();
    assert!(started < 16, "pids limit not enforced: {started} threads");
}

#[tokio::test]
#[ignore = "needs root"]
async fn cannot_see_another_services_files() {
    require_root();
    let h = Host::start(&[]);
    h.deploy("acme", "evil", json!({})).await;
    h.deploy("other", "victim", json!({})).await;
    let theirs = h.home_of("other", "victim").join("private");
    assert_eq!(
        h.attack("other", "victim", "write", json!({"path": theirs}))
            .await,
        "ok"
    );
    for p in [
        theirs.clone(),
        theirs.parent().unwrap().to_path_buf(),
        h.data.path().join("home/other"),
    ] {
        let got = h.attack("acme", "evil", "read", json!({"path": p})).await;
        assert_hidden(&p, &got);
    }
    assert_denied(
        "writing another service's home",
        &h.attack("acme", "evil", "write", json!({"path": theirs}))
            .await,
    );
}

/// Processes whose command line carries `marker`.
fn with_marker(marker: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(marker))
                .unwrap_or(false)
        })
        .filter(|pid| common::pid_alive(*pid))
        .collect()
}

/// Polls `done` until it holds; fails with `why` once `limit` has passed.
async fn within(limit: Duration, why: impl Fn() -> String, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "{}", why());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn gone_within(marker: &str, limit: Duration) {
    within(
        limit,
        || {
            format!(
                "processes outlived their service: {:?}",
                with_marker(marker)
            )
        },
        || with_marker(marker).is_empty(),
    )
    .await;
}

async fn leave_grandchild(h: &Host, mesh: &str, name: &str, marker: &str) {
    assert_eq!(
        h.attack(mesh, name, "double_fork", json!({"marker": marker}))
            .await,
        "ok"
    );
    within(
        Duration::from_secs(10),
        || "the grandchild did not start".into(),
        || !with_marker(marker).is_empty(),
    )
    .await;
}

fn limits_cases() -> [(&'static str, Value); 2] {
    [
        ("bare", json!({})),
        (
            "limited",
            json!({"memory_mb": 128, "pids": 64, "cpus": 0.5}),
        ),
    ]
}

#[tokio::test]
#[ignore = "needs root"]
async fn a_double_forked_grandchild_dies_on_undeploy_and_crash() {
    require_root();
    let h = Host::start(&[]);
    for (label, limits) in limits_cases() {
        h.deploy("tree", label, limits).await;
        let marker = format!("meshbox-tree-undeploy-{label}-{}", std::process::id());
        leave_grandchild(&h, "tree", label, &marker).await;
        let (code, _) =
            h.d.delete(&format!("/v1/meshes/tree/services/{label}"))
                .await;
        assert_eq!(code, 204);
        gone_within(&marker, Duration::from_secs(5)).await;

        h.deploy("tree", label, json!({})).await;
        let marker = format!("meshbox-tree-crash-{label}-{}", std::process::id());
        leave_grandchild(&h, "tree", label, &marker).await;
        let _ = h.d.call("tree", label, "crash", json!({})).await;
        gone_within(&marker, Duration::from_secs(5)).await;
        h.d.wait_status("tree", label, Duration::from_secs(30), |s| {
            s["status"] == "running" && s["restarts"] == 1
        })
        .await;
    }
}

#[tokio::test]
#[ignore = "needs root"]
async fn a_double_forked_grandchild_dies_with_meshbox() {
    require_root();
    for (label, limits) in limits_cases() {
        let mut h = Host::start(&[]);
        h.deploy("tree", label, limits).await;
        let marker = format!("meshbox-tree-term-{label}-{}", std::process::id());
        leave_grandchild(&h, "tree", label, &marker).await;
        h.d.terminate();
        gone_within(&marker, Duration::from_secs(5)).await;
    }
}

/// Every sandbox cgroup directory under meshbox's parent whose name holds `needle`.
fn cgroup_dirs(needle: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::from("/sys/fs/cgroup")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if !e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                continue;
            }
            if p.file_name().unwrap().to_string_lossy().contains(needle) {
                out.push(p);
            } else if stack.len() < 10_000 {
                stack.push(p);
            }
        }
    }
    out
}

/// The parent of `pid`, from /proc.
fn ppid(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// When `pid` started, in clock ticks (1/100 s) since boot.
fn started_at(pid: u32) -> i64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("a live process");
    // Fields after the command's closing parenthesis; starttime is field 22.
    let rest = &stat[stat.rfind(')').expect("a stat line") + 2..];
    rest.split(' ')
        .nth(19)
        .and_then(|t| t.parse().ok())
        .expect("starttime")
}

async fn one_waiting_init(parent: u32, not: Option<u32>) -> u32 {
    let start = Instant::now();
    loop {
        let inits: Vec<u32> = common::waiting_inits(parent)
            .into_iter()
            .filter(|p| Some(*p) != not)
            .collect();
        if let [one] = inits[..] {
            return one;
        }
        assert!(inits.len() < 2, "more than one init waits ahead: {inits:?}");
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no sandbox init was started ahead"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
#[ignore = "needs root"]
async fn a_start_takes_the_init_loaded_ahead_which_never_outlives_meshbox() {
    require_root();
    let mut h = Host::start(&[]);
    let meshbox = h.d.pid();
    let ahead = one_waiting_init(meshbox, None).await;
    let st = h.deploy("ahead", "a", json!({})).await;
    let server = st["pid"].as_u64().expect("a pid while running") as u32;
    // server ← the namespace's init ← the outer init: the one started ahead.
    let outer = ppid(server).and_then(ppid);
    assert_eq!(
        outer,
        Some(ahead),
        "the start did not take the waiting init"
    );
    assert_eq!(ppid(ahead), Some(meshbox));
    // The next one loads once the server has had its boot (not beside it,
    // where it would take a core from the server), and dies with meshbox.
    let next = one_waiting_init(meshbox, Some(ahead)).await;
    let (server_at, next_at) = (started_at(server), started_at(next));
    assert!(
        next_at >= server_at + 20,
        "the next init loaded {} ticks after the server started, during its boot",
        next_at - server_at
    );
    h.d.kill();
    within(
        Duration::from_secs(5),
        || "the init started ahead outlived meshbox".into(),
        || !common::pid_alive(next),
    )
    .await;
}

/// A server's end is known when it ends, not when its sandbox is torn down:
/// unmounting the source's overlay syncs the host's filesystem, which takes
/// seconds on a busy disk (CI right after a build), and a call pending on a
/// crashed server failed with "closed its stdout" instead of its exit code.
/// Here the sandbox's outer init is stopped (SIGSTOP) before the server
/// ends, standing in for that teardown: the end and its code must still be
/// known at once, and the sandbox counts as released only once the init is gone.
#[tokio::test]
#[ignore = "needs root"]
async fn a_server_end_is_known_before_its_sandbox_is_torn_down() {
    use meshbox::model::{wait_exit, ServiceKey};
    use meshbox::orchestrator::process::{ProcessBackend, ProcessConfig};
    use meshbox::orchestrator::{Orchestrator, SandboxSpec};
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    use tokio::io::AsyncWriteExt;
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let backend = ProcessBackend::new(ProcessConfig {
        init_program: Some(PathBuf::from(env!("CARGO_BIN_EXE_meshbox"))),
        ..Default::default()
    });
    let spec = SandboxSpec {
        owner: ServiceKey {
            mesh: "m".into(),
            name: "ends".into(),
        },
        argv: ["/bin/sh", "-c", "read go; exit 7"]
            .map(String::from)
            .to_vec(),
        env: [("PATH".to_owned(), "/usr/bin:/bin".to_owned())].into(),
        home: Some(home),
        ..Default::default()
    };
    let mut sandbox = backend.spawn(spec).await.expect("spawn");
    let server = sandbox.pid.expect("the server's pid");
    // The server's parent is the pid namespace's init; its parent, the
    // sandbox's outer init: meshbox's child, whose exit ends the sandbox.
    let outer = ppid(ppid(server).unwrap()).unwrap();
    assert_eq!(ppid(outer), Some(std::process::id()));
    kill(Pid::from_raw(outer as i32), Signal::SIGSTOP).unwrap();
    sandbox.io.stdin.write_all(b"go\n").await.unwrap();
    sandbox.io.stdin.flush().await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(2), wait_exit(&mut sandbox.exit)).await;
    let handle = sandbox.handle;
    let stop = tokio::spawn(async move { handle.stop(Duration::from_secs(30)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let released_early = stop.is_finished();
    kill(Pid::from_raw(outer as i32), Signal::SIGCONT).unwrap();
    let ended = ended.expect("the server's end was known only once its sandbox was torn down");
    assert_eq!(ended.code, Some(7), "{ended:?}");
    assert!(!released_early, "released while its init was still there");
    let released = tokio::time::timeout(Duration::from_secs(5), stop)
        .await
        .expect("not released once its init went")
        .unwrap();
    assert_eq!(released.code, Some(7), "{released:?}");
}

#[tokio::test]
#[ignore = "needs root"]
async fn sigkill_then_restart_leaves_nothing() {
    require_root();
    for (label, limits) in limits_cases() {
        let mut h = Host::start(&[]);
        let mesh = format!("sweep{}", std::process::id());
        h.deploy(&mesh, label, limits).await;
        let marker = format!("meshbox-tree-kill-{label}-{}", std::process::id());
        leave_grandchild(&h, &mesh, label, &marker).await;
        let needle = format!(".{mesh}.{label}");
        // Limits live in cgroups of the service's own (a pid namespace, not
        // a cgroup, holds the tree of a service without limits).
        assert_eq!(
            !cgroup_dirs(&needle).is_empty(),
            label == "limited",
            "cgroups of {label}"
        );
        h.d.kill();
        gone_within(&marker, Duration::from_secs(5)).await;
        // The next meshbox on this data dir sweeps what the dead one left.
        let data = h.data.path().to_path_buf();
        let token = data.join("token");
        let again = Daemon::start_in(
            &data,
            &["--token-file", token.to_str().unwrap()],
            &[("HOME", h.home.path().to_str().unwrap())],
        );
        let start = Instant::now();
        loop {
            // Only directories of the dead meshbox count: the restored
            // service has new ones, named after the new pid.
            let dead = format!("{}.", h.d.pid());
            let left: Vec<PathBuf> = cgroup_dirs(&needle)
                .into_iter()
                .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(&dead))
                .collect();
            if left.is_empty() {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "cgroups of a dead meshbox were not swept: {left:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        drop(again);
    }
}

/// Without a pid namespace the init supervises the server as a subreaper:
/// the server's own parent-death signal is all that ends it with meshbox,
/// and it must survive the switch to the service's uid (the kernel clears
/// it on a credential change).
#[tokio::test]
#[ignore = "needs root"]
async fn without_a_pid_namespace_a_server_dies_with_meshbox() {
    require_root();
    let h = Host::start_env(&[], &[("MESHBOX_SANDBOX_WITHOUT", "pid-namespace")]);
    // The server outlives its stdin's end, as a hostile one may.
    let st = h
        .deploy("orphan", "srv", json!({"args": ["--ignore-eof"]}))
        .await;
    assert_eq!(
        st["limits"]["isolation"]["missing"],
        json!(["pid-namespace"]),
        "{st}"
    );
    let server = st["pid"].as_u64().expect("a pid while running");
    let alive = || {
        std::fs::read_to_string(format!("/proc/{server}/stat"))
            .is_ok_and(|s| s.rsplit(") ").next().is_some_and(|f| !f.starts_with('Z')))
    };
    assert!(alive(), "the server runs");
    let marker = format!("meshbox-orphan-{}", std::process::id());
    leave_grandchild(&h, "orphan", "srv", &marker).await;
    let mut h = h;
    h.d.kill();
    gone_within(&marker, Duration::from_secs(5)).await;
    within(
        Duration::from_secs(5),
        || format!("server {server} outlived meshbox's SIGKILL"),
        || !alive(),
    )
    .await;
}

#[tokio::test]
#[ignore = "needs root"]
async fn allowlisted_sandbox_cannot_reach_the_host_loopback() {
    require_root();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let h = Host::start(&[]);
    let st = h
        .deploy(
            "net",
            "allow",
            json!({"network": {"allow": [format!("localhost:{port}"), "127.0.0.1:1"]}}),
        )
        .await;
    assert_eq!(st["limits"]["enforced"]["network"], true, "{st}");
    assert_denied(
        "a direct connection to the host's loopback",
        &h.attack(
            "net",
            "allow",
            "connect",
            json!({"host": "127.0.0.1", "port": port}),
        )
        .await,
    );
    // Through the proxy, even an allowlisted name for the host is refused.
    assert_denied(
        "the host's loopback through the proxy",
        &h.attack(
            "net",
            "allow",
            "http_get",
            json!({"url": format!("http://localhost:{port}/")}),
        )
        .await,
    );
    // Not on the list: refused by the proxy.
    let got = h
        .attack(
            "net",
            "allow",
            "http_get",
            json!({"url": "http://example.com/"}),
        )
        .await;
    assert!(got.contains("403"), "{got}");
}

#[tokio::test]
#[ignore = "needs root and registry access"]
async fn allowlisted_sandbox_reaches_an_allowed_registry() {
    require_root();
    let h = Host::start(&[]);
    h.deploy(
        "net",
        "reg",
        json!({"network": {"allow": ["registry.npmjs.org:443"]}, "env": {"SSL_CERT_FILE": "/etc/ssl/certs/ca-certificates.crt"}}),
    )
    .await;
    let got = h
        .attack(
            "net",
            "reg",
            "http_get",
            json!({"url": "https://registry.npmjs.org/-/ping"}),
        )
        .await;
    assert!(got.starts_with("ok 200"), "allowed host unreachable: {got}");
    let got = h
        .attack(
            "net",
            "reg",
            "http_get",
            json!({"url": "https://pypi.org/simple/"}),
        )
        .await;
    assert!(
        got.contains("403"),
        "a host not on the list was reached: {got}"
    );
}

/// Issue 11 item 8: a host without Landlock and without pid and mount
/// namespaces (simulated by leaving them out) gets the other layers; the
/// status lists the missing ones and claims no filesystem isolation; and
/// `--require-isolation` refuses such a service, naming a missing layer.
#[tokio::test]
#[ignore = "needs root"]
async fn a_host_without_landlock_or_namespaces_says_what_is_missing() {
    require_root();
    let without = [(
        "MESHBOX_SANDBOX_WITHOUT",
        "landlock,mount-namespace,pid-namespace",
    )];
    let h = Host::start_env(&[], &without);
    // Without a mount namespace a runtime under /root (pyenv) is out of the
    // service uid's reach: the system's python runs it.
    let st = h
        .deploy(
            "acme",
            "weak",
            json!({"network": "none", "memory_mb": 128,
                   "command": ["/usr/bin/python3", "server.py"]}),
        )
        .await;
    let isolation = &st["limits"]["isolation"];
    assert_eq!(
        isolation["missing"],
        json!(["pid-namespace", "mount-namespace", "landlock"]),
        "{st}"
    );
    assert_eq!(
        isolation["applied"],
        json!([
            "uid",
            "ipc-namespace",
            "uts-namespace",
            "network-namespace",
            "no-capabilities",
            "no-new-privs",
            "seccomp",
            "cgroup"
        ]),
        "{st}"
    );
    assert_eq!(st["limits"]["enforced"]["filesystem"], false, "{st}");
    assert_eq!(st["limits"]["enforced"]["network"], true, "{st}");
    // What the status says is what the server gets: the host's processes
    // are in sight.
    let me: Value =
        serde_json::from_str(&h.attack("acme", "weak", "whoami", json!({})).await).unwrap();
    assert!(me["procs"].as_array().unwrap().len() > 10, "{me}");
    assert_eq!(me["Seccomp"], "2", "{me}");
    drop(h);

    let strict = Host::start_env(&["--require-isolation"], &without);
    let spec = json!({"source": format!("path:{}", fixture("hostile").display())});
    let (code, r) = strict.d.put("/v1/meshes/acme/services/weak", spec).await;
    assert!(code >= 400, "a weaker sandbox was started: {r}");
    let msg = r["error"].as_str().unwrap_or_default();
    assert!(
        msg.contains("pid-namespace") || msg.contains("landlock"),
        "the refusal names no missing layer: {r}"
    );
}

#[tokio::test]
#[ignore = "needs root"]
async fn require_isolation_starts_fully_isolated_services() {
    require_root();
    let h = Host::start(&["--require-isolation"]);
    let st = h.deploy("acme", "strict", json!({"network": "none"})).await;
    assert_eq!(st["limits"]["enforced"]["filesystem"], true, "{st}");
    assert_eq!(st["limits"]["enforced"]["network"], true, "{st}");
}

/// An unprivileged meshbox (nobody) still sandboxes: a user namespace,
/// Landlock and seccomp; its home stays invisible.
#[tokio::test]
#[ignore = "needs root"]
async fn an_unprivileged_meshbox_still_sandboxes() {
    require_root();
    use std::os::unix::fs::PermissionsExt;
    let base = tempfile::tempdir().unwrap();
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (data, home) = (base.path().join("data"), base.path().join("home"));
    for d in [&data, &home] {
        std::fs::create_dir(d).unwrap();
        std::os::unix::fs::chown(d, Some(65534), Some(65534)).unwrap();
    }
    let secret = home.join("secret.txt");
    std::fs::write(&secret, SECRET).unwrap();
    std::os::unix::fs::chown(&secret, Some(65534), Some(65534)).unwrap();
    // A source of its own user's, as on a laptop.
    let src = base.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::copy(fixture("hostile").join("server.py"), src.join("server.py")).unwrap();
    for p in [&src, &src.join("server.py")] {
        std::os::unix::fs::chown(p, Some(65534), Some(65534)).unwrap();
    }
    let d = Daemon::start_wrapped_in(
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
        ],
        &data,
        &["--require-isolation"],
        &[
            ("HOME", home.to_str().unwrap()),
            ("PATH", "/usr/local/bin:/usr/bin:/bin"),
        ],
    );
    let (code, st) = d
        .put(
            "/v1/meshes/dev/services/evil",
            json!({"source": format!("path:{}", src.display()),
                   "command": ["/usr/bin/python3", "server.py"],
                   "network": "none"}),
        )
        .await;
    assert_eq!(code, 200, "{st}");
    assert_eq!(st["limits"]["enforced"]["filesystem"], true, "{st}");
    assert_eq!(st["limits"]["enforced"]["network"], true, "{st}");
    let isolation = &st["limits"]["isolation"];
    assert_eq!(isolation["missing"], json!([]), "{st}");
    let applied = isolation["applied"].as_array().unwrap();
    for layer in ["user-namespace", "network-namespace", "landlock", "seccomp"] {
        assert!(applied.contains(&json!(layer)), "{layer} not applied: {st}");
    }
    assert!(!applied.contains(&json!("uid")), "no uid of its own: {st}");
    let call = |tool: &'static str, args: Value| {
        let d = &d;
        async move { text_of(&d.call("dev", "evil", tool, args).await.1) }
    };
    let me: Value = serde_json::from_str(&call("whoami", json!({})).await).unwrap();
    assert_eq!(me["uid"], 65534, "{me}");
    assert_eq!(me["CapEff"], "0000000000000000", "{me}");
    assert_eq!(me["NoNewPrivs"], "1", "{me}");
    assert_eq!(me["Seccomp"], "2", "{me}");
    assert!(me["procs"].as_array().unwrap().len() < 10, "{me}");
    for p in [secret.clone(), data.join("meshbox.db")] {
        let got = call("read", json!({"path": p})).await;
        assert_denied(&format!("reading {}", p.display()), &got);
    }
    assert_denied(
        "signalling the meshbox that started it",
        &call("signal", json!({"pid": d.pid(), "signal": 9})).await,
    );
    assert_denied("ptrace", &call("ptrace", json!({})).await);
    // Its source is writable in a private layer (an overlay in its user
    // namespace) whose writes land in its home, not in the source.
    let planted = src.join("planted.txt");
    let mark = "meshbox-private-layer";
    assert_eq!(
        call("write", json!({"path": planted, "text": mark})).await,
        "ok"
    );
    assert!(!planted.exists(), "the source was written on the host");
    assert_eq!(
        files_holding(&data.join("home/dev/evil"), mark).len(),
        1,
        "the write is not in the service's home"
    );
}

#[tokio::test]
#[ignore = "needs root"]
async fn mounts_are_visible_writable_or_read_only_as_asked() {
    require_root();
    use std::os::unix::fs::MetadataExt;
    let roots = tempfile::tempdir().unwrap();
    let (rw, ro) = (roots.path().join("rw"), roots.path().join("ro"));
    for d in [&rw, &ro] {
        std::fs::create_dir(d).unwrap();
        std::fs::write(d.join("existing.txt"), "host data").unwrap();
    }
    let root_arg = roots.path().to_string_lossy().into_owned();
    let h = Host::start(&["--mount-root", &root_arg]);
    h.deploy(
        "acme",
        "mnt",
        json!({"mounts": [{"path": rw}, {"path": ro, "read_only": true}]}),
    )
    .await;
    for d in [&rw, &ro] {
        assert_eq!(
            h.attack(
                "acme",
                "mnt",
                "read",
                json!({"path": d.join("existing.txt")})
            )
            .await,
            "ok 9 bytes"
        );
    }
    // The service's own uid writes the operator's directory as its owner would.
    assert_eq!(
        h.attack("acme", "mnt", "write", json!({"path": rw.join("new.txt")}))
            .await,
        "ok"
    );
    let meta = std::fs::metadata(rw.join("new.txt")).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid()),
        (0, 0),
        "lands as the directory's owner"
    );
    assert_denied(
        "writing a read-only mount",
        &h.attack("acme", "mnt", "write", json!({"path": ro.join("new.txt")}))
            .await,
    );
    assert!(!ro.join("new.txt").exists());
}

/// Fast lane: specs may mount only inside `--mount-root`; the 400 names the path.
#[tokio::test]
async fn spec_mounts_outside_every_mount_root_are_refused() {
    let roots = tempfile::tempdir().unwrap();
    let inside = roots.path().join("ok");
    std::fs::create_dir(&inside).unwrap();
    let outside = tempfile::tempdir().unwrap();
    // A symlink inside the root that leads out of it does not count as inside.
    let sneaky = roots.path().join("sneaky");
    std::os::unix::fs::symlink(outside.path(), &sneaky).unwrap();
    let d = Daemon::start_with(&["--mount-root", roots.path().to_str().unwrap()], &[]);
    let py = format!("path:{}", fixture("py_server").display());
    for bad in [
        outside.path().to_path_buf(),
        sneaky,
        roots.path().join("missing"),
    ] {
        let (code, r) = d
            .put(
                "/v1/meshes/m/services/x",
                json!({"source": py, "mounts": [{"path": bad}]}),
            )
            .await;
        assert_eq!(code, 400, "{r}");
        let msg = r["error"].as_str().unwrap();
        assert!(msg.contains(bad.to_str().unwrap()), "{msg}");
    }
    assert_eq!(
        d.get("/v1/meshes/m/services/x").await.0,
        404,
        "something was created"
    );
    let (code, r) = d
        .put(
            "/v1/meshes/m/services/x",
            json!({"source": py, "mounts": [{"path": inside, "read_only": true}]}),
        )
        .await;
    assert_eq!(code, 200, "{r}");
}

/// The MCP Python SDK that scripts/mcp-clients.sh installs.
fn mcp_python() -> PathBuf {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/mcp-clients/venv/bin/python");
    assert!(
        python.is_file(),
        "needs clients: {} is missing; run scripts/mcp-clients.sh first",
        python.display()
    );
    python
}

/// Issue 11 item 4: a real MCP client runs the filesystem server through
/// `meshbox run --mount DIR -- DIR`: it lists and writes there, and cannot
/// read a planted file in the user's home. Needs the clients of
/// scripts/mcp-clients.sh and the npm registry.
#[tokio::test]
#[ignore = "needs clients"]
async fn meshbox_run_filesystem_server_with_a_mount() {
    let python = mcp_python();
    let home = tempfile::tempdir().unwrap();
    let secret = home.path().join("secret.txt");
    std::fs::write(&secret, SECRET).unwrap();
    let allowed = tempfile::tempdir().unwrap();
    std::fs::write(allowed.path().join("existing.txt"), "x").unwrap();
    // The npm install is cached across runs here.
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/sandbox-run-data");
    let out = tokio::process::Command::new(python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/fs_client.py"))
        .arg(common::meshbox_bin())
        .arg(allowed.path())
        .arg(&secret)
        .env("HOME", home.path())
        .env("XDG_DATA_HOME", &data)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(300), out)
        .await
        .expect("the client did not finish within 300s")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "client failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(r["write"]["error"], false, "{r}");
    assert_eq!(
        std::fs::read_to_string(allowed.path().join("written.txt")).unwrap(),
        "hello from the sandbox"
    );
    let listing = r["list"]["text"].as_str().unwrap();
    assert!(
        listing.contains("existing.txt") && listing.contains("written.txt"),
        "{r}"
    );
    assert_eq!(r["secret"]["error"], true, "{r}");
    assert!(!r.to_string().contains(SECRET), "the secret leaked: {r}");
}

/// `meshbox run SOURCE` over stdio, its data dir given.
struct StdioRun {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    next: u64,
}

impl StdioRun {
    async fn start(data: &Path, home: &Path, source: &str) -> StdioRun {
        use tokio::io::AsyncBufReadExt;
        let mut child = tokio::process::Command::new(common::meshbox_bin())
            .args(["run", "--data-dir"])
            .arg(data)
            .arg(source)
            .env("HOME", home)
            .env("MESHBOX_LOG", "warn")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let mut run = StdioRun {
            child,
            stdin,
            lines,
            next: 0,
        };
        let init = run
            .rpc(
                "initialize",
                json!({"protocolVersion": "2025-06-18", "capabilities": {},
                       "clientInfo": {"name": "t", "version": "0"}}),
            )
            .await;
        assert!(init["protocolVersion"].is_string(), "{init}");
        run.send(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
            .await;
        run
    }

    async fn send(&mut self, v: Value) {
        use tokio::io::AsyncWriteExt;
        self.stdin
            .write_all(format!("{v}\n").as_bytes())
            .await
            .unwrap();
    }

    async fn rpc(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        self.send(json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}))
            .await;
        let read = async {
            while let Some(line) = self.lines.next_line().await.unwrap() {
                let v: Value = match serde_json::from_str(&line) {
                    Ok(v) => v,
                    Err(_) => continue,
                };
                if v["id"] == id {
                    return v["result"].clone();
                }
            }
            panic!("meshbox run ended before answering {method}");
        };
        tokio::time::timeout(Duration::from_secs(120), read)
            .await
            .unwrap_or_else(|_| panic!("no answer to {method} within 120s"))
    }

    async fn attack(&mut self, tool: &str, args: Value) -> String {
        let r = self
            .rpc("tools/call", json!({"name": tool, "arguments": args}))
            .await;
        text_of(&json!({ "result": r }))
    }

    async fn uid(&mut self) -> u64 {
        let me: Value = serde_json::from_str(&self.attack("whoami", json!({})).await).unwrap();
        me["uid"].as_u64().unwrap()
    }

    async fn stop(mut self) {
        drop(self.stdin);
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
        let _ = self.child.kill().await;
    }
}

/// Repeated `meshbox run` of one source reuse one uid and one home (state
/// persists between runs); another source gets its own; concurrent runs of
/// one source share them; the uid table holds one entry per source.
#[tokio::test]
#[ignore = "needs root"]
async fn meshbox_run_keeps_one_uid_and_home_per_source() {
    require_root();
    let base = tempfile::tempdir().unwrap();
    let (data, home) = (base.path().join("data"), base.path().join("home"));
    std::fs::create_dir_all(&home).unwrap();
    let hostile = format!("path:{}", fixture("hostile").display());
    let other_dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("hostile").join("server.py"),
        other_dir.path().join("server.py"),
    )
    .unwrap();
    let other = format!("path:{}", other_dir.path().display());
    let homes = || -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(data.join("home/local"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        v
    };

    let mut first = StdioRun::start(&data, &home, &hostile).await;
    let uid = first.uid().await;
    assert!(uid >= 1_800_000_000, "not a per-service uid: {uid}");
    let own = homes();
    assert_eq!(own.len(), 1, "{own:?}");
    let state = own[0].join("state");
    assert_eq!(first.attack("write", json!({"path": state})).await, "ok");
    first.stop().await;

    let mut again = StdioRun::start(&data, &home, &hostile).await;
    assert_eq!(again.uid().await, uid, "another uid for the same source");
    assert_eq!(
        again.attack("read", json!({"path": state})).await,
        "ok 1 bytes",
        "the state of the last run is gone"
    );
    // A concurrent run of the same source shares uid and home.
    let mut beside = StdioRun::start(&data, &home, &hostile).await;
    assert_eq!(beside.uid().await, uid);
    assert_eq!(
        beside.attack("read", json!({"path": state})).await,
        "ok 1 bytes"
    );
    beside.stop().await;
    again.stop().await;

    let mut theirs = StdioRun::start(&data, &home, &other).await;
    assert_ne!(theirs.uid().await, uid, "two sources share a uid");
    assert_denied(
        "reading another source's home",
        &theirs.attack("read", json!({"path": state})).await,
    );
    theirs.stop().await;
    assert_eq!(homes().len(), 2, "{:?}", homes());
    let table: Value =
        serde_json::from_slice(&std::fs::read(data.join("sandbox-uids.json")).unwrap()).unwrap();
    assert_eq!(table.as_object().unwrap().len(), 2, "{table}");
}

/// Every file under `dir` with its size (what a cache entry holds).
fn tree_of(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let meta = std::fs::symlink_metadata(e.path()).unwrap();
            if meta.is_dir() {
                stack.push(e.path());
            } else {
                out.push((e.path(), meta.len()));
            }
        }
    }
    out.sort();
    out
}

/// Files under `dir` whose content holds `needle`.
fn files_holding(dir: &Path, needle: &str) -> Vec<PathBuf> {
    tree_of(dir)
        .into_iter()
        .filter(|(p, _)| {
            std::fs::read(p)
                .map(|b| String::from_utf8_lossy(&b).contains(needle))
                .unwrap_or(false)
        })
        .map(|(p, _)| p)
        .collect()
}

/// Issue 11 item 6: `server-memory` writes its graph next to its code. In
/// process mode the installed source is read-only to it, yet it works with
/// no configuration: its writes land in a private layer in its own home.
/// Two meshes running it do not see each other's graph, the shared install
/// cache is unchanged, and the graph survives a restart.
#[tokio::test]
#[ignore = "needs root and registry access"]
async fn server_memory_keeps_each_services_graph_in_its_own_home() {
    require_root();
    let h = Host::start(&[]);
    let spec = json!({"source": "npm:@modelcontextprotocol/server-memory", "network": "none"});
    for mesh in ["one", "two"] {
        let (code, st) =
            h.d.put(&format!("/v1/meshes/{mesh}/services/memory"), spec.clone())
                .await;
        assert_eq!(code, 200, "{st}");
    }
    let cache = h.data.path().join("cache");
    let before = tree_of(&cache);
    assert!(
        !before.is_empty(),
        "nothing installed in {}",
        cache.display()
    );
    let entity = format!("meshbox-entity-{}", std::process::id());
    let (code, r) =
        h.d.call(
            "one",
            "memory",
            "create_entities",
            json!({"entities": [{"name": entity, "entityType": "test", "observations": ["seen"]}]}),
        )
        .await;
    assert_eq!(code, 200, "{r}");
    assert_ne!(
        r["result"]["isError"], true,
        "writing the graph failed: {r}"
    );
    let graph = |mesh: &'static str| {
        let d = &h.d;
        async move {
            let (code, r) = d.call(mesh, "memory", "read_graph", json!({})).await;
            assert_eq!(code, 200, "{r}");
            r.to_string()
        }
    };
    assert!(
        graph("one").await.contains(&entity),
        "mesh one lost its entity"
    );
    assert!(
        !graph("two").await.contains(&entity),
        "mesh two sees mesh one's graph"
    );
    assert_eq!(tree_of(&cache), before, "the shared install cache changed");
    assert!(files_holding(&cache, &entity).is_empty());
    let theirs = files_holding(&h.home_of("one", "memory"), &entity);
    assert!(
        !theirs.is_empty(),
        "the graph is not under the service's home"
    );
    assert!(files_holding(&h.home_of("two", "memory"), &entity).is_empty());
    // The graph lives on across a restart.
    let (code, _) =
        h.d.post("/v1/meshes/one/services/memory/restart", json!({}))
            .await;
    assert_eq!(code, 200);
    assert!(
        graph("one").await.contains(&entity),
        "the graph did not persist"
    );
}

/// Fast lane: servers started from inits loaded ahead outlive the thread
/// that loaded them. An init's parent-death signal fires when the *thread*
/// that forked it ends; spares loaded on a blocking-pool thread (which ends
/// after 10 s idle) killed their servers with SIGKILL some 10 s later.
#[tokio::test]
async fn servers_outlive_the_thread_that_loaded_their_init() {
    let d = Daemon::start();
    let mut pids = Vec::new();
    for name in ["a", "b", "c"] {
        let (code, st) = d.deploy_py("spare", name, &[], json!({})).await;
        assert_eq!(code, 200, "{st}");
        pids.push(st["pid"].clone());
        // Past the refill delay: the next start takes a spare loaded meanwhile.
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    // Past the blocking pool's 10 s keep-alive.
    tokio::time::sleep(Duration::from_secs(13)).await;
    for (name, pid) in ["a", "b", "c"].into_iter().zip(pids) {
        let st = d.status("spare", name).await;
        assert_eq!(st["status"], "running", "{st}");
        assert_eq!(st["restarts"], 0, "{name} was restarted: {st}");
        assert_eq!(st["pid"], pid, "{st}");
    }
}
