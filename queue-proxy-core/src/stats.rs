//! What Knative's queue-proxy reports to the autoscaler (its `Stat`): over each 1 s window, the
//! time-weighted average number of requests in flight and the number of requests that arrived, for all
//! requests and for those proxied by the activator. Pure: every call is given the time.
//!
//! Windows are aligned on multiples of the window length since the Unix epoch, so the filters on every
//! Envoy worker close the same windows and their reports add up (averages over one window are linear).

use std::time::Duration;

/// The Knative reporting period.
pub const WINDOW: Duration = Duration::from_secs(1);

/// One closed window, as the autoscaler reads it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Report {
    /// The end of the window, in nanoseconds since the Unix epoch.
    pub window_end: u64,
    /// Time-weighted average concurrency over the window, x 1000 (rounded down).
    pub average_concurrency_milli: u64,
    /// The same for requests proxied by the activator.
    pub average_proxied_concurrency_milli: u64,
    /// Requests that arrived during the window.
    pub request_count: u64,
    /// Requests proxied by the activator that arrived during the window.
    pub proxied_request_count: u64,
}

impl Report {
    /// The four published values, in the order of [`Published`].
    pub fn values(&self) -> [u64; 4] {
        [
            self.average_concurrency_milli,
            self.average_proxied_concurrency_milli,
            self.request_count,
            self.proxied_request_count,
        ]
    }
}

/// The open window and the concurrency now. Times are nanoseconds since the Unix epoch; a time earlier
/// than one already seen (a wall-clock step back) counts as that earlier-seen time.
#[derive(Debug, Clone)]
pub struct Windows {
    window: u64,
    /// The open window covers [index * window, (index + 1) * window).
    index: u64,
    /// When the concurrency last changed (or the window opened), within the open window.
    since: u64,
    concurrency: u64,
    proxied_concurrency: u64,
    /// Integral of the concurrency over the open window so far, in request-nanoseconds.
    weighted: u128,
    proxied_weighted: u128,
    requests: u64,
    proxied_requests: u64,
}

impl Windows {
    pub fn new(window: Duration, now: u64) -> Windows {
        let window = u64::try_from(window.as_nanos()).unwrap_or(u64::MAX).max(1);
        Windows {
            window,
            index: now / window,
            since: now,
            concurrency: 0,
            proxied_concurrency: 0,
            weighted: 0,
            proxied_weighted: 0,
            requests: 0,
            proxied_requests: 0,
        }
    }

    /// Requests in flight now (arrived and not finished, queued ones included).
    pub fn concurrency(&self) -> u64 {
        self.concurrency
    }

    /// A request arrived. Returns the report of the last window this closed, if any.
    pub fn request_in(&mut self, now: u64, proxied: bool) -> Option<Report> {
        let report = self.advance(now);
        self.concurrency += 1;
        self.requests += 1;
        if proxied {
            self.proxied_concurrency += 1;
            self.proxied_requests += 1;
        }
        report
    }

    /// A request finished (answered, rejected, or its client went away).
    pub fn request_out(&mut self, now: u64, proxied: bool) -> Option<Report> {
        let report = self.advance(now);
        self.concurrency = self.concurrency.saturating_sub(1);
        if proxied {
            self.proxied_concurrency = self.proxied_concurrency.saturating_sub(1);
        }
        report
    }

    /// Closes every window that ended at or before `now`; returns the report of the latest one closed.
    pub fn advance(&mut self, now: u64) -> Option<Report> {
        let now = now.max(self.since);
        let mut report = None;
        let end = self.window_end();
        if now >= end {
            self.accumulate(end);
            report = Some(self.close(end));
            self.index += 1;
            // Windows after the first one closed saw no event: constant concurrency, no arrivals.
            let current = now / self.window;
            if current > self.index {
                self.index = current;
                let start = self.index * self.window;
                self.since = start;
                report = Some(Report {
                    window_end: start,
                    average_concurrency_milli: self.concurrency * 1000,
                    average_proxied_concurrency_milli: self.proxied_concurrency * 1000,
                    request_count: 0,
                    proxied_request_count: 0,
                });
            }
        }
        self.accumulate(now);
        report
    }

    fn window_end(&self) -> u64 {
        self.index.saturating_add(1).saturating_mul(self.window)
    }

    fn accumulate(&mut self, until: u64) {
        let elapsed = u128::from(until.saturating_sub(self.since));
        self.weighted += u128::from(self.concurrency) * elapsed;
        self.proxied_weighted += u128::from(self.proxied_concurrency) * elapsed;
        self.since = until;
    }

    fn close(&mut self, end: u64) -> Report {
        let window = u128::from(self.window);
        let milli = |weighted: u128| u64::try_from(weighted * 1000 / window).unwrap_or(u64::MAX);
        let report = Report {
            window_end: end,
            average_concurrency_milli: milli(self.weighted),
            average_proxied_concurrency_milli: milli(self.proxied_weighted),
            request_count: self.requests,
            proxied_request_count: self.proxied_requests,
        };
        self.weighted = 0;
        self.proxied_weighted = 0;
        self.requests = 0;
        self.proxied_requests = 0;
        report
    }
}

