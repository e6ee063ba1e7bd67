//! Health as a separate field from lifecycle status.
//!
//! Two kinds of probe, tracked apart: **liveness** (`ping`, or
//! `server/discover` for a stateless server) whose consecutive failures at
//! the threshold restart the server, and **readiness** (an optional tool
//! call whose JSON-RPC error or `isError: true` fails it) whose failures at
//! the threshold mark the service `unhealthy` with the probe's own message,
//! without a restart. Pure: the probe task lives in `service.rs`.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Healthy,
    Degraded,
    Unhealthy,
    Unknown,
}

/// A readiness probe that failed, in its own words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ProbeFailure {
    pub message: String,
}

/// One round of probes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeResult {
    pub live: bool,
    /// The readiness probe, when one is configured.
    pub ready: Option<Result<(), ProbeFailure>>,
}

/// What a round means for the service.
#[must_use]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Keep {
        health: Health,
        /// The readiness probe's own message while it fails.
        error: Option<String>,
    },
    /// Liveness failed `threshold` times in a row: restart the server.
    Restart,
}

/// Counts consecutive failures of each probe against a threshold.
#[derive(Debug, Clone)]
pub struct HealthTracker {
    threshold: u32,
    liveness_failures: u32,
    readiness_failures: u32,
}

impl HealthTracker {
    pub fn new(threshold: u32) -> Self {
        HealthTracker {
            threshold: threshold.max(1),
            liveness_failures: 0,
            readiness_failures: 0,
        }
    }

    pub fn record(&mut self, r: ProbeResult) -> Verdict {
        if !r.live {
            self.liveness_failures += 1;
            if self.liveness_failures >= self.threshold {
                return Verdict::Restart;
            }
            return Verdict::Keep {
                health: Health::Degraded,
                error: Some("liveness probe failed".into()),
            };
        }
        self.liveness_failures = 0;
        match r.ready {
            None | Some(Ok(())) => {
                self.readiness_failures = 0;
                Verdict::Keep {
                    health: Health::Healthy,
                    error: None,
                }
            }
            Some(Err(ProbeFailure { message })) => {
                self.readiness_failures += 1;
                let health = if self.readiness_failures >= self.threshold {
                    Health::Unhealthy
                } else {
                    Health::Degraded
                };
                Verdict::Keep {
                    health,
                    error: Some(message),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(ok: bool) -> ProbeResult {
        ProbeResult {
            live: ok,
            ready: None,
        }
    }

    #[test]
    fn three_liveness_failures_restart_and_success_heals() {
        let mut t = HealthTracker::new(3);
        assert!(matches!(
            t.record(live(false)),
            Verdict::Keep {
                health: Health::Degraded,
                ..
            }
        ));
        assert_eq!(
            t.record(live(true)),
            Verdict::Keep {
                health: Health::Healthy,
                error: None
            }
        );
        let _ = t.record(live(false));
        let _ = t.record(live(false));
        assert_eq!(t.record(live(false)), Verdict::Restart);
    }

    #[test]
    fn readiness_failures_mark_unhealthy_with_the_message_never_restart() {
        let mut t = HealthTracker::new(2);
        let failing = || ProbeResult {
            live: true,
            ready: Some(Err(ProbeFailure {
                message: "tool `ready` answered isError: db down".into(),
            })),
        };
        assert!(matches!(
            t.record(failing()),
            Verdict::Keep {
                health: Health::Degraded,
                ..
            }
        ));
        for _ in 0..10 {
            match t.record(failing()) {
                Verdict::Keep {
                    health: Health::Unhealthy,
                    error: Some(e),
                } => assert!(e.contains("db down")),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            t.record(ProbeResult {
                live: true,
                ready: Some(Ok(()))
            }),
            Verdict::Keep {
                health: Health::Healthy,
                error: None
            }
        );
    }
}
