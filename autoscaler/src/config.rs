//! `config-autoscaler` (Knative's `pkg/autoscaler/config`) and the per-revision settings resolved from the
//! revision's `autoscaling.knative.dev/*` annotations and its containerConcurrency (Knative's
//! `MakeDecider`, `MakeMetric`, `ResolveMetricTarget`, `PodAutoscaler.ScaleBounds`, `GetInitialScale`).

use std::collections::BTreeMap;
use std::time::Duration;

/// Knative's autoscaling annotation group.
pub const GROUP: &str = "autoscaling.knative.dev";
/// `autoscaling.knative.dev/class` value of the Knative Pod Autoscaler (the only class Sluice runs).
pub const KPA_CLASS: &str = "kpa.autoscaling.knative.dev";
/// `autoscaling.knative.dev/class` value of Kubernetes' HPA (not supported by Sluice).
pub const HPA_CLASS: &str = "hpa.autoscaling.knative.dev";

/// Knative: `WindowMin` / `WindowMax` bound the stable window (and scale-down delay, pod retention).
pub const WINDOW_MIN: Duration = Duration::from_secs(6);
pub const WINDOW_MAX: Duration = Duration::from_secs(3600);
/// Knative: `TargetMin`, the smallest target a revision may aim for.
pub const TARGET_MIN: f64 = 0.01;
/// Knative: panic window percentage bounds.
pub const PANIC_WINDOW_PERCENTAGE_MIN: f64 = 1.0;
pub const PANIC_WINDOW_PERCENTAGE_MAX: f64 = 100.0;
/// Knative: panic threshold percentage bounds.
pub const PANIC_THRESHOLD_PERCENTAGE_MIN: f64 = 110.0;
pub const PANIC_THRESHOLD_PERCENTAGE_MAX: f64 = 1000.0;
/// Knative: `config.BucketSize`, the granularity of the metric windows (one scrape a second).
pub const BUCKET_SIZE: Duration = Duration::from_secs(1);

/// The annotation keys, each with Knative's legacy camelCase spelling where one exists
/// (Knative's `kmap.KeyPriority`: the first key present wins).
pub mod annotations {
    pub const CLASS: &[&str] = &["autoscaling.knative.dev/class"];
    pub const METRIC: &[&str] = &["autoscaling.knative.dev/metric"];
    pub const TARGET: &[&str] = &["autoscaling.knative.dev/target"];
    pub const TARGET_UTILIZATION_PERCENTAGE: &[&str] = &[
        "autoscaling.knative.dev/target-utilization-percentage",
        "autoscaling.knative.dev/targetUtilizationPercentage",
    ];
    pub const TARGET_BURST_CAPACITY: &[&str] = &[
        "autoscaling.knative.dev/target-burst-capacity",
        "autoscaling.knative.dev/targetBurstCapacity",
    ];
    pub const WINDOW: &[&str] = &["autoscaling.knative.dev/window"];
    pub const PANIC_WINDOW_PERCENTAGE: &[&str] = &[
        "autoscaling.knative.dev/panic-window-percentage",
        "autoscaling.knative.dev/panicWindowPercentage",
    ];
    pub const PANIC_THRESHOLD_PERCENTAGE: &[&str] = &[
        "autoscaling.knative.dev/panic-threshold-percentage",
        "autoscaling.knative.dev/panicThresholdPercentage",
    ];
    pub const MIN_SCALE: &[&str] = &[
        "autoscaling.knative.dev/min-scale",
        "autoscaling.knative.dev/minScale",
    ];
    pub const MAX_SCALE: &[&str] = &[
        "autoscaling.knative.dev/max-scale",
        "autoscaling.knative.dev/maxScale",
    ];
    pub const INITIAL_SCALE: &[&str] = &[
        "autoscaling.knative.dev/initial-scale",
        "autoscaling.knative.dev/initialScale",
        "autoscaling.internal.knative.dev/initialScale",
    ];
    pub const ACTIVATION_SCALE: &[&str] = &["autoscaling.knative.dev/activation-scale"];
    pub const SCALE_DOWN_DELAY: &[&str] = &[
        "autoscaling.knative.dev/scale-down-delay",
        "autoscaling.knative.dev/scaleDownDelay",
    ];
    pub const SCALE_TO_ZERO_POD_RETENTION_PERIOD: &[&str] = &[
        "autoscaling.knative.dev/scale-to-zero-pod-retention-period",
        "autoscaling.knative.dev/scaleToZeroPodRetentionPeriod",
    ];
    pub const METRIC_AGGREGATION_ALGORITHM: &[&str] = &[
        "autoscaling.knative.dev/metric-aggregation-algorithm",
        "autoscaling.knative.dev/metricAggregationAlgorithm",
    ];
}

/// The metric a revision scales on (`autoscaling.knative.dev/metric`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ScalingMetric {
    /// Requests in flight (Knative's default).
    #[default]
    Concurrency,
    /// Requests per second.
    Rps,
}

/// How the windows average their buckets (`autoscaling.knative.dev/metric-aggregation-algorithm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AggregationAlgorithm {
    /// Plain average over the window (Knative's default).
    #[default]
    Linear,
    /// Exponentially weighted: recent buckets weigh more.
    WeightedExponential,
}

/// A bad `config-autoscaler` key.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("config-autoscaler: {key}: {message}")]
pub struct ConfigError {
    /// The config-map key to fix.
    pub key: String,
    pub message: String,
}

/// A bad autoscaling annotation on a revision.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("annotation {annotation}: {message}")]
pub struct AnnotationError {
    /// The annotation to fix (the spelling that was used).
    pub annotation: String,
    pub message: String,
}

/// Every bad autoscaling annotation of a revision (at least one).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}", self.0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct AnnotationErrors(pub Vec<AnnotationError>);

