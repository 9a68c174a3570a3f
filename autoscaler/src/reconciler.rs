//! The KPA reconciler's decisions (Knative's `pkg/reconciler/autoscaling/kpa`: `scaler.go` and
//! `kpa.go`) as a pure state machine: from the decider's status, the ready instances and the activator's
//! place in the path to the scale to apply, serve or proxy mode, and the PodAutoscaler's Active
//! condition. Scale to zero only happens after the revision has been idle for a stable window, then
//! inactive with the activator in its path for the scale-to-zero grace period (and the last pod kept
//! for the retention period).

use std::time::{Duration, Instant};

use crate::config::RevisionScaling;
use crate::kpa::DeciderStatus;

/// Knative: `activationTimeoutBuffer`, added to the deployment progress deadline.
pub const ACTIVATION_TIMEOUT_BUFFER: Duration = Duration::from_secs(30);
/// Knative's default `progress-deadline` (config-deployment).
pub const DEFAULT_PROGRESS_DEADLINE: Duration = Duration::from_secs(600);

/// Where the revision's traffic goes (Knative's SKS operation mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Straight to the revision's instances.
    Serve,
    /// Through the activator (no or too little capacity).
    Proxy,
}

/// The PodAutoscaler's `Active` condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Activity {
    /// Active=True: serving traffic.
    Active,
    /// Active=Unknown: instances are being brought up (a new revision, or from zero).
    Activating,
    /// Active=False: idle; scaled (or about to be scaled) to zero.
    Inactive,
}

/// The part of a PodAutoscaler's status the decisions depend on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PaStatus {
    pub activity: Activity,
    /// When `activity` last changed (the condition's lastTransitionTime).
    pub since: Instant,
    /// The scale target reached its initial scale once (Knative's `ScaleTargetInitialized`).
    pub scale_target_initialized: bool,
}

impl PaStatus {
    /// A new PodAutoscaler: conditions initialized to Unknown, i.e. activating.
    pub fn new(now: Instant) -> Self {
        PaStatus {
            activity: Activity::Activating,
            since: now,
            scale_target_initialized: false,
        }
    }

    fn mark(&mut self, activity: Activity, now: Instant) {
        if self.activity != activity {
            self.activity = activity;
            self.since = now;
        }
    }

    fn for_duration(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.since)
    }
}

/// What the reconciler observed besides the decider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observation {
    /// Ready instances.
    pub ready: u32,
    /// How long the activator has been in the revision's path (Knative's probe of the activator plus
    /// `sks.Status.ProxyFor()`); `None` when it is not (known to be) in the path.
    pub activator_in_path_for: Option<Duration>,
}

/// Knative's `scaler.Scale` result: `want` (-1 = unknown) and whether the scale target must be set to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScaleOutcome {
    pub want: i32,
    pub apply: bool,
}

/// Knative's `applyBounds`. Note: below a minimum of 0, -1 becomes 0 (as in Knative).
fn apply_bounds(min: i32, max: i32, x: i32) -> i32 {
    if x < min {
        return min;
    }
    if max != 0 && x > max {
        return max;
    }
    x
}

/// Knative's `GetInitialScale`-aware `activeThreshold`: ready instances needed to be Active.
pub fn active_threshold(scaling: &RevisionScaling, status: &PaStatus) -> u32 {
    let (min, _) = scaling.scale_bounds();
    if !status.scale_target_initialized {
        min.max(scaling.initial_scale)
    } else {
        min.max(1)
    }
}

