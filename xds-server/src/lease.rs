//! Leader election on a coordination.k8s.io/v1 Lease, as client-go's `leaderelection` (which
//! knative.dev/pkg's leader election runs on) does it: every replica serves ADS, one of them, the
//! Lease's holder, writes KIngress status and runs the probes.
//!
//! Why our own (about 150 lines) and not a crate: kube-runtime 4 has no leader election;
//! kube-lease-manager's kube-4 line (0.12) takes the Lease through server-side-apply field ownership
//! (conflicts between field managers), and kube-leader-election writes with merge patches that carry
//! no precondition, so two replicas that both see an expired Lease can both believe they won. This is
//! client-go's algorithm: get; create if absent; otherwise replace with the resourceVersion that was
//! read, so of two racing candidates exactly one write succeeds (the other gets 409 Conflict).
//!
//! Timing, as client-go: a candidate takes a Lease held by another only when it has seen the same
//! record unchanged for `lease_duration` by its own clock (clocks across machines are never compared).
//! The leader renews every `retry_period` and gives up leading when no renewal succeeded within
//! `renew_deadline` (measured from before the request was sent), which is shorter than
//! `lease_duration`: it has stopped before anyone else can take over. On shutdown the leader releases
//! the Lease (empty holder), so a successor takes it at its next try instead of after the duration.
//!
//! [`Candidate::decide`] is the pure part; [`LeaderElector`] does the HTTP.

use std::future::Future;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use tokio::sync::watch;

/// knative.dev/pkg leaderelection's defaults.
pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(60);
pub const DEFAULT_RENEW_DEADLINE: Duration = Duration::from_secs(40);
pub const DEFAULT_RETRY_PERIOD: Duration = Duration::from_secs(10);
pub const DEFAULT_LEASE_NAME: &str = "sluice-xds";

#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This replica's identity (the pod name).
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error(
        "lease timing: renew deadline {renew:?} must be shorter than the lease duration {duration:?} and longer than the retry period {retry:?}"
    )]
    Timing {
        duration: Duration,
        renew: Duration,
        retry: Duration,
    },
}

impl LeaseConfig {
    pub fn validate(&self) -> Result<(), LeaseError> {
        if self.renew_deadline >= self.lease_duration || self.retry_period >= self.renew_deadline {
            return Err(LeaseError::Timing {
                duration: self.lease_duration,
                renew: self.renew_deadline,
                retry: self.retry_period,
            });
        }
        Ok(())
    }
}

/// What to write next.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// No Lease yet: create it holding it.
    Create(LeaseSpec),
    /// Replace the Lease (guarded by the resourceVersion read) with this spec.
    Replace(LeaseSpec),
    /// Another replica holds it and it has not expired.
    Wait { holder: String },
}

/// A candidate's memory between attempts: the last Lease spec seen, and when it was first seen
/// (client-go's observedRecord and observedTime).
#[derive(Debug, Default)]
pub struct Candidate {
    observed: Option<(LeaseSpec, Instant)>,
}

impl Candidate {
    /// client-go's tryAcquireOrRenew decision for `me`, given the Lease's spec (None: no Lease).
    pub fn decide(
        &mut self,
        current: Option<&LeaseSpec>,
        me: &str,
        duration: Duration,
        now: Instant,
        wall: Timestamp,
    ) -> Step {
        let record = |acquired: MicroTime, transitions: i32| LeaseSpec {
            holder_identity: Some(me.to_string()),
            lease_duration_seconds: Some(duration.as_secs_f64().ceil().max(1.0) as i32),
            acquire_time: Some(acquired),
            renew_time: Some(MicroTime(wall)),
            lease_transitions: Some(transitions),
            ..Default::default()
        };
        let Some(spec) = current else {
            return Step::Create(record(MicroTime(wall), 0));
        };
        if self.observed.as_ref().is_none_or(|(seen, _)| seen != spec) {
            self.observed = Some((spec.clone(), now));
        }
        let observed_at = self.observed.as_ref().map_or(now, |(_, at)| *at);
        let holder = spec.holder_identity.as_deref().unwrap_or_default();
        let held_for = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(0).max(0) as u64);
        let transitions = spec.lease_transitions.unwrap_or(0);
        if holder == me {
            let acquired = spec.acquire_time.clone().unwrap_or(MicroTime(wall));
            return Step::Replace(record(acquired, transitions));
        }
        if !holder.is_empty() && now < observed_at + held_for {
            return Step::Wait {
                holder: holder.to_string(),
            };
        }
        Step::Replace(record(MicroTime(wall), transitions + 1))
    }

    /// Remembers a spec this candidate wrote.
    pub fn wrote(&mut self, spec: LeaseSpec, now: Instant) {
        self.observed = Some((spec, now));
    }
}

