//! Prometheus metrics: one registry, built once at start and passed down to
//! the supervisor, the API and the gateway, which record into it.
//!
//! Owns the metric families, their label sets (typed structs) and the
//! bounds on label values: a tenant cannot create unbounded series. Tool
//! names get a series of their own only once a call to them came back as a
//! tool result (an unknown tool answers a JSON-RPC error), and at most
//! [`MAX_TOOLS_PER_SERVICE`] per service; everything else folds into
//! `tool="other"`. A removed service's series are removed with it.
//!
//! Recording is on the call path, so it costs a few atomic operations and no
//! allocation: a service's handles are resolved once ([`ServiceMetrics`])
//! and its tools' once each. Resource usage (memory, CPU) is sampled at
//! scrape time by the caller of [`Metrics::encode`], from whatever the
//! backend can read, and exported as it was last sampled.
//!
//! Imports only [`crate::model`]; it knows nothing of services beyond their
//! keys, nor of HTTP.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric,
};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::model::{Protocol, ServiceKey, Usage};

/// Tools of one service with a series of their own, at most; the rest are `other`.
pub const MAX_TOOLS_PER_SERVICE: usize = 64;
/// The label value tool names fold into past the cap (or when unknown).
pub const OTHER_TOOL: &str = "other";

/// Content type of [`Metrics::encode`]'s output (OpenMetrics text).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How one tool call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Outcome {
    /// A result.
    ok,
    /// A result with `isError: true`.
    tool_error,
    /// A JSON-RPC error (or a broken answer).
    rpc_error,
    timeout,
    /// The service was not running, went away, or is not deployed.
    unavailable,
}

impl Outcome {
    const ALL: [Outcome; 5] = [
        Outcome::ok,
        Outcome::tool_error,
        Outcome::rpc_error,
        Outcome::timeout,
        Outcome::unavailable,
    ];

    fn index(self) -> usize {
        self as usize
    }

    /// The tool exists: only then may its name become a label value.
    fn names_a_tool(self) -> bool {
        matches!(self, Outcome::ok | Outcome::tool_error)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::ok => "ok",
            Outcome::tool_error => "tool_error",
            Outcome::rpc_error => "rpc_error",
            Outcome::timeout => "timeout",
            Outcome::unavailable => "unavailable",
        }
    }
}

/// A service's health, as its gauge family labels it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum HealthState {
    healthy,
    degraded,
    unhealthy,
    unknown,
}

impl HealthState {
    const ALL: [HealthState; 4] = [
        HealthState::healthy,
        HealthState::degraded,
        HealthState::unhealthy,
        HealthState::unknown,
    ];
}

/// The kind of source an install was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum SourceKind {
    npm,
    pypi,
    git,
    path,
    image,
}

/// Whether an acquisition found its install in the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum CacheResult {
    hit,
    miss,
}

/// How an install ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum InstallOutcome {
    ok,
    error,
}

/// A protocol era, as gateway families label it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Era {
    /// `initialize` and sessions (2024-11-05 … 2025-11-25).
    handshake,
    /// 2026-07-28: every request stands alone.
    stateless,
}

