//! MCP over a byte stream: framing, protocol versions and the client session.
//!
//! This layer speaks JSON-RPC over any `AsyncRead`/`AsyncWrite` pair. It knows
//! nothing about processes, containers or services; the supervisor hands it a
//! sandbox's streams and an exit signal.

pub mod framing;
pub mod session;

pub use session::{CallError, LogSink, LogStream, Session, SessionConfig};

/// The handshake version meshbox offers: the newest it speaks.
pub const LATEST_PROTOCOL_VERSION: &str = "2025-11-25";

/// Every version meshbox accepts in a server's `initialize` answer, newest first.
/// All version logic lives here so a later revision is a one-place change.
pub const SUPPORTED_PROTOCOL_VERSIONS: &[&str] =
    &["2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05"];

/// Accepts the version a server answered with, if meshbox speaks it.
pub fn negotiate_version(answered: &str) -> Option<&'static str> {
    SUPPORTED_PROTOCOL_VERSIONS
        .iter()
        .copied()
        .find(|v| *v == answered)
}

#[cfg(test)]
mod tests {
    #[test]
    fn negotiation() {
        assert_eq!(super::negotiate_version("2024-11-05"), Some("2024-11-05"));
        assert_eq!(super::negotiate_version("2025-11-25"), Some("2025-11-25"));
        assert_eq!(super::negotiate_version("1999-01-01"), None);
    }
}