/// Knative's `autoscalerconfig.Config`: the `config-autoscaler` config map, with Knative's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct AutoscalerConfig {
    pub enable_scale_to_zero: bool,
    /// `container-concurrency-target-percentage` as a fraction in (0, 1].
    pub container_concurrency_target_fraction: f64,
    pub container_concurrency_target_default: f64,
    /// Target utilization for metrics other than concurrency (not a config key in Knative: 0.7).
    pub target_utilization: f64,
    pub rps_target_default: f64,
    pub target_burst_capacity: f64,
    pub activator_capacity: f64,
    pub allow_zero_initial_scale: bool,
    pub initial_scale: u32,
    pub min_scale: u32,
    pub max_scale: u32,
    pub max_scale_limit: u32,
    pub max_scale_up_rate: f64,
    pub max_scale_down_rate: f64,
    pub stable_window: Duration,
    pub panic_window_percentage: f64,
    pub panic_threshold_percentage: f64,
    pub scale_to_zero_grace_period: Duration,
    pub scale_to_zero_pod_retention_period: Duration,
    pub scale_down_delay: Duration,
    pub pod_autoscaler_class: String,
}

impl Default for AutoscalerConfig {
    /// Knative's `defaultConfig()` (target-burst-capacity 211 as in current Knative releases).
    fn default() -> Self {
        AutoscalerConfig {
            enable_scale_to_zero: true,
            container_concurrency_target_fraction: 0.7,
            container_concurrency_target_default: 100.0,
            target_utilization: 0.7,
            rps_target_default: 200.0,
            target_burst_capacity: 211.0,
            activator_capacity: 100.0,
            allow_zero_initial_scale: false,
            initial_scale: 1,
            min_scale: 0,
            max_scale: 0,
            max_scale_limit: 0,
            max_scale_up_rate: 1000.0,
            max_scale_down_rate: 2.0,
            stable_window: Duration::from_secs(60),
            panic_window_percentage: 10.0,
            panic_threshold_percentage: 200.0,
            scale_to_zero_grace_period: Duration::from_secs(30),
            scale_to_zero_pod_retention_period: Duration::ZERO,
            scale_down_delay: Duration::ZERO,
            pod_autoscaler_class: KPA_CLASS.to_string(),
        }
    }
}

fn config_err(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.to_string(),
        message: message.into(),
    }
}

