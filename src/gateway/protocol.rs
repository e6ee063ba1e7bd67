//! MCP over Streamable HTTP, the wire part: protocol versions of both eras,
//! error codes, header names, parsing and checking one POSTed JSON-RPC
//! message, and the `Mcp-Name` value encoding. No I/O, no state.

use axum::http::HeaderMap;
use base64::Engine;
use serde_json::{json, Map, Value};

use super::upstream::RpcError;

// Versions, JSON-RPC codes and `_meta` keys are the session's (one list).
pub use crate::mcp::protocol::code::{
    HEADER_MISMATCH, INTERNAL_ERROR, INVALID_PARAMS, INVALID_REQUEST, METHOD_NOT_FOUND,
    MISSING_CAPABILITY as MISSING_CLIENT_CAPABILITY, PARSE_ERROR, UNSUPPORTED_VERSION,
};
pub use crate::mcp::protocol::meta::{
    CLIENT_CAPABILITIES as META_CLIENT_CAPABILITIES, CLIENT_INFO as META_CLIENT_INFO,
    PROTOCOL_VERSION as META_PROTOCOL_VERSION, SERVER_INFO as META_SERVER_INFO,
};
/// Handshake-era versions a client may negotiate in `initialize`, newest first.
pub use crate::mcp::protocol::HANDSHAKE_VERSIONS as LEGACY_VERSIONS;
/// The stateless era's versions, newest first.
pub const MODERN_VERSIONS: &[&str] = &[crate::mcp::protocol::STATELESS_VERSION];
/// meshbox's own codes, outside the JSON-RPC reserved range.
pub const UPSTREAM_UNAVAILABLE: i64 = -31001;
pub const UPSTREAM_TIMEOUT: i64 = -31002;
pub const GATEWAY_BUSY: i64 = -31003;

pub const H_PROTOCOL_VERSION: &str = "mcp-protocol-version";
pub const H_METHOD: &str = "mcp-method";
pub const H_NAME: &str = "mcp-name";
pub const H_SESSION: &str = "mcp-session-id";
/// `Mcp-Param-{Name}`: a tool argument the tool's schema marks with `x-mcp-header`.
pub const H_PARAM_PREFIX: &str = "mcp-param-";

pub const META_SUBSCRIPTION_ID: &str = "io.modelcontextprotocol/subscriptionId";

/// Longest accepted method name and string id.
const MAX_METHOD: usize = 256;
const MAX_ID: usize = 256;

/// Methods the stateless era removed: 404 + -32601 there.
pub const REMOVED_IN_STATELESS: &[&str] = &[
    "initialize",
    "ping",
    "logging/setLevel",
    "resources/subscribe",
    "resources/unsubscribe",
    "notifications/initialized",
];

/// Results that carry caching hints in the stateless era.
pub fn is_cacheable(method: &str) -> bool {
    matches!(
        method,
        "server/discover"
            | "tools/list"
            | "prompts/list"
            | "resources/list"
            | "resources/templates/list"
            | "resources/read"
    )
}

/// Requests that may answer with `input_required` (and so are bridged).
pub fn may_need_input(method: &str) -> bool {
    matches!(method, "tools/call" | "prompts/get" | "resources/read")
}

/// A JSON-RPC error object.
pub fn rpc_error(code: i64, message: impl Into<String>) -> RpcError {
    RpcError {
        code,
        message: message.into(),
        data: None,
    }
}

/// One POSTed JSON-RPC message.
#[derive(Debug, Clone)]
pub enum Incoming {
    Request {
        id: Value,
        method: String,
        params: Option<Map<String, Value>>,
    },
    Notification {
        method: String,
        params: Option<Map<String, Value>>,
    },
    Response {
        id: Value,
        outcome: Result<Value, RpcError>,
    },
}

/// A message that cannot be handled: the id to answer with (null when
/// unknown) and the error.
#[derive(Debug, Clone)]
pub struct Rejected {
    pub id: Value,
    pub error: RpcError,
}

fn invalid(id: Value, message: impl Into<String>) -> Rejected {
    Rejected {
        id,
        error: rpc_error(INVALID_REQUEST, message),
    }
}

