//! Running one install step (`npm install`, `pip install`, `git clone`) and
//! serializing installs of one cache entry across processes.
//!
//! A step runs from an argv array in its own process group with exactly the
//! environment it is given. Its output is bounded (the head of stdout, the
//! tail of stderr). At its deadline the group gets SIGTERM, then SIGKILL
//! [`KILL_AFTER`] later; when the step's future is dropped (a cancelled
//! deploy, an undeploy during an install) the group is killed at once; when
//! the step ends, what it left behind in its group is killed too.
//! Cache-entry locks are advisory file locks taken by polling, so waiting
//! never blocks the async runtime and stops when the waiter is dropped.

use std::collections::BTreeMap;
use std::fs::{File, TryLockError};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::AcquireError;

/// Grace between SIGTERM and SIGKILL of a step that ran out of time.
pub const KILL_AFTER: Duration = Duration::from_secs(2);
/// Most stdout kept (answers like `npm view --json` are small).
const MAX_STDOUT: usize = 8 << 20;
/// Most stderr kept: the tail, for error messages.
const MAX_STDERR: usize = 64 << 10;
/// How often a waiter retries a held cache-entry lock.
const LOCK_POLL: Duration = Duration::from_millis(100);

/// One step to run.
pub struct Step<'a> {
    /// What it is, for messages (`npm install x@1`).
    pub what: &'a str,
    pub argv: &'a [&'a str],
    pub cwd: Option<&'a Path>,
    pub env: &'a BTreeMap<String, String>,
    pub timeout: Duration,
}

/// Kills a process group when dropped.
struct Group(i32);

impl Group {
    fn signal(&self, sig: nix::sys::signal::Signal) {
        crate::model::signal_group(self.0, sig);
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGKILL);
    }
}

/// Reads all of `r`, keeping at most `cap` bytes: the first ones, or the
/// last ones when `tail`.
async fn read_bounded(mut r: impl AsyncRead + Unpin, cap: usize, tail: bool) -> Vec<u8> {
    let mut kept = Vec::new();
    let mut chunk = vec![0u8; 16 << 10];
    loop {
        let n = match r.read(&mut chunk).await {
            Ok(0) | Err(_) => return kept,
            Ok(n) => n,
        };
        if tail {
            kept.extend_from_slice(&chunk[..n]);
            if kept.len() > 2 * cap {
                kept.drain(..kept.len() - cap);
            }
        } else if kept.len() < cap {
            let take = n.min(cap - kept.len());
            kept.extend_from_slice(&chunk[..take]);
        }
    }
}

fn cut_tail(mut v: Vec<u8>, cap: usize) -> Vec<u8> {
    if v.len() > cap {
        v.drain(..v.len() - cap);
    }
    v
}

