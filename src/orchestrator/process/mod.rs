//! The process backend: each server runs as a local process inside a
//! sandbox built by `meshbox sandbox-init` (see [`init`]): its own uid (or a
//! user namespace), pid/mount/ipc/uts namespaces, a network namespace when
//! its network is `none` or an allowlist (then reached only through the
//! egress proxy, [`egress`]), Landlock ([`fs`]) and seccomp ([`seccomp`]),
//! in cgroups of its own ([`cgroups`]) with rlimits where cgroups are not
//! writable. Which layers a host allows is probed once ([`host`]); the
//! status reports exactly the layers each server got.
//!
//! This module owns every syscall the process backend makes; the `unsafe`
//! is limited to the fork/exec hooks and raw syscalls, each with a SAFETY note.
#![allow(unsafe_code)]

pub mod cgroups;
pub mod egress;
pub mod fs;
pub mod host;
pub mod init;
pub mod plan;
pub mod seccomp;
pub mod uid;
mod usage;

use std::ffi::CString;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;
use tokio::sync::watch;
use tracing::{debug, warn};

use super::{
    Capabilities, Completed, Enforced, ExitReason, Isolation, Layer, Limits, MountSource,
    Orchestrator, OrchestratorError, Sandbox, SandboxHandle, SandboxIo, SandboxSpec, ServiceKey,
    Unsupported, MAX_COMPLETED_OUTPUT,
};
use crate::model::{NetworkMode, NetworkPolicy};
use cgroups::{Cgroups, Hierarchy};
use host::Support;
use plan::{EgressPlan, FsPlan, InitPlan, Layers, Namespaces, Report, UserPlan, Visible};

/// Options of the process backend.
#[derive(Debug, Clone)]
pub struct ProcessConfig {
    /// Use cgroups when the host lets us write them.
    pub cgroups: bool,
    /// Name of the cgroup directory meshbox creates its sandboxes under.
    pub cgroup_parent: String,
    /// The meshbox binary that runs `sandbox-init`. `None`: servers run as
    /// plain child processes (limits only; status says no isolation).
    pub init_program: Option<PathBuf>,
    /// meshbox's data dir: hidden from servers; holds the uid table and the
    /// egress sockets.
    pub data_dir: Option<PathBuf>,
    /// Refuse to start a server with less than every isolation layer.
    pub require_isolation: bool,
    /// Layers left out, as on a host that lacks them (tests; a kernel whose
    /// layer breaks a server). Default: `MESHBOX_SANDBOX_WITHOUT`, a comma
    /// list of layer names. The status shows them missing.
    pub without: Vec<Layer>,
}

/// The variable [`ProcessConfig::default`] reads its `without` from.
pub const WITHOUT_ENV: &str = "MESHBOX_SANDBOX_WITHOUT";

/// The layers named in `list` (comma-separated); unknown names are logged
/// and ignored.
fn parse_without(list: &str) -> Vec<Layer> {
    list.split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .filter_map(|n| match n.parse::<Layer>() {
            Ok(l) => Some(l),
            Err(e) => {
                warn!(error = %e, "ignoring an entry of {WITHOUT_ENV}");
                None
            }
        })
        .collect()
}

impl Default for ProcessConfig {
    fn default() -> Self {
        ProcessConfig {
            cgroups: true,
            cgroup_parent: "meshbox".into(),
            // /proc/self/exe still runs this binary after an upgrade replaced it on disk.
            init_program: Some(PathBuf::from("/proc/self/exe"))
                .filter(|p| p.exists())
                .or_else(|| std::env::current_exe().ok()),
            data_dir: None,
            require_isolation: false,
            without: std::env::var(WITHOUT_ENV)
                .map(|l| parse_without(&l))
                .unwrap_or_default(),
        }
    }
}

/// Read-only system directories every server may read.
const SYSTEM_DIRS: &[&str] = &[
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/etc",
    "/opt",
    "/proc",
    "/sys",
    "/nix/store",
];
/// Device files every server may read and write.
const DEVICES: &[&str] = &[
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
    "/dev/tty",
];
/// Shared scratch directories replaced by private tmpfs mounts.
const SCRATCH: &[&str] = &["/tmp", "/var/tmp", "/dev/shm"];
/// Where users' homes live: covered, carrying over only what a server needs.
const HOMES: &[&str] = &["/root", "/home"];
/// Default size of each private scratch tmpfs.
const SCRATCH_MB: u64 = 256;
/// How long the sandbox may take to report its layers.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

pub struct ProcessBackend {
    config: ProcessConfig,
    hierarchy: Hierarchy,
    support: Support,
    uids: uid::Uids,
    /// The invoking user's home: hidden from servers.
    user_home: Option<PathBuf>,
    is_root: bool,
    seq: AtomicU64,
    /// An init started ahead of the next sandbox: loaded and waiting for
    /// its plan, so a start does not wait for meshbox to be executed again.
    spare: Arc<std::sync::Mutex<Option<Init>>>,
    /// Load another spare after each start ([`ProcessBackend::keep_spare`]).
    keep_spare: std::sync::atomic::AtomicBool,
}

/// How long after a start the next spare init loads: past the boot of most
/// servers, so that loading it (executing meshbox again) neither delays that
/// start nor takes a core from the booting server.
const SPARE_AFTER: Duration = Duration::from_millis(250);

/// A started `meshbox sandbox-init`, and the read end of the pipe on which
/// it tells how the server ended (before its own exit, which waits for the
/// sandbox's teardown).
struct Init {
    child: tokio::process::Child,
    ended: OwnedFd,
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

impl ProcessBackend {
    pub fn new(config: ProcessConfig) -> Self {
        let hierarchy = if config.cgroups && !config.without.contains(&Layer::Cgroup) {
            cgroups::detect_hierarchy(&config.cgroup_parent)
        } else {
            Hierarchy::None
        };
        let root = is_root();
        let user_home = std::env::var_os("HOME")
            .filter(|h| !h.is_empty() && h != "/")
            .map(PathBuf::from)
            .and_then(|h| h.canonicalize().ok());
        let mut backend = ProcessBackend {
            uids: uid::Uids::open(config.data_dir.as_deref()),
            hierarchy,
            support: Support::default(),
            user_home,
            is_root: root,
            seq: AtomicU64::new(0),
            spare: Arc::default(),
            keep_spare: false.into(),
            config,
        };
        backend.support = backend.probe();
        debug!(hierarchy = ?backend.hierarchy, support = ?backend.support, root, "process backend");
        backend
    }

