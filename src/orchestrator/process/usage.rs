//! What a process sandbox uses now, read from its cgroup directories
//! (v2 `memory.current`/`cpu.stat`, v1 `memory.usage_in_bytes`/`cpuacct.usage`).
//!
//! Reads only; owns no cgroup and writes nothing. Kept apart from the code
//! that creates and limits the cgroups, which it only needs the paths of.

use std::fs;
use std::path::{Path, PathBuf};

use crate::model::Usage;

/// Memory and CPU of the cgroups in `dirs` (one per v1 controller, or the
/// one v2 directory); `None` when no figure could be read.
pub fn read(dirs: &[PathBuf]) -> Option<Usage> {
    let mut u = Usage::default();
    for dir in dirs {
        if u.memory_bytes.is_none() {
            u.memory_bytes = memory(dir);
        }
        if u.cpu_seconds.is_none() {
            u.cpu_seconds = cpu(dir);
        }
    }
    if u.cpu_seconds.is_none() {
        // No cpu accounting controller of ours (v1 with cpuacct apart):
        // the processes' own counters.
        u.cpu_seconds = dirs
            .first()
            .and_then(|d| cpu_of_procs(d, Path::new("/proc")));
    }
    (u != Usage::default()).then_some(u)
}

/// CPU of the processes in a cgroup, from `/proc/<pid>/stat` (their own
/// time and that of children they reaped); what exited unreaped is lost.
fn cpu_of_procs(dir: &Path, proc_root: &Path) -> Option<f64> {
    let procs = fs::read_to_string(dir.join("cgroup.procs")).ok()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks = if ticks > 0 { ticks as f64 } else { 100.0 };
    let mut total = 0u64;
    let mut seen = false;
    for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
        let Ok(stat) = fs::read_to_string(proc_root.join(pid.to_string()).join("stat")) else {
            continue;
        };
        // Fields 14..=17 (utime stime cutime cstime), counted after the command's ")".
        let Some((_, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let f: Vec<u64> = rest
            .split(' ')
            .skip(11)
            .take(4)
            .filter_map(|x| x.parse().ok())
            .collect();
        if f.len() == 4 {
            total += f.iter().sum::<u64>();
            seen = true;
        }
    }
    seen.then(|| total as f64 / ticks)
}

fn number(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// `key value` lines (memory.stat, cpu.stat).
fn stat(path: &Path, key: &str) -> Option<u64> {
    fs::read_to_string(path).ok()?.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// In use, page cache that could be dropped at once left out (as `docker stats` counts).
fn memory(dir: &Path) -> Option<u64> {
    let (current, inactive) = match number(&dir.join("memory.current")) {
        Some(c) => (c, stat(&dir.join("memory.stat"), "inactive_file")),
        None => (
            number(&dir.join("memory.usage_in_bytes"))?,
            stat(&dir.join("memory.stat"), "total_inactive_file"),
        ),
    };
    Some(current.saturating_sub(inactive.unwrap_or(0)))
}

fn cpu(dir: &Path) -> Option<f64> {
    if let Some(us) = stat(&dir.join("cpu.stat"), "usage_usec") {
        return Some(us as f64 / 1e6);
    }
    number(&dir.join("cpuacct.usage")).map(|ns| ns as f64 / 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_and_v1_layouts() {
        let d = tempfile::tempdir().unwrap();
        let v2 = d.path().join("v2");
        fs::create_dir(&v2).unwrap();
        fs::write(v2.join("memory.current"), "10000\n").unwrap();
        fs::write(v2.join("memory.stat"), "anon 6000\ninactive_file 4000\n").unwrap();
        fs::write(v2.join("cpu.stat"), "usage_usec 2500000\nuser_usec 1\n").unwrap();
        assert_eq!(
            read(std::slice::from_ref(&v2)),
            Some(Usage {
                memory_bytes: Some(6000),
                cpu_seconds: Some(2.5)
            })
        );
        // v1: one directory per controller.
        let (mem, cpu) = (d.path().join("memory"), d.path().join("cpu"));
        fs::create_dir(&mem).unwrap();
        fs::create_dir(&cpu).unwrap();
        fs::write(mem.join("memory.usage_in_bytes"), "8192").unwrap();
        fs::write(
            mem.join("memory.stat"),
            "cache 1\ntotal_inactive_file 192\n",
        )
        .unwrap();
        fs::write(cpu.join("cpuacct.usage"), "1500000000").unwrap();
        assert_eq!(
            read(&[mem, cpu]),
            Some(Usage {
                memory_bytes: Some(8000),
                cpu_seconds: Some(1.5)
            })
        );
        assert_eq!(read(&[d.path().join("nothing")]), None);
        // No cpu controller: the processes' own counters.
        let procs = d.path().join("procs");
        fs::create_dir_all(procs.join("proc/42")).unwrap();
        fs::write(procs.join("cgroup.procs"), "42\n43\n").unwrap();
        fs::write(
            procs.join("proc/42/stat"),
            "42 (a (tricky) name) S 1 42 42 0 -1 0 0 0 0 0 150 50 100 0 20 0 1 0 0",
        )
        .unwrap();
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        assert_eq!(
            cpu_of_procs(&procs, &procs.join("proc")),
            Some(300.0 / ticks)
        );
        assert_eq!(read(&[]), None);
    }
}
