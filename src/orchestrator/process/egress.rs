//! Egress of an allowlisted process sandbox. The server lives in a network
//! namespace of its own whose only interface is loopback; the init listens
//! on `127.0.0.1:PORT` there and forwards each connection to a unix socket
//! on which meshbox serves the egress proxy ([`crate::proxy::serve_unix`])
//! with the spec's allowlist. `HTTP(S)_PROXY` point the server at it. A
//! listener on the host's own loopback is out of reach: the sandbox's
//! loopback is another one, and the proxy refuses local upstreams.
//!
//! Sandbox side (`loopback_up`, `forward`) runs in the init only; host
//! side (`HostProxy`) in meshbox.

use std::io;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::proxy::{Rule, Upstreams};

/// The port the forwarder listens on inside the sandbox.
pub const FORWARD_PORT: u16 = 3128;
/// Most connections forwarded at once per sandbox.
const MAX_FORWARDED: usize = 128;
/// Stack of a forwarding thread: it only copies bytes.
const THREAD_STACK: usize = 64 * 1024;

/// Brings the namespace's loopback interface up.
pub fn loopback_up() -> io::Result<()> {
    // SAFETY: a plain socket call; the fd is closed below.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the ifreq we own.
    let res = unsafe {
        if libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut req) < 0 {
            -1
        } else {
            req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            libc::ioctl(sock, libc::SIOCSIFFLAGS, &req)
        }
    };
    let err = io::Error::last_os_error();
    // SAFETY: closing the socket we opened.
    unsafe { libc::close(sock) };
    if res < 0 {
        return Err(err);
    }
    Ok(())
}

/// The forwarder's listener on the sandbox's loopback (bound before the
/// server starts, so its first connection finds it).
pub fn bind_forwarder(port: u16) -> io::Result<TcpListener> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port))
}

fn pump(mut from: impl io::Read, mut to: impl io::Write, done: impl FnOnce()) {
    let _ = io::copy(&mut from, &mut to);
    done();
}

/// Forwards every connection on `listener` to the proxy's unix socket, on
/// threads of their own; returns at once.
pub fn forward(listener: TcpListener, socket: PathBuf) -> io::Result<()> {
    let live = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .stack_size(THREAD_STACK)
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(tcp) = conn else { continue };
                if live.load(Ordering::Relaxed) >= MAX_FORWARDED {
                    continue; // dropped: the client sees a reset
                }
                if let Err(e) = forward_one(tcp, &socket, live.clone()) {
                    eprintln!("meshbox-egress: {e}");
                }
            }
        })?;
    Ok(())
}

fn forward_one(tcp: TcpStream, socket: &Path, live: Arc<AtomicUsize>) -> io::Result<()> {
    let unix = UnixStream::connect(socket)?;
    live.fetch_add(1, Ordering::Relaxed);
    let (tcp_r, unix_w) = (tcp.try_clone()?, unix.try_clone()?);
    let (tcp_w, unix_r) = (tcp, unix);
    let up = {
        let unix_w = unix_w.try_clone()?;
        move || {
            let _ = unix_w.shutdown(std::net::Shutdown::Write);
        }
    };
    std::thread::Builder::new()
        .stack_size(THREAD_STACK)
        .spawn(move || pump(tcp_r, unix_w, up))?;
    std::thread::Builder::new()
        .stack_size(THREAD_STACK)
        .spawn(move || {
            let down = {
                let t = tcp_w.try_clone();
                move || {
                    if let Ok(t) = t {
                        let _ = t.shutdown(std::net::Shutdown::Write);
                    }
                }
            };
            pump(unix_r, tcp_w, down);
            live.fetch_sub(1, Ordering::Relaxed);
        })?;
    Ok(())
}

/// The host side: meshbox's proxy for one sandbox, on a unix socket in a
/// directory of its own; stops (and removes the directory) when dropped.
pub struct HostProxy {
    pub socket: PathBuf,
    dir: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl HostProxy {
    /// Binds `<dir>/egress.sock` and serves `rules` on it. `owner`: the uid
    /// and gid that may connect (the service's own, when meshbox is root).
    pub fn start(
        dir: PathBuf,
        rules: Vec<Rule>,
        owner: Option<(u32, u32)>,
        label: String,
    ) -> io::Result<HostProxy> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(&dir)?;
        let socket = dir.join("egress.sock");
        let _ = std::fs::remove_file(&socket);
        let listener = tokio::net::UnixListener::bind(&socket)?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&socket, Some(uid), Some(gid))?;
            std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711))?;
        }
        let task = tokio::spawn(async move {
            let _ = crate::proxy::serve_unix(
                listener,
                rules,
                Upstreams::NotLocal,
                MAX_FORWARDED,
                label,
            )
            .await;
        });
        Ok(HostProxy { socket, dir, task })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for HostProxy {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The proxy variables a server in an allowlisted sandbox gets.
pub fn proxy_env(port: u16) -> Vec<(String, String)> {
    let url = format!("http://127.0.0.1:{port}");
    [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "http_proxy",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
    ]
    .into_iter()
    .map(|k| (k.to_owned(), url.clone()))
    .chain(
        ["NO_PROXY", "no_proxy"]
            .into_iter()
            .map(|k| (k.to_owned(), String::new())),
    )
    .collect()
}