impl AutoscalerConfig {
    /// Knative's `NewConfigFromMap`: unknown keys are ignored (the config map carries `_example`,
    /// `tick-interval`, ...); a present key that does not parse, or a value out of range, is an error
    /// naming the key.
    pub fn from_config_map(data: &BTreeMap<String, String>) -> Result<Self, ConfigError> {
        let mut c = AutoscalerConfig::default();
        let get = |k: &str| data.get(k).map(|v| v.trim());

        if let Some(v) = get("pod-autoscaler-class") {
            c.pod_autoscaler_class = v.to_string();
        }
        for (key, slot) in [
            ("enable-scale-to-zero", &mut c.enable_scale_to_zero),
            ("allow-zero-initial-scale", &mut c.allow_zero_initial_scale),
        ] {
            if let Some(v) = get(key) {
                *slot = parse_go_bool(v)
                    .ok_or_else(|| config_err(key, format!("{v:?} is not a boolean")))?;
            }
        }
        for (key, slot) in [
            ("max-scale-up-rate", &mut c.max_scale_up_rate),
            ("max-scale-down-rate", &mut c.max_scale_down_rate),
            (
                "container-concurrency-target-percentage",
                &mut c.container_concurrency_target_fraction,
            ),
            (
                "container-concurrency-target-default",
                &mut c.container_concurrency_target_default,
            ),
            (
                "requests-per-second-target-default",
                &mut c.rps_target_default,
            ),
            ("target-burst-capacity", &mut c.target_burst_capacity),
            ("panic-window-percentage", &mut c.panic_window_percentage),
            ("activator-capacity", &mut c.activator_capacity),
            (
                "panic-threshold-percentage",
                &mut c.panic_threshold_percentage,
            ),
        ] {
            if let Some(v) = get(key) {
                *slot = parse_float(v)
                    .ok_or_else(|| config_err(key, format!("{v:?} is not a number")))?;
            }
        }
        let mut ints = [
            ("initial-scale", c.initial_scale as i64),
            ("min-scale", c.min_scale as i64),
            ("max-scale", c.max_scale as i64),
            ("max-scale-limit", c.max_scale_limit as i64),
        ];
        for (key, slot) in ints.iter_mut() {
            if let Some(v) = get(key) {
                *slot = v
                    .parse::<i32>()
                    .map_err(|_| config_err(key, format!("{v:?} is not a 32-bit integer")))?
                    as i64;
            }
        }
        let mut durations = [
            ("stable-window", c.stable_window.as_nanos() as i128),
            ("scale-down-delay", c.scale_down_delay.as_nanos() as i128),
            (
                "scale-to-zero-grace-period",
                c.scale_to_zero_grace_period.as_nanos() as i128,
            ),
            (
                "scale-to-zero-pod-retention-period",
                c.scale_to_zero_pod_retention_period.as_nanos() as i128,
            ),
        ];
        for (key, slot) in durations.iter_mut() {
            if let Some(v) = get(key) {
                *slot = parse_go_duration(v).ok_or_else(|| {
                    config_err(key, format!("{v:?} is not a duration (like \"30s\")"))
                })?;
            }
        }

        // Knative: for legacy reasons a fraction in (0, 1] is accepted as well as a percentage.
        if c.container_concurrency_target_fraction > 1.0 {
            c.container_concurrency_target_fraction /= 100.0;
        }

        // Validation, in Knative's order and with its rules.
        let [stable, delay, grace, retention] = durations.map(|(_, n)| n);
        if grace <= 0 {
            return Err(config_err(
                "scale-to-zero-grace-period",
                format!("must be positive, was {}", fmt_nanos(grace)),
            ));
        }
        if delay < 0 {
            return Err(config_err(
                "scale-down-delay",
                format!("cannot be negative, was {}", fmt_nanos(delay)),
            ));
        }
        if delay % 1_000_000_000 != 0 {
            return Err(config_err(
                "scale-down-delay",
                format!(
                    "{} must be specified with at most second precision",
                    fmt_nanos(delay)
                ),
            ));
        }
        if retention < 0 {
            return Err(config_err(
                "scale-to-zero-pod-retention-period",
                format!("cannot be negative, was {}", fmt_nanos(retention)),
            ));
        }
        if c.target_burst_capacity < 0.0 && c.target_burst_capacity != -1.0 {
            return Err(config_err(
                "target-burst-capacity",
                format!(
                    "must be either non-negative or -1 (for unlimited), was {}",
                    c.target_burst_capacity
                ),
            ));
        }
        if c.container_concurrency_target_fraction <= 0.0
            || c.container_concurrency_target_fraction > 1.0
        {
            return Err(config_err(
                "container-concurrency-target-percentage",
                format!(
                    "{} is outside of valid range of (0, 100]",
                    c.container_concurrency_target_fraction
                ),
            ));
        }
        let target =
            c.container_concurrency_target_fraction * c.container_concurrency_target_default;
        if target < TARGET_MIN {
            return Err(config_err(
                "container-concurrency-target-default",
                format!(
                    "container-concurrency-target-percentage and container-concurrency-target-default yield target concurrency of {target}, can't be less than {TARGET_MIN}"
                ),
            ));
        }
        if c.rps_target_default < TARGET_MIN {
            return Err(config_err(
                "requests-per-second-target-default",
                format!(
                    "must be at least {TARGET_MIN}, was {}",
                    c.rps_target_default
                ),
            ));
        }
        if c.activator_capacity < 1.0 {
            return Err(config_err(
                "activator-capacity",
                format!("{} must be at least 1", c.activator_capacity),
            ));
        }
        if c.max_scale_up_rate <= 1.0 {
            return Err(config_err(
                "max-scale-up-rate",
                format!("{} must be greater than 1.0", c.max_scale_up_rate),
            ));
        }
        if c.max_scale_down_rate <= 1.0 {
            return Err(config_err(
                "max-scale-down-rate",
                format!("{} must be greater than 1.0", c.max_scale_down_rate),
            ));
        }
        if stable < WINDOW_MIN.as_nanos() as i128 || stable > WINDOW_MAX.as_nanos() as i128 {
            return Err(config_err(
                "stable-window",
                format!("{} must be in [6s; 1h] range", fmt_nanos(stable)),
            ));
        }
        if stable % 1_000_000_000 != 0 {
            return Err(config_err(
                "stable-window",
                format!(
                    "{} must be specified with at most second precision",
                    fmt_nanos(stable)
                ),
            ));
        }
        if c.panic_window_percentage < PANIC_WINDOW_PERCENTAGE_MIN
            || c.panic_window_percentage > PANIC_WINDOW_PERCENTAGE_MAX
        {
            return Err(config_err(
                "panic-window-percentage",
                format!(
                    "{} must be in [{PANIC_WINDOW_PERCENTAGE_MIN}, {PANIC_WINDOW_PERCENTAGE_MAX}] interval",
                    c.panic_window_percentage
                ),
            ));
        }
        // Knative's config check stops at the panic window; the annotation check bounds the threshold.
        // Sluice bounds both places alike so a config map cannot set what an annotation may not.
        if c.panic_threshold_percentage < PANIC_THRESHOLD_PERCENTAGE_MIN
            || c.panic_threshold_percentage > PANIC_THRESHOLD_PERCENTAGE_MAX
        {
            return Err(config_err(
                "panic-threshold-percentage",
                format!(
                    "{} must be in [{PANIC_THRESHOLD_PERCENTAGE_MIN}, {PANIC_THRESHOLD_PERCENTAGE_MAX}] interval",
                    c.panic_threshold_percentage
                ),
            ));
        }
        let [initial, min, max, max_limit] = ints.map(|(_, n)| n);
        if initial < 0 || (initial == 0 && !c.allow_zero_initial_scale) {
            return Err(config_err(
                "initial-scale",
                format!(
                    "{initial} must be at least 0 (or at least 1 when allow-zero-initial-scale is false)"
                ),
            ));
        }
        if max_limit < 0 {
            return Err(config_err(
                "max-scale-limit",
                format!("{max_limit} must be at least 0"),
            ));
        }
        let min_max_scale = if max_limit > 0 { 1 } else { 0 };
        if max < min_max_scale || (max_limit > 0 && max > max_limit) {
            return Err(config_err(
                "max-scale",
                format!("{max} must be in [{min_max_scale}, max-scale-limit({max_limit})] range"),
            ));
        }
        if min < 0 || (max > 0 && min > max) {
            return Err(config_err(
                "min-scale",
                format!("{min} must be in [0, max-scale({max})] range"),
            ));
        }

        c.initial_scale = initial as u32;
        c.min_scale = min as u32;
        c.max_scale = max as u32;
        c.max_scale_limit = max_limit as u32;
        c.stable_window = nanos(stable);
        c.scale_down_delay = nanos(delay);
        c.scale_to_zero_grace_period = nanos(grace);
        c.scale_to_zero_pod_retention_period = nanos(retention);
        Ok(c)
    }
}

/// Whether a revision is reachable from a route (Knative's `PodAutoscaler.Spec.Reachability`): an
/// unreachable revision ignores min-scale and may drop to zero at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Reachability {
    #[default]
    Reachable,
    Unreachable,
}

