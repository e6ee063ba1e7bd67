//! What the supervisor tells [`crate::metrics`]: its errors as call
//! outcomes, its health as a state label, its sources as install kinds, the
//! install cache's hits, and its sandboxes' resource usage at scrape time.
//!
//! Owns only these translations and the usage sampling; the recording
//! itself is in `metrics`, the lifecycle in `service`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use serde_json::value::RawValue;

use super::health::Health;
use super::{ErrorKind, Supervisor, SupervisorError};
use crate::acquire::{Progress, ProgressSink, Source, Update};
use crate::metrics::{CacheResult, HealthState, InstallOutcome, Metrics, Outcome, SourceKind};

/// How long one scrape waits for a sandbox's usage figures.
const USAGE_DEADLINE: Duration = Duration::from_secs(2);

/// The outcome label of a finished call.
pub(crate) fn outcome(r: &Result<Box<RawValue>, SupervisorError>) -> Outcome {
    match r {
        Ok(raw) if crate::metrics::is_tool_error(raw.get()) => Outcome::tool_error,
        Ok(_) => Outcome::ok,
        Err(e) => error_outcome(e),
    }
}

pub(crate) fn error_outcome(e: &SupervisorError) -> Outcome {
    match e.kind() {
        ErrorKind::Timeout => Outcome::timeout,
        ErrorKind::Upstream { .. } | ErrorKind::BadGateway => Outcome::rpc_error,
        ErrorKind::Unavailable
        | ErrorKind::NotFound
        | ErrorKind::Invalid
        | ErrorKind::Forbidden
        | ErrorKind::Conflict
        | ErrorKind::Internal => Outcome::unavailable,
    }
}

impl From<Health> for HealthState {
    fn from(h: Health) -> Self {
        match h {
            Health::Healthy => HealthState::healthy,
            Health::Degraded => HealthState::degraded,
            Health::Unhealthy => HealthState::unhealthy,
            Health::Unknown => HealthState::unknown,
        }
    }
}

pub(crate) fn source_kind(s: &Source) -> SourceKind {
    match s {
        Source::Path(_) => SourceKind::path,
        Source::Npm { .. } => SourceKind::npm,
        Source::Pypi { .. } => SourceKind::pypi,
        Source::Git { .. } => SourceKind::git,
        Source::Image(_) => SourceKind::image,
    }
}

/// Passes updates on to `inner` and notes whether any install step ran
/// (none: the cache held everything).
pub(crate) struct StepWatch {
    inner: Progress,
    ran: AtomicBool,
}

impl StepWatch {
    pub fn new(inner: Progress) -> Arc<Self> {
        Arc::new(StepWatch {
            inner,
            ran: AtomicBool::new(false),
        })
    }

    pub fn ran(&self) -> bool {
        self.ran.load(Ordering::Relaxed)
    }
}

impl ProgressSink for StepWatch {
    fn update(&self, u: Update<'_>) {
        if matches!(u, Update::Step { .. }) {
            self.ran.store(true, Ordering::Relaxed);
        }
        self.inner.update(u);
    }
}

/// One acquisition into the install metrics: a hit when no step ran, else
/// a miss with its duration and outcome. Images are not installed.
pub(crate) fn record_install<T, E>(
    metrics: &Metrics,
    source: &Source,
    watch: &StepWatch,
    started: Instant,
    result: &Result<T, E>,
) {
    let kind = source_kind(source);
    if kind == SourceKind::image {
        return;
    }
    if watch.ran() {
        let outcome = if result.is_ok() {
            InstallOutcome::ok
        } else {
            InstallOutcome::error
        };
        metrics.record_install(kind, CacheResult::miss, Some((started.elapsed(), outcome)));
    } else if result.is_ok() {
        metrics.record_install(kind, CacheResult::hit, None);
    }
}

impl Supervisor {
    /// Reads every running sandbox's usage (concurrently, each within a
    /// deadline) into the metrics, for a scrape.
    pub async fn sample_usage(&self) {
        let metrics = &self.ctx.metrics;
        if !metrics.is_enabled() {
            return;
        }
        let services: Vec<_> = self
            .services
            .read()
            .expect("registry poisoned")
            .values()
            .cloned()
            .collect();
        let reads = services.iter().map(|svc| async move {
            let usage = tokio::time::timeout(USAGE_DEADLINE, svc.usage())
                .await
                .ok()
                .flatten()?;
            Some((svc.key.clone(), usage))
        });
        let samples = futures_util::future::join_all(reads)
            .await
            .into_iter()
            .flatten()
            .collect();
        metrics.set_usage(samples);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use serde_json::json;

    use super::super::{Phase, ServiceKey, Supervisor, SupervisorConfig};
    use crate::config::ServiceSpec;
    use crate::metrics::Metrics;
    use crate::orchestrator::fake::{Fake, Script};

    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map(|v| v.parse().unwrap())
    }

