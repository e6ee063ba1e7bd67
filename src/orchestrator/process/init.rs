//! `meshbox sandbox-init`: the small init every process-mode server starts
//! under. meshbox re-executes itself with this hidden subcommand (so this
//! code runs single-threaded, before any async runtime) and hands it an
//! [`InitPlan`] at the head of its stdin; what does not depend on the plan
//! (loading, the seccomp filter) is done before it is read, so an init
//! started ahead of its sandbox has done it already. It joins the sandbox's cgroups,
//! sets its rlimits and its parent-death signal, then builds the sandbox
//! in a fixed order:
//!
//! 1. user namespace (when meshbox is not root), then pid, mount, ipc, uts
//!    and network namespaces;
//! 2. forks the in-namespace init (pid 1: reaps orphans, forwards SIGTERM,
//!    and when the server ends the kernel kills everything left);
//! 3. mounts (covered data dir, home and /tmp, read-only source and mounts,
//!    a fresh /proc), hostname, loopback and the egress forwarder;
//! 4. forks the server, which switches to its own uid and gid, drops every
//!    capability, sets no_new_privs, enforces Landlock, installs the seccomp
//!    filter, reports the layers it got on stderr and execs.
//!
//! An init started ahead of its sandbox (`--ahead`, where the plan has no
//! user namespace) does steps 1 and 2 before the plan comes, but for the
//! network namespace, which depends on the service; the pid namespace's
//! init then reads the plan, joins the cgroups and goes on from step 3.
//!
//! Without a pid namespace the outer init is a child subreaper instead and
//! kills every descendant when the server ends. The exit status of the
//! server (code or signal) is passed up unchanged, and told to meshbox at
//! once on [`ENDED_FD`]: the init's own exit waits for the sandbox's
//! teardown (unmounting the source's overlay syncs the filesystem under it,
//! seconds on a busy disk).
//!
//! Owns every namespace, credential and filter syscall of the process
//! backend; it never touches meshbox's state.

use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{kill, sigprocmask, SigHandler, SigSet, SigmaskHow, Signal};
use nix::sys::stat::{umask, Mode};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Gid, Pid, Uid};

use super::plan::{InitPlan, Layers, Report, UserPlan, MAX_PLAN};
use super::{egress, fs, seccomp};

/// The hidden subcommand meshbox re-executes itself with.
pub const COMMAND: &str = "sandbox-init";

/// The write end of a pipe from meshbox, where the init tells how the server
/// ended once it and everything else in the sandbox is gone.
pub const ENDED_FD: i32 = 3;

/// A failed step of the sandbox setup.
#[derive(Debug, thiserror::Error)]
#[error("{step}")]
pub struct InitError {
    step: &'static str,
    #[source]
    source: Box<dyn std::error::Error + Send + Sync>,
}

trait Step<T> {
    fn step(self, step: &'static str) -> Result<T, InitError>;
}

impl<T, E: std::error::Error + Send + Sync + 'static> Step<T> for Result<T, E> {
    fn step(self, step: &'static str) -> Result<T, InitError> {
        self.map_err(|e| InitError {
            step,
            source: Box::new(e),
        })
    }
}

/// The signals the inits wait for instead of handling.
fn waited() -> SigSet {
    let mut s = SigSet::empty();
    for sig in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGQUIT,
    ] {
        s.add(sig);
    }
    s
}

/// A standard stream as an unbuffered file that is never closed here.
fn stdio(fd: i32) -> std::mem::ManuallyDrop<File> {
    // SAFETY: fds 0-2 stay open for the life of the process; ManuallyDrop
    // keeps this handle from closing them.
    std::mem::ManuallyDrop::new(unsafe { File::from_raw_fd(fd) })
}

