//! The KPA decider (Knative's `pkg/autoscaler/scaling/autoscaler.go` and the decider status kept by
//! `multiscaler.go`): from observed stable/panic values and the ready instances to a desired pod count
//! and the excess burst capacity. Pure: metrics and time come in as parameters.

use std::time::{Duration, Instant};

use crate::aggregation::MaxWindow;
use crate::collector::{Collector, Observed};
use crate::config::{RevisionScaling, ScalingMetric};

/// Knative: the autoscaler decides every `tick-interval` (2 s).
pub const TICK_INTERVAL: Duration = Duration::from_secs(2);

/// Knative's `DeciderSpec`.
#[derive(Debug, Clone, PartialEq)]
pub struct DeciderSpec {
    pub scaling_metric: ScalingMetric,
    pub target_value: f64,
    pub total_value: f64,
    pub target_burst_capacity: f64,
    pub panic_threshold: f64,
    pub max_scale_up_rate: f64,
    pub max_scale_down_rate: f64,
    pub stable_window: Duration,
    pub scale_down_delay: Duration,
    pub initial_scale: u32,
    pub reachable: bool,
    pub activation_scale: u32,
}

impl DeciderSpec {
    /// Knative's `MakeDecider`.
    pub fn from_scaling(s: &RevisionScaling) -> Self {
        DeciderSpec {
            scaling_metric: s.metric,
            target_value: s.target,
            total_value: s.total,
            target_burst_capacity: s.target_burst_capacity,
            panic_threshold: s.panic_threshold,
            max_scale_up_rate: s.max_scale_up_rate,
            max_scale_down_rate: s.max_scale_down_rate,
            stable_window: s.stable_window,
            scale_down_delay: s.scale_down_delay,
            initial_scale: s.initial_scale,
            reachable: s.reachability == crate::config::Reachability::Reachable,
            activation_scale: s.activation_scale,
        }
    }
}

/// Knative's `ScaleResult`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScaleResult {
    pub desired_pod_count: i32,
    /// Negative: not enough spare capacity for the target burst, the activator must stay in the path.
    pub excess_burst_capacity: i32,
    /// False when there were no metrics to decide on (Knative's `invalidSR`).
    pub scale_valid: bool,
}

impl ScaleResult {
    pub const INVALID: ScaleResult = ScaleResult {
        desired_pod_count: 0,
        excess_burst_capacity: 0,
        scale_valid: false,
    };
}

/// Knative's `autoscaler`: the panic state and the scale-down delay window of one revision.
#[derive(Debug, Clone)]
pub struct Autoscaler {
    spec: DeciderSpec,
    panic_time: Option<Instant>,
    max_panic_pods: i32,
    delay_window: Option<MaxWindow>,
    epoch: Instant,
}

fn delay_window(spec: &DeciderSpec) -> Option<MaxWindow> {
    (spec.scale_down_delay > Duration::ZERO).then(|| {
        MaxWindow::new(
            spec.scale_down_delay
                .as_nanos()
                .div_ceil(TICK_INTERVAL.as_nanos()) as usize,
        )
    })
}

impl Autoscaler {
    /// Knative's `newAutoscaler`: starts in panic mode when more than one instance is ready, so that a
    /// restart (which loses the metric history) does not scale down before enough data has arrived.
    /// `epoch` aligns the scale-down delay window's 2 s buckets.
    pub fn new(spec: DeciderSpec, ready_pods: u32, now: Instant, epoch: Instant) -> Self {
        let delay_window = delay_window(&spec);
        Autoscaler {
            spec,
            panic_time: (ready_pods > 1).then_some(now),
            max_panic_pods: ready_pods as i32,
            delay_window,
            epoch,
        }
    }

    /// Knative's `Update`. A changed scale-down delay starts a fresh delay window (Knative builds it once).
    pub fn update(&mut self, spec: DeciderSpec) {
        if spec.scale_down_delay != self.spec.scale_down_delay {
            self.delay_window = delay_window(&spec);
        }
        self.spec = spec;
    }

    pub fn spec(&self) -> &DeciderSpec {
        &self.spec
    }

