//! The supervisor: a registry of services keyed (mesh, name), each with a
//! lifecycle task that starts, watches, health-checks and restarts it.
//!
//! It holds a `dyn Orchestrator` and never names a backend (it reads its
//! capabilities). It validates everything it is given before touching the
//! registry or the store, so bad input changes nothing; the store and the
//! registry change together under one short lock, never across a start.
//! A redeploy of a serving service is transactional: the new spec runs as a
//! candidate beside the old instance and replaces it only once up.

pub mod backoff;
pub mod health;
pub mod lifecycle;
pub mod logs;
mod observe;
pub mod prepare;
pub mod service;
pub mod upstream;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::broadcast;
use tokio::time::Instant;
use tracing::info;

pub use backoff::{BackoffConfig, FailedRetry};
pub use health::Health;
pub use service::{Phase, Service, ServiceStatus};

use crate::acquire::sandboxed::SandboxedInstalls;
use crate::acquire::{AcquireError, InstallConfig, Installer, Source};
use crate::config::{ServiceSpec, SpecError};
use crate::mcp::CallError;
use crate::orchestrator::{Capabilities, Limits, Orchestrator, OrchestratorError, SandboxSpec};
use crate::store::{Remembered, Store};
use futures_util::StreamExt;
use prepare::Validated;
use service::LaunchOptions;

pub use crate::model::ServiceKey;

/// A service appeared, changed phase or went away (`phase: Stopped` and no
/// longer listed): what a mesh endpoint needs for its list_changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceEvent {
    pub key: ServiceKey,
    pub phase: Phase,
}

