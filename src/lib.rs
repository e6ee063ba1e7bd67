//! meshbox: run MCP servers in sandboxes and make them usable by anything
//! that speaks MCP.
//!
//! Layers, top to bottom (see docs/ARCHITECTURE.md): [`cli`] → [`api`] →
//! [`supervisor`] → [`acquire`], [`mcp`], [`orchestrator`], [`store`]; the
//! ground floor ([`model`], [`config`], [`environ`]) is shared by all. Data
//! flows one way; each layer has its own error enum and only the binary turns
//! errors into exit codes.

pub mod acquire;
pub mod api;
pub mod cli;
pub mod config;
pub mod environ;
pub mod gateway;
pub mod images;
pub mod mcp;
pub mod metrics;
pub mod model;
pub mod orchestrator;
pub mod proxy;
pub mod secrets;
pub mod store;
pub mod supervisor;
pub mod telemetry;

/// `outer: cause: cause` for one-line messages (status fields, API errors).
/// Messages never repeat their source, so the chain is joined as it is.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
