//! Time-windowed buckets (Knative's `pkg/autoscaler/aggregation`): a ring of per-bucket sums over a
//! window, averaged linearly or with exponential weights, and the max-over-a-window used for
//! scale-down delay (`aggregation/max`). Time is a bucket index (whole granularities since an epoch the
//! caller chooses), so the code is pure and tests are exact.

use std::collections::VecDeque;

use crate::config::AggregationAlgorithm;

/// Knative: the smallest decay multiplier of the weighted average.
const MIN_EXPONENT: f64 = 0.2;
/// Knative: the weights of the weighted average add up to at least this much.
const WEIGHT_PRECISION: f64 = 0.9999;
/// Knative rounds linear averages down to 6 digits.
const PRECISION: i32 = 6;

/// Knative's `TimedFloat64Buckets` (and `WeightedFloat64Buckets` with the weighted algorithm).
#[derive(Debug, Clone)]
pub struct WindowedBuckets {
    buckets: Vec<f64>,
    first_write: Option<u64>,
    last_write: Option<u64>,
    window_total: f64,
    algorithm: AggregationAlgorithm,
    smoothing: f64,
}

fn smoothing_coeff(buckets: usize) -> f64 {
    (1.0 - (1.0 - WEIGHT_PRECISION).powf(1.0 / buckets as f64)).max(MIN_EXPONENT)
}

fn round_down(f: f64) -> f64 {
    let p = 10f64.powi(PRECISION);
    (f * p).floor() / p
}

impl WindowedBuckets {
    /// A window of `buckets` buckets (the window divided by the granularity, rounded up; at least 1).
    pub fn new(buckets: usize, algorithm: AggregationAlgorithm) -> Self {
        let n = buckets.max(1);
        WindowedBuckets {
            buckets: vec![0.0; n],
            first_write: None,
            last_write: None,
            window_total: 0.0,
            algorithm,
            smoothing: smoothing_coeff(n),
        }
    }

    fn len(&self) -> u64 {
        self.buckets.len() as u64
    }

    fn slot(&self, index: u64) -> usize {
        (index % self.len()) as usize
    }

    /// Knative's `Record`: adds `value` to the bucket `index`. Buckets skipped since the last write are
    /// zeroed; after a whole window without writes the window starts afresh; values older than a
    /// window are dropped.
    pub fn record(&mut self, index: u64, value: f64) {
        match self.last_write {
            None => {
                self.first_write = Some(index);
                self.last_write = Some(index);
            }
            Some(last) if index > last => {
                if index - last >= self.len() {
                    self.buckets.iter_mut().for_each(|b| *b = 0.0);
                    self.window_total = 0.0;
                    self.first_write = Some(index);
                } else {
                    for i in last + 1..=index {
                        let s = self.slot(i);
                        self.window_total -= self.buckets[s];
                        self.buckets[s] = 0.0;
                    }
                }
                self.last_write = Some(index);
            }
            Some(last) if index < last => {
                if index + self.len() <= last {
                    return; // Older than a window.
                }
                if self.first_write.is_none_or(|f| f > index) {
                    self.first_write = Some(index);
                }
            }
            Some(_) => {}
        }
        let s = self.slot(index);
        self.buckets[s] += value;
        self.window_total += value;
    }

    /// Knative's `IsEmpty`: nothing recorded within the window before `now`.
    pub fn is_empty(&self, now: u64) -> bool {
        match self.last_write {
            None => true,
            Some(last) => now.saturating_sub(last) > self.len(),
        }
    }

    /// The window's average as of bucket `now`.
    pub fn window_average(&self, now: u64) -> f64 {
        match self.algorithm {
            AggregationAlgorithm::Linear => self.linear_average(now),
            AggregationAlgorithm::WeightedExponential => self.weighted_average(now),
        }
    }

    /// Knative: the average over the buckets written since the first write (a partial window when the
    /// data is young), leaving out the trailing buckets that nothing was written to yet.
    fn linear_average(&self, now: u64) -> f64 {
        let (Some(first), Some(last)) = (self.first_write, self.last_write) else {
            return 0.0;
        };
        let n = self.len();
        if now <= last {
            let valid = (last - first + 1).min(n);
            return round_down(self.window_total / valid as f64);
        }
        let gap = now - last;
        if gap >= n {
            return 0.0;
        }
        let mut total = self.window_total;
        for i in last + 1..=now {
            total -= self.buckets[self.slot(i)];
        }
        let valid = (last - first + 1).min(n - gap);
        round_down(total / valid as f64)
    }

