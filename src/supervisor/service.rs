//! One supervised service: its lifecycle task, its state and its calls.
//!
//! The lifecycle task is the only writer of the status; API handlers read a
//! snapshot and wait on the phase channel. A service is `running` only after
//! the MCP handshake succeeded, and stays honest about everything else.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{info, instrument, warn};

use super::backoff::{Action, Backoff};
use super::health::{Health, HealthTracker, Verdict};
use super::logs::LogRing;
use super::prepare::{self, Acquirers, Validated};
use super::{ServiceKey, StartError, SupervisorConfig, SupervisorError};
use crate::acquire::sandboxed::SandboxedInstalls;
use crate::acquire::{Installer, Progress, Source};
use crate::config::{HealthSpec, Runtime, ServiceSpec};
use crate::mcp::{CallError, LogSink, Session, SessionConfig};
use crate::model::LogStream;
use crate::orchestrator::{
    wait_exit, Enforced, ExitReason, Orchestrator, SandboxHandle, SandboxSpec,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Installing,
    Starting,
    Running,
    Restarting,
    Crashed,
    Failed,
    Stopped,
}

impl Phase {
    /// Phases a call does not wait through.
    pub fn is_settled_down(self) -> bool {
        matches!(self, Phase::Crashed | Phase::Failed | Phase::Stopped)
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = serde_json::to_value(self).ok();
        f.write_str(s.as_ref().and_then(Value::as_str).unwrap_or("?"))
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct LimitsStatus {
    pub memory_mb: Option<u64>,
    pub cpus: Option<f64>,
    pub pids: Option<u64>,
    pub enforced: Enforced,
}

/// The `ServiceStatus` of the HTTP contract.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceStatus {
    pub mesh: String,
    pub name: String,
    pub status: Phase,
    pub health: Health,
    pub backend: &'static str,
    pub runtime: Option<Runtime>,
    pub source: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    pub restarts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<ExitReason>,
    pub tools: Arc<Vec<Value>>,
    pub limits: LimitsStatus,
    pub network: String,
    /// Keys of the spec's environment; values are never shown.
    pub env: Vec<String>,
    /// Set while a failed service waits for its next attempt.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryStatus>,
}

#[derive(Debug)]
struct State {
    health: Health,
    runtime: Option<Runtime>,
    pid: Option<u32>,
    container_id: Option<String>,
    restarts: u32,
    started_at: Option<SystemTime>,
    last_error: Option<String>,
    last_exit: Option<ExitReason>,
    tools: Arc<Vec<Value>>,
    enforced: Enforced,
    retry: Option<RetryStatus>,
}

/// When a failed service is tried again.
#[derive(Debug, Clone, Serialize)]
pub struct RetryStatus {
    pub attempts: u32,
    pub next_retry_at: String,
}

/// Requests to the lifecycle task.
#[derive(Debug)]
pub(crate) enum Control {
    Stop,
    Restart,
    /// Stop supervising but leave the sandbox running (to re-adopt it after
    /// a restart); a backend that cannot detach stops it instead.
    Detach,
}

pub struct Service {
    pub key: ServiceKey,
    pub spec: ServiceSpec,
    source: Source,
    backend: &'static str,
    state: Mutex<State>,
    phase: watch::Sender<Phase>,
    /// Counts start attempts that have settled (running, or failed to start),
    /// so a waiter cannot miss a restart that was over before it looked.
    attempts: watch::Sender<u64>,
    session: watch::Sender<Option<Arc<Session>>>,
    pub logs: Arc<LogRing>,
    control: mpsc::UnboundedSender<Control>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Set for services restored after a restart: try re-adopting first.
    adopt_first: std::sync::atomic::AtomicBool,
}

/// How one run of the server ended.
enum Outcome {
    Stopped,
    /// Spawn or handshake failed.
    StartFailed(StartError),
    Exited {
        reason: ExitReason,
        ran_for: Duration,
    },
    Unhealthy {
        ran_for: Duration,
    },
    RestartRequested,
}

impl Service {
    /// Creates the service and starts its lifecycle task.
    pub(crate) fn launch(
        key: ServiceKey,
        v: Validated,
        orchestrator: Arc<dyn Orchestrator>,
        installer: Arc<Installer>,
        sandboxed: Arc<SandboxedInstalls>,
        config: Arc<SupervisorConfig>,
        adopt: bool,
    ) -> Arc<Service> {
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let Validated { spec, source } = v;
        let svc = Arc::new(Service {
            key,
            backend: orchestrator.capabilities().name,
            source,
            state: Mutex::new(State {
                health: Health::Unknown,
                runtime: spec.runtime,
                pid: None,
                container_id: None,
                restarts: 0,
                started_at: None,
                last_error: None,
                last_exit: None,
                tools: Arc::new(Vec::new()),
                enforced: Enforced::default(),
                retry: None,
            }),
            spec,
            phase: watch::channel(Phase::Installing).0,
            attempts: watch::channel(0).0,
            session: watch::channel(None).0,
            logs: Arc::new(LogRing::new(config.log_lines)),
            control: control_tx,
            task: Mutex::new(None),
            adopt_first: std::sync::atomic::AtomicBool::new(adopt),
        });
        let task = tokio::spawn(svc.clone().lifecycle(
            orchestrator,
            installer,
            sandboxed,
            config,
            control_rx,
        ));
        *svc.task.lock().expect("poisoned") = Some(task);
        svc
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("service state poisoned")
    }

    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    /// Restarts now and waits until the new start attempt has settled.
    pub(crate) async fn restart_and_wait(&self, deadline: Instant) {
        let mut attempts = self.attempts.subscribe();
        let before = *attempts.borrow_and_update();
        self.request(Control::Restart);
        let _ = tokio::time::timeout_at(deadline, attempts.wait_for(|n| *n > before)).await;
    }