    pub fn in_panic(&self) -> bool {
        self.panic_time.is_some()
    }

    /// Reads the observed values for the spec's metric from a collector and scales on them.
    pub fn scale_with(
        &mut self,
        collector: &Collector,
        ready_pods: u32,
        now: Instant,
    ) -> ScaleResult {
        let observed = match self.spec.scaling_metric {
            ScalingMetric::Concurrency => collector.stable_and_panic_concurrency(now),
            ScalingMetric::Rps => collector.stable_and_panic_rps(now),
        };
        self.scale(observed, ready_pods, now)
    }

    /// Knative's `Scale`: `observed` is `None` when there is no data (the result is then invalid).
    pub fn scale(
        &mut self,
        observed: Option<Observed>,
        ready_pods: u32,
        now: Instant,
    ) -> ScaleResult {
        let Some(observed) = observed else {
            return ScaleResult::INVALID;
        };
        let spec = &self.spec;
        let original_ready = ready_pods as f64;
        // Knative: use 1 when there are no ready pods.
        let ready = original_ready.max(1.0);

        // Knative: grow by at least one pod even with a conservative rate (ceil), and scale down at
        // most by the down rate, unless the revision is unreachable.
        let max_scale_up = (spec.max_scale_up_rate * ready).ceil();
        let max_scale_down = if spec.reachable {
            (ready / spec.max_scale_down_rate).floor()
        } else {
            0.0
        };

        let dspc = (observed.stable / spec.target_value).ceil();
        let dppc = (observed.panic / spec.target_value).ceil();
        let mut desired_stable = dspc.max(max_scale_down).min(max_scale_up) as i32;
        let mut desired_panic = dppc.max(max_scale_down).min(max_scale_up) as i32;

        // Knative: scaling up from nothing goes to at least activation-scale.
        let activation = spec.activation_scale as i32;
        if activation > 1 {
            if dspc > 0.0 && activation > desired_stable {
                desired_stable = activation;
            }
            if dppc > 0.0 && activation > desired_panic {
                desired_panic = activation;
            }
        }

        let over_threshold = dppc / ready >= spec.panic_threshold;
        match self.panic_time {
            None if over_threshold => {
                tracing::info!(target_value = spec.target_value, "PANICKING");
                self.panic_time = Some(now);
            }
            Some(_) if over_threshold => {
                // Still over the threshold: extend the panic.
                self.panic_time = Some(now);
            }
            Some(t) if t + spec.stable_window < now => {
                // The surge has made its way into the stable window.
                tracing::info!("un-panicking");
                self.panic_time = None;
                self.max_panic_pods = 0;
            }
            _ => {}
        }

        let mut desired = desired_stable;
        if self.panic_time.is_some() {
            // Provision for whichever is larger, and never scale down while panicking.
            desired = desired.max(desired_panic);
            if desired > self.max_panic_pods {
                self.max_panic_pods = desired;
            }
            desired = self.max_panic_pods;
        }

        if let Some(window) = &mut self.delay_window {
            let index = (now.saturating_duration_since(self.epoch).as_nanos()
                / TICK_INTERVAL.as_nanos()) as u64;
            window.record(index, desired as i64);
            // Knative: an unreachable revision (no route sends it traffic) is not kept warm.
            if spec.reachable {
                desired = window.current() as i32;
            }
        }

        // Knative: EBC = total capacity - target burst capacity - observed panic value.
        let tbc = spec.target_burst_capacity;
        let excess = if tbc == 0.0 {
            0.0
        } else if tbc > 0.0 {
            (original_ready * spec.total_value - tbc - observed.panic).floor()
        } else {
            -1.0
        };

        ScaleResult {
            desired_pod_count: desired,
            excess_burst_capacity: excess as i32,
            scale_valid: true,
        }
    }
}

/// What the decider last decided (Knative's `DeciderStatus`): kept across ticks, changed only by valid
/// results.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeciderStatus {
    /// -1 until the first valid decision ("unknown").
    pub desired_scale: i32,
    pub excess_burst_capacity: i32,
}