    /// What this host supports, for `meshbox doctor`.
    pub fn describe(&self) -> String {
        let mut s = format!("{}; {}", self.hierarchy.describe(), self.support.describe());
        if !self.config.without.is_empty() {
            let names: Vec<&str> = self.config.without.iter().map(|l| l.as_str()).collect();
            s.push_str(&format!(
                "; left out by {WITHOUT_ENV}: {}",
                names.join(", ")
            ));
        }
        s
    }

    fn without(&self, layer: Layer) -> bool {
        self.config.without.contains(&layer)
    }

    /// Starts an init for the next sandbox now (one at most; none where no
    /// init runs). It loads, then waits for its plan on stdin; it ends when
    /// its stdin closes, so it never outlives meshbox. Needs the runtime.
    pub fn start_spare(&self) {
        if let Some(init) = self.init_program() {
            fill_spare(&self.spare, init, self.ahead());
        }
    }

    /// Keeps an init loaded ahead of every start, as `meshbox serve` wants:
    /// one now, and after each start another, [`SPARE_AFTER`] later.
    pub fn keep_spare(&self) {
        self.keep_spare.store(true, Ordering::Relaxed);
        self.start_spare();
    }

    /// The init program, when sandboxes start through one.
    fn init_program(&self) -> Option<&Path> {
        self.config
            .init_program
            .as_deref()
            .filter(|_| self.support.init)
    }

    /// After a start: the next spare loads [`SPARE_AFTER`] later, on a
    /// blocking thread, unless this backend is gone by then.
    fn refill_spare_later(&self) {
        if !self.keep_spare.load(Ordering::Relaxed) {
            return;
        }
        let Some(init) = self.init_program().map(Path::to_path_buf) else {
            return;
        };
        let slot = Arc::downgrade(&self.spare);
        let ahead = self.ahead();
        tokio::spawn(async move {
            tokio::time::sleep(SPARE_AFTER).await;
            let _ = tokio::task::spawn_blocking(move || {
                if let Some(slot) = slot.upgrade() {
                    fill_spare(&slot, &init, ahead);
                }
            })
            .await;
        });
    }

    /// The spare init when it is still waiting, else a new one.
    async fn take_init(&self, init: &Path) -> io::Result<Init> {
        let spare = self.spare.lock().expect("spare lock").take();
        if let Some(mut i) = spare {
            if matches!(i.child.try_wait(), Ok(None)) {
                return Ok(i);
            }
        }
        start_init_async(init, self.ahead()).await
    }

    /// The init processes inside a sandbox's limits (its pids count):
    /// the outer init joins them unless it was started ahead, the pid
    /// namespace's init always; none for a bare child.
    fn inits_in_sandbox(&self) -> u64 {
        match (self.init_program(), self.ahead(), self.support.layers.pid) {
            (None, _, _) => 0,
            (Some(_), None, true) => 2,
            (Some(_), _, _) => 1,
        }
    }

    /// What an init makes before its plan comes: the namespaces that
    /// [`ProcessBackend::prepare`] asks of every sandbox but the network
    /// one; nothing where the plan starts with a user namespace.
    fn ahead(&self) -> Option<init::Ahead> {
        let l = &self.support.layers;
        let switches = self.is_root && !self.without(Layer::Uid);
        (switches || !l.userns).then(|| init::Ahead {
            parent: std::process::id(),
            namespaces: Namespaces {
                pid: l.pid,
                mount: l.mount,
                ipc: l.ipc,
                uts: l.uts,
                net: false,
            },
        })
    }

    /// Whose uid the probe's server runs under (the strongest choice left).
    fn probe_user(&self) -> UserPlan {
        if self.is_root && !self.without(Layer::Uid) {
            // The uid is the service's; the probe uses the first of the range.
            UserPlan::Switch {
                uid: uid::UID_BASE,
                gid: uid::UID_BASE,
            }
        } else if !self.is_root && !self.without(Layer::UserNamespace) {
            UserPlan::Namespace {
                uid: nix::unistd::getuid().as_raw(),
                gid: nix::unistd::getgid().as_raw(),
            }
        } else {
            UserPlan::Keep
        }
    }

    /// The layers the probe got, less those the configuration leaves out.
    fn mask(&self, mut l: Layers) -> Layers {
        let off = |layer| self.without(layer);
        l.pid &= !off(Layer::PidNamespace);
        l.mount &= !off(Layer::MountNamespace);
        l.ipc &= !off(Layer::IpcNamespace);
        l.uts &= !off(Layer::UtsNamespace);
        l.net &= !off(Layer::NetworkNamespace);
        l.seccomp &= !off(Layer::Seccomp);
        if off(Layer::Landlock) {
            l.landlock_abi = 0;
            l.landlock_scoped = false;
        }
        l
    }

    /// Which isolation layers a sandbox of `spec` has with `layers`, and
    /// which a sandbox of this backend has elsewhere but not here.
    /// `cgrouped`: cgroups carry every limit it asked for.
    fn isolation(&self, layers: &Layers, spec: &SandboxSpec, cgrouped: bool) -> Isolation {
        let needs_net = !matches!(
            spec.network.effective(),
            NetworkPolicy::Mode(NetworkMode::Full)
        );
        let l = &spec.limits;
        let limited = l.memory_mb.is_some() || l.cpus.is_some() || l.pids.is_some();
        let expected = [
            (
                true,
                if self.is_root {
                    Layer::Uid
                } else {
                    Layer::UserNamespace
                },
            ),
            (true, Layer::PidNamespace),
            (true, Layer::MountNamespace),
            (true, Layer::IpcNamespace),
            (true, Layer::UtsNamespace),
            (needs_net, Layer::NetworkNamespace),
            (true, Layer::NoCapabilities),
            (true, Layer::NoNewPrivs),
            (true, Layer::Landlock),
            (true, Layer::Seccomp),
            (limited, Layer::Cgroup),
        ]
        .into_iter()
        .filter_map(|(wanted, layer)| wanted.then_some(layer));
        Isolation::sort(expected, |layer| match layer {
            Layer::Uid => layers.own_uid && !layers.userns,
            Layer::UserNamespace => layers.userns,
            Layer::PidNamespace => layers.pid,
            Layer::MountNamespace => layers.mount,
            Layer::IpcNamespace => layers.ipc,
            Layer::UtsNamespace => layers.uts,
            Layer::NetworkNamespace => layers.net,
            Layer::NoCapabilities => layers.no_caps,
            Layer::NoNewPrivs => layers.no_new_privs,
            Layer::Landlock => layers.landlock_abi >= fs::MIN_LANDLOCK_ABI,
            Layer::Seccomp => layers.seccomp,
            Layer::Cgroup => cgrouped,
        })
    }

