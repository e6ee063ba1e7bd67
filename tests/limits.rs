//! Process-mode limits, proved from inside the sandbox: cgroup memory, cpu
//! and pids, the rlimit fallback, and `network: none` through a network
//! namespace. These need root and writable cgroups (CI has both); elsewhere
//! they print why they skip.

mod common;

use std::time::Duration;

use common::{is_root, text_of, Daemon};
use serde_json::json;

fn cgroups_writable() -> bool {
    let probe = std::path::Path::new("/sys/fs/cgroup/memory/meshbox-probe");
    let v1 = std::fs::create_dir(probe).is_ok() && std::fs::remove_dir(probe).is_ok();
    v1 || std::fs::read_to_string("/sys/fs/cgroup/cgroup.subtree_control")
        .map(|s| s.contains("memory"))
        .unwrap_or(false)
}

fn skip(why: &str) -> bool {
    eprintln!("skipping: {why}");
    true
}

/// The cgroup v1 directory of `pid` for `controller`, if any.
fn cgroup_dir(pid: u64, controller: &str) -> Option<std::path::PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
        ctrls.split(',').any(|c| c == controller).then(|| {
            std::path::Path::new("/sys/fs/cgroup")
                .join(controller)
                .join(path.trim_start_matches('/'))
        })
    })
}

#[tokio::test]
async fn cgroup_limits_are_enforced_and_reported() {
    if !is_root() && skip("needs root")
        || !cgroups_writable() && skip("cgroups are not writable here")
    {
        return;
    }
    let d = Daemon::start();
    let (code, st) = d
        .deploy_py(
            "lim",
            "cg",
            &[],
            json!({"memory_mb": 64, "cpus": 0.5, "pids": 32}),
        )
        .await;
    assert_eq!(code, 200, "{st}");
    let enforced = &st["limits"]["enforced"];
    assert_eq!(
        enforced,
        &json!({"memory": true, "cpus": true, "pids": true, "network": true, "filesystem": true}),
        "{st}"
    );
    assert_eq!(st["limits"]["memory_mb"], 64);
    let pid = st["pid"].as_u64().unwrap();
    if let Some(dir) = cgroup_dir(pid, "memory") {
        let limit = std::fs::read_to_string(dir.join("memory.limit_in_bytes")).unwrap();
        assert_eq!(limit.trim(), (64u64 << 20).to_string());
        let quota =
            std::fs::read_to_string(cgroup_dir(pid, "cpu").unwrap().join("cpu.cfs_quota_us"))
                .unwrap();
        assert_eq!(quota.trim(), "50000");
    }

    // pids: the server cannot start more threads than the limit allows.
    let (code, r) = d.call("lim", "cg", "threads", json!({"n": 100})).await;
    assert_eq!(code, 200, "{r}");
    let started: u64 = text_of(&r).parse().unwrap();
    assert!(
        started < 32,
        "pids limit not enforced: {started} threads started"
    );
    // Those threads are gone before the answer: calls side by side (each a
    // thread of the fixture) still get pids, so what ends the server below
    // is memory, not a thread it could not start.
    let (a, b) = tokio::join!(
        d.call("lim", "cg", "slow", json!({"ms": 300})),
        d.call("lim", "cg", "slow", json!({"ms": 300}))
    );
    assert_eq!((a.0, b.0), (200, 200), "{} {}", a.1, b.1);

    // memory: past the limit the OOM killer ends the server, status says so, and it restarts.
    let (code, r) = d.call("lim", "cg", "alloc", json!({"mb": 256})).await;
    assert_eq!(code, 503, "{r}");
    let st = d
        .wait_status("lim", "cg", Duration::from_secs(20), |s| {
            s["status"] == "running" && s["restarts"] == 1
        })
        .await;
    assert_eq!(st["last_exit"]["oom_killed"], true, "{st}");
    assert_eq!(st["last_exit"]["signal"], 9, "{st}");
}

#[tokio::test]
async fn rlimit_fallback_without_cgroups() {
    let d = Daemon::start_with(&["--no-cgroups"], &[]);
    let (code, st) = d
        .deploy_py("lim", "rl", &[], json!({"memory_mb": 128, "cpus": 0.5}))
        .await;
    assert_eq!(code, 200, "{st}");
    // Memory is bounded by RLIMIT_DATA; a cpu share has no rlimit, so it is not claimed.
    assert_eq!(st["limits"]["enforced"]["memory"], true, "{st}");
    assert_eq!(st["limits"]["enforced"]["cpus"], false, "{st}");
    let (code, r) = d.call("lim", "rl", "alloc", json!({"mb": 512})).await;
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["result"]["isError"], true, "{r}");
    assert_eq!(text_of(&r), "MemoryError");
}

#[tokio::test]
async fn network_none_cuts_the_server_off() {
    if !is_root() && skip("network namespaces need root") {
        return;
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let d = Daemon::start();
    let target = json!({"host": "127.0.0.1", "port": port});

    let (code, st) = d
        .deploy_py("net", "open", &[], json!({"network": "full"}))
        .await;
    assert_eq!(code, 200, "{st}");
    let (_, r) = d.call("net", "open", "connect", target.clone()).await;
    assert_eq!(text_of(&r), "connected", "{r}");

    let (code, st) = d
        .deploy_py("net", "closed", &[], json!({"network": "none"}))
        .await;
    assert_eq!(code, 200, "{st}");
    assert_eq!(st["network"], "none");
    assert_eq!(st["limits"]["enforced"]["network"], true);
    let (_, r) = d.call("net", "closed", "connect", target).await;
    assert_eq!(r["result"]["isError"], true, "{r}");
    assert!(text_of(&r).starts_with("failed"), "{r}");
}
