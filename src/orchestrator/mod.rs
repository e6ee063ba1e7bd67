//! The sandbox backends and the trait the supervisor drives them through.
//!
//! A backend turns a [`SandboxSpec`] into a running [`Sandbox`]: byte streams
//! for the server's stdin, stdout and stderr, an exit signal, and a handle that
//! stops the whole sandbox. It knows nothing of sources, MCP or services
//! beyond the owner key it labels things with. No backend type (a
//! `tokio::process::Child`, a bollard model) crosses this boundary, so the
//! supervisor and the API never name a backend: they read [`Capabilities`].
//!
//! The primitives a backend implements: [`check`](Orchestrator::check),
//! [`spawn`](Orchestrator::spawn), [`run_to_completion`](Orchestrator::run_to_completion),
//! [`release`](Orchestrator::release), [`sweep`](Orchestrator::sweep), and
//! optionally [`adopt`](Orchestrator::adopt).

pub mod docker;
#[cfg(test)]
pub mod fake;
pub mod process;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;

pub use crate::model::{
    wait_exit, BoxRead, BoxWrite, Enforced, ExitReason, ExitWatch, Isolation, Layer, Limits,
    NetworkPolicy, ServiceKey, Usage,
};

/// Something a backend cannot do for a spec; refused up front, never ignored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unsupported {
    #[error("network allowlists cannot be enforced by this backend here: {reason}")]
    Allowlist { reason: &'static str },
    #[error("network none needs a network namespace, which cannot be created here: {reason}")]
    NetworkNone { reason: &'static str },
    #[error("image sources need a container backend")]
    Images,
    #[error("this backend cannot provide {layer} isolation here, and it is required")]
    Isolation { layer: &'static str },
    #[error("the spec names no program to run")]
    EmptyCommand,
    /// A mount that would show a server meshbox's data dir or the invoking
    /// user's home.
    #[error("mount `{}` would expose meshbox's own files", path.display())]
    MountExposes { path: PathBuf },
    #[error("the spec names no image to run")]
    NoImage,
}

#[derive(Debug, thiserror::Error)]
pub enum OrchestratorError {
    #[error("failed to start `{program}`")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Unsupported(#[from] Unsupported),
    /// A named volume a spec mounts does not exist (an install cache that
    /// was removed): re-run its install.
    #[error("volume `{volume}` does not exist")]
    MissingVolume { volume: String },
    #[error("image `{image}` does not exist (build it with `meshbox images build`)")]
    MissingImage { image: String },
    #[error("{what} `{name}` not found")]
    NotFound { what: &'static str, name: String },
    #[error("{what} `{name}` already exists")]
    Conflict { what: &'static str, name: String },
    /// The container engine refused or failed an operation.
    #[error("the container engine failed while {op}")]
    Engine {
        op: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A host operation of the sandbox setup failed (cgroups, directories).
    #[error("sandbox setup failed while {step}")]
    Setup {
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} did not finish within {}s", after.as_secs())]
    TimedOut { what: String, after: Duration },
    /// A step of the process sandbox's init failed (reported across exec).
    #[error("sandbox setup failed while {step}: {error}")]
    SandboxInit { step: String, error: String },
}

/// What a backend can do, so callers ask instead of naming it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Shown in status and health (`process`, `docker`).
    pub name: &'static str,
    /// Runs `image:` sources.
    pub images: bool,
    /// Installs run inside a sandbox from the runner image (with network),
    /// into a named volume the server then mounts read-only.
    pub sandboxed_install: bool,
    /// Sandboxes can outlive meshbox and be re-adopted by the next start.
    pub detach: bool,
}

/// Where a mount comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum MountSource {
    /// A named volume of the backend (docker): an install cache.
    Volume(String),
    /// A host directory.
    Host(PathBuf),
}

/// A directory a sandbox sees at `target`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Mount {
    pub source: MountSource,
    pub target: PathBuf,
    pub read_only: bool,
    /// Read-only below, yet the server may write over it: its writes land
    /// in a private layer in its home, never in the directory (the installed
    /// source, which some servers write their state next to). Where a
    /// backend cannot, the mount is plainly read-only.
    pub copy_on_write: bool,
}

/// A host directory copied into a sandbox before it starts (a `path:`
/// source for a sandboxed install); never bind-mounted.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Upload {
    pub from: PathBuf,
    /// Directory inside the sandbox the copy lands in (`<into>/<name>`).
    pub into: PathBuf,
    pub name: String,
}

/// What a sandbox is for: a server, or a step run to completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Role {
    #[default]
    Server,
    Install,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Server => "server",
            Role::Install => "install",
        }
    }
}

