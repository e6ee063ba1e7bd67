//! cgroups of process sandboxes (v2 where delegable, else v1): one cgroup
//! per sandbox in each controller that carries one of its limits, and a
//! tracking one (pids) when the sandbox has no pid namespace, so the whole
//! tree can be found and killed (a `setsid` double fork included) and swept
//! after a meshbox that died without cleaning up. With a pid namespace the
//! kernel already kills the whole tree with its init, and a sandbox without
//! limits joins no cgroup at all: on cgroup v1 the first migration of a
//! process costs ~10 ms, more than the rest of the sandbox setup.
//!
//! Each directory is named `<pid>.<start>.<seq>.<mesh>.<name>` after the
//! meshbox process that made it (pid and start time), so a later meshbox
//! can tell a dead owner's directories from a live one's. The files belong
//! to root; a server never runs as root, so it cannot write them.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{Enforced, Limits};

/// The cgroup hierarchy this host offers us.
#[derive(Debug, Clone)]
pub enum Hierarchy {
    /// cgroup v2: one directory (ours), with controllers delegated to children.
    V2 {
        base: PathBuf,
    },
    /// cgroup v1: one directory (ours) per controller mount.
    V1 {
        memory: Option<PathBuf>,
        cpu: Option<PathBuf>,
        pids: Option<PathBuf>,
    },
    None,
}

impl Hierarchy {
    /// Every directory sandboxes are created under.
    fn bases(&self) -> Vec<&Path> {
        match self {
            Hierarchy::V2 { base } => vec![base],
            Hierarchy::V1 { memory, cpu, pids } => [memory, cpu, pids]
                .into_iter()
                .flatten()
                .map(PathBuf::as_path)
                .collect(),
            Hierarchy::None => Vec::new(),
        }
    }

    /// What `limits` would get from cgroups here.
    pub fn predict(&self, limits: &Limits) -> Enforced {
        let (memory, cpu, pids) = match self {
            Hierarchy::V2 { .. } => (true, true, true),
            Hierarchy::V1 { memory, cpu, pids } => {
                (memory.is_some(), cpu.is_some(), pids.is_some())
            }
            Hierarchy::None => (false, false, false),
        };
        Enforced {
            memory: limits.memory_mb.is_some() && memory,
            cpus: limits.cpus.is_some() && cpu,
            pids: limits.pids.is_some() && pids,
            ..Default::default()
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Hierarchy::V2 { base } => format!("cgroup v2 at {}", base.display()),
            Hierarchy::V1 { memory, cpu, pids } => format!(
                "cgroup v1 (memory: {}, cpu: {}, pids: {})",
                memory.is_some(),
                cpu.is_some(),
                pids.is_some()
            ),
            Hierarchy::None => "no writable cgroups (rlimits only)".into(),
        }
    }
}

/// Finds where we may create cgroups: v2 when its controllers are delegable,
/// else the v1 controller mounts, else none.
pub fn detect_hierarchy(parent: &str) -> Hierarchy {
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
    // Under our own cgroup of each controller, so limits nest in whatever
    // bounds meshbox itself (a service manager's slice).
    let own_v1 = |controller: &str| -> String {
        own.lines()
            .find_map(|l| {
                let mut p = l.splitn(3, ':');
                let (_, ctrls, path) = (p.next()?, p.next()?, p.next()?);
                ctrls
                    .split(',')
                    .any(|c| c == controller)
                    .then(|| path.trim_start_matches('/').to_owned())
            })
            .unwrap_or_default()
    };
    let try_v1 = |m: Option<PathBuf>, controller: &str| {
        let m = m?;
        let dir = m.join(own_v1(controller)).join(parent);
        let writable = |p: &Path| nix::unistd::access(p, nix::unistd::AccessFlags::W_OK).is_ok();
        (fs::create_dir_all(&dir).is_ok() && writable(&dir) && writable(&dir.join("cgroup.procs")))
            .then_some(dir)
    };
    let (memory, cpu, pids) = (
        try_v1(v1.0, "memory"),
        try_v1(v1.1, "cpu"),
        try_v1(v1.2, "pids"),
    );
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

/// This process's start time (clock ticks after boot), from /proc.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 22, counted after the command's closing parenthesis.
    stat.rsplit_once(") ")?.1.split(' ').nth(19)?.parse().ok()
}

/// The owner a sandbox directory's name records, if it is one of ours.
fn owner_of(name: &str) -> Option<(u32, u64)> {
    let mut parts = name.splitn(3, '.');
    let pid = parts.next()?.parse().ok()?;
    let start = parts.next()?.parse().ok()?;
    parts.next()?;
    Some((pid, start))
}

/// The cgroup directories of one sandbox, removed when it is done.
#[derive(Debug, Default)]
pub struct Cgroups {
    dirs: Vec<PathBuf>,
    /// Directory whose memory events tell whether the OOM killer struck.
    memory: Option<(PathBuf, bool)>,
}

impl Cgroups {
    /// The directory name of a sandbox made by this process.
    pub fn name(seq: u64, mesh: &str, service: &str) -> String {
        let pid = std::process::id();
        let start = start_time(pid).unwrap_or(0);
        format!("{pid}.{start}.{seq}.{mesh}.{service}")
    }

