//! MCP protocol constants and version logic, in one place: the versions
//! meshbox speaks in each era, method names it treats specially, `_meta`
//! keys of the stateless era, and JSON-RPC error codes.

/// The handshake version meshbox offers: the newest of the handshake era.
pub const LATEST_HANDSHAKE_VERSION: &str = "2025-11-25";

/// The stateless revision.
pub const STATELESS_VERSION: &str = "2026-07-28";

/// Every handshake-era version meshbox accepts in an `initialize` answer,
/// newest first.
pub const HANDSHAKE_VERSIONS: &[&str] = &["2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05"];

/// `_meta` keys every stateless-era request carries.
pub mod meta {
    pub const PROTOCOL_VERSION: &str = "io.modelcontextprotocol/protocolVersion";
    pub const CLIENT_CAPABILITIES: &str = "io.modelcontextprotocol/clientCapabilities";
    pub const CLIENT_INFO: &str = "io.modelcontextprotocol/clientInfo";
    pub const SERVER_INFO: &str = "io.modelcontextprotocol/serverInfo";
    /// Names the client request a server→client request belongs to.
    pub const RELATED_REQUEST_ID: &str = "io.modelcontextprotocol/related-request-id";
    pub const PROGRESS_TOKEN: &str = "progressToken";
    pub const TRACEPARENT: &str = "traceparent";
    pub const TRACESTATE: &str = "tracestate";
}

/// Method names meshbox itself sends or treats specially.
pub mod method {
    pub const INITIALIZE: &str = "initialize";
    pub const INITIALIZED: &str = "notifications/initialized";
    pub const DISCOVER: &str = "server/discover";
    pub const PING: &str = "ping";
    pub const TOOLS_LIST: &str = "tools/list";
    pub const TOOLS_CALL: &str = "tools/call";
    pub const ROOTS_LIST: &str = "roots/list";
    pub const CANCELLED: &str = "notifications/cancelled";
    pub const PROGRESS: &str = "notifications/progress";
    pub const MESSAGE: &str = "notifications/message";
    pub const TOOLS_LIST_CHANGED: &str = "notifications/tools/list_changed";
}

/// JSON-RPC and MCP error codes.
pub mod code {
    pub const PARSE_ERROR: i64 = -32700;
    pub const INVALID_REQUEST: i64 = -32600;
    pub const METHOD_NOT_FOUND: i64 = -32601;
    pub const INVALID_PARAMS: i64 = -32602;
    pub const INTERNAL_ERROR: i64 = -32603;
    /// Stateless era: a header does not match the body.
    pub const HEADER_MISMATCH: i64 = -32020;
    /// Stateless era: the request needs a client capability it lacks.
    pub const MISSING_CAPABILITY: i64 = -32021;
    /// Stateless era: unsupported protocol version.
    pub const UNSUPPORTED_VERSION: i64 = -32022;
}

/// Accepts the version a server answered `initialize` with, if meshbox speaks it.
pub fn negotiate_handshake(answered: &str) -> Option<&'static str> {
    HANDSHAKE_VERSIONS.iter().copied().find(|v| *v == answered)
}

/// Whether a `server/discover` result advertises the stateless revision.
pub fn discover_is_stateless(result: &serde_json::Value) -> bool {
    result
        .get("supportedVersions")
        .and_then(serde_json::Value::as_array)
        .is_some_and(|v| v.iter().any(|x| x.as_str() == Some(STATELESS_VERSION)))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn negotiation() {
        assert_eq!(negotiate_handshake("2024-11-05"), Some("2024-11-05"));
        assert_eq!(negotiate_handshake("2025-11-25"), Some("2025-11-25"));
        assert_eq!(negotiate_handshake("1999-01-01"), None);
        assert_eq!(negotiate_handshake(STATELESS_VERSION), None);
    }

    #[test]
    fn discover_verdict() {
        assert!(discover_is_stateless(
            &json!({"supportedVersions": ["2025-11-25", "2026-07-28"], "capabilities": {}})
        ));
        assert!(!discover_is_stateless(
            &json!({"supportedVersions": ["2025-11-25"]})
        ));
        assert!(!discover_is_stateless(&json!({})));
        assert!(!discover_is_stateless(
            &json!({"supportedVersions": "2026-07-28"})
        ));
    }
}
