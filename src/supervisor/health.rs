//! Health as a separate field from lifecycle status: consecutive failed checks
//! degrade a service and, at the threshold, ask for a restart.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Healthy,
    Degraded,
    Unhealthy,
    Unknown,
}

/// Counts consecutive failed checks against a threshold.
#[derive(Debug, Clone)]
pub struct HealthTracker {
    threshold: u32,
    failures: u32,
}

/// What a check result means for the service.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Keep(Health),
    /// The threshold is reached: restart the server.
    Restart,
}

impl HealthTracker {
    pub fn new(threshold: u32) -> Self {
        HealthTracker {
            threshold: threshold.max(1),
            failures: 0,
        }
    }

    pub fn record(&mut self, ok: bool) -> Verdict {
        if ok {
            self.failures = 0;
            return Verdict::Keep(Health::Healthy);
        }
        self.failures += 1;
        if self.failures >= self.threshold {
            Verdict::Restart
        } else {
            Verdict::Keep(Health::Degraded)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_failures_restart_and_success_heals() {
        let mut t = HealthTracker::new(3);
        assert_eq!(t.record(false), Verdict::Keep(Health::Degraded));
        assert_eq!(t.record(true), Verdict::Keep(Health::Healthy));
        assert_eq!(t.record(false), Verdict::Keep(Health::Degraded));
        assert_eq!(t.record(false), Verdict::Keep(Health::Degraded));
        assert_eq!(t.record(false), Verdict::Restart);
    }
}