    fn setup(script: Script) -> (Arc<Supervisor>, Arc<Metrics>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let sup = Supervisor::new(Fake::new(script), SupervisorConfig::new(dir.path().into()))
            .with_metrics(metrics.clone());
        (Arc::new(sup), metrics, dir)
    }

    fn spec(dir: &tempfile::TempDir) -> ServiceSpec {
        ServiceSpec {
            source: format!("path:{}", dir.path().display()),
            command: Some(vec!["fake-server".into()]),
            ..Default::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn calls_restarts_health_and_removal_reach_the_registry() {
        let (sup, metrics, dir) = setup(Script::ReadinessFails);
        let key = ServiceKey::parse("m", "s").unwrap();
        let mut s = spec(&dir);
        s.health = Some(crate::config::HealthSpec {
            tool: Some("ready".into()),
            failure_threshold: 1,
            ..Default::default()
        });
        sup.deploy(key.clone(), s).await.unwrap();
        sup.call_raw(&key, "t", json!({}), None).await.unwrap();
        sup.call_raw(&key, "ready", json!({}), None).await.unwrap();
        sup.restart(&key).await.unwrap();
        // The readiness probe (isError) makes the service unhealthy.
        let svc = sup.get(&key).unwrap();
        for _ in 0..1000 {
            if svc.status().health == super::Health::Unhealthy {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let text = metrics.encode();
        let l = r#"mesh="m",service="s""#;
        for (series, want) in [
            (
                format!(r#"meshbox_tool_calls_total{{{l},tool="t",outcome="ok"}}"#),
                1.0,
            ),
            (
                format!(r#"meshbox_tool_calls_total{{{l},tool="ready",outcome="tool_error"}}"#),
                1.0,
            ),
            (format!(r#"meshbox_tool_calls_in_flight{{{l}}}"#), 0.0),
            (format!(r#"meshbox_service_restarts_total{{{l}}}"#), 1.0),
            (
                format!(r#"meshbox_service_health{{{l},state="unhealthy"}}"#),
                1.0,
            ),
            // The restart ran the prepared sandbox again: one acquisition.
            (
                r#"meshbox_install_cache_total{kind="path",result="hit"}"#.to_string(),
                1.0,
            ),
        ] {
            assert_eq!(sample(&text, &series), Some(want), "{series} in\n{text}");
        }
        sup.undeploy(&key).await.unwrap();
        assert!(!metrics.encode().contains(l), "{}", metrics.encode());
        assert_eq!(svc.phase(), Phase::Stopped);
    }

    #[tokio::test(start_paused = true)]
    async fn unavailable_and_timeout_outcomes() {
        let (sup, metrics, dir) = setup(Script::CrashAfterHandshake);
        let key = ServiceKey::parse("m", "c").unwrap();
        sup.deploy(key.clone(), spec(&dir)).await.unwrap();
        let svc = sup.get(&key).unwrap();
        while svc.phase() != Phase::Crashed {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = sup.call_raw(&key, "t", json!({}), None).await.unwrap_err();
        let text = metrics.encode();
        assert_eq!(
            sample(
                &text,
                r#"meshbox_tool_calls_total{mesh="m",service="c",tool="other",outcome="unavailable"}"#
            ),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                r#"meshbox_service_restarts_total{mesh="m",service="c"}"#
            ),
            Some(6.0)
        );

        let (sup, metrics, dir) = setup(Script::StopReading);
        let key = ServiceKey::parse("m", "quiet").unwrap();
        sup.deploy(key.clone(), spec(&dir)).await.unwrap();
        // It reads no request any more: calls time out.
        let _ = sup
            .call_raw(&key, "t", json!({}), Some(Duration::from_millis(50)))
            .await
            .unwrap_err();
        assert_eq!(
            sample(
                &metrics.encode(),
                r#"meshbox_tool_calls_total{mesh="m",service="quiet",tool="other",outcome="timeout"}"#
            ),
            Some(1.0)
        );
    }
}