    /// The layers a sandbox gets on this host.
    pub fn support(&self) -> &Support {
        &self.support
    }

    /// Tries the strongest configuration, then weaker ones, in probe mode.
    fn probe(&self) -> Support {
        let mut support = Support {
            root: self.is_root,
            ..Default::default()
        };
        let Some(program) = self.config.init_program.clone() else {
            support.notes.push("no init program configured".into());
            return support;
        };
        let all = Namespaces {
            pid: !self.without(Layer::PidNamespace),
            mount: !self.without(Layer::MountNamespace),
            ipc: !self.without(Layer::IpcNamespace),
            uts: !self.without(Layer::UtsNamespace),
            net: !self.without(Layer::NetworkNamespace),
        };
        let user = self.probe_user();
        let no_net = Namespaces { net: false, ..all };
        let attempts = [
            (user, all),
            (user, no_net),
            (UserPlan::Keep, Namespaces::default()),
        ];
        for (user, namespaces) in attempts {
            let plan = InitPlan {
                parent: 0,
                cgroups: Vec::new(),
                rlimits: Default::default(),
                program: PathBuf::from("/bin/true"),
                argv: vec!["true".into()],
                env: Vec::new(),
                workdir: None,
                user,
                namespaces,
                fs: FsPlan {
                    visible: vec![Visible {
                        path: "/usr".into(),
                        write: false,
                        bind: true,
                        overlay: None,
                    }],
                    ..Default::default()
                },
                landlock: !self.without(Layer::Landlock),
                seccomp: !self.without(Layer::Seccomp),
                egress: None,
                probe: true,
            };
            match probe_once(&program, &plan) {
                Ok(layers) => {
                    support.init = true;
                    support.layers = self.mask(layers);
                    return support;
                }
                Err(e) => support.notes.push(crate::error_chain(&e)),
            }
        }
        support
    }

    /// The layers (and limits) `spec` would get, before starting it.
    fn predict(&self, spec: &SandboxSpec) -> Enforced {
        let limits = &spec.limits;
        let by_cgroup = self.hierarchy.predict(limits);
        let l = &self.support.layers;
        let init = self.support.init;
        Enforced {
            // RLIMIT_DATA bounds the heap when no memory cgroup is at hand.
            memory: limits.memory_mb.is_some(),
            cpus: by_cgroup.cpus,
            // RLIMIT_NPROC does not bind root, so without cgroups root has no pids limit.
            pids: limits.pids.is_some() && (by_cgroup.pids || !self.is_root),
            network: match spec.network.effective() {
                NetworkPolicy::Mode(NetworkMode::None) => init && l.net,
                NetworkPolicy::Allow { .. } => init && l.net,
                _ => true,
            },
            filesystem: init && l.landlock_abi >= fs::MIN_LANDLOCK_ABI,
        }
    }

    /// Whether cgroups carry every limit `limits` asks for, by what they enforce.
    fn cgrouped(limits: &Limits, by_cgroup: &Enforced) -> bool {
        (limits.memory_mb.is_none() || by_cgroup.memory)
            && (limits.cpus.is_none() || by_cgroup.cpus)
            && (limits.pids.is_none() || by_cgroup.pids)
    }

    /// Directories no server may see: meshbox's data dir and the invoking
    /// user's home.
    fn protected(&self) -> Vec<PathBuf> {
        self.config
            .data_dir
            .iter()
            .filter_map(|d| d.canonicalize().ok())
            .chain(self.user_home.clone())
            .collect()
    }

    /// Where the egress sockets of sandboxes live.
    fn run_dir(&self) -> PathBuf {
        match &self.config.data_dir {
            Some(d) => d.join("egress"),
            None => std::env::temp_dir().join(format!("meshbox-egress-{}", std::process::id())),
        }
    }
}

/// Why a probe of the sandbox init got no layers.
#[derive(Debug, thiserror::Error)]
enum ProbeError {
    #[error("cannot run the init")]
    Spawn(#[source] io::Error),
    #[error("cannot hand the plan to the init")]
    Plan(#[source] io::Error),
    /// A layer the host refused (reported by the init across exec).
    #[error("{step}: {error}")]
    Refused { step: String, error: String },
    #[error("the init program did not answer")]
    Silent,
}

/// Starts an init into `slot` unless one waits there already.
fn fill_spare(slot: &std::sync::Mutex<Option<Init>>, init: &Path, ahead: Option<init::Ahead>) {
    if slot.lock().expect("spare lock").is_some() {
        return;
    }
    match start_init(init, ahead) {
        // Another start filled it meanwhile: dropping the older one kills it.
        Ok(init) => drop(slot.lock().expect("spare lock").replace(init)),
        Err(e) => debug!(error = %e, "could not start a spare sandbox init"),
    }
}

/// A sandbox init in its own process group, its stdio piped (the plan goes
/// in at the head of stdin; stdin and stdout then become the server's).
/// No pre_exec hook, so no fork of this (large, threaded) process: the init
/// joins the cgroups and sets the limits itself.
///
/// Forked by the [`launcher`] thread: an init's parent-death signal fires
/// when the *thread* that forked it ends, and a blocking-pool thread (where
/// spares load) ends after 10 s idle, taking its inits' servers with it.
fn start_init(init: &Path, ahead: Option<init::Ahead>) -> io::Result<Init> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    launch(init, ahead, move |r| drop(tx.send(r)))?;
    rx.recv()
        .map_err(|_| io::Error::other("the init launcher thread is gone"))?
}

/// [`start_init`] for async callers: the worker is not held while the
/// launcher forks (it may be loading a spare first), and a start dropped
/// meanwhile drops the init it would have got, killing it.
async fn start_init_async(init: &Path, ahead: Option<init::Ahead>) -> io::Result<Init> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    launch(init, ahead, move |r| drop(tx.send(r)))?;
    rx.await
        .map_err(|_| io::Error::other("the init launcher thread is gone"))?
}

/// Hands the fork of an init to the [`launcher`] thread, inside the
/// caller's runtime; `reply` gets the result there.
fn launch(
    init: &Path,
    ahead: Option<init::Ahead>,
    reply: impl FnOnce(io::Result<Init>) + Send + 'static,
) -> io::Result<()> {
    let runtime = tokio::runtime::Handle::current();
    let init = init.to_path_buf();
    let job: LaunchJob = Box::new(move || {
        let _in_runtime = runtime.enter();
        reply(fork_init(&init, ahead));
    });
    launcher()?
        .send(job)
        .map_err(|_| io::Error::other("the init launcher thread is gone"))
}

type LaunchJob = Box<dyn FnOnce() + Send>;

/// The thread every sandbox init is forked from: it lives as long as
/// meshbox, so an init's parent-death signal means meshbox's death. Started
/// on first use; a start that fails (no threads left for now) is tried
/// again by the next call.
fn launcher() -> io::Result<std::sync::mpsc::Sender<LaunchJob>> {
    static LAUNCHER: std::sync::Mutex<Option<std::sync::mpsc::Sender<LaunchJob>>> =
        std::sync::Mutex::new(None);
    let mut launcher = LAUNCHER.lock().expect("launcher lock");
    if let Some(tx) = launcher.as_ref() {
        return Ok(tx.clone());
    }
    let (tx, rx) = std::sync::mpsc::channel::<LaunchJob>();
    std::thread::Builder::new()
        .name("meshbox-inits".into())
        .spawn(move || {
            for job in rx {
                // A panic must not end the thread: its inits would die.
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
            }
        })
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot start the init launcher thread: {e}"),
            )
        })?;
    Ok(launcher.insert(tx).clone())
}

