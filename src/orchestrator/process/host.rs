//! What this host lets a process sandbox have, found by trying: at start the
//! backend runs `meshbox sandbox-init` in probe mode (every layer built,
//! nothing exec'd) and keeps the layers that held. Also finds where a
//! server's program and its runtime really live, so a runtime installed
//! under a home (pyenv, nvm) stays readable while the home does not.

use std::path::{Path, PathBuf};

use super::plan::Layers;

/// Which layers the probe got, with the namespaces it asked for.
#[derive(Debug, Clone, Default)]
pub struct Support {
    /// `meshbox sandbox-init` answers at all.
    pub init: bool,
    pub root: bool,
    pub layers: Layers,
    /// Why a stronger configuration was refused, for `doctor`.
    pub notes: Vec<String>,
}

impl Support {
    pub fn describe(&self) -> String {
        if !self.init {
            return format!(
                "no sandbox init ({}): servers run as plain child processes",
                self.notes.join("; ")
            );
        }
        let l = &self.layers;
        let yes = |b: bool| if b { "yes" } else { "no" };
        let user = if self.root {
            "own uid per service"
        } else if l.userns {
            "user namespace"
        } else {
            "meshbox's own uid (no user namespace)"
        };
        let mut s = format!(
            "user: {user}; namespaces: pid {}, mount {}, ipc {}, uts {}, net {}; \
             landlock: {}; seccomp: {}; no_new_privs: {}",
            yes(l.pid),
            yes(l.mount),
            yes(l.ipc),
            yes(l.uts),
            yes(l.net),
            if l.landlock_abi > 0 {
                format!(
                    "ABI {}{}",
                    l.landlock_abi,
                    if l.landlock_scoped {
                        ", signals scoped"
                    } else {
                        ""
                    }
                )
            } else {
                "no".to_owned()
            },
            yes(l.seccomp),
            yes(l.no_new_privs),
        );
        if !self.notes.is_empty() {
            s.push_str(&format!(" ({})", self.notes.join("; ")));
        }
        s
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// `argv0` as exec would find it: a path (relative to `workdir`), or the
/// first executable of that name on `path_env`.
pub fn resolve_program(argv0: &str, path_env: &str, workdir: Option<&Path>) -> Option<PathBuf> {
    if argv0.contains('/') {
        let p = Path::new(argv0);
        let p = match (p.is_absolute(), workdir) {
            (false, Some(w)) => w.join(p),
            _ => p.to_path_buf(),
        };
        return is_executable(&p).then_some(p);
    }
    path_env
        .split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(argv0))
        .find(|p| is_executable(p))
}

/// The interpreter named by a script's `#!` line (through `/usr/bin/env`).
fn shebang(p: &Path, path_env: &str) -> Option<PathBuf> {
    use std::io::Read;
    let mut head = [0u8; 256];
    let n = std::fs::File::open(p).ok()?.read(&mut head).ok()?;
    let line = head[..n].strip_prefix(b"#!")?;
    let line = &line[..line.iter().position(|b| *b == b'\n').unwrap_or(line.len())];
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_whitespace();
    let interp = words.next()?;
    if Path::new(interp).file_name().is_some_and(|f| f == "env") {
        let prog = words.find(|w| !w.starts_with('-'))?;
        return resolve_program(prog, path_env, None);
    }
    Some(PathBuf::from(interp))
}

/// Directories to keep readable so `program` can run although it lives in
/// a hidden place: for each of the program, its real file and its script
/// interpreter that lies under `hidden`, the installation prefix (the
/// parent of its `bin`), or the `bin` itself when the prefix would expose
/// `protect` (meshbox's data dir) or is a hidden root itself.
pub fn runtime_dirs(
    program: &Path,
    path_env: &str,
    hidden: &[PathBuf],
    protect: &[PathBuf],
) -> Vec<PathBuf> {
    let mut files = vec![program.to_path_buf()];
    for _ in 0..3 {
        let last = files.last().cloned().unwrap_or_default();
        if let Ok(real) = last.canonicalize() {
            if real != last {
                files.push(real.clone());
            }
            match shebang(&real, path_env) {
                Some(next) if !files.contains(&next) => files.push(next),
                _ => break,
            }
        } else {
            break;
        }
    }
    let mut out: Vec<PathBuf> = Vec::new();
    for f in files {
        let Ok(real) = f.canonicalize() else { continue };
        let Some(bin) = real.parent() else { continue };
        if !hidden.iter().any(|h| real.starts_with(h)) {
            continue;
        }
        let prefix = bin.parent().filter(|p| {
            !hidden.iter().any(|h| h.starts_with(p)) && !protect.iter().any(|d| d.starts_with(p))
        });
        let dir = prefix.unwrap_or(bin).to_path_buf();
        if !out.iter().any(|o| dir.starts_with(o)) {
            out.retain(|o| !o.starts_with(&dir));
            out.push(dir);
        }
    }
    out
}

/// Marks every descriptor from 3 up close-on-exec: what this process
/// inherited from whoever started it (a supervisor's pipe, a terminal, a
/// file a wrapper opened) must never reach a server, an installer or any
/// other child. Descriptors a child is meant to have are passed explicitly.
pub fn keep_inherited_fds_from_children() {
    let flags = libc::CLOSE_RANGE_CLOEXEC as libc::c_int;
    // SAFETY: a syscall on this process's own descriptor table.
    let done = unsafe { libc::close_range(3, libc::c_uint::MAX, flags) };
    if done == 0 {
        return;
    }
    // Kernels before 5.11: one descriptor at a time (collected first: the
    // directory's own descriptor is open while it is read).
    let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: sets a flag; a descriptor closed meanwhile fails with EBADF.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn exe(p: &Path, body: &str) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, body).unwrap();
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn a_runtime_under_a_home_is_kept_by_its_prefix() {
        let d = tempfile::tempdir().unwrap();
        let home = d.path().join("home");
        let data = home.join(".local/share/meshbox");
        let python = home.join(".pyenv/versions/3.11/bin/python3.11");
        exe(&python, "\x7fELF");
        // A venv's python is a symlink to the base interpreter.
        let venv = data.join("cache/x/.venv/bin");
        std::fs::create_dir_all(&venv).unwrap();
        std::os::unix::fs::symlink(&python, venv.join("python")).unwrap();
        // A console script's shebang names the venv's python.
        exe(
            &venv.join("tool"),
            &format!("#!{}\nprint()\n", venv.join("python").display()),
        );
        let got = runtime_dirs(
            &venv.join("tool"),
            "/usr/bin",
            &[home.clone(), data.clone()],
            std::slice::from_ref(&data),
        );
        assert!(got.contains(&home.join(".pyenv/versions/3.11")), "{got:?}");
        assert!(
            !got.iter().any(|g| data.starts_with(g)),
            "the data dir leaks: {got:?}"
        );
        // ~/.local/bin/x must not open ~/.local (the data dir is in it).
        let local = home.join(".local/bin/node");
        exe(&local, "\x7fELF");
        let got = runtime_dirs(
            &local,
            "",
            std::slice::from_ref(&home),
            std::slice::from_ref(&data),
        );
        assert_eq!(got, vec![home.join(".local/bin")]);
    }

    #[test]
    fn programs_resolve_like_exec() {
        let d = tempfile::tempdir().unwrap();
        let bin = d.path().join("bin");
        exe(&bin.join("tool"), "#!/bin/sh\n");
        let path = format!("/nonexistent:{}", bin.display());
        assert_eq!(resolve_program("tool", &path, None), Some(bin.join("tool")));
        assert_eq!(resolve_program("missing", &path, None), None);
        assert_eq!(
            resolve_program("./bin/tool", "", Some(d.path())),
            Some(d.path().join("./bin/tool"))
        );
        assert_eq!(
            shebang(&bin.join("tool"), ""),
            Some(PathBuf::from("/bin/sh"))
        );
    }

    #[test]
    fn inherited_descriptors_are_kept_from_children() {
        use nix::fcntl::{fcntl, open, FcntlArg, FdFlag, OFlag};
        let fd = open("/dev/null", OFlag::O_RDONLY, nix::sys::stat::Mode::empty()).unwrap();
        let flags = |fd| FdFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFD).unwrap());
        assert!(!flags(&fd).contains(FdFlag::FD_CLOEXEC));
        keep_inherited_fds_from_children();
        assert!(flags(&fd).contains(FdFlag::FD_CLOEXEC));
    }
}
