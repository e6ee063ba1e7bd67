//! The sandbox backends and the trait the supervisor drives them through.
//!
//! A backend turns a [`SandboxSpec`] into a running [`Sandbox`]: byte streams
//! for the server's stdin, stdout and stderr, an exit signal, and a handle that
//! stops the whole sandbox. No backend type (a `tokio::process::Child`, a
//! bollard model) crosses this boundary, so the supervisor and the API never
//! name a backend, and tests drive them through a fake.

pub mod docker;
pub mod process;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

use crate::config::{NetworkPolicy, Runtime};
use crate::source::{Installer, Launch, Progress, Source, SourceError};

#[derive(Debug, thiserror::Error)]
pub enum OrchestratorError {
    #[error("failed to start `{program}`")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Unsupported(String),
    #[error("sandbox setup failed: {0}")]
    Setup(String),
    #[error(transparent)]
    Source(#[from] SourceError),
}

/// Resource limits requested for a sandbox.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    pub memory_mb: Option<u64>,
    pub cpus: Option<f64>,
    pub pids: Option<u64>,
}

/// Which requested limits the backend really enforces. A limit that was not
/// requested is reported `false`: nothing bounds it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enforced {
    pub memory: bool,
    pub cpus: bool,
    pub pids: bool,
    pub network: bool,
}

/// Everything a backend needs to start one server.
#[derive(Debug, Clone, Default)]
pub struct SandboxSpec {
    /// Program and arguments (argv, never a shell string).
    pub argv: Vec<String>,
    /// The complete environment of the server; nothing else is inherited.
    pub env: BTreeMap<String, String>,
    pub workdir: Option<PathBuf>,
    pub limits: Limits,
    pub network: NetworkPolicy,
    /// `meshbox.mesh`, `meshbox.service`, ...: names the sandbox for its backend.
    pub labels: BTreeMap<String, String>,
    /// Container image (docker); `None` for a local process.
    pub image: Option<String>,
    /// Volumes to mount (docker): the installed source, read-only.
    pub mounts: Vec<Mount>,
}

/// A named volume mounted into a sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub volume: String,
    pub target: String,
    pub read_only: bool,
}

/// What a backend needs to acquire a source before it can run it.
pub struct PrepareRequest<'a> {
    pub source: &'a Source,
    pub runtime: Option<Runtime>,
    pub command: Option<&'a [String]>,
    pub args: &'a [String],
    pub progress: &'a Progress,
    /// The host's installer (the process backend installs with it directly).
    pub installer: &'a Installer,
}

/// An acquired source: how to start it, and where (image, mounts).
#[derive(Debug, Clone)]
pub struct Prepared {
    pub launch: Launch,
    pub image: Option<String>,
    pub mounts: Vec<Mount>,
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
            f.write_str("killed: out of memory")?;
            return Ok(());
        }
        match (self.code, self.signal) {
            (Some(c), _) => write!(f, "exit code {c}"),
            (None, Some(s)) => write!(f, "killed by signal {s}"),
            (None, None) => f.write_str("exit status unknown"),
        }
    }
}

/// Waits for an exit signal and returns its reason (default if the sender vanished).
pub async fn wait_exit(rx: &mut watch::Receiver<Option<ExitReason>>) -> ExitReason {
    let reason = rx
        .wait_for(Option::is_some)
        .await
        .ok()
        .and_then(|r| r.clone());
    reason.unwrap_or_else(|| rx.borrow().clone().unwrap_or_default())
}

pub type BoxRead = Pin<Box<dyn AsyncRead + Send>>;
pub type BoxWrite = Pin<Box<dyn AsyncWrite + Send>>;

/// The server's three standard streams.
pub struct SandboxIo {
    pub stdin: BoxWrite,
    pub stdout: BoxRead,
    pub stderr: BoxRead,
}

/// Control of a running sandbox; dropping it kills whatever is left.
#[async_trait]
pub trait SandboxHandle: Send + Sync {
    /// Stops the sandbox: waits `grace` for the server to exit on its own (the
    /// caller has closed stdin), then SIGTERM to the whole tree, then SIGKILL.
    async fn stop(&self, grace: Duration) -> ExitReason;
    /// Kills at once, without grace.
    fn kill(&self);
    /// Lets go of the sandbox without stopping it (to re-adopt it after a
    /// restart). False where the backend cannot: the caller then stops it.
    fn detach(&self) -> bool {
        false
    }
}

pub struct Sandbox {
    pub io: SandboxIo,
    /// `Some` once the server has exited.
    pub exit: watch::Receiver<Option<ExitReason>>,
    pub handle: Box<dyn SandboxHandle>,
    pub pid: Option<u32>,
    pub container_id: Option<String>,
    pub enforced: Enforced,
}

#[async_trait]
pub trait Orchestrator: Send + Sync + 'static {
    /// `"process"` or `"docker"`: shown in status and health.
    fn backend(&self) -> &'static str;
    /// Which limits this backend can enforce for `spec`, before starting it.
    /// Rejects specs it cannot honour (e.g. an allowlist it cannot enforce).
    fn check(&self, spec: &SandboxSpec) -> Result<Enforced, OrchestratorError>;
    /// Acquires a source (installing it where this backend runs servers).
    async fn prepare(&self, req: PrepareRequest<'_>) -> Result<Prepared, OrchestratorError>;
    async fn spawn(&self, spec: SandboxSpec) -> Result<Sandbox, OrchestratorError>;
    /// A service is gone for good (undeployed): release what it held alone,
    /// such as its mesh's network once the mesh is empty.
    async fn released(&self, _mesh: &str, _service: &str) {}
    /// A sandbox of exactly this spec still running from before a restart,
    /// re-attached; `None` when there is none (or the backend cannot).
    async fn adopt(&self, _spec: &SandboxSpec) -> Option<Sandbox> {
        None
    }
    /// After a restart: removes managed sandboxes of services not in `keep`.
    async fn sweep(&self, _keep: &[(String, String)]) {}
}
