//! One revision's metric windows (Knative's `metrics.collection`): stable and panic windows of
//! concurrency and of requests per second, fed one stat per scrape plus the activator's own stats.

use std::time::{Duration, Instant};

use sluice_api::autoscaling::Stat;

use crate::aggregation::WindowedBuckets;
use crate::config::{AggregationAlgorithm, BUCKET_SIZE};

/// Observed (stable, panic) averages of the revision's metric, summed over its instances.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observed {
    pub stable: f64,
    pub panic: f64,
}

/// The windows of one revision. Time is an `Instant` passed in; buckets are whole seconds since
/// `epoch` (Knative truncates wall time to the bucket size).
#[derive(Debug, Clone)]
pub struct Collector {
    epoch: Instant,
    concurrency_stable: WindowedBuckets,
    concurrency_panic: WindowedBuckets,
    rps_stable: WindowedBuckets,
    rps_panic: WindowedBuckets,
    /// The last scrape's contribution: (bucket, concurrency, rps).
    last_scrape: Option<(u64, f64, f64)>,
}

fn buckets_for(window: Duration) -> usize {
    window.as_nanos().div_ceil(BUCKET_SIZE.as_nanos()).max(1) as usize
}

impl Collector {
    /// `epoch` aligns the buckets; use the same one for every collector of a process (any fixed instant).
    pub fn new(
        stable_window: Duration,
        panic_window: Duration,
        algorithm: AggregationAlgorithm,
        epoch: Instant,
    ) -> Self {
        let (s, p) = (buckets_for(stable_window), buckets_for(panic_window));
        Collector {
            epoch,
            concurrency_stable: WindowedBuckets::new(s, algorithm),
            concurrency_panic: WindowedBuckets::new(p, algorithm),
            rps_stable: WindowedBuckets::new(s, algorithm),
            rps_panic: WindowedBuckets::new(p, algorithm),
            last_scrape: None,
        }
    }

    /// Follows a change of the revision's windows (Knative's `updateMetric` -> `ResizeWindow`).
    pub fn resize(&mut self, stable_window: Duration, panic_window: Duration) {
        let (s, p) = (buckets_for(stable_window), buckets_for(panic_window));
        self.concurrency_stable.resize(s);
        self.concurrency_panic.resize(p);
        self.rps_stable.resize(s);
        self.rps_panic.resize(p);
    }

    /// The bucket index of `now`.
    pub fn bucket(&self, now: Instant) -> u64 {
        (now.saturating_duration_since(self.epoch).as_nanos() / BUCKET_SIZE.as_nanos()) as u64
    }

    /// Knative's `collection.record`: proxied requests were already counted by the activator (which
    /// records its own stat here too), so they are subtracted to avoid counting them twice.
    pub fn record(&mut self, now: Instant, stat: &Stat) {
        let i = self.bucket(now);
        let (concurrency, rps) = Self::values(stat);
        self.add(i, concurrency, rps);
    }

    /// Records the revision's scraped total (the sum over its instances) for this second. Knative scrapes
    /// once a second, one bucket each; if scrapes come faster, the last one of a second replaces the
    /// earlier ones instead of adding up, so the scrape period does not change the values.
    pub fn record_scrape(&mut self, now: Instant, stat: &Stat) {
        let i = self.bucket(now);
        let (mut concurrency, mut rps) = Self::values(stat);
        let (c, r) = (concurrency, rps);
        if let Some((bucket, old_c, old_r)) = self.last_scrape
            && bucket == i
        {
            concurrency -= old_c;
            rps -= old_r;
        }
        self.last_scrape = Some((i, c, r));
        self.add(i, concurrency, rps);
    }

    fn values(stat: &Stat) -> (f64, f64) {
        (
            stat.average_concurrent_requests - stat.average_proxied_concurrent_requests,
            stat.request_count - stat.proxied_request_count,
        )
    }

    fn add(&mut self, i: u64, concurrency: f64, rps: f64) {
        self.concurrency_stable.record(i, concurrency);
        self.concurrency_panic.record(i, concurrency);
        self.rps_stable.record(i, rps);
        self.rps_panic.record(i, rps);
    }

