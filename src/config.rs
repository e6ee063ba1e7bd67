//! Service specifications as the API and CLI receive them, and their validation.
//!
//! This module owns the wire shape of a `ServiceSpec` (unknown fields rejected),
//! the name rules for meshes and services, and the range checks on limits. It
//! knows nothing about how a spec is run: that is the supervisor's job.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Longest accepted mesh or service name.
pub const MAX_NAME_LEN: usize = 64;
/// Default per-call timeout (DESIGN.md: 25 s).
pub const DEFAULT_CALL_TIMEOUT_MS: u64 = 25_000;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("invalid {what} `{value}`: must match ^[a-zA-Z0-9][a-zA-Z0-9_-]{{0,63}}$")]
    InvalidName { what: &'static str, value: String },
    #[error("field `{field}` {message}")]
    Field { field: String, message: String },
    #[error("invalid spec: {0}")]
    Json(String),
}

impl SpecError {
    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        SpecError::Field {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Checks a mesh or service name against `^[a-zA-Z0-9][a-zA-Z0-9_-]{0,63}$`.
pub fn validate_name(what: &'static str, value: &str) -> Result<(), SpecError> {
    let bytes = value.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= MAX_NAME_LEN
        && bytes[0].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'-');
    if ok {
        Ok(())
    } else {
        // Never echo control characters or huge inputs back verbatim.
        let shown: String = value
            .chars()
            .take(80)
            .flat_map(char::escape_default)
            .collect();
        Err(SpecError::InvalidName { what, value: shown })
    }
}

/// Where a server runs: the language runtime of its entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    Node,
    Python,
    Bun,
}

impl fmt::Display for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Runtime::Node => "node",
            Runtime::Python => "python",
            Runtime::Bun => "bun",
        })
    }
}

/// Network policy of a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(untagged)]
pub enum NetworkPolicy {
    Mode(NetworkMode),
    Allow {
        allow: Vec<String>,
    },
    #[default]
    #[serde(skip)]
    Unset,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    None,
    Full,
}

impl NetworkPolicy {
    /// The policy in force when a spec names none: full network, as `npx` has.
    pub fn effective(&self) -> NetworkPolicy {
        match self {
            NetworkPolicy::Unset => NetworkPolicy::Mode(NetworkMode::Full),
            other => other.clone(),
        }
    }

    pub fn is_none(&self) -> bool {
        matches!(self, NetworkPolicy::Mode(NetworkMode::None))
    }

    /// Parses the CLI form: `none`, `full` or `allow=host:port,...`.
    pub fn parse_cli(s: &str) -> Result<Self, SpecError> {
        match s {
            "none" => Ok(NetworkPolicy::Mode(NetworkMode::None)),
            "full" => Ok(NetworkPolicy::Mode(NetworkMode::Full)),
            other => match other.strip_prefix("allow=") {
                Some(list) => Ok(NetworkPolicy::Allow {
                    allow: list
                        .split(',')
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect(),
                }),
                None => Err(SpecError::field(
                    "network",
                    format!("must be none, full or allow=host:port,... (got `{other}`)"),
                )),
            },
        }
    }
}

impl fmt::Display for NetworkPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.effective() {
            NetworkPolicy::Mode(NetworkMode::None) => f.write_str("none"),
            NetworkPolicy::Mode(NetworkMode::Full) | NetworkPolicy::Unset => f.write_str("full"),
            NetworkPolicy::Allow { allow } => write!(f, "allow={}", allow.join(",")),
        }
    }
}

/// An environment value: a literal, or a secret read from a file at start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EnvValue {
    Literal(String),
    File { file: PathBuf },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSpec {
    #[serde(default = "HealthSpec::default_interval")]
    pub interval_s: u64,
    #[serde(default = "HealthSpec::default_timeout")]
    pub timeout_s: u64,
    #[serde(default = "HealthSpec::default_threshold")]
    pub failure_threshold: u32,
    /// Readiness tool called on each check; a JSON-RPC error or `isError: true` fails it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arguments: Option<serde_json::Value>,
}

impl HealthSpec {
    fn default_interval() -> u64 {
        30
    }
    fn default_timeout() -> u64 {
        5
    }
    fn default_threshold() -> u32 {
        3
    }
}

impl Default for HealthSpec {
    fn default() -> Self {
        HealthSpec {
            interval_s: Self::default_interval(),
            timeout_s: Self::default_timeout(),
            failure_threshold: Self::default_threshold(),
            tool: None,
            arguments: None,
        }
    }
}

/// What a caller asks meshbox to run. The wire contract of `PUT .../services/{name}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    pub source: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    #[serde(default)]
    pub env: BTreeMap<String, EnvValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<Runtime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
    #[serde(default, skip_serializing_if = "is_unset")]
    pub network: NetworkPolicy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call_timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthSpec>,
}

