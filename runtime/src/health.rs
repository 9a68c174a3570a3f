//! All of one instance's probes together: startup, then readiness and liveness (pure: time is a
//! parameter). It says which probe runs next and when, and what each result means.
//!
//! Kubernetes' rules, as the kubelet applies them:
//! - While a `startupProbe` has not succeeded, it is the only probe that runs. One success ends the
//!   startup phase (Kubernetes requires its `successThreshold` to be 1); `failureThreshold` failures in a
//!   row kill the container, which is then replaced (a restart).
//! - Then readiness (see [`ReadinessTracker`]) and liveness run side by side. `failureThreshold`
//!   liveness failures in a row kill the container; readiness failures only take it out of the
//!   endpoints.
//! - Startup and liveness probes without `periodSeconds` run every 10 s (Kubernetes' default): Knative's
//!   fast "periodSeconds: 0" polling is a readiness-probe rule only.

use std::time::{Duration, Instant};

use crate::readiness::{ProbeTiming, ReadinessTracker};
use crate::{InstanceState, Probe};

/// Kubernetes' default `periodSeconds` for startup and liveness probes.
pub const DEFAULT_PERIOD: Duration = Duration::from_secs(10);

/// Which of an instance's probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeKind {
    Startup,
    Readiness,
    Liveness,
}

impl ProbeKind {
    pub fn name(self) -> &'static str {
        match self {
            ProbeKind::Startup => "startup",
            ProbeKind::Readiness => "readiness",
            ProbeKind::Liveness => "liveness",
        }
    }
}

/// What a probe result changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthEvent {
    /// The startup probe succeeded: readiness and liveness probing begin.
    Started,
    /// Readiness changed the instance's state (Ready or NotReady).
    State(InstanceState),
    /// The startup or liveness probe failed `failureThreshold` times in a row: kill and replace.
    Kill(ProbeKind),
}

/// An instance's probes and their schedule.
#[derive(Debug, Clone)]
pub struct HealthTracker {
    readiness_probe: Probe,
    liveness_probe: Option<Probe>,
    startup_probe: Option<Probe>,
    readiness: ReadinessTracker,
    /// When the startup phase ended (at spawn without a startup probe).
    started_at: Option<Instant>,
    spawned_at: Instant,
    startup_failures: u32,
    liveness_failures: u32,
    next_startup: Instant,
    next_readiness: Instant,
    next_liveness: Instant,
}

impl HealthTracker {
    pub fn new(
        readiness: Probe,
        liveness: Option<Probe>,
        startup: Option<Probe>,
        spawned_at: Instant,
    ) -> Self {
        let started_at = startup.is_none().then_some(spawned_at);
        let first = |p: &Probe| spawned_at + p.initial_delay;
        HealthTracker {
            next_startup: startup.as_ref().map_or(spawned_at, first),
            next_readiness: first(&readiness),
            next_liveness: liveness.as_ref().map_or(spawned_at, first),
            readiness_probe: readiness,
            liveness_probe: liveness,
            startup_probe: startup,
            readiness: ReadinessTracker::new(),
            started_at,
            spawned_at,
            startup_failures: 0,
            liveness_failures: 0,
        }
    }

    pub fn probe(&self, kind: ProbeKind) -> &Probe {
        match kind {
            ProbeKind::Startup => self.startup_probe.as_ref(),
            ProbeKind::Liveness => self.liveness_probe.as_ref(),
            ProbeKind::Readiness => None,
        }
        .unwrap_or(&self.readiness_probe)
    }

    /// The probe due next and when.
    pub fn next(&self) -> (ProbeKind, Instant) {
        if self.started_at.is_none() {
            return (ProbeKind::Startup, self.next_startup);
        }
        match &self.liveness_probe {
            Some(_) if self.next_liveness < self.next_readiness => {
                (ProbeKind::Liveness, self.next_liveness)
            }
            _ => (ProbeKind::Readiness, self.next_readiness),
        }
    }

    /// The timeout of the attempt of `kind` about to run at `now`.
    pub fn attempt_timeout(&self, kind: ProbeKind, timing: &ProbeTiming, now: Instant) -> Duration {
        match kind {
            ProbeKind::Readiness => self.readiness.attempt_timeout(
                &self.readiness_probe,
                timing,
                self.readiness_base(),
                now,
            ),
            other => self.probe(other).timeout,
        }
    }

    /// Readiness' fast polling counts from the end of the startup phase.
    fn readiness_base(&self) -> Instant {
        self.started_at.unwrap_or(self.spawned_at)
    }

