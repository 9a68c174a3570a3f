//! The readiness probe's threshold state machine and its timing (pure: time is a parameter).

use std::time::{Duration, Instant};

use crate::InstanceState;
use crate::spec::{Probe, ProbeAction};

/// Fastest startup polling for exec probes. Knative: 50 ms (readiness/probe.go `retryInterval`).
pub const EXEC_STARTUP_INTERVAL: Duration = Duration::from_millis(50);

/// Probe timing knobs that are not in the Kubernetes `Probe` (see [`crate::RuntimeOptions`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeTiming {
    /// Interval between attempts while an instance with `periodSeconds: 0` has not been ready yet.
    pub startup_interval: Duration,
    /// How long the fast startup probing lasts before falling back to the steady period.
    /// Knative: the queue-proxy polls aggressively for `PollTimeout` = 10 s.
    pub aggressive_window: Duration,
    /// Timeout of one attempt during fast startup probing. Knative: `aggressiveProbeTimeout` = 100 ms.
    pub aggressive_timeout: Duration,
    /// Period once ready (or after the window) when the probe has `periodSeconds: 0`.
    pub steady_period: Duration,
}

impl Default for ProbeTiming {
    fn default() -> Self {
        ProbeTiming {
            // Knative polls every 50 ms (readiness/probe.go retryInterval). We poll every 5 ms: a refused
            // connect on loopback costs microseconds, and the goal is < 20 ms over the app's own startup.
            startup_interval: Duration::from_millis(5),
            aggressive_window: Duration::from_secs(10),
            aggressive_timeout: Duration::from_millis(100),
            // Kubernetes' default periodSeconds is 10; the local runtime checks every second so a broken
            // instance leaves the endpoints quickly.
            steady_period: Duration::from_secs(1),
        }
    }
}

/// Counts consecutive probe results and decides Starting -> Ready <-> NotReady.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadinessTracker {
    state: InstanceState,
    successes: u32,
    failures: u32,
}

impl Default for ReadinessTracker {
    fn default() -> Self {
        Self::new()
    }
}

impl ReadinessTracker {
    pub fn new() -> Self {
        ReadinessTracker {
            state: InstanceState::Starting,
            successes: 0,
            failures: 0,
        }
    }

    pub fn state(&self) -> InstanceState {
        self.state
    }

    /// Records one probe result; returns the new state when it changed.
    /// Kubernetes: `successThreshold` consecutive successes make a container ready, `failureThreshold`
    /// consecutive failures make it unready. An instance that has never been ready stays Starting.
    pub fn observe(&mut self, probe: &Probe, ok: bool) -> Option<InstanceState> {
        if ok {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            if self.state != InstanceState::Ready && self.successes >= probe.success_threshold {
                self.state = InstanceState::Ready;
                return Some(self.state);
            }
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            if self.state == InstanceState::Ready && self.failures >= probe.failure_threshold {
                self.state = InstanceState::NotReady;
                return Some(self.state);
            }
        }
        None
    }

    /// Whether the next attempt is part of Knative's fast startup polling.
    pub fn aggressive(
        &self,
        probe: &Probe,
        timing: &ProbeTiming,
        spawned_at: Instant,
        now: Instant,
    ) -> bool {
        // Knative: `periodSeconds: 0` means poll fast until the first success (readiness/probe.go).
        probe.period.is_none()
            && self.state == InstanceState::Starting
            && now.saturating_duration_since(spawned_at)
                < probe.initial_delay + timing.aggressive_window
    }

    /// When to run the next attempt, given that the last one finished at `now`.
    pub fn next_probe_at(
        &self,
        probe: &Probe,
        timing: &ProbeTiming,
        spawned_at: Instant,
        now: Instant,
    ) -> Instant {
        let interval = if self.aggressive(probe, timing, spawned_at, now) {
            match probe.action {
                // Forking a probe command every few ms would slow the app's own startup.
                ProbeAction::Exec { .. } => timing.startup_interval.max(EXEC_STARTUP_INTERVAL),
                _ => timing.startup_interval,
            }
        } else {
            probe.period.unwrap_or(timing.steady_period)
        };
        (now + interval).max(Self::first_probe_at(probe, spawned_at))
    }

    /// The first attempt: right after spawn, or after `initialDelaySeconds`.
    pub fn first_probe_at(probe: &Probe, spawned_at: Instant) -> Instant {
        spawned_at + probe.initial_delay
    }