/// Knative's `scaler.scale` + `handleScaleToZero`, without the I/O: the activator probe's answer and
/// the proxy time come in `observation`.
pub fn scale(
    scaling: &RevisionScaling,
    status: &PaStatus,
    observation: &Observation,
    desired: i32,
    now: Instant,
    progress_deadline: Duration,
) -> ScaleOutcome {
    if desired < 0 && status.activity != Activity::Activating {
        // Metrics are not yet being collected.
        return ScaleOutcome {
            want: desired,
            apply: false,
        };
    }
    let (min, max) = scaling.scale_bounds();
    let mut min = min as i32;
    let initial = scaling.initial_scale as i32;
    // Knative: until the initial scale has been reached once, it is the minimum.
    if initial > 1 && !status.scale_target_initialized {
        min = min.max(initial);
    }
    let desired = apply_bounds(min, max as i32, desired);
    handle_scale_to_zero(
        scaling,
        status,
        observation,
        desired,
        now,
        progress_deadline,
    )
}

fn handle_scale_to_zero(
    scaling: &RevisionScaling,
    status: &PaStatus,
    observation: &Observation,
    desired: i32,
    now: Instant,
    progress_deadline: Duration,
) -> ScaleOutcome {
    let outcome = |want, apply| ScaleOutcome { want, apply };
    if desired != 0 {
        return outcome(desired, true);
    }
    if !scaling.enable_scale_to_zero {
        return outcome(1, true);
    }
    match status.activity {
        Activity::Activating => {
            // Stuck activating past the progress deadline: presume it cannot succeed, go to zero.
            if status.for_duration(now) >= progress_deadline + ACTIVATION_TIMEOUT_BUFFER {
                tracing::info!("activation timed out");
                return outcome(0, true);
            }
            outcome(-1, false)
        }
        Activity::Active => {
            // Active for a stable window: do not scale yet, but want 0 so the PA goes inactive.
            if status.for_duration(now) >= scaling.stable_window {
                return outcome(0, false);
            }
            // Otherwise keep one instance for the rest of the idle period.
            outcome(1, true)
        }
        Activity::Inactive => {
            // Knative: with target-burst-capacity -1 the activator is always in the path.
            let in_path = if scaling.target_burst_capacity == -1.0 {
                Some(observation.activator_in_path_for.unwrap_or(Duration::MAX))
            } else {
                observation.activator_in_path_for
            };
            let Some(proxy_for) = in_path else {
                // Not yet backed by the activator: cannot scale to zero.
                return outcome(0, false);
            };
            let retention = scaling.scale_to_zero_pod_retention_period;
            let inactive_for = status.for_duration(now);
            if inactive_for >= scaling.scale_to_zero_grace_period.max(retention) {
                return outcome(0, true);
            }
            if retention > Duration::ZERO && inactive_for < retention {
                return outcome(0, false);
            }
            // Fast path: the activator has been in the path for the grace period already.
            if proxy_for >= scaling.scale_to_zero_grace_period {
                return outcome(0, true);
            }
            outcome(0, false)
        }
    }
}

/// One reconcile's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Knative's `want` (-1 = unknown yet).
    pub want: i32,
    /// The instance count to set on the runtime, when it must be set.
    pub apply: Option<u32>,
    /// Serve (instances) or proxy (activator) mode for the revision's endpoints.
    pub mode: Mode,
    /// The Active condition after this reconcile.
    pub activity: Activity,
}

/// Knative's KPA `reconcile` for one revision: scale, choose the mode, then update the Active
/// condition in `status`.
pub fn scale_decision(
    scaling: &RevisionScaling,
    status: &mut PaStatus,
    decider: &DeciderStatus,
    observation: &Observation,
    now: Instant,
    progress_deadline: Duration,
) -> Decision {
    let outcome = scale(
        scaling,
        status,
        observation,
        decider.desired_scale,
        now,
        progress_deadline,
    );
    let want = outcome.want;

    // Knative: the activator goes in the path when the revision is (or is going) to zero, when the
    // excess burst capacity is negative, or when the scale is unknown and the PA is inactive.
    let mode = if want == 0
        || decider.excess_burst_capacity < 0
        || (want == -1 && status.activity == Activity::Inactive)
    {
        Mode::Proxy
    } else {
        Mode::Serve
    };

    compute_active_condition(scaling, status, want, observation.ready, now);

    Decision {
        want,
        apply: outcome.apply.then_some(want.max(0) as u32),
        mode,
        activity: status.activity,
    }
}

