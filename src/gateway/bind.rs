//! Binds the gateway to the supervisor: each running service's shared
//! [`Session`] as an [`Upstream`], the registry as [`Upstreams`].
//!
//! Until the supervisor publishes registry events, service ups and downs are
//! found by looking at the registry twice a second; the gateway only needs
//! them for list_changed, so a late event costs at most that much.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{json, Value};
use tokio::sync::broadcast;
use tokio::time::Instant;

use super::bridge::AbortOnDrop;
use super::upstream::{
    CallOptions, ServerInfo, ServiceEvent, ServiceKey, Upstream, UpstreamError, Upstreams,
};
use crate::model::Protocol;
use crate::supervisor::upstream::{CallError, RpcError, Session};
use crate::supervisor::{Phase, Supervisor, SupervisorError};

/// How often the registry is looked at for ups and downs.
const POLL: Duration = Duration::from_millis(500);
/// The call timeout of a service that vanished meanwhile.
const FALLBACK_TIMEOUT: Duration = Duration::from_secs(25);

struct SessionUpstream {
    key: ServiceKey,
    session: Arc<Session>,
}

fn from_call(key: &ServiceKey, e: CallError) -> UpstreamError {
    match e {
        CallError::Timeout(d) => UpstreamError::Timeout(d),
        CallError::Rpc {
            code,
            message,
            data,
        } => UpstreamError::Rpc(RpcError {
            code,
            message,
            data,
        }),
        CallError::Protocol(p) => UpstreamError::Protocol(p.to_string()),
        other @ (CallError::Exited(_) | CallError::StdoutClosed | CallError::Closed) => {
            UpstreamError::Unavailable {
                key: key.clone(),
                reason: other.to_string(),
            }
        }
    }
}

fn from_supervisor(key: &ServiceKey, e: SupervisorError) -> UpstreamError {
    match e {
        SupervisorError::NotFound { key } => UpstreamError::NotFound { key },
        SupervisorError::Call { source, .. } => from_call(key, source),
        other => UpstreamError::Unavailable {
            key: key.clone(),
            reason: crate::error_chain(&other),
        },
    }
}

#[async_trait]
impl Upstream for SessionUpstream {
    fn info(&self) -> ServerInfo {
        self.session.info().cloned().unwrap_or_else(|| ServerInfo {
            protocol: Protocol::Handshake,
            protocol_version: String::new(),
            server_info: json!({ "name": self.key.to_string(), "version": "unknown" }),
            capabilities: json!({}),
            instructions: None,
            discover: None,
        })
    }

    async fn request(
        &self,
        method: &str,
        params: Option<Value>,
        opts: CallOptions,
    ) -> Result<Value, UpstreamError> {
        self.session
            .request(method, params, opts)
            .await
            .map_err(|e| from_call(&self.key, e))
    }

    fn notify(&self, method: &str, params: Option<Value>) -> Result<(), UpstreamError> {
        self.session
            .notify(method, params)
            .map_err(|e| from_call(&self.key, e))
    }

    fn notifications(&self) -> broadcast::Receiver<Arc<Value>> {
        self.session.notifications()
    }

    fn is_closed(&self) -> bool {
        self.session.is_closed()
    }
}

/// The supervisor, as the gateway sees it.
pub struct SupervisorUpstreams {
    supervisor: Arc<Supervisor>,
    events: broadcast::Sender<ServiceEvent>,
    _poller: AbortOnDrop<()>,
}

impl SupervisorUpstreams {
    /// Needs a tokio runtime (it starts the registry watcher).
    pub fn new(supervisor: Arc<Supervisor>) -> Arc<Self> {
        let (events, _) = broadcast::channel(256);
        let (sup, tx) = (supervisor.clone(), events.clone());
        let poller = tokio::spawn(async move {
            let mut up: HashMap<ServiceKey, bool> = HashMap::new();
            let mut tick = tokio::time::interval(POLL);
            loop {
                tick.tick().await;
                let now: HashMap<ServiceKey, bool> = sup
                    .list(None)
                    .into_iter()
                    .map(|s| {
                        let running = s.status == Phase::Running;
                        (
                            ServiceKey {
                                mesh: s.mesh,
                                name: s.name,
                            },
                            running,
                        )
                    })
                    .collect();
                for (k, r) in &now {
                    if up.get(k) != Some(r) {
                        let _ = tx.send(ServiceEvent {
                            key: k.clone(),
                            up: *r,
                        });
                    }
                }
                for k in up.keys().filter(|k| !now.contains_key(*k)) {
                    let _ = tx.send(ServiceEvent {
                        key: k.clone(),
                        up: false,
                    });
                }
                up = now;
            }
        });
        Arc::new(SupervisorUpstreams {
            supervisor,
            events,
            _poller: AbortOnDrop(poller),
        })
    }
}

#[async_trait]
impl Upstreams for SupervisorUpstreams {
    async fn upstream(
        &self,
        key: &ServiceKey,
        deadline: Instant,
    ) -> Result<Arc<dyn Upstream>, UpstreamError> {
        let svc = self
            .supervisor
            .get(key)
            .map_err(|e| from_supervisor(key, e))?;
        let session = svc
            .session(deadline)
            .await
            .map_err(|e| from_supervisor(key, e))?;
        Ok(Arc::new(SessionUpstream {
            key: key.clone(),
            session,
        }))
    }

    fn exists(&self, key: &ServiceKey) -> bool {
        self.supervisor.get(key).is_ok()
    }

    fn running(&self, mesh: &str) -> Vec<String> {
        self.supervisor
            .list(Some(mesh))
            .into_iter()
            .filter(|s| s.status == Phase::Running)
            .map(|s| s.name)
            .collect()
    }

    fn call_timeout(&self, key: &ServiceKey) -> Duration {
        self.supervisor
            .get(key)
            .map(|s| s.spec.call_timeout())
            .unwrap_or(FALLBACK_TIMEOUT)
    }

    fn events(&self) -> broadcast::Receiver<ServiceEvent> {
        self.events.subscribe()
    }
}
