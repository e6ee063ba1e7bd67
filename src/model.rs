//! The ground floor: model types every layer shares.
//!
//! Owns the vocabulary of meshbox — which service (`ServiceKey`), what a
//! sandbox is allowed (`Limits`, `NetworkPolicy`, `HostMount`), what it really
//! got (`Enforced`, `Isolation`), how it ended (`ExitReason`), its byte streams, and which
//! MCP era it speaks (`Protocol`). It imports no other module of this crate,
//! so any layer may use it without creating a cycle.

use std::fmt;
use std::path::PathBuf;
use std::pin::Pin;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

/// Longest accepted mesh or service name.
pub const MAX_NAME_LEN: usize = 64;

/// A mesh or service name that does not match `^[a-zA-Z0-9][a-zA-Z0-9_-]{0,63}$`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} `{value}`: must match ^[a-zA-Z0-9][a-zA-Z0-9_-]{{0,63}}$")]
pub struct NameError {
    pub what: &'static str,
    /// The offending value, escaped and cut (never echoed verbatim).
    pub value: String,
}

/// Escapes control characters and cuts to `max` characters, for messages
/// that quote untrusted input.
pub fn shown(value: &str, max: usize) -> String {
    value
        .chars()
        .take(max)
        .flat_map(char::escape_default)
        .collect()
}

/// A stable 64-bit FNV-1a hash, as 16 hex digits: names and cache keys for
/// arbitrary strings (not for security).
pub fn stable_hash(s: &str) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in s.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

/// Checks a mesh or service name against `^[a-zA-Z0-9][a-zA-Z0-9_-]{0,63}$`.
pub fn validate_name(what: &'static str, value: &str) -> Result<(), NameError> {
    let bytes = value.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= MAX_NAME_LEN
        && bytes[0].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'-');
    if ok {
        Ok(())
    } else {
        Err(NameError {
            what,
            value: shown(value, 80),
        })
    }
}

/// What a sandbox uses now, as far as its backend can read it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    /// Memory in use (cgroup `memory.current` / `memory.usage_in_bytes`, or the engine's figure).
    pub memory_bytes: Option<u64>,
    /// CPU time used since the sandbox started.
    pub cpu_seconds: Option<f64>,
}

/// Which service: a name within a mesh (a tenant).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub mesh: String,
    pub name: String,
}

impl ServiceKey {
    /// A key from untrusted names, validated.
    pub fn parse(mesh: &str, name: &str) -> Result<Self, NameError> {
        validate_name("mesh", mesh)?;
        validate_name("service name", name)?;
        Ok(ServiceKey {
            mesh: mesh.to_owned(),
            name: name.to_owned(),
        })
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.mesh, self.name)
    }
}

/// Who is calling the HTTP API or the MCP gateway, as the auth middleware
/// established it (a request extension).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Principal {
    /// No token is configured: the operator chose an open (loopback) daemon.
    Open,
    /// The admin token: everything.
    Admin,
    /// A mesh-scoped token: only this mesh's routes and endpoints.
    Mesh(String),
}

impl Principal {
    /// Whether this caller may reach `mesh`.
    pub fn reaches(&self, mesh: &str) -> bool {
        match self {
            Principal::Open | Principal::Admin => true,
            Principal::Mesh(m) => m == mesh,
        }
    }
}

/// The language runtime of a server's entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    Node,
    Python,
    Bun,
}

impl Runtime {
    pub const ALL: [Runtime; 3] = [Runtime::Node, Runtime::Python, Runtime::Bun];

    pub fn as_str(self) -> &'static str {
        match self {
            Runtime::Node => "node",
            Runtime::Python => "python",
            Runtime::Bun => "bun",
        }
    }
}

