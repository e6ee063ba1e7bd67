//! One supervised service: its state, its calls, and the async shell of its
//! lifecycle.
//!
//! The shell does what [`Decider`](super::lifecycle::Decider) decides. Every
//! await in it (acquisition and installs, spawn, connect, backoff and retry
//! waits, supervision) is raced against the control channel, so stop,
//! restart and undeploy take effect at once in every phase; a dropped phase
//! future kills what it started (installers, containers). Health probes run
//! in their own task beside the supervise loop and report verdicts to it.
//!
//! The lifecycle task is the only writer of the status; API handlers read a
//! snapshot. A service is `running` only once connected, `pid` and
//! `container_id` are shown only while the sandbox exists, and health is
//! `unknown` until a probe has passed.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc, watch};
use tokio::time::Instant;
use tracing::{debug_span, info, instrument, warn, Instrument};

use super::health::{Health, HealthTracker, ProbeFailure, ProbeResult, Verdict};
use super::lifecycle::{Decider, EndCause, Event, Next, Then};
use super::logs::{drain_lines, LogRing};
use super::prepare::{self, Acquirers, Validated};
use super::{Ctx, ServiceEvent, ServiceKey, StartError, SupervisorError};
use crate::acquire::{DirPlan, Progress, Source};
use crate::config::{HealthSpec, Runtime, ServiceSpec};
use crate::mcp::{
    CallError, CallOptions, ConnectError, LogSink, ServerInfo, Session, SessionConfig,
};
use crate::metrics::ServiceMetrics;
use crate::model::{wait_exit, Enforced, ExitReason, Isolation, LogStream, Protocol};
use crate::orchestrator::{SandboxHandle, SandboxSpec, Usage, RELEASE_LIMIT};
use crate::store::Remembered;

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

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Installing => "installing",
            Phase::Starting => "starting",
            Phase::Running => "running",
            Phase::Restarting => "restarting",
            Phase::Crashed => "crashed",
            Phase::Failed => "failed",
            Phase::Stopped => "stopped",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct LimitsStatus {
    pub memory_mb: Option<u64>,
    pub cpus: Option<f64>,
    pub pids: Option<u64>,
    pub enforced: Enforced,
    /// The isolation layers the sandbox got, and those missing on this host.
    pub isolation: Isolation,
}

/// When a failed service is tried again.
#[derive(Debug, Clone, Serialize)]
pub struct RetryStatus {
    pub attempts: u32,
    pub last_attempt_at: String,
    pub next_retry_at: String,
}

/// The `ServiceStatus` of the HTTP contract.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceStatus {
    pub mesh: String,
    pub name: String,
    pub status: Phase,
    pub health: Health,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_error: Option<String>,
    pub backend: &'static str,
    pub runtime: Option<Runtime>,
    pub source: String,
    /// The protocol version spoken with the server (its era shows in it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
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
    health_error: Option<String>,
    runtime: Option<Runtime>,
    pid: Option<u32>,
    container_id: Option<String>,
    restarts: u32,
    started_at: Option<SystemTime>,
    last_error: Option<String>,
    last_exit: Option<ExitReason>,
    tools: Arc<Vec<Value>>,
    enforced: Enforced,
    isolation: Isolation,
    retry: Option<RetryStatus>,
    server: Option<ServerInfo>,
    /// The running sandbox, for usage reads; never keeps it alive.
    sandbox: Option<Weak<dyn SandboxHandle>>,
}

/// Requests to the lifecycle task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Control {
    Stop,
    Restart,
    /// Stop supervising but leave the sandbox running (to re-adopt it after
    /// a restart); a backend that cannot detach stops it instead.
    Detach,
}

/// How a service starts.
#[derive(Debug, Clone, Default)]
pub(crate) struct LaunchOptions {
    /// Restored after a restart of meshbox: try re-adopting first.
    pub adopt: bool,
    /// A redeploy's candidate: its first failure ends it (the deploy answers
    /// the error and the running instance stays) instead of retrying.
    pub candidate: bool,
    pub remembered: Remembered,
}

