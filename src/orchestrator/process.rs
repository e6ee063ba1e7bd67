//! The process backend: each server is a local child process in its own
//! process group, limited by cgroups (v1 or v2) where the host lets us write
//! them, by rlimits otherwise, and cut off the network by a fresh network
//! namespace when we may create one.
//!
//! This module owns every syscall the process backend makes; the only
//! `unsafe` is the `pre_exec` hook and the signal calls, each with a SAFETY note.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::process::Command;
use tokio::sync::watch;
use tracing::{debug, warn};

use super::{
    Capabilities, Completed, Enforced, ExitReason, Limits, Orchestrator, OrchestratorError,
    Sandbox, SandboxHandle, SandboxIo, SandboxSpec, Unsupported, MAX_COMPLETED_OUTPUT,
};
use crate::model::{NetworkMode, NetworkPolicy};

/// Options of the process backend.
#[derive(Debug, Clone)]
pub struct ProcessConfig {
    /// Use cgroups when the host lets us write them.
    pub cgroups: bool,
    /// Name of the cgroup directory meshbox creates its sandboxes under.
    pub cgroup_parent: String,
}

impl Default for ProcessConfig {
    fn default() -> Self {
        ProcessConfig {
            cgroups: true,
            cgroup_parent: "meshbox".into(),
        }
    }
}

/// The cgroup hierarchy this host offers us.
#[derive(Debug, Clone)]
enum Hierarchy {
    /// cgroup v2: one directory (ours), with controllers delegated to children.
    V2 {
        base: PathBuf,
    },
    /// cgroup v1: one mount per controller.
    V1 {
        memory: Option<PathBuf>,
        cpu: Option<PathBuf>,
        pids: Option<PathBuf>,
    },
    None,
}

pub struct ProcessBackend {
    hierarchy: Hierarchy,
    can_unshare_net: bool,
    is_root: bool,
    seq: AtomicU64,
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

impl ProcessBackend {
    pub fn new(config: ProcessConfig) -> Self {
        let hierarchy = if config.cgroups {
            detect_hierarchy(&config.cgroup_parent)
        } else {
            Hierarchy::None
        };
        let root = is_root();
        debug!(?hierarchy, root, "process backend");
        ProcessBackend {
            hierarchy,
            can_unshare_net: root,
            is_root: root,
            seq: AtomicU64::new(0),
        }
    }

    /// A one-line description for `meshbox doctor`.
    pub fn describe(&self) -> String {
        let cg = match &self.hierarchy {
            Hierarchy::V2 { base } => format!("cgroup v2 at {}", base.display()),
            Hierarchy::V1 { memory, cpu, pids } => format!(
                "cgroup v1 (memory: {}, cpu: {}, pids: {})",
                memory.is_some(),
                cpu.is_some(),
                pids.is_some()
            ),
            Hierarchy::None => "no writable cgroups (rlimits only)".into(),
        };
        format!(
            "{cg}; network namespaces: {}",
            if self.can_unshare_net {
                "yes"
            } else {
                "no (not root)"
            }
        )
    }