fn is_unset(n: &NetworkPolicy) -> bool {
    matches!(n, NetworkPolicy::Unset)
}

const MAX_STRING: usize = 4096;
const MAX_ARGS: usize = 256;
const MAX_ENV: usize = 256;

fn check_str(field: &str, s: &str) -> Result<(), SpecError> {
    if s.len() > MAX_STRING {
        return Err(SpecError::field(
            field,
            format!("is longer than {MAX_STRING} bytes"),
        ));
    }
    if s.contains('\0') {
        return Err(SpecError::field(field, "contains a NUL byte"));
    }
    Ok(())
}

fn is_env_key(k: &str) -> bool {
    let b = k.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphabetic() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
}

impl ServiceSpec {
    /// Parses a JSON body, naming unknown fields and wrong types in the error.
    pub fn from_json(bytes: &[u8]) -> Result<Self, SpecError> {
        let spec: ServiceSpec =
            serde_json::from_slice(bytes).map_err(|e| SpecError::Json(e.to_string()))?;
        spec.validate()?;
        Ok(spec)
    }

    /// Range and shape checks that serde cannot express.
    pub fn validate(&self) -> Result<(), SpecError> {
        check_str("source", &self.source)?;
        if self.source.trim().is_empty() {
            return Err(SpecError::field("source", "must not be empty"));
        }
        if self.args.len() > MAX_ARGS {
            return Err(SpecError::field(
                "args",
                format!("has more than {MAX_ARGS} items"),
            ));
        }
        for a in &self.args {
            check_str("args", a)?;
        }
        if let Some(cmd) = &self.command {
            if cmd.is_empty() || cmd[0].is_empty() {
                return Err(SpecError::field("command", "must name a program"));
            }
            if cmd.len() > MAX_ARGS {
                return Err(SpecError::field(
                    "command",
                    format!("has more than {MAX_ARGS} items"),
                ));
            }
            for a in cmd {
                check_str("command", a)?;
            }
        }
        if self.env.len() > MAX_ENV {
            return Err(SpecError::field(
                "env",
                format!("has more than {MAX_ENV} entries"),
            ));
        }
        for (k, v) in &self.env {
            if !is_env_key(k) {
                return Err(SpecError::field(
                    "env",
                    format!(
                        "key `{}` is not a valid variable name",
                        k.chars()
                            .take(64)
                            .flat_map(char::escape_default)
                            .collect::<String>()
                    ),
                ));
            }
            match v {
                EnvValue::Literal(s) => check_str(&format!("env.{k}"), s)?,
                EnvValue::File { file } => {
                    let s = file.to_string_lossy();
                    check_str(&format!("env.{k}.file"), &s)?;
                    if !file.is_absolute() {
                        return Err(SpecError::field(
                            format!("env.{k}.file"),
                            "must be an absolute path",
                        ));
                    }
                }
            }
        }
        if let Some(m) = self.memory_mb {
            if !(16..=65536).contains(&m) {
                return Err(SpecError::field(
                    "memory_mb",
                    "must be between 16 and 65536",
                ));
            }
        }
        if let Some(c) = self.cpus {
            if !(c.is_finite() && (0.01..=64.0).contains(&c)) {
                return Err(SpecError::field("cpus", "must be between 0.01 and 64"));
            }
        }
        if let Some(p) = self.pids {
            if !(8..=32768).contains(&p) {
                return Err(SpecError::field("pids", "must be between 8 and 32768"));
            }
        }
        if let Some(t) = self.call_timeout_ms {
            if !(1..=3_600_000).contains(&t) {
                return Err(SpecError::field(
                    "call_timeout_ms",
                    "must be between 1 and 3600000",
                ));
            }
        }
        if let NetworkPolicy::Allow { allow } = &self.network {
            if allow.is_empty() {
                return Err(SpecError::field(
                    "network.allow",
                    "must list at least one host:port",
                ));
            }
            for a in allow {
                validate_allow_entry(a)?;
            }
        }
        if let Some(h) = &self.health {
            if !(1..=86_400).contains(&h.interval_s) {
                return Err(SpecError::field(
                    "health.interval_s",
                    "must be between 1 and 86400",
                ));
            }
            if !(1..=3600).contains(&h.timeout_s) {
                return Err(SpecError::field(
                    "health.timeout_s",
                    "must be between 1 and 3600",
                ));
            }
            if !(1..=100).contains(&h.failure_threshold) {
                return Err(SpecError::field(
                    "health.failure_threshold",
                    "must be between 1 and 100",
                ));
            }
            if let Some(t) = &h.tool {
                check_str("health.tool", t)?;
            }
        }
        Ok(())
    }

    pub fn call_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.call_timeout_ms.unwrap_or(DEFAULT_CALL_TIMEOUT_MS))
    }
}

