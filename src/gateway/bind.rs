//! Binds the gateway to the supervisor: each running service's shared
//! [`Session`] as an [`Upstream`], the registry as [`Upstreams`], the
//! supervisor's registry events as [`ServiceEvent`]s (running or not).

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
        let (mut rx, tx) = (supervisor.events(), events.clone());
        let relay = tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(ev) => {
                        let up = ev.phase == Phase::Running;
                        let _ = tx.send(ServiceEvent { key: ev.key, up });
                    }
                    // Missed some: the gateway resyncs on a lag of its own.
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::debug!(missed = n, "service events lagged");
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Arc::new(SupervisorUpstreams {
            supervisor,
            events,
            _relay: AbortOnDrop(relay),
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