    /// Creates the sandbox's directories (the controllers of its limits, and
    /// pids when `track`) and writes its limits: what cgroups enforce.
    /// `inits`: the sandbox's own init processes in it, on top of its pids limit.
    pub fn create(
        h: &Hierarchy,
        name: &str,
        limits: &Limits,
        track: bool,
        inits: u64,
    ) -> (Cgroups, Enforced) {
        let mut cg = Cgroups::default();
        let mut enforced = Enforced::default();
        let quota = |c: f64| ((c * 100_000.0).round() as u64).max(1000);
        match h {
            Hierarchy::None => {}
            Hierarchy::V2 { .. }
                if !track
                    && limits.memory_mb.is_none()
                    && limits.cpus.is_none()
                    && limits.pids.is_none() => {}
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
                }
                cg.memory = Some((dir.clone(), true));
                if let Some(c) = limits.cpus {
                    enforced.cpus =
                        fs::write(dir.join("cpu.max"), format!("{} 100000", quota(c))).is_ok();
                }
                if let Some(p) = limits.pids {
                    enforced.pids =
                        fs::write(dir.join("pids.max"), (p + inits).to_string()).is_ok();
                }
            }
            Hierarchy::V1 { memory, cpu, pids } => {
                if let (Some(root), true) = (memory, limits.memory_mb.is_some()) {
                    let dir = root.join(name);
                    if fs::create_dir(&dir).is_ok() {
                        cg.dirs.push(dir.clone());
                        if let Some(mb) = limits.memory_mb {
                            let bytes = (mb * 1024 * 1024).to_string();
                            enforced.memory =
                                fs::write(dir.join("memory.limit_in_bytes"), &bytes).is_ok();
                            // Equal memory+swap: no swapping past the limit (absent without swap accounting).
                            let _ = fs::write(dir.join("memory.memsw.limit_in_bytes"), &bytes);
                        }
                        cg.memory = Some((dir, false));
                    }
                }
                if let (Some(root), true) = (cpu, limits.cpus.is_some()) {
                    let dir = root.join(name);
                    if fs::create_dir(&dir).is_ok() {
                        cg.dirs.push(dir.clone());
                        if let Some(c) = limits.cpus {
                            enforced.cpus = fs::write(dir.join("cpu.cfs_period_us"), "100000")
                                .is_ok()
                                && fs::write(dir.join("cpu.cfs_quota_us"), quota(c).to_string())
                                    .is_ok();
                        }
                    }
                }
                if let (Some(root), true) = (pids, limits.pids.is_some() || track) {
                    let dir = root.join(name);
                    if fs::create_dir(&dir).is_ok() {
                        cg.dirs.push(dir.clone());
                        if let Some(p) = limits.pids {
                            enforced.pids =
                                fs::write(dir.join("pids.max"), (p + inits).to_string()).is_ok();
                        }
                    }
                }
            }
        }
        (cg, enforced)
    }

    /// `cgroup.procs` files the child writes itself into before exec.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// The directories, for tests and diagnostics.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    pub fn oom_killed(&self) -> bool {
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
    pub fn kill_all(&self) {
        for dir in &self.dirs {
            kill_members(dir);
        }
    }

    /// Removes the directories, killing what is still in them.
    pub async fn remove(&self) {
        for dir in &self.dirs {
            // Processes take a moment to leave a cgroup after SIGKILL.
            for _ in 0..50 {
                if fs::remove_dir(dir).is_ok() || !dir.exists() {
                    break;
                }
                kill_members(dir);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

fn kill_members(dir: &Path) {
    for pid in fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse::<i32>().ok())
    {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// True when `name` is a sandbox directory name whose meshbox is gone.
pub fn owner_is_gone(name: &str) -> bool {
    owner_of(name).is_some_and(|(pid, start)| start_time(pid) != Some(start))
}

/// Removes the sandbox cgroups of meshbox processes that are gone (killing
/// whatever still runs in them); returns how many directories went.
pub async fn sweep(h: &Hierarchy) -> usize {
    let mut stale = Vec::new();
    for base in h.bases() {
        for e in fs::read_dir(base).into_iter().flatten().flatten() {
            if owner_is_gone(&e.file_name().to_string_lossy()) {
                stale.push(e.path());
            }
        }
    }
    let n = stale.len();
    let cg = Cgroups {
        dirs: stale,
        memory: None,
    };
    cg.kill_all();
    cg.remove().await;
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_record_a_live_owner() {
        let name = Cgroups::name(7, "acme", "time");
        let (pid, start) = owner_of(&name).unwrap();
        assert_eq!(pid, std::process::id());
        assert_eq!(start_time(pid), Some(start));
        assert!(name.ends_with(".7.acme.time"), "{name}");
        assert_eq!(owner_of("meshbox-probe"), None);
        assert_eq!(owner_of("12.x.1.a.b"), None);
    }

    #[tokio::test]
    async fn sweep_removes_directories_of_dead_owners_only() {
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join("memory");
        let dead = base.join("999999999.5.0.acme.gone");
        let live = base.join(Cgroups::name(1, "acme", "here"));
        fs::create_dir_all(&dead).unwrap();
        fs::create_dir_all(&live).unwrap();
        let h = Hierarchy::V1 {
            memory: Some(base),
            cpu: None,
            pids: None,
        };
        assert_eq!(sweep(&h).await, 1);
        assert!(!dead.exists());
        assert!(live.exists());
    }
}