fn fork_init(init: &Path, ahead: Option<init::Ahead>) -> io::Result<Init> {
    use command_fds::{CommandFdExt, FdMapping};
    let (ended, tell) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let mut c = Command::new(init);
    c.arg0("meshbox").arg(init::COMMAND);
    if let Some(a) = ahead {
        c.arg(init::AHEAD_FLAG)
            .arg(serde_json::to_string(&a).map_err(io::Error::other)?);
    }
    c.env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0)
        .fd_mappings(vec![FdMapping {
            parent_fd: tell,
            child_fd: init::ENDED_FD,
        }])
        .map_err(io::Error::other)?;
    // The write end is closed here once `c` is dropped: only the init has it.
    let child = c.spawn()?;
    Ok(Init { child, ended })
}

/// The exit reason of a server whose end its init told.
fn ended_reason(e: init::Ended, oom_killed: bool) -> ExitReason {
    match e {
        init::Ended::Code(c) => ExitReason {
            code: Some(c),
            signal: None,
            oom_killed,
        },
        init::Ended::Signal(n) => ExitReason {
            code: None,
            signal: Some(n),
            oom_killed,
        },
    }
}

/// How the server ended, as its init tells it on [`init::ENDED_FD`]; `None`
/// when the init ends without telling.
async fn told_end(fd: OwnedFd) -> Option<init::Ended> {
    let pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(fd).ok()?;
    let mut line = Vec::new();
    BufReader::new(pipe)
        .take(64)
        .read_until(b'\n', &mut line)
        .await
        .ok()?;
    init::parse_status(std::str::from_utf8(&line).ok()?)
}

/// Runs the init in probe mode; the layers it got, or why it failed.
fn probe_once(program: &Path, plan: &InitPlan) -> Result<Layers, ProbeError> {
    use std::io::{BufRead, Write};
    let mut child = std::process::Command::new(program)
        .arg(init::COMMAND)
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(ProbeError::Spawn)?;
    let written = child.stdin.take().map(|mut w| w.write_all(&plan.encode()));
    let mut report = None;
    if let Some(err) = child.stderr.take() {
        for line in std::io::BufReader::new(err).split(b'\n').take(64) {
            let Ok(line) = line else { break };
            if let Some(r) = Report::parse(&line) {
                report = Some(r);
                break;
            }
        }
    }
    let _ = child.wait();
    match (report, written) {
        (Some(Report::Ready(layers)), _) => Ok(layers),
        (Some(Report::Failed { step, error }), _) => Err(ProbeError::Refused { step, error }),
        (None, Some(Err(e))) => Err(ProbeError::Plan(e)),
        (None, _) => Err(ProbeError::Silent),
    }
}

/// What a bare child (no sandbox init) does before exec: join its cgroups,
/// set rlimits, die with meshbox. Async-signal-safe. (A sandboxed child's
/// init does the same itself, so it needs no hook and no fork.)
#[derive(Clone)]
struct ChildSetup {
    procs: Vec<CString>,
    rlimit_data: Option<u64>,
    rlimit_nproc: Option<u64>,
}