/// Lets go of the server's stdio: the inits must not hold its pipes, or
/// meshbox would never see the server close its stdout.
fn release_stdio() {
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        use std::os::fd::AsRawFd;
        for fd in 0..=2 {
            // SAFETY: dup2 onto the standard fds, which this process owns.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
}

/// One report line on stderr (the server has not started writing there).
fn report(r: &Report) {
    let mut line = serde_json::to_vec(r).unwrap_or_default();
    line.push(b'\n');
    let _ = stdio(2).write_all(&line);
}

fn failed(e: &InitError) -> Report {
    let error = e
        .source
        .to_string()
        .chars()
        .chain(
            std::iter::successors(e.source.source(), |s| s.source())
                .flat_map(|s| format!(": {s}").chars().collect::<Vec<_>>()),
        )
        .collect();
    Report::Failed {
        step: e.step.to_owned(),
        error,
    }
}

/// Entry point of `meshbox sandbox-init`; returns the exit code when it
/// cannot exec the server.
pub fn main() -> i32 {
    // First, before anything here opens a file that could take its number.
    let ended = take_ended_fd();
    // The server gets its stdio and nothing else this init was handed.
    super::host::keep_inherited_fds_from_children();
    // Ahead of the plan (an init started ahead of its sandbox waits below).
    let filters = build_filters();
    let args: Vec<String> = std::env::args().skip(2).collect();
    if let [flag, ahead] = &args[..] {
        if flag == AHEAD_FLAG {
            let e = match serde_json::from_str::<Ahead>(ahead).step("reading what to make ahead") {
                Ok(ahead) => match run_ahead(ahead, filters, ended) {
                    Ok(never) => match never {},
                    Err(e) => e,
                },
                Err(e) => e,
            };
            report(&failed(&e));
            return 125;
        }
    }
    let plan = match read_plan() {
        Ok(p) => p,
        Err(e) => {
            report(&failed(&e));
            return 125;
        }
    };
    match run(&plan, filters, ended) {
        Ok(never) => match never {},
        Err(e) => {
            report(&failed(&e));
            125
        }
    }
}

/// [`ENDED_FD`] when meshbox passed a pipe there, made close-on-exec so
/// the server never holds it.
fn take_ended_fd() -> Option<OwnedFd> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    use nix::sys::stat::{fstat, SFlag};
    // SAFETY: only borrowed for the checks; owned below once it is ours.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(ENDED_FD) };
    let st = fstat(fd).ok()?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFIFO {
        return None;
    }
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).ok()?;
    // SAFETY: an open pipe nothing else in this process owns.
    Some(unsafe { OwnedFd::from_raw_fd(ENDED_FD) })
}

/// Tells meshbox how the server ended (best effort: meshbox also learns it
/// from the init's exit).
fn tell_ended(fd: Option<OwnedFd>, ended: Ended) {
    if let Some(fd) = fd {
        let _ = File::from(fd).write_all(status_line(ended).as_bytes());
    }
}

/// The plan at the head of stdin, read exactly (the rest is the server's).
fn read_plan() -> Result<InitPlan, InitError> {
    let mut stdin = stdio(0);
    let mut len = [0u8; 4];
    stdin.read_exact(&mut len).step("reading the plan")?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_PLAN {
        return Err(InitError {
            step: "reading the plan",
            source: "the plan is too large".into(),
        });
    }
    let mut buf = vec![0u8; len];
    stdin.read_exact(&mut buf).step("reading the plan")?;
    serde_json::from_slice(&buf).step("decoding the plan")
}

/// What the parent used to do between fork and exec: die with meshbox,
/// join the cgroups, set the rlimits.
fn adopt_limits(plan: &InitPlan) -> Result<(), InitError> {
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).step("setting the parent-death signal")?;
    check_parent(plan.parent)?;
    join_limits(plan)
}

/// Fails when meshbox (`parent`, 0: unknown) is no longer this process's parent.
fn check_parent(parent: u32) -> Result<(), InitError> {
    if parent != 0 && nix::unistd::getppid().as_raw() as u32 != parent {
        return Err(InitError {
            step: "checking the parent",
            source: "meshbox is gone".into(),
        });
    }
    Ok(())
}

/// Joins the sandbox's cgroups and sets its rlimits (inherited by what
/// this process forks).
fn join_limits(plan: &InitPlan) -> Result<(), InitError> {
    for procs in &plan.cgroups {
        std::fs::write(procs, "0").step("joining the sandbox's cgroups")?;
    }
    use nix::sys::resource::{setrlimit, Resource};
    let limits = [
        (Resource::RLIMIT_DATA, plan.rlimits.data),
        (Resource::RLIMIT_NPROC, plan.rlimits.nproc),
        (Resource::RLIMIT_CORE, Some(0)),
    ];
    for (res, limit) in limits {
        if let Some(n) = limit {
            setrlimit(res, n, n).step("setting a resource limit")?;
        }
    }
    Ok(())
}