impl DeciderStatus {
    /// Knative's `createDecider`: scale unknown; the burst capacity the initial scale would give.
    pub fn initial(spec: &DeciderSpec) -> Self {
        let tbc = spec.target_burst_capacity;
        let excess_burst_capacity = if tbc == -1.0 || tbc == 0.0 {
            tbc as i32
        } else {
            // If TBC > total x initial scale, the initial scale won't cover it: the activator stays.
            (spec.initial_scale as f64 * spec.total_value - tbc) as i32
        };
        DeciderStatus {
            desired_scale: -1,
            excess_burst_capacity,
        }
    }

    /// Applies a scale result the way Knative's multiscaler does: invalid results change nothing.
    pub fn apply(&mut self, result: ScaleResult) {
        if result.scale_valid {
            self.desired_scale = result.desired_pod_count;
            self.excess_burst_capacity = result.excess_burst_capacity;
        }
    }
}

#[cfg(test)]
mod tests {
    //! Knative's `autoscaler_test.go`, case by case. Its test autoscaler: target utilization 0.75
    //! (total = target / 0.75), panic threshold 2, max up/down rates 10, stable window 60 s, one ready
    //! pod unless a case sets another.
    use super::*;

    const TARGET_UTILIZATION: f64 = 0.75;
    const STABLE_WINDOW: Duration = Duration::from_secs(60);

    fn spec(target: f64, tbc: f64) -> DeciderSpec {
        DeciderSpec {
            scaling_metric: ScalingMetric::Concurrency,
            target_value: target,
            total_value: target / TARGET_UTILIZATION,
            target_burst_capacity: tbc,
            panic_threshold: 2.0,
            max_scale_up_rate: 10.0,
            max_scale_down_rate: 10.0,
            stable_window: STABLE_WINDOW,
            scale_down_delay: Duration::ZERO,
            initial_scale: 1,
            reachable: true,
            activation_scale: 1,
        }
    }

    fn observed(stable: f64, panic: f64) -> Option<Observed> {
        Some(Observed { stable, panic })
    }

    fn expected_ebc(target: f64, tbc: f64, panic: f64, pods: f64) -> i32 {
        (target / TARGET_UTILIZATION * pods - tbc - panic).floor() as i32
    }

    fn result(desired: i32, ebc: i32) -> ScaleResult {
        ScaleResult {
            desired_pod_count: desired,
            excess_burst_capacity: ebc,
            scale_valid: true,
        }
    }

    /// Knative compares EBC with a tolerance of 1 (float rounding).
    #[track_caller]
    fn assert_scale(got: ScaleResult, want: ScaleResult) {
        assert_eq!(
            got.desired_pod_count, want.desired_pod_count,
            "{got:?} want {want:?}"
        );
        assert_eq!(got.scale_valid, want.scale_valid, "{got:?} want {want:?}");
        assert!(
            (got.excess_burst_capacity - want.excess_burst_capacity).abs() <= 1,
            "{got:?} want {want:?}"
        );
    }

    fn new(spec: DeciderSpec, now: Instant) -> Autoscaler {
        Autoscaler::new(spec, 1, now, now)
    }