    fn attempt_settled(&self) {
        self.attempts.send_modify(|n| *n += 1);
    }

    fn set_phase(&self, p: Phase) {
        self.phase.send_if_modified(|cur| {
            let changed = *cur != p;
            *cur = p;
            changed
        });
    }

    pub fn note(&self, text: &str) {
        self.logs.push(LogStream::Meshbox, text);
    }

    pub fn status(&self) -> ServiceStatus {
        let phase = self.phase();
        let session_tools = self.session.borrow().as_ref().map(|s| s.tools());
        let st = self.state();
        ServiceStatus {
            mesh: self.key.mesh.clone(),
            name: self.key.name.clone(),
            status: phase,
            health: if phase == Phase::Running {
                st.health
            } else {
                Health::Unknown
            },
            backend: self.backend,
            runtime: st.runtime,
            source: self.source.to_string(),
            pid: st.pid,
            container_id: st.container_id.clone(),
            restarts: st.restarts,
            started_at: st
                .started_at
                .map(|t| humantime::format_rfc3339_seconds(t).to_string()),
            last_error: st.last_error.clone(),
            last_exit: st.last_exit.clone(),
            tools: session_tools.unwrap_or_else(|| st.tools.clone()),
            limits: LimitsStatus {
                memory_mb: self.spec.memory_mb,
                cpus: self.spec.cpus,
                pids: self.spec.pids,
                enforced: st.enforced,
            },
            network: self.spec.network.to_string(),
            env: self.spec.env.keys().cloned().collect(),
            retry: if phase == Phase::Failed {
                st.retry.clone()
            } else {
                None
            },
        }
    }

    pub fn tools(&self) -> Arc<Vec<Value>> {
        match self.session.borrow().as_ref() {
            Some(s) => s.tools(),
            None => self.state().tools.clone(),
        }
    }