/// Parses and shape-checks one message. Nesting deeper than serde_json's
/// recursion limit is a parse error; batches are refused.
pub fn parse(body: &[u8]) -> Result<Incoming, Rejected> {
    let v: Value = serde_json::from_slice(body).map_err(|e| Rejected {
        id: Value::Null,
        error: rpc_error(PARSE_ERROR, format!("invalid JSON: {e}")),
    })?;
    let mut obj = match v {
        Value::Object(o) => o,
        Value::Array(_) => return Err(invalid(Value::Null, "JSON-RPC batches are not supported")),
        _ => return Err(invalid(Value::Null, "a JSON-RPC message must be an object")),
    };
    let id = match obj.get("id") {
        None => None,
        Some(Value::String(s)) if s.len() <= MAX_ID => Some(Value::String(s.clone())),
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => Some(Value::Number(n.clone())),
        Some(_) => {
            return Err(invalid(
                Value::Null,
                format!("`id` must be a string of at most {MAX_ID} bytes or an integer"),
            ))
        }
    };
    let echo = id.clone().unwrap_or(Value::Null);
    if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err(invalid(echo, "`jsonrpc` must be \"2.0\""));
    }
    if let Some(m) = obj.remove("method") {
        let method = match m {
            Value::String(m) if !m.is_empty() && m.len() <= MAX_METHOD => m,
            _ => {
                return Err(invalid(
                    echo,
                    format!("`method` must be a string of 1 to {MAX_METHOD} bytes"),
                ))
            }
        };
        let params = match obj.remove("params") {
            None | Some(Value::Null) => None,
            Some(Value::Object(p)) => Some(p),
            Some(_) => {
                return Err(Rejected {
                    id: echo,
                    error: rpc_error(INVALID_PARAMS, "`params` must be an object"),
                })
            }
        };
        return Ok(match id {
            Some(id) => Incoming::Request { id, method, params },
            None => Incoming::Notification { method, params },
        });
    }
    let Some(id) = id else {
        return Err(invalid(
            echo,
            "a message needs `method`, or `id` with `result` or `error`",
        ));
    };
    match (obj.get("result"), obj.get("error")) {
        (Some(r), None) => Ok(Incoming::Response {
            id,
            outcome: Ok(r.clone()),
        }),
        (None, Some(e)) => {
            let code = e.get("code").and_then(Value::as_i64);
            let message = e.get("message").and_then(Value::as_str);
            match (code, message) {
                (Some(code), Some(message)) => Ok(Incoming::Response {
                    id,
                    outcome: Err(RpcError {
                        code,
                        message: message.to_owned(),
                        data: e.get("data").cloned(),
                    }),
                }),
                _ => Err(invalid(
                    id,
                    "`error` needs an integer `code` and a string `message`",
                )),
            }
        }
        _ => Err(invalid(
            id,
            "a response needs exactly one of `result` and `error`",
        )),
    }
}

/// `{"jsonrpc":"2.0","id":…,"error":{…}}`.
pub fn error_message(id: &Value, e: &RpcError) -> Value {
    let mut err = json!({ "code": e.code, "message": e.message });
    if let Some(d) = &e.data {
        err["data"] = d.clone();
    }
    json!({ "jsonrpc": "2.0", "id": id, "error": err })
}

/// `{"jsonrpc":"2.0","id":…,"result":…}`.
pub fn result_message(id: &Value, result: Value) -> Value {
    json!({ "jsonrpc": "2.0", "id": id, "result": result })
}

/// A header's value, trimmed; `None` when absent or not visible ASCII.
pub fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

/// Decodes an `Mcp-Name`/`Mcp-Param-*` value (`=?base64?…?=` or plain);
/// `None` when the Base64 is not canonical (padding, alphabet) or not UTF-8.
pub fn decode_header_value(v: &str) -> Option<String> {
    match v
        .strip_prefix("=?base64?")
        .and_then(|r| r.strip_suffix("?="))
    {
        Some(b64) => base64::engine::general_purpose::STANDARD
            .decode(b64)
            .ok()
            .and_then(|b| String::from_utf8(b).ok()),
        None => Some(v.to_owned()),
    }
}