    fn predict(&self, limits: &Limits) -> Enforced {
        let (cpu, pids) = match &self.hierarchy {
            Hierarchy::V2 { .. } => (true, true),
            Hierarchy::V1 { cpu, pids, .. } => (cpu.is_some(), pids.is_some()),
            Hierarchy::None => (false, false),
        };
        Enforced {
            // RLIMIT_DATA bounds the heap when no memory cgroup is at hand.
            memory: limits.memory_mb.is_some(),
            cpus: limits.cpus.is_some() && cpu,
            // RLIMIT_NPROC does not bind root, so without cgroups root has no pids limit.
            pids: limits.pids.is_some() && (pids || !self.is_root),
            network: false,
            filesystem: false,
        }
    }
}

/// Finds where we may create cgroups: v2 when its controllers are delegable,
/// else the v1 controller mounts, else none.
fn detect_hierarchy(parent: &str) -> Hierarchy {
    let Ok(mountinfo) = fs::read_to_string("/proc/self/mountinfo") else {
        return Hierarchy::None;
    };
    let own = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mut v1 = (None, None, None);
    let mut v2 = None;
    for line in mountinfo.lines() {
        // id parent major:minor root mountpoint opts... - fstype source superopts
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let fields: Vec<&str> = left.split(' ').collect();
        let rfields: Vec<&str> = right.split(' ').collect();
        if fields.len() < 5 || rfields.len() < 3 {
            continue;
        }
        let mount = PathBuf::from(fields[4]);
        match rfields[0] {
            "cgroup2" => v2 = Some(mount),
            "cgroup" => {
                let opts: Vec<&str> = rfields[2].split(',').collect();
                if opts.contains(&"memory") {
                    v1.0 = Some(mount.clone());
                }
                if opts.contains(&"cpu") {
                    v1.1 = Some(mount.clone());
                }
                if opts.contains(&"pids") {
                    v1.2 = Some(mount);
                }
            }
            _ => {}
        }
    }
    if let Some(mount) = v2 {
        let own_path = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .unwrap_or("/")
            .trim_start_matches('/');
        if let Some(base) = prepare_v2(&mount, own_path, parent) {
            return Hierarchy::V2 { base };
        }
    }
    let try_v1 = |m: Option<PathBuf>| {
        let m = m?;
        let dir = m.join(parent);
        (fs::create_dir_all(&dir).is_ok() && dir.join("cgroup.procs").exists()).then_some(dir)
    };
    let (memory, cpu, pids) = (try_v1(v1.0), try_v1(v1.1), try_v1(v1.2));
    if memory.is_none() && cpu.is_none() && pids.is_none() {
        Hierarchy::None
    } else {
        Hierarchy::V1 { memory, cpu, pids }
    }
}

/// Makes `<mount>/<own>/<parent>` with memory, cpu and pids delegated to its children.
fn prepare_v2(mount: &Path, own: &str, parent: &str) -> Option<PathBuf> {
    let controllers = fs::read_to_string(mount.join(own).join("cgroup.controllers")).ok()?;
    let needed = ["memory", "cpu", "pids"];
    if !needed
        .iter()
        .all(|c| controllers.split_whitespace().any(|x| x == *c))
    {
        return None;
    }
    let here = mount.join(own);
    let base = here.join(parent);
    fs::create_dir_all(&base).ok()?;
    let enable = "+memory +cpu +pids";
    // The parent must delegate; this fails where it holds processes (v2's
    // no-internal-process rule) unless it is the root, and then we fall back.
    fs::write(here.join("cgroup.subtree_control"), enable).ok()?;
    fs::write(base.join("cgroup.subtree_control"), enable).ok()?;
    Some(base)
}

/// The cgroup directories of one sandbox, removed when it is done.
#[derive(Debug, Default)]
struct Cgroups {
    dirs: Vec<PathBuf>,
    /// Directory whose memory events tell whether the OOM killer struck.
    memory: Option<(PathBuf, bool)>,
}

impl Cgroups {
    fn create(h: &Hierarchy, name: &str, limits: &Limits) -> (Cgroups, Enforced) {
        let mut cg = Cgroups::default();
        let mut enforced = Enforced::default();
        match h {
            Hierarchy::None => {}
            Hierarchy::V2 { base } => {
                let dir = base.join(name);
                if fs::create_dir(&dir).is_err() {
                    return (cg, enforced);
                }
                cg.dirs.push(dir.clone());
                if let Some(mb) = limits.memory_mb {
                    let bytes = (mb * 1024 * 1024).to_string();
                    enforced.memory = fs::write(dir.join("memory.max"), &bytes).is_ok();
                    let _ = fs::write(dir.join("memory.swap.max"), "0");
                    cg.memory = Some((dir.clone(), true));
                }
                if let Some(c) = limits.cpus {
                    let quota = ((c * 100_000.0).round() as u64).max(1000);
                    enforced.cpus =
                        fs::write(dir.join("cpu.max"), format!("{quota} 100000")).is_ok();
                }
                if let Some(p) = limits.pids {
                    enforced.pids = fs::write(dir.join("pids.max"), p.to_string()).is_ok();
                }
            }
            Hierarchy::V1 { memory, cpu, pids } => {
                if let (Some(root), Some(mb)) = (memory, limits.memory_mb) {
                    let dir = root.join(name);
                    if fs::create_dir(&dir).is_ok() {
                        cg.dirs.push(dir.clone());
                        let bytes = (mb * 1024 * 1024).to_string();
                        enforced.memory =
                            fs::write(dir.join("memory.limit_in_bytes"), &bytes).is_ok();
                        // Equal memory+swap: no swapping past the limit (absent without swap accounting).
                        let _ = fs::write(dir.join("memory.memsw.limit_in_bytes"), &bytes);
                        cg.memory = Some((dir, false));
                    }
                }
                if let (Some(root), Some(c)) = (cpu, limits.cpus) {
                    let dir = root.join(name);
                    if fs::create_dir(&dir).is_ok() {
                        cg.dirs.push(dir.clone());
                        let quota = ((c * 100_000.0).round() as u64).max(1000);
                        enforced.cpus = fs::write(dir.join("cpu.cfs_period_us"), "100000").is_ok()
                            && fs::write(dir.join("cpu.cfs_quota_us"), quota.to_string()).is_ok();
                    }
                }
                if let (Some(root), Some(p)) = (pids, limits.pids) {
                    let dir = root.join(name);
                    if fs::create_dir(&dir).is_ok() {
                        cg.dirs.push(dir.clone());
                        enforced.pids = fs::write(dir.join("pids.max"), p.to_string()).is_ok();
                    }
                }
            }
        }
        (cg, enforced)
    }