/// The spec that releases a Lease `me` holds (client-go's ReleaseOnCancel): no holder, so the next
/// candidate takes it at once.
pub fn released(spec: &LeaseSpec, wall: Timestamp) -> LeaseSpec {
    LeaseSpec {
        holder_identity: Some(String::new()),
        lease_duration_seconds: Some(1),
        acquire_time: Some(MicroTime(wall)),
        renew_time: Some(MicroTime(wall)),
        lease_transitions: spec.lease_transitions,
        ..Default::default()
    }
}

/// Runs the election for one replica and publishes whether it leads.
pub struct LeaderElector {
    api: Api<Lease>,
    config: LeaseConfig,
    leading: watch::Sender<bool>,
}

enum Attempt {
    Leading,
    Held(String),
}

impl LeaderElector {
    pub fn new(client: kube::Client, config: LeaseConfig) -> (Self, watch::Receiver<bool>) {
        let (leading, rx) = watch::channel(false);
        let api = Api::namespaced(client, &config.namespace);
        (
            LeaderElector {
                api,
                config,
                leading,
            },
            rx,
        )
    }

    /// Tries to lead until `shutdown` completes; then releases the Lease if it holds it.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let c = &self.config;
        let mut candidate = Candidate::default();
        // When the last successful renewal was sent, while leading.
        let mut renewed: Option<Instant> = None;
        loop {
            let started = Instant::now();
            let attempt = tokio::time::timeout(c.retry_period, self.try_once(&mut candidate)).await;
            match attempt {
                Ok(Ok(Attempt::Leading)) => {
                    if renewed.is_none() {
                        tracing::info!(lease = %c.name, identity = %c.identity, "became the leader");
                    }
                    renewed = Some(started);
                }
                Ok(Ok(Attempt::Held(holder))) => {
                    if renewed.take().is_some() {
                        tracing::warn!(lease = %c.name, holder, "lost the lease to another replica");
                    }
                }
                Ok(Err(e)) => tracing::warn!(lease = %c.name, "lease: {e}"),
                Err(_) => {
                    tracing::warn!(lease = %c.name, "lease: no answer within {:?}", c.retry_period)
                }
            }
            if renewed.is_some_and(|at| at.elapsed() >= c.renew_deadline) {
                tracing::warn!(lease = %c.name, "no renewal within the renew deadline: stepping down");
                renewed = None;
            }
            self.leading.send_if_modified(|l| {
                let changed = *l != renewed.is_some();
                *l = renewed.is_some();
                changed
            });
            // A leader wakes at its renew deadline at the latest, so it steps down on time.
            let mut wake = tokio::time::Instant::now() + c.retry_period;
            if let Some(at) = renewed {
                wake = wake.min(tokio::time::Instant::from_std(at + c.renew_deadline));
            }
            tokio::select! {
                () = &mut shutdown => break,
                () = tokio::time::sleep_until(wake) => {}
            }
        }
        let was_leading = renewed.is_some();
        self.leading.send_replace(false);
        if was_leading {
            match tokio::time::timeout(c.retry_period, self.release()).await {
                Ok(Ok(())) => tracing::info!(lease = %c.name, "released the lease"),
                Ok(Err(e)) => tracing::warn!(lease = %c.name, "releasing the lease: {e}"),
                Err(_) => tracing::warn!(lease = %c.name, "releasing the lease: no answer"),
            }
        }
    }

    async fn try_once(&self, candidate: &mut Candidate) -> Result<Attempt, kube::Error> {
        let c = &self.config;
        let current = self.api.get_opt(&c.name).await?;
        let step = candidate.decide(
            current
                .as_ref()
                .map(|l| l.spec.clone().unwrap_or_default())
                .as_ref(),
            &c.identity,
            c.lease_duration,
            Instant::now(),
            Timestamp::now(),
        );
        let (written, result) = match (step, current) {
            (Step::Wait { holder }, _) => return Ok(Attempt::Held(holder)),
            (Step::Create(spec), _) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(c.name.clone()),
                        namespace: Some(c.namespace.clone()),
                        ..Default::default()
                    },
                    spec: Some(spec.clone()),
                };
                (spec, self.api.create(&PostParams::default(), &lease).await)
            }
            (Step::Replace(spec), Some(mut lease)) => {
                // The resourceVersion read stays in metadata: the server refuses a stale replace.
                lease.spec = Some(spec.clone());
                (
                    spec,
                    self.api
                        .replace(&c.name, &PostParams::default(), &lease)
                        .await,
                )
            }
            (Step::Replace(_), None) => unreachable!("replace is decided only on a Lease read"),
        };
        match result {
            Ok(_) => {
                candidate.wrote(written, Instant::now());
                Ok(Attempt::Leading)
            }
            // Another candidate wrote first (409 Conflict or AlreadyExists): it leads.
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(Attempt::Held(
                "another replica (write conflict)".to_string(),
            )),
            Err(e) => Err(e),
        }
    }

    async fn release(&self) -> Result<(), kube::Error> {
        let c = &self.config;
        let Some(mut lease) = self.api.get_opt(&c.name).await? else {
            return Ok(());
        };
        let spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(c.identity.as_str()) {
            return Ok(());
        }
        lease.spec = Some(released(&spec, Timestamp::now()));
        self.api
            .replace(&c.name, &PostParams::default(), &lease)
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Duration = Duration::from_secs(60);

    fn held_by(holder: &str, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.to_string()),
            lease_duration_seconds: Some(60),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    fn holder(step: &Step) -> Option<(&str, i32)> {
        match step {
            Step::Create(s) | Step::Replace(s) => Some((
                s.holder_identity.as_deref().unwrap(),
                s.lease_transitions.unwrap(),
            )),
            Step::Wait { .. } => None,
        }
    }

    #[test]
    fn no_lease_is_created_holding_it() {
        let mut c = Candidate::default();
        let step = c.decide(None, "b", D, Instant::now(), Timestamp::now());
        assert!(matches!(step, Step::Create(_)));
        assert_eq!(holder(&step), Some(("b", 0)));
    }

    #[test]
    fn a_held_lease_is_taken_only_after_it_stayed_unchanged_for_its_duration() {
        let t0 = Instant::now();
        let wall = Timestamp::now();
        let mut c = Candidate::default();
        let a = held_by("a", 3);
        assert_eq!(
            c.decide(Some(&a), "b", D, t0, wall),
            Step::Wait {
                holder: "a".to_string()
            }
        );
        assert!(matches!(
            c.decide(Some(&a), "b", D, t0 + Duration::from_secs(59), wall),
            Step::Wait { .. }
        ));
        // The holder renews: the clock starts again from when the change was seen.
        let mut renewed = a.clone();
        renewed.renew_time = Some(MicroTime(wall));
        assert!(matches!(
            c.decide(Some(&renewed), "b", D, t0 + Duration::from_secs(61), wall),
            Step::Wait { .. }
        ));
        let step = c.decide(Some(&renewed), "b", D, t0 + Duration::from_secs(121), wall);
        assert_eq!(holder(&step), Some(("b", 4)), "taken: one more transition");
    }

    #[test]
    fn the_holder_renews_keeping_its_acquire_time_and_a_released_lease_is_free() {
        let t0 = Instant::now();
        let wall = Timestamp::now();
        let mut mine = held_by("a", 2);
        mine.acquire_time = Some(MicroTime(Timestamp::UNIX_EPOCH));
        let mut c = Candidate::default();
        let Step::Replace(spec) = c.decide(Some(&mine), "a", D, t0, wall) else {
            panic!("renews")
        };
        assert_eq!(spec.acquire_time, Some(MicroTime(Timestamp::UNIX_EPOCH)));
        assert_eq!(spec.renew_time, Some(MicroTime(wall)));
        assert_eq!(spec.lease_transitions, Some(2));

        let free = released(&spec, wall);
        let mut other = Candidate::default();
        let step = other.decide(Some(&free), "b", D, t0, wall);
        assert_eq!(
            holder(&step),
            Some(("b", 3)),
            "no wait for a released lease"
        );
    }

    #[test]
    fn timing_must_leave_the_leader_time_to_step_down() {
        let config = |d, r, p| LeaseConfig {
            namespace: "ns".into(),
            name: "l".into(),
            identity: "a".into(),
            lease_duration: Duration::from_secs(d),
            renew_deadline: Duration::from_secs(r),
            retry_period: Duration::from_secs(p),
        };
        assert!(config(60, 40, 10).validate().is_ok());
        assert!(config(60, 60, 10).validate().is_err());
        assert!(config(60, 40, 40).validate().is_err());
    }
}