/// Schema nesting followed, and annotations read, per tool at most
/// (the tool list comes from the server).
const MAX_PARAM_DEPTH: usize = 8;
const MAX_PARAM_HEADERS: usize = 64;

/// A parameter a tool mirrors into a header: its path under `arguments`
/// (a chain of `properties` keys), the header's name part, lowercased, and
/// the declared JSON type.
#[derive(Debug, Clone, PartialEq)]
struct Mirrored {
    path: Vec<String>,
    name: String,
    kind: String,
}

/// An RFC 9110 token: what an `x-mcp-header` value must be.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// The `x-mcp-header` annotations of an input schema that are statically
/// reachable (through `properties` only); others are not recognized.
fn mirrored(schema: &Value, path: &mut Vec<String>, out: &mut Vec<Mirrored>) {
    let Some(props) = schema.get("properties").and_then(Value::as_object) else {
        return;
    };
    for (key, def) in props {
        if out.len() >= MAX_PARAM_HEADERS {
            return;
        }
        path.push(key.clone());
        if let Some(name) = def.get("x-mcp-header").and_then(Value::as_str) {
            if is_token(name) {
                out.push(Mirrored {
                    path: path.clone(),
                    name: name.to_ascii_lowercase(),
                    kind: def
                        .get("type")
                        .and_then(Value::as_str)
                        .unwrap_or("string")
                        .to_owned(),
                });
            }
        } else if path.len() < MAX_PARAM_DEPTH {
            mirrored(def, path, out);
        }
        path.pop();
    }
}

/// Whether a decoded header value stands for `body` of the declared `kind`.
fn param_matches(header: &str, body: &Value, kind: &str) -> bool {
    match (kind, body) {
        (_, Value::String(s)) => header == s,
        (_, Value::Bool(b)) => header == if *b { "true" } else { "false" },
        (_, Value::Number(n)) => match (header.parse::<f64>(), n.as_f64()) {
            (Ok(h), Some(b)) => {
                h == b
                    && header
                        .bytes()
                        .all(|c| c.is_ascii_digit() || b"+-.eE".contains(&c))
            }
            _ => false,
        },
        _ => false,
    }
}

/// The `Mcp-Param-*` headers of a request (usually none).
#[derive(Debug, Clone, Default)]
pub struct ParamHeaders(Vec<(String, axum::http::HeaderValue)>);

impl ParamHeaders {
    pub fn of(headers: &HeaderMap) -> Self {
        ParamHeaders(
            headers
                .iter()
                .filter_map(|(k, v)| {
                    let name = k.as_str().strip_prefix(H_PARAM_PREFIX)?;
                    Some((name.to_owned(), v.clone()))
                })
                .collect(),
        )
    }

    /// Checks a `tools/call`'s headers against its `arguments` for each
    /// parameter `tool`'s input schema mirrors: present and equal (after
    /// decoding) when the argument has a value, absent when it has none.
    /// Headers the tool does not declare are ignored (SEP-2243).
    pub fn check(&self, tool: &Value, arguments: Option<&Value>) -> Result<(), RpcError> {
        let mut params = Vec::new();
        if let Some(schema) = tool.get("inputSchema") {
            mirrored(schema, &mut Vec::new(), &mut params);
        }
        for m in params {
            let header = format!("Mcp-Param-{}", m.name);
            let mut values = self.0.iter().filter(|(n, _)| *n == m.name).map(|(_, v)| v);
            let (first, second) = (values.next(), values.next());
            let body = arguments
                .and_then(|a| m.path.iter().try_fold(a, |v, k| v.get(k)))
                .filter(|v| !v.is_null());
            let raw = match (first, second, body) {
                (None, _, None) => continue,
                (Some(_), Some(_), _) => {
                    return Err(header_mismatch(format!("{header} is sent more than once")))
                }
                (None, _, Some(_)) => {
                    return Err(header_mismatch(format!(
                        "{header} is missing but the argument `{}` has a value",
                        m.path.join(".")
                    )))
                }
                (Some(_), _, None) => {
                    return Err(header_mismatch(format!(
                        "{header} is sent but the argument `{}` has no value",
                        m.path.join(".")
                    )))
                }
                (Some(v), None, Some(_)) => v,
            };
            let Some(text) = raw.to_str().ok().map(str::trim) else {
                return Err(header_mismatch(format!(
                    "{header} holds characters a header value cannot"
                )));
            };
            let Some(decoded) = decode_header_value(text) else {
                return Err(header_mismatch(format!("{header} is badly Base64-encoded")));
            };
            let body = body.expect("matched Some above");
            if !param_matches(&decoded, body, &m.kind) {
                return Err(header_mismatch(format!(
                    "{header} `{}` does not match the argument `{}`",
                    crate::model::shown(&decoded, 80),
                    m.path.join(".")
                )));
            }
        }
        Ok(())
    }
}