fn write_file(path: &str, content: &str) -> Result<(), std::io::Error> {
    std::fs::write(path, content)
}

/// The seccomp programs, compiled before the plan arrives (they do not
/// depend on it); whether they are installed is the plan's choice.
type Filters = Result<(seccompiler::BpfProgram, seccompiler::BpfProgram), seccomp::SeccompError>;

fn build_filters() -> Filters {
    Ok((seccomp::program()?, seccomp::clone3_program()?))
}

fn run(
    plan: &InitPlan,
    filters: Filters,
    ended: Option<OwnedFd>,
) -> Result<std::convert::Infallible, InitError> {
    adopt_limits(plan)?;
    let old_mask = block_signals()?;
    let mut layers = Layers::default();
    match plan.user {
        UserPlan::Namespace { uid, gid } => {
            unshare(CloneFlags::CLONE_NEWUSER).step("creating the user namespace")?;
            write_file("/proc/self/setgroups", "deny").step("denying setgroups")?;
            write_file("/proc/self/uid_map", &format!("{uid} {uid} 1")).step("mapping the uid")?;
            write_file("/proc/self/gid_map", &format!("{gid} {gid} 1")).step("mapping the gid")?;
            layers.userns = true;
            layers.own_uid = true;
        }
        UserPlan::Switch { .. } => layers.own_uid = true,
        UserPlan::Keep => {}
    }
    let ns = plan.namespaces;
    let flags = namespace_flags(ns);
    if !flags.is_empty() {
        unshare(flags).step("creating namespaces")?;
    }
    with_namespaces(&mut layers, ns);
    if ns.pid {
        in_pid_namespace(ended, |status_out, ended| {
            inner(plan, layers, Some(status_out), ended, &old_mask, filters)
        })
    } else {
        nix::sys::prctl::set_child_subreaper(true).step("becoming a subreaper")?;
        inner(plan, layers, None, ended, &old_mask, filters)
    }
}

/// The argument before [`Ahead`] (as JSON) on an init's command line.
pub const AHEAD_FLAG: &str = "--ahead";

/// What an init started ahead of its sandbox makes before its plan comes:
/// the namespaces every sandbox of that backend gets (not the network
/// namespace, which depends on the service), and the pid namespace's init
/// that then waits for the plan. Only where the plan switches the uid
/// itself (no user namespace, which would have to come first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Ahead {
    /// meshbox: the init's parent.
    pub parent: u32,
    pub namespaces: super::plan::Namespaces,
}

/// An init started ahead: the namespaces first, then (in the pid
/// namespace's init when there is one) the plan.
fn run_ahead(
    ahead: Ahead,
    filters: Filters,
    ended: Option<OwnedFd>,
) -> Result<std::convert::Infallible, InitError> {
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).step("setting the parent-death signal")?;
    check_parent(ahead.parent)?;
    let old_mask = block_signals()?;
    let made = super::plan::Namespaces {
        net: false,
        ..ahead.namespaces
    };
    let flags = namespace_flags(made);
    if !flags.is_empty() {
        unshare(flags).step("creating namespaces")?;
    }
    let start = move |status_out: Option<OwnedFd>, ended: Option<OwnedFd>| {
        let plan = read_plan()?;
        let ns = plan.namespaces;
        if (super::plan::Namespaces { net: false, ..ns }) != made
            || matches!(plan.user, UserPlan::Namespace { .. })
        {
            return Err(InitError {
                step: "checking the plan",
                source: "it differs from what was made ahead of it".into(),
            });
        }
        join_limits(&plan)?;
        if ns.net {
            unshare(CloneFlags::CLONE_NEWNET).step("creating namespaces")?;
        }
        let mut layers = Layers {
            own_uid: matches!(plan.user, UserPlan::Switch { .. }),
            ..Layers::default()
        };
        with_namespaces(&mut layers, ns);
        inner(&plan, layers, status_out, ended, &old_mask, filters)
    };
    if made.pid {
        in_pid_namespace(ended, |status_out, ended| {
            // Dies with the outer init while it waits for the plan.
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)
                .step("setting the parent-death signal")?;
            start(Some(status_out), ended)
        })
    } else {
        nix::sys::prctl::set_child_subreaper(true).step("becoming a subreaper")?;
        start(None, ended)
    }
}

