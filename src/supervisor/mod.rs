//! The supervisor: a registry of services keyed (mesh, name), each with a
//! lifecycle task that starts, watches, health-checks and restarts it.
//!
//! It holds a `dyn Orchestrator` and never names a backend. It validates
//! everything it is given before touching the registry, so bad input changes
//! nothing.

pub mod backoff;
pub mod health;
pub mod logs;
pub mod prepare;
pub mod service;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde_json::Value;
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
use crate::store::Store;
use futures_util::StreamExt;
use prepare::Validated;

pub use crate::model::ServiceKey;

/// Why a start attempt failed (kept, as text, in the status's `last_error`).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("env `{key}`: cannot read its secret file")]
    Secret {
        key: String,
        #[source]
        source: std::io::Error,
    },
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
            | SupervisorError::Unsupported(_) => ErrorKind::Invalid,
            SupervisorError::NotFound { .. } => ErrorKind::NotFound,
            SupervisorError::NotRunning { .. } => ErrorKind::Unavailable,
            SupervisorError::StartFailed { .. } => ErrorKind::BadGateway,
            SupervisorError::Store(_) => ErrorKind::Internal,
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
    /// Budget for `initialize` + `tools/list`.
    pub handshake_timeout: Duration,
    /// Grace between closing stdin, SIGTERM and SIGKILL.
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
}

impl SupervisorConfig {
    pub fn new(data_dir: PathBuf) -> Self {
        SupervisorConfig {
            handshake_timeout: Duration::from_secs(30),
            stop_grace: Duration::from_secs(3),
            backoff: BackoffConfig::default(),
            log_lines: logs::DEFAULT_LOG_LINES,
            max_line: crate::mcp::framing::DEFAULT_MAX_LINE,
            server_path: std::env::var("PATH")
                .unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into()),
            health_interval: None,
            deploy_timeout: Duration::from_secs(1800),
            install: InstallConfig::new(data_dir.join("cache")),
            failed_retry: FailedRetry::default(),
            data_dir,
        }
    }
}

pub struct Supervisor {
    orchestrator: Arc<dyn Orchestrator>,
    /// Desired state, when persisted.
    store: Option<Arc<Store>>,
    installer: Arc<Installer>,
    sandboxed: Arc<SandboxedInstalls>,
    config: Arc<SupervisorConfig>,
    services: RwLock<HashMap<ServiceKey, Arc<Service>>>,
    /// Serializes deploys and removals of the same key.
    key_locks: Mutex<HashMap<ServiceKey, Arc<tokio::sync::Mutex<()>>>>,
}

impl Supervisor {
    pub fn new(orchestrator: Arc<dyn Orchestrator>, config: SupervisorConfig) -> Self {
        Supervisor {
            orchestrator,
            store: None,
            installer: Arc::new(Installer::new(config.install.clone())),
            sandboxed: Arc::new(SandboxedInstalls::new(
                config.data_dir.join("docker-installs"),
            )),
            config: Arc::new(config),
            services: RwLock::new(HashMap::new()),
            key_locks: Mutex::new(HashMap::new()),
        }
    }

    /// Persists desired state in `store` and restores from it.
    pub fn with_store(mut self, store: Arc<Store>) -> Self {
        self.store = Some(store);
        self
    }

    pub fn capabilities(&self) -> Capabilities {
        self.orchestrator.capabilities()
    }

