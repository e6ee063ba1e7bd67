//! What the parent tells `meshbox sandbox-init` (the plan: a little-endian
//! `u32` length then JSON, first on the init's stdin, before any byte of the
//! server's own input) and what the sandbox tells the parent back (the
//! report: JSON lines on its stderr, before the server writes anything).
//!
//! Passing both over the standard streams lets meshbox spawn the init
//! without a `pre_exec` hook (so with `posix_spawn`, not a fork of a large
//! multi-threaded parent). Both sides of the exec boundary share these
//! types; nothing here makes a syscall.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Longest plan the init accepts.
pub const MAX_PLAN: usize = 16 << 20;
/// Longest report line the parent reads.
pub const MAX_REPORT: usize = 64 * 1024;

/// Whose uid the server runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum UserPlan {
    /// meshbox is root: switch to this service's own uid and gid.
    Switch { uid: u32, gid: u32 },
    /// Not root: a user namespace mapping our own ids onto themselves, which
    /// lets the init create the other namespaces; the server keeps no
    /// capability in it.
    Namespace { uid: u32, gid: u32 },
    /// Neither: the server runs as meshbox's user (Landlock and seccomp still apply).
    Keep,
}

/// The namespaces to create besides the user namespace.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Namespaces {
    pub pid: bool,
    pub mount: bool,
    pub ipc: bool,
    pub uts: bool,
    pub net: bool,
}

/// A path the server sees, and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Visible {
    pub path: PathBuf,
    pub write: bool,
    /// Bound into the mount namespace (read-only unless `write`): the
    /// source, mounts, home, runtime; system directories are not.
    #[serde(default)]
    pub bind: bool,
    /// Read-only below, privately writable above: an overlay whose upper
    /// and work directories are in this directory (in the service's home).
    #[serde(default)]
    pub overlay: Option<PathBuf>,
}

/// The server's view of the filesystem.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsPlan {
    /// Directories (system ones, the installed source, mounts, the runtime,
    /// the home) the server may read, or read and write.
    pub visible: Vec<Visible>,
    /// Device files the server may read and write (`/dev/null`, …).
    pub devices: Vec<PathBuf>,
    /// Directories replaced by an empty tmpfs in the mount namespace (the data
    /// dir, the invoking user's home, `/tmp`); visible paths under them are
    /// carried over.
    pub cover: Vec<PathBuf>,
    /// Covered directories the server may write (a private `/tmp`).
    pub scratch: Vec<PathBuf>,
    /// Size of each scratch tmpfs, in MiB.
    pub scratch_mb: u64,
    /// The service's own uid and gid (meshbox is root): writable binds of
    /// host directories are idmapped so their owner's files appear as the
    /// service's, and what it creates lands as their owner's.
    #[serde(default)]
    pub idmap_to: Option<(u32, u32)>,
    /// Directories covered last by an empty read-only tmpfs (where the
    /// overlays keep their layers in the home).
    #[serde(default)]
    pub hide: Vec<PathBuf>,
}

/// The egress of an allowlisted sandbox: a forwarder on the sandbox's own
/// loopback to the host-side proxy's unix socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressPlan {
    pub socket: PathBuf,
    pub port: u16,
}

/// Resource limits the init sets on itself before anything else (inherited
/// by the server): where no cgroup takes a limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimits {
    pub data: Option<u64>,
    pub nproc: Option<u64>,
}

/// Everything the init needs to build one sandbox and start its server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitPlan {
    /// meshbox's pid: the init dies with it (and exits at once if it is
    /// already gone).
    #[serde(default)]
    pub parent: u32,
    /// `cgroup.procs` files the init joins first (the whole tree follows).
    #[serde(default)]
    pub cgroups: Vec<PathBuf>,
    #[serde(default)]
    pub rlimits: Rlimits,
    /// The program, resolved to an absolute path on the host.
    pub program: PathBuf,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub workdir: Option<PathBuf>,
    pub user: UserPlan,
    pub namespaces: Namespaces,
    pub fs: FsPlan,
    pub landlock: bool,
    pub seccomp: bool,
    pub egress: Option<EgressPlan>,
    /// Only probe: build every layer, report, and exit 0 instead of exec.
    #[serde(default)]
    pub probe: bool,
}

/// The layers that really got applied, as the server's last step before exec
/// saw them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layers {
    /// Runs under a uid of its own (root) or in a user namespace.
    pub own_uid: bool,
    pub userns: bool,
    pub pid: bool,
    pub mount: bool,
    pub ipc: bool,
    pub uts: bool,
    pub net: bool,
    /// A fresh `/proc` showing only the sandbox's processes.
    pub proc: bool,
    /// A private tmpfs `/tmp`.
    pub private_tmp: bool,
    pub no_new_privs: bool,
    /// No capability survives into the server.
    pub no_caps: bool,
    /// The Landlock ABI whose filesystem rights are enforced (0: none).
    pub landlock_abi: u8,
    /// Landlock stops signals and abstract-socket connections leaving the sandbox.
    pub landlock_scoped: bool,
    pub seccomp: bool,
    /// A per-sandbox loopback forwarder to the egress proxy is listening.
    pub egress: bool,
    /// Every copy-on-write mount got its private writable layer.
    #[serde(default)]
    pub private_writes: bool,
}

/// One line of the report channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Report {
    /// Every layer is in place; the server is being exec'd.
    Ready(Layers),
    /// A step failed; the sandbox exits without running the server.
    Failed { step: String, error: String },
}

impl InitPlan {
    /// The plan as the init reads it: length, then JSON.
    pub fn encode(&self) -> Vec<u8> {
        let json = serde_json::to_vec(self).unwrap_or_default();
        let mut out = Vec::with_capacity(json.len() + 4);
        out.extend_from_slice(&(json.len() as u32).to_le_bytes());
        out.extend_from_slice(&json);
        out
    }
}

impl Report {
    /// The report in `line`, when it is one.
    pub fn parse(line: &[u8]) -> Option<Report> {
        serde_json::from_slice(line).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_and_plans_round_trip() {
        let ok = serde_json::to_vec(&Report::Ready(Layers::default())).unwrap();
        assert_eq!(Report::parse(&ok), Some(Report::Ready(Layers::default())));
        let bad = Report::Failed {
            step: "exec".into(),
            error: "no such file".into(),
        };
        let line = serde_json::to_vec(&bad).unwrap();
        assert_eq!(Report::parse(&line), Some(bad));
        assert_eq!(Report::parse(b"a log line"), None);
        let plan = InitPlan {
            parent: 1,
            cgroups: vec![],
            rlimits: Rlimits::default(),
            program: "/bin/true".into(),
            argv: vec!["true".into()],
            env: vec![],
            workdir: None,
            user: UserPlan::Keep,
            namespaces: Namespaces::default(),
            fs: FsPlan::default(),
            landlock: true,
            seccomp: true,
            egress: None,
            probe: false,
        };
        let bytes = plan.encode();
        let len = u32::from_le_bytes(bytes[..4].try_into().unwrap()) as usize;
        assert_eq!(len, bytes.len() - 4);
        let back: InitPlan = serde_json::from_slice(&bytes[4..]).unwrap();
        assert_eq!(back, plan);
    }
}