pub struct Service {
    pub key: ServiceKey,
    pub spec: ServiceSpec,
    source: Source,
    /// A `path:` source's entry as validation found it.
    plan: Option<DirPlan>,
    spec_hash: String,
    backend: &'static str,
    state: Mutex<State>,
    phase: watch::Sender<Phase>,
    /// Counts start attempts that have settled (running, or failed to start),
    /// so a waiter cannot miss a restart that was over before it looked.
    attempts: watch::Sender<u64>,
    session: watch::Sender<Option<Arc<Session>>>,
    pub logs: Arc<LogRing>,
    control: mpsc::Sender<Control>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    candidate: AtomicBool,
    events: broadcast::Sender<ServiceEvent>,
    /// This service's metric handles (shared with its other instances).
    pub(crate) metrics: Arc<ServiceMetrics>,
}

/// How one run of the server ended.
enum RunEnd {
    Stopped,
    StartFailed(StartError),
    ProbeExited,
    Ended { ran_for: Duration, cause: EndCause },
    RestartRequested,
}

/// A phase's future finished, or a control request came first (and the
/// future was dropped, killing what it started).
enum Step<T> {
    Done(T),
    Control(Control),
}

async fn interruptible<F: Future>(
    fut: F,
    control: &mut mpsc::Receiver<Control>,
) -> Step<F::Output> {
    tokio::select! {
        biased;
        c = control.recv() => Step::Control(c.unwrap_or(Control::Stop)),
        v = fut => Step::Done(v),
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Service {
    /// Creates the service and starts its lifecycle task.
    pub(crate) fn launch(
        key: ServiceKey,
        v: Validated,
        ctx: Arc<Ctx>,
        opts: LaunchOptions,
    ) -> Arc<Service> {
        let (control_tx, control_rx) = mpsc::channel(16);
        let Validated { spec, source, plan } = v;
        let metrics = ctx.metrics.service(&key);
        let svc = Arc::new(Service {
            key,
            backend: ctx.orchestrator.capabilities().name,
            source,
            plan,
            spec_hash: spec.hash(),
            state: Mutex::new(State {
                health: Health::Unknown,
                health_error: None,
                runtime: spec.runtime,
                pid: None,
                container_id: None,
                restarts: 0,
                started_at: None,
                last_error: None,
                last_exit: None,
                tools: Arc::new(Vec::new()),
                enforced: Enforced::default(),
                isolation: Isolation::default(),
                retry: None,
                server: None,
                sandbox: None,
            }),
            spec,
            phase: watch::channel(Phase::Installing).0,
            attempts: watch::channel(0).0,
            session: watch::channel(None).0,
            logs: Arc::new(LogRing::new(ctx.config.log_lines)),
            control: control_tx,
            task: Mutex::new(None),
            candidate: AtomicBool::new(opts.candidate),
            events: ctx.events.clone(),
            metrics,
        });
        let task = tokio::spawn(svc.clone().lifecycle(ctx, control_rx, opts));
        *svc.task.lock().expect("poisoned") = Some(task);
        svc
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("service state poisoned")
    }

    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    /// A phase change: watchers (calls, deploys) and the supervisor's events.
    pub fn subscribe_phase(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }

    /// A candidate becomes the registered instance: from now on its failures
    /// are retried in place.
    pub(crate) fn promote(&self) {
        self.candidate.store(false, Ordering::SeqCst);
        let _ = self.events.send(ServiceEvent {
            key: self.key.clone(),
            phase: self.phase(),
        });
    }

    fn is_candidate(&self) -> bool {
        self.candidate.load(Ordering::SeqCst)
    }

    /// Restarts now and waits until the new start attempt has settled.
    pub(crate) async fn restart_and_wait(&self, deadline: Instant) {
        let mut attempts = self.attempts.subscribe();
        let before = *attempts.borrow_and_update();
        let _ = tokio::time::timeout_at(deadline, self.control.send(Control::Restart)).await;
        let _ = tokio::time::timeout_at(deadline, attempts.wait_for(|n| *n > before)).await;
    }

    fn attempt_settled(&self) {
        self.attempts.send_modify(|n| *n += 1);
    }

    fn set_phase(&self, p: Phase) {
        let changed = self.phase.send_if_modified(|cur| {
            let changed = *cur != p;
            *cur = p;
            changed
        });
        if changed && !self.is_candidate() {
            let _ = self.events.send(ServiceEvent {
                key: self.key.clone(),
                phase: p,
            });
        }
    }

    pub fn note(&self, text: &str) {
        self.logs.push(LogStream::Meshbox, text);
    }

    pub fn status(&self) -> ServiceStatus {
        let phase = self.phase();
        let session_tools = self.session.borrow().as_ref().map(|s| s.tools());
        let st = self.state();
        let running = phase == Phase::Running;
        ServiceStatus {
            mesh: self.key.mesh.clone(),
            name: self.key.name.clone(),
            status: phase,
            health: if running { st.health } else { Health::Unknown },
            health_error: running.then(|| st.health_error.clone()).flatten(),
            backend: self.backend,
            runtime: st.runtime,
            source: self.source.to_string(),
            protocol: st.server.as_ref().map(|s| s.protocol_version.clone()),
            pid: st.pid,
            container_id: st.container_id.clone(),
            restarts: st.restarts,
            started_at: st.started_at.map(rfc3339),
            last_error: st.last_error.clone(),
            last_exit: st.last_exit.clone(),
            tools: session_tools.unwrap_or_else(|| st.tools.clone()),
            limits: LimitsStatus {
                memory_mb: self.spec.memory_mb,
                cpus: self.spec.cpus,
                pids: self.spec.pids,
                enforced: st.enforced,
                isolation: st.isolation.clone(),
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

    /// The server's own description (era, capabilities), once connected.
    pub fn server_info(&self) -> Option<ServerInfo> {
        self.state().server.clone()
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
    pub async fn upstream(&self, deadline: Instant) -> Result<Arc<Session>, SupervisorError> {
        // The common case: running, nothing to wait for.
        if let Some(s) = self.session.borrow().as_ref() {
            if !s.is_closed() {
                return Ok(s.clone());
            }
        }
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

    /// Asks the lifecycle task without waiting (a full queue already holds
    /// requests that will be acted on).
    #[cfg(test)]
    pub(crate) fn request(&self, c: Control) {
        let _ = self.control.try_send(c);
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
        let _ = self.control.send(how).await;
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

    /// What the running sandbox uses now, where the backend can read it.
    pub async fn usage(&self) -> Option<Usage> {
        let handle = self.state().sandbox.as_ref()?.upgrade()?;
        handle.usage().await
    }

    /// Calls a tool, waiting through a restart up to the call's timeout; the
    /// result as raw JSON.
    pub async fn call_raw(
        &self,
        tool: &str,
        arguments: Value,
        timeout: Duration,
    ) -> Result<Box<RawValue>, SupervisorError> {
        let deadline = Instant::now() + timeout;
        let session = self
            .upstream(deadline)
            .instrument(debug_span!("queue"))
            .await
            .map_err(|e| match e {
                SupervisorError::Call { key, .. } => SupervisorError::Call {
                    key,
                    source: CallError::Timeout(timeout),
                },
                other => other,
            })?;
        let left = deadline.saturating_duration_since(Instant::now());
        // The server's own spans become children of the round trip.
        let round_trip = debug_span!("upstream");
        let opts = CallOptions {
            meta: round_trip.in_scope(crate::telemetry::upstream_meta),
            ..CallOptions::timeout(left)
        };
        session
            .request_raw(
                crate::mcp::protocol::method::TOOLS_CALL,
                Some(json!({"name": tool, "arguments": arguments})),
                opts,
            )
            .instrument(round_trip)
            .await
            .map_err(|e| SupervisorError::Call {
                key: self.key.clone(),
                source: match e {
                    CallError::Timeout(_) => CallError::Timeout(timeout),
                    other => other,
                },
            })
    }

    /// As [`call_raw`](Self::call_raw), parsed.
    pub async fn call(
        &self,
        tool: &str,
        arguments: Value,
        timeout: Duration,
    ) -> Result<Value, SupervisorError> {
        let raw = self.call_raw(tool, arguments, timeout).await?;
        Ok(serde_json::from_str(raw.get()).unwrap_or(Value::Null))
    }

    /// Resolves the spec into a sandbox: secrets and home first (a missing
    /// secret fails before any download), then the source.
    async fn prepare(&self, ctx: &Ctx) -> Result<SandboxSpec, StartError> {
        let config = &ctx.config;
        let home = prepare::server_home(&config.data_dir, &self.key)?;
        let env = prepare::server_env(&config.server_path, &home, &self.spec.env, &config.secrets)
            .await?;
        let progress: Progress = {
            let ring = self.logs.clone();
            Arc::new(move |line: &str| ring.push(LogStream::Meshbox, line))
        };
        let watch = super::observe::StepWatch::new(progress);
        let progress: Progress = watch.clone();
        let acquirers = Acquirers {
            installer: &ctx.installer,
            sandboxed: &ctx.sandboxed,
            install_timeout: config.install.timeout,
        };
        let v = Validated {
            spec: self.spec.clone(),
            source: self.source.clone(),
            plan: self.plan.clone(),
        };
        let started = Instant::now();
        let prepared = prepare::acquire(&*ctx.orchestrator, &acquirers, &self.key, &v, &progress)
            .instrument(debug_span!("acquire", source = %self.source))
            .await;
        super::observe::record_install(&ctx.metrics, &self.source, &watch, started, &prepared);
        let prepared = prepared?;
        self.state().runtime = prepared.launch.runtime.or(self.spec.runtime);
        Ok(prepare::server_sandbox(
            &self.key,
            &self.spec,
            &prepared,
            env,
            Some(home),
        ))
    }

    fn record_failure(&self, e: &StartError) {
        let text = crate::error_chain(e);
        warn!(mesh = %self.key.mesh, service = %self.key.name, error = %text, "start failed");
        self.note(&format!("start failed: {text}"));
        self.state().last_error = Some(text);
    }

    fn persist_retry(&self, ctx: &Ctx, attempts: u32) {
        if self.is_candidate() {
            return;
        }
        if let Some(store) = &ctx.store {
            if let Err(e) = store.set_retry(&self.key, attempts) {
                warn!(mesh = %self.key.mesh, service = %self.key.name, error = %crate::error_chain(&e), "cannot record the retry count");
            }
        }
    }

    #[instrument(skip_all, fields(mesh = %self.key.mesh, service = %self.key.name))]
    async fn lifecycle(
        self: Arc<Self>,
        ctx: Arc<Ctx>,
        mut control: mpsc::Receiver<Control>,
        opts: LaunchOptions,
    ) {
        let config = ctx.config.clone();
        let mut decider = Decider::new(
            config.backoff.clone(),
            config.failed_retry.clone(),
            opts.remembered.retry_attempts,
        );
        // The era: pinned by the spec, else the verdict kept for this spec.
        let mut pin = self.spec.protocol.pinned().or_else(|| {
            opts.remembered
                .protocol
                .as_ref()
                .filter(|(hash, _)| *hash == self.spec_hash)
                .map(|(_, p)| *p)
        });
        let mut carry = Carry {
            adopt: opts.adopt,
            releasing: None,
        };
        let mut prepared: Option<SandboxSpec> = None;
        let mut reinstalled = false;
        let mut next = Next::PrepareNow;
        // Restarts already counted in the metrics.
        let mut counted = 0;
        loop {
            next = match next {
                Next::Supervise | Next::RunNow if prepared.is_some() => {
                    let spec = prepared.clone().expect("checked");
                    let end = self
                        .run_once(
                            &ctx,
                            &spec,
                            &mut pin,
                            &mut carry,
                            &mut control,
                            &mut decider,
                        )
                        .await;
                    match end {
                        RunEnd::Stopped => break,
                        // The install cache it mounts was removed: install
                        // again (once per preparation), not a crash.
                        RunEnd::StartFailed(StartError::Orchestrator(
                            crate::orchestrator::OrchestratorError::MissingVolume { volume },
                        )) if !reinstalled => {
                            self.note(&format!(
                                "install cache `{volume}` is gone; installing again"
                            ));
                            ctx.sandboxed.forget(&volume);
                            reinstalled = true;
                            prepared = None;
                            Next::PrepareNow
                        }
                        RunEnd::StartFailed(e) => {
                            self.record_failure(&e);
                            self.attempt_settled();
                            if self.is_candidate() {
                                self.set_phase(Phase::Failed);
                                break;
                            }
                            decider.on(Event::StartFailed)
                        }
                        RunEnd::ProbeExited => {
                            self.note("the server exited on the server/discover probe; starting it again in the handshake era");
                            pin = Some(Protocol::Handshake);
                            self.keep_verdict(&ctx, Protocol::Handshake);
                            decider.on(Event::ProbeExited)
                        }
                        RunEnd::Ended { ran_for, cause } => {
                            reinstalled = false;
                            decider.on(Event::Ended { ran_for, cause })
                        }
                        RunEnd::RestartRequested => {
                            self.note("restart requested");
                            decider.on(Event::RestartRequested)
                        }
                    }
                }
                Next::Supervise | Next::RunNow | Next::PrepareNow => {
                    self.set_phase(Phase::Installing);
                    match interruptible(self.prepare(&ctx), &mut control).await {
                        Step::Control(Control::Restart) => Next::PrepareNow,
                        Step::Control(_) => break,
                        Step::Done(Ok(spec)) => {
                            prepared = Some(spec);
                            Next::RunNow
                        }
                        Step::Done(Err(e)) => {
                            self.record_failure(&e);
                            self.attempt_settled();
                            if self.is_candidate() {
                                self.set_phase(Phase::Failed);
                                break;
                            }
                            decider.on(Event::PrepareFailed)
                        }
                    }
                }
                Next::Wait {
                    phase,
                    delay,
                    then,
                    attempts,
                } => {
                    self.state().restarts = decider.restarts();
                    let now = SystemTime::now();
                    if phase == Phase::Failed {
                        self.state().retry = Some(RetryStatus {
                            attempts,
                            last_attempt_at: rfc3339(now),
                            next_retry_at: rfc3339(now + delay),
                        });
                        self.persist_retry(&ctx, attempts);
                        self.note(&format!(
                            "retrying in {}s (failed attempt {attempts})",
                            delay.as_secs()
                        ));
                    } else {
                        self.note(&format!(
                            "{} in {:.1}s",
                            if phase == Phase::Crashed {
                                "restart budget spent; crashed, retrying"
                            } else {
                                "restarting"
                            },
                            delay.as_secs_f64()
                        ));
                    }
                    self.set_phase(phase);
                    match interruptible(tokio::time::sleep(delay), &mut control).await {
                        Step::Done(()) => {}
                        Step::Control(Control::Restart) => {
                            self.note("restart requested");
                            let _ = decider.on(Event::RestartRequested);
                        }
                        Step::Control(_) => break,
                    }
                    self.state().restarts = decider.restarts();
                    match then {
                        Then::Run => Next::RunNow,
                        Then::Prepare => Next::PrepareNow,
                    }
                }
            };
            self.state().restarts = decider.restarts();
            self.metrics
                .restarted(decider.restarts().saturating_sub(counted));
            counted = decider.restarts();
        }
        {
            let mut st = self.state();
            st.pid = None;
            st.container_id = None;
        }
        self.session.send_replace(None);
        self.set_phase(Phase::Stopped);
    }

    fn keep_verdict(&self, ctx: &Ctx, protocol: Protocol) {
        if let (Some(store), false) = (&ctx.store, self.is_candidate()) {
            if let Err(e) = store.set_protocol(&self.key, &self.spec_hash, protocol) {
                warn!(mesh = %self.key.mesh, service = %self.key.name, error = %crate::error_chain(&e), "cannot record the protocol era");
            }
        }
    }

    /// The server exited on its own (its sandbox may still be letting go
    /// of what it held: the next run waits for that).
    fn exited(&self, reason: ExitReason, started: Instant) -> RunEnd {
        self.note(&format!("server exited: {reason}"));
        self.state().last_error = Some(format!("server exited: {reason}"));
        self.clear_sandbox(Some(reason));
        RunEnd::Ended {
            ran_for: started.elapsed(),
            cause: EndCause::Exited,
        }
    }

    fn clear_sandbox(&self, exit: Option<ExitReason>) {
        if exit.as_ref().is_some_and(|e| e.oom_killed) {
            self.metrics.oom_killed();
        }
        self.metrics.set_health(Health::Unknown.into());
        let mut st = self.state();
        st.pid = None;
        st.container_id = None;
        st.sandbox = None;
        if exit.is_some() {
            st.last_exit = exit;
        }
    }

    /// Starts the server, connects, and supervises it until it ends.
    async fn run_once(
        &self,
        ctx: &Ctx,
        spec: &SandboxSpec,
        pin: &mut Option<Protocol>,
        carry: &mut Carry,
        control: &mut mpsc::Receiver<Control>,
        decider: &mut Decider,
    ) -> RunEnd {
        let config = &ctx.config;
        self.set_phase(if decider.ever_ran() || decider.restarts() > 0 {
            Phase::Restarting
        } else {
            Phase::Starting
        });
        let orchestrator = &ctx.orchestrator;
        // The last run's server exited: its sandbox lets go of its layer first.
        if let Some(previous) = carry.releasing.take() {
            let released = previous.released(RELEASE_LIMIT);
            if let Step::Control(c) = interruptible(released, control).await {
                carry.releasing = Some(previous);
                return control_end(c);
            }
        }
        // After a restart of meshbox: the same sandbox may still be running.
        let adopted = if std::mem::take(&mut carry.adopt) && orchestrator.capabilities().detach {
            match interruptible(orchestrator.adopt(spec), control).await {
                Step::Done(s) => s,
                Step::Control(c) => return control_end(c),
            }
        } else {
            None
        };
        let was_adopted = adopted.is_some();
        let sandbox = match adopted {
            Some(s) => {
                self.note(&format!(
                    "re-adopted running sandbox {}",
                    s.container_id.as_deref().unwrap_or("?")
                ));
                s
            }
            None => match interruptible(
                orchestrator
                    .spawn(spec.clone())
                    .instrument(debug_span!("spawn")),
                control,
            )
            .await
            {
                Step::Done(Ok(s)) => s,
                Step::Done(Err(e)) => return RunEnd::StartFailed(StartError::Orchestrator(e)),
                Step::Control(c) => return control_end(c),
            },
        };
        {
            let mut st = self.state();
            st.pid = sandbox.pid;
            st.container_id = sandbox.container_id.clone();
            st.enforced = sandbox.enforced;
            st.isolation = sandbox.isolation.clone();
            st.health = Health::Unknown;
            st.health_error = None;
        }
        let handle: Arc<dyn SandboxHandle> = Arc::from(sandbox.handle);
        self.state().sandbox = Some(Arc::downgrade(&handle));
        let mut exit = sandbox.exit;
        // stderr is logs; drained always so the server never blocks on a full pipe.
        let _stderr = {
            let ring = self.logs.clone();
            AbortOnDrop(tokio::spawn(drain_lines(sandbox.io.stderr, move |l| {
                ring.push(LogStream::Stderr, l)
            })))
        };
        let session = Arc::new(Session::start(
            sandbox.io.stdout,
            sandbox.io.stdin,
            exit.clone(),
            self.log_sink(),
            SessionConfig {
                max_line: config.max_line,
                ..Default::default()
            },
        ));
        let connect = async {
            match (was_adopted, *pin) {
                // Connected long ago: its era is known, only the tool list is read.
                (true, Some(era)) => {
                    let info = self.state().server.clone().unwrap_or(ServerInfo {
                        protocol: era,
                        protocol_version: String::new(),
                        server_info: Value::Null,
                        capabilities: Value::Null,
                        instructions: None,
                        discover: None,
                    });
                    session
                        .adopt(info.clone(), config.handshake_timeout)
                        .await
                        .map(|()| info)
                        .map_err(|source| ConnectError::Step {
                            step: "tools/list",
                            source,
                        })
                }
                _ => session.connect(*pin, config.handshake_timeout).await,
            }
        };
        let info = match interruptible(connect.instrument(debug_span!("connect")), control).await {
            Step::Done(Ok(info)) => info,
            Step::Done(Err(e)) => {
                session.close();
                handle.kill();
                let reason = handle.stop(Duration::from_millis(100)).await;
                self.clear_sandbox(Some(reason));
                return match e {
                    ConnectError::ExitedDuringProbe(_) if pin.is_none() => RunEnd::ProbeExited,
                    ConnectError::ExitedDuringProbe(reason) => {
                        RunEnd::StartFailed(StartError::ExitedDuring {
                            step: "server/discover",
                            reason,
                        })
                    }
                    ConnectError::Step { step, source } => RunEnd::StartFailed(match source {
                        CallError::Exited(reason) => StartError::ExitedDuring { step, reason },
                        CallError::Timeout(after) => StartError::HandshakeTimeout {
                            step,
                            after: config.handshake_timeout.max(after),
                        },
                        source => StartError::Handshake { step, source },
                    }),
                };
            }
            Step::Control(c) => {
                session.close();
                let reason = handle.stop(config.stop_grace).await;
                self.clear_sandbox(Some(reason));
                return control_end(c);
            }
        };
        if pin.is_none() {
            *pin = Some(info.protocol);
            self.keep_verdict(ctx, info.protocol);
        }
        let started = Instant::now();
        let cleared_retry = {
            let mut st = self.state();
            st.started_at = Some(SystemTime::now());
            st.tools = session.tools();
            st.server = Some(info);
            st.last_error = None;
            st.retry.take().is_some()
        };
        if cleared_retry || decider.failures() > 0 {
            self.persist_retry(ctx, 0);
        }
        let _ = decider.on(Event::Running);
        self.session.send_replace(Some(session.clone()));
        self.set_phase(Phase::Running);
        self.attempt_settled();
        info!(tools = session.tools().len(), "running");

        let health_spec = self.spec.health.clone().unwrap_or_default();
        let interval = config
            .health_interval
            .unwrap_or(Duration::from_secs(health_spec.interval_s));
        let (health_tx, mut health_rx) = mpsc::channel(1);
        let _health = AbortOnDrop(tokio::spawn(health_loop(
            session.clone(),
            health_spec.clone(),
            interval,
            health_tx,
        )));
        let mut tracker = HealthTracker::new(health_spec.failure_threshold);
        let end = loop {
            tokio::select! {
                biased;
                c = control.recv() => {
                    let c = c.unwrap_or(Control::Stop);
                    if c == Control::Detach && handle.detach() {
                        self.note("detached; the sandbox keeps running for re-adoption");
                        break RunEnd::Stopped;
                    }
                    session.close();
                    let reason = handle.stop(config.stop_grace).await;
                    self.clear_sandbox(Some(reason));
                    break control_end(c);
                }
                reason = wait_exit(&mut exit) => {
                    warn!(%reason, "server exited");
                    carry.releasing = Some(handle.clone());
                    break self.exited(reason, started);
                }
                e = session.closed() => {
                    if let CallError::Exited(reason) = e {
                        carry.releasing = Some(handle.clone());
                        break self.exited(reason, started);
                    }
                    self.note("the server closed its stdout; stopping it");
                    self.state().last_error = Some("server closed its stdout".into());
                    handle.kill();
                    let reason = handle.stop(Duration::from_millis(100)).await;
                    self.clear_sandbox(Some(reason));
                    break RunEnd::Ended { ran_for: started.elapsed(), cause: EndCause::StdoutClosed };
                }
                Some(result) = health_rx.recv() => match tracker.record(result) {
                    Verdict::Keep { health, error } => {
                        self.metrics.set_health(health.into());
                        let mut st = self.state();
                        st.health = health;
                        st.health_error = error;
                    }
                    Verdict::Restart => {
                        self.metrics.set_health(Health::Unhealthy.into());
                        self.note("liveness checks failed; restarting");
                        {
                            let mut st = self.state();
                            st.health = Health::Unhealthy;
                            st.last_error = Some("liveness checks failed".into());
                        }
                        session.close();
                        handle.kill();
                        let reason = handle.stop(config.stop_grace).await;
                        self.clear_sandbox(Some(reason));
                        break RunEnd::Ended { ran_for: started.elapsed(), cause: EndCause::Liveness };
                    }
                },
            }
        };
        self.state().tools = session.tools();
        self.session.send_replace(None);
        end
    }
}

fn control_end(c: Control) -> RunEnd {
    match c {
        Control::Restart => RunEnd::RestartRequested,
        Control::Stop | Control::Detach => RunEnd::Stopped,
    }
}

/// What one run of the server hands the next.
struct Carry {
    /// Re-adopt a sandbox still running (once, after meshbox restarted).
    adopt: bool,
    /// The sandbox of a server that exited, maybe still letting go of what
    /// it held (the next start of this service reuses its layer).
    releasing: Option<Arc<dyn SandboxHandle>>,
}

/// Probes the server every `interval` and reports each round; a probe that
/// times out is a failure. Runs beside the supervise loop, never inside it.
async fn health_loop(
    session: Arc<Session>,
    spec: HealthSpec,
    interval: Duration,
    tx: mpsc::Sender<ProbeResult>,
) {
    let mut ticker = tokio::time::interval_at(Instant::now() + interval, interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let timeout = Duration::from_secs(spec.timeout_s);
    loop {
        ticker.tick().await;
        let live = session.probe(timeout).await.is_ok();
        let ready = match (&spec.tool, live) {
            (Some(tool), true) => Some(readiness(&session, tool, &spec, timeout).await),
            _ => None,
        };
        if tx.send(ProbeResult { live, ready }).await.is_err() {
            return;
        }
    }
}

/// The readiness tool: its JSON-RPC error or `isError: true` fails it, with
/// the probe's own message.
async fn readiness(
    session: &Session,
    tool: &str,
    spec: &HealthSpec,
    timeout: Duration,
) -> Result<(), ProbeFailure> {
    let args = spec
        .arguments
        .clone()
        .unwrap_or(Value::Object(Default::default()));
    match session.call_tool(tool, args, timeout).await {
        Ok(result) if result.get("isError").and_then(Value::as_bool) == Some(true) => {
            let text = result
                .pointer("/content/0/text")
                .and_then(Value::as_str)
                .unwrap_or("");
            Err(ProbeFailure {
                message: format!(
                    "readiness tool `{}` answered isError: {}",
                    crate::model::shown(tool, 64),
                    text.chars().take(500).collect::<String>()
                ),
            })
        }
        Ok(_) => Ok(()),
        Err(e) => Err(ProbeFailure {
            message: format!(
                "readiness tool `{}` failed: {}",
                crate::model::shown(tool, 64),
                crate::error_chain(&e)
            ),
        }),
    }
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("key", &self.key)
            .field("phase", &self.phase())
            .finish()
    }
}
