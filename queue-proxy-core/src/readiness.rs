//! The readiness prober's bookkeeping: when the next probe is due, and when its answers change the
//! instance's readiness. Pure; the filter sends the probe (an HTTP call through an Envoy cluster) and
//! stores the outcome in shared data, so every worker answers `K-Network-Probe: queue` alike.

use crate::config::ProbeConfig;

/// Kubernetes httpGet: any status from 200 to 399 is a success; no answer (connect failure, timeout) is
/// a failure.
pub fn is_success(status: Option<u32>) -> bool {
    matches!(status, Some(200..=399))
}

#[derive(Debug, Clone)]
pub struct Prober {
    period: u64,
    failure_threshold: u32,
    next_due: u64,
    in_flight: bool,
    failures: u32,
}

impl Prober {
    /// The first probe is due at once.
    pub fn new(config: &ProbeConfig, now: u64) -> Prober {
        Prober {
            period: u64::try_from(config.period.as_nanos()).unwrap_or(u64::MAX),
            failure_threshold: config.failure_threshold,
            next_due: now,
            in_flight: false,
            failures: 0,
        }
    }

    /// True when a probe should be sent now (none in flight, period elapsed); notes it as sent.
    pub fn start(&mut self, now: u64) -> bool {
        if self.in_flight || now < self.next_due {
            return false;
        }
        self.in_flight = true;
        self.next_due = now.saturating_add(self.period);
        true
    }

    /// The probe could not even be sent. Returns the new readiness, if it changes.
    pub fn not_sent(&mut self) -> Option<bool> {
        self.in_flight = false;
        self.failed()
    }

    /// The probe's answer (its status, or None for no answer). Returns the new readiness to store:
    /// true after any success, false after `failure_threshold` failures in a row, else None.
    pub fn answered(&mut self, status: Option<u32>) -> Option<bool> {
        self.in_flight = false;
        if is_success(status) {
            self.failures = 0;
            Some(true)
        } else {
            self.failed()
        }
    }

    fn failed(&mut self) -> Option<bool> {
        self.failures = self.failures.saturating_add(1);
        (self.failures >= self.failure_threshold).then_some(false)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn prober(threshold: u32) -> Prober {
        Prober::new(
            &ProbeConfig {
                cluster: "c".into(),
                path: "/".into(),
                authority: "c".into(),
                period: Duration::from_nanos(100),
                timeout: Duration::from_nanos(50),
                failure_threshold: threshold,
            },
            1000,
        )
    }

    #[test]
    fn probes_once_per_period_and_never_two_at_once() {
        let mut p = prober(3);
        assert!(p.start(1000));
        assert!(!p.start(1200), "one in flight");
        assert_eq!(p.answered(Some(200)), Some(true));
        assert!(p.start(1200));
        p.answered(Some(204));
        assert!(!p.start(1250), "period not elapsed");
        assert!(p.start(1300));
    }

    #[test]
    fn ready_after_one_success_not_ready_after_threshold_failures() {
        let mut p = prober(3);
        assert_eq!(p.answered(Some(503)), None);
        assert_eq!(p.answered(None), None);
        assert_eq!(p.not_sent(), Some(false));
        assert_eq!(p.answered(Some(500)), Some(false));
        assert_eq!(p.answered(Some(302)), Some(true));
        assert_eq!(p.answered(Some(404)), None, "the count starts again");
    }

    #[test]
    fn success_is_200_to_399() {
        for (status, want) in [
            (Some(199), false),
            (Some(200), true),
            (Some(399), true),
            (Some(400), false),
            (None, false),
        ] {
            assert_eq!(is_success(status), want, "{status:?}");
        }
    }
}