/// The body value `Mcp-Name` mirrors: `params.name` or `params.uri`.
pub fn name_source<'a>(method: &str, params: Option<&'a Map<String, Value>>) -> Option<&'a Value> {
    let key = match method {
        "tools/call" | "prompts/get" => "name",
        "resources/read" => "uri",
        _ => return None,
    };
    params.and_then(|p| p.get(key))
}

fn header_mismatch(message: String) -> RpcError {
    rpc_error(HEADER_MISMATCH, format!("header mismatch: {message}"))
}

/// Checks a stateless request's `_meta` and headers against its body, in
/// the order the specification gives: required `_meta` fields (-32602),
/// the protocol-version header (-32020), the version itself (-32022), then
/// `Mcp-Method` and `Mcp-Name` (-32020). Returns the requested version.
pub fn check_stateless(
    headers: &HeaderMap,
    method: &str,
    params: Option<&Map<String, Value>>,
) -> Result<String, RpcError> {
    let meta = params
        .and_then(|p| p.get("_meta"))
        .and_then(Value::as_object);
    let Some(meta) = meta else {
        return Err(rpc_error(
            INVALID_PARAMS,
            format!("params._meta is required and must carry `{META_PROTOCOL_VERSION}` and `{META_CLIENT_CAPABILITIES}`"),
        ));
    };
    let Some(version) = meta.get(META_PROTOCOL_VERSION).and_then(Value::as_str) else {
        return Err(rpc_error(
            INVALID_PARAMS,
            format!("params._meta[\"{META_PROTOCOL_VERSION}\"] must be a string"),
        ));
    };
    if !meta
        .get(META_CLIENT_CAPABILITIES)
        .is_some_and(Value::is_object)
    {
        return Err(rpc_error(
            INVALID_PARAMS,
            format!("params._meta[\"{META_CLIENT_CAPABILITIES}\"] must be an object"),
        ));
    }
    match header(headers, H_PROTOCOL_VERSION) {
        None => {
            return Err(header_mismatch(
                "MCP-Protocol-Version header is missing".into(),
            ))
        }
        Some(h) if h != version => {
            return Err(header_mismatch(format!(
                "MCP-Protocol-Version header `{}` does not match _meta version `{}`",
                crate::model::shown(h, 40),
                crate::model::shown(version, 40)
            )))
        }
        Some(_) => {}
    }
    if !MODERN_VERSIONS.contains(&version) {
        return Err(RpcError {
            data: Some(json!({ "supported": MODERN_VERSIONS, "requested": version })),
            ..rpc_error(UNSUPPORTED_VERSION, "unsupported protocol version")
        });
    }
    match header(headers, H_METHOD) {
        None => return Err(header_mismatch("Mcp-Method header is missing".into())),
        Some(h) if h != method => {
            return Err(header_mismatch(format!(
                "Mcp-Method header `{}` does not match body method `{}`",
                crate::model::shown(h, 60),
                crate::model::shown(method, 60)
            )))
        }
        Some(_) => {}
    }
    if let Some(src) = name_source(method, params) {
        let Some(body_name) = src.as_str() else {
            return Err(rpc_error(
                INVALID_PARAMS,
                "params.name / params.uri must be a string",
            ));
        };
        match header(headers, H_NAME).map(decode_header_value) {
            None => return Err(header_mismatch("Mcp-Name header is missing".into())),
            Some(None) => return Err(header_mismatch("Mcp-Name header is badly encoded".into())),
            Some(Some(h)) if h != body_name => {
                return Err(header_mismatch(format!(
                    "Mcp-Name header `{}` does not match body value `{}`",
                    crate::model::shown(&h, 80),
                    crate::model::shown(body_name, 80)
                )))
            }
            Some(Some(_)) => {}
        }
    }
    Ok(version.to_owned())
}

