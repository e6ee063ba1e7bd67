//! Binds the gateway to the supervisor: each running service's shared
//! [`Session`] as an [`Upstream`], the registry as [`Upstreams`], the
//! supervisor's registry events as [`ServiceEvent`]s (running or not).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{json, Value};
use tokio::sync::broadcast;
use tokio::time::Instant;
use tracing::Instrument;

use super::bridge::AbortOnDrop;
use super::upstream::{
    CallOptions, ServerInfo, ServiceEvent, ServiceKey, Upstream, UpstreamError, Upstreams,
};
use crate::mcp::protocol::method::TOOLS_CALL;
use crate::metrics::{Outcome, ServiceMetrics};
use crate::model::Protocol;
use crate::supervisor::upstream::{CallError, RpcError, Session};
use crate::supervisor::{Phase, Supervisor, SupervisorError};

/// The call timeout of a service that vanished meanwhile.
const FALLBACK_TIMEOUT: Duration = Duration::from_secs(25);

struct SessionUpstream {
    key: ServiceKey,
    session: Arc<Session>,
    metrics: Arc<ServiceMetrics>,
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

fn call_outcome(r: &Result<Value, UpstreamError>) -> Outcome {
    match r {
        Ok(v) if v.get("isError").and_then(Value::as_bool) == Some(true) => Outcome::tool_error,
        Ok(_) => Outcome::ok,
        Err(UpstreamError::Rpc(_) | UpstreamError::Protocol(_)) => Outcome::rpc_error,
        Err(UpstreamError::Timeout(_)) => Outcome::timeout,
        Err(
            UpstreamError::NotFound { .. }
            | UpstreamError::Unavailable { .. }
            | UpstreamError::Busy { .. },
        ) => Outcome::unavailable,
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

    fn protocol(&self) -> Protocol {
        self.session
            .info()
            .map_or(Protocol::Handshake, |i| i.protocol)
    }

    fn tools(&self) -> Arc<Vec<Value>> {
        self.session.tools()
    }

    async fn request(
        &self,
        method: &str,
        params: Option<Value>,
        mut opts: CallOptions,
    ) -> Result<Value, UpstreamError> {
        let tool = (method == TOOLS_CALL).then(|| {
            params
                .as_ref()
                .and_then(|p| p.get("name"))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        });
        let span = tracing::debug_span!(
            "mcp.request",
            mesh = %self.key.mesh,
            service = %self.key.name,
            method = %method,
            tool = tool.as_deref(),
            outcome = tracing::field::Empty,
        );
        let timer = tool.as_ref().map(|_| self.metrics.start_call());
        let r = async {
            if let Some(trace) = crate::telemetry::upstream_meta() {
                let meta = opts.meta.get_or_insert_with(Default::default);
                for (k, v) in trace {
                    meta.entry(k).or_insert(v);
                }
            }
            self.session
                .request(method, params, opts)
                .await
                .map_err(|e| from_call(&self.key, e))
        }
        .instrument(span.clone())
        .await;
        if let (Some(timer), Some(tool)) = (timer, &tool) {
            let outcome = call_outcome(&r);
            timer.finish(tool, outcome);
            span.record("outcome", outcome.as_str());
        }
        r
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
    _relay: AbortOnDrop<()>,
}

impl SupervisorUpstreams {
    /// Needs a tokio runtime (it relays the supervisor's events).
    pub fn new(supervisor: Arc<Supervisor>) -> Arc<Self> {
        let (events, _) = broadcast::channel(256);
        let sup = supervisor.clone();
        let now = move || {
            sup.list(None)
                .into_iter()
                .filter_map(|s| {
                    Some(ServiceEvent {
                        key: ServiceKey::parse(&s.mesh, &s.name).ok()?,
                        up: s.status == Phase::Running,
                    })
                })
                .collect()
        };
        let relay = tokio::spawn(relay(supervisor.events(), events.clone(), now));
        Arc::new(SupervisorUpstreams {
            supervisor,
            events,
            _relay: AbortOnDrop(relay),
        })
    }
}

/// Relays the supervisor's events as running-or-not. After missing some
/// (a lag), it announces the state of every service instead — `now` lists
/// the deployed ones; one it announced up that is gone is announced down.
async fn relay(
    mut rx: broadcast::Receiver<crate::supervisor::ServiceEvent>,
    tx: broadcast::Sender<ServiceEvent>,
    now: impl Fn() -> Vec<ServiceEvent>,
) {
    // Services last announced up: a lag cannot hide that one went away.
    let mut up: HashSet<ServiceKey> = HashSet::new();
    let announce = |ev: ServiceEvent, up: &mut HashSet<ServiceKey>| {
        if ev.up {
            up.insert(ev.key.clone());
        } else {
            up.remove(&ev.key);
        }
        let _ = tx.send(ev);
    };
    loop {
        match rx.recv().await {
            Ok(ev) => {
                let up_now = ev.phase == Phase::Running;
                announce(
                    ServiceEvent {
                        key: ev.key,
                        up: up_now,
                    },
                    &mut up,
                );
            }
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::debug!(
                    missed = n,
                    "service events lagged: announcing every service"
                );
                let current = now();
                let gone: Vec<ServiceKey> = up
                    .iter()
                    .filter(|k| !current.iter().any(|e| e.key == **k))
                    .cloned()
                    .collect();
                for key in gone {
                    announce(ServiceEvent { key, up: false }, &mut up);
                }
                for ev in current {
                    announce(ev, &mut up);
                }
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
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
            .upstream(deadline)
            .await
            .map_err(|e| from_supervisor(key, e))?;
        Ok(Arc::new(SessionUpstream {
            key: key.clone(),
            session,
            metrics: svc.metrics.clone(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supervisor::ServiceEvent as SupEvent;

    fn key(name: &str) -> ServiceKey {
        ServiceKey::parse("acme", name).unwrap()
    }

    #[tokio::test]
    async fn a_lag_announces_every_service_instead_of_nothing() {
        let (sup_tx, sup_rx) = broadcast::channel(2);
        let (tx, mut out) = broadcast::channel(64);
        let relay_task = tokio::spawn(super::relay(sup_rx, tx, || {
            vec![
                ServiceEvent {
                    key: key("b"),
                    up: true,
                },
                ServiceEvent {
                    key: key("c"),
                    up: false,
                },
            ]
        }));
        let up = |name| SupEvent {
            key: key(name),
            phase: Phase::Running,
        };
        sup_tx.send(up("a")).unwrap();
        assert_eq!(
            out.recv().await.unwrap(),
            ServiceEvent {
                key: key("a"),
                up: true
            }
        );
        // More events than the channel holds, before the relay reads: a lag.
        for name in ["x", "y", "z", "w"] {
            sup_tx
                .send(SupEvent {
                    key: key(name),
                    phase: Phase::Starting,
                })
                .unwrap();
        }
        let mut seen = Vec::new();
        while seen.len() < 3 {
            let ev = tokio::time::timeout(Duration::from_secs(5), out.recv()).await;
            seen.push(ev.expect("nothing announced after the lag").unwrap());
        }
        // `a` went away unseen: announced down; then every service as it is.
        assert_eq!(
            seen,
            [
                ServiceEvent {
                    key: key("a"),
                    up: false
                },
                ServiceEvent {
                    key: key("b"),
                    up: true
                },
                ServiceEvent {
                    key: key("c"),
                    up: false
                },
            ]
        );
        relay_task.abort();
    }
}