    #[test]
    fn autoscaler_scale_table() {
        // TestAutoscalerScale.
        struct Case {
            label: &'static str,
            spec: DeciderSpec,
            observed: (f64, f64),
            panic: Option<(i64, i32)>, // (seconds ago, max panic pods)
            ready: u32,
            want: ScaleResult,
        }
        let cases = [
            Case {
                label: "AutoscalerStableModeUnlimitedTBC",
                spec: spec(181.0, -1.0),
                observed: (21.0, 26.0),
                panic: None,
                ready: 1,
                want: result(1, -1),
            },
            Case {
                label: "Autoscaler0TBC",
                spec: spec(10.0, 0.0),
                observed: (50.0, 49.0),
                panic: None,
                ready: 1,
                want: result(5, 0),
            },
            Case {
                label: "AutoscalerStableModeNoChange",
                spec: spec(10.0, 100.0),
                observed: (50.0, 50.0),
                panic: None,
                ready: 1,
                want: result(5, expected_ebc(10.0, 100.0, 50.0, 1.0)),
            },
            Case {
                label: "AutoscalerPanicStableLargerThanPanic",
                spec: spec(1.0, 100.0),
                observed: (50.0, 30.0),
                panic: Some((5, 5)),
                ready: 5,
                want: result(50, expected_ebc(1.0, 100.0, 30.0, 5.0)),
            },
            Case {
                label: "AutoscalerPanicStableLessThanPanic",
                spec: spec(1.0, 100.0),
                observed: (20.0, 30.0),
                panic: Some((5, 5)),
                ready: 5,
                want: result(30, expected_ebc(1.0, 100.0, 30.0, 5.0)),
            },
            Case {
                label: "AutoscalerStableModeNoChangeAlreadyScaled",
                spec: spec(10.0, 100.0),
                observed: (50.0, 50.0),
                panic: None,
                ready: 5,
                want: result(5, expected_ebc(10.0, 100.0, 50.0, 5.0)),
            },
            Case {
                label: "AutoscalerStableModeIncreaseWithSmallScaleUpRate",
                spec: DeciderSpec {
                    max_scale_up_rate: 1.1,
                    ..spec(1.0, 1982.0)
                },
                observed: (3.0, 3.1),
                panic: None,
                ready: 2,
                want: result(3, expected_ebc(1.0, 1982.0, 3.1, 2.0)),
            },
            Case {
                label: "AutoscalerStableModeDecreaseWithSmallScaleDownRate",
                spec: DeciderSpec {
                    max_scale_down_rate: 1.1,
                    ..spec(10.0, 1982.0)
                },
                observed: (1.0, 1.0),
                panic: None,
                ready: 100,
                want: result(90, expected_ebc(10.0, 1982.0, 1.0, 100.0)),
            },
            Case {
                label: "AutoscalerStableModeDecreaseNonReachable",
                spec: DeciderSpec {
                    max_scale_down_rate: 1.1,
                    reachable: false,
                    ..spec(10.0, 1982.0)
                },
                observed: (1.0, 1.0),
                panic: None,
                ready: 100,
                want: result(1, expected_ebc(10.0, 1982.0, 1.0, 100.0)),
            },
            Case {
                label: "AutoscalerPanicModeDoublePodCount",
                spec: spec(10.0, 84.0),
                observed: (50.0, 100.0),
                panic: None,
                ready: 1,
                // The panic concurrency takes precedence.
                want: result(10, expected_ebc(10.0, 84.0, 100.0, 1.0)),
            },
        ];
        let now = Instant::now() + Duration::from_secs(3600);
        for case in cases {
            let mut a = new(case.spec, now);
            if let Some((ago, pods)) = case.panic {
                a.panic_time = Some(now - Duration::from_secs(ago as u64));
                a.max_panic_pods = pods;
            }
            let got = a.scale(observed(case.observed.0, case.observed.1), case.ready, now);
            assert_eq!(
                got.desired_pod_count, case.want.desired_pod_count,
                "{}: {got:?}",
                case.label
            );
            assert!(
                (got.excess_burst_capacity - case.want.excess_burst_capacity).abs() <= 1,
                "{}: {got:?} want {:?}",
                case.label,
                case.want
            );
        }
    }

    #[test]
    fn autoscaler_no_data_no_autoscale() {
        // TestAutoscalerNoDataNoAutoscale, and AutoscalerNoDataAtZeroNoAutoscale through DeciderStatus.
        let now = Instant::now();
        let mut a = new(spec(10.0, 100.0), now);
        assert_eq!(a.scale(None, 1, now), ScaleResult::INVALID);
        let mut status = DeciderStatus::initial(a.spec());
        status.apply(ScaleResult::INVALID);
        assert_eq!(status.desired_scale, -1);
    }

    #[test]
    fn autoscaler_stable_mode_increase_with_concurrency_default() {
        let now = Instant::now();
        let mut a = new(spec(10.0, 101.0), now);
        assert_scale(
            a.scale(observed(50.0, 10.0), 1, now),
            result(5, expected_ebc(10.0, 101.0, 10.0, 1.0)),
        );
        assert_scale(
            a.scale(observed(100.0, 10.0), 1, now),
            result(10, expected_ebc(10.0, 101.0, 10.0, 1.0)),
        );
    }

