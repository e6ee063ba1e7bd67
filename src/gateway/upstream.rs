//! What the gateway needs from the layer below: a shared MCP session per
//! running service ([`Upstream`]) and the registry that hands them out
//! ([`Upstreams`]).
//!
//! The traits mirror the supervisor's session API (`Session::request`,
//! `notifications`, `Service::session`) and reuse its types (`CallOptions`,
//! `ClientPeer`, `RpcError`, `ServerInfo`), so the HTTP side is tested
//! against an in-process fake and bound to the real sessions by a thin
//! adapter ([`super::bind`]). Nothing here talks to a process.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use tokio::sync::broadcast;
use tokio::time::Instant;

pub use crate::model::{Protocol, ServiceKey};
pub use crate::supervisor::upstream::{CallOptions, ClientPeer, RpcError, ServerInfo};

/// Why an upstream call did not produce a result.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    /// The server answered with a JSON-RPC error.
    #[error("the server answered with error {}: {}", .0.code, .0.message)]
    Rpc(RpcError),
    #[error("no answer within {}ms", .0.as_millis())]
    Timeout(Duration),
    #[error("service {key} is not deployed")]
    NotFound { key: ServiceKey },
    /// Not running, exited, or its session closed.
    #[error("service {key} is unavailable: {reason}")]
    Unavailable { key: ServiceKey, reason: String },
    /// The session's queues are full.
    #[error("service {key} is busy")]
    Busy { key: ServiceKey },
    #[error("the server broke the protocol: {0}")]
    Protocol(String),
}

/// One running service's shared MCP session.
#[async_trait]
pub trait Upstream: Send + Sync {
    fn info(&self) -> ServerInfo;
    /// The server's era, without copying its [`ServerInfo`].
    fn protocol(&self) -> Protocol {
        self.info().protocol
    }
    /// The server's tools as last listed (for `Mcp-Param-*` validation).
    fn tools(&self) -> Arc<Vec<Value>>;
    /// Any request; dropping the future before it resolves cancels it upstream.
    async fn request(
        &self,
        method: &str,
        params: Option<Value>,
        opts: CallOptions,
    ) -> Result<Value, UpstreamError>;
    /// A notification to the server; never blocks.
    fn notify(&self, method: &str, params: Option<Value>) -> Result<(), UpstreamError>;
    /// Server notifications not tied to one call (list_changed, resources/updated, message).
    fn notifications(&self) -> broadcast::Receiver<Arc<Value>>;
    fn is_closed(&self) -> bool;
}

/// A service came up or went down.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceEvent {
    pub key: ServiceKey,
    /// Running (true) or anything else (false, including undeployed).
    pub up: bool,
}

/// The registry of services, as the gateway sees it.
#[async_trait]
pub trait Upstreams: Send + Sync {
    /// The live session of `key`, waiting through starts and restarts up to `deadline`.
    async fn upstream(
        &self,
        key: &ServiceKey,
        deadline: Instant,
    ) -> Result<Arc<dyn Upstream>, UpstreamError>;
    /// Whether `key` is deployed (in any phase).
    fn exists(&self, key: &ServiceKey) -> bool;
    /// Names of the running services of `mesh`, sorted.
    fn running(&self, mesh: &str) -> Vec<String>;
    /// Default per-call timeout of `key`.
    fn call_timeout(&self, key: &ServiceKey) -> Duration;
    /// Registry and phase changes.
    fn events(&self) -> broadcast::Receiver<ServiceEvent>;
}