/// Everything a backend needs to start one sandbox.
#[derive(Debug, Clone, Default)]
pub struct SandboxSpec {
    /// The service this sandbox belongs to.
    pub owner: ServiceKey,
    pub role: Role,
    /// Container image; `None` runs `argv` on the host (process backend).
    pub image: Option<String>,
    /// Program and arguments (argv, never a shell string). Empty with an
    /// image: the image's own command.
    pub argv: Vec<String>,
    /// The complete environment of the server; nothing else is inherited.
    pub env: BTreeMap<String, String>,
    pub workdir: Option<PathBuf>,
    /// The server's private, writable home (process backend); containers get
    /// a tmpfs instead.
    pub home: Option<PathBuf>,
    pub limits: Limits,
    pub network: NetworkPolicy,
    /// The installed source (read-only) and the spec's host mounts.
    pub mounts: Vec<Mount>,
    pub upload: Option<Upload>,
}

/// The server's three standard streams.
pub struct SandboxIo {
    pub stdin: BoxWrite,
    pub stdout: BoxRead,
    pub stderr: BoxRead,
}

/// How long a sandbox whose server exited may take to let go of all it held
/// ([`SandboxHandle::released`]) before its user goes on anyway.
pub const RELEASE_LIMIT: Duration = Duration::from_secs(10);

/// Control of a running sandbox; dropping it kills whatever is left.
#[async_trait]
pub trait SandboxHandle: Send + Sync {
    /// Stops the sandbox: waits `grace` for the server to exit on its own (the
    /// caller has closed stdin), then SIGTERM to the whole tree, then SIGKILL.
    async fn stop(&self, grace: Duration) -> ExitReason;
    /// Kills at once, without grace (the whole tree).
    fn kill(&self);
    /// Waits, up to `limit`, until the sandbox whose server ended
    /// ([`Sandbox::exit`]) has let go of all it held: a process sandbox's
    /// namespaces are torn down after the server's end is known (unmounting
    /// its overlay syncs the filesystem under it), and the next start of the
    /// same service reuses its layer. Default: at once.
    async fn released(&self, limit: Duration) {
        let _ = limit;
    }
    /// Lets go of the sandbox without stopping it (to re-adopt it after a
    /// restart). False where the backend cannot: the caller then stops it.
    fn detach(&self) -> bool {
        false
    }
    /// What the sandbox uses now (memory, CPU), where the backend can read
    /// it; `None` where it cannot. Cheap enough to call on every scrape.
    async fn usage(&self) -> Option<Usage> {
        None
    }
}

pub struct Sandbox {
    pub io: SandboxIo,
    /// `Some` once the server has exited (and everything it started; the
    /// sandbox may still be tearing down: see [`SandboxHandle::released`]).
    pub exit: ExitWatch,
    pub handle: Box<dyn SandboxHandle>,
    pub pid: Option<u32>,
    pub container_id: Option<String>,
    pub enforced: Enforced,
    /// The isolation layers it got, and those missing here.
    pub isolation: Isolation,
}

/// How a sandbox run to completion ended, and what it printed (bounded).
#[derive(Debug, Clone, Default)]
pub struct Completed {
    pub exit: ExitReason,
    /// At most [`MAX_COMPLETED_OUTPUT`] bytes of stdout.
    pub stdout: Vec<u8>,
    /// The last [`MAX_COMPLETED_OUTPUT`] bytes of stderr.
    pub stderr: Vec<u8>,
}

impl Completed {
    pub fn success(&self) -> bool {
        self.exit.code == Some(0)
    }
}

/// Bound on the output kept from a sandbox run to completion.
pub const MAX_COMPLETED_OUTPUT: usize = 1 << 20;

#[async_trait]
pub trait Orchestrator: Send + Sync + 'static {
    fn capabilities(&self) -> Capabilities;
    /// Which limits and layers this backend would enforce for `spec`, before
    /// starting it. Rejects specs it cannot honour (an allowlist it cannot
    /// enforce, an image without an engine).
    fn check(&self, spec: &SandboxSpec) -> Result<Enforced, OrchestratorError>;
    /// Starts a server's sandbox with its stdio attached.
    async fn spawn(&self, spec: SandboxSpec) -> Result<Sandbox, OrchestratorError>;
    /// Runs a sandbox (an install step) to its end or `timeout`; dropping the
    /// future removes whatever it started.
    async fn run_to_completion(
        &self,
        spec: SandboxSpec,
        timeout: Duration,
    ) -> Result<Completed, OrchestratorError>;
    /// A service is gone for good (undeployed): release what it held alone,
    /// such as its mesh's network once the mesh is empty.
    async fn release(&self, _owner: &ServiceKey) {}
    /// A sandbox of exactly this spec still running from before a restart,
    /// re-attached; `None` when there is none (or the backend cannot).
    async fn adopt(&self, _spec: &SandboxSpec) -> Option<Sandbox> {
        None
    }
    /// At start: removes what an earlier meshbox of this data dir left behind
    /// for services not in `keep` (containers, networks, cgroups).
    async fn sweep(&self, _keep: &[ServiceKey]) {}
}