    #[test]
    fn autoscaler_stable_mode_increase_with_rps() {
        let now = Instant::now();
        let mut a = new(
            DeciderSpec {
                scaling_metric: ScalingMetric::Rps,
                ..spec(10.0, 101.0)
            },
            now,
        );
        assert_scale(
            a.scale(observed(50.0, 50.0), 1, now),
            result(5, expected_ebc(10.0, 101.0, 50.0, 1.0)),
        );
        assert_scale(
            a.scale(observed(100.0, 99.0), 1, now),
            result(10, expected_ebc(10.0, 101.0, 99.0, 1.0)),
        );
    }

    #[test]
    fn autoscaler_unpanic_after_slow_increase() {
        let start = Instant::now();
        let mut a = new(spec(1.0, 98.0), start);
        let mut tm = start;
        assert_scale(
            a.scale(observed(11.0, 25.0), 10, tm),
            result(25, expected_ebc(1.0, 98.0, 25.0, 10.0)),
        );
        assert_eq!(a.panic_time, Some(tm));
        // Half the stable window later, +15 pods; 41/40 is under the threshold: panic time stays.
        tm += STABLE_WINDOW / 2;
        assert_scale(
            a.scale(observed(30.0, 41.0), 40, tm),
            result(41, expected_ebc(1.0, 98.0, 41.0, 40.0)),
        );
        assert_eq!(a.panic_time, Some(start));
        // At the end of the window the panic ends.
        tm += STABLE_WINDOW / 2 + TICK_INTERVAL;
        assert_scale(
            a.scale(observed(50.0, 56.0), 55, tm),
            result(50, expected_ebc(1.0, 98.0, 56.0, 55.0)),
        );
        assert_eq!(a.panic_time, None);
    }

    #[test]
    fn autoscaler_extend_panic_window() {
        let start = Instant::now();
        let mut a = new(spec(1.0, 98.0), start);
        assert_scale(
            a.scale(observed(11.0, 25.0), 10, start),
            result(25, expected_ebc(1.0, 98.0, 25.0, 10.0)),
        );
        let tm = start + STABLE_WINDOW / 2;
        assert_scale(
            a.scale(observed(30.0, 80.0), 40, tm),
            result(80, expected_ebc(1.0, 98.0, 80.0, 40.0)),
        );
        assert_eq!(a.panic_time, Some(tm));
    }

    #[test]
    fn autoscaler_stable_mode_decrease() {
        let now = Instant::now();
        let mut a = new(spec(10.0, 98.0), now);
        assert_scale(
            a.scale(observed(100.0, 100.0), 8, now),
            result(10, expected_ebc(10.0, 98.0, 100.0, 8.0)),
        );
        assert_scale(
            a.scale(observed(50.0, 50.0), 8, now),
            result(5, expected_ebc(10.0, 98.0, 50.0, 8.0)),
        );
    }

    #[test]
    fn autoscaler_stable_mode_no_traffic_scale_to_zero() {
        let now = Instant::now();
        let mut a = new(spec(10.0, 75.0), now);
        assert_scale(
            a.scale(observed(1.0, 0.0), 1, now),
            result(1, expected_ebc(10.0, 75.0, 0.0, 1.0)),
        );
        assert_scale(
            a.scale(observed(0.0, 0.0), 1, now),
            result(0, expected_ebc(10.0, 75.0, 0.0, 1.0)),
        );
    }

    #[test]
    fn autoscaler_activation_scale() {
        let now = Instant::now();
        let mut a = new(
            DeciderSpec {
                activation_scale: 2,
                ..spec(10.0, 75.0)
            },
            now,
        );
        assert_scale(
            a.scale(observed(0.0, 0.0), 1, now),
            result(0, expected_ebc(10.0, 75.0, 0.0, 1.0)),
        );
        assert_scale(
            a.scale(observed(1.0, 0.0), 1, now),
            result(2, expected_ebc(10.0, 75.0, 0.0, 1.0)),
        );
    }