    /// The timeout of the attempt about to run at `now`.
    pub fn attempt_timeout(
        &self,
        probe: &Probe,
        timing: &ProbeTiming,
        spawned_at: Instant,
        now: Instant,
    ) -> Duration {
        if self.aggressive(probe, timing, spawned_at, now) {
            timing.aggressive_timeout
        } else {
            probe.timeout
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use InstanceState::*;

    fn probe(success: u32, failure: u32) -> Probe {
        Probe {
            success_threshold: success,
            failure_threshold: failure,
            ..Probe::default()
        }
    }

    #[test]
    fn thresholds_drive_state_changes() {
        // (success_threshold, failure_threshold, results, state after each result)
        let cases: Vec<(u32, u32, Vec<bool>, Vec<InstanceState>)> = vec![
            (1, 3, vec![true], vec![Ready]),
            (
                1,
                3,
                vec![false, false, false, false, true],
                vec![Starting, Starting, Starting, Starting, Ready],
            ),
            (
                2,
                3,
                vec![true, false, true, true],
                vec![Starting, Starting, Starting, Ready],
            ),
            (
                1,
                2,
                vec![true, false, false, false],
                vec![Ready, Ready, NotReady, NotReady],
            ),
            (1, 2, vec![true, false, true, false, true], vec![Ready; 5]),
            (
                2,
                1,
                vec![true, true, false, true, true],
                vec![Starting, Ready, NotReady, NotReady, Ready],
            ),
        ];
        for (s, f, results, want) in cases {
            let p = probe(s, f);
            let mut t = ReadinessTracker::new();
            let got: Vec<_> = results
                .iter()
                .map(|ok| {
                    t.observe(&p, *ok);
                    t.state()
                })
                .collect();
            assert_eq!(got, want, "success={s} failure={f} results={results:?}");
        }
    }

    #[test]
    fn observe_reports_only_changes() {
        let p = probe(1, 1);
        let mut t = ReadinessTracker::new();
        assert_eq!(t.observe(&p, false), None);
        assert_eq!(t.observe(&p, true), Some(Ready));
        assert_eq!(t.observe(&p, true), None);
        assert_eq!(t.observe(&p, false), Some(NotReady));
        assert_eq!(t.observe(&p, false), None);
    }

    #[test]
    fn probes_fast_until_first_success_then_steadily() {
        let timing = ProbeTiming::default();
        let p = Probe::default();
        let t0 = Instant::now();
        let mut t = ReadinessTracker::new();
        let now = t0 + Duration::from_millis(3);
        assert_eq!(
            t.next_probe_at(&p, &timing, t0, now),
            now + timing.startup_interval
        );
        assert_eq!(
            t.attempt_timeout(&p, &timing, t0, now),
            timing.aggressive_timeout
        );
        t.observe(&p, true);
        assert_eq!(
            t.next_probe_at(&p, &timing, t0, now),
            now + timing.steady_period
        );
        assert_eq!(t.attempt_timeout(&p, &timing, t0, now), p.timeout);
    }

    #[test]
    fn exec_probes_poll_at_knatives_interval() {
        let timing = ProbeTiming::default();
        let p = Probe::exec(vec!["true".into()]);
        let t0 = Instant::now();
        let t = ReadinessTracker::new();
        assert_eq!(
            t.next_probe_at(&p, &timing, t0, t0),
            t0 + EXEC_STARTUP_INTERVAL
        );
    }

    #[test]
    fn fast_probing_stops_after_the_window() {
        let timing = ProbeTiming::default();
        let p = Probe::default();
        let t0 = Instant::now();
        let t = ReadinessTracker::new();
        let late = t0 + timing.aggressive_window + Duration::from_millis(1);
        assert_eq!(
            t.next_probe_at(&p, &timing, t0, late),
            late + timing.steady_period
        );
    }

    #[test]
    fn explicit_period_is_honoured_from_the_start() {
        let timing = ProbeTiming::default();
        let p = Probe {
            period: Some(Duration::from_secs(2)),
            ..Probe::default()
        };
        let t0 = Instant::now();
        let t = ReadinessTracker::new();
        assert_eq!(
            t.next_probe_at(&p, &timing, t0, t0),
            t0 + Duration::from_secs(2)
        );
    }

    #[test]
    fn initial_delay_postpones_the_first_attempts() {
        let timing = ProbeTiming::default();
        let p = Probe {
            initial_delay: Duration::from_secs(1),
            ..Probe::default()
        };
        let t0 = Instant::now();
        let t = ReadinessTracker::new();
        assert_eq!(
            ReadinessTracker::first_probe_at(&p, t0),
            t0 + Duration::from_secs(1)
        );
        assert_eq!(
            t.next_probe_at(&p, &timing, t0, t0),
            t0 + Duration::from_secs(1)
        );
    }
}