/// Whether a request is in the stateless era's shape: a modern
/// `MCP-Protocol-Version` header or a `_meta` protocol version.
pub fn looks_modern(headers: &HeaderMap, params: Option<&Map<String, Value>>) -> bool {
    let header_modern =
        header(headers, H_PROTOCOL_VERSION).is_some_and(|v| !LEGACY_VERSIONS.contains(&v));
    let meta_modern = params
        .and_then(|p| p.get("_meta"))
        .and_then(|m| m.get(META_PROTOCOL_VERSION))
        .is_some();
    header_modern || meta_modern
}

/// The HTTP status a JSON-RPC error is sent with to a stateless client.
pub fn stateless_status(code: i64) -> axum::http::StatusCode {
    use axum::http::StatusCode;
    match code {
        METHOD_NOT_FOUND => StatusCode::NOT_FOUND,
        HEADER_MISMATCH
        | MISSING_CLIENT_CAPABILITY
        | UNSUPPORTED_VERSION
        | PARSE_ERROR
        | INVALID_REQUEST => StatusCode::BAD_REQUEST,
        _ => StatusCode::OK,
    }
}

/// Whether the client's `Accept` allows an SSE answer.
pub fn accepts_sse(headers: &HeaderMap) -> bool {
    headers
        .get_all(axum::http::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("text/event-stream") || v.contains("*/*"))
}