    /// Knative's `WeightedFloat64Buckets.WindowAverage`: newest bucket weighs `smoothing`, each older
    /// one `(1 - smoothing)` times the next.
    fn weighted_average(&self, now: u64) -> f64 {
        let Some(last) = self.last_write else {
            return 0.0;
        };
        if self.is_empty(now) {
            return 0.0;
        }
        let total = self.len();
        let mut count = total;
        let mut multiplier = self.smoothing;
        if now > last {
            let zeros = now - last;
            multiplier *= (1.0 - self.smoothing).powi(zeros as i32);
            count = count.saturating_sub(zeros);
        }
        let mut ret = 0.0;
        for i in 0..count {
            // Walk back from the last write.
            let idx = (last + total - i) % total;
            ret += self.buckets[idx as usize] * multiplier;
            multiplier *= 1.0 - self.smoothing;
        }
        ret
    }

    /// Knative's `ResizeWindow`: keeps the newest buckets that fit the new size.
    pub fn resize(&mut self, buckets: usize) {
        let n = buckets.max(1);
        if n == self.buckets.len() {
            return;
        }
        let old = std::mem::replace(&mut self.buckets, vec![0.0; n]);
        let old_len = old.len() as u64;
        self.smoothing = smoothing_coeff(n);
        self.window_total = 0.0;
        let Some(last) = self.last_write else {
            return;
        };
        for k in 0..(n as u64).min(old_len) {
            let Some(i) = last.checked_sub(k) else { break };
            let v = old[(i % old_len) as usize];
            self.buckets[(i % n as u64) as usize] = v;
            self.window_total += v;
        }
        // Knative: the oldest data still held is (kept buckets - 1) before the last write.
        if let Some(first) = self.first_write {
            let kept = (n as u64).min(old_len);
            self.first_write = Some(first.max(last.saturating_sub(kept - 1)));
        }
    }
}

/// Knative's `max.TimeWindow`: the maximum value recorded over the last `buckets` indices
/// (a descending-minima deque).
#[derive(Debug, Clone)]
pub struct MaxWindow {
    size: u64,
    maxima: VecDeque<(u64, i64)>,
}

impl MaxWindow {
    pub fn new(buckets: usize) -> Self {
        MaxWindow {
            size: buckets.max(1) as u64,
            maxima: VecDeque::new(),
        }
    }

    /// Records `value` at a non-decreasing `index`.
    pub fn record(&mut self, index: u64, value: i64) {
        let mut value = value;
        // A value lower than the new one can never be the maximum again.
        while let Some(&(_, v)) = self.maxima.back() {
            if value < v {
                break;
            }
            self.maxima.pop_back();
        }
        // Drop what fell out of the window.
        while let Some(&(i, _)) = self.maxima.front() {
            if index.saturating_sub(i) < self.size {
                break;
            }
            self.maxima.pop_front();
        }
        // Two values at the same index: keep the larger.
        if let Some(&(i, v)) = self.maxima.back()
            && i == index
        {
            value = value.max(v);
            self.maxima.pop_back();
        }
        self.maxima.push_back((index, value));
    }