/// Blocks the signals the inits wait for; the mask to restore for the server.
fn block_signals() -> Result<SigSet, InitError> {
    let mut old_mask = SigSet::empty();
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&waited()), Some(&mut old_mask))
        .step("blocking signals")?;
    Ok(old_mask)
}

/// Records the namespaces made in the layers the server reports.
fn with_namespaces(layers: &mut Layers, ns: super::plan::Namespaces) {
    layers.pid = ns.pid;
    layers.mount = ns.mount;
    layers.ipc = ns.ipc;
    layers.uts = ns.uts;
    layers.net = ns.net;
}

fn namespace_flags(ns: super::plan::Namespaces) -> CloneFlags {
    let mut flags = CloneFlags::empty();
    for (on, f) in [
        (ns.pid, CloneFlags::CLONE_NEWPID),
        (ns.mount, CloneFlags::CLONE_NEWNS),
        (ns.ipc, CloneFlags::CLONE_NEWIPC),
        (ns.uts, CloneFlags::CLONE_NEWUTS),
        (ns.net, CloneFlags::CLONE_NEWNET),
    ] {
        if on {
            flags |= f;
        }
    }
    flags
}

/// Forks the pid namespace's init (just unshared), which runs `body` with
/// the pipe on which it passes the server's end up; this process lets go
/// of the server's stdio, waits for it and exits the way the server did.
fn in_pid_namespace(
    ended: Option<OwnedFd>,
    body: impl FnOnce(OwnedFd, Option<OwnedFd>) -> Result<std::convert::Infallible, InitError>,
) -> Result<std::convert::Infallible, InitError> {
    let (status_r, status_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).step("creating a pipe")?;
    // SAFETY: this process is single-threaded (no runtime was started).
    match unsafe { fork() }.step("forking the namespace init")? {
        ForkResult::Child => {
            drop(status_r);
            let e = match body(status_w, ended) {
                Ok(never) => match never {},
                Err(e) => e,
            };
            report(&failed(&e));
            std::process::exit(125);
        }
        ForkResult::Parent { child } => {
            drop(status_w);
            // The namespace's init tells meshbox; this copy would only
            // keep the pipe open.
            drop(ended);
            release_stdio();
            let own = supervise(child, Reaper::OnlyChild);
            let mut relayed = String::new();
            let _ = File::from(status_r).read_to_string(&mut relayed);
            relay(parse_status(&relayed).unwrap_or(own))
        }
    }
}

/// How a server ended, as the inits pass it up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ended {
    Code(i32),
    Signal(i32),
}

/// The line an init passes the server's end on: `exit N` or `signal N`.
fn status_line(ended: Ended) -> String {
    match ended {
        Ended::Code(c) => format!("exit {c}\n"),
        Ended::Signal(s) => format!("signal {s}\n"),
    }
}

pub(super) fn parse_status(s: &str) -> Option<Ended> {
    let (kind, n) = s.trim().split_once(' ')?;
    let n = n.parse().ok()?;
    match kind {
        "exit" => Some(Ended::Code(n)),
        "signal" => Some(Ended::Signal(n)),
        _ => None,
    }
}

/// Exits the way the server did.
fn relay(ended: Ended) -> ! {
    match ended {
        Ended::Code(c) => std::process::exit(c),
        Ended::Signal(n) => {
            if let Ok(sig) = Signal::try_from(n) {
                // SAFETY: restoring the default disposition of one signal.
                let _ = unsafe { nix::sys::signal::signal(sig, SigHandler::SigDfl) };
                let mut one = SigSet::empty();
                one.add(sig);
                let _ = sigprocmask(SigmaskHow::SIG_UNBLOCK, Some(&one), None);
                let _ = kill(Pid::this(), sig);
            }
            std::process::exit(128 + n)
        }
    }
}

/// What the supervising init kills once the server is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reaper {
    /// Pid 1 of the sandbox's pid namespace: everything else in it.
    Pid1,
    /// A child subreaper without a pid namespace: every descendant.
    Subreaper,
    /// The outer init: its one child is the namespace's init.
    OnlyChild,
}