/// Marks a result for a stateless client: `resultType` (absent means
/// complete) and, on cacheable complete results, `ttlMs`/`cacheScope`.
pub fn finish_stateless_result(method: &str, result: &mut Value, ttl_ms: u64) {
    let Some(obj) = result.as_object_mut() else {
        return;
    };
    let complete = match obj.get("resultType") {
        None => {
            obj.insert("resultType".into(), json!("complete"));
            true
        }
        Some(t) => t == "complete",
    };
    if complete && is_cacheable(method) {
        obj.entry("ttlMs").or_insert(json!(ttl_ms));
        // Behind bearer tokens, a shared cache must not mix callers.
        obj.entry("cacheScope").or_insert(json!("private"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn hdrs(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn parse_shapes() {
        assert!(matches!(
            parse(br#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#).unwrap(),
            Incoming::Request { .. }
        ));
        assert!(matches!(
            parse(br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#).unwrap(),
            Incoming::Notification { .. }
        ));
        assert!(matches!(
            parse(br#"{"jsonrpc":"2.0","id":"a","result":{}}"#).unwrap(),
            Incoming::Response { outcome: Ok(_), .. }
        ));
        let bad: &[(&[u8], i64)] = &[
            (b"not json", PARSE_ERROR),
            (b"[]", INVALID_REQUEST),
            (b"7", INVALID_REQUEST),
            (br#"{"id":1,"method":"x"}"#, INVALID_REQUEST),
            (
                br#"{"jsonrpc":"2.0","id":1.5,"method":"x"}"#,
                INVALID_REQUEST,
            ),
            (
                br#"{"jsonrpc":"2.0","id":{},"method":"x"}"#,
                INVALID_REQUEST,
            ),
            (br#"{"jsonrpc":"2.0","id":1,"method":7}"#, INVALID_REQUEST),
            (
                br#"{"jsonrpc":"2.0","id":1,"method":"x","params":[1]}"#,
                INVALID_PARAMS,
            ),
            (br#"{"jsonrpc":"2.0","id":1}"#, INVALID_REQUEST),
            (
                br#"{"jsonrpc":"2.0","id":1,"result":1,"error":{}}"#,
                INVALID_REQUEST,
            ),
            (
                br#"{"jsonrpc":"2.0","id":1,"error":{"code":"x"}}"#,
                INVALID_REQUEST,
            ),
        ];
        for (body, code) in bad {
            let e = parse(body).unwrap_err();
            assert_eq!(e.error.code, *code, "{}", String::from_utf8_lossy(body));
        }
        // The id is echoed when it is readable.
        assert_eq!(
            parse(br#"{"jsonrpc":"1.0","id":7,"method":"x"}"#)
                .unwrap_err()
                .id,
            json!(7)
        );
        // Deep nesting is a parse error, not a stack overflow.
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(parse(deep.as_bytes()).unwrap_err().error.code, PARSE_ERROR);
    }

    fn meta() -> Value {
        json!({ "_meta": {
            META_PROTOCOL_VERSION: "2026-07-28",
            META_CLIENT_CAPABILITIES: {}
        }, "name": "echo" })
    }

    #[test]
    fn stateless_checks_in_order() {
        let p = meta();
        let p = p.as_object();
        let good = hdrs(&[
            (H_PROTOCOL_VERSION, "2026-07-28"),
            (H_METHOD, "tools/call"),
            (H_NAME, " echo "),
        ]);
        assert_eq!(
            check_stateless(&good, "tools/call", p).unwrap(),
            "2026-07-28"
        );
        let b64 = hdrs(&[
            (H_PROTOCOL_VERSION, "2026-07-28"),
            (H_METHOD, "tools/call"),
            (H_NAME, "=?base64?ZWNobw==?="),
        ]);
        assert!(check_stateless(&b64, "tools/call", p).is_ok());
        let code = |h: &HeaderMap, m: &str, p: Option<&Map<String, Value>>| {
            check_stateless(h, m, p).unwrap_err().code
        };
        assert_eq!(code(&good, "tools/call", None), INVALID_PARAMS);
        let no_caps = json!({"_meta": {META_PROTOCOL_VERSION: "2026-07-28"}});
        assert_eq!(
            code(&good, "tools/list", no_caps.as_object()),
            INVALID_PARAMS
        );
        assert_eq!(
            code(&hdrs(&[(H_METHOD, "tools/call")]), "tools/call", p),
            HEADER_MISMATCH
        );
        let other = hdrs(&[(H_PROTOCOL_VERSION, "2025-11-25"), (H_METHOD, "tools/call")]);
        assert_eq!(code(&other, "tools/call", p), HEADER_MISMATCH);
        let wrong_method = hdrs(&[
            (H_PROTOCOL_VERSION, "2026-07-28"),
            (H_METHOD, "Tools/call"),
            (H_NAME, "echo"),
        ]);
        assert_eq!(code(&wrong_method, "tools/call", p), HEADER_MISMATCH);
        let wrong_name = hdrs(&[
            (H_PROTOCOL_VERSION, "2026-07-28"),
            (H_METHOD, "tools/call"),
            (H_NAME, "other"),
        ]);
        assert_eq!(code(&wrong_name, "tools/call", p), HEADER_MISMATCH);
        let no_name = hdrs(&[(H_PROTOCOL_VERSION, "2026-07-28"), (H_METHOD, "tools/call")]);
        assert_eq!(code(&no_name, "tools/call", p), HEADER_MISMATCH);
        let future =
            json!({"_meta": {META_PROTOCOL_VERSION: "2099-01-01", META_CLIENT_CAPABILITIES: {}}});
        let e = check_stateless(
            &hdrs(&[(H_PROTOCOL_VERSION, "2099-01-01"), (H_METHOD, "tools/list")]),
            "tools/list",
            future.as_object(),
        )
        .unwrap_err();
        assert_eq!(e.code, UNSUPPORTED_VERSION);
        assert_eq!(e.data.unwrap()["requested"], "2099-01-01");
    }

    #[test]
    fn caching_hints() {
        let mut r = json!({"tools": []});
        finish_stateless_result("tools/list", &mut r, 5000);
        assert_eq!(r["resultType"], "complete");
        assert_eq!(r["ttlMs"], 5000);
        assert_eq!(r["cacheScope"], "private");
        let mut r = json!({"resultType": "input_required", "inputRequests": {}});
        finish_stateless_result("resources/read", &mut r, 5000);
        assert!(r.get("ttlMs").is_none());
        let mut r = json!({"content": []});
        finish_stateless_result("tools/call", &mut r, 5000);
        assert_eq!(r["resultType"], "complete");
        assert!(r.get("ttlMs").is_none());
    }
}