/// A revision's autoscaling settings, resolved from `config-autoscaler`, the revision's annotations and
/// its containerConcurrency. Everything the decider, the collector and the scale-to-zero logic need.
#[derive(Debug, Clone, PartialEq)]
pub struct RevisionScaling {
    pub metric: ScalingMetric,
    pub aggregation: AggregationAlgorithm,
    /// What one instance should carry of the metric (Knative's `TargetValue`).
    pub target: f64,
    /// What one instance can carry at most (Knative's `TotalValue`): the burst-capacity base.
    pub total: f64,
    /// -1 = the activator always stays in the path; 0 = only at zero.
    pub target_burst_capacity: f64,
    /// Panic when desired panic pods / ready pods reaches this ratio (Knative's `PanicThreshold`).
    pub panic_threshold: f64,
    pub stable_window: Duration,
    pub panic_window: Duration,
    pub max_scale_up_rate: f64,
    pub max_scale_down_rate: f64,
    pub scale_down_delay: Duration,
    pub min_scale: u32,
    /// 0 = unbounded.
    pub max_scale: u32,
    pub initial_scale: u32,
    /// Scale to at least this many when scaling up from zero (only effective when > 1).
    pub activation_scale: u32,
    pub enable_scale_to_zero: bool,
    pub scale_to_zero_grace_period: Duration,
    pub scale_to_zero_pod_retention_period: Duration,
    pub activator_capacity: f64,
    pub container_concurrency: u32,
    pub reachability: Reachability,
}

fn lookup<'a>(
    annotations: &'a BTreeMap<String, String>,
    keys: &[&'static str],
) -> Option<(&'static str, &'a str)> {
    keys.iter()
        .find_map(|k| annotations.get(*k).map(|v| (*k, v.trim())))
}

fn ann_err(annotation: &str, message: impl Into<String>) -> AnnotationError {
    AnnotationError {
        annotation: annotation.to_string(),
        message: message.into(),
    }
}