/// Waits for `main` to end, reaping orphans and forwarding termination
/// signals to it; then kills what is left.
fn supervise(main: Pid, reaper: Reaper) -> Ended {
    let set = waited();
    let mut ended = None;
    loop {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                Ok(WaitStatus::Exited(pid, code)) if pid == main => ended = Some(Ended::Code(code)),
                Ok(WaitStatus::Signaled(pid, sig, _)) if pid == main => {
                    ended = Some(Ended::Signal(sig as i32))
                }
                Ok(_) | Err(Errno::EINTR) => {}
                Err(_) => break,
            }
        }
        if let Some(e) = ended {
            kill_rest(reaper);
            return e;
        }
        match set.wait() {
            Ok(Signal::SIGCHLD) | Err(_) => {}
            Ok(sig) => {
                let _ = kill(main, sig);
            }
        }
    }
}

fn kill_rest(reaper: Reaper) {
    match reaper {
        Reaper::OnlyChild => {}
        // Pid 1 sending to -1 reaches every process of its namespace but itself.
        Reaper::Pid1 => {
            let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
            while waitpid(Pid::from_raw(-1), None).is_ok() {}
        }
        Reaper::Subreaper => {
            let me = std::process::id();
            let children = format!("/proc/{me}/task/{me}/children");
            for _ in 0..1000 {
                let list = std::fs::read_to_string(&children).unwrap_or_default();
                let pids: Vec<i32> = list
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect();
                if pids.is_empty() {
                    break;
                }
                for p in pids {
                    let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
                }
                while let Ok(ws) = waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                    if ws == WaitStatus::StillAlive {
                        break;
                    }
                }
            }
        }
    }
}

fn cstring(s: &[u8], what: &'static str) -> Result<CString, InitError> {
    CString::new(s).step(what)
}

/// Inside the namespaces: mounts, hostname, loopback, then the server.
fn inner(
    plan: &InitPlan,
    mut layers: Layers,
    status_out: Option<OwnedFd>,
    ended_out: Option<OwnedFd>,
    old_mask: &SigSet,
    filters: Filters,
) -> Result<std::convert::Infallible, InitError> {
    let pid1 = status_out.is_some();
    if pid1 {
        nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).step("setting the parent-death signal")?;
    }
    umask(Mode::from_bits_truncate(0o022));
    let ns = plan.namespaces;
    let wanted = plan
        .fs
        .visible
        .iter()
        .filter(|v| v.overlay.is_some())
        .count();
    let mut overlaid = Vec::new();
    if ns.mount {
        let m = fs::setup_mounts(&plan.fs, ns.pid).step("mounting the filesystem")?;
        layers.proc = m.proc;
        layers.private_tmp = m.private_tmp;
        overlaid = m.overlaid;
    }
    layers.private_writes = overlaid.len() == wanted;
    if ns.uts {
        nix::unistd::sethostname("meshbox").step("setting the hostname")?;
    }
    let mut forwarder = None;
    if ns.net {
        egress::loopback_up().step("bringing loopback up")?;
        if let Some(e) = &plan.egress {
            forwarder = Some((
                egress::bind_forwarder(e.port).step("binding the egress forwarder")?,
                e.socket.clone(),
            ));
            layers.egress = true;
        }
    }
    let ruleset = if plan.landlock {
        Some(fs::landlock_ruleset(&plan.fs, &overlaid).step("building the Landlock ruleset")?)
    } else {
        None
    };
    let filters = if plan.seccomp {
        Some(filters.step("building the seccomp filter")?)
    } else {
        None
    };
    let program = cstring(plan.program.as_os_str().as_bytes(), "encoding the program")?;
    let argv = plan
        .argv
        .iter()
        .map(|a| cstring(a.as_bytes(), "encoding an argument"))
        .collect::<Result<Vec<_>, _>>()?;
    let envp = plan
        .env
        .iter()
        .map(|(k, v)| cstring(format!("{k}={v}").as_bytes(), "encoding the environment"))
        .collect::<Result<Vec<_>, _>>()?;
    let init_pid = nix::unistd::getpid();
    // SAFETY: still single-threaded: the forwarder's threads start after this fork.
    match unsafe { fork() }.step("forking the server")? {
        ForkResult::Child => {
            drop(status_out);
            drop(ended_out);
            let server = Server {
                init_pid,
                plan,
                layers,
                ruleset,
                filters,
                old_mask,
            };
            match server.prepare() {
                Ok(layers) => {
                    report(&Report::Ready(layers));
                    if plan.probe {
                        std::process::exit(0);
                    }
                    let e = nix::unistd::execve(&program, &argv, &envp).unwrap_err();
                    report(&Report::Failed {
                        step: format!("starting `{}`", plan.program.display()),
                        error: e.desc().to_owned(),
                    });
                    std::process::exit(127);
                }
                Err(e) => {
                    report(&failed(&e));
                    std::process::exit(126);
                }
            }
        }
        ForkResult::Parent { child } => {
            release_stdio();
            if let Some((listener, socket)) = forwarder {
                egress::forward(listener, socket).step("starting the egress forwarder")?;
            }
            let ended = supervise(
                child,
                if pid1 {
                    Reaper::Pid1
                } else {
                    Reaper::Subreaper
                },
            );
            tell_ended(ended_out, ended);
            if let Some(fd) = status_out {
                let _ = File::from(fd).write_all(status_line(ended).as_bytes());
                std::process::exit(0);
            }
            relay(ended)
        }
    }
}

