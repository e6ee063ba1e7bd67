//! MCP over a byte stream: framing, protocol constants and the client session.
//!
//! This layer speaks JSON-RPC over any `AsyncRead`/`AsyncWrite` pair, in
//! both protocol eras. It knows nothing about processes, containers or
//! services; the supervisor hands it a sandbox's streams and an exit signal.

pub mod framing;
pub mod protocol;
pub mod session;

pub use session::{
    CallError, CallOptions, ClientPeer, ConnectError, LogSink, ProtocolError, RpcError, ServerInfo,
    Session, SessionConfig,
};
