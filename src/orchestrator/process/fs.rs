//! The server's filesystem: a mount namespace that covers the data dir, the
//! invoking user's home and `/tmp` with empty tmpfs mounts (carrying over
//! only the paths the server may see, read-only where they must be), a fresh
//! `/proc` for its pid namespace, and a Landlock ruleset that allows reading
//! the system's directories, the installed source and read-only mounts, and
//! writing only its home, its private `/tmp` and read-write mounts.
//!
//! Runs inside `meshbox sandbox-init` only (a single-threaded process),
//! never in meshbox itself.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use landlock::{
    Access, AccessFs, CompatLevel, Compatible, PathBeneath, PathFd, Ruleset, RulesetAttr,
    RulesetCreated, RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};
use nix::mount::{mount, MsFlags};

use super::plan::{FsPlan, Visible};

/// The Landlock ABI whose rights are requested (and tested).
pub const LANDLOCK_ABI: ABI = ABI::V5;
/// Below this ABI (truncate rights), the filesystem is not claimed isolated.
pub const MIN_LANDLOCK_ABI: u8 = 3;

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::ErrorKind::InvalidInput.into())
}

/// A detached copy of the mount tree at `path` (open_tree with OPEN_TREE_CLONE).
fn clone_tree(path: &Path) -> io::Result<OwnedFd> {
    let c = cstr(path)?;
    // SAFETY: open_tree reads a NUL-terminated path and returns a new fd or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            c.as_ptr(),
            (libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC) as libc::c_uint
                | libc::AT_RECURSIVE as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just gave us this fd; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Makes a detached tree read-only, recursively.
fn make_read_only(tree: &OwnedFd) -> io::Result<()> {
    let attr = libc::mount_attr {
        attr_set: libc::MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    let empty = c"";
    // SAFETY: mount_setattr reads `attr` (its size is passed) and the empty path.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            empty.as_ptr(),
            (libc::AT_EMPTY_PATH | libc::AT_RECURSIVE) as libc::c_uint,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The process holding an idmapping user namespace. It shares this
/// process's memory and only sleeps; [`NsHolder::release`] kills it, and
/// dropping the holder reaps it (by then it is long gone, so nothing waits
/// on its wake-up).
struct NsHolder {
    pid: nix::unistd::Pid,
    released: bool,
    /// The helper's stack: freed only once the helper is reaped.
    _stack: Box<[u8]>,
}

impl NsHolder {
    fn release(&mut self) {
        if !self.released {
            let _ = nix::sys::signal::kill(self.pid, nix::sys::signal::Signal::SIGKILL);
            self.released = true;
        }
    }
}

impl Drop for NsHolder {
    fn drop(&mut self) {
        self.release();
        let _ = nix::sys::wait::waitpid(self.pid, None);
    }
}

/// A user namespace mapping `from` (an owner on disk) onto `to` (the
/// service), made by cloning a helper straight into it (no fork of this
/// process's page tables, no round trip to learn it exists); its fd
/// idmaps mounts.
fn idmap_userns(from: (u32, u32), to: (u32, u32)) -> io::Result<(OwnedFd, NsHolder)> {
    use nix::sched::CloneFlags;
    let mut stack = vec![0u8; 16 * 1024].into_boxed_slice();
    let sleep = Box::new(|| loop {
        // SAFETY: pause(2) only; the helper never returns from here.
        unsafe { libc::pause() };
    });
    // SAFETY: with CLONE_VM the helper runs `sleep` on its own stack in this
    // (single-threaded) process's memory: one syscall in a loop, nothing
    // allocated, no lock taken; the stack outlives it (NsHolder).
    let pid = unsafe {
        nix::sched::clone(
            sleep,
            &mut stack,
            CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_VM,
            Some(libc::SIGCHLD),
        )
    }
    .map_err(io::Error::from)?;
    let holder = NsHolder {
        pid,
        released: false,
        _stack: stack,
    };
    let pid = pid.as_raw();
    std::fs::write(
        format!("/proc/{pid}/uid_map"),
        format!("{} {} 1", from.0, to.0),
    )?;
    std::fs::write(
        format!("/proc/{pid}/gid_map"),
        format!("{} {} 1", from.1, to.1),
    )?;
    let f = std::fs::File::open(format!("/proc/{pid}/ns/user"))?;
    Ok((OwnedFd::from(f), holder))
}

/// Idmaps a detached tree through `userns`.
fn idmap(tree: &OwnedFd, userns: &OwnedFd) -> io::Result<()> {
    let attr = libc::mount_attr {
        attr_set: libc::MOUNT_ATTR_IDMAP,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.as_raw_fd() as u64,
    };
    let empty = c"";
    // SAFETY: mount_setattr reads `attr` (its size is passed) and the empty path.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Attaches a detached tree at `path`.
fn attach(tree: &OwnedFd, path: &Path) -> io::Result<()> {
    let c = cstr(path)?;
    let empty = c"";
    // SAFETY: move_mount reads two NUL-terminated paths.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::MOVE_MOUNT_F_EMPTY_PATH as libc::c_uint,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A failed step of the filesystem setup.
#[derive(Debug, thiserror::Error)]
#[error("{step} `{}`", path.display())]
pub struct MountError {
    pub step: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

fn at<'a>(step: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> MountError + 'a {
    move |source| MountError {
        step,
        path: path.to_path_buf(),
        source,
    }
}

/// The outermost of `dirs` (those not inside another one), existing ones only.
fn outermost(dirs: &[PathBuf]) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = dirs.iter().filter(|d| d.is_dir()).cloned().collect();
    v.sort();
    v.dedup();
    let all = v.clone();
    v.retain(|d| !all.iter().any(|o| o != d && d.starts_with(o)));
    v
}

/// What the mount setup achieved.
#[derive(Debug, Default, Clone)]
pub struct Mounted {
    pub proc: bool,
    pub private_tmp: bool,
    /// Visible paths that got their private writable layer.
    pub overlaid: Vec<PathBuf>,
}

/// Why a private layer could not be built (the path then stays read-only).
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("a path with `:` or `\\` cannot be an overlay layer")]
    Unescapable,
    #[error("{step}")]
    Sys {
        step: &'static str,
        #[source]
        source: io::Error,
    },
}

fn sys(step: &'static str) -> impl FnOnce(io::Error) -> LayerError {
    move |source| LayerError::Sys { step, source }
}

/// An overlay of `lower` (a mount of this namespace) with its upper and
/// work directories in `dir`, detached: the server's writes land in `dir`.
/// `userxattr` in a user namespace.
fn overlay(lower: &Path, dir: &Path, userxattr: bool) -> Result<OwnedFd, LayerError> {
    use rustix::mount::{
        fsconfig_create, fsconfig_set_flag, fsconfig_set_string, fsmount, fsopen, FsMountFlags,
        FsOpenFlags, MountAttrFlags,
    };
    let (upper, work) = (dir.join("upper"), dir.join("work"));
    // Layer paths are split at `:` and unescaped at `\`.
    for p in [lower, &upper, &work] {
        let b = p.as_os_str().as_bytes();
        if b.contains(&b':') || b.contains(&b'\\') {
            return Err(LayerError::Unescapable);
        }
    }
    let fs = fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC)
        .map_err(|e| sys("opening an overlay")(e.into()))?;
    let set = |k: &str, v: &Path| {
        fsconfig_set_string(&fs, k, v).map_err(|e| sys("configuring the overlay")(e.into()))
    };
    set("lowerdir", lower)?;
    set("upperdir", &upper)?;
    set("workdir", &work)?;
    if userxattr {
        fsconfig_set_flag(&fs, "userxattr")
            .map_err(|e| sys("configuring the overlay")(e.into()))?;
    }
    fsconfig_create(&fs).map_err(|e| sys("creating the overlay")(e.into()))?;
    fsmount(
        &fs,
        FsMountFlags::FSMOUNT_CLOEXEC,
        MountAttrFlags::MOUNT_ATTR_NOSUID | MountAttrFlags::MOUNT_ATTR_NODEV,
    )
    .map_err(|e| sys("mounting the overlay")(e.into()))
}

/// The private writable layer over visible path `v` (a read-only bind): its
/// clone, idmapped to the service (`to`) when another uid owns it, is
/// attached at its path (the overlay's lower layer must be a mount of this
/// namespace); the overlay on top, detached, is returned.
fn private_layer(
    v: &Visible,
    dir: &Path,
    to: Option<(u32, u32)>,
    holders: &mut Vec<NsHolder>,
) -> Result<OwnedFd, LayerError> {
    use std::os::unix::fs::MetadataExt;
    let lower = clone_tree(&v.path).map_err(sys("cloning the lower layer"))?;
    make_read_only(&lower).map_err(sys("making the lower layer read-only"))?;
    if let Some(to) = to {
        let meta = std::fs::metadata(&v.path).map_err(sys("inspecting the lower layer"))?;
        let owner = (meta.uid(), meta.gid());
        if owner != to {
            let (ns, mut holder) =
                idmap_userns(owner, to).map_err(sys("idmapping the lower layer"))?;
            let mapped = idmap(&lower, &ns);
            holder.release();
            holders.push(holder);
            mapped.map_err(sys("idmapping the lower layer"))?;
        }
    }
    attach(&lower, &v.path).map_err(sys("attaching the lower layer"))?;
    let userxattr = !nix::unistd::geteuid().is_root();
    let made = overlay(&v.path, dir, userxattr);
    if made.is_err() {
        let _ = nix::mount::umount2(&v.path, nix::mount::MntFlags::MNT_DETACH);
    }
    made
}

/// Builds the server's view in the (new) mount namespace. `new_proc`: mount
/// a `/proc` for the new pid namespace.
pub fn setup_mounts(plan: &FsPlan, new_proc: bool) -> Result<Mounted, MountError> {
    let root = Path::new("/");
    // Nothing we mount propagates back to the host.
    mount(
        None::<&str>,
        root,
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        None::<&str>,
    )
    .map_err(|e| at("making the root a slave", root)(e.into()))?;
    let mut out = Mounted::default();
    // The pid namespace's own /proc first: helpers forked below are found
    // there by the pids this namespace gives them.
    if new_proc {
        let proc_ = Path::new("/proc");
        out.proc = mount(
            Some("proc"),
            proc_,
            Some("proc"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None::<&str>,
        )
        .is_ok();
    }
    let covers = outermost(&plan.cover);
    // Visible paths are cloned before anything is covered: shortest first,
    // so an inner one is attached on top of an outer one.
    let mut visible: Vec<&Visible> = plan
        .visible
        .iter()
        .filter(|v| v.bind && (!v.write || covers.iter().any(|c| v.path.starts_with(c))))
        .filter(|v| v.path.exists())
        .collect();
    visible.sort_by_key(|v| v.path.as_os_str().len());
    let mut trees = Vec::with_capacity(visible.len());
    // Idmap helpers, reaped when the mounts are done.
    let mut holders = Vec::new();
    for v in visible {
        if let (false, Some(dir)) = (v.write, &v.overlay) {
            match private_layer(v, dir, plan.idmap_to, &mut holders) {
                Ok(tree) => {
                    out.overlaid.push(v.path.clone());
                    trees.push((v, tree, true));
                    continue;
                }
                // Read-only, as without a layer; the report says so.
                Err(e) => eprintln!(
                    "meshbox-sandbox: no private layer over `{}`: {}",
                    v.path.display(),
                    e
                ),
            }
        }
        let tree = clone_tree(&v.path).map_err(at("cloning", &v.path))?;
        if !v.write {
            make_read_only(&tree).map_err(at("making read-only", &v.path))?;
        } else if let Some(to) = plan.idmap_to {
            use std::os::unix::fs::MetadataExt;
            let meta = std::fs::metadata(&v.path).map_err(at("inspecting", &v.path))?;
            let owner = (meta.uid(), meta.gid());
            if owner != to {
                let (ns, mut holder) = idmap_userns(owner, to).map_err(at("idmapping", &v.path))?;
                let mapped = idmap(&tree, &ns);
                holder.release();
                holders.push(holder);
                mapped.map_err(at("idmapping", &v.path))?;
            }
        }
        trees.push((v, tree, v.path.is_dir()));
    }
    for c in &covers {
        let scratch = plan.scratch.iter().any(|s| s == c);
        let opts = if scratch {
            format!("mode=1777,size={}m", plan.scratch_mb.max(1))
        } else {
            "mode=755,size=1m".to_owned()
        };
        mount(
            Some("tmpfs"),
            c.as_path(),
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(opts.as_str()),
        )
        .map_err(|e| at("covering", c)(e.into()))?;
        if scratch && c == Path::new("/tmp") {
            out.private_tmp = true;
        }
    }
    for (v, tree, is_dir) in &trees {
        if !v.path.exists() {
            if *is_dir {
                std::fs::create_dir_all(&v.path).map_err(at("creating", &v.path))?;
            } else {
                if let Some(parent) = v.path.parent() {
                    std::fs::create_dir_all(parent).map_err(at("creating", parent))?;
                }
                std::fs::File::create(&v.path).map_err(at("creating", &v.path))?;
            }
        }
        attach(tree, &v.path).map_err(at("attaching", &v.path))?;
    }
    // The layers' own directories, last: out of the server's sight.
    for h in &plan.hide {
        if h.is_dir() {
            mount(
                Some("tmpfs"),
                h.as_path(),
                Some("tmpfs"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_RDONLY,
                Some("mode=700,size=4k"),
            )
            .map_err(|e| at("hiding", h)(e.into()))?;
        }
    }
    // Released right after their idmap: gone by now, reaped without a wait.
    drop(holders);
    Ok(out)
}

/// A Landlock ruleset for `plan`, created (not yet enforced); `overlaid`
/// paths (read-only below a private layer) are writable.
pub fn landlock_ruleset(
    plan: &FsPlan,
    overlaid: &[PathBuf],
) -> Result<RulesetCreated, landlock::RulesetError> {
    let abi = LANDLOCK_ABI;
    let read = AccessFs::from_read(abi);
    let all = AccessFs::from_all(abi);
    let device = AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::Truncate | AccessFs::IoctlDev;
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(all)?
        .scope(Scope::from_all(ABI::V6))?
        .create()?;
    for v in &plan.visible {
        let Ok(fd) = PathFd::new(&v.path) else {
            continue; // absent on this host
        };
        let access = if v.write || overlaid.contains(&v.path) {
            all
        } else if v.path.is_dir() {
            read
        } else {
            AccessFs::from_file(abi) & read
        };
        ruleset = ruleset.add_rule(PathBeneath::new(fd, access))?;
    }
    for d in &plan.devices {
        if let Ok(fd) = PathFd::new(d) {
            ruleset = ruleset.add_rule(PathBeneath::new(fd, device))?;
        }
    }
    Ok(ruleset)
}

/// Enforces the ruleset on the calling process: the ABI whose filesystem
/// rights hold (0 when none), and whether signals and abstract sockets are scoped.
pub fn enforce(ruleset: RulesetCreated) -> Result<(u8, bool), landlock::RulesetError> {
    let status = ruleset.restrict_self()?;
    let abi = match status.landlock {
        landlock::LandlockStatus::Available { effective_abi, .. } => effective_abi as u8,
        _ => 0,
    };
    let fs = match status.ruleset {
        RulesetStatus::NotEnforced => 0,
        _ => abi.min(LANDLOCK_ABI as u8),
    };
    Ok((fs, fs > 0 && abi >= ABI::V6 as u8))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outermost_drops_nested_and_missing() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a");
        let b = a.join("b");
        std::fs::create_dir_all(&b).unwrap();
        let got = outermost(&[b.clone(), a.clone(), d.path().join("missing"), a.clone()]);
        assert_eq!(got, vec![a]);
    }
}