    /// Waits until the service has left its transitional phases (or `deadline`).
    pub async fn settled(&self, deadline: Instant) -> Phase {
        let mut rx = self.phase.subscribe();
        let wait = async {
            let r = rx
                .wait_for(|p| *p == Phase::Running || p.is_settled_down())
                .await;
            r.map(|p| *p).ok()
        };
        match tokio::time::timeout_at(deadline, wait).await {
            Ok(Some(p)) => p,
            _ => self.phase(),
        }
    }

    /// The live session, waiting through starts and restarts up to `deadline`.
    pub async fn session(&self, deadline: Instant) -> Result<Arc<Session>, SupervisorError> {
        let mut rx = self.session.subscribe();
        let mut phase = self.phase.subscribe();
        loop {
            if let Some(s) = rx.borrow_and_update().as_ref() {
                if !s.is_closed() {
                    return Ok(s.clone());
                }
            }
            let p = *phase.borrow_and_update();
            if p.is_settled_down() {
                return Err(self.not_running(p));
            }
            tokio::select! {
                _ = rx.changed() => {}
                _ = phase.changed() => {}
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(SupervisorError::Call {
                        key: self.key.clone(),
                        source: CallError::Timeout(Duration::ZERO),
                    });
                }
            }
        }
    }

    fn not_running(&self, p: Phase) -> SupervisorError {
        SupervisorError::NotRunning {
            key: self.key.clone(),
            status: p,
            last_error: self.state().last_error.clone(),
        }
    }

    pub(crate) fn request(&self, c: Control) {
        let _ = self.control.send(c);
    }

    /// Asks the lifecycle task to stop and waits for it to finish.
    pub async fn stop(&self) {
        self.finish(Control::Stop).await;
    }

    /// Stops supervising; the sandbox keeps running where the backend can detach.
    pub async fn detach(&self) {
        self.finish(Control::Detach).await;
    }

    async fn finish(&self, how: Control) {
        self.request(how);
        let task = self.task.lock().expect("poisoned").take();
        if let Some(t) = task {
            let _ = t.await;
        }
        self.set_phase(Phase::Stopped);
    }

    fn log_sink(&self) -> LogSink {
        let ring = self.logs.clone();
        Arc::new(move |stream, line| ring.push(stream, line))
    }

    /// Resolves the spec into what to run: the backend acquires the source
    /// (installing it when needed) and finds the entry; then the environment.
    async fn prepare(
        &self,
        orchestrator: &dyn Orchestrator,
        config: &SupervisorConfig,
        installer: &Installer,
        sandboxed: &SandboxedInstalls,
    ) -> Result<SandboxSpec, StartError> {
        // Secrets first: a missing one fails fast, before any download.
        let home = prepare::server_home(&config.data_dir, &self.key)?;
        let env = prepare::server_env(&config.server_path, &home, &self.spec.env)?;
        let progress: Progress = {
            let ring = self.logs.clone();
            Arc::new(move |line: &str| ring.push(LogStream::Meshbox, line))
        };
        let acquirers = Acquirers {
            installer,
            sandboxed,
            install_timeout: config.install.timeout,
        };
        let v = Validated {
            spec: self.spec.clone(),
            source: self.source.clone(),
        };
        let prepared = prepare::acquire(orchestrator, &acquirers, &self.key, &v, &progress).await?;
        self.state().runtime = prepared.launch.runtime.or(self.spec.runtime);
        Ok(prepare::server_sandbox(
            &self.key,
            &self.spec,
            &prepared,
            env,
            Some(home),
        ))
    }