/// What every service's lifecycle shares.
pub(crate) struct Ctx {
    pub orchestrator: Arc<dyn Orchestrator>,
    pub installer: Arc<Installer>,
    pub sandboxed: Arc<SandboxedInstalls>,
    pub config: Arc<SupervisorConfig>,
    pub store: Option<Arc<Store>>,
    pub events: broadcast::Sender<ServiceEvent>,
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// Why a start attempt failed (kept, as text, in the status's `last_error`).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Secret(#[from] crate::secrets::SecretError),
    #[error("failed to create the server's home `{}`", path.display())]
    Home {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Acquire(#[from] AcquireError),
    #[error("the sandbox could not be started")]
    Orchestrator(#[from] OrchestratorError),
    #[error("server exited during {step} ({reason})")]
    ExitedDuring {
        step: &'static str,
        reason: crate::model::ExitReason,
    },
    #[error("no answer to {step} within {}s", after.as_secs())]
    HandshakeTimeout { step: &'static str, after: Duration },
    #[error("MCP {step} failed")]
    Handshake {
        step: &'static str,
        #[source]
        source: CallError,
    },
}

/// What kind of failure an error is, for callers that map it to a status
/// (the HTTP API) without knowing the layers below.
#[derive(Debug, Clone, PartialEq)]
pub enum ErrorKind {
    /// Bad input: nothing changed.
    Invalid,
    NotFound,
    /// The service is not running (crashed, failed, stopped) or went away.
    Unavailable,
    Timeout,
    /// The server answered with a JSON-RPC error.
    Upstream {
        code: i64,
        data: Option<serde_json::Value>,
    },
    /// The server broke the protocol, or could not be started.
    BadGateway,
    /// Another change to the same service won.
    Conflict,
    /// The caller may not do this (a mesh-scoped token asking for host files).
    Forbidden,
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Source(#[from] AcquireError),
    #[error("spec cannot be run here")]
    Unsupported(#[source] OrchestratorError),
    #[error("service {key} not found")]
    NotFound { key: ServiceKey },
    /// A spec mount outside every `--mount-root` (or one that does not exist).
    #[error("mount `{}` {reason}", path.display())]
    Mount { path: PathBuf, reason: &'static str },
    #[error("service {key} is {status}{}", last_error.as_ref().map(|e| format!(": {e}")).unwrap_or_default())]
    NotRunning {
        key: ServiceKey,
        status: Phase,
        last_error: Option<String>,
    },
    #[error("service {key} failed to start: {message}")]
    StartFailed {
        key: ServiceKey,
        message: String,
        logs: Vec<String>,
    },
    #[error("failed to record the desired state")]
    Store(#[from] crate::store::StoreError),
    #[error(
        "service {key} was changed by another request meanwhile; nothing of this one was applied"
    )]
    Superseded { key: ServiceKey },
    /// A mesh-scoped caller named a host directory outside the operator's
    /// `--source-root` directories.
    #[error("`{}` is a host directory outside the operator's source roots; a mesh-scoped token may deploy only registry sources, images and directories under --source-root", path.display())]
    HostSource { path: PathBuf },
    #[error("call to {key} failed")]
    Call {
        key: ServiceKey,
        #[source]
        source: CallError,
    },
}

impl SupervisorError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            SupervisorError::Spec(_)
            | SupervisorError::Source(_)
            | SupervisorError::Unsupported(_)
            | SupervisorError::Mount { .. } => ErrorKind::Invalid,
            SupervisorError::NotFound { .. } => ErrorKind::NotFound,
            SupervisorError::NotRunning { .. } => ErrorKind::Unavailable,
            SupervisorError::StartFailed { .. } => ErrorKind::BadGateway,
            SupervisorError::Store(_) => ErrorKind::Internal,
            SupervisorError::Superseded { .. } => ErrorKind::Conflict,
            SupervisorError::HostSource { .. } => ErrorKind::Forbidden,
            SupervisorError::Call { source, .. } => match source {
                CallError::Timeout(_) => ErrorKind::Timeout,
                CallError::Rpc { code, data, .. } => ErrorKind::Upstream {
                    code: *code,
                    data: data.clone(),
                },
                CallError::Protocol(_) => ErrorKind::BadGateway,
                CallError::Exited(_) | CallError::Closed | CallError::StdoutClosed => {
                    ErrorKind::Unavailable
                }
            },
        }
    }

    /// The server's own message, for a JSON-RPC error answer.
    pub fn upstream_message(&self) -> Option<&str> {
        match self {
            SupervisorError::Call {
                source: CallError::Rpc { message, .. },
                ..
            } => Some(message),
            _ => None,
        }
    }

    /// The server's last log lines, for a failed start.
    pub fn logs(&self) -> &[String] {
        match self {
            SupervisorError::StartFailed { logs, .. } => logs,
            _ => &[],
        }
    }
}

#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    pub data_dir: PathBuf,
    /// Budget for connecting (probe, initialize or discover, first tool list).
    pub handshake_timeout: Duration,
    /// Each step of a stop: after stdin closes, after SIGTERM (then SIGKILL).
    pub stop_grace: Duration,
    pub backoff: BackoffConfig,
    pub log_lines: usize,
    pub max_line: usize,
    /// PATH given to servers (PATH carries no secrets; everything else is curated).
    pub server_path: String,
    /// Overrides every service's health interval (tests).
    pub health_interval: Option<Duration>,
    /// How long a deploy waits for its service to come up (installs included).
    pub deploy_timeout: Duration,
    /// Cache and timeout of source installs.
    pub install: InstallConfig,
    /// Schedule of in-place retries of failed services.
    pub failed_retry: FailedRetry,
    /// Where `{"file": …}` env values may come from (`--secrets-dir`).
    pub secrets: crate::secrets::SecretPolicy,
    /// Host directories mesh-scoped callers may use as `path:` (and
    /// `git:file://`) sources; the admin may use any.
    pub source_roots: Vec<PathBuf>,
    /// Directories spec mounts must lie in (`serve --mount-root`); none: no
    /// spec may mount anything.
    pub mount_roots: Vec<PathBuf>,
}

impl SupervisorConfig {
    pub fn new(data_dir: PathBuf) -> Self {
        SupervisorConfig {
            handshake_timeout: Duration::from_secs(30),
            stop_grace: Duration::from_millis(500),
            backoff: BackoffConfig::default(),
            log_lines: logs::DEFAULT_LOG_LINES,
            max_line: crate::mcp::framing::DEFAULT_MAX_LINE,
            server_path: crate::environ::runner_path(),
            health_interval: None,
            deploy_timeout: Duration::from_secs(1800),
            install: InstallConfig::new(data_dir.join("cache")),
            failed_retry: FailedRetry::default(),
            secrets: crate::secrets::SecretPolicy::Dirs(vec![data_dir.join("secrets")]),
            source_roots: Vec::new(),
            mount_roots: Vec::new(),
            data_dir,
        }
    }
}

pub struct Supervisor {
    ctx: Arc<Ctx>,
    services: RwLock<HashMap<ServiceKey, Arc<Service>>>,
    /// Held only around changes of the store and the registry together.
    writes: tokio::sync::Mutex<()>,
    /// Bumped on every registry change, so a waiting redeploy notices that
    /// it was superseded.
    changes: tokio::sync::watch::Sender<u64>,
}

impl Supervisor {
    pub fn new(orchestrator: Arc<dyn Orchestrator>, config: SupervisorConfig) -> Self {
        let ctx = Ctx {
            orchestrator,
            installer: Arc::new(Installer::new(config.install.clone())),
            sandboxed: Arc::new(SandboxedInstalls::new(
                config.data_dir.join("docker-installs"),
            )),
            config: Arc::new(config),
            store: None,
            events: broadcast::channel(1024).0,
            metrics: Arc::new(crate::metrics::Metrics::disabled()),
        };
        Supervisor {
            ctx: Arc::new(ctx),
            services: RwLock::new(HashMap::new()),
            writes: tokio::sync::Mutex::new(()),
            changes: tokio::sync::watch::channel(0).0,
        }
    }

    /// Persists desired state in `store` and restores from it.
    pub fn with_store(mut self, store: Arc<Store>) -> Self {
        let ctx = Arc::get_mut(&mut self.ctx).expect("set before any service starts");
        ctx.store = Some(store);
        self
    }

    /// Records into `metrics` (the registry `/metrics` serves).
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        let ctx = Arc::get_mut(&mut self.ctx).expect("set before any service starts");
        ctx.metrics = metrics;
        self
    }

    pub fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        &self.ctx.metrics
    }

