//! meshbox: run MCP servers in sandboxes and serve their tools over HTTP.
//!
//! Layers, top to bottom: [`cli`] → [`api`] → [`supervisor`] → [`source`],
//! [`mcp`], [`orchestrator`]. Data flows one way; each layer has its own
//! error enum and only the binary turns errors into exit codes.

pub mod api;
pub mod cli;
pub mod config;
pub mod images;
pub mod mcp;
pub mod orchestrator;
pub mod proxy;
pub mod source;
pub mod store;
pub mod supervisor;

/// `outer: cause: cause` for one-line messages (status fields, API errors).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let msg = c.to_string();
        if !s.contains(&msg) {
            s.push_str(": ");
            s.push_str(&msg);
        }
        cur = c.source();
    }
    s
}