    #[test]
    fn autoscaler_panic_mode_exponential_track_and_stabilize() {
        let now = Instant::now();
        let mut a = new(spec(1.0, 101.0), now);
        assert_scale(
            a.scale(observed(6.0, 6.0), 1, now),
            result(6, expected_ebc(1.0, 101.0, 6.0, 1.0)),
        );
        let mut tm = now;
        assert_scale(
            a.scale(observed(36.0, 36.0), 6, tm),
            result(36, expected_ebc(1.0, 101.0, 36.0, 6.0)),
        );
        assert_eq!(a.panic_time, Some(tm));
        tm += Duration::from_secs(1);
        assert_scale(
            a.scale(observed(216.0, 216.0), 36, tm),
            result(216, expected_ebc(1.0, 101.0, 216.0, 36.0)),
        );
        assert_scale(
            a.scale(observed(1296.0, 1296.0), 216, tm),
            result(1296, expected_ebc(1.0, 101.0, 1296.0, 216.0)),
        );
        tm += Duration::from_secs(1);
        assert_scale(
            a.scale(observed(1296.0, 1296.0), 1296, tm),
            result(1296, expected_ebc(1.0, 101.0, 1296.0, 1296.0)),
        );
    }

    #[test]
    fn autoscaler_panic_then_unpanic_scale_down() {
        let now = Instant::now();
        let mut a = new(spec(10.0, 93.0), now);
        assert_scale(
            a.scale(observed(100.0, 100.0), 1, now),
            result(10, expected_ebc(10.0, 93.0, 100.0, 1.0)),
        );
        let panic_time = now;
        assert_scale(
            a.scale(observed(100.0, 1000.0), 10, panic_time),
            result(100, expected_ebc(10.0, 93.0, 1000.0, 10.0)),
        );
        // Traffic dropped off; the scale stays while panicking.
        assert_scale(
            a.scale(observed(1.0, 1.0), 10, panic_time + Duration::from_secs(30)),
            result(100, expected_ebc(10.0, 93.0, 1.0, 10.0)),
        );
        // Down after the stable window.
        assert_scale(
            a.scale(observed(1.0, 1.0), 10, panic_time + Duration::from_secs(61)),
            result(1, expected_ebc(10.0, 93.0, 1.0, 10.0)),
        );
    }

    #[test]
    fn autoscaler_rate_limit_scale_up() {
        let now = Instant::now();
        let mut a = new(spec(10.0, 61.0), now);
        // Need 100 pods but only x10 at once.
        assert_scale(
            a.scale(observed(1000.0, 1001.0), 1, now),
            result(10, expected_ebc(10.0, 61.0, 1001.0, 1.0)),
        );
        assert_scale(
            a.scale(observed(1000.0, 1001.0), 10, now),
            result(100, expected_ebc(10.0, 61.0, 1001.0, 10.0)),
        );
    }

    #[test]
    fn autoscaler_rate_limit_scale_down() {
        let now = Instant::now();
        let mut a = new(spec(10.0, 61.0), now);
        assert_scale(
            a.scale(observed(1.0, 1.0), 100, now),
            result(10, expected_ebc(10.0, 61.0, 1.0, 100.0)),
        );
        assert_scale(
            a.scale(observed(1.0, 1.0), 10, now),
            result(1, expected_ebc(10.0, 61.0, 1.0, 10.0)),
        );
    }

    #[test]
    fn autoscaler_use_one_pod_as_minimum_if_endpoints_not_found() {
        let now = Instant::now();
        let mut a = new(spec(10.0, 81.0), now);
        assert_scale(
            a.scale(observed(1000.0, 888.0), 0, now),
            result(10, expected_ebc(10.0, 81.0, 888.0, 0.0)),
        );
    }

    #[test]
    fn autoscaler_update_target() {
        let now = Instant::now();
        let mut a = new(spec(10.0, 77.0), now);
        assert_scale(
            a.scale(observed(100.0, 101.0), 1, now),
            result(10, expected_ebc(10.0, 77.0, 101.0, 1.0)),
        );
        a.update(DeciderSpec {
            panic_threshold: 2.0,
            ..spec(1.0, 71.0)
        });
        assert_scale(
            a.scale(observed(100.0, 101.0), 10, now),
            result(100, expected_ebc(1.0, 71.0, 101.0, 10.0)),
        );
    }