    /// Knative's `StableAndPanicConcurrency`; `None` is Knative's `ErrNoData` (nothing for a stable window).
    pub fn stable_and_panic_concurrency(&self, now: Instant) -> Option<Observed> {
        let i = self.bucket(now);
        if self.concurrency_stable.is_empty(i) {
            return None;
        }
        Some(Observed {
            stable: self.concurrency_stable.window_average(i),
            panic: self.concurrency_panic.window_average(i),
        })
    }

    /// Knative's `StableAndPanicRPS`.
    pub fn stable_and_panic_rps(&self, now: Instant) -> Option<Observed> {
        let i = self.bucket(now);
        if self.rps_stable.is_empty(i) {
            return None;
        }
        Some(Observed {
            stable: self.rps_stable.window_average(i),
            panic: self.rps_panic.window_average(i),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(concurrency: f64, proxied: f64, count: f64, proxied_count: f64) -> Stat {
        Stat {
            pod_name: "pod".into(),
            average_concurrent_requests: concurrency,
            average_proxied_concurrent_requests: proxied,
            request_count: count,
            proxied_request_count: proxied_count,
            process_uptime: 1.0,
        }
    }

    #[test]
    fn proxied_requests_are_subtracted_and_activator_stats_added() {
        let epoch = Instant::now();
        let mut c = Collector::new(
            Duration::from_secs(60),
            Duration::from_secs(6),
            AggregationAlgorithm::Linear,
            epoch,
        );
        let now = epoch + Duration::from_millis(1500);
        c.record(now, &stat(10.0, 4.0, 20.0, 5.0));
        // The activator reports the 4 it proxied itself.
        c.record(now, &stat(4.0, 0.0, 5.0, 0.0));
        assert_eq!(
            c.stable_and_panic_concurrency(now),
            Some(Observed {
                stable: 10.0,
                panic: 10.0
            })
        );
        assert_eq!(
            c.stable_and_panic_rps(now),
            Some(Observed {
                stable: 20.0,
                panic: 20.0
            })
        );
    }

    #[test]
    fn the_last_scrape_of_a_second_replaces_earlier_ones() {
        let epoch = Instant::now();
        let mut c = Collector::new(
            Duration::from_secs(60),
            Duration::from_secs(6),
            AggregationAlgorithm::Linear,
            epoch,
        );
        for ms in [0, 100, 900] {
            c.record_scrape(epoch + Duration::from_millis(ms), &stat(3.0, 0.0, 1.0, 0.0));
        }
        c.record(
            epoch + Duration::from_millis(950),
            &stat(1.0, 0.0, 1.0, 0.0),
        );
        let now = epoch + Duration::from_millis(999);
        assert_eq!(c.stable_and_panic_concurrency(now).unwrap().stable, 4.0);
        assert_eq!(c.stable_and_panic_rps(now).unwrap().stable, 2.0);
    }

    #[test]
    fn stable_and_panic_windows_differ() {
        let epoch = Instant::now();
        let mut c = Collector::new(
            Duration::from_secs(10),
            Duration::from_secs(2),
            AggregationAlgorithm::Linear,
            epoch,
        );
        for s in 0..10u64 {
            let v = if s < 8 { 0.0 } else { 10.0 };
            c.record(epoch + Duration::from_secs(s), &stat(v, 0.0, 0.0, 0.0));
        }
        let o = c
            .stable_and_panic_concurrency(epoch + Duration::from_secs(9))
            .unwrap();
        assert_eq!(o.stable, 2.0);
        assert_eq!(o.panic, 10.0);
    }

    #[test]
    fn no_data_for_a_stable_window_is_no_data() {
        let epoch = Instant::now();
        let mut c = Collector::new(
            Duration::from_secs(6),
            Duration::from_secs(1),
            AggregationAlgorithm::Linear,
            epoch,
        );
        assert_eq!(c.stable_and_panic_concurrency(epoch), None);
        c.record(epoch, &stat(1.0, 0.0, 1.0, 0.0));
        assert!(c.stable_and_panic_concurrency(epoch).is_some());
        assert_eq!(
            c.stable_and_panic_concurrency(epoch + Duration::from_secs(7)),
            None
        );
    }
}
