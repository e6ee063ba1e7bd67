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