fn ann_float(
    annotations: &BTreeMap<String, String>,
    keys: &[&'static str],
) -> Result<Option<(&'static str, f64)>, AnnotationError> {
    match lookup(annotations, keys) {
        None => Ok(None),
        Some((k, v)) => parse_float(v)
            .map(|f| Some((k, f)))
            .ok_or_else(|| ann_err(k, format!("{v:?} is not a number"))),
    }
}

/// Knative's `getIntGE0`.
fn ann_int_ge0(
    annotations: &BTreeMap<String, String>,
    keys: &[&'static str],
) -> Result<Option<(&'static str, u32)>, AnnotationError> {
    match lookup(annotations, keys) {
        None => Ok(None),
        Some((k, v)) => match v.parse::<i64>() {
            Ok(i) if (0..=i32::MAX as i64).contains(&i) => Ok(Some((k, i as u32))),
            Ok(_) => Err(ann_err(
                k,
                format!("{v} is out of bounds: 0 <= x <= {}", i32::MAX),
            )),
            Err(_) => Err(ann_err(k, format!("{v:?} is not an integer"))),
        },
    }
}

fn ann_duration(
    annotations: &BTreeMap<String, String>,
    keys: &[&'static str],
    min: Duration,
    max: Duration,
    whole_seconds: bool,
) -> Result<Option<Duration>, AnnotationError> {
    let Some((k, v)) = lookup(annotations, keys) else {
        return Ok(None);
    };
    let n = parse_go_duration(v)
        .ok_or_else(|| ann_err(k, format!("{v:?} is not a duration (like \"30s\")")))?;
    if n < min.as_nanos() as i128 || n > max.as_nanos() as i128 {
        return Err(ann_err(
            k,
            format!(
                "{v} is out of bounds: {} <= x <= {}",
                fmt_nanos(min.as_nanos() as i128),
                fmt_nanos(max.as_nanos() as i128)
            ),
        ));
    }
    if whole_seconds && n % 1_000_000_000 != 0 {
        return Err(ann_err(
            k,
            "must be specified with at most second precision",
        ));
    }
    Ok(Some(nanos(n)))
}

impl RevisionScaling {
    /// Resolves one revision's settings, validating its annotations as Knative's webhook does
    /// (`ValidateAnnotations`); an error names the annotation to fix. A class other than KPA is an error:
    /// Sluice runs only the KPA.
    pub fn new(
        config: &AutoscalerConfig,
        annotations: &BTreeMap<String, String>,
        container_concurrency: u32,
    ) -> Result<RevisionScaling, AnnotationError> {
        use crate::config::annotations as a;

        let class = lookup(annotations, a::CLASS)
            .map(|(_, v)| v.to_string())
            .unwrap_or_else(|| config.pod_autoscaler_class.clone());
        if class != KPA_CLASS {
            return Err(ann_err(
                a::CLASS[0],
                format!("{class:?}: Sluice runs only the {KPA_CLASS:?} class"),
            ));
        }

        let metric = match lookup(annotations, a::METRIC) {
            None | Some((_, "concurrency")) => ScalingMetric::Concurrency,
            Some((_, "rps")) => ScalingMetric::Rps,
            Some((k, v)) => {
                return Err(ann_err(
                    k,
                    format!("{v:?}: want \"concurrency\" or \"rps\""),
                ));
            }
        };
        let aggregation = match lookup(annotations, a::METRIC_AGGREGATION_ALGORITHM) {
            None | Some((_, "linear")) | Some((_, "")) => AggregationAlgorithm::Linear,
            Some((_, "weighted-exponential")) | Some((_, "weightedExponential")) => {
                AggregationAlgorithm::WeightedExponential
            }
            Some((k, v)) => {
                return Err(ann_err(
                    k,
                    format!("{v:?}: want \"linear\" or \"weighted-exponential\""),
                ));
            }
        };

        // Scale bounds (Knative's validateMinMaxScale).
        let min = ann_int_ge0(annotations, a::MIN_SCALE)?;
        let max = ann_int_ge0(annotations, a::MAX_SCALE)?;
        let min_scale = min.map(|(_, v)| v).unwrap_or(config.min_scale);
        let max_scale = max.map(|(_, v)| v).unwrap_or(config.max_scale);
        if let Some((k, m)) = max {
            if m != 0 && m < min_scale {
                return Err(ann_err(
                    k,
                    format!("max-scale={m} is less than min-scale={min_scale}"),
                ));
            }
            if config.max_scale_limit > 0 {
                if m > config.max_scale_limit {
                    return Err(ann_err(
                        k,
                        format!("{m} is out of bounds: 1 <= x <= {}", config.max_scale_limit),
                    ));
                }
                if m == 0 {
                    return Err(ann_err(
                        k,
                        format!(
                            "max-scale=0 (unlimited), must be less than {}",
                            config.max_scale_limit
                        ),
                    ));
                }
            }
        } else if let Some((k, m)) = min
            && max_scale != 0
            && m > max_scale
        {
            return Err(ann_err(
                k,
                format!("min-scale={m} is greater than max-scale={max_scale}"),
            ));
        }
        let activation_scale = match lookup(annotations, a::ACTIVATION_SCALE) {
            None => 1,
            Some((k, v)) => {
                let n: i64 = v
                    .parse()
                    .map_err(|_| ann_err(k, format!("{v:?} is not an integer")))?;
                if !(1..=i32::MAX as i64).contains(&n) {
                    return Err(ann_err(k, format!("{v} must be at least 1")));
                }
                let n = n as u32;
                if max_scale != 0 && n > max_scale {
                    return Err(ann_err(
                        k,
                        format!("max-scale={max_scale} is less than activation-scale={n}"),
                    ));
                }
                n
            }
        };

        // Floats (Knative's validateFloats).
        let panic_window_percentage = match ann_float(annotations, a::PANIC_WINDOW_PERCENTAGE)? {
            None => config.panic_window_percentage,
            Some((k, v)) => {
                if !(PANIC_WINDOW_PERCENTAGE_MIN..=PANIC_WINDOW_PERCENTAGE_MAX).contains(&v) {
                    return Err(ann_err(
                        k,
                        format!(
                            "{v} is out of bounds: {PANIC_WINDOW_PERCENTAGE_MIN} <= x <= {PANIC_WINDOW_PERCENTAGE_MAX}"
                        ),
                    ));
                }
                v
            }
        };
        let panic_threshold_percentage = match ann_float(
            annotations,
            a::PANIC_THRESHOLD_PERCENTAGE,
        )? {
            None => config.panic_threshold_percentage,
            Some((k, v)) => {
                if !(PANIC_THRESHOLD_PERCENTAGE_MIN..=PANIC_THRESHOLD_PERCENTAGE_MAX).contains(&v) {
                    return Err(ann_err(
                        k,
                        format!(
                            "{v} is out of bounds: {PANIC_THRESHOLD_PERCENTAGE_MIN} <= x <= {PANIC_THRESHOLD_PERCENTAGE_MAX}"
                        ),
                    ));
                }
                v
            }
        };
        let annotation_target = match ann_float(annotations, a::TARGET)? {
            None => None,
            Some((k, v)) => {
                if v < TARGET_MIN {
                    return Err(ann_err(
                        k,
                        format!("target {v} should be at least {TARGET_MIN}"),
                    ));
                }
                Some(v)
            }
        };
        let annotation_utilization = match ann_float(annotations, a::TARGET_UTILIZATION_PERCENTAGE)?
        {
            None => None,
            Some((k, v)) => {
                if !(1.0..=100.0).contains(&v) {
                    return Err(ann_err(k, format!("{v} is out of bounds: 1 <= x <= 100")));
                }
                Some(v / 100.0)
            }
        };
        let target_burst_capacity = match ann_float(annotations, a::TARGET_BURST_CAPACITY)? {
            None => config.target_burst_capacity,
            Some((k, v)) => {
                if v < 0.0 && v != -1.0 {
                    return Err(ann_err(
                        k,
                        format!("{v}: must be either non-negative or -1 (for unlimited)"),
                    ));
                }
                v
            }
        };

        // Durations (Knative's validateWindow, validateScaleDownDelay, validateLastPodRetention).
        let stable_window = ann_duration(annotations, a::WINDOW, WINDOW_MIN, WINDOW_MAX, true)?
            .unwrap_or(config.stable_window);
        let scale_down_delay = ann_duration(
            annotations,
            a::SCALE_DOWN_DELAY,
            Duration::ZERO,
            WINDOW_MAX,
            true,
        )?
        .unwrap_or(config.scale_down_delay);
        let scale_to_zero_pod_retention_period = ann_duration(
            annotations,
            a::SCALE_TO_ZERO_POD_RETENTION_PERIOD,
            Duration::ZERO,
            WINDOW_MAX,
            false,
        )?
        .unwrap_or(config.scale_to_zero_pod_retention_period);

        // Knative's GetInitialScale, after validateInitialScale.
        let initial_scale = match lookup(annotations, a::INITIAL_SCALE) {
            None => config.initial_scale,
            Some((k, v)) => {
                let n: i64 = v
                    .parse()
                    .map_err(|_| ann_err(k, format!("{v:?} is not an integer")))?;
                if n < 0 || n > i32::MAX as i64 {
                    return Err(ann_err(k, format!("{v} must be at least 0")));
                }
                if n == 0 && !config.allow_zero_initial_scale {
                    return Err(ann_err(
                        k,
                        "0 is not allowed by the cluster (allow-zero-initial-scale is false)",
                    ));
                }
                n as u32
            }
        };

        // Knative's ResolveMetricTarget.
        let (mut total, mut utilization) = match metric {
            ScalingMetric::Rps => (config.rps_target_default, config.target_utilization),
            ScalingMetric::Concurrency => (
                if container_concurrency == 0 {
                    config.container_concurrency_target_default
                } else {
                    container_concurrency as f64
                },
                config.container_concurrency_target_fraction,
            ),
        };
        if let Some(t) = annotation_target {
            total = t;
            if metric == ScalingMetric::Concurrency && container_concurrency != 0 {
                // Knative: never aim above what containerConcurrency lets one instance take.
                total = t.min(container_concurrency as f64);
            }
        }
        if let Some(u) = annotation_utilization {
            utilization = u;
        }
        let target = (total * utilization).max(TARGET_MIN);

        // Knative's MakeMetric: the panic window is a percentage of the stable window, rounded to the
        // bucket size and at least one bucket.
        let panic_secs = (stable_window.as_secs_f64() * panic_window_percentage / 100.0).round();
        let panic_window = Duration::from_secs_f64(panic_secs).max(BUCKET_SIZE);

        Ok(RevisionScaling {
            metric,
            aggregation,
            target,
            total,
            target_burst_capacity,
            // Knative's MakeDecider: the threshold is a ratio of pods.
            panic_threshold: panic_threshold_percentage / 100.0,
            stable_window,
            panic_window,
            max_scale_up_rate: config.max_scale_up_rate,
            max_scale_down_rate: config.max_scale_down_rate,
            scale_down_delay,
            min_scale,
            max_scale,
            initial_scale,
            activation_scale,
            enable_scale_to_zero: config.enable_scale_to_zero,
            scale_to_zero_grace_period: config.scale_to_zero_grace_period,
            scale_to_zero_pod_retention_period,
            activator_capacity: config.activator_capacity,
            container_concurrency,
            reachability: Reachability::Reachable,
        })
    }

    /// Like [`RevisionScaling::new`], but names every bad annotation, not only the first: each bad
    /// one is set aside and the rest validated again, so a user fixes them all in one edit.
    pub fn validate_all(
        config: &AutoscalerConfig,
        annotations: &BTreeMap<String, String>,
        container_concurrency: u32,
    ) -> Result<RevisionScaling, AnnotationErrors> {
        let mut rest = annotations.clone();
        let mut errors = Vec::new();
        loop {
            match RevisionScaling::new(config, &rest, container_concurrency) {
                Ok(scaling) if errors.is_empty() => return Ok(scaling),
                Ok(_) => return Err(AnnotationErrors(errors)),
                // A check that names a key not set here (a config-map default) cannot be set aside.
                Err(e) if rest.remove(&e.annotation).is_none() => {
                    errors.push(e);
                    return Err(AnnotationErrors(errors));
                }
                Err(e) => errors.push(e),
            }
        }
    }

    /// Knative's `PodAutoscaler.ScaleBounds`: (min, max); an unreachable revision has no minimum.
    pub fn scale_bounds(&self) -> (u32, u32) {
        let min = match self.reachability {
            Reachability::Reachable => self.min_scale,
            Reachability::Unreachable => 0,
        };
        (min, self.max_scale)
    }
}

/// Go's `strconv.ParseBool`.
fn parse_go_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

fn parse_float(v: &str) -> Option<f64> {
    v.parse::<f64>().ok().filter(|f| f.is_finite())
}

fn nanos(n: i128) -> Duration {
    Duration::from_nanos(n.max(0) as u64)
}

fn fmt_nanos(n: i128) -> String {
    let sign = if n < 0 { "-" } else { "" };
    format!("{sign}{:?}", Duration::from_nanos(n.unsigned_abs() as u64))
}

/// Go's `time.ParseDuration`, in nanoseconds (negative allowed, so validation can say "cannot be
/// negative" as Knative does). Hand-written: Knative's config map uses Go's syntax ("1m30s", "1.5h",
/// "-1s", "0"), which humantime does not accept in full.
pub fn parse_go_duration(s: &str) -> Option<i128> {
    let (neg, mut rest) = match s.as_bytes().first()? {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    if rest == "0" {
        return Some(0);
    }
    if rest.is_empty() {
        return None;
    }
    let mut total: f64 = 0.0;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number = &rest[..num_len];
        if number.is_empty() || number == "." {
            return None;
        }
        let value: f64 = number.parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += value * scale;
    }
    let n = total.round() as i128;
    Some(if neg { -n } else { n })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn empty_config_map_gives_knative_defaults() {
        let c = AutoscalerConfig::from_config_map(&BTreeMap::new()).unwrap();
        assert_eq!(c, AutoscalerConfig::default());
        assert!(c.enable_scale_to_zero);
        assert_eq!(c.container_concurrency_target_fraction, 0.7);
        assert_eq!(c.container_concurrency_target_default, 100.0);
        assert_eq!(c.rps_target_default, 200.0);
        assert_eq!(c.target_burst_capacity, 211.0);
        assert_eq!(c.activator_capacity, 100.0);
        assert_eq!(c.max_scale_up_rate, 1000.0);
        assert_eq!(c.max_scale_down_rate, 2.0);
        assert_eq!(c.stable_window, Duration::from_secs(60));
        assert_eq!(c.panic_window_percentage, 10.0);
        assert_eq!(c.panic_threshold_percentage, 200.0);
        assert_eq!(c.scale_to_zero_grace_period, Duration::from_secs(30));
        assert_eq!(c.scale_to_zero_pod_retention_period, Duration::ZERO);
        assert_eq!(c.scale_down_delay, Duration::ZERO);
        assert_eq!(c.initial_scale, 1);
        assert_eq!((c.min_scale, c.max_scale, c.max_scale_limit), (0, 0, 0));
        assert_eq!(c.pod_autoscaler_class, KPA_CLASS);
    }

    #[test]
    fn config_map_values_override_defaults_and_unknown_keys_are_ignored() {
        let c = AutoscalerConfig::from_config_map(&map(&[
            ("_example", "whatever"),
            ("tick-interval", "2s"),
            ("container-concurrency-target-percentage", "80"),
            ("container-concurrency-target-default", "10"),
            ("target-burst-capacity", "-1"),
            ("stable-window", "1m30s"),
            ("scale-to-zero-grace-period", "10s"),
            ("scale-to-zero-pod-retention-period", "1m"),
            ("scale-down-delay", "5s"),
            ("enable-scale-to-zero", "False"),
            ("allow-zero-initial-scale", "true"),
            ("initial-scale", "0"),
            ("max-scale-limit", "10"),
            ("max-scale", "5"),
            ("min-scale", "2"),
        ]))
        .unwrap();
        assert_eq!(c.container_concurrency_target_fraction, 0.8);
        assert_eq!(c.container_concurrency_target_default, 10.0);
        assert_eq!(c.target_burst_capacity, -1.0);
        assert_eq!(c.stable_window, Duration::from_secs(90));
        assert_eq!(c.scale_to_zero_grace_period, Duration::from_secs(10));
        assert_eq!(
            c.scale_to_zero_pod_retention_period,
            Duration::from_secs(60)
        );
        assert_eq!(c.scale_down_delay, Duration::from_secs(5));
        assert!(!c.enable_scale_to_zero);
        assert_eq!(
            (c.initial_scale, c.min_scale, c.max_scale, c.max_scale_limit),
            (0, 2, 5, 10)
        );
    }

    #[test]
    fn legacy_fraction_target_percentage_is_accepted() {
        let c = AutoscalerConfig::from_config_map(&map(&[(
            "container-concurrency-target-percentage",
            "0.5",
        )]))
        .unwrap();
        assert_eq!(c.container_concurrency_target_fraction, 0.5);
    }

    #[test]
    fn each_bad_key_is_named_in_the_error() {
        let cases: &[(&str, &str)] = &[
            ("enable-scale-to-zero", "yes"),
            ("allow-zero-initial-scale", "maybe"),
            ("max-scale-up-rate", "fast"),
            ("max-scale-up-rate", "1"),
            ("max-scale-down-rate", "0.5"),
            ("container-concurrency-target-percentage", "0"),
            ("container-concurrency-target-percentage", "101"),
            ("container-concurrency-target-default", "0.001"),
            ("requests-per-second-target-default", "0"),
            ("target-burst-capacity", "-2"),
            ("panic-window-percentage", "0.5"),
            ("panic-window-percentage", "101"),
            ("panic-threshold-percentage", "100"),
            ("activator-capacity", "0.5"),
            ("initial-scale", "-1"),
            ("initial-scale", "0"),
            ("max-scale", "-1"),
            ("max-scale-limit", "-1"),
            ("stable-window", "5s"),
            ("stable-window", "2h"),
            ("stable-window", "6500ms"),
            ("stable-window", "soon"),
            ("scale-down-delay", "-1s"),
            ("scale-down-delay", "1500ms"),
            ("scale-to-zero-grace-period", "0s"),
            ("scale-to-zero-pod-retention-period", "-5s"),
            ("min-scale", "x"),
        ];
        for (key, value) in cases {
            let err = AutoscalerConfig::from_config_map(&map(&[(key, value)]))
                .expect_err(&format!("{key}={value} must be refused"));
            assert_eq!(&err.key, key, "{key}={value}: {err}");
            assert!(
                err.to_string()
                    .starts_with(&format!("config-autoscaler: {key}: "))
            );
        }
        // Cross-key rules name the key whose value is out of range.
        let err = AutoscalerConfig::from_config_map(&map(&[
            ("max-scale-limit", "5"),
            ("max-scale", "6"),
        ]))
        .unwrap_err();
        assert_eq!(err.key, "max-scale");
        let err =
            AutoscalerConfig::from_config_map(&map(&[("max-scale", "3"), ("min-scale", "4")]))
                .unwrap_err();
        assert_eq!(err.key, "min-scale");
    }

    #[test]
    fn go_durations_parse_like_go() {
        let cases: &[(&str, Option<i128>)] = &[
            ("0", Some(0)),
            ("30s", Some(30_000_000_000)),
            ("1m30s", Some(90_000_000_000)),
            ("1.5h", Some(5_400_000_000_000)),
            ("-1s", Some(-1_000_000_000)),
            ("500ms", Some(500_000_000)),
            ("10", None),
            ("", None),
            ("1d", None),
        ];
        for (s, want) in cases {
            assert_eq!(parse_go_duration(s), *want, "{s}");
        }
    }

    fn resolve(annotations: &[(&str, &str)], cc: u32) -> Result<RevisionScaling, AnnotationError> {
        RevisionScaling::new(&AutoscalerConfig::default(), &map(annotations), cc)
    }

    #[test]
    fn revision_defaults_follow_knative_decider() {
        let r = resolve(&[], 0).unwrap();
        assert_eq!(r.metric, ScalingMetric::Concurrency);
        assert_eq!(r.total, 100.0);
        assert!((r.target - 70.0).abs() < 1e-9);
        assert_eq!(r.target_burst_capacity, 211.0);
        assert_eq!(r.panic_threshold, 2.0);
        assert_eq!(r.stable_window, Duration::from_secs(60));
        assert_eq!(r.panic_window, Duration::from_secs(6));
        assert_eq!(r.initial_scale, 1);
        assert_eq!(r.activation_scale, 1);
        assert_eq!(r.scale_bounds(), (0, 0));
    }

    #[test]
    fn container_concurrency_is_the_hard_limit_and_target_the_soft_one() {
        // Knative's ResolveMetricTarget table.
        type Case<'a> = (&'a [(&'a str, &'a str)], u32, f64, f64);
        let cases: &[Case] = &[
            (&[], 10, 7.0, 10.0),
            (&[("autoscaling.knative.dev/target", "5")], 10, 3.5, 5.0),
            // The annotation cannot aim above containerConcurrency.
            (&[("autoscaling.knative.dev/target", "50")], 10, 7.0, 10.0),
            (&[("autoscaling.knative.dev/target", "50")], 0, 35.0, 50.0),
            (
                &[(
                    "autoscaling.knative.dev/target-utilization-percentage",
                    "100",
                )],
                10,
                10.0,
                10.0,
            ),
            (
                &[("autoscaling.knative.dev/metric", "rps")],
                10,
                140.0,
                200.0,
            ),
            (
                &[
                    ("autoscaling.knative.dev/metric", "rps"),
                    ("autoscaling.knative.dev/target", "300"),
                ],
                10,
                210.0,
                300.0,
            ),
            // Small targets go below 1 but never below TargetMin.
            (
                &[("autoscaling.knative.dev/target", "0.01")],
                0,
                TARGET_MIN,
                0.01,
            ),
        ];
        for (annotations, cc, target, total) in cases {
            let r = resolve(annotations, *cc).unwrap();
            assert!(
                (r.target - target).abs() < 1e-9,
                "{annotations:?} cc={cc}: target {}",
                r.target
            );
            assert!(
                (r.total - total).abs() < 1e-9,
                "{annotations:?} cc={cc}: total {}",
                r.total
            );
        }
    }

    #[test]
    fn annotations_override_config_with_legacy_spellings() {
        let r = resolve(
            &[
                ("autoscaling.knative.dev/window", "2m"),
                ("autoscaling.knative.dev/panicWindowPercentage", "20"),
                ("autoscaling.knative.dev/panic-threshold-percentage", "150"),
                ("autoscaling.knative.dev/minScale", "2"),
                ("autoscaling.knative.dev/max-scale", "7"),
                ("autoscaling.knative.dev/initial-scale", "3"),
                ("autoscaling.knative.dev/activation-scale", "4"),
                ("autoscaling.knative.dev/scale-down-delay", "30s"),
                (
                    "autoscaling.knative.dev/scale-to-zero-pod-retention-period",
                    "90s",
                ),
                ("autoscaling.knative.dev/targetBurstCapacity", "-1"),
                (
                    "autoscaling.knative.dev/metric-aggregation-algorithm",
                    "weighted-exponential",
                ),
            ],
            0,
        )
        .unwrap();
        assert_eq!(r.stable_window, Duration::from_secs(120));
        assert_eq!(r.panic_window, Duration::from_secs(24));
        assert_eq!(r.panic_threshold, 1.5);
        assert_eq!(r.scale_bounds(), (2, 7));
        assert_eq!(r.initial_scale, 3);
        assert_eq!(r.activation_scale, 4);
        assert_eq!(r.scale_down_delay, Duration::from_secs(30));
        assert_eq!(
            r.scale_to_zero_pod_retention_period,
            Duration::from_secs(90)
        );
        assert_eq!(r.target_burst_capacity, -1.0);
        assert_eq!(r.aggregation, AggregationAlgorithm::WeightedExponential);
    }

    #[test]
    fn each_bad_annotation_is_named_in_the_error() {
        let cases: &[(&str, &str)] = &[
            (
                "autoscaling.knative.dev/class",
                "hpa.autoscaling.knative.dev",
            ),
            ("autoscaling.knative.dev/metric", "cpu"),
            ("autoscaling.knative.dev/target", "0"),
            ("autoscaling.knative.dev/target", "lots"),
            (
                "autoscaling.knative.dev/target-utilization-percentage",
                "0.5",
            ),
            ("autoscaling.knative.dev/target-burst-capacity", "-3"),
            ("autoscaling.knative.dev/window", "5s"),
            ("autoscaling.knative.dev/window", "61500ms"),
            ("autoscaling.knative.dev/panic-window-percentage", "0"),
            ("autoscaling.knative.dev/panic-threshold-percentage", "109"),
            ("autoscaling.knative.dev/min-scale", "-1"),
            ("autoscaling.knative.dev/max-scale", "x"),
            ("autoscaling.knative.dev/initial-scale", "0"),
            ("autoscaling.knative.dev/initial-scale", "-2"),
            ("autoscaling.knative.dev/activation-scale", "0"),
            ("autoscaling.knative.dev/scale-down-delay", "2h"),
            ("autoscaling.knative.dev/scale-down-delay", "1500ms"),
            (
                "autoscaling.knative.dev/scale-to-zero-pod-retention-period",
                "-1s",
            ),
            (
                "autoscaling.knative.dev/metric-aggregation-algorithm",
                "median",
            ),
        ];
        for (key, value) in cases {
            let err = resolve(&[(key, value)], 0).expect_err(&format!("{key}={value}"));
            assert_eq!(&err.annotation, key, "{key}={value}: {err}");
        }
        let err = resolve(
            &[
                ("autoscaling.knative.dev/min-scale", "5"),
                ("autoscaling.knative.dev/max-scale", "3"),
            ],
            0,
        )
        .unwrap_err();
        assert_eq!(err.annotation, "autoscaling.knative.dev/max-scale");
        let err = resolve(
            &[
                ("autoscaling.knative.dev/max-scale", "3"),
                ("autoscaling.knative.dev/activation-scale", "4"),
            ],
            0,
        )
        .unwrap_err();
        assert_eq!(err.annotation, "autoscaling.knative.dev/activation-scale");
    }

    #[test]
    fn max_scale_limit_bounds_the_annotation() {
        let config = AutoscalerConfig {
            max_scale_limit: 10,
            max_scale: 5,
            ..AutoscalerConfig::default()
        };
        for value in ["11", "0"] {
            let err = RevisionScaling::new(
                &config,
                &map(&[("autoscaling.knative.dev/max-scale", value)]),
                0,
            )
            .unwrap_err();
            assert_eq!(err.annotation, "autoscaling.knative.dev/max-scale");
        }
        let r = RevisionScaling::new(&config, &BTreeMap::new(), 0).unwrap();
        assert_eq!(r.scale_bounds(), (0, 5));
    }

    #[test]
    fn unreachable_revision_has_no_minimum() {
        let mut r = resolve(&[("autoscaling.knative.dev/min-scale", "3")], 0).unwrap();
        r.reachability = Reachability::Unreachable;
        assert_eq!(r.scale_bounds(), (0, 0));
    }

    #[test]
    fn every_bad_annotation_is_named() {
        let annotations = BTreeMap::from([
            (
                "autoscaling.knative.dev/min-scale".to_string(),
                "lots".to_string(),
            ),
            (
                "autoscaling.knative.dev/target".to_string(),
                "-3".to_string(),
            ),
            (
                "autoscaling.knative.dev/metric".to_string(),
                "concurrency".to_string(),
            ),
        ]);
        let err = RevisionScaling::validate_all(&AutoscalerConfig::default(), &annotations, 0)
            .unwrap_err();
        let keys: Vec<&str> = err.0.iter().map(|e| e.annotation.as_str()).collect();
        assert_eq!(
            keys,
            [
                "autoscaling.knative.dev/min-scale",
                "autoscaling.knative.dev/target"
            ],
            "{err}"
        );
        assert!(
            RevisionScaling::validate_all(&AutoscalerConfig::default(), &BTreeMap::new(), 0)
                .is_ok()
        );
    }
}
