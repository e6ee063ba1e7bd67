//! The supervisor: a registry of services keyed (mesh, name), each with a
//! lifecycle task that starts, watches, health-checks and restarts it.
//!
//! It holds a `dyn Orchestrator` and never names a backend. It validates
//! everything it is given before touching the registry, so bad input changes
//! nothing.

pub mod backoff;
pub mod health;
pub mod logs;
pub mod service;

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;
use tracing::info;

pub use backoff::{BackoffConfig, FailedRetry};
pub use health::Health;
pub use service::{Phase, Service, ServiceStatus};

use crate::config::{validate_name, ServiceSpec, SpecError};
use crate::mcp::CallError;
use crate::orchestrator::{Limits, Orchestrator, OrchestratorError, SandboxSpec};
use crate::source::{InstallConfig, Installer, Source, SourceError};
use crate::store::Store;
use futures_util::StreamExt;

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub mesh: String,
    pub name: String,
}

impl ServiceKey {
    /// A key from untrusted names, validated.
    pub fn parse(mesh: &str, name: &str) -> Result<Self, SpecError> {
        validate_name("mesh", mesh)?;
        validate_name("service name", name)?;
        Ok(ServiceKey {
            mesh: mesh.to_owned(),
            name: name.to_owned(),
        })
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.mesh, self.name)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("spec cannot be run here: {0}")]
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

    pub fn backend(&self) -> &'static str {
        self.orchestrator.backend()
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

    /// Checks a spec completely, without side effects.
    pub fn validate(&self, spec: &ServiceSpec) -> Result<Source, SupervisorError> {
        spec.validate()?;
        let source: Source = spec.source.parse()?;
        match &source {
            Source::Image(_) if self.backend() != "docker" => {
                return Err(SourceError::Unsupported { kind: "image" }.into());
            }
            // A local directory is checked now: a missing dir or entry is bad input.
            Source::Path(dir) => {
                crate::source::check_dir(dir, spec.runtime, spec.command.as_deref())?;
            }
            _ => {}
        }
        let probe = SandboxSpec {
            argv: vec!["probe".into()],
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
        Ok(source)
    }

    /// Starts a service's lifecycle and puts it in the registry.
    fn register(
        &self,
        key: ServiceKey,
        spec: ServiceSpec,
        source: Source,
        adopt: bool,
    ) -> Arc<Service> {
        let svc = Service::launch(
            key.clone(),
            spec,
            source,
            self.orchestrator.clone(),
            self.installer.clone(),
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
        let source = self.validate(&spec)?;
        let lock = self.key_lock(&key);
        let _guard = lock.lock().await;
        // Desired state first: a crash from here on still restores it.
        if let Some(store) = &self.store {
            store.put(&key, &spec)?;
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
        let svc = self.register(key, spec, source, false);
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
        self.orchestrator.released(&key.mesh, &key.name).await;
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
        let keep: Vec<(String, String)> = all
            .iter()
            .map(|(k, _)| (k.mesh.clone(), k.name.clone()))
            .collect();
        self.orchestrator.sweep(&keep).await;
        futures_util::stream::iter(all)
            .for_each_concurrent(parallelism.max(1), |(key, spec)| async move {
                let source: Source = match spec.source.parse() {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(service = %key, error = %e, "stored spec no longer valid; skipped");
                        return;
                    }
                };
                let lock = self.key_lock(&key);
                let _guard = lock.lock().await;
                if self.services.read().expect("registry poisoned").contains_key(&key) {
                    return; // deployed again meanwhile
                }
                let svc = self.register(key, spec, source, true);
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
            self.orchestrator.released(&s.key.mesh, &s.key.name).await;
        }
    }
}

#[cfg(test)]
mod tests;