    #[instrument(skip_all, fields(mesh = %self.key.mesh, service = %self.key.name))]
    async fn lifecycle(
        self: Arc<Self>,
        orchestrator: Arc<dyn Orchestrator>,
        installer: Arc<Installer>,
        sandboxed: Arc<SandboxedInstalls>,
        config: Arc<SupervisorConfig>,
        mut control: mpsc::UnboundedReceiver<Control>,
    ) {
        let mut failures = 0u32;
        'attempt: loop {
            self.set_phase(Phase::Installing);
            let prepared = self
                .prepare(&*orchestrator, &config, &installer, &sandboxed)
                .await;
            let sandbox_spec = match prepared {
                Ok(x) => x,
                Err(e) => {
                    let e = crate::error_chain(&e);
                    self.note(&format!("start failed: {e}"));
                    self.state().last_error = Some(e);
                    self.set_phase(Phase::Failed);
                    self.attempt_settled();
                    if self.wait_retry(&config, &mut failures, &mut control).await {
                        continue 'attempt;
                    }
                    return;
                }
            };
            let mut backoff = Backoff::new(config.backoff.clone());
            let mut ever_ran = false;
            loop {
                self.set_phase(if ever_ran || self.state().restarts > 0 {
                    Phase::Restarting
                } else {
                    Phase::Starting
                });
                let outcome = self
                    .run_once(&*orchestrator, &sandbox_spec, &config, &mut control)
                    .await;
                let ran_for = match outcome {
                    Outcome::Stopped => {
                        self.set_phase(Phase::Stopped);
                        return;
                    }
                    Outcome::StartFailed(e) => {
                        let e = crate::error_chain(&e);
                        self.note(&format!("start failed: {e}"));
                        self.state().last_error = Some(e);
                        self.attempt_settled();
                        if !ever_ran {
                            // Never came up: a bad entry or server, not a flaky one.
                            // Retried in place on the slow failed schedule.
                            self.set_phase(Phase::Failed);
                            if self.wait_retry(&config, &mut failures, &mut control).await {
                                continue 'attempt;
                            }
                            return;
                        }
                        Duration::ZERO
                    }
                    Outcome::Exited { reason, ran_for } => {
                        self.note(&format!("server exited: {reason}"));
                        warn!(%reason, "server exited");
                        let mut st = self.state();
                        st.last_error = Some(format!("server exited: {reason}"));
                        st.last_exit = Some(reason);
                        ran_for
                    }
                    Outcome::Unhealthy { ran_for } => {
                        self.note("health checks failed; restarting");
                        self.state().last_error = Some("health checks failed".into());
                        ran_for
                    }
                    Outcome::RestartRequested => {
                        self.note("restart requested");
                        self.state().restarts += 1;
                        continue;
                    }
                };
                ever_ran = true;
                let (phase, delay) = match backoff.on_exit(ran_for) {
                    Action::Restart(d) => (Phase::Restarting, d),
                    Action::Crashed(d) => (Phase::Crashed, d),
                };
                self.set_phase(phase);
                self.note(&format!(
                    "{} in {:.1}s",
                    if phase == Phase::Crashed {
                        "restart budget spent; crashed, retrying"
                    } else {
                        "restarting"
                    },
                    delay.as_secs_f64()
                ));
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    c = control.recv() => match c {
                        Some(Control::Restart) => {}
                        Some(Control::Stop | Control::Detach) | None => {
                            self.set_phase(Phase::Stopped);
                            return;
                        }
                    }
                }
                self.state().restarts += 1;
            }
        }
    }

    /// Waits out the failed-retry schedule (30 s × 5, then every 5 min by
    /// default). False when the service is to stop instead.
    async fn wait_retry(
        &self,
        config: &SupervisorConfig,
        failures: &mut u32,
        control: &mut mpsc::UnboundedReceiver<Control>,
    ) -> bool {
        *failures += 1;
        let delay = config.failed_retry.delay(*failures);
        self.state().retry = Some(RetryStatus {
            attempts: *failures,
            next_retry_at: humantime::format_rfc3339_seconds(SystemTime::now() + delay).to_string(),
        });
        self.note(&format!(
            "retrying in {}s (failed attempt {})",
            delay.as_secs(),
            *failures
        ));
        tokio::select! {
            _ = tokio::time::sleep(delay) => true,
            c = control.recv() => match c {
                Some(Control::Restart) => true,
                Some(Control::Stop | Control::Detach) | None => {
                    self.set_phase(Phase::Stopped);
                    false
                }
            }
        }
    }

    /// Starts the server, handshakes, and supervises it until it ends.
    async fn run_once(
        &self,
        orchestrator: &dyn Orchestrator,
        spec: &SandboxSpec,
        config: &SupervisorConfig,
        control: &mut mpsc::UnboundedReceiver<Control>,
    ) -> Outcome {
        // After a restart of meshbox: the same sandbox may still be running.
        let adopted = if self
            .adopt_first
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            orchestrator.adopt(spec).await
        } else {
            None
        };
        let was_adopted = adopted.is_some();
        let mut sandbox = match adopted {
            Some(s) => {
                self.note(&format!(
                    "re-adopted running sandbox {}",
                    s.container_id.as_deref().unwrap_or("?")
                ));
                s
            }
            None => match orchestrator.spawn(spec.clone()).await {
                Ok(s) => s,
                Err(e) => return Outcome::StartFailed(StartError::Orchestrator(e)),
            },
        };
        {
            let mut st = self.state();
            st.pid = sandbox.pid;
            st.container_id = sandbox.container_id.clone();
            st.enforced = sandbox.enforced;
            st.health = Health::Unknown;
        }
        let handle = sandbox.handle;
        let log = self.log_sink();
        // stderr is logs; drain it always so the server never blocks on a full pipe.
        let stderr = {
            let log = log.clone();
            let mut lines = BufReader::new(sandbox.io.stderr).split(b'\n');
            tokio::spawn(async move {
                while let Ok(Some(line)) = lines.next_segment().await {
                    log(LogStream::Stderr, &String::from_utf8_lossy(&line));
                }
            })
        };
        let _stderr_guard = AbortOnDrop(stderr);
        let session = Arc::new(Session::start(
            sandbox.io.stdout,
            sandbox.io.stdin,
            sandbox.exit.clone(),
            log,
            SessionConfig {
                max_line: config.max_line,
                ..Default::default()
            },
        ));
        let handshake = tokio::select! {
            r = async {
                if was_adopted {
                    // Initialized long ago: only its tool list is refreshed.
                    let info = crate::mcp::ServerInfo {
                        protocol: crate::model::Protocol::Handshake,
                        protocol_version: String::new(),
                        server_info: Value::Null,
                        capabilities: Value::Null,
                        instructions: None,
                        discover: None,
                    };
                    session.adopt(info, config.handshake_timeout).await
                } else {
                    session
                        .connect(Some(crate::model::Protocol::Handshake), config.handshake_timeout)
                        .await
                        .map(|_| ())
                        .map_err(|e| match e {
                            crate::mcp::ConnectError::Step { source, .. } => source,
                            crate::mcp::ConnectError::ExitedDuringProbe(r) => CallError::Exited(r),
                        })
                }
            } => r,
            c = control.recv() => {
                drop(session);
                handle.stop(config.stop_grace).await;
                return match c {
                    Some(Control::Restart) => Outcome::RestartRequested,
                    _ => Outcome::Stopped,
                };
            }
        };
        if let Err(e) = handshake {
            let msg = match e {
                CallError::Exited(reason) => StartError::ExitedDuring {
                    step: "initialize",
                    reason,
                },
                CallError::Timeout(after) => StartError::HandshakeTimeout {
                    step: "initialize",
                    after,
                },
                source => StartError::Handshake {
                    step: "handshake",
                    source,
                },
            };
            drop(session);
            handle.kill();
            let reason = handle.stop(Duration::from_millis(100)).await;
            self.state().last_exit = Some(reason);
            return Outcome::StartFailed(msg);
        }
        let started = Instant::now();
        {
            let mut st = self.state();
            st.started_at = Some(SystemTime::now());
            st.health = Health::Healthy;
            st.tools = session.tools();
        }
        self.session.send_replace(Some(session.clone()));
        self.state().retry = None;
        self.set_phase(Phase::Running);
        self.attempt_settled();
        info!(tools = session.tools().len(), "running");
        let outcome = self
            .supervise(
                &session,
                &mut sandbox.exit,
                &*handle,
                config,
                control,
                started,
            )
            .await;
        self.state().tools = session.tools();
        self.session.send_replace(None);
        outcome
    }

    async fn supervise(
        &self,
        session: &Arc<Session>,
        exit: &mut watch::Receiver<Option<ExitReason>>,
        handle: &dyn SandboxHandle,
        config: &SupervisorConfig,
        control: &mut mpsc::UnboundedReceiver<Control>,
        started: Instant,
    ) -> Outcome {
        let health_spec = self.spec.health.clone().unwrap_or_default();
        let interval = config
            .health_interval
            .unwrap_or(Duration::from_secs(health_spec.interval_s));
        let mut ticker = tokio::time::interval_at(Instant::now() + interval, interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut tracker = HealthTracker::new(health_spec.failure_threshold);
        loop {
            tokio::select! {
                reason = wait_exit(exit) => {
                    return Outcome::Exited { reason, ran_for: started.elapsed() };
                }
                c = control.recv() => {
                    if matches!(c, Some(Control::Detach)) && handle.detach() {
                        self.note("detached; the sandbox keeps running for re-adoption");
                        return Outcome::Stopped;
                    }
                    session.close();
                    let reason = handle.stop(config.stop_grace).await;
                    self.state().last_exit = Some(reason);
                    return match c {
                        Some(Control::Restart) => Outcome::RestartRequested,
                        _ => Outcome::Stopped,
                    };
                }
                _ = ticker.tick() => {
                    let ok = check_health(session, &health_spec).await;
                    match tracker.record(ok) {
                        Verdict::Keep(h) => self.state().health = h,
                        Verdict::Restart => {
                            self.state().health = Health::Unhealthy;
                            session.close();
                            handle.kill();
                            let reason = handle.stop(config.stop_grace).await;
                            self.state().last_exit = Some(reason);
                            return Outcome::Unhealthy { ran_for: started.elapsed() };
                        }
                    }
                }
            }
        }
    }

    /// Calls a tool, waiting through a restart up to the call's timeout.
    pub async fn call(
        &self,
        tool: &str,
        arguments: Value,
        timeout: Duration,
    ) -> Result<Value, SupervisorError> {
        let deadline = Instant::now() + timeout;
        let session = self.session(deadline).await.map_err(|e| match e {
            SupervisorError::Call { key, .. } => SupervisorError::Call {
                key,
                source: CallError::Timeout(timeout),
            },
            other => other,
        })?;
        let left = deadline.saturating_duration_since(Instant::now());
        session
            .call_tool(tool, arguments, left)
            .await
            .map_err(|e| SupervisorError::Call {
                key: self.key.clone(),
                source: match e {
                    CallError::Timeout(_) => CallError::Timeout(timeout),
                    other => other,
                },
            })
    }
}

/// One health check: `ping`, and the readiness tool when configured (its
/// JSON-RPC error or `isError: true` is a failure).
async fn check_health(session: &Session, spec: &HealthSpec) -> bool {
    let timeout = Duration::from_secs(spec.timeout_s);
    if session.probe(timeout).await.is_err() {
        return false;
    }
    match &spec.tool {
        None => true,
        Some(tool) => {
            let args = spec
                .arguments
                .clone()
                .unwrap_or(Value::Object(Default::default()));
            match session.call_tool(tool, args, timeout).await {
                Ok(result) => result.get("isError").and_then(Value::as_bool) != Some(true),
                Err(_) => false,
            }
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