/// The server's last steps before exec.
struct Server<'a> {
    /// The init that forked the server (as the server sees pids).
    init_pid: Pid,
    plan: &'a InitPlan,
    layers: Layers,
    ruleset: Option<landlock::RulesetCreated>,
    filters: Option<(seccompiler::BpfProgram, seccompiler::BpfProgram)>,
    old_mask: &'a SigSet,
}

/// Empties the bounding set (needs CAP_SETPCAP: fine to fail without it,
/// there is then nothing to drop) and the ambient set.
fn drop_capabilities() {
    let last = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse::<libc::c_ulong>().ok())
        .unwrap_or(40);
    for cap in 0..=last {
        // SAFETY: prctl with integer arguments only.
        unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
    }
    // SAFETY: prctl with integer arguments only.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
}

impl Server<'_> {
    fn prepare(mut self) -> Result<Layers, InitError> {
        sigprocmask(SigmaskHow::SIG_SETMASK, Some(self.old_mask), None)
            .step("restoring the signal mask")?;
        drop_capabilities();
        if let UserPlan::Switch { uid, gid } = self.plan.user {
            nix::unistd::setgroups(&[]).step("dropping supplementary groups")?;
            let (g, u) = (Gid::from_raw(gid), Uid::from_raw(uid));
            nix::unistd::setresgid(g, g, g).step("switching to the service's gid")?;
            nix::unistd::setresuid(u, u, u).step("switching to the service's uid")?;
        }
        // After the switch: the kernel clears the parent-death signal on a
        // change of credentials. Without a pid namespace it is what ends the
        // server when its init is killed (with meshbox); an init that ended
        // before it was set has left the server to another parent already.
        nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).step("setting the parent-death signal")?;
        if nix::unistd::getppid() != self.init_pid {
            std::process::exit(126);
        }
        // A non-root uid with an empty ambient set keeps no capability past exec.
        self.layers.no_caps = !nix::unistd::geteuid().is_root();
        if let Some(dir) = &self.plan.workdir {
            nix::unistd::chdir(dir.as_path()).step("entering the working directory")?;
        }
        nix::sys::prctl::set_no_new_privs().step("setting no_new_privs")?;
        self.layers.no_new_privs = true;
        if let Some(ruleset) = self.ruleset.take() {
            let (abi, scoped) = fs::enforce(ruleset).step("enforcing Landlock")?;
            self.layers.landlock_abi = abi;
            self.layers.landlock_scoped = scoped;
        }
        if let Some((main, clone3)) = &self.filters {
            seccomp::apply(main, clone3).step("installing the seccomp filter")?;
            self.layers.seccomp = true;
        }
        Ok(self.layers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_round_trip() {
        assert_eq!(parse_status("exit 3"), Some(Ended::Code(3)));
        assert_eq!(parse_status("signal 9\n"), Some(Ended::Signal(9)));
        assert_eq!(parse_status(""), None);
        assert_eq!(parse_status("exit x"), None);
        for e in [Ended::Code(0), Ended::Code(7), Ended::Signal(15)] {
            assert_eq!(parse_status(&status_line(e)), Some(e));
        }
    }
}