    /// Records the result of the attempt of `kind` that finished at `now`.
    pub fn observe(
        &mut self,
        kind: ProbeKind,
        ok: bool,
        timing: &ProbeTiming,
        now: Instant,
    ) -> Option<HealthEvent> {
        match kind {
            ProbeKind::Startup => {
                let probe = self.startup_probe.as_ref()?;
                if ok {
                    self.started_at = Some(now);
                    self.next_readiness = self.next_readiness.max(now);
                    self.next_liveness = self.next_liveness.max(now);
                    return Some(HealthEvent::Started);
                }
                self.startup_failures += 1;
                self.next_startup = now + probe.period.unwrap_or(DEFAULT_PERIOD);
                (self.startup_failures >= probe.failure_threshold)
                    .then_some(HealthEvent::Kill(ProbeKind::Startup))
            }
            ProbeKind::Liveness => {
                let probe = self.liveness_probe.as_ref()?;
                self.next_liveness = now + probe.period.unwrap_or(DEFAULT_PERIOD);
                if ok {
                    self.liveness_failures = 0;
                    return None;
                }
                self.liveness_failures += 1;
                (self.liveness_failures >= probe.failure_threshold)
                    .then_some(HealthEvent::Kill(ProbeKind::Liveness))
            }
            ProbeKind::Readiness => {
                let changed = self.readiness.observe(&self.readiness_probe, ok);
                self.next_readiness = self.readiness.next_probe_at(
                    &self.readiness_probe,
                    timing,
                    self.readiness_base(),
                    now,
                );
                changed.map(HealthEvent::State)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(period_ms: u64, failure: u32) -> Probe {
        Probe {
            period: Some(Duration::from_millis(period_ms)),
            failure_threshold: failure,
            ..Probe::default()
        }
    }

    #[test]
    fn without_startup_or_liveness_only_readiness_runs() {
        let t0 = Instant::now();
        let timing = ProbeTiming::default();
        let mut h = HealthTracker::new(Probe::default(), None, None, t0);
        assert_eq!(h.next(), (ProbeKind::Readiness, t0));
        assert_eq!(
            h.observe(ProbeKind::Readiness, true, &timing, t0),
            Some(HealthEvent::State(InstanceState::Ready))
        );
        assert_eq!(h.next().0, ProbeKind::Readiness);
    }

    #[test]
    fn startup_runs_alone_until_it_succeeds() {
        let t0 = Instant::now();
        let timing = ProbeTiming::default();
        let mut h = HealthTracker::new(
            Probe::default(),
            Some(probe(100, 3)),
            Some(probe(50, 3)),
            t0,
        );
        assert_eq!(h.next(), (ProbeKind::Startup, t0));
        let t1 = t0 + Duration::from_millis(1);
        assert_eq!(h.observe(ProbeKind::Startup, false, &timing, t1), None);
        assert_eq!(
            h.next(),
            (ProbeKind::Startup, t1 + Duration::from_millis(50))
        );
        let t2 = t0 + Duration::from_millis(60);
        assert_eq!(
            h.observe(ProbeKind::Startup, true, &timing, t2),
            Some(HealthEvent::Started)
        );
        // Readiness first (fast), liveness after its period.
        assert_eq!(h.next(), (ProbeKind::Readiness, t2));
        h.observe(ProbeKind::Readiness, true, &timing, t2);
        assert_eq!(h.next(), (ProbeKind::Liveness, t2));
    }

    #[test]
    fn startup_failing_failure_threshold_times_kills() {
        let t0 = Instant::now();
        let timing = ProbeTiming::default();
        let mut h = HealthTracker::new(Probe::default(), None, Some(probe(10, 2)), t0);
        assert_eq!(h.observe(ProbeKind::Startup, false, &timing, t0), None);
        assert_eq!(
            h.observe(ProbeKind::Startup, false, &timing, t0),
            Some(HealthEvent::Kill(ProbeKind::Startup))
        );
    }

    #[test]
    fn liveness_kills_after_consecutive_failures_only() {
        let t0 = Instant::now();
        let timing = ProbeTiming::default();
        let mut h = HealthTracker::new(Probe::default(), Some(probe(1000, 3)), None, t0);
        let results = [false, false, true, false, false, false];
        let events: Vec<Option<HealthEvent>> = results
            .iter()
            .map(|ok| h.observe(ProbeKind::Liveness, *ok, &timing, t0))
            .collect();
        assert_eq!(
            events,
            vec![
                None,
                None,
                None,
                None,
                None,
                Some(HealthEvent::Kill(ProbeKind::Liveness))
            ]
        );
    }

    #[test]
    fn liveness_and_readiness_interleave_by_due_time() {
        let t0 = Instant::now();
        let timing = ProbeTiming::default();
        let mut h = HealthTracker::new(
            probe(300, 3),
            Some(Probe {
                initial_delay: Duration::from_millis(100),
                ..probe(150, 3)
            }),
            None,
            t0,
        );
        assert_eq!(h.next(), (ProbeKind::Readiness, t0));
        h.observe(ProbeKind::Readiness, true, &timing, t0);
        assert_eq!(
            h.next(),
            (ProbeKind::Liveness, t0 + Duration::from_millis(100))
        );
        h.observe(
            ProbeKind::Liveness,
            true,
            &timing,
            t0 + Duration::from_millis(100),
        );
        assert_eq!(
            h.next(),
            (ProbeKind::Liveness, t0 + Duration::from_millis(250))
        );
    }

    #[test]
    fn unset_periods_default_to_kubernetes_ten_seconds() {
        let t0 = Instant::now();
        let timing = ProbeTiming::default();
        let mut h = HealthTracker::new(Probe::default(), Some(Probe::default()), None, t0);
        h.observe(ProbeKind::Liveness, true, &timing, t0);
        h.observe(ProbeKind::Readiness, true, &timing, t0);
        assert_eq!(h.next(), (ProbeKind::Readiness, t0 + timing.steady_period));
        h.observe(
            ProbeKind::Readiness,
            true,
            &timing,
            t0 + Duration::from_millis(9500),
        );
        assert_eq!(h.next(), (ProbeKind::Liveness, t0 + DEFAULT_PERIOD));
        assert_eq!(
            h.attempt_timeout(ProbeKind::Liveness, &timing, t0),
            Duration::from_secs(1)
        );
    }
}
