//! What the activator tells the autoscaler: per-revision concurrency and request counts.
//!
//! Pure, time passed in. Knative: `pkg/activator/handler/concurrency_reporter.go` (reported every
//! second, plus an immediate report of concurrency 1 on the first request of a revision that had no
//! recent traffic: that report is what wakes a revision from zero) and `RequestStats` from
//! knative.dev/networking (time-weighted average concurrency over the window).

use std::collections::HashMap;
use std::time::Instant;

use sluice_api::autoscaling::{ACTIVATOR_POD_NAME, RevisionKey, Stat};

/// Knative's `network.RequestStats`: concurrency integrated over time between reports.
#[derive(Debug, Clone)]
pub struct RequestStats {
    concurrency: f64,
    last_change: Instant,
    request_count: f64,
    computed_concurrency: f64,
    seconds_in_use: f64,
}

/// One window's numbers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RequestStatsReport {
    pub average_concurrency: f64,
    pub request_count: f64,
}

impl RequestStats {
    pub fn new(now: Instant) -> Self {
        RequestStats {
            concurrency: 0.0,
            last_change: now,
            request_count: 0.0,
            computed_concurrency: 0.0,
            seconds_in_use: 0.0,
        }
    }

    fn compute(&mut self, now: Instant) {
        if now > self.last_change {
            let secs = (now - self.last_change).as_secs_f64();
            self.seconds_in_use += secs;
            self.computed_concurrency += self.concurrency * secs;
            self.last_change = now;
        }
    }

    pub fn request_in(&mut self, now: Instant) {
        self.compute(now);
        self.request_count += 1.0;
        self.concurrency += 1.0;
    }

    pub fn request_out(&mut self, now: Instant) {
        self.compute(now);
        self.concurrency = (self.concurrency - 1.0).max(0.0);
    }

    /// Cuts the window ending at `now` and starts a new one.
    pub fn report(&mut self, now: Instant) -> RequestStatsReport {
        self.compute(now);
        let average_concurrency = if self.seconds_in_use > 0.0 {
            self.computed_concurrency / self.seconds_in_use
        } else {
            0.0
        };
        let report = RequestStatsReport {
            average_concurrency,
            request_count: self.request_count,
        };
        self.computed_concurrency = 0.0;
        self.request_count = 0.0;
        self.seconds_in_use = 0.0;
        report
    }
}

#[derive(Debug, Clone)]
struct RevisionStats {
    stats: RequestStats,
    /// Knative: the first request was already reported (as concurrency 1, count 1); the next periodic
    /// report subtracts it so it is not counted twice.
    first_request: f64,
}

/// Knative's `ConcurrencyReporter` for the activator.
#[derive(Debug, Default)]
pub struct ConcurrencyReporter {
    stats: HashMap<RevisionKey, RevisionStats>,
}

fn stat(average_concurrent_requests: f64, request_count: f64) -> Stat {
    Stat {
        pod_name: ACTIVATOR_POD_NAME.to_string(),
        average_concurrent_requests,
        request_count,
        ..Stat::default()
    }
}

impl ConcurrencyReporter {
    pub fn new() -> Self {
        Self::default()
    }

    /// A request for `key` arrived. Returns the stat to send at once when this revision had no
    /// traffic in the last reporting window (Knative: "trigger an immediate scale-from-0").
    pub fn request_in(&mut self, key: &RevisionKey, now: Instant) -> Option<Stat> {
        let mut immediate = None;
        let entry = self.stats.entry(key.clone()).or_insert_with(|| {
            immediate = Some(stat(1.0, 1.0));
            RevisionStats {
                stats: RequestStats::new(now),
                first_request: 1.0,
            }
        });
        entry.stats.request_in(now);
        immediate
    }

    /// A request for `key` finished (its response was fully sent, or it failed).
    pub fn request_out(&mut self, key: &RevisionKey, now: Instant) {
        if let Some(s) = self.stats.get_mut(key) {
            s.stats.request_out(now);
        }
    }

    /// The periodic report (Knative: every second). Revisions without any activity during the whole
    /// window are reported one last time with zeros and then forgotten, so their next request is
    /// reported immediately again.
    pub fn report(&mut self, now: Instant) -> Vec<(RevisionKey, Stat)> {
        let mut out = Vec::with_capacity(self.stats.len());
        let mut idle = Vec::new();
        for (key, s) in self.stats.iter_mut() {
            let r = s.stats.report(now);
            let first = std::mem::take(&mut s.first_request);
            if r.average_concurrency == 0.0 {
                idle.push(key.clone());
            }
            // Knative: the first report said concurrency 1; over the window it may have been less.
            let concurrency = (r.average_concurrency - first).max(0.0);
            let count = r.request_count - first;
            out.push((key.clone(), stat(concurrency, count)));
        }
        for key in idle {
            self.stats.remove(&key);
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ms(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn average_concurrency_is_time_weighted() {
        let t0 = Instant::now();
        let mut s = RequestStats::new(t0);
        s.request_in(t0);
        s.request_in(ms(t0, 500));
        s.request_out(ms(t0, 500));
        s.request_out(ms(t0, 750));
        // 1 for 750 ms, 0 for 250 ms.
        let r = s.report(ms(t0, 1000));
        assert!((r.average_concurrency - 0.75).abs() < 1e-9, "{r:?}");
        assert_eq!(r.request_count, 2.0);
        // The next window starts empty.
        let r = s.report(ms(t0, 2000));
        assert_eq!(
            r,
            RequestStatsReport {
                average_concurrency: 0.0,
                request_count: 0.0
            }
        );
    }

    #[test]
    fn first_request_of_a_revision_is_reported_at_once_and_only_once() {
        let t0 = Instant::now();
        let key = RevisionKey::new("default", "hello-00001");
        let mut cr = ConcurrencyReporter::new();
        let first = cr.request_in(&key, t0).expect("immediate report");
        assert_eq!(first.pod_name, "activator");
        assert_eq!(first.average_concurrent_requests, 1.0);
        assert_eq!(first.request_count, 1.0);
        assert_eq!(cr.request_in(&key, ms(t0, 10)), None);
    }

    #[test]
    fn periodic_report_subtracts_the_immediate_one_and_forgets_idle_revisions() {
        let t0 = Instant::now();
        let key = RevisionKey::new("default", "hello-00001");
        let mut cr = ConcurrencyReporter::new();
        cr.request_in(&key, t0);
        cr.request_in(&key, t0);
        // Two in flight for the whole second: 2 - 1 (already reported) = 1; count 2 - 1 = 1.
        let r = cr.report(ms(t0, 1000));
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].1.average_concurrent_requests, 1.0);
        assert_eq!(r[0].1.request_count, 1.0);
        // Second window: still 2 in flight, nothing subtracted.
        let r = cr.report(ms(t0, 2000));
        assert_eq!(r[0].1.average_concurrent_requests, 2.0);
        assert_eq!(r[0].1.request_count, 0.0);
        cr.request_out(&key, ms(t0, 2000));
        cr.request_out(&key, ms(t0, 2000));
        // Idle for a whole window: reported as zero, then forgotten.
        let r = cr.report(ms(t0, 3000));
        assert_eq!(r[0].1.average_concurrent_requests, 0.0);
        assert!(cr.report(ms(t0, 4000)).is_empty());
        assert!(
            cr.request_in(&key, ms(t0, 4100)).is_some(),
            "reported at once again"
        );
    }
}