/// Runs `step`: its stdout on success, its stderr tail in the error.
pub async fn run(step: Step<'_>) -> Result<Vec<u8>, AcquireError> {
    let Some((program, rest)) = step.argv.split_first() else {
        return Err(AcquireError::Install {
            what: step.what.to_owned(),
            status: "empty argv".into(),
            tail: String::new(),
        });
    };
    let mut cmd = Command::new(program);
    cmd.args(rest)
        .env_clear()
        .envs(step.env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
    if let Some(dir) = step.cwd {
        cmd.current_dir(dir);
    }
    let mut child = cmd.spawn().map_err(|e| AcquireError::MissingTool {
        tool: (*program).to_owned(),
        hint: format!("{} needs it ({e})", step.what),
    })?;
    let group = Group(child.id().and_then(|p| i32::try_from(p).ok()).unwrap_or(0));
    let mut readers = JoinSet::new();
    if let Some(out) = child.stdout.take() {
        readers.spawn(async move { (false, read_bounded(out, MAX_STDOUT, false).await) });
    }
    if let Some(err) = child.stderr.take() {
        readers.spawn(async move { (true, read_bounded(err, MAX_STDERR, true).await) });
    }
    let deadline = Instant::now() + step.timeout;
    let status: std::io::Result<ExitStatus> = tokio::select! {
        s = child.wait() => s,
        () = tokio::time::sleep_until(deadline) => {
            group.signal(nix::sys::signal::Signal::SIGTERM);
            if tokio::time::timeout(KILL_AFTER, child.wait()).await.is_err() {
                group.signal(nix::sys::signal::Signal::SIGKILL);
                let _ = child.wait().await;
            }
            drop(group);
            return Err(AcquireError::InstallTimeout {
                what: step.what.to_owned(),
                secs: step.timeout.as_secs(),
            });
        }
    };
    // Whatever the step left running in its group goes with it; then the
    // pipes close (a process that left the group gets a short grace).
    drop(group);
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let _ = tokio::time::timeout(KILL_AFTER, async {
        while let Some(Ok((is_err, bytes))) = readers.join_next().await {
            if is_err {
                err = cut_tail(bytes, MAX_STDERR);
            } else {
                out = bytes;
            }
        }
    })
    .await;
    match status {
        Ok(s) if s.success() => Ok(out),
        Ok(s) => {
            let mut t = super::tail(&err);
            if t.is_empty() {
                t = super::tail(&out);
            }
            Err(AcquireError::Install {
                what: step.what.to_owned(),
                status: match (s.code(), std::os::unix::process::ExitStatusExt::signal(&s)) {
                    (Some(c), _) => format!("exit code {c}"),
                    (None, Some(sig)) => format!("killed by signal {sig}"),
                    _ => "killed".into(),
                },
                tail: t,
            })
        }
        Err(e) => Err(AcquireError::Install {
            what: step.what.to_owned(),
            status: "wait failed".into(),
            tail: e.to_string(),
        }),
    }
}

/// An exclusive lock on one cache entry, shared by every meshbox process on
/// the cache; released when dropped.
#[derive(Debug)]
pub struct EntryLock {
    _file: File,
}

/// Locks the cache entry `key` under `dir`, waiting at most `wait` for
/// another install of it (in this process or another) to finish.
pub async fn lock_entry(dir: &Path, key: &str, wait: Duration) -> Result<EntryLock, AcquireError> {
    let path: PathBuf = dir.join(format!("{}.lock", super::fnv(key)));
    let io = |source| AcquireError::Read {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io)?;
    let deadline = Instant::now() + wait;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(EntryLock { _file: file }),
            Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                tokio::time::sleep(LOCK_POLL).await;
            }
            Err(TryLockError::WouldBlock) => {
                return Err(AcquireError::InstallTimeout {
                    what: format!("waiting for another install of {key}"),
                    secs: wait.as_secs(),
                })
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> BTreeMap<String, String> {
        BTreeMap::from([("PATH".to_owned(), "/usr/bin:/bin".to_owned())])
    }

    #[tokio::test]
    async fn output_is_bounded_and_failures_carry_the_stderr_tail() {
        let env = env();
        let out = run(Step {
            what: "big",
            argv: &["sh", "-c", "head -c 20000000 /dev/zero; echo done >&2"],
            cwd: None,
            env: &env,
            timeout: Duration::from_secs(30),
        })
        .await
        .unwrap();
        assert_eq!(out.len(), MAX_STDOUT);
        let e = run(Step {
            what: "noisy",
            argv: &[
                "sh",
                "-c",
                "head -c 1000000 /dev/zero >&2; echo; echo the reason >&2; exit 3",
            ],
            cwd: None,
            env: &env,
            timeout: Duration::from_secs(30),
        })
        .await
        .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("exit code 3") && msg.ends_with("the reason"),
            "{msg:.200}"
        );
    }

    #[tokio::test]
    async fn the_environment_is_exactly_the_given_one() {
        let mut env = env();
        env.insert("ONLY".into(), "this".into());
        let out = run(Step {
            what: "env",
            argv: &["env"],
            cwd: None,
            env: &env,
            timeout: Duration::from_secs(30),
        })
        .await
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        let mut keys: Vec<&str> = text.lines().filter_map(|l| l.split('=').next()).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["ONLY", "PATH"]);
    }

    #[tokio::test]
    async fn entry_locks_exclude_each_other_and_time_out() {
        let d = tempfile::tempdir().unwrap();
        let held = lock_entry(d.path(), "npm:x@1", Duration::from_secs(1))
            .await
            .unwrap();
        let e = lock_entry(d.path(), "npm:x@1", Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("another install of npm:x@1"), "{e}");
        // Another entry is independent.
        lock_entry(d.path(), "npm:y@1", Duration::from_millis(300))
            .await
            .unwrap();
        drop(held);
        lock_entry(d.path(), "npm:x@1", Duration::from_millis(300))
            .await
            .unwrap();
    }
}