    pub fn capabilities(&self) -> Capabilities {
        self.ctx.orchestrator.capabilities()
    }

    /// The backend's name, as status and health show it.
    pub fn backend(&self) -> &'static str {
        self.capabilities().name
    }

    pub fn config(&self) -> &SupervisorConfig {
        &self.ctx.config
    }

    /// Registry and phase changes, for mesh endpoints.
    pub fn events(&self) -> broadcast::Receiver<ServiceEvent> {
        self.ctx.events.subscribe()
    }

    pub fn len(&self) -> usize {
        self.services.read().expect("registry poisoned").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, key: &ServiceKey) -> Result<Arc<Service>, SupervisorError> {
        self.services
            .read()
            .expect("registry poisoned")
            .get(key)
            .cloned()
            .ok_or_else(|| SupervisorError::NotFound { key: key.clone() })
    }

    /// Whether `svc` is still the registered instance of `key`.
    fn is_current(&self, key: &ServiceKey, svc: &Arc<Service>) -> bool {
        self.services
            .read()
            .expect("registry poisoned")
            .get(key)
            .is_some_and(|s| Arc::ptr_eq(s, svc))
    }

    /// Registers `svc` (replacing whatever was there) and tells watchers.
    fn insert(&self, svc: Arc<Service>) -> Option<Arc<Service>> {
        let prev = self
            .services
            .write()
            .expect("registry poisoned")
            .insert(svc.key.clone(), svc.clone());
        self.changes.send_modify(|n| *n += 1);
        let _ = self.ctx.events.send(ServiceEvent {
            key: svc.key.clone(),
            phase: svc.phase(),
        });
        prev
    }

    fn remove_if_current(&self, key: &ServiceKey, svc: &Arc<Service>) -> bool {
        let mut services = self.services.write().expect("registry poisoned");
        if services.get(key).is_some_and(|s| Arc::ptr_eq(s, svc)) {
            services.remove(key);
            drop(services);
            self.changes.send_modify(|n| *n += 1);
            let _ = self.ctx.events.send(ServiceEvent {
                key: key.clone(),
                phase: Phase::Stopped,
            });
            true
        } else {
            false
        }
    }

    fn remembered(&self, key: &ServiceKey) -> Remembered {
        self.ctx
            .store
            .as_ref()
            .and_then(|s| s.remembered(key).ok())
            .unwrap_or_default()
    }

    /// Checks a spec completely, without side effects: the typed value the
    /// lifecycle consumes. A local directory is checked too: on a deploy, a
    /// missing directory or entry is bad input.
    pub fn validate(&self, spec: ServiceSpec) -> Result<Validated, SupervisorError> {
        let mut v = self.validate_shape(spec)?;
        // Secret files: only from the operator's secret directories, only
        // small regular files (checked, not read; read again at start).
        crate::secrets::check_env(&v.spec.env, &self.config().secrets).map_err(SpecError::from)?;
        self.check_mounts(&v.spec, true)?;
        if let Source::Path(dir) = &v.source {
            v.plan = Some(crate::acquire::DirPlan::detect(
                dir,
                v.spec.runtime,
                v.spec.command.as_deref(),
            )?);
        }
        Ok(v)
    }

    /// The checks that depend on the spec alone (and the backend), not on
    /// the host's files: what a stored spec must still pass at restore. A
    /// directory that is gone for now fails the start instead, and is
    /// retried in place like any external cause.
    fn validate_shape(&self, spec: ServiceSpec) -> Result<Validated, SupervisorError> {
        spec.validate()?;
        let source: Source = spec.source.parse()?;
        if matches!(source, Source::Image(_)) && !self.capabilities().images {
            return Err(AcquireError::Unsupported { kind: "image" }.into());
        }
        self.check_mounts(&spec, false)?;
        let probe = SandboxSpec {
            argv: vec!["probe".into()],
            image: matches!(source, Source::Image(_)).then(|| "probe".to_owned()),
            limits: Limits {
                memory_mb: spec.memory_mb,
                cpus: spec.cpus,
                pids: spec.pids,
            },
            network: spec.network.clone(),
            ..Default::default()
        };
        self.ctx
            .orchestrator
            .check(&probe)
            .map_err(SupervisorError::Unsupported)?;
        Ok(Validated {
            spec,
            source,
            plan: None,
        })
    }

    /// Every spec mount must lie inside a mount root (symlinks followed
    /// where the path exists). `exist`: the mount must exist now (a deploy);
    /// a stored spec whose directory is gone for now fails its start instead.
    fn check_mounts(&self, spec: &ServiceSpec, exist: bool) -> Result<(), SupervisorError> {
        for m in &spec.mounts {
            let refuse = |reason| SupervisorError::Mount {
                path: m.path.clone(),
                reason,
            };
            let real = match m.path.canonicalize() {
                Ok(real) if !real.is_dir() => return Err(refuse("is not a directory")),
                Ok(real) => real,
                Err(_) if exist => return Err(refuse("does not exist")),
                Err(_) => m.path.clone(),
            };
            let inside = self
                .ctx
                .config
                .mount_roots
                .iter()
                .filter_map(|r| r.canonicalize().ok())
                .any(|root| real.starts_with(root));
            if !inside {
                return Err(refuse("is outside every --mount-root"));
            }
        }
        Ok(())
    }

    fn launch(&self, key: ServiceKey, v: Validated, opts: LaunchOptions) -> Arc<Service> {
        Service::launch(key, v, self.ctx.clone(), opts)
    }

    /// Deploys for `principal`: a mesh-scoped caller may name host
    /// directories (`path:`, `git:file://`) only under the operator's source
    /// roots — it can never read host files.
    pub async fn deploy_as(
        &self,
        principal: &crate::model::Principal,
        key: ServiceKey,
        spec: ServiceSpec,
    ) -> Result<ServiceStatus, SupervisorError> {
        if matches!(principal, crate::model::Principal::Mesh(_)) {
            let source: Source = spec.source.parse()?;
            let host = match &source {
                Source::Path(dir) => Some(dir.clone()),
                Source::Git { url, .. } => url.strip_prefix("file://").map(PathBuf::from),
                _ => None,
            };
            if let Some(dir) = host {
                // Resolved, so `..` and symlinks cannot lead out of a root.
                let real = dir.canonicalize().unwrap_or(dir.clone());
                let inside = self
                    .ctx
                    .config
                    .source_roots
                    .iter()
                    .any(|root| root.canonicalize().is_ok_and(|r| real.starts_with(&r)));
                if !inside {
                    return Err(SupervisorError::HostSource { path: dir });
                }
            }
        }
        self.deploy(key, spec).await
    }

    /// Deploys (or replaces) a service and waits until it runs or fails.
    ///
    /// A first deploy is stored, then started: if it fails it stays listed
    /// as `failed` and is retried in place. A redeploy of a serving service
    /// starts the new spec beside it and swaps only once the new one runs; if
    /// it fails, the error is answered and the old instance keeps running,
    /// serving and stored.
    pub async fn deploy(
        &self,
        key: ServiceKey,
        spec: ServiceSpec,
    ) -> Result<ServiceStatus, SupervisorError> {
        let v = self.validate(spec)?;
        match self.get(&key) {
            Ok(old) if matches!(old.phase(), Phase::Running | Phase::Restarting) => {
                self.replace(key, v, old).await
            }
            _ => {
                let svc = {
                    let _w = self.writes.lock().await;
                    // Desired state first: a crash from here on still restores it.
                    if let Some(store) = &self.ctx.store {
                        store.put(&key, &v.spec)?;
                    }
                    let remembered = self.remembered(&key);
                    let svc = self.launch(
                        key.clone(),
                        v,
                        LaunchOptions {
                            remembered,
                            ..Default::default()
                        },
                    );
                    if let Some(prev) = self.insert(svc.clone()) {
                        info!(mesh = %key.mesh, service = %key.name, "replacing a service that was not serving");
                        tokio::spawn(async move { prev.stop().await });
                    }
                    svc
                };
                self.wait_up(&svc).await
            }
        }
    }

    /// The transactional redeploy: a candidate beside `old`.
    async fn replace(
        &self,
        key: ServiceKey,
        v: Validated,
        old: Arc<Service>,
    ) -> Result<ServiceStatus, SupervisorError> {
        info!(mesh = %key.mesh, service = %key.name, "redeploying beside the running instance");
        let candidate = self.launch(
            key.clone(),
            v,
            LaunchOptions {
                candidate: true,
                ..Default::default()
            },
        );
        let mut changes = self.changes.subscribe();
        let deadline = Instant::now() + self.ctx.config.deploy_timeout;
        let phase = loop {
            tokio::select! {
                p = candidate.settled(deadline) => break p,
                _ = changes.changed() => {
                    if !self.is_current(&key, &old) {
                        candidate.stop().await;
                        return Err(SupervisorError::Superseded { key });
                    }
                }
            }
        };
        if phase != Phase::Running {
            let err = self.start_failed(&candidate, phase);
            candidate.stop().await;
            return Err(err);
        }
        {
            let _w = self.writes.lock().await;
            if !self.is_current(&key, &old) {
                drop(_w);
                candidate.stop().await;
                return Err(SupervisorError::Superseded { key });
            }
            if let Some(store) = &self.ctx.store {
                if let Err(e) = store.put(&key, &candidate.spec) {
                    drop(_w);
                    candidate.stop().await;
                    return Err(e.into());
                }
            }
            candidate.promote();
            self.insert(candidate.clone());
        }
        old.stop().await;
        info!(mesh = %key.mesh, service = %key.name, "redeployed");
        Ok(candidate.status())
    }

    fn start_failed(&self, svc: &Service, phase: Phase) -> SupervisorError {
        let status = svc.status();
        SupervisorError::StartFailed {
            key: svc.key.clone(),
            message: status
                .last_error
                .unwrap_or_else(|| format!("service is {phase}")),
            logs: svc.logs.tail(20).0,
        }
    }

    async fn wait_up(&self, svc: &Service) -> Result<ServiceStatus, SupervisorError> {
        let phase = svc
            .settled(Instant::now() + self.ctx.config.deploy_timeout)
            .await;
        if phase == Phase::Running {
            return Ok(svc.status());
        }
        Err(self.start_failed(svc, phase))
    }

    /// Stops and forgets a service. The stored spec goes first (a failed
    /// write changes nothing: the service stays listed and running), then the
    /// sandbox, then the registry entry, so a listed service never has its
    /// process gone nor an unlisted one a process left.
    pub async fn undeploy(&self, key: &ServiceKey) -> Result<(), SupervisorError> {
        let svc = {
            let _w = self.writes.lock().await;
            let svc = self.get(key)?;
            if let Some(store) = &self.ctx.store {
                store.delete(key)?;
            }
            svc
        };
        svc.stop().await;
        {
            let _w = self.writes.lock().await;
            self.remove_if_current(key, &svc);
        }
        if self.get(key).is_err() {
            self.ctx.metrics.remove_service(key);
            self.ctx.orchestrator.release(key).await;
        }
        info!(mesh = %key.mesh, service = %key.name, "undeployed");
        Ok(())
    }

    /// Restarts a service now (no backoff) and waits for it to come back.
    pub async fn restart(&self, key: &ServiceKey) -> Result<ServiceStatus, SupervisorError> {
        let svc = self.get(key)?;
        if svc.phase() == Phase::Stopped {
            // Its lifecycle task is over: a redeploy of the same spec.
            let spec = svc.spec.clone();
            return self.deploy(key.clone(), spec).await;
        }
        svc.restart_and_wait(Instant::now() + self.ctx.config.deploy_timeout)
            .await;
        self.wait_up(&svc).await
    }

    pub fn list(&self, mesh: Option<&str>) -> Vec<ServiceStatus> {
        let services: Vec<Arc<Service>> = self
            .services
            .read()
            .expect("registry poisoned")
            .values()
            .filter(|s| mesh.is_none_or(|m| s.key.mesh == m))
            .cloned()
            .collect();
        let mut out: Vec<ServiceStatus> = services.iter().map(|s| s.status()).collect();
        out.sort_by(|a, b| (&a.mesh, &a.name).cmp(&(&b.mesh, &b.name)));
        out
    }

    /// Calls a tool; the result as raw JSON, passed on as it came.
    pub async fn call_raw(
        &self,
        key: &ServiceKey,
        tool: &str,
        arguments: serde_json::Value,
        timeout: Option<Duration>,
    ) -> Result<Box<serde_json::value::RawValue>, SupervisorError> {
        let svc = self.get(key)?;
        let timeout = timeout.unwrap_or_else(|| svc.spec.call_timeout());
        let timer = svc.metrics.start_call();
        let r = svc.call_raw(tool, arguments, timeout).await;
        let outcome = observe::outcome(&r);
        timer.finish(tool, outcome);
        crate::telemetry::record_outcome(outcome.as_str());
        r
    }

    /// Every mesh that has a service, sorted, with its number of services.
    pub fn meshes(&self) -> Vec<(String, usize)> {
        let mut counts = std::collections::BTreeMap::<String, usize>::new();
        for key in self.services.read().expect("registry poisoned").keys() {
            *counts.entry(key.mesh.clone()).or_default() += 1;
        }
        counts.into_iter().collect()
    }

    pub async fn call(
        &self,
        key: &ServiceKey,
        tool: &str,
        arguments: serde_json::Value,
        timeout: Option<Duration>,
    ) -> Result<serde_json::Value, SupervisorError> {
        let svc = self.get(key)?;
        let timeout = timeout.unwrap_or_else(|| svc.spec.call_timeout());
        svc.call(tool, arguments, timeout).await
    }

    /// Starts every stored service, `parallelism` at a time; returns how many
    /// came back. Each row stands alone: one that does not decode or no
    /// longer validates is reported and skipped, holding no other back.
    pub async fn restore(&self, parallelism: usize) -> usize {
        let Some(store) = &self.ctx.store else {
            return 0;
        };
        let rows = match store.all() {
            Ok(rows) => rows,
            Err(e) => {
                tracing::error!(error = %crate::error_chain(&e), "cannot read the desired state");
                return 0;
            }
        };
        info!(services = rows.len(), "restoring");
        // Sandboxes left by services that are no longer wanted go first.
        let keep: Vec<ServiceKey> = rows.iter().map(|r| r.key.clone()).collect();
        self.ctx.orchestrator.sweep(&keep).await;
        let restored = std::sync::atomic::AtomicUsize::new(0);
        futures_util::stream::iter(rows)
            .for_each_concurrent(parallelism.max(1), |row| {
                let restored = &restored;
                async move {
                    let key = row.key;
                    let v = match row
                        .spec
                        .map_err(SupervisorError::from)
                        .and_then(|s| self.validate_shape(s))
                    {
                        Ok(v) => v,
                        Err(e) => {
                            tracing::error!(mesh = %key.mesh, service = %key.name, error = %crate::error_chain(&e), "stored spec is not valid; skipped");
                            return;
                        }
                    };
                    let svc = {
                        let _w = self.writes.lock().await;
                        if self.get(&key).is_ok() {
                            return; // deployed again meanwhile
                        }
                        let svc = self.launch(
                            key,
                            v,
                            LaunchOptions {
                                adopt: true,
                                candidate: false,
                                remembered: row.remembered,
                            },
                        );
                        self.insert(svc.clone());
                        svc
                    };
                    restored.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let _ = svc
                        .settled(Instant::now() + self.ctx.config.deploy_timeout)
                        .await;
                }
            })
            .await;
        restored.into_inner()
    }

    fn drain(&self) -> Vec<Arc<Service>> {
        let all: Vec<Arc<Service>> = self
            .services
            .write()
            .expect("registry poisoned")
            .drain()
            .map(|(_, s)| s)
            .collect();
        self.changes.send_modify(|n| *n += 1);
        all
    }

    /// Stops supervising every service, leaving sandboxes running where the
    /// backend can (docker containers, for re-adoption); the rest are stopped.
    pub async fn detach_all(&self) {
        let all = self.drain();
        futures_util::future::join_all(all.iter().map(|s| s.detach())).await;
    }

    /// Stops every service, concurrently.
    pub async fn shutdown(&self) {
        let all = self.drain();
        futures_util::future::join_all(all.iter().map(|s| s.stop())).await;
        for s in &all {
            self.ctx.orchestrator.release(&s.key).await;
        }
    }
}

#[cfg(test)]
mod tests;