impl fmt::Display for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A runtime name that is not node, python or bun.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{value}`: expected node, python or bun")]
pub struct UnknownRuntime {
    pub value: String,
}

impl FromStr for Runtime {
    type Err = UnknownRuntime;

    fn from_str(s: &str) -> Result<Self, UnknownRuntime> {
        Runtime::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| UnknownRuntime {
                value: shown(s, 32),
            })
    }
}

/// The runner image of a runtime (docker): built by `meshbox images build`.
pub fn runner_image(runtime: Runtime) -> String {
    format!("meshbox/runner-{runtime}:latest")
}

/// The label on a runner image: the version of the meshbox that built it,
/// whose binary is inside it (install steps run it).
pub const RUNNER_VERSION_LABEL: &str = "io.meshbox.version";

/// Which meshbox a runner image holds, next to this one, by its labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunnerBuild {
    /// This version of meshbox.
    Current,
    /// Another version (the label's value).
    Other(String),
    /// No version label: built before images carried one.
    Unlabelled,
}

impl RunnerBuild {
    pub fn of(labels: Option<&std::collections::HashMap<String, String>>) -> RunnerBuild {
        match labels.and_then(|l| l.get(RUNNER_VERSION_LABEL)) {
            None => RunnerBuild::Unlabelled,
            Some(v) if v == env!("CARGO_PKG_VERSION") => RunnerBuild::Current,
            Some(v) => RunnerBuild::Other(shown(v, 64)),
        }
    }
}

impl std::fmt::Display for RunnerBuild {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let this = env!("CARGO_PKG_VERSION");
        match self {
            RunnerBuild::Current => write!(f, "present (meshbox {this})"),
            RunnerBuild::Other(v) => write!(
                f,
                "present, but holds meshbox {v} (this is {this}): rebuild it with `meshbox images build`"
            ),
            RunnerBuild::Unlabelled => write!(
                f,
                "present, but from a meshbox that did not label its images (this is {this}): rebuild it with `meshbox images build`"
            ),
        }
    }
}

/// Network policy of a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(untagged)]
pub enum NetworkPolicy {
    Mode(NetworkMode),
    Allow {
        allow: Vec<String>,
    },
    #[default]
    #[serde(skip)]
    Unset,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    None,
    Full,
}

impl NetworkPolicy {
    /// The policy in force when a spec names none: full network, as `npx` has.
    pub fn effective(&self) -> NetworkPolicy {
        match self {
            NetworkPolicy::Unset => NetworkPolicy::Mode(NetworkMode::Full),
            other => other.clone(),
        }
    }

    pub fn is_none(&self) -> bool {
        matches!(self, NetworkPolicy::Mode(NetworkMode::None))
    }

    /// The allowlist, when the policy is one.
    pub fn allowlist(&self) -> Option<&[String]> {
        match self {
            NetworkPolicy::Allow { allow } => Some(allow),
            _ => None,
        }
    }
}

impl fmt::Display for NetworkPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.effective() {
            NetworkPolicy::Mode(NetworkMode::None) => f.write_str("none"),
            NetworkPolicy::Mode(NetworkMode::Full) | NetworkPolicy::Unset => f.write_str("full"),
            NetworkPolicy::Allow { allow } => write!(f, "allow={}", allow.join(",")),
        }
    }
}

/// A host directory a server sees at the same path.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostMount {
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
}

/// Resource limits requested for a sandbox.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    pub memory_mb: Option<u64>,
    pub cpus: Option<f64>,
    pub pids: Option<u64>,
}

/// Which limits and isolation layers a backend really applies. A limit that
/// was not requested is reported `false`: nothing bounds it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enforced {
    pub memory: bool,
    pub cpus: bool,
    pub pids: bool,
    pub network: bool,
    /// The server sees only the system, its source, its mounts and a private
    /// home (Landlock and a mount namespace, or a container's filesystem).
    pub filesystem: bool,
}

/// An isolation layer of a sandbox, by the stable name the status shows
/// (`limits.isolation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layer {
    /// A uid of its own, not meshbox's (a per-service uid, a container's user).
    Uid,
    UserNamespace,
    PidNamespace,
    MountNamespace,
    IpcNamespace,
    UtsNamespace,
    NetworkNamespace,
    /// No capability survives into the server.
    NoCapabilities,
    NoNewPrivs,
    Landlock,
    Seccomp,
    /// cgroups of its own carry its limits.
    Cgroup,
}

