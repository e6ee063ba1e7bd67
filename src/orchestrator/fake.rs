//! A backend for the unit lane: each sandbox is an in-process scripted MCP
//! server over duplex pipes. Every spawn, stop, kill, adopt, release, sweep
//! and install is recorded with its (paused-clock) time, and delays, errors
//! and server behaviours can be injected.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::watch;
use tokio::time::Instant;

use super::{
    Capabilities, Completed, Enforced, ExitReason, Orchestrator, OrchestratorError, Sandbox,
    SandboxHandle, SandboxIo, SandboxSpec, ServiceKey,
};

/// How a fake server behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Script {
    /// Handshake era; answers everything.
    Healthy,
    /// Stateless era: answers `server/discover`, refuses `initialize`.
    Stateless,
    /// Exits with code 1 right after answering tools/list.
    CrashAfterHandshake,
    /// Never answers ping.
    Deaf,
    /// Never answers anything.
    Silent,
    /// Exits when the first message is not `initialize` (old servers).
    ExitOnProbe,
    /// Stops reading its stdin after the handshake.
    StopReading,
    /// Closes its stdout after the handshake but keeps running.
    CloseStdout,
    /// The readiness tool `ready` answers isError.
    ReadinessFails,
}

/// What the backend was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Spawn {
        owner: ServiceKey,
        argv: Vec<String>,
    },
    Stop,
    Kill,
    Adopt(ServiceKey),
    Release(ServiceKey),
    /// A sandbox whose server exited let go of what it held.
    Released,
    Sweep(Vec<ServiceKey>),
    InstallStarted,
    InstallDropped,
    InstallDone,
}

/// The log of what the fake was asked, shared with its handles.
pub type Records = Arc<Mutex<Vec<(Instant, Record)>>>;

pub struct Fake {
    scripts: Mutex<VecDeque<Script>>,
    default_script: Mutex<Script>,
    pub records: Records,
    /// Each spawn takes this long first (cancellable).
    pub spawn_delay: Mutex<Duration>,
    /// The next spawns fail with this.
    pub spawn_failures: AtomicUsize,
    /// The next spawn finds its cache volume gone.
    pub volume_missing: AtomicBool,
    /// Installs run in sandboxes and take this long.
    pub sandboxed_install: Option<Duration>,
    /// Sandboxes whose server has not exited.
    pub alive: Arc<AtomicUsize>,
    /// A sandbox whose server exited takes this long to let go of what it
    /// held (a process sandbox's teardown).
    pub release_delay: Mutex<Duration>,
}

impl Fake {
    pub fn new(script: Script) -> Arc<Fake> {
        Arc::new(Fake {
            scripts: Mutex::new(VecDeque::new()),
            default_script: Mutex::new(script),
            records: Records::default(),
            spawn_delay: Mutex::new(Duration::ZERO),
            spawn_failures: AtomicUsize::new(0),
            volume_missing: AtomicBool::new(false),
            sandboxed_install: None,
            alive: Arc::new(AtomicUsize::new(0)),
            release_delay: Mutex::new(Duration::ZERO),
        })
    }

    pub fn with_sandboxed_install(script: Script, install: Duration) -> Arc<Fake> {
        let mut f = Arc::try_unwrap(Fake::new(script)).ok().expect("fresh");
        f.sandboxed_install = Some(install);
        Arc::new(f)
    }

    /// The next spawns run these scripts, then the default.
    pub fn then(&self, scripts: &[Script]) {
        self.scripts.lock().unwrap().extend(scripts);
    }

    pub fn set_default(&self, script: Script) {
        *self.default_script.lock().unwrap() = script;
    }

    fn record(&self, r: Record) {
        self.records.lock().unwrap().push((Instant::now(), r));
    }

    pub fn count(&self, pred: impl Fn(&Record) -> bool) -> usize {
        self.records
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, r)| pred(r))
            .count()
    }

    pub fn spawns(&self) -> Vec<Instant> {
        self.records
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, r)| matches!(r, Record::Spawn { .. }))
            .map(|(t, _)| *t)
            .collect()
    }
}