impl ChildSetup {
    /// SAFETY (for the caller): runs between fork and exec, so it makes only
    /// async-signal-safe calls on memory prepared before the fork.
    fn run(&self) -> io::Result<()> {
        // SAFETY: see above; every call is a plain syscall wrapper.
        unsafe {
            for path in &self.procs {
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
            for (res, limit) in [
                (libc::RLIMIT_DATA, self.rlimit_data),
                (libc::RLIMIT_NPROC, self.rlimit_nproc),
                (libc::RLIMIT_CORE, Some(0)),
            ] {
                if let Some(n) = limit {
                    let lim = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(res, &lim) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
            }
            // The server dies with meshbox rather than linger unsupervised.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        }
        Ok(())
    }
}

use crate::model::{exit_within, signal_group as killpg};

struct ProcessHandle {
    pgid: i32,
    exit: watch::Receiver<Option<ExitReason>>,
    cgroups: Arc<Cgroups>,
}

impl ProcessHandle {
    async fn wait_for(&self, d: Duration) -> Option<ExitReason> {
        exit_within(&self.exit, d).await
    }
}

#[async_trait]
impl SandboxHandle for ProcessHandle {
    async fn stop(&self, grace: Duration) -> ExitReason {
        if let Some(r) = self.wait_for(grace).await {
            return r;
        }
        killpg(self.pgid, nix::sys::signal::Signal::SIGTERM);
        if let Some(r) = self.wait_for(grace).await {
            return r;
        }
        self.kill();
        self.wait_for(Duration::from_secs(10))
            .await
            .unwrap_or_default()
    }

    fn kill(&self) {
        killpg(self.pgid, nix::sys::signal::Signal::SIGKILL);
        self.cgroups.kill_all();
    }

    async fn released(&self, limit: Duration) {
        if self.wait_for(limit).await.is_none() {
            warn!(?limit, "the sandbox's init is still tearing down; going on");
        }
    }

    async fn usage(&self) -> Option<super::Usage> {
        usage::read(self.cgroups.dirs())
    }
}

impl Drop for ProcessHandle {
    fn drop(&mut self) {
        if self.exit.borrow().is_none() {
            self.kill();
        }
    }
}

/// Reads the init's report: the first report line on its stderr. What the
/// init noted before it (a layer it could not build), what was read past it,
/// and the rest of the stream (the server's own stderr) make the returned
/// reader, which keeps no buffer of its own for the server's lifetime.
async fn read_report<R>(
    stderr: R,
) -> io::Result<(Option<Report>, tokio::io::Chain<io::Cursor<Vec<u8>>, R>)>
where
    R: tokio::io::AsyncRead + Unpin,
{
    // Small: a report longer than it is read on into `line` (up to the cap).
    let mut reader = BufReader::with_capacity(REPORT_READ_BUFFER, stderr);
    let mut notes = Vec::new();
    let read = async {
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = (&mut reader)
                .take(plan::MAX_REPORT as u64)
                .read_until(b'\n', &mut line)
                .await?;
            if n == 0 {
                return Ok(None);
            }
            if let Some(r) = Report::parse(&line) {
                return Ok(Some(r));
            }
            if notes.len() < plan::MAX_REPORT {
                notes.extend_from_slice(&line);
            }
        }
    };
    match tokio::time::timeout(SETUP_TIMEOUT, read).await {
        Ok(Ok(r)) => {
            notes.extend_from_slice(reader.buffer());
            Ok((r, io::Cursor::new(notes).chain(reader.into_inner())))
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the sandbox did not report within 30s",
        )),
    }
}

/// The read buffer of [`read_report`].
const REPORT_READ_BUFFER: usize = 4 * 1024;

/// Everything the parent set up for one sandbox besides the process.
struct Prepared {
    plan: InitPlan,
    proxy: Option<egress::HostProxy>,
}

impl ProcessBackend {
    /// The init plan for `spec`, with the host-side egress proxy it needs.
    fn prepare(
        &self,
        spec: &SandboxSpec,
        name: &str,
        program: PathBuf,
    ) -> Result<Prepared, OrchestratorError> {
        let l = &self.support.layers;
        let setup = |step: &'static str| move |source| OrchestratorError::Setup { step, source };
        let user = if self.is_root && !self.without(Layer::Uid) {
            let uid = self
                .uids
                .get(&spec.owner, spec.home.as_deref())
                .map_err(setup("allocating a uid"))?;
            UserPlan::Switch { uid, gid: uid }
        } else if l.userns {
            UserPlan::Namespace {
                uid: nix::unistd::getuid().as_raw(),
                gid: nix::unistd::getgid().as_raw(),
            }
        } else {
            UserPlan::Keep
        };
        let owner_ids = match user {
            UserPlan::Switch { uid, gid } => Some((uid, gid)),
            _ => None,
        };
        if let (Some(home), Some((uid, gid))) = (&spec.home, owner_ids) {
            own_home(home, uid, gid).map_err(setup("giving the home to the service"))?;
        }
        let needs_net = !matches!(
            spec.network.effective(),
            NetworkPolicy::Mode(NetworkMode::Full)
        );
        let namespaces = Namespaces {
            pid: l.pid,
            mount: l.mount,
            ipc: l.ipc,
            uts: l.uts,
            net: needs_net && l.net,
        };
        let protected = self.protected();
        let mut visible: Vec<Visible> = SYSTEM_DIRS
            .iter()
            .map(|d| Visible {
                path: d.into(),
                write: false,
                bind: false,
                overlay: None,
            })
            .collect();
        if let Some(dir) = std::fs::canonicalize("/etc/resolv.conf")
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .filter(|d| !d.starts_with("/etc"))
        {
            visible.push(Visible {
                path: dir,
                write: false,
                bind: false,
                overlay: None,
            });
        }
        let path_env = spec
            .env
            .get("PATH")
            .cloned()
            .unwrap_or_else(crate::environ::runner_path);
        let mut hidden = protected.clone();
        hidden.extend(HOMES.iter().map(PathBuf::from));
        for dir in host::runtime_dirs(&program, &path_env, &hidden, &protected) {
            visible.push(Visible {
                path: dir,
                write: false,
                bind: true,
                overlay: None,
            });
        }
        let mut hide = Vec::new();
        for m in &spec.mounts {
            if let MountSource::Host(src) = &m.source {
                let src = src.canonicalize().unwrap_or_else(|_| src.clone());
                if protected.iter().any(|p| p.starts_with(&src)) {
                    return Err(Unsupported::MountExposes { path: src }.into());
                }
                // Writes over the source land in a layer in the home; the
                // sandbox sees neither the layer's directory nor the source's.
                let overlay = match (&spec.home, m.read_only && m.copy_on_write) {
                    (Some(home), true) if namespaces.mount => {
                        let (dir, hidden) = layer_dirs(home, &src, owner_ids)
                            .map_err(setup("preparing the source's private layer"))?;
                        if !hide.contains(&hidden) {
                            hide.push(hidden);
                        }
                        Some(dir)
                    }
                    _ => None,
                };
                visible.push(Visible {
                    path: src,
                    write: !m.read_only,
                    bind: true,
                    overlay,
                });
            }
        }
        if let Some(home) = &spec.home {
            visible.push(Visible {
                path: home.canonicalize().unwrap_or_else(|_| home.clone()),
                write: true,
                bind: true,
                overlay: None,
            });
        }
        let mut env: Vec<(String, String)> = spec
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut proxy = None;
        let mut egress = None;
        if let (NetworkPolicy::Allow { allow }, true) = (spec.network.effective(), namespaces.net) {
            let rules = allow
                .iter()
                .filter_map(|a| crate::proxy::Rule::parse(a))
                .collect();
            let p = egress::HostProxy::start(
                self.run_dir().join(name),
                rules,
                owner_ids,
                spec.owner.to_string(),
            )
            .map_err(setup("starting the egress proxy"))?;
            visible.push(Visible {
                path: p.dir().to_path_buf(),
                write: false,
                bind: true,
                overlay: None,
            });
            egress = Some(EgressPlan {
                socket: p.socket.clone(),
                port: egress::FORWARD_PORT,
            });
            env.retain(|(k, _)| !k.to_ascii_lowercase().ends_with("_proxy"));
            env.extend(egress::proxy_env(egress::FORWARD_PORT));
            proxy = Some(p);
        }
        let scratch: Vec<PathBuf> = if namespaces.mount {
            SCRATCH.iter().map(PathBuf::from).collect()
        } else {
            Vec::new()
        };
        for s in &scratch {
            visible.push(Visible {
                path: s.clone(),
                write: true,
                bind: false,
                overlay: None,
            });
        }
        if !namespaces.mount {
            // No private /tmp: temporary files go to the home.
            if let Some(home) = &spec.home {
                let tmp = home.join(".tmp");
                let _ = std::fs::create_dir_all(&tmp);
                env.push(("TMPDIR".into(), tmp.to_string_lossy().into_owned()));
            }
        }
        // Homes are covered too: what is carried over from them (a runtime, a
        // mount) stays reachable for a uid that could not walk the real ones.
        let mut cover: Vec<PathBuf> = protected;
        cover.extend(HOMES.iter().map(PathBuf::from));
        cover.extend(scratch.iter().cloned());
        let plan = InitPlan {
            parent: 0,
            cgroups: Vec::new(),
            rlimits: Default::default(),
            program,
            argv: spec.argv.clone(),
            env,
            workdir: spec.workdir.clone(),
            user,
            namespaces,
            fs: FsPlan {
                visible,
                devices: DEVICES.iter().map(PathBuf::from).collect(),
                cover,
                scratch,
                scratch_mb: spec
                    .limits
                    .memory_mb
                    .map_or(SCRATCH_MB, |m| m.min(SCRATCH_MB)),
                idmap_to: owner_ids,
                hide,
            },
            landlock: l.landlock_abi > 0,
            seccomp: l.seccomp,
            egress,
            probe: false,
        };
        Ok(Prepared { plan, proxy })
    }
}

/// The host pid of the process `levels` generations below `init` (the
/// server: under the outer init, and the namespace's init when there is one),
/// when each generation has exactly one child.
fn server_pid(init: u32, levels: usize) -> Option<u32> {
    let mut cur = init;
    for _ in 0..levels {
        let children = std::fs::read_to_string(format!("/proc/{cur}/task/{cur}/children")).ok()?;
        let mut it = children.split_whitespace().filter_map(|p| p.parse().ok());
        cur = it.next()?;
        if it.next().is_some() {
            return None;
        }
    }
    Some(cur)
}

/// Where the private layer over `source` lives in `home`: the overlay's
/// directory (its `upper` and `work` created, owned by `owner`), and the
/// directory of all layers, hidden from the server.
fn layer_dirs(
    home: &Path,
    source: &Path,
    owner: Option<(u32, u32)>,
) -> io::Result<(PathBuf, PathBuf)> {
    let all = home.join(".meshbox");
    let dir = all
        .join("layers")
        .join(crate::model::stable_hash(&source.to_string_lossy()));
    let made = [
        all.clone(),
        all.join("layers"),
        dir.clone(),
        dir.join("upper"),
        dir.join("work"),
    ];
    for d in &made {
        match std::fs::create_dir(d) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::lchown(d, Some(uid), Some(gid))?;
        }
    }
    Ok((dir, all))
}

