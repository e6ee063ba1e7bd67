//! The lifecycle's decisions, as a pure state machine: no tokio, no I/O.
//!
//! The async shell in `service.rs` tells the [`Decider`] what happened
//! ([`Event`]) and does what it answers ([`Next`]): start again now, or wait
//! (showing a phase) and then run the same sandbox again or prepare afresh.
//! Restart backoff, the crash budget and the failed-retry schedule all live
//! here, so they are unit-tested without a runtime.

use std::time::Duration;

use super::backoff::{Action, Backoff, BackoffConfig, FailedRetry};
use super::service::Phase;

/// What the shell observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Acquisition failed (bad source, install error, missing secret).
    PrepareFailed,
    /// Spawn or connect failed.
    StartFailed,
    /// The server exited when probed for its era: start it again at once in
    /// the handshake era; not a crash.
    ProbeExited,
    /// The server is up (connected).
    Running,
    /// A run ended.
    Ended { ran_for: Duration, cause: EndCause },
    /// An operator asked for a restart.
    RestartRequested,
}

/// Why a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndCause {
    /// The server exited (or was killed by the OOM killer).
    Exited,
    /// It closed its stdout: meshbox stopped it.
    StdoutClosed,
    /// Liveness checks failed in a row: meshbox stopped it. Counts as a quick
    /// crash whatever the run's length, so a hung server spends its budget.
    Liveness,
}

/// What to run after a wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Then {
    /// The same prepared sandbox again (a crash restart).
    Run,
    /// Acquire and prepare afresh (a failed service: its cause may be gone).
    Prepare,
}

/// What the shell does next.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Run the prepared sandbox again now.
    RunNow,
    /// Prepare afresh now.
    PrepareNow,
    /// Show `phase` for `delay`, then `then`. `attempts` is the failed-retry
    /// count when `phase` is `Failed`.
    Wait {
        phase: Phase,
        delay: Duration,
        then: Then,
        attempts: u32,
    },
    /// Keep supervising (the service runs).
    Supervise,
}

#[derive(Debug, Clone)]
pub struct Decider {
    backoff: Backoff,
    failed_retry: FailedRetry,
    /// Failed attempts in a row (persisted, so a restart of meshbox does not
    /// reset the schedule).
    failures: u32,
    /// Whether this deployment has run at least once: a start failure after
    /// that is a crash, not a bad spec.
    ever_ran: bool,
    restarts: u32,
}

impl Decider {
    pub fn new(backoff: BackoffConfig, failed_retry: FailedRetry, failures: u32) -> Self {
        Decider {
            backoff: Backoff::new(backoff),
            failed_retry,
            failures,
            ever_ran: false,
            restarts: 0,
        }
    }

    /// Failed attempts in a row so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Restarts so far (crash restarts, requested restarts).
    pub fn restarts(&self) -> u32 {
        self.restarts
    }

    pub fn ever_ran(&self) -> bool {
        self.ever_ran
    }

    fn failed(&mut self) -> Next {
        self.failures = self.failures.saturating_add(1);
        Next::Wait {
            phase: Phase::Failed,
            delay: self.failed_retry.delay(self.failures),
            then: Then::Prepare,
            attempts: self.failures,
        }
    }

    fn crashed(&mut self, ran_for: Duration) -> Next {
        let (phase, delay) = match self.backoff.on_exit(ran_for) {
            Action::Restart(d) => (Phase::Restarting, d),
            Action::Crashed(d) => (Phase::Crashed, d),
        };
        self.restarts = self.restarts.saturating_add(1);
        Next::Wait {
            phase,
            delay,
            then: Then::Run,
            attempts: 0,
        }
    }