impl From<Protocol> for Era {
    fn from(p: Protocol) -> Self {
        match p {
            Protocol::Handshake => Era::handshake,
            Protocol::Stateless => Era::stateless,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ServiceLabels {
    pub mesh: String,
    pub service: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ToolLabels {
    pub mesh: String,
    pub service: String,
    pub tool: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct CallLabels {
    pub mesh: String,
    pub service: String,
    pub tool: String,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct HealthLabels {
    pub mesh: String,
    pub service: String,
    pub state: HealthState,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct InstallLabels {
    pub kind: SourceKind,
    pub outcome: InstallOutcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct CacheLabels {
    pub kind: SourceKind,
    pub result: CacheResult,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct EraLabels {
    pub era: Era,
}

/// Builds histograms of one bucket layout for a family.
#[derive(Clone, Copy)]
struct Buckets(&'static [f64]);

impl MetricConstructor<Histogram> for Buckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(self.0.iter().copied())
    }
}

/// Call latency: 1 ms to 60 s.
const CALL_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Install duration: 0.5 s to 30 min.
const INSTALL_BUCKETS: &[f64] = &[
    0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
];

#[derive(Clone)]
struct Families {
    calls: Family<CallLabels, Counter>,
    call_duration: Family<ToolLabels, Histogram, Buckets>,
    in_flight: Family<ServiceLabels, Gauge>,
    restarts: Family<ServiceLabels, Counter>,
    oom_kills: Family<ServiceLabels, Counter>,
    health: Family<HealthLabels, Gauge>,
}

/// The registry and every family meshbox records into.
pub struct Metrics {
    enabled: bool,
    registry: Registry,
    families: Families,
    installs: Family<InstallLabels, Histogram, Buckets>,
    install_cache: Family<CacheLabels, Counter>,
    gateway_requests: Family<EraLabels, Counter>,
    gateway_sessions: Family<EraLabels, Gauge>,
    usage: Arc<UsageCollector>,
    services: Mutex<HashMap<ServiceKey, Arc<ServiceMetrics>>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("enabled", &self.enabled)
            .finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// The registry with every family registered.
    pub fn new() -> Self {
        Metrics::build(true)
    }

    /// Records nothing and exports nothing (`serve --no-metrics`, benches).
    pub fn disabled() -> Self {
        Metrics::build(false)
    }

    fn build(enabled: bool) -> Self {
        let mut registry = Registry::with_prefix("meshbox");
        let families = Families {
            calls: Family::default(),
            call_duration: Family::new_with_constructor(Buckets(CALL_BUCKETS)),
            in_flight: Family::default(),
            restarts: Family::default(),
            oom_kills: Family::default(),
            health: Family::default(),
        };
        let installs = Family::new_with_constructor(Buckets(INSTALL_BUCKETS));
        let install_cache = Family::<CacheLabels, Counter>::default();
        let gateway_requests = Family::<EraLabels, Counter>::default();
        let gateway_sessions = Family::<EraLabels, Gauge>::default();
        let usage = Arc::new(UsageCollector::default());
        registry.register(
            "tool_calls",
            "Tool calls by service, tool and outcome",
            families.calls.clone(),
        );
        registry.register_with_unit(
            "tool_call_duration",
            "Tool call latency, from arrival to answer (waiting through restarts included)",
            Unit::Seconds,
            families.call_duration.clone(),
        );
        registry.register(
            "tool_calls_in_flight",
            "Tool calls waiting for their answer",
            families.in_flight.clone(),
        );
        registry.register(
            "service_restarts",
            "Restarts of a service (crashes, failed liveness, requested)",
            families.restarts.clone(),
        );
        registry.register(
            "service_oom_kills",
            "Runs of a service ended by the out-of-memory killer",
            families.oom_kills.clone(),
        );
        registry.register(
            "service_health",
            "1 for the service's current health state, 0 for the others",
            families.health.clone(),
        );
        registry.register_with_unit(
            "install_duration",
            "Source installs that ran (cache misses), by source kind and outcome",
            Unit::Seconds,
            installs.clone(),
        );
        registry.register(
            "install_cache",
            "Source acquisitions by whether the install cache held them",
            install_cache.clone(),
        );
        registry.register(
            "gateway_requests",
            "MCP gateway requests by protocol era",
            gateway_requests.clone(),
        );
        registry.register(
            "gateway_sessions",
            "MCP gateway sessions open now, by protocol era",
            gateway_sessions.clone(),
        );
        registry.register_collector(Box::new(usage.clone()));
        Metrics {
            enabled,
            registry,
            families,
            installs,
            install_cache,
            gateway_requests,
            gateway_sessions,
            usage,
            services: Mutex::new(HashMap::new()),
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// The handles of one service, made on first use and shared by every
    /// instance of it (a redeploy's candidate included) until [`remove_service`](Self::remove_service).
    pub fn service(&self, key: &ServiceKey) -> Arc<ServiceMetrics> {
        let mut services = self.services.lock().expect("metrics poisoned");
        if let Some(s) = services.get(key) {
            return s.clone();
        }
        let s = Arc::new(ServiceMetrics::new(
            key,
            self.families.clone(),
            self.enabled,
        ));
        if self.enabled {
            services.insert(key.clone(), s.clone());
        }
        s
    }

    /// A service is gone for good: its series leave every family.
    pub fn remove_service(&self, key: &ServiceKey) {
        let removed = self.services.lock().expect("metrics poisoned").remove(key);
        if let Some(s) = removed {
            s.remove_series();
        }
        self.usage.remove(key);
    }

    /// One acquisition of a source: whether the cache held it, and how long
    /// the install took when it ran.
    pub fn record_install(
        &self,
        kind: SourceKind,
        cache: CacheResult,
        ran: Option<(Duration, InstallOutcome)>,
    ) {
        if !self.enabled {
            return;
        }
        self.install_cache
            .get_or_create(&CacheLabels {
                kind,
                result: cache,
            })
            .inc();
        if let Some((took, outcome)) = ran {
            self.installs
                .get_or_create(&InstallLabels { kind, outcome })
                .observe(took.as_secs_f64());
        }
    }

    /// One MCP gateway request.
    pub fn gateway_request(&self, era: Era) {
        if self.enabled {
            self.gateway_requests
                .get_or_create(&EraLabels { era })
                .inc();
        }
    }

    /// Gateway sessions open now.
    pub fn gateway_sessions(&self, era: Era, open: usize) {
        if self.enabled {
            self.gateway_sessions
                .get_or_create(&EraLabels { era })
                .set(i64::try_from(open).unwrap_or(i64::MAX));
        }
    }

    /// The latest usage samples, replacing the previous ones (services not
    /// listed have no sandbox to read now).
    pub fn set_usage(&self, samples: Vec<(ServiceKey, Usage)>) {
        if self.enabled {
            self.usage.replace(samples);
        }
    }

    /// The text exposition of every family.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if self.enabled {
            // Writing into a String cannot fail.
            let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        }
        out
    }
}

/// One tool's series.
struct ToolMetrics {
    calls: [Counter; 5],
    duration: Histogram,
    labels: ToolLabels,
}

impl ToolMetrics {
    fn new(families: &Families, labels: ToolLabels) -> Self {
        let calls = Outcome::ALL.map(|outcome| {
            families.calls.get_or_create_owned(&CallLabels {
                mesh: labels.mesh.clone(),
                service: labels.service.clone(),
                tool: labels.tool.clone(),
                outcome,
            })
        });
        ToolMetrics {
            calls,
            duration: families.call_duration.get_or_create_owned(&labels),
            labels,
        }
    }

    fn record(&self, outcome: Outcome, took: Duration) {
        self.calls[outcome.index()].inc();
        self.duration.observe(took.as_secs_f64());
    }
}

/// The pre-resolved handles of one service.
pub struct ServiceMetrics {
    enabled: bool,
    labels: ServiceLabels,
    families: Families,
    in_flight: Gauge,
    restarts: Counter,
    oom_kills: Counter,
    health: [Gauge; 4],
    other: ToolMetrics,
    tools: RwLock<HashMap<Box<str>, ToolMetrics>>,
    removed: AtomicBool,
}

impl std::fmt::Debug for ServiceMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceMetrics")
            .field("labels", &self.labels)
            .finish_non_exhaustive()
    }
}

impl ServiceMetrics {
    fn new(key: &ServiceKey, families: Families, enabled: bool) -> Self {
        let labels = ServiceLabels {
            mesh: key.mesh.clone(),
            service: key.name.clone(),
        };
        // Handles of a disabled registry are never registered in a family.
        fn own<M: Default + Clone>(
            f: &Family<ServiceLabels, M>,
            labels: &ServiceLabels,
            enabled: bool,
        ) -> M {
            if enabled {
                f.get_or_create_owned(labels)
            } else {
                M::default()
            }
        }
        let in_flight = own(&families.in_flight, &labels, enabled);
        let restarts = own(&families.restarts, &labels, enabled);
        let oom_kills = own(&families.oom_kills, &labels, enabled);
        let health = HealthState::ALL.map(|state| {
            if !enabled {
                return Gauge::default();
            }
            families.health.get_or_create_owned(&HealthLabels {
                mesh: labels.mesh.clone(),
                service: labels.service.clone(),
                state,
            })
        });
        let other_labels = ToolLabels {
            mesh: labels.mesh.clone(),
            service: labels.service.clone(),
            tool: OTHER_TOOL.into(),
        };
        let other = if enabled {
            ToolMetrics::new(&families, other_labels)
        } else {
            ToolMetrics {
                calls: Default::default(),
                duration: Histogram::new([]),
                labels: other_labels,
            }
        };
        let s = ServiceMetrics {
            enabled,
            labels,
            families,
            in_flight,
            restarts,
            oom_kills,
            health,
            other,
            tools: RwLock::new(HashMap::new()),
            removed: AtomicBool::new(false),
        };
        s.set_health(HealthState::unknown);
        s
    }

    /// A call begins: counted in flight until the returned guard is
    /// finished (or dropped, for a call its caller gave up).
    pub fn start_call(&self) -> CallTimer<'_> {
        if self.enabled {
            self.in_flight.inc();
        }
        CallTimer {
            service: self,
            started: Instant::now(),
            done: false,
        }
    }

    fn finish_call(&self, tool: &str, outcome: Outcome, took: Duration) {
        {
            let tools = self.tools.read().expect("metrics poisoned");
            if let Some(t) = tools.get(tool) {
                t.record(outcome, took);
                return;
            }
            if !outcome.names_a_tool() || tools.len() >= MAX_TOOLS_PER_SERVICE {
                self.other.record(outcome, took);
                return;
            }
        }
        // First answer from a tool that exists: a series of its own.
        let mut tools = self.tools.write().expect("metrics poisoned");
        if self.removed.load(Ordering::Acquire) || tools.len() >= MAX_TOOLS_PER_SERVICE {
            drop(tools);
            self.other.record(outcome, took);
            return;
        }
        let t = tools.entry(tool.into()).or_insert_with(|| {
            ToolMetrics::new(
                &self.families,
                ToolLabels {
                    mesh: self.labels.mesh.clone(),
                    service: self.labels.service.clone(),
                    tool: tool.to_owned(),
                },
            )
        });
        t.record(outcome, took);
    }

    /// `n` restarts (after a crash, failed liveness, or on request).
    pub fn restarted(&self, n: u32) {
        if self.enabled && n > 0 {
            self.restarts.inc_by(u64::from(n));
        }
    }

    /// A run ended by the OOM killer.
    pub fn oom_killed(&self) {
        if self.enabled {
            self.oom_kills.inc();
        }
    }

    pub fn set_health(&self, state: HealthState) {
        if !self.enabled {
            return;
        }
        for (s, g) in HealthState::ALL.iter().zip(&self.health) {
            g.set(i64::from(*s == state));
        }
    }

    fn remove_series(&self) {
        self.removed.store(true, Ordering::Release);
        let f = &self.families;
        f.in_flight.remove(&self.labels);
        f.restarts.remove(&self.labels);
        f.oom_kills.remove(&self.labels);
        for state in HealthState::ALL {
            f.health.remove(&HealthLabels {
                mesh: self.labels.mesh.clone(),
                service: self.labels.service.clone(),
                state,
            });
        }
        let tools = self.tools.read().expect("metrics poisoned");
        for t in tools.values().chain(std::iter::once(&self.other)) {
            f.call_duration.remove(&t.labels);
            for outcome in Outcome::ALL {
                f.calls.remove(&CallLabels {
                    mesh: t.labels.mesh.clone(),
                    service: t.labels.service.clone(),
                    tool: t.labels.tool.clone(),
                    outcome,
                });
            }
        }
    }
}

/// One call in flight; [`finish`](Self::finish) records its outcome.
#[must_use]
pub struct CallTimer<'a> {
    service: &'a ServiceMetrics,
    started: Instant,
    done: bool,
}

impl CallTimer<'_> {
    pub fn finish(mut self, tool: &str, outcome: Outcome) {
        self.done = true;
        if self.service.enabled {
            self.service.in_flight.dec();
            self.service
                .finish_call(tool, outcome, self.started.elapsed());
        }
    }
}

impl Drop for CallTimer<'_> {
    fn drop(&mut self) {
        if !self.done && self.service.enabled {
            self.service.in_flight.dec();
        }
    }
}

/// Whether a `tools/call` result says `isError: true`, read without
/// building the result (large results are scanned, not copied).
pub fn is_tool_error(raw_result: &str) -> bool {
    if !raw_result.contains("\"isError\"") {
        return false;
    }
    #[derive(serde::Deserialize)]
    struct Head {
        #[serde(rename = "isError", default)]
        is_error: bool,
    }
    serde_json::from_str::<Head>(raw_result).is_ok_and(|h| h.is_error)
}

/// Memory and CPU of each service's sandbox, as last sampled.
#[derive(Debug, Default)]
struct UsageCollector {
    samples: Mutex<Vec<(ServiceKey, Usage)>>,
}

impl UsageCollector {
    fn replace(&self, mut samples: Vec<(ServiceKey, Usage)>) {
        samples.sort_by(|a, b| a.0.cmp(&b.0));
        *self.samples.lock().expect("metrics poisoned") = samples;
    }

    fn remove(&self, key: &ServiceKey) {
        self.samples
            .lock()
            .expect("metrics poisoned")
            .retain(|(k, _)| k != key);
    }
}

impl Collector for UsageCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let samples = self.samples.lock().expect("metrics poisoned");
        let labels = |k: &ServiceKey| ServiceLabels {
            mesh: k.mesh.clone(),
            service: k.name.clone(),
        };
        let memory: Vec<_> = samples
            .iter()
            .filter_map(|(k, u)| u.memory_bytes.map(|m| (labels(k), m)))
            .collect();
        if !memory.is_empty() {
            let g = ConstGauge::new(0i64);
            let mut family = encoder.encode_descriptor(
                "service_memory",
                "Memory the service's sandbox uses now (cgroup or engine)",
                Some(&Unit::Bytes),
                g.metric_type(),
            )?;
            for (l, m) in &memory {
                let g = ConstGauge::new(i64::try_from(*m).unwrap_or(i64::MAX));
                g.encode(family.encode_family(l)?)?;
            }
        }
        let cpu: Vec<_> = samples
            .iter()
            .filter_map(|(k, u)| u.cpu_seconds.map(|c| (labels(k), c)))
            .collect();
        if !cpu.is_empty() {
            let c = ConstCounter::new(0f64);
            let mut family = encoder.encode_descriptor(
                "service_cpu",
                "CPU time the service's current sandbox has used (cgroup or engine)",
                Some(&Unit::Seconds),
                c.metric_type(),
            )?;
            for (l, s) in &cpu {
                ConstCounter::new(*s).encode(family.encode_family(l)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> ServiceKey {
        ServiceKey {
            mesh: "acme".into(),
            name: name.into(),
        }
    }

    /// The value of the one sample line starting with `series` (name and labels).
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map(|v| v.split(' ').next().unwrap().parse().unwrap())
    }

    #[test]
    fn calls_by_tool_and_outcome_with_latency_and_in_flight() {
        let m = Metrics::new();
        let s = m.service(&key("time"));
        let t = s.start_call();
        let pending = s.start_call();
        let text = m.encode();
        assert_eq!(
            sample(
                &text,
                r#"meshbox_tool_calls_in_flight{mesh="acme",service="time"}"#
            ),
            Some(2.0)
        );
        t.finish("now", Outcome::ok);
        drop(pending);
        s.start_call().finish("now", Outcome::tool_error);
        s.start_call().finish("now", Outcome::timeout);
        let text = m.encode();
        let calls = |tool: &str, outcome: &str| {
            sample(
                &text,
                &format!(
                    r#"meshbox_tool_calls_total{{mesh="acme",service="time",tool="{tool}",outcome="{outcome}"}}"#
                ),
            )
        };
        assert_eq!(calls("now", "ok"), Some(1.0));
        assert_eq!(calls("now", "tool_error"), Some(1.0));
        assert_eq!(calls("now", "timeout"), Some(1.0));
        assert_eq!(calls("now", "rpc_error"), Some(0.0));
        assert_eq!(
            sample(
                &text,
                r#"meshbox_tool_call_duration_seconds_count{mesh="acme",service="time",tool="now"}"#
            ),
            Some(3.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"meshbox_tool_calls_in_flight{mesh="acme",service="time"}"#
            ),
            Some(0.0),
            "a dropped call leaves the in-flight count too"
        );
    }

    #[test]
    fn unknown_and_excess_tool_names_fold_into_other() {
        let m = Metrics::new();
        let s = m.service(&key("svc"));
        // A caller inventing names: each one answered by a JSON-RPC error.
        for i in 0..1000 {
            s.start_call()
                .finish(&format!("junk{i}"), Outcome::rpc_error);
        }
        // A server answering every name: capped.
        for i in 0..(MAX_TOOLS_PER_SERVICE + 50) {
            s.start_call().finish(&format!("tool{i}"), Outcome::ok);
        }
        let text = m.encode();
        let series = text
            .lines()
            .filter(|l| l.starts_with("meshbox_tool_calls_total{"))
            .count();
        assert_eq!(series, (MAX_TOOLS_PER_SERVICE + 1) * 5, "{text}");
        assert!(!text.contains("junk"));
        assert_eq!(
            sample(
                &text,
                r#"meshbox_tool_calls_total{mesh="acme",service="svc",tool="other",outcome="rpc_error"}"#
            ),
            Some(1000.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"meshbox_tool_calls_total{mesh="acme",service="svc",tool="other",outcome="ok"}"#
            ),
            Some(50.0)
        );
        // A name known already keeps its series whatever the outcome.
        s.start_call().finish("tool0", Outcome::rpc_error);
        assert_eq!(
            sample(
                &m.encode(),
                r#"meshbox_tool_calls_total{mesh="acme",service="svc",tool="tool0",outcome="rpc_error"}"#
            ),
            Some(1.0)
        );
    }

    #[test]
    fn a_removed_service_leaves_every_family() {
        let m = Metrics::new();
        let gone = m.service(&key("gone"));
        let kept = m.service(&key("kept"));
        for s in [&gone, &kept] {
            s.start_call().finish("t", Outcome::ok);
            s.restarted(1);
            s.oom_killed();
            s.set_health(HealthState::healthy);
        }
        m.set_usage(vec![
            (
                key("gone"),
                Usage {
                    memory_bytes: Some(1),
                    cpu_seconds: Some(1.0),
                },
            ),
            (
                key("kept"),
                Usage {
                    memory_bytes: Some(2),
                    cpu_seconds: None,
                },
            ),
        ]);
        assert!(m.encode().contains(r#"service="gone""#));
        m.remove_service(&key("gone"));
        // A late call of the removed instance changes nothing visible.
        gone.start_call().finish("late", Outcome::ok);
        let text = m.encode();
        assert!(!text.contains(r#"service="gone""#), "{text}");
        assert_eq!(
            sample(
                &text,
                r#"meshbox_service_restarts_total{mesh="acme",service="kept"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"meshbox_service_oom_kills_total{mesh="acme",service="kept"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"meshbox_service_health{mesh="acme",service="kept",state="healthy"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"meshbox_service_health{mesh="acme",service="kept",state="unknown"}"#
            ),
            Some(0.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"meshbox_service_memory_bytes{mesh="acme",service="kept"}"#
            ),
            Some(2.0)
        );
        // Deployed again: fresh series.
        m.service(&key("gone"))
            .start_call()
            .finish("t", Outcome::ok);
        assert_eq!(
            sample(
                &m.encode(),
                r#"meshbox_tool_calls_total{mesh="acme",service="gone",tool="t",outcome="ok"}"#
            ),
            Some(1.0)
        );
    }

    #[test]
    fn installs_gateway_and_usage() {
        let m = Metrics::new();
        m.record_install(SourceKind::npm, CacheResult::hit, None);
        m.record_install(
            SourceKind::npm,
            CacheResult::miss,
            Some((Duration::from_secs(3), InstallOutcome::ok)),
        );
        m.gateway_request(Era::stateless);
        m.gateway_request(Era::handshake);
        m.gateway_request(Era::handshake);
        m.gateway_sessions(Era::handshake, 7);
        m.set_usage(vec![(
            key("a"),
            Usage {
                memory_bytes: Some(4096),
                cpu_seconds: Some(1.5),
            },
        )]);
        let text = m.encode();
        for (series, want) in [
            (
                r#"meshbox_install_cache_total{kind="npm",result="hit"}"#,
                1.0,
            ),
            (
                r#"meshbox_install_cache_total{kind="npm",result="miss"}"#,
                1.0,
            ),
            (
                r#"meshbox_install_duration_seconds_sum{kind="npm",outcome="ok"}"#,
                3.0,
            ),
            (r#"meshbox_gateway_requests_total{era="handshake"}"#, 2.0),
            (r#"meshbox_gateway_requests_total{era="stateless"}"#, 1.0),
            (r#"meshbox_gateway_sessions{era="handshake"}"#, 7.0),
            (
                r#"meshbox_service_memory_bytes{mesh="acme",service="a"}"#,
                4096.0,
            ),
            (
                r#"meshbox_service_cpu_seconds_total{mesh="acme",service="a"}"#,
                1.5,
            ),
        ] {
            assert_eq!(sample(&text, series), Some(want), "{series} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn disabled_records_and_exports_nothing() {
        let m = Metrics::disabled();
        let s = m.service(&key("x"));
        let t = s.start_call();
        t.finish("t", Outcome::ok);
        m.gateway_request(Era::stateless);
        assert_eq!(m.encode(), "");
    }

    #[test]
    fn tool_errors_are_read_from_the_top_level_only() {
        assert!(is_tool_error(r#"{"content":[],"isError":true}"#));
        assert!(is_tool_error(r#"{"isError" : true, "content":[]}"#));
        assert!(!is_tool_error(r#"{"content":[],"isError":false}"#));
        assert!(!is_tool_error(
            r#"{"content":[{"type":"text","text":"\"isError\":true"}]}"#
        ));
        assert!(!is_tool_error(
            r#"{"structuredContent":{"isError":true},"content":[]}"#
        ));
        assert!(!is_tool_error(r#"{"content":[]}"#));
    }
}
