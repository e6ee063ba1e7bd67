//! Service specifications as the API and CLI receive them, and their validation.
//!
//! This module owns the wire shape of a `ServiceSpec` (unknown fields rejected),
//! the name rules for meshes and services, and the range checks on limits. It
//! knows nothing about how a spec is run: that is the supervisor's job.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::model::shown;
pub use crate::model::{
    validate_name, HostMount, NameError, NetworkMode, NetworkPolicy, ProtocolChoice, Runtime,
};

/// Default per-call timeout (DESIGN.md: 25 s).
pub const DEFAULT_CALL_TIMEOUT_MS: u64 = 25_000;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error(transparent)]
    InvalidName(#[from] NameError),
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

/// Parses the CLI form of a network policy: `none`, `full` or `allow=host:port,...`.
pub fn parse_network(s: &str) -> Result<NetworkPolicy, SpecError> {
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
                format!(
                    "must be none, full or allow=host:port,... (got `{}`)",
                    shown(other, 80)
                ),
            )),
        },
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
    /// Host directories the server sees at the same path (serve: only under
    /// the operator's `--mount-root` directories).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<HostMount>,
    /// The upstream MCP era: detected (`auto`) or pinned.
    #[serde(default, skip_serializing_if = "is_auto")]
    pub protocol: ProtocolChoice,
    /// Budget of one install step; the daemon's `--install-timeout` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub install_timeout_s: Option<u64>,
    /// Extra environment of the install step (literals only, never secrets).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub install_env: BTreeMap<String, String>,
}

fn is_auto(p: &ProtocolChoice) -> bool {
    *p == ProtocolChoice::Auto
}

fn is_unset(n: &NetworkPolicy) -> bool {
    matches!(n, NetworkPolicy::Unset)
}

const MAX_STRING: usize = 4096;
const MAX_ARGS: usize = 256;
const MAX_ENV: usize = 256;
const MAX_MOUNTS: usize = 32;

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

/// `[A-Za-z_][A-Za-z0-9_]*`, at most 128 bytes.
pub fn is_env_key(k: &str) -> bool {
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
                    format!("key `{}` is not a valid variable name", shown(k, 64)),
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
        if self.mounts.len() > MAX_MOUNTS {
            return Err(SpecError::field(
                "mounts",
                format!("has more than {MAX_MOUNTS} entries"),
            ));
        }
        for m in &self.mounts {
            let s = m.path.to_string_lossy();
            check_str("mounts.path", &s)?;
            if !m.path.is_absolute()
                || m.path
                    .components()
                    .any(|c| matches!(c, std::path::Component::ParentDir))
            {
                return Err(SpecError::field(
                    "mounts.path",
                    format!("`{}` must be an absolute path without `..`", shown(&s, 80)),
                ));
            }
            if m.path == std::path::Path::new("/") {
                return Err(SpecError::field("mounts.path", "must not be `/`"));
            }
        }
        if let Some(t) = self.install_timeout_s {
            if !(1..=86_400).contains(&t) {
                return Err(SpecError::field(
                    "install_timeout_s",
                    "must be between 1 and 86400",
                ));
            }
        }
        if self.install_env.len() > MAX_ENV {
            return Err(SpecError::field(
                "install_env",
                format!("has more than {MAX_ENV} entries"),
            ));
        }
        for (k, v) in &self.install_env {
            if !is_env_key(k) {
                return Err(SpecError::field(
                    "install_env",
                    format!("key `{}` is not a valid variable name", shown(k, 64)),
                ));
            }
            check_str(&format!("install_env.{k}"), v)?;
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

    /// Identifies what the spec asks for: a detected protocol era is kept
    /// with it, and changes when the spec does.
    pub fn hash(&self) -> String {
        crate::model::stable_hash(&serde_json::to_string(self).expect("a spec always serializes"))
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
                shown(entry, 80)
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
            parse_network("none").unwrap(),
            NetworkPolicy::Mode(NetworkMode::None)
        );
        assert!(parse_network("allow=a.b:1,c.d:2").is_ok());
        assert!(parse_network("some").is_err());
    }

    #[test]
    fn env_values() {
        let s = ServiceSpec::from_json(br#"{"source":"p","env":{"A":"1","B":{"file":"/run/s"}}}"#)
            .unwrap();
        assert_eq!(s.env["A"], EnvValue::Literal("1".into()));
        assert!(ServiceSpec::from_json(br#"{"source":"p","env":{"B":{"file":"rel"}}}"#).is_err());
    }

    #[test]
    fn new_fields() {
        let s = ServiceSpec::from_json(
            br#"{"source":"p","mounts":[{"path":"/data","read_only":true}],"protocol":"2026-07-28","install_timeout_s":60,"install_env":{"PUPPETEER_SKIP_DOWNLOAD":"1"}}"#,
        )
        .unwrap();
        assert_eq!(s.mounts[0].path, std::path::Path::new("/data"));
        assert_eq!(s.protocol, ProtocolChoice::Stateless);
        for bad in [
            r#"{"source":"p","mounts":[{"path":"rel"}]}"#,
            r#"{"source":"p","mounts":[{"path":"/a/../etc"}]}"#,
            r#"{"source":"p","mounts":[{"path":"/"}]}"#,
            r#"{"source":"p","mounts":[{"path":"/a","bogus":1}]}"#,
            r#"{"source":"p","protocol":"1999-01-01"}"#,
            r#"{"source":"p","install_timeout_s":0}"#,
            r#"{"source":"p","install_env":{"A B":"1"}}"#,
            r#"{"source":"p","install_env":{"A":{"file":"/x"}}}"#,
        ] {
            assert!(ServiceSpec::from_json(bad.as_bytes()).is_err(), "{bad}");
        }
        // Round trip through the store's JSON.
        let back: ServiceSpec = serde_json::from_value(serde_json::to_value(&s).unwrap()).unwrap();
        assert_eq!(back, s);
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
