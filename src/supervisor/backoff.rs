//! Restart decisions: exponential backoff with jitter that resets after a
//! stable run, and a budget after which a service counts as crashed and is
//! retried on a slow schedule instead of being forgotten.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct BackoffConfig {
    /// First restart delay (1 s).
    pub initial: Duration,
    /// Longest restart delay (60 s).
    pub max: Duration,
    /// A run at least this long resets the counter (one stable minute).
    pub reset_after: Duration,
    /// Quick restarts in a row before the service is `crashed`.
    pub budget: u32,
    /// Retry interval once crashed.
    pub crashed_retry: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
            reset_after: Duration::from_secs(60),
            budget: 5,
            crashed_retry: Duration::from_secs(300),
        }
    }
}

/// Retries of a failed service (bad source, install error, missing secret):
/// `fast` every `fast_interval`, then every `slow_interval` (seed 003: 30 s × 5,
/// then 5 min).
#[derive(Debug, Clone)]
pub struct FailedRetry {
    pub fast: u32,
    pub fast_interval: Duration,
    pub slow_interval: Duration,
}

impl Default for FailedRetry {
    fn default() -> Self {
        FailedRetry {
            fast: 5,
            fast_interval: Duration::from_secs(30),
            slow_interval: Duration::from_secs(300),
        }
    }
}

impl FailedRetry {
    /// The wait before attempt `n` (1-based) after a failure.
    pub fn delay(&self, n: u32) -> Duration {
        if n <= self.fast {
            self.fast_interval
        } else {
            self.slow_interval
        }
    }
}

/// What to do after a server ended.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Restart after this delay; the service is `restarting` meanwhile.
    Restart(Duration),
    /// Budget spent: `crashed`, retried after this (slow) delay.
    Crashed(Duration),
}

#[derive(Debug, Clone)]
pub struct Backoff {
    config: BackoffConfig,
    /// Quick failures in a row.
    attempt: u32,
}

impl Backoff {
    pub fn new(config: BackoffConfig) -> Self {
        Backoff { config, attempt: 0 }
    }

    /// Decides after a run of `ran_for` ended (zero when the start itself failed).
    pub fn on_exit(&mut self, ran_for: Duration) -> Action {
        if ran_for >= self.config.reset_after {
            self.attempt = 0;
        }
        self.attempt = self.attempt.saturating_add(1);
        if self.attempt > self.config.budget {
            return Action::Crashed(self.config.crashed_retry);
        }
        let exp = self.attempt.saturating_sub(1).min(31);
        let base = self
            .config
            .initial
            .saturating_mul(1u32 << exp)
            .min(self.config.max);
        Action::Restart(jitter(base))
    }

    pub fn attempt(&self) -> u32 {
        self.attempt
    }
}

/// Spreads restarts over [75 %, 100 %] of the delay so a fleet restarting
/// together does not stampede, without ever exceeding the cap.
fn jitter(d: Duration) -> Duration {
    d.mul_f64(0.75 + fastrand::f64() * 0.25)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(a: Action) -> f64 {
        match a {
            Action::Restart(d) => d.as_secs_f64(),
            Action::Crashed(d) => -d.as_secs_f64(),
        }
    }

    #[test]
    fn doubles_to_cap_then_crashes() {
        let mut b = Backoff::new(BackoffConfig {
            budget: 10,
            ..Default::default()
        });
        let expect = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0, 60.0];
        for e in expect {
            let got = secs(b.on_exit(Duration::ZERO));
            assert!(got <= e && got >= e * 0.75, "got {got}, expected ~{e}");
        }
        assert_eq!(
            b.on_exit(Duration::ZERO),
            Action::Crashed(Duration::from_secs(300))
        );
        assert_eq!(
            b.on_exit(Duration::from_secs(1)),
            Action::Crashed(Duration::from_secs(300))
        );
    }

    #[test]
    fn stable_minute_resets() {
        let mut b = Backoff::new(BackoffConfig::default());
        for _ in 0..4 {
            let _ = b.on_exit(Duration::from_secs(5));
        }
        assert_eq!(b.attempt(), 4);
        let got = secs(b.on_exit(Duration::from_secs(61)));
        assert!(got <= 1.0, "reset to the first delay, got {got}");
        assert_eq!(b.attempt(), 1);
    }
}