    /// `cgroup.procs` files the child writes itself into before exec.
    fn procs_files(&self) -> Vec<CString> {
        self.dirs
            .iter()
            .filter_map(|d| CString::new(d.join("cgroup.procs").as_os_str().as_bytes()).ok())
            .collect()
    }

    fn oom_killed(&self) -> bool {
        let Some((dir, v2)) = &self.memory else {
            return false;
        };
        let file = if *v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        fs::read_to_string(dir.join(file))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.strip_prefix("oom_kill "))
            .any(|n| n.trim().parse::<u64>().unwrap_or(0) > 0)
    }

    /// Kills every process left in our cgroups (those that left the process group too).
    fn kill_all(&self) {
        for dir in &self.dirs {
            for pid in fs::read_to_string(dir.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.trim().parse::<i32>().ok())
            {
                // SAFETY: kill has no memory-safety preconditions.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }

    async fn remove(&self) {
        for dir in &self.dirs {
            // Processes take a moment to leave a cgroup after SIGKILL.
            for _ in 0..50 {
                if fs::remove_dir(dir).is_ok() || !dir.exists() {
                    break;
                }
                self.kill_all();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

fn killpg(pgid: i32, sig: i32) {
    if pgid > 0 {
        // SAFETY: killpg has no memory-safety preconditions; a stale group is ESRCH.
        unsafe { libc::killpg(pgid, sig) };
    }
}

struct ProcessHandle {
    pgid: i32,
    exit: watch::Receiver<Option<ExitReason>>,
    cgroups: Arc<Cgroups>,
}

impl ProcessHandle {
    async fn wait_for(&self, d: Duration) -> Option<ExitReason> {
        let mut rx = self.exit.clone();
        let res = tokio::time::timeout(d, rx.wait_for(Option::is_some)).await;
        res.ok().and_then(|r| r.ok().and_then(|v| v.clone()))
    }
}

#[async_trait]
impl SandboxHandle for ProcessHandle {
    async fn stop(&self, grace: Duration) -> ExitReason {
        if let Some(r) = self.wait_for(grace).await {
            return r;
        }
        killpg(self.pgid, libc::SIGTERM);
        if let Some(r) = self.wait_for(grace).await {
            return r;
        }
        self.kill();
        self.wait_for(Duration::from_secs(10))
            .await
            .unwrap_or_default()
    }

    fn kill(&self) {
        killpg(self.pgid, libc::SIGKILL);
        self.cgroups.kill_all();
    }
}

impl Drop for ProcessHandle {
    fn drop(&mut self) {
        if self.exit.borrow().is_none() {
            self.kill();
        }
    }
}

#[async_trait]
impl Orchestrator for ProcessBackend {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            name: "process",
            images: false,
            sandboxed_install: false,
            detach: false,
        }
    }

    fn check(&self, spec: &SandboxSpec) -> Result<Enforced, OrchestratorError> {
        if spec.image.is_some() {
            return Err(Unsupported::Images.into());
        }
        let mut e = self.predict(&spec.limits);
        match spec.network.effective() {
            NetworkPolicy::Allow { .. } => {
                return Err(Unsupported::Allowlist {
                    reason: "the process backend has no egress proxy yet; use the docker backend, or network none/full",
                }
                .into())
            }
            NetworkPolicy::Mode(NetworkMode::None) => {
                if !self.can_unshare_net {
                    return Err(Unsupported::NetworkNone {
                        reason: "only root can create one here; run meshbox as root or use the docker backend",
                    }
                    .into());
                }
                e.network = true;
            }
            _ => e.network = true,
        }
        Ok(e)
    }

    async fn run_to_completion(
        &self,
        spec: SandboxSpec,
        timeout: Duration,
    ) -> Result<Completed, OrchestratorError> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let what = spec.argv.first().cloned().unwrap_or_default();
        let mut sandbox = self.spawn(spec).await?;
        let _ = sandbox.io.stdin.shutdown().await;
        let mut stdout = sandbox.io.stdout;
        let mut stderr = sandbox.io.stderr;
        let handle = sandbox.handle;
        let mut exit = sandbox.exit;
        let work = async {
            let mut out = Vec::new();
            let mut err = Vec::new();
            let read_out = async {
                let mut buf = [0u8; 8192];
                loop {
                    match stdout.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            let room = MAX_COMPLETED_OUTPUT.saturating_sub(out.len());
                            out.extend_from_slice(&buf[..n.min(room)]);
                        }
                    }
                }
            };
            let read_err = async {
                let mut buf = [0u8; 8192];
                loop {
                    match stderr.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            err.extend_from_slice(&buf[..n]);
                            if err.len() > 2 * MAX_COMPLETED_OUTPUT {
                                err.drain(..err.len() - MAX_COMPLETED_OUTPUT);
                            }
                        }
                    }
                }
            };
            let ((), (), reason) = tokio::join!(read_out, read_err, super::wait_exit(&mut exit));
            if err.len() > MAX_COMPLETED_OUTPUT {
                err.drain(..err.len() - MAX_COMPLETED_OUTPUT);
            }
            Completed {
                exit: reason,
                stdout: out,
                stderr: err,
            }
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(done) => Ok(done),
            Err(_) => {
                handle.kill();
                Err(OrchestratorError::TimedOut {
                    what,
                    after: timeout,
                })
            }
        }
    }