/// Knative's `computeActiveCondition`.
fn compute_active_condition(
    scaling: &RevisionScaling,
    status: &mut PaStatus,
    want: i32,
    ready: u32,
    now: Instant,
) {
    let min_ready = active_threshold(scaling, status);
    if ready >= min_ready {
        status.scale_target_initialized = true;
    }
    if want == 0 || min_ready == 0 {
        // Timed out while activating, or no traffic: inactive either way.
        status.mark(Activity::Inactive, now);
    } else if ready < min_ready {
        if want > 0 || status.activity != Activity::Inactive {
            status.mark(Activity::Activating, now);
        } else {
            status.mark(Activity::Inactive, now);
        }
    } else if want > 0 || status.activity != Activity::Inactive {
        status.mark(Activity::Active, now);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::config::{AutoscalerConfig, Reachability};

    const STABLE_WINDOW: Duration = Duration::from_secs(60);
    const GRACE: Duration = Duration::from_secs(30);
    const ACTIVATION_TIMEOUT: Duration =
        Duration::from_secs(600 + ACTIVATION_TIMEOUT_BUFFER.as_secs());

    fn scaling(min: u32, max: u32) -> RevisionScaling {
        let mut a = BTreeMap::new();
        if min > 0 {
            a.insert("autoscaling.knative.dev/min-scale".into(), min.to_string());
        }
        if max > 0 {
            a.insert("autoscaling.knative.dev/max-scale".into(), max.to_string());
        }
        RevisionScaling::new(&AutoscalerConfig::default(), &a, 0).unwrap()
    }

    #[test]
    fn scaler_table() {
        // Knative's TestScaler. `ago` is how long the PA has been in `activity`; the activator probe
        // succeeds unless `in_path` is None.
        struct Case {
            label: &'static str,
            scale_to: i32,
            min: u32,
            max: u32,
            activity: Activity,
            ago: Duration,
            proxy_for: Option<Duration>,
            reachability: Reachability,
            window: Option<Duration>,
            want: ScaleOutcome,
        }
        let s = Duration::from_secs(1);
        let base = Case {
            label: "",
            scale_to: 0,
            min: 0,
            max: 0,
            activity: Activity::Active,
            ago: Duration::ZERO,
            proxy_for: Some(Duration::ZERO),
            reachability: Reachability::Reachable,
            window: None,
            want: ScaleOutcome {
                want: 0,
                apply: false,
            },
        };
        let out = |want, apply| ScaleOutcome { want, apply };
        let cases = [
            Case {
                label: "waits to scale to zero (just before idle period)",
                ago: STABLE_WINDOW - s,
                want: out(1, true),
                ..base
            },
            Case {
                label: "waits to scale to zero (just before idle period), custom PA window",
                window: Some(Duration::from_secs(15)),
                ago: Duration::from_secs(15) - s,
                want: out(1, true),
                ..base
            },
            Case {
                label: "custom PA window, check for standard window, no probe",
                window: Some(Duration::from_secs(15)),
                ago: STABLE_WINDOW,
                want: out(0, false),
                ..base
            },
            Case {
                label: "waits to scale to zero after idle period",
                ago: STABLE_WINDOW,
                want: out(0, false),
                ..base
            },
            Case {
                label: "scale to zero after grace period",
                activity: Activity::Inactive,
                ago: GRACE,
                want: out(0, true),
                ..base
            },
            Case {
                label: "waits to scale to zero (just before grace period)",
                activity: Activity::Inactive,
                ago: GRACE - s,
                want: out(0, false),
                ..base
            },
            Case {
                label: "waits to scale to zero (just before grace period, sks short)",
                activity: Activity::Inactive,
                ago: GRACE - s,
                proxy_for: Some(GRACE - s),
                want: out(0, false),
                ..base
            },
            Case {
                label: "waits to scale to zero (just before grace period, sks in proxy long)",
                activity: Activity::Inactive,
                ago: GRACE - s,
                proxy_for: Some(GRACE),
                want: out(0, true),
                ..base
            },
            Case {
                label: "scale to zero after grace period, but fail prober",
                activity: Activity::Inactive,
                ago: GRACE,
                proxy_for: None,
                want: out(0, false),
                ..base
            },
            Case {
                label: "waits to scale to zero while activating until after deadline exceeded",
                activity: Activity::Activating,
                ago: ACTIVATION_TIMEOUT / 2,
                want: out(-1, false),
                ..base
            },
            Case {
                label: "scale to zero while activating after deadline exceeded",
                activity: Activity::Activating,
                ago: ACTIVATION_TIMEOUT + s,
                want: out(0, true),
                ..base
            },
            Case {
                label: "scale down to minScale before grace period",
                min: 2,
                activity: Activity::Inactive,
                ago: GRACE - s,
                want: out(2, true),
                ..base
            },
            Case {
                label: "scale down to minScale after grace period",
                min: 2,
                activity: Activity::Inactive,
                ago: GRACE,
                want: out(2, true),
                ..base
            },
            Case {
                label: "ignore minScale if unreachable",
                min: 2,
                activity: Activity::Inactive,
                ago: GRACE,
                reachability: Reachability::Unreachable,
                want: out(0, true),
                ..base
            },
            Case {
                label: "scales up",
                scale_to: 10,
                want: out(10, true),
                ..base
            },
            Case {
                label: "scales up to maxScale",
                scale_to: 10,
                max: 8,
                want: out(8, true),
                ..base
            },
            Case {
                label: "scale up inactive revision",
                scale_to: 10,
                activity: Activity::Inactive,
                ago: GRACE / 2,
                want: out(10, true),
                ..base
            },
            Case {
                label: "does not scale up from zero with no metrics",
                scale_to: -1,
                activity: Activity::Inactive,
                want: out(-1, false),
                ..base
            },
            Case {
                label: "scales up from zero to desired one",
                scale_to: 1,
                activity: Activity::Activating,
                want: out(1, true),
                ..base
            },
            Case {
                label: "scales up from zero to desired high scale",
                scale_to: 10,
                activity: Activity::Activating,
                want: out(10, true),
                ..base
            },
            Case {
                label: "negative scale does not scale",
                scale_to: -1,
                want: out(-1, false),
                ..base
            },
        ];
        let now = Instant::now() + Duration::from_secs(10_000);
        for case in cases {
            let mut sc = scaling(case.min, case.max);
            sc.reachability = case.reachability;
            if let Some(w) = case.window {
                sc.stable_window = w;
            }
            let status = PaStatus {
                activity: case.activity,
                since: now - case.ago,
                scale_target_initialized: true,
            };
            let obs = Observation {
                ready: 1,
                activator_in_path_for: case.proxy_for,
            };
            let got = scale(
                &sc,
                &status,
                &obs,
                case.scale_to,
                now,
                DEFAULT_PROGRESS_DEADLINE,
            );
            assert_eq!(got, case.want, "{}", case.label);
        }
    }

    #[test]
    fn disable_scale_to_zero() {
        // Knative's TestDisableScaleToZero.
        let now = Instant::now();
        let status = PaStatus {
            activity: Activity::Active,
            since: now,
            scale_target_initialized: true,
        };
        let obs = Observation {
            ready: 10,
            activator_in_path_for: None,
        };
        for (min, scale_to, want) in [(0, 0, (1, true)), (2, 0, (2, true)), (0, -1, (-1, false))] {
            let mut sc = scaling(min, 0);
            sc.enable_scale_to_zero = false;
            let got = scale(&sc, &status, &obs, scale_to, now, DEFAULT_PROGRESS_DEADLINE);
            assert_eq!((got.want, got.apply), want, "min={min} scale_to={scale_to}");
        }
    }

    #[test]
    fn unlimited_burst_capacity_needs_no_probe() {
        // Knative: with TBC -1 the activator is always in the path, so no probe is needed.
        let now = Instant::now() + Duration::from_secs(100);
        let mut sc = scaling(0, 0);
        sc.target_burst_capacity = -1.0;
        let status = PaStatus {
            activity: Activity::Inactive,
            since: now - GRACE,
            scale_target_initialized: true,
        };
        let obs = Observation {
            ready: 1,
            activator_in_path_for: None,
        };
        assert_eq!(
            scale(&sc, &status, &obs, 0, now, DEFAULT_PROGRESS_DEADLINE),
            ScaleOutcome {
                want: 0,
                apply: true
            }
        );
    }

    #[test]
    fn pod_retention_keeps_the_last_pod() {
        let now = Instant::now() + Duration::from_secs(1000);
        let mut sc = scaling(0, 0);
        sc.scale_to_zero_pod_retention_period = Duration::from_secs(120);
        let obs = Observation {
            ready: 1,
            activator_in_path_for: Some(Duration::from_secs(100)),
        };
        for (inactive, apply) in [(60, false), (119, false), (120, true)] {
            let status = PaStatus {
                activity: Activity::Inactive,
                since: now - Duration::from_secs(inactive),
                scale_target_initialized: true,
            };
            let got = scale(&sc, &status, &obs, 0, now, DEFAULT_PROGRESS_DEADLINE);
            assert_eq!(
                got,
                ScaleOutcome { want: 0, apply },
                "inactive for {inactive}s"
            );
        }
    }

    fn decider(desired: i32, ebc: i32) -> DeciderStatus {
        DeciderStatus {
            desired_scale: desired,
            excess_burst_capacity: ebc,
        }
    }

    #[test]
    fn mode_is_proxy_at_zero_or_with_negative_burst_capacity() {
        let now = Instant::now();
        let sc = scaling(0, 0);
        let obs = Observation {
            ready: 3,
            activator_in_path_for: None,
        };
        let active = PaStatus {
            activity: Activity::Active,
            since: now,
            scale_target_initialized: true,
        };
        let cases = [
            ("enough capacity", decider(3, 10), active, Mode::Serve),
            ("zero burst capacity", decider(3, 0), active, Mode::Serve),
            (
                "negative burst capacity",
                decider(3, -5),
                active,
                Mode::Proxy,
            ),
            (
                "unknown scale, inactive",
                decider(-1, 0),
                PaStatus {
                    activity: Activity::Inactive,
                    ..active
                },
                Mode::Proxy,
            ),
        ];
        for (label, d, mut status, mode) in cases {
            let got = scale_decision(&sc, &mut status, &d, &obs, now, DEFAULT_PROGRESS_DEADLINE);
            assert_eq!(got.mode, mode, "{label}");
        }
    }

    #[test]
    fn a_revision_goes_idle_then_inactive_then_to_zero_only_with_the_activator_in_path() {
        let start = Instant::now();
        let sc = scaling(0, 0);
        let mut status = PaStatus::new(start);
        let at = |s: u64| start + Duration::from_secs(s);
        let obs = |ready, in_path: Option<u64>| Observation {
            ready,
            activator_in_path_for: in_path.map(Duration::from_secs),
        };
        let d = |desired, ebc| decider(desired, ebc);

        // New revision, no metrics yet: activating, activator in the path (initial EBC < 0).
        let r = scale_decision(
            &sc,
            &mut status,
            &DeciderStatus::initial(&crate::kpa::DeciderSpec::from_scaling(&sc)),
            &obs(0, None),
            at(0),
            DEFAULT_PROGRESS_DEADLINE,
        );
        assert_eq!(
            (r.want, r.apply, r.mode, r.activity),
            (-1, None, Mode::Proxy, Activity::Activating)
        );
        // The instance is ready and the decider wants 1 with spare capacity: active, serve.
        let r = scale_decision(
            &sc,
            &mut status,
            &d(1, 50),
            &obs(1, None),
            at(2),
            DEFAULT_PROGRESS_DEADLINE,
        );
        assert_eq!(
            (r.want, r.apply, r.mode, r.activity),
            (1, Some(1), Mode::Serve, Activity::Active)
        );
        // Traffic stops; within the stable window of activity it keeps one instance.
        let r = scale_decision(
            &sc,
            &mut status,
            &d(0, 50),
            &obs(1, None),
            at(30),
            DEFAULT_PROGRESS_DEADLINE,
        );
        assert_eq!(
            (r.want, r.apply, r.mode, r.activity),
            (1, Some(1), Mode::Serve, Activity::Active)
        );
        // Active for a stable window: want 0, proxy mode, inactive, nothing applied yet.
        let r = scale_decision(
            &sc,
            &mut status,
            &d(0, 50),
            &obs(1, None),
            at(62),
            DEFAULT_PROGRESS_DEADLINE,
        );
        assert_eq!(
            (r.want, r.apply, r.mode, r.activity),
            (0, None, Mode::Proxy, Activity::Inactive)
        );
        // The grace period passes but the activator is not (known to be) in the path: no scale to zero.
        let r = scale_decision(
            &sc,
            &mut status,
            &d(0, 50),
            &obs(1, None),
            at(100),
            DEFAULT_PROGRESS_DEADLINE,
        );
        assert_eq!((r.want, r.apply), (0, None));
        // Activator in the path: scale to zero.
        let r = scale_decision(
            &sc,
            &mut status,
            &d(0, 50),
            &obs(1, Some(5)),
            at(102),
            DEFAULT_PROGRESS_DEADLINE,
        );
        assert_eq!(
            (r.want, r.apply, r.mode, r.activity),
            (0, Some(0), Mode::Proxy, Activity::Inactive)
        );
        // A request arrives at the activator: the decider wants 1 again; activating until ready.
        let r = scale_decision(
            &sc,
            &mut status,
            &d(1, -100),
            &obs(0, Some(10)),
            at(200),
            DEFAULT_PROGRESS_DEADLINE,
        );
        assert_eq!(
            (r.want, r.apply, r.mode, r.activity),
            (1, Some(1), Mode::Proxy, Activity::Activating)
        );
        let r = scale_decision(
            &sc,
            &mut status,
            &d(1, 10),
            &obs(1, Some(12)),
            at(202),
            DEFAULT_PROGRESS_DEADLINE,
        );
        assert_eq!(
            (r.want, r.apply, r.mode, r.activity),
            (1, Some(1), Mode::Serve, Activity::Active)
        );
    }

    #[test]
    fn initial_scale_is_the_minimum_until_reached() {
        let now = Instant::now();
        let mut a = BTreeMap::new();
        a.insert(
            "autoscaling.knative.dev/initial-scale".to_string(),
            "3".to_string(),
        );
        let sc = RevisionScaling::new(&AutoscalerConfig::default(), &a, 0).unwrap();
        let mut status = PaStatus::new(now);
        let obs = |ready| Observation {
            ready,
            activator_in_path_for: None,
        };
        let r = scale_decision(
            &sc,
            &mut status,
            &decider(1, 0),
            &obs(1),
            now,
            DEFAULT_PROGRESS_DEADLINE,
        );
        assert_eq!((r.apply, r.activity), (Some(3), Activity::Activating));
        let r = scale_decision(
            &sc,
            &mut status,
            &decider(1, 0),
            &obs(3),
            now,
            DEFAULT_PROGRESS_DEADLINE,
        );
        assert_eq!((r.apply, r.activity), (Some(3), Activity::Active));
        assert!(status.scale_target_initialized);
        // Reached once: the decider rules from now on.
        let r = scale_decision(
            &sc,
            &mut status,
            &decider(1, 0),
            &obs(3),
            now,
            DEFAULT_PROGRESS_DEADLINE,
        );
        assert_eq!(r.apply, Some(1));
    }
}