/// Makes the service's uid own its home (recursively when it did not yet).
fn own_home(home: &Path, uid: u32, gid: u32) -> io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::metadata(home)?;
    if meta.uid() != uid || meta.gid() != gid {
        let mut stack = vec![home.to_path_buf()];
        while let Some(p) = stack.pop() {
            std::os::unix::fs::lchown(&p, Some(uid), Some(gid))?;
            if std::fs::symlink_metadata(&p)?.is_dir() {
                for e in std::fs::read_dir(&p)? {
                    stack.push(e?.path());
                }
            }
        }
    }
    if meta.mode() & 0o777 != 0o700 {
        std::fs::set_permissions(home, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
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
        let e = self.predict(spec);
        match spec.network.effective() {
            NetworkPolicy::Allow { allow } => {
                if !e.network {
                    return Err(Unsupported::Allowlist {
                        reason: "this host lets meshbox create no network namespace; use the docker backend",
                    }
                    .into());
                }
                if let Some(bad) = allow.iter().find(|a| crate::proxy::Rule::parse(a).is_none()) {
                    let _ = bad;
                    return Err(Unsupported::Allowlist {
                        reason: "an entry is not host:port or *.domain:port",
                    }
                    .into());
                }
            }
            NetworkPolicy::Mode(NetworkMode::None) if !e.network => {
                return Err(Unsupported::NetworkNone {
                    reason: "this host lets meshbox create no network namespace; use the docker backend",
                }
                .into())
            }
            _ => {}
        }
        if self.config.require_isolation {
            if !self.support.init {
                return Err(Unsupported::Isolation {
                    layer: "sandbox init",
                }
                .into());
            }
            let by_cgroup = self.hierarchy.predict(&spec.limits);
            let cgrouped = Self::cgrouped(&spec.limits, &by_cgroup);
            let isolation = self.isolation(&self.support.layers, spec, cgrouped);
            if let Some(layer) = isolation.missing.first() {
                return Err(Unsupported::Isolation {
                    layer: layer.as_str(),
                }
                .into());
            }
        }
        Ok(e)
    }

    async fn run_to_completion(
        &self,
        spec: SandboxSpec,
        timeout: Duration,
    ) -> Result<Completed, OrchestratorError> {
        use tokio::io::AsyncWriteExt;
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

    async fn sweep(&self, _keep: &[ServiceKey]) {
        // Nothing of a process sandbox survives its meshbox to be re-adopted:
        // every directory of a dead owner goes, with whatever runs in it.
        let n = cgroups::sweep(&self.hierarchy).await;
        if n > 0 {
            warn!(
                cgroups = n,
                "removed sandbox cgroups left by an earlier meshbox"
            );
        }
        // Egress sockets of dead meshboxes (a live one's, even this one's
        // first sandboxes, are named after a live owner and stay).
        for e in std::fs::read_dir(self.run_dir())
            .into_iter()
            .flatten()
            .flatten()
        {
            if cgroups::owner_is_gone(&e.file_name().to_string_lossy()) {
                let _ = std::fs::remove_dir_all(e.path());
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
        let name = Cgroups::name(seq, &spec.owner.mesh, &spec.owner.name);
        let path_env = spec
            .env
            .get("PATH")
            .cloned()
            .unwrap_or_else(crate::environ::runner_path);
        let resolved = host::resolve_program(&program, &path_env, spec.workdir.as_deref())
            .ok_or_else(|| OrchestratorError::Spawn {
                program: program.clone(),
                source: io::ErrorKind::NotFound.into(),
            })?;
        // A pid namespace kills the whole tree with its init; without one a
        // tracking cgroup finds what left the process group.
        let track = !(self.support.init && self.support.layers.pid);
        let inits = self.inits_in_sandbox();
        let (cgroups, by_cgroup) =
            Cgroups::create(&self.hierarchy, &name, &spec.limits, track, inits);
        let cgroups = Arc::new(cgroups);
        let cgrouped = Self::cgrouped(&spec.limits, &by_cgroup);

        // rlimits where no cgroup took the limit.
        let rlimits = plan::Rlimits {
            data: (spec.limits.memory_mb.is_some() && !by_cgroup.memory)
                .then(|| spec.limits.memory_mb.unwrap_or(0) * 1024 * 1024),
            nproc: (spec.limits.pids.is_some() && !by_cgroup.pids && !self.is_root)
                .then(|| spec.limits.pids.unwrap_or(0) + inits),
        };
        enforced.memory =
            spec.limits.memory_mb.is_some() && (by_cgroup.memory || rlimits.data.is_some());
        enforced.cpus = by_cgroup.cpus;
        enforced.pids = by_cgroup.pids || rlimits.nproc.is_some();

        let prepared = match self.init_program() {
            Some(init) => match self.prepare(&spec, &name, resolved.clone()) {
                Ok(mut p) => {
                    p.plan.parent = std::process::id();
                    p.plan.cgroups = cgroups.procs_files();
                    p.plan.rlimits = rlimits;
                    Some((p, init.to_path_buf()))
                }
                Err(e) => {
                    cgroups.remove().await;
                    return Err(e);
                }
            },
            None => None,
        };
        let spawned = match &prepared {
            Some((_, init)) => self.take_init(init).await.map(|i| (i.child, Some(i.ended))),
            None => {
                // Bare: the program itself (check() refused what needs the init).
                let setup = ChildSetup {
                    procs: cgroups
                        .procs_files()
                        .iter()
                        .filter_map(|p| CString::new(p.as_os_str().as_bytes()).ok())
                        .collect(),
                    rlimit_data: rlimits.data,
                    rlimit_nproc: rlimits.nproc,
                };
                let mut c = Command::new(&resolved);
                c.arg0(&program)
                    .args(&spec.argv[1..])
                    .env_clear()
                    .envs(&spec.env);
                if let Some(dir) = &spec.workdir {
                    c.current_dir(dir);
                }
                // SAFETY: ChildSetup::run makes only async-signal-safe calls on
                // memory prepared before the fork; it allocates nothing.
                unsafe {
                    c.pre_exec(move || setup.run());
                }
                c.stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .kill_on_drop(true)
                    .process_group(0)
                    .spawn()
                    .map(|c| (c, None))
            }
        };
        let (mut child, told) = match spawned {
            Ok(c) => c,
            Err(source) => {
                cgroups.remove().await;
                return Err(OrchestratorError::Spawn { program, source });
            }
        };
        // The status shows the server's own pid once the init has forked it.
        let mut pid = child.id();
        let pgid = pid.map(|p| p as i32).unwrap_or(0);
        let mut stdin = child.stdin.take().expect("stdin piped");
        let stderr = child.stderr.take().expect("stderr piped");
        let mut proxy = None;
        let mut isolation = self.isolation(&Layers::default(), &spec, cgrouped);
        let stderr: crate::model::BoxRead = match prepared {
            None => Box::pin(stderr),
            Some((p, _)) => {
                let handed = stdin.write_all(&p.plan.encode()).await;
                let report = match handed {
                    Ok(()) => read_report(stderr).await,
                    Err(e) => Err(e),
                };
                let outcome = match report {
                    Ok((Some(Report::Ready(layers)), rest)) => {
                        isolation = self.isolation(&layers, &spec, cgrouped);
                        match (self.config.require_isolation, isolation.missing.first()) {
                            (true, Some(layer)) => Err(Unsupported::Isolation {
                                layer: layer.as_str(),
                            }
                            .into()),
                            _ => Ok((layers, rest)),
                        }
                    }
                    Ok((Some(Report::Failed { step, error }), _)) => {
                        Err(OrchestratorError::SandboxInit { step, error })
                    }
                    Ok((None, _)) => Err(OrchestratorError::SandboxInit {
                        step: "starting the sandbox init".into(),
                        error: "it ended without a report".into(),
                    }),
                    Err(source) => Err(OrchestratorError::Setup {
                        step: "waiting for the sandbox",
                        source,
                    }),
                };
                self.refill_spare_later();
                let (layers, rest) = match outcome {
                    Ok(x) => x,
                    Err(e) => {
                        killpg(pgid, nix::sys::signal::Signal::SIGKILL);
                        cgroups.kill_all();
                        let _ = child.wait().await;
                        cgroups.remove().await;
                        return Err(e);
                    }
                };
                enforced.filesystem = layers.landlock_abi >= fs::MIN_LANDLOCK_ABI;
                enforced.network = match spec.network.effective() {
                    NetworkPolicy::Mode(NetworkMode::None) => layers.net,
                    NetworkPolicy::Allow { .. } => layers.net && layers.egress,
                    _ => true,
                };
                let layered = p.plan.fs.visible.iter().any(|v| v.overlay.is_some());
                let wants_layer = spec.mounts.iter().any(|m| m.read_only && m.copy_on_write);
                if wants_layer && !(layered && layers.private_writes) {
                    warn!(
                        service = %spec.owner,
                        "the source is read-only to the server: no private layer for its writes here"
                    );
                }
                match isolation.missing.is_empty() {
                    false => warn!(
                        service = %spec.owner,
                        missing = ?isolation.missing,
                        ?layers,
                        "sandbox ready without every isolation layer (see `meshbox doctor`)"
                    ),
                    true => debug!(service = %spec.owner, ?layers, "sandbox ready"),
                }
                let levels = if layers.pid { 2 } else { 1 };
                pid = pid.map(|x| server_pid(x, levels).unwrap_or(x));
                proxy = p.proxy;
                Box::pin(rest)
            }
        };
        let io = SandboxIo {
            stdin: Box::pin(stdin),
            stdout: Box::pin(child.stdout.take().expect("stdout piped")),
            stderr,
        };
        // Two moments: the server's end (what the session and the supervisor
        // wait for), told by the init as soon as the sandbox's processes are
        // gone; and the sandbox's release (what the handle waits for), when
        // the init itself is, its namespaces torn down.
        let (ended_tx, ended_rx) = watch::channel(None);
        let (exit_tx, exit_rx) = watch::channel(None);
        {
            let cgroups = cgroups.clone();
            tokio::spawn(async move {
                let told = tokio::select! {
                    told = async { told_end(told?).await } => told,
                    _ = child.wait() => None,
                };
                if let Some(e) = told {
                    ended_tx.send_replace(Some(ended_reason(e, cgroups.oom_killed())));
                }
                // Waited for again, or for the first time: tokio keeps the status.
                let status = child.wait().await;
                // The leader is gone: nothing of its tree may outlive it.
                killpg(pgid, nix::sys::signal::Signal::SIGKILL);
                cgroups.kill_all();
                let oom = cgroups.oom_killed();
                let reason = match (told, status) {
                    // How the server ended, not how its init did (killed
                    // meanwhile by a stop that came after the end).
                    (Some(e), _) => ended_reason(e, oom),
                    (None, Ok(st)) => {
                        use std::os::unix::process::ExitStatusExt;
                        ExitReason {
                            code: st.code(),
                            signal: st.signal(),
                            oom_killed: oom,
                        }
                    }
                    (None, Err(e)) => {
                        warn!(error = %e, "waiting for server failed");
                        ExitReason::default()
                    }
                };
                ended_tx.send_if_modified(|e| {
                    let first = e.is_none();
                    if first {
                        *e = Some(reason.clone());
                    }
                    first
                });
                exit_tx.send_replace(Some(reason));
                cgroups.remove().await;
                drop(proxy);
            });
        }
        Ok(Sandbox {
            io,
            exit: ended_rx,
            handle: Box::new(ProcessHandle {
                pgid,
                exit: exit_rx,
                cgroups,
            }),
            pid,
            container_id: None,
            enforced,
            isolation,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bare(cgroups: bool) -> ProcessBackend {
        ProcessBackend::new(ProcessConfig {
            cgroups,
            init_program: None,
            ..Default::default()
        })
    }

    #[tokio::test]
    async fn the_report_is_taken_out_and_every_other_byte_of_stderr_kept() {
        use tokio::io::AsyncReadExt;
        let report = serde_json::to_vec(&Report::Ready(plan::Layers::default())).unwrap();
        // A note before the report, the server's stderr after it, more than
        // one read buffer of it, arriving with the report.
        let mut stream = b"no cgroup layer\n".to_vec();
        stream.extend_from_slice(&report);
        stream.push(b'\n');
        let tail: Vec<u8> = (0..3 * REPORT_READ_BUFFER)
            .map(|i| b'a' + (i % 26) as u8)
            .collect();
        stream.extend_from_slice(&tail);
        let (got, mut rest) = read_report(&stream[..]).await.unwrap();
        assert_eq!(got, Some(Report::Ready(plan::Layers::default())));
        let mut out = Vec::new();
        rest.read_to_end(&mut out).await.unwrap();
        let mut want = b"no cgroup layer\n".to_vec();
        want.extend_from_slice(&tail);
        assert_eq!(out, want);
    }

    #[test]
    fn without_an_init_allowlists_and_none_are_refused_not_ignored() {
        let b = bare(false);
        for network in [
            NetworkPolicy::Allow {
                allow: vec!["example.com:443".into()],
            },
            NetworkPolicy::Mode(NetworkMode::None),
        ] {
            let spec = SandboxSpec {
                argv: vec!["true".into()],
                network,
                ..Default::default()
            };
            let err = b.check(&spec).unwrap_err();
            assert!(
                matches!(
                    err,
                    OrchestratorError::Unsupported(
                        Unsupported::Allowlist { .. } | Unsupported::NetworkNone { .. }
                    )
                ),
                "{err}"
            );
        }
    }

    #[test]
    fn nothing_claimed_when_nothing_requested() {
        let e = bare(false).check(&SandboxSpec::default()).unwrap();
        assert!(!e.memory && !e.cpus && !e.pids && !e.filesystem);
        assert!(e.network, "full network needs no enforcement");
    }

    #[test]
    fn cpus_without_cgroups_not_claimed() {
        let spec = SandboxSpec {
            limits: Limits {
                memory_mb: Some(64),
                cpus: Some(0.5),
                pids: Some(64),
            },
            ..Default::default()
        };
        let e = bare(false).check(&spec).unwrap();
        assert!(e.memory, "RLIMIT_DATA bounds memory");
        assert!(!e.cpus, "no rlimit bounds a cpu share");
        assert_eq!(e.pids, !is_root(), "RLIMIT_NPROC does not bind root");
    }

    #[test]
    fn layers_left_out_are_named_and_a_bare_child_has_none() {
        assert_eq!(
            parse_without(" landlock, pid-namespace,,bogus"),
            vec![Layer::Landlock, Layer::PidNamespace]
        );
        let b = ProcessBackend::new(ProcessConfig {
            cgroups: false,
            init_program: None,
            without: vec![Layer::Seccomp],
            ..Default::default()
        });
        assert!(b
            .describe()
            .contains("left out by MESHBOX_SANDBOX_WITHOUT: seccomp"));
        let spec = SandboxSpec {
            network: NetworkPolicy::Mode(NetworkMode::None),
            limits: Limits {
                pids: Some(8),
                ..Default::default()
            },
            ..Default::default()
        };
        let i = b.isolation(&Layers::default(), &spec, false);
        assert!(i.applied.is_empty(), "{i:?}");
        assert!(i.missing.contains(&Layer::NetworkNamespace), "{i:?}");
        assert!(i.missing.contains(&Layer::Cgroup), "{i:?}");
        assert!(i.missing.contains(&Layer::Landlock), "{i:?}");
        // Full network needs no network namespace; no limits, no cgroup.
        let i = b.isolation(&Layers::default(), &SandboxSpec::default(), false);
        assert!(!i.missing.contains(&Layer::NetworkNamespace), "{i:?}");
        assert!(!i.missing.contains(&Layer::Cgroup), "{i:?}");
    }

    #[test]
    fn require_isolation_refuses_a_host_without_the_init() {
        let b = ProcessBackend::new(ProcessConfig {
            cgroups: false,
            init_program: None,
            require_isolation: true,
            ..Default::default()
        });
        let err = b.check(&SandboxSpec::default()).unwrap_err();
        assert!(
            matches!(
                err,
                OrchestratorError::Unsupported(Unsupported::Isolation { .. })
            ),
            "{err}"
        );
        assert!(b.describe().contains("no sandbox init"), "{}", b.describe());
    }
}