    /// The maximum over the window (0 before anything was recorded).
    pub fn current(&self) -> i64 {
        self.maxima.front().map(|&(_, v)| v).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn linear(n: usize) -> WindowedBuckets {
        WindowedBuckets::new(n, AggregationAlgorithm::Linear)
    }

    #[test]
    fn young_data_is_averaged_over_a_partial_window() {
        // Knative: firstWrite 2 buckets ago -> average over those 2 buckets, not the 60.
        let mut b = linear(60);
        b.record(100, 10.0);
        b.record(101, 20.0);
        assert_eq!(b.window_average(101), 15.0);
        assert!(!b.is_empty(101));
    }

    #[test]
    fn values_in_the_same_bucket_add_up() {
        // The scraped instances and the activator report into the same second.
        let mut b = linear(10);
        b.record(5, 3.0);
        b.record(5, 2.0);
        assert_eq!(b.window_average(5), 5.0);
    }

    #[test]
    fn gaps_count_as_zero_and_stale_tail_is_left_out() {
        let mut b = linear(4);
        for i in 0..4 {
            b.record(i, 4.0);
        }
        assert_eq!(b.window_average(3), 4.0);
        // Two buckets without data after the last write: averaged over the 2 that are still valid.
        assert_eq!(b.window_average(5), 4.0);
        // A write after a gap zeroes the skipped bucket.
        b.record(5, 0.0);
        assert_eq!(b.window_average(5), 2.0); // [4, 4, 0, 0] over 4 buckets
        // A whole window without data: nothing left.
        assert_eq!(b.window_average(9), 0.0);
        assert!(b.is_empty(10));
    }

    #[test]
    fn a_write_after_a_window_of_silence_starts_afresh() {
        let mut b = linear(3);
        b.record(0, 9.0);
        b.record(10, 1.0);
        assert_eq!(b.window_average(10), 1.0);
    }

    #[test]
    fn values_older_than_a_window_are_dropped() {
        let mut b = linear(3);
        b.record(10, 3.0);
        b.record(5, 100.0);
        assert_eq!(b.window_average(10), 3.0);
    }

    #[test]
    fn weighted_average_favours_recent_buckets() {
        // Knative's example: [10, 10, 5, 5] (newest last) averages lower than [5, 5, 10, 10].
        let mut older_high = WindowedBuckets::new(4, AggregationAlgorithm::WeightedExponential);
        let mut newer_high = WindowedBuckets::new(4, AggregationAlgorithm::WeightedExponential);
        for (i, (a, b)) in [(10.0, 5.0), (10.0, 5.0), (5.0, 10.0), (5.0, 10.0)]
            .into_iter()
            .enumerate()
        {
            older_high.record(i as u64, a);
            newer_high.record(i as u64, b);
        }
        let (lo, hi) = (older_high.window_average(3), newer_high.window_average(3));
        assert!(lo < 7.5 && hi > 7.5, "{lo} {hi}");
        assert_eq!(older_high.window_average(100), 0.0);
    }

    #[test]
    fn resize_keeps_the_newest_buckets() {
        let mut b = linear(4);
        for i in 0..4 {
            b.record(i, (i + 1) as f64);
        }
        b.resize(2);
        assert_eq!(b.window_average(3), 3.5);
        b.resize(6);
        assert_eq!(b.window_average(3), 3.5);
    }

    #[test]
    fn timed_float64_buckets_window_average() {
        // Knative's TestTimedFloat64BucketsWindowAverage (window 5 s), bucket indices from 100.
        let mut b = linear(5);
        b.record(100, 1.0);
        assert_eq!(b.window_average(100), 1.0, "first write, partial window");
        for i in 1..5 {
            b.record(100 + i, (i + 1) as f64);
        }
        assert_eq!(b.window_average(104), 15.0 / 5.0);
        assert_eq!(b.window_average(103), 15.0 / 5.0, "now lags behind");
        assert_eq!(
            b.window_average(106),
            (15.0 - 1.0 - 2.0) / 3.0,
            "short hole"
        );
        assert_eq!(b.window_average(110), 0.0, "long hole");
        b.record(106, 91.0);
        assert_eq!(
            b.window_average(106),
            (15.0 - 1.0 - 2.0 + 91.0) / 5.0,
            "write with holes"
        );
        b.record(160, 1984.0);
        assert_eq!(b.window_average(160), 1984.0, "much farther");
        b.record(157, 4.0);
        assert_eq!(b.window_average(160), (4.0 + 1984.0) / 4.0, "earlier time");
        b.record(161, 5.0);
        assert_eq!(b.window_average(161), (4.0 + 1984.0 + 5.0) / 5.0);
        b.record(158, 10.0);
        assert_eq!(b.window_average(161), (4.0 + 10.0 + 1984.0 + 5.0) / 5.0);
        b.record(155, 10.0);
        assert_eq!(
            b.window_average(161),
            (4.0 + 10.0 + 1984.0 + 5.0) / 5.0,
            "too early: ignored"
        );
    }

    #[test]
    fn descending_record() {
        // Knative's TestDescendingRecord.
        let mut b = linear(5);
        for i in (0..=8).rev() {
            b.record(100 + i, 5.0);
        }
        assert_eq!(b.window_average(105), 5.0);
    }

    #[test]
    fn timed_float64_buckets_window_update() {
        // Knative's TestTimedFloat64BucketsWindowUpdate (averages).
        let mut b = linear(5);
        for i in 0..6 {
            b.record(100 + i, (i + 1) as f64);
        }
        let initial = 2.0 + 3.0 + 4.0 + 5.0 + 6.0;
        assert_eq!(b.window_average(105), initial / 5.0);
        b.resize(10);
        assert_eq!(
            b.window_average(105),
            initial / 5.0,
            "at most 5 buckets known"
        );
        b.record(106, 7.0);
        assert_eq!(b.window_average(106), round_down((initial + 7.0) / 6.0));
        b.resize(4);
        assert_eq!(b.window_average(106), (initial + 7.0 - 2.0 - 3.0) / 4.0);
    }

    #[test]
    fn max_window_keeps_the_largest_value_for_the_window() {
        // Knative's TestAutoscalerScaleDownDelay "simple": 150 buckets of 2 s.
        let mut w = MaxWindow::new(150);
        w.record(1, 4);
        w.record(150, 0);
        assert_eq!(w.current(), 4);
        w.record(151, 0);
        assert_eq!(w.current(), 0);
        // Same index: the larger wins.
        w.record(152, 3);
        w.record(152, 1);
        assert_eq!(w.current(), 3);
    }
}