struct FakeHandle {
    exit: watch::Sender<Option<ExitReason>>,
    records: Records,
    /// When the sandbox has let go of what it held: this long after its exit.
    release_delay: Duration,
}

impl FakeHandle {
    fn end(&self, reason: ExitReason) {
        self.exit.send_if_modified(|r| {
            let first = r.is_none();
            if first {
                *r = Some(reason);
            }
            first
        });
    }

    fn record(&self, r: Record) {
        self.records.lock().unwrap().push((Instant::now(), r));
    }
}

#[async_trait]
impl SandboxHandle for FakeHandle {
    async fn stop(&self, _grace: Duration) -> ExitReason {
        self.record(Record::Stop);
        self.end(ExitReason {
            code: Some(0),
            ..Default::default()
        });
        self.exit.borrow().clone().unwrap_or_default()
    }
    fn kill(&self) {
        self.record(Record::Kill);
        self.end(ExitReason {
            signal: Some(9),
            ..Default::default()
        });
    }
    async fn released(&self, limit: Duration) {
        let _ = self.exit.subscribe().wait_for(Option::is_some).await;
        tokio::time::sleep(self.release_delay.min(limit)).await;
        self.record(Record::Released);
    }
}

/// Drops of an install future are recorded.
struct InstallGuard<'a> {
    fake: &'a Fake,
    done: bool,
}

impl Drop for InstallGuard<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.fake.record(Record::InstallDropped);
        }
    }
}

#[async_trait]
impl Orchestrator for Fake {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            name: "fake",
            images: false,
            sandboxed_install: self.sandboxed_install.is_some(),
            detach: false,
        }
    }

    fn check(&self, _: &SandboxSpec) -> Result<Enforced, OrchestratorError> {
        Ok(Enforced::default())
    }

    async fn run_to_completion(
        &self,
        _spec: SandboxSpec,
        _timeout: Duration,
    ) -> Result<Completed, OrchestratorError> {
        self.record(Record::InstallStarted);
        let mut guard = InstallGuard {
            fake: self,
            done: false,
        };
        tokio::time::sleep(self.sandboxed_install.unwrap_or_default()).await;
        guard.done = true;
        self.record(Record::InstallDone);
        Ok(Completed {
            exit: ExitReason {
                code: Some(0),
                ..Default::default()
            },
            stdout: br#"{"argv":["fake-server"],"workdir":"/cache/x","runtime":"node"}"#.to_vec(),
            stderr: Vec::new(),
        })
    }

    async fn release(&self, owner: &ServiceKey) {
        self.record(Record::Release(owner.clone()));
    }

    async fn sweep(&self, keep: &[ServiceKey]) {
        self.record(Record::Sweep(keep.to_vec()));
    }

    async fn adopt(&self, spec: &SandboxSpec) -> Option<Sandbox> {
        self.record(Record::Adopt(spec.owner.clone()));
        None
    }

    async fn spawn(&self, spec: SandboxSpec) -> Result<Sandbox, OrchestratorError> {
        let delay = *self.spawn_delay.lock().unwrap();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        self.record(Record::Spawn {
            owner: spec.owner.clone(),
            argv: spec.argv.clone(),
        });
        if self.volume_missing.swap(false, Ordering::SeqCst) {
            let volume = spec
                .mounts
                .iter()
                .find_map(|m| match &m.source {
                    super::MountSource::Volume(v) => Some(v.clone()),
                    super::MountSource::Host(_) => None,
                })
                .expect("a sandboxed install mounts its cache volume");
            return Err(OrchestratorError::MissingVolume { volume });
        }
        if self
            .spawn_failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(OrchestratorError::Spawn {
                program: spec.argv.first().cloned().unwrap_or_default(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            });
        }
        let script = self
            .scripts
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or(*self.default_script.lock().unwrap());
        let (client_w, server_r) = tokio::io::duplex(64 * 1024);
        let (server_w, client_r) = tokio::io::duplex(64 * 1024);
        let (_stderr_w, stderr_r) = tokio::io::duplex(64);
        let (exit_tx, exit_rx) = watch::channel(None);
        self.alive.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(serve(
            script,
            server_r,
            server_w,
            exit_tx.clone(),
            self.alive.clone(),
        ));
        Ok(Sandbox {
            io: SandboxIo {
                stdin: Box::pin(client_w),
                stdout: Box::pin(client_r),
                stderr: Box::pin(stderr_r),
            },
            exit: exit_rx,
            handle: Box::new(FakeHandle {
                exit: exit_tx,
                records: self.records.clone(),
                release_delay: *self.release_delay.lock().unwrap(),
            }),
            pid: Some(4242),
            container_id: None,
            enforced: Enforced::default(),
            isolation: Default::default(),
        })
    }
}