    async fn spawn(&self, spec: SandboxSpec) -> Result<Sandbox, OrchestratorError> {
        let mut enforced = self.check(&spec)?;
        let program = spec
            .argv
            .first()
            .cloned()
            .ok_or(Unsupported::EmptyCommand)?;
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let name = format!(
            "{}_{}_{}_{}",
            spec.owner.mesh,
            spec.owner.name,
            std::process::id(),
            seq
        );
        let (cgroups, by_cgroup) = Cgroups::create(&self.hierarchy, &name, &spec.limits);
        let procs = cgroups.procs_files();
        let cgroups = Arc::new(cgroups);

        // rlimits where no cgroup took the limit.
        let rlimit_data = (spec.limits.memory_mb.is_some() && !by_cgroup.memory)
            .then(|| spec.limits.memory_mb.unwrap_or(0) * 1024 * 1024);
        let rlimit_nproc = (spec.limits.pids.is_some() && !by_cgroup.pids && !self.is_root)
            .then(|| spec.limits.pids.unwrap_or(0));
        enforced.memory =
            spec.limits.memory_mb.is_some() && (by_cgroup.memory || rlimit_data.is_some());
        enforced.cpus = by_cgroup.cpus;
        enforced.pids = by_cgroup.pids || rlimit_nproc.is_some();
        let unshare_net = spec.network.is_none();

        let mut cmd = Command::new(&program);
        cmd.args(&spec.argv[1..])
            .env_clear()
            .envs(&spec.env)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0);
        if let Some(dir) = &spec.workdir {
            cmd.current_dir(dir);
        }
        // SAFETY: the hook runs between fork and exec in the child, so it only
        // makes async-signal-safe calls (open, write, close, setrlimit, unshare,
        // prctl) on memory prepared before the fork; it allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                for path in &procs {
                    let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                    libc::close(fd);
                    if n != 1 {
                        return Err(io::Error::last_os_error());
                    }
                }
                if let Some(bytes) = rlimit_data {
                    let lim = libc::rlimit {
                        rlim_cur: bytes,
                        rlim_max: bytes,
                    };
                    if libc::setrlimit(libc::RLIMIT_DATA, &lim) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                if let Some(n) = rlimit_nproc {
                    let lim = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NPROC, &lim) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                let nocore = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                libc::setrlimit(libc::RLIMIT_CORE, &nocore);
                if unshare_net && libc::unshare(libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The server dies with meshbox rather than linger unsupervised.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(source) => {
                cgroups.remove().await;
                return Err(OrchestratorError::Spawn { program, source });
            }
        };
        let pid = child.id();
        let pgid = pid.map(|p| p as i32).unwrap_or(0);
        let io = SandboxIo {
            stdin: Box::pin(child.stdin.take().expect("stdin piped")),
            stdout: Box::pin(child.stdout.take().expect("stdout piped")),
            stderr: Box::pin(child.stderr.take().expect("stderr piped")),
        };
        let (exit_tx, exit_rx) = watch::channel(None);
        {
            let cgroups = cgroups.clone();
            tokio::spawn(async move {
                let status = child.wait().await;
                // The leader is gone: nothing of its tree may outlive it.
                killpg(pgid, libc::SIGKILL);
                cgroups.kill_all();
                let oom = cgroups.oom_killed();
                let reason = match status {
                    Ok(st) => {
                        use std::os::unix::process::ExitStatusExt;
                        ExitReason {
                            code: st.code(),
                            signal: st.signal(),
                            oom_killed: oom,
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "waiting for server failed");
                        ExitReason::default()
                    }
                };
                exit_tx.send_replace(Some(reason));
                cgroups.remove().await;
            });
        }
        Ok(Sandbox {
            io,
            exit: exit_rx.clone(),
            handle: Box::new(ProcessHandle {
                pgid,
                exit: exit_rx,
                cgroups,
            }),
            pid,
            container_id: None,
            enforced,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowlists_are_refused_not_ignored() {
        let b = ProcessBackend::new(ProcessConfig::default());
        let spec = SandboxSpec {
            argv: vec!["true".into()],
            network: NetworkPolicy::Allow {
                allow: vec!["example.com:443".into()],
            },
            ..Default::default()
        };
        let err = b.check(&spec).unwrap_err();
        assert!(
            matches!(
                err,
                OrchestratorError::Unsupported(Unsupported::Allowlist { .. })
            ),
            "{err}"
        );
    }

    #[test]
    fn nothing_claimed_when_nothing_requested() {
        let b = ProcessBackend::new(ProcessConfig {
            cgroups: false,
            ..Default::default()
        });
        let e = b.check(&SandboxSpec::default()).unwrap();
        assert!(!e.memory && !e.cpus && !e.pids);
        assert!(e.network, "full network needs no enforcement");
    }

    #[test]
    fn cpus_without_cgroups_not_claimed() {
        let b = ProcessBackend::new(ProcessConfig {
            cgroups: false,
            ..Default::default()
        });
        let spec = SandboxSpec {
            limits: Limits {
                memory_mb: Some(64),
                cpus: Some(0.5),
                pids: Some(64),
            },
            ..Default::default()
        };
        let e = b.check(&spec).unwrap();
        assert!(e.memory, "RLIMIT_DATA bounds memory");
        assert!(!e.cpus, "no rlimit bounds a cpu share");
        assert_eq!(e.pids, !is_root(), "RLIMIT_NPROC does not bind root");
    }
}