    pub fn on(&mut self, event: Event) -> Next {
        match event {
            Event::PrepareFailed => self.failed(),
            Event::StartFailed if !self.ever_ran => self.failed(),
            Event::StartFailed => self.crashed(Duration::ZERO),
            Event::ProbeExited => Next::RunNow,
            Event::Running => {
                self.ever_ran = true;
                self.failures = 0;
                Next::Supervise
            }
            Event::Ended { ran_for, cause } => {
                let counted = match cause {
                    EndCause::Liveness => Duration::ZERO,
                    EndCause::Exited | EndCause::StdoutClosed => ran_for,
                };
                self.crashed(counted)
            }
            Event::RestartRequested => {
                self.restarts = self.restarts.saturating_add(1);
                if self.ever_ran {
                    Next::RunNow
                } else {
                    Next::PrepareNow
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decider() -> Decider {
        Decider::new(BackoffConfig::default(), FailedRetry::default(), 0)
    }

    fn wait(n: Next) -> (Phase, f64, Then, u32) {
        match n {
            Next::Wait {
                phase,
                delay,
                then,
                attempts,
            } => (phase, delay.as_secs_f64(), then, attempts),
            other => panic!("expected a wait, got {other:?}"),
        }
    }

    #[test]
    fn crash_loop_backs_off_then_crashes() {
        let mut d = decider();
        assert_eq!(d.on(Event::Running), Next::Supervise);
        let mut delays = Vec::new();
        for _ in 0..5 {
            let (phase, delay, then, _) = wait(d.on(Event::Ended {
                ran_for: Duration::from_secs(1),
                cause: EndCause::Exited,
            }));
            assert_eq!((phase, then), (Phase::Restarting, Then::Run));
            delays.push(delay);
            assert_eq!(d.on(Event::Running), Next::Supervise);
        }
        for (got, want) in delays.iter().zip([1.0, 2.0, 4.0, 8.0, 16.0]) {
            assert!(*got <= want && *got >= want * 0.75, "{delays:?}");
        }
        let (phase, delay, ..) = wait(d.on(Event::Ended {
            ran_for: Duration::from_secs(1),
            cause: EndCause::Exited,
        }));
        assert_eq!((phase, delay), (Phase::Crashed, 300.0));
        assert_eq!(d.restarts(), 6);
    }

    #[test]
    fn a_stable_run_resets_the_budget_but_liveness_failures_do_not() {
        let mut d = decider();
        let _ = d.on(Event::Running);
        for _ in 0..4 {
            let _ = d.on(Event::Ended {
                ran_for: Duration::from_secs(1),
                cause: EndCause::Exited,
            });
        }
        // A long run ended by failed liveness still counts as a quick crash.
        let (phase, delay, ..) = wait(d.on(Event::Ended {
            ran_for: Duration::from_secs(600),
            cause: EndCause::Liveness,
        }));
        assert_eq!(phase, Phase::Restarting);
        assert!(delay >= 12.0, "fifth crash backs off ~16s, got {delay}");
        let (phase, ..) = wait(d.on(Event::Ended {
            ran_for: Duration::from_secs(600),
            cause: EndCause::Liveness,
        }));
        assert_eq!(phase, Phase::Crashed);
        // Whereas a long run that simply exited resets it.
        let mut d = decider();
        let _ = d.on(Event::Running);
        for _ in 0..4 {
            let _ = d.on(Event::Ended {
                ran_for: Duration::from_secs(1),
                cause: EndCause::Exited,
            });
        }
        let (_, delay, ..) = wait(d.on(Event::Ended {
            ran_for: Duration::from_secs(61),
            cause: EndCause::StdoutClosed,
        }));
        assert!(delay <= 1.0, "reset to the first delay, got {delay}");
    }

    #[test]
    fn never_ran_means_failed_on_the_slow_schedule() {
        let mut d = decider();
        let mut seen = Vec::new();
        for i in 0..7 {
            let ev = if i % 2 == 0 {
                Event::PrepareFailed
            } else {
                Event::StartFailed
            };
            let (phase, delay, then, attempts) = wait(d.on(ev));
            assert_eq!((phase, then), (Phase::Failed, Then::Prepare));
            seen.push((attempts, delay));
        }
        assert_eq!(
            seen,
            [
                (1, 30.0),
                (2, 30.0),
                (3, 30.0),
                (4, 30.0),
                (5, 30.0),
                (6, 300.0),
                (7, 300.0)
            ]
        );
        // Coming up resets the count.
        assert_eq!(d.on(Event::Running), Next::Supervise);
        assert_eq!(d.failures(), 0);
    }

    #[test]
    fn failures_survive_a_restart_of_meshbox() {
        let mut d = Decider::new(BackoffConfig::default(), FailedRetry::default(), 5);
        let (_, delay, _, attempts) = wait(d.on(Event::PrepareFailed));
        assert_eq!((attempts, delay), (6, 300.0));
    }

    #[test]
    fn a_start_failure_after_running_is_a_crash() {
        let mut d = decider();
        let _ = d.on(Event::Running);
        let (phase, _, then, _) = wait(d.on(Event::StartFailed));
        assert_eq!((phase, then), (Phase::Restarting, Then::Run));
    }

    #[test]
    fn probe_exits_cost_nothing() {
        let mut d = decider();
        for _ in 0..10 {
            assert_eq!(d.on(Event::ProbeExited), Next::RunNow);
        }
        assert_eq!(d.restarts(), 0);
        assert_eq!(d.failures(), 0);
    }

    #[test]
    fn requested_restarts() {
        let mut d = decider();
        assert_eq!(d.on(Event::RestartRequested), Next::PrepareNow);
        let _ = d.on(Event::Running);
        assert_eq!(d.on(Event::RestartRequested), Next::RunNow);
        assert_eq!(d.restarts(), 2);
    }
}