/// `host:port` or `*.domain:port`; hosts are DNS names or IP literals.
fn validate_allow_entry(entry: &str) -> Result<(), SpecError> {
    let bad = || {
        SpecError::field(
            "network.allow",
            format!(
                "entry `{}` must be host:port or *.domain:port",
                entry
                    .chars()
                    .take(80)
                    .flat_map(char::escape_default)
                    .collect::<String>()
            ),
        )
    };
    let (host, port) = entry.rsplit_once(':').ok_or_else(bad)?;
    port.parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(bad)?;
    let host = host.strip_prefix("*.").unwrap_or(host);
    let ok = !host.is_empty()
        && host.len() <= 253
        && host
            .split('.')
            .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    if ok {
        Ok(())
    } else {
        Err(bad())
    }
}

/// Parses docker-style sizes: `256m`, `1g`, `512` (MiB), `1048576k`.
pub fn parse_memory_mb(s: &str) -> Result<u64, SpecError> {
    let s = s.trim().to_ascii_lowercase();
    let s = s.strip_suffix('b').unwrap_or(&s);
    let (num, mult_kb): (&str, f64) = match s.chars().last() {
        Some('k') => (&s[..s.len() - 1], 1.0 / 1024.0),
        Some('m') => (&s[..s.len() - 1], 1.0),
        Some('g') => (&s[..s.len() - 1], 1024.0),
        _ => (s, 1.0),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| SpecError::field("memory", format!("`{s}` is not a size like 256m or 1g")))?;
    if !n.is_finite() || n <= 0.0 {
        return Err(SpecError::field("memory", "must be positive"));
    }
    Ok((n * mult_kb).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("mesh", "acme").is_ok());
        assert!(validate_name("mesh", "a-b_c9").is_ok());
        assert!(validate_name("mesh", &"a".repeat(64)).is_ok());
        for bad in [
            "",
            "-a",
            "_a",
            "a/b",
            "..",
            "a b",
            "a\0",
            "é",
            &"a".repeat(65),
        ] {
            assert!(validate_name("mesh", bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn unknown_fields_are_named() {
        let err = ServiceSpec::from_json(br#"{"source":"path:/x","bogus":1}"#).unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
    }

    #[test]
    fn ranges() {
        let e = ServiceSpec::from_json(br#"{"source":"path:/x","memory_mb":1}"#).unwrap_err();
        assert!(e.to_string().contains("memory_mb"));
        let e = ServiceSpec::from_json(br#"{"source":"path:/x","cpus":100}"#).unwrap_err();
        assert!(e.to_string().contains("cpus"));
        let e = ServiceSpec::from_json(br#"{"source":"path:/x","pids":1}"#).unwrap_err();
        assert!(e.to_string().contains("pids"));
        let e = ServiceSpec::from_json(br#"{"source":"path:/x","call_timeout_ms":0}"#).unwrap_err();
        assert!(e.to_string().contains("call_timeout_ms"));
        let e = ServiceSpec::from_json(br#"{"source":"path:/x","env":{"A B":"x"}}"#).unwrap_err();
        assert!(e.to_string().contains("env"));
    }

    #[test]
    fn network_forms() {
        let s = ServiceSpec::from_json(br#"{"source":"p","network":"none"}"#).unwrap();
        assert!(s.network.is_none());
        let s =
            ServiceSpec::from_json(br#"{"source":"p","network":{"allow":["a.b:443","*.c.d:80"]}}"#)
                .unwrap();
        assert!(matches!(s.network, NetworkPolicy::Allow { .. }));
        assert!(ServiceSpec::from_json(br#"{"source":"p","network":"some"}"#).is_err());
        assert!(ServiceSpec::from_json(br#"{"source":"p","network":{"allow":["x"]}}"#).is_err());
        assert_eq!(
            NetworkPolicy::parse_cli("none").unwrap(),
            NetworkPolicy::Mode(NetworkMode::None)
        );
        assert!(NetworkPolicy::parse_cli("allow=a.b:1,c.d:2").is_ok());
    }

    #[test]
    fn env_values() {
        let s = ServiceSpec::from_json(br#"{"source":"p","env":{"A":"1","B":{"file":"/run/s"}}}"#)
            .unwrap();
        assert_eq!(s.env["A"], EnvValue::Literal("1".into()));
        assert!(ServiceSpec::from_json(br#"{"source":"p","env":{"B":{"file":"rel"}}}"#).is_err());
    }

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory_mb("256m").unwrap(), 256);
        assert_eq!(parse_memory_mb("1g").unwrap(), 1024);
        assert_eq!(parse_memory_mb("512").unwrap(), 512);
        assert_eq!(parse_memory_mb("262144k").unwrap(), 256);
        assert!(parse_memory_mb("lots").is_err());
        assert!(parse_memory_mb("-1m").is_err());
    }
}
