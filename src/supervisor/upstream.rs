//! What the layers above (the MCP gateway) use of a running service's MCP
//! session, re-exported so they depend on the supervisor only.

pub use crate::mcp::protocol;
pub use crate::mcp::{
    CallError, CallOptions, ClientPeer, ProtocolError, RpcError, ServerInfo, Session,
};