impl Layer {
    pub const ALL: [Layer; 12] = [
        Layer::Uid,
        Layer::UserNamespace,
        Layer::PidNamespace,
        Layer::MountNamespace,
        Layer::IpcNamespace,
        Layer::UtsNamespace,
        Layer::NetworkNamespace,
        Layer::NoCapabilities,
        Layer::NoNewPrivs,
        Layer::Landlock,
        Layer::Seccomp,
        Layer::Cgroup,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Layer::Uid => "uid",
            Layer::UserNamespace => "user-namespace",
            Layer::PidNamespace => "pid-namespace",
            Layer::MountNamespace => "mount-namespace",
            Layer::IpcNamespace => "ipc-namespace",
            Layer::UtsNamespace => "uts-namespace",
            Layer::NetworkNamespace => "network-namespace",
            Layer::NoCapabilities => "no-capabilities",
            Layer::NoNewPrivs => "no-new-privs",
            Layer::Landlock => "landlock",
            Layer::Seccomp => "seccomp",
            Layer::Cgroup => "cgroup",
        }
    }
}

impl fmt::Display for Layer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is no isolation layer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{value}` is no isolation layer (expected one of uid, user-namespace, pid-namespace, mount-namespace, ipc-namespace, uts-namespace, network-namespace, no-capabilities, no-new-privs, landlock, seccomp, cgroup)")]
pub struct UnknownLayer {
    pub value: String,
}

impl FromStr for Layer {
    type Err = UnknownLayer;

    fn from_str(s: &str) -> Result<Self, UnknownLayer> {
        Layer::ALL
            .into_iter()
            .find(|l| l.as_str() == s)
            .ok_or_else(|| UnknownLayer {
                value: shown(s, 32),
            })
    }
}

/// The isolation layers a sandbox really got, and those its backend gives a
/// sandbox of this spec elsewhere but could not here (a host without
/// Landlock or namespaces). A layer the spec does not call for (a network
/// namespace for full network) is in neither list.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Isolation {
    pub applied: Vec<Layer>,
    pub missing: Vec<Layer>,
}

impl Isolation {
    /// Sorts `expected` into applied and missing by `has`, in [`Layer::ALL`] order.
    pub fn sort(expected: impl IntoIterator<Item = Layer>, has: impl Fn(Layer) -> bool) -> Self {
        let mut expected: Vec<Layer> = expected.into_iter().collect();
        expected.sort();
        expected.dedup();
        let (applied, missing) = expected.into_iter().partition(|l| has(*l));
        Isolation { applied, missing }
    }
}

/// How a sandboxed server ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ExitReason {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub oom_killed: bool,
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.oom_killed {
            return f.write_str("killed: out of memory");
        }
        match (self.code, self.signal) {
            (Some(c), _) => write!(f, "exit code {c}"),
            (None, Some(s)) => write!(f, "killed by signal {s}"),
            (None, None) => f.write_str("exit status unknown"),
        }
    }
}

/// Resolves when a sandbox has exited, `Some` from then on.
pub type ExitWatch = watch::Receiver<Option<ExitReason>>;

/// Waits for an exit signal and returns its reason (default if the sender vanished).
pub async fn wait_exit(rx: &mut ExitWatch) -> ExitReason {
    let reason = rx
        .wait_for(Option::is_some)
        .await
        .ok()
        .and_then(|r| r.clone());
    reason.unwrap_or_else(|| rx.borrow().clone().unwrap_or_default())
}

/// The exit reason if the sandbox exits within `d`.
pub async fn exit_within(rx: &ExitWatch, d: std::time::Duration) -> Option<ExitReason> {
    tokio::time::timeout(d, wait_exit(&mut rx.clone()))
        .await
        .ok()
}

/// Sends `signal` to process group `pgid` (0 or less: nothing). A group that
/// is gone already is not an error.
pub fn signal_group(pgid: i32, signal: nix::sys::signal::Signal) {
    if pgid > 0 {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), signal);
    }
}

pub type BoxRead = Pin<Box<dyn AsyncRead + Send>>;
pub type BoxWrite = Pin<Box<dyn AsyncWrite + Send>>;

/// Where a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogStream {
    Stdout,
    Stderr,
    /// meshbox's own notes about the service (restarts, dropped lines).
    Meshbox,
}

impl fmt::Display for LogStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogStream::Stdout => "stdout",
            LogStream::Stderr => "stderr",
            LogStream::Meshbox => "meshbox",
        })
    }
}

/// The MCP protocol era a server speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Protocol {
    /// `initialize` handshake and sessions (2024-11-05 … 2025-11-25).
    #[serde(rename = "2025-11-25")]
    Handshake,
    /// Stateless requests with `_meta` and `server/discover` (2026-07-28).
    #[serde(rename = "2026-07-28")]
    Stateless,
}

/// How a spec chooses the upstream era: detected, or pinned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum ProtocolChoice {
    #[default]
    #[serde(rename = "auto")]
    Auto,
    #[serde(rename = "2025-11-25")]
    Handshake,
    #[serde(rename = "2026-07-28")]
    Stateless,
}

impl ProtocolChoice {
    pub fn pinned(self) -> Option<Protocol> {
        match self {
            ProtocolChoice::Auto => None,
            ProtocolChoice::Handshake => Some(Protocol::Handshake),
            ProtocolChoice::Stateless => Some(Protocol::Stateless),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runner_builds_are_told_apart_by_their_version_label() {
        use std::collections::HashMap;
        let this = env!("CARGO_PKG_VERSION");
        let labelled = |v: &str| HashMap::from([(RUNNER_VERSION_LABEL.to_owned(), v.to_owned())]);
        assert_eq!(RunnerBuild::of(Some(&labelled(this))), RunnerBuild::Current);
        let old = RunnerBuild::of(Some(&labelled("0.0.1")));
        assert_eq!(old, RunnerBuild::Other("0.0.1".into()));
        assert!(old.to_string().contains("meshbox images build"), "{old}");
        assert_eq!(RunnerBuild::of(None), RunnerBuild::Unlabelled);
        assert_eq!(
            RunnerBuild::of(Some(&HashMap::new())),
            RunnerBuild::Unlabelled
        );
        // A label is the image author's text: shown bounded.
        let long = RunnerBuild::of(Some(&labelled(&"9".repeat(10_000))));
        assert!(long.to_string().len() < 300, "{long}");
    }

    #[test]
    fn names() {
        assert!(validate_name("mesh", "acme").is_ok());
        assert!(validate_name("mesh", "a-b_c9").is_ok());
        assert!(validate_name("mesh", &"a".repeat(64)).is_ok());
        for bad in [
            "",
            "-a",
            "_a",
            "a/b",
            "..",
            "a b",
            "a\0",
            "é",
            &"a".repeat(65),
        ] {
            assert!(validate_name("mesh", bad).is_err(), "{bad:?} accepted");
        }
        let e = validate_name("mesh", "a\nb").unwrap_err();
        assert!(e.to_string().contains("a\\nb"), "{e}");
    }

    #[test]
    fn runtimes_round_trip() {
        for r in Runtime::ALL {
            assert_eq!(r.as_str().parse::<Runtime>().unwrap(), r);
        }
        assert!("ruby".parse::<Runtime>().is_err());
    }

    #[test]
    fn exit_reasons_read_well() {
        let oom = ExitReason {
            signal: Some(9),
            oom_killed: true,
            ..Default::default()
        };
        assert_eq!(oom.to_string(), "killed: out of memory");
        let sig = ExitReason {
            signal: Some(15),
            ..Default::default()
        };
        assert_eq!(sig.to_string(), "killed by signal 15");
    }

    #[test]
    fn layers_have_stable_names() {
        for l in Layer::ALL {
            assert_eq!(l.as_str().parse::<Layer>().unwrap(), l);
            assert_eq!(serde_json::to_value(l).unwrap(), l.as_str());
        }
        assert!("apparmor".parse::<Layer>().is_err());
        let i = Isolation::sort([Layer::Seccomp, Layer::Uid, Layer::Landlock], |l| {
            l != Layer::Landlock
        });
        assert_eq!(
            serde_json::to_value(&i).unwrap(),
            serde_json::json!({"applied": ["uid", "seccomp"], "missing": ["landlock"]})
        );
    }

    #[test]
    fn protocol_choice_wire_names() {
        let p: ProtocolChoice = serde_json::from_str("\"2026-07-28\"").unwrap();
        assert_eq!(p.pinned(), Some(Protocol::Stateless));
        let p: ProtocolChoice = serde_json::from_str("\"auto\"").unwrap();
        assert_eq!(p.pinned(), None);
        assert!(serde_json::from_str::<ProtocolChoice>("\"2020-01-01\"").is_err());
    }
}