/// What one worker last added to the shared gauges. Each worker adds the difference between its new
/// report and what it added before, so a gauge holds the sum over workers of their latest reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Published {
    last: [u64; 4],
}

impl Published {
    /// The increments that take the gauges from the last published values to `values`.
    pub fn deltas(&mut self, values: [u64; 4]) -> [i64; 4] {
        let mut deltas = [0i64; 4];
        for (i, delta) in deltas.iter_mut().enumerate() {
            *delta = to_i64(values[i]) - to_i64(self.last[i]);
        }
        self.last = values;
        deltas
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;
    const MS: u64 = 1_000_000;
    /// Some whole second since the epoch.
    const T0: u64 = 1_700_000_000 * S;

    fn windows() -> Windows {
        Windows::new(WINDOW, T0)
    }

    #[test]
    fn an_idle_window_reports_zero() {
        let mut w = windows();
        assert_eq!(w.advance(T0 + 500 * MS), None);
        let report = w.advance(T0 + S).unwrap();
        assert_eq!(
            report,
            Report {
                window_end: T0 + S,
                ..Report::default()
            }
        );
    }

    #[test]
    fn concurrency_is_weighted_by_time() {
        // One request over the whole window, a second one for its last quarter: 1.25.
        let mut w = windows();
        assert_eq!(w.request_in(T0, false), None);
        assert_eq!(w.request_in(T0 + 750 * MS, false), None);
        let report = w.advance(T0 + S + 10 * MS).unwrap();
        assert_eq!(report.average_concurrency_milli, 1250);
        assert_eq!(report.request_count, 2);
        assert_eq!(report.average_proxied_concurrency_milli, 0);
        assert_eq!(report.proxied_request_count, 0);
        // Both still in flight: the next window reports 2 and no arrivals.
        let report = w.advance(T0 + 2 * S).unwrap();
        assert_eq!(report.average_concurrency_milli, 2000);
        assert_eq!(report.request_count, 0);
    }

    #[test]
    fn a_request_spanning_a_boundary_counts_in_both_windows_by_time() {
        let mut w = windows();
        w.request_in(T0 + 900 * MS, false);
        let closed = w.request_out(T0 + S + 300 * MS, false).unwrap();
        assert_eq!(closed.average_concurrency_milli, 100);
        assert_eq!(closed.request_count, 1);
        let next = w.advance(T0 + 2 * S).unwrap();
        assert_eq!(next.average_concurrency_milli, 300);
        // Counted where it arrived, as Knative counts ReqIn.
        assert_eq!(next.request_count, 0);
    }

    #[test]
    fn proxied_requests_count_in_both_series() {
        let mut w = windows();
        w.request_in(T0, true);
        w.request_in(T0, false);
        w.request_out(T0 + 500 * MS, true);
        let report = w.advance(T0 + S).unwrap();
        assert_eq!(report.average_concurrency_milli, 1500);
        assert_eq!(report.average_proxied_concurrency_milli, 500);
        assert_eq!(report.request_count, 2);
        assert_eq!(report.proxied_request_count, 1);
    }

    #[test]
    fn a_long_idle_gap_reports_the_latest_window_only() {
        let mut w = windows();
        w.request_in(T0 + 500 * MS, false);
        let report = w.advance(T0 + 10 * S + 200 * MS).unwrap();
        assert_eq!(
            report,
            Report {
                window_end: T0 + 10 * S,
                average_concurrency_milli: 1000,
                average_proxied_concurrency_milli: 0,
                request_count: 0,
                proxied_request_count: 0,
            }
        );
        w.request_out(T0 + 10 * S + 600 * MS, false);
        let report = w.advance(T0 + 11 * S).unwrap();
        assert_eq!(report.average_concurrency_milli, 600);
    }

    #[test]
    fn time_going_back_is_treated_as_no_time() {
        let mut w = windows();
        w.request_in(T0 + 500 * MS, false);
        assert_eq!(w.request_out(T0 + 100 * MS, false), None);
        let report = w.advance(T0 + S).unwrap();
        assert_eq!(report.average_concurrency_milli, 0);
        assert_eq!(report.request_count, 1);
    }

    #[test]
    fn finishing_more_than_arrived_never_underflows() {
        let mut w = windows();
        w.request_out(T0, true);
        assert_eq!(w.concurrency(), 0);
        assert_eq!(w.advance(T0 + S).unwrap().average_concurrency_milli, 0);
    }

    #[test]
    fn workers_reports_add_up_through_deltas() {
        let mut gauge = 0i64;
        let mut a = Published::default();
        let mut b = Published::default();
        gauge += a.deltas([1000, 0, 3, 0])[0];
        gauge += b.deltas([500, 0, 1, 0])[0];
        assert_eq!(gauge, 1500);
        gauge += a.deltas([0, 0, 0, 0])[0];
        assert_eq!(gauge, 500);
        gauge += b.deltas([250, 0, 0, 0])[0];
        assert_eq!(gauge, 250);
    }
}