    #[test]
    fn start_in_panic_mode() {
        let now = Instant::now();
        for ready in 0..2 {
            let a = Autoscaler::new(spec(100.0, 11.0), ready, now, now);
            assert!(!a.in_panic(), "ready={ready}");
            assert_eq!(a.max_panic_pods, ready as i32);
        }
        let a = Autoscaler::new(spec(100.0, 11.0), 2, now, now);
        assert!(a.in_panic());
        assert_eq!(a.max_panic_pods, 2);
    }

    fn delay_spec() -> DeciderSpec {
        DeciderSpec {
            target_value: 10.0,
            total_value: 10.0,
            max_scale_down_rate: 10.0,
            max_scale_up_rate: 10.0,
            panic_threshold: 100.0,
            scale_down_delay: Duration::from_secs(300),
            ..spec(10.0, 0.0)
        }
    }

    #[test]
    fn autoscaler_scale_down_delay() {
        // TestAutoscalerScaleDownDelay, "simple" then "gradual" on the same autoscaler.
        let epoch = Instant::now();
        let mut a = Autoscaler::new(delay_spec(), 0, epoch, epoch);
        let at = |s: u64| epoch + Duration::from_secs(s);
        assert_eq!(a.scale(observed(40.0, 40.0), 0, at(2)).desired_pod_count, 4);
        // Five minutes at reduced concurrency: still inside the delay.
        assert_eq!(a.scale(observed(0.0, 0.0), 0, at(300)).desired_pod_count, 4);
        assert_eq!(a.scale(observed(0.0, 0.0), 0, at(302)).desired_pod_count, 0);

        assert_eq!(
            a.scale(observed(40.0, 40.0), 0, at(540)).desired_pod_count,
            4
        );
        assert_eq!(
            a.scale(observed(30.0, 30.0), 0, at(600)).desired_pod_count,
            4
        );
        assert_eq!(a.scale(observed(0.0, 0.0), 0, at(660)).desired_pod_count, 4);
        assert_eq!(a.scale(observed(0.0, 0.0), 0, at(840)).desired_pod_count, 3);
        assert_eq!(a.scale(observed(0.0, 0.0), 0, at(900)).desired_pod_count, 0);
    }

    #[test]
    fn autoscaler_scale_down_delay_not_reachable() {
        let epoch = Instant::now();
        let mut a = Autoscaler::new(delay_spec(), 0, epoch, epoch);
        let at = |s: u64| epoch + Duration::from_secs(s);
        assert_eq!(a.scale(observed(40.0, 40.0), 0, at(2)).desired_pod_count, 4);
        assert_eq!(a.scale(observed(0.0, 0.0), 0, at(60)).desired_pod_count, 4);
        // Another revision took the traffic: no delay, straight down.
        a.update(DeciderSpec {
            reachable: false,
            ..delay_spec()
        });
        assert_eq!(a.scale(observed(0.0, 0.0), 0, at(62)).desired_pod_count, 0);
    }

    #[test]
    fn autoscaler_scale_down_delay_zero() {
        let now = Instant::now();
        let mut a = Autoscaler::new(
            DeciderSpec {
                scale_down_delay: Duration::ZERO,
                ..delay_spec()
            },
            0,
            now,
            now,
        );
        assert_eq!(a.scale(observed(40.0, 40.0), 0, now).desired_pod_count, 4);
        // No delay: down at once.
        assert_eq!(
            a.scale(observed(20.0, 20.0), 0, now + Duration::from_millis(500))
                .desired_pod_count,
            2
        );
    }

    #[test]
    fn initial_decider_status_follows_burst_capacity() {
        let s = DeciderSpec {
            total_value: 100.0,
            ..spec(70.0, 211.0)
        };
        assert_eq!(
            DeciderStatus::initial(&s),
            DeciderStatus {
                desired_scale: -1,
                excess_burst_capacity: -111
            }
        );
        for tbc in [-1.0, 0.0] {
            assert_eq!(
                DeciderStatus::initial(&spec(70.0, tbc)).excess_burst_capacity,
                tbc as i32
            );
        }
    }
}