    /// The backend's name, as status and health show it.
    pub fn backend(&self) -> &'static str {
        self.orchestrator.capabilities().name
    }

    pub fn config(&self) -> &SupervisorConfig {
        &self.config
    }

    pub fn len(&self) -> usize {
        self.services.read().expect("registry poisoned").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn key_lock(&self, key: &ServiceKey) -> Arc<tokio::sync::Mutex<()>> {
        self.key_locks
            .lock()
            .expect("poisoned")
            .entry(key.clone())
            .or_default()
            .clone()
    }

    pub fn get(&self, key: &ServiceKey) -> Result<Arc<Service>, SupervisorError> {
        self.services
            .read()
            .expect("registry poisoned")
            .get(key)
            .cloned()
            .ok_or_else(|| SupervisorError::NotFound { key: key.clone() })
    }

    /// Checks a spec completely, without side effects: the typed value the
    /// lifecycle consumes.
    pub fn validate(&self, spec: ServiceSpec) -> Result<Validated, SupervisorError> {
        spec.validate()?;
        let source: Source = spec.source.parse()?;
        match &source {
            Source::Image(_) if !self.capabilities().images => {
                return Err(AcquireError::Unsupported { kind: "image" }.into());
            }
            // A local directory is checked now: a missing dir or entry is bad input.
            Source::Path(dir) => {
                crate::acquire::check_dir(dir, spec.runtime, spec.command.as_deref())?;
            }
            _ => {}
        }
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
        self.orchestrator
            .check(&probe)
            .map_err(SupervisorError::Unsupported)?;
        Ok(Validated { spec, source })
    }

    /// Starts a service's lifecycle and puts it in the registry.
    fn register(&self, key: ServiceKey, v: Validated, adopt: bool) -> Arc<Service> {
        let svc = Service::launch(
            key.clone(),
            v,
            self.orchestrator.clone(),
            self.installer.clone(),
            self.sandboxed.clone(),
            self.config.clone(),
            adopt,
        );
        self.services
            .write()
            .expect("registry poisoned")
            .insert(key, svc.clone());
        svc
    }

    /// Deploys (or replaces) a service and waits until it runs or fails.
    pub async fn deploy(
        &self,
        key: ServiceKey,
        spec: ServiceSpec,
    ) -> Result<ServiceStatus, SupervisorError> {
        let v = self.validate(spec)?;
        let lock = self.key_lock(&key);
        let _guard = lock.lock().await;
        // Desired state first: a crash from here on still restores it.
        if let Some(store) = &self.store {
            store.put(&key, &v.spec)?;
        }
        let old = self
            .services
            .write()
            .expect("registry poisoned")
            .remove(&key);
        if let Some(old) = old {
            info!(service = %key, "replacing");
            old.stop().await;
        }
        let svc = self.register(key, v, false);
        self.wait_up(&svc).await
    }

    async fn wait_up(&self, svc: &Service) -> Result<ServiceStatus, SupervisorError> {
        let phase = svc
            .settled(Instant::now() + self.config.deploy_timeout)
            .await;
        let status = svc.status();
        if phase == Phase::Running {
            return Ok(status);
        }
        Err(SupervisorError::StartFailed {
            key: svc.key.clone(),
            message: status
                .last_error
                .unwrap_or_else(|| format!("service is {phase}")),
            logs: svc.logs.tail(20).0,
        })
    }

    /// Stops and forgets a service.
    pub async fn undeploy(&self, key: &ServiceKey) -> Result<(), SupervisorError> {
        let lock = self.key_lock(key);
        let _guard = lock.lock().await;
        let svc = self
            .services
            .write()
            .expect("registry poisoned")
            .remove(key)
            .ok_or_else(|| SupervisorError::NotFound { key: key.clone() })?;
        if let Some(store) = &self.store {
            store.delete(key)?;
        }
        svc.stop().await;
        self.orchestrator.release(key).await;
        info!(service = %key, "undeployed");
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
        svc.restart_and_wait(Instant::now() + self.config.deploy_timeout)
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

    pub async fn call(
        &self,
        key: &ServiceKey,
        tool: &str,
        arguments: Value,
        timeout: Option<Duration>,
    ) -> Result<Value, SupervisorError> {
        let svc = self.get(key)?;
        let timeout = timeout.unwrap_or_else(|| svc.spec.call_timeout());
        svc.call(tool, arguments, timeout).await
    }

    /// Starts every stored service, `parallelism` at a time; returns how many.
    /// One that fails shows it in its status and holds no other back.
    pub async fn restore(&self, parallelism: usize) -> usize {
        let Some(store) = &self.store else { return 0 };
        let all = match store.all() {
            Ok(all) => all,
            Err(e) => {
                tracing::error!(error = %crate::error_chain(&e), "cannot read the desired state");
                return 0;
            }
        };
        let n = all.len();
        info!(services = n, "restoring");
        // Sandboxes left by services that are no longer wanted go first.
        let keep: Vec<ServiceKey> = all.iter().map(|(k, _)| k.clone()).collect();
        self.orchestrator.sweep(&keep).await;
        futures_util::stream::iter(all)
            .for_each_concurrent(parallelism.max(1), |(key, spec)| async move {
                let v = match self.validate(spec) {
                    Ok(v) => v,
                    Err(e) => {
                        tracing::error!(service = %key, error = %crate::error_chain(&e), "stored spec no longer valid; skipped");
                        return;
                    }
                };
                let lock = self.key_lock(&key);
                let _guard = lock.lock().await;
                if self.services.read().expect("registry poisoned").contains_key(&key) {
                    return; // deployed again meanwhile
                }
                let svc = self.register(key, v, true);
                let _ = svc.settled(Instant::now() + self.config.deploy_timeout).await;
            })
            .await;
        n
    }

    /// Stops supervising every service, leaving sandboxes running where the
    /// backend can (docker containers, for re-adoption); the rest are stopped.
    pub async fn detach_all(&self) {
        let all: Vec<Arc<Service>> = self
            .services
            .write()
            .expect("registry poisoned")
            .drain()
            .map(|(_, s)| s)
            .collect();
        futures_util::future::join_all(all.iter().map(|s| s.detach())).await;
    }

    /// Stops every service, concurrently.
    pub async fn shutdown(&self) {
        let all: Vec<Arc<Service>> = self
            .services
            .write()
            .expect("registry poisoned")
            .drain()
            .map(|(_, s)| s)
            .collect();
        futures_util::future::join_all(all.iter().map(|s| s.stop())).await;
        for s in &all {
            self.orchestrator.release(&s.key).await;
        }
    }
}

#[cfg(test)]
mod tests;