async fn serve(
    script: Script,
    server_r: tokio::io::DuplexStream,
    server_w: tokio::io::DuplexStream,
    exit: watch::Sender<Option<ExitReason>>,
    alive: Arc<AtomicUsize>,
) {
    let mut lines = BufReader::new(server_r).lines();
    let mut out = Some(server_w);
    let mut exit_rx = exit.subscribe();
    let first = AtomicBool::new(true);
    let end = |code: i32| {
        exit.send_if_modified(|r| {
            let f = r.is_none();
            if f {
                *r = Some(ExitReason {
                    code: Some(code),
                    ..Default::default()
                });
            }
            f
        });
    };
    loop {
        let line = tokio::select! {
            l = lines.next_line() => l,
            _ = exit_rx.wait_for(Option::is_some) => break,
        };
        let Ok(Some(line)) = line else {
            end(0);
            break;
        };
        let msg: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        let method = msg["method"].as_str().unwrap_or("").to_owned();
        let was_first = first.swap(false, Ordering::SeqCst);
        if script == Script::ExitOnProbe && was_first && method != "initialize" {
            end(1);
            break;
        }
        if msg.get("id").is_none() || script == Script::Silent {
            continue;
        }
        let id = msg["id"].clone();
        let reply = |result: Value| json!({"jsonrpc": "2.0", "id": id, "result": result});
        let error = |code: i64, m: &str| json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": m}});
        let stateless = script == Script::Stateless;
        let answer = match method.as_str() {
            "initialize" if stateless => error(-32601, "initialize is gone"),
            "initialize" => reply(
                json!({"protocolVersion": "2025-06-18", "capabilities": {"tools": {}}, "serverInfo": {"name": "fake"}}),
            ),
            "server/discover" if stateless => reply(
                json!({"supportedVersions": ["2026-07-28"], "capabilities": {"tools": {}}, "serverInfo": {"name": "fake-modern"}}),
            ),
            "server/discover" => error(-32601, "method not found"),
            "tools/list" => reply(json!({"tools": [{"name": "t"}, {"name": "ready"}]})),
            "ping" if script == Script::Deaf => continue,
            "ping" => reply(json!({})),
            "tools/call" => match msg["params"]["name"].as_str() {
                Some("rpc_error") => error(-32000, "boom"),
                Some("ready") if script == Script::ReadinessFails => reply(
                    json!({"isError": true, "content": [{"type": "text", "text": "db down"}]}),
                ),
                _ => reply(json!({"content": [{"type": "text", "text": "ok"}]})),
            },
            _ => error(-32601, "method not found"),
        };
        let Some(w) = out.as_mut() else { continue };
        if w.write_all(format!("{answer}\n").as_bytes()).await.is_err() {
            end(0);
            break;
        }
        if method == "tools/list" {
            match script {
                Script::CrashAfterHandshake => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    end(1);
                    break;
                }
                Script::StopReading => {
                    // Never reads again; lives until killed.
                    let _ = exit_rx.wait_for(Option::is_some).await;
                    break;
                }
                Script::CloseStdout => out = None,
                _ => {}
            }
        }
    }
    alive.fetch_sub(1, Ordering::SeqCst);
}
