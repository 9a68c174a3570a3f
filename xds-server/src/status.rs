//! Knative Ingress status from what Sluice observed: pure, so every transition is unit-tested.
//!
//! Knative: Ready = NetworkConfigured AND LoadBalancerReady. Sluice marks LoadBalancerReady only once
//! Envoy has ACKed a configuration containing the Ingress's current spec AND a probe through the gateway
//! proved Envoy serves that exact version (its hash).

use sluice_api::ingress::{
    CONDITION_LOAD_BALANCER_READY, CONDITION_NETWORK_CONFIGURED, CONDITION_READY, IngressStatus,
    LoadBalancerIngressStatus, LoadBalancerStatus,
};
use sluice_api::{Condition, ConditionStatus, Ingress};

/// What Sluice knows about one Ingress of its class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// The Ingress cannot be programmed (invalid spec, missing Service, DomainConflict...).
    Rejected { reason: String, message: String },
    /// Programmed, but Envoy rejected a Listener or Cluster it is served through (held back, so the
    /// rest of the configuration is applied): `message` names each with Envoy's words.
    EnvoyRejected { message: String },
    /// Programmed into a snapshot; waiting for Envoy's ACK and the probe.
    Programmed {
        acked: bool,
        probe: Probe,
        /// Envoy rejected the newest configuration (its NACK message), if it did.
        nack: Option<String>,
        /// While not acked: who is waited for (the gateways that have not ACKed it).
        waiting: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    NotYet,
    Succeeded,
    Failed(String),
}

/// Where the gateway can be reached, as written into status.publicLoadBalancer / privateLoadBalancer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadBalancers {
    pub public: LoadBalancerIngressStatus,
    pub private: LoadBalancerIngressStatus,
}

/// Reasons Sluice writes; DomainConflict is Knative's own.
pub const REASON_DOMAIN_CONFLICT: &str = "DomainConflict";
/// An extra condition on both sides of a host conflict (Knative's DomainMapping word): True on the
/// Ingress that keeps the hosts, False on the one that does not get them. Severity Info, as Knative
/// gives conditions that are not Ready's dependents, so it never changes Ready.
pub const CONDITION_DOMAIN_CLAIMED: &str = "DomainClaimed";
const SEVERITY_INFO: &str = "Info";
pub const REASON_UNINITIALIZED: &str = "Uninitialized";
pub const REASON_NOT_ACKED: &str = "EnvoyNotAcked";
pub const REASON_REJECTED_BY_ENVOY: &str = "EnvoyRejected";
pub const REASON_PROBE_FAILED: &str = "ProbeFailed";

fn condition(
    type_: &str,
    status: ConditionStatus,
    reason: &str,
    message: &str,
    now: &str,
) -> Condition {
    Condition {
        type_: type_.to_string(),
        status,
        severity: String::new(),
        last_transition_time: Some(now.to_string()),
        reason: reason.to_string(),
        message: message.to_string(),
    }
}

/// The status Knative would show for `ingress` given `progress`. `contested` says which of its hosts
/// newer Ingresses claim too (it keeps them, and stays Ready). `now` (RFC 3339) stamps conditions
/// whose status changes; unchanged conditions keep their previous transition time.
pub fn ingress_status(
    ingress: &Ingress,
    progress: &Progress,
    contested: Option<&str>,
    lbs: &LoadBalancers,
    now: &str,
) -> IngressStatus {
    let mut status = ingress.status.clone();
    status.status.observed_generation = ingress.metadata.generation;
    let (network, lb) = match progress {
        Progress::Rejected { reason, message } if reason == REASON_DOMAIN_CONFLICT => (
            (ConditionStatus::True, "", ""),
            (ConditionStatus::False, reason.as_str(), message.as_str()),
        ),
        Progress::Rejected { reason, message } => (
            (ConditionStatus::False, reason.as_str(), message.as_str()),
            (ConditionStatus::False, reason.as_str(), message.as_str()),
        ),
        Progress::EnvoyRejected { message } => (
            (ConditionStatus::True, "", ""),
            (
                ConditionStatus::False,
                REASON_REJECTED_BY_ENVOY,
                message.as_str(),
            ),
        ),
        Progress::Programmed {
            acked,
            probe,
            nack,
            waiting,
        } => {
            let lb = match (acked, probe, nack) {
                (false, _, Some(err)) => (
                    ConditionStatus::False,
                    REASON_REJECTED_BY_ENVOY,
                    err.as_str(),
                ),
                (false, _, None) => (
                    ConditionStatus::Unknown,
                    REASON_NOT_ACKED,
                    waiting
                        .as_deref()
                        .unwrap_or("Waiting for Envoy to accept the configuration"),
                ),
                (true, Probe::Succeeded, _) => (ConditionStatus::True, "", ""),
                (true, Probe::NotYet, _) => (
                    ConditionStatus::Unknown,
                    REASON_UNINITIALIZED,
                    "Waiting for the gateway to serve this version",
                ),
                (true, Probe::Failed(err), _) => {
                    (ConditionStatus::Unknown, REASON_PROBE_FAILED, err.as_str())
                }
            };
            ((ConditionStatus::True, "", ""), lb)
        }
    };
    let ready = match (network.0, lb.0) {
        (ConditionStatus::True, ConditionStatus::True) => (ConditionStatus::True, "", ""),
        (ConditionStatus::False, _) => network,
        (_, ConditionStatus::False) => lb,
        _ if lb.0 != ConditionStatus::True => lb,
        _ => network,
    };
    for (type_, (s, reason, message)) in [
        (CONDITION_NETWORK_CONFIGURED, network),
        (CONDITION_LOAD_BALANCER_READY, lb),
        (CONDITION_READY, ready),
    ] {
        status
            .status
            .set_condition(condition(type_, s, reason, message, now));
    }
    let claimed = match (progress, contested) {
        (Progress::Rejected { reason, message }, _) if reason == REASON_DOMAIN_CONFLICT => {
            Some((ConditionStatus::False, message.as_str()))
        }
        (Progress::Rejected { .. }, _) | (_, None) => None,
        (_, Some(message)) => Some((ConditionStatus::True, message)),
    };
    match claimed {
        Some((s, message)) => status.status.set_condition(Condition {
            severity: SEVERITY_INFO.to_string(),
            ..condition(
                CONDITION_DOMAIN_CLAIMED,
                s,
                REASON_DOMAIN_CONFLICT,
                message,
                now,
            )
        }),
        None => status
            .status
            .conditions
            .retain(|c| c.type_ != CONDITION_DOMAIN_CLAIMED),
    }
    if lb.0 == ConditionStatus::True {
        status.public_load_balancer = Some(LoadBalancerStatus {
            ingress: vec![lbs.public.clone()],
        });
        status.private_load_balancer = Some(LoadBalancerStatus {
            ingress: vec![lbs.private.clone()],
        });
    }
    status
}

/// Whether the Ingress's Ready condition is True.
pub fn is_ready(status: &IngressStatus) -> bool {
    status
        .status
        .condition(CONDITION_READY)
        .is_some_and(|c| c.status == ConditionStatus::True)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lbs() -> LoadBalancers {
        LoadBalancers {
            public: LoadBalancerIngressStatus {
                domain_internal: "public.example".into(),
                ..Default::default()
            },
            private: LoadBalancerIngressStatus {
                domain_internal: "private.example".into(),
                ..Default::default()
            },
        }
    }

    fn ingress() -> Ingress {
        let mut i = Ingress::default();
        i.metadata.generation = 3;
        i
    }

    fn cond(s: &IngressStatus, t: &str) -> (ConditionStatus, String) {
        let c = s.status.condition(t).unwrap();
        (c.status, c.reason.clone())
    }

    fn programmed(acked: bool, probe: Probe, nack: Option<&str>) -> Progress {
        Progress::Programmed {
            acked,
            probe,
            nack: nack.map(str::to_string),
            waiting: None,
        }
    }

    #[test]
    fn ready_only_after_ack_and_probe() {
        let cases = [
            (
                programmed(false, Probe::NotYet, None),
                ConditionStatus::Unknown,
                REASON_NOT_ACKED,
            ),
            (
                programmed(true, Probe::NotYet, None),
                ConditionStatus::Unknown,
                REASON_UNINITIALIZED,
            ),
            (
                programmed(true, Probe::Failed("503".into()), None),
                ConditionStatus::Unknown,
                REASON_PROBE_FAILED,
            ),
            (
                programmed(true, Probe::Succeeded, None),
                ConditionStatus::True,
                "",
            ),
            (
                programmed(false, Probe::NotYet, Some("bad weights")),
                ConditionStatus::False,
                REASON_REJECTED_BY_ENVOY,
            ),
        ];
        for (progress, want, reason) in cases {
            let s = ingress_status(&ingress(), &progress, None, &lbs(), "t");
            assert_eq!(
                cond(&s, CONDITION_READY),
                (want, reason.to_string()),
                "{progress:?}"
            );
            assert_eq!(
                cond(&s, CONDITION_NETWORK_CONFIGURED).0,
                ConditionStatus::True
            );
            assert_eq!(s.status.observed_generation, 3);
            assert_eq!(
                s.public_load_balancer.is_some(),
                want == ConditionStatus::True
            );
        }
    }

    #[test]
    fn domain_conflict_is_a_load_balancer_failure() {
        let p = Progress::Rejected {
            reason: REASON_DOMAIN_CONFLICT.into(),
            message: "host a.example is already claimed by default/other".into(),
        };
        let s = ingress_status(&ingress(), &p, None, &lbs(), "t");
        assert_eq!(
            cond(&s, CONDITION_LOAD_BALANCER_READY),
            (ConditionStatus::False, REASON_DOMAIN_CONFLICT.to_string())
        );
        assert_eq!(
            cond(&s, CONDITION_NETWORK_CONFIGURED).0,
            ConditionStatus::True
        );
        assert_eq!(
            cond(&s, CONDITION_READY),
            (ConditionStatus::False, REASON_DOMAIN_CONFLICT.to_string())
        );
    }

    #[test]
    fn an_invalid_spec_is_not_network_configured() {
        let p = Progress::Rejected {
            reason: "InvalidSpec".into(),
            message: "spec.rules: required".into(),
        };
        let s = ingress_status(&ingress(), &p, None, &lbs(), "t");
        assert_eq!(
            cond(&s, CONDITION_NETWORK_CONFIGURED),
            (ConditionStatus::False, "InvalidSpec".to_string())
        );
        assert_eq!(cond(&s, CONDITION_READY).0, ConditionStatus::False);
        assert!(s.public_load_balancer.is_none());
    }

    #[test]
    fn a_rejected_listener_or_cluster_makes_its_ingress_not_ready_with_envoys_words() {
        let mut i = ingress();
        i.status = ingress_status(
            &i,
            &programmed(true, Probe::Succeeded, None),
            None,
            &lbs(),
            "t1",
        );
        assert!(is_ready(&i.status));
        let message = "Envoy rejected Listener internal: cannot bind '127.0.0.1:8081': Address \
                       already in use";
        let p = Progress::EnvoyRejected {
            message: message.into(),
        };
        let s = ingress_status(&i, &p, None, &lbs(), "t2");
        let ready = s.status.condition(CONDITION_READY).unwrap();
        assert_eq!(
            (ready.status, ready.reason.as_str(), ready.message.as_str()),
            (ConditionStatus::False, REASON_REJECTED_BY_ENVOY, message)
        );
        assert_eq!(ready.last_transition_time.as_deref(), Some("t2"));
        assert_eq!(
            cond(&s, CONDITION_LOAD_BALANCER_READY),
            (ConditionStatus::False, REASON_REJECTED_BY_ENVOY.to_string())
        );
        assert_eq!(
            cond(&s, CONDITION_NETWORK_CONFIGURED).0,
            ConditionStatus::True,
            "the spec itself is fine"
        );
    }

    #[test]
    fn both_sides_of_a_host_conflict_say_so_and_the_owner_stays_ready() {
        let kept = "host a.example is also claimed by Ingress default/newer, which does not get it";
        let s = ingress_status(
            &ingress(),
            &programmed(true, Probe::Succeeded, None),
            Some(kept),
            &lbs(),
            "t",
        );
        assert!(is_ready(&s));
        let c = s.status.condition(CONDITION_DOMAIN_CLAIMED).unwrap();
        assert_eq!(
            (
                c.status,
                c.reason.as_str(),
                c.message.as_str(),
                c.severity.as_str()
            ),
            (ConditionStatus::True, REASON_DOMAIN_CONFLICT, kept, "Info")
        );

        let lost = Progress::Rejected {
            reason: REASON_DOMAIN_CONFLICT.into(),
            message: "host a.example is already served by Ingress default/older".into(),
        };
        let s = ingress_status(&ingress(), &lost, None, &lbs(), "t");
        assert_eq!(
            cond(&s, CONDITION_DOMAIN_CLAIMED),
            (ConditionStatus::False, REASON_DOMAIN_CONFLICT.to_string())
        );

        // Once the conflict is over, the condition goes.
        let mut i = ingress();
        i.status = s;
        let s = ingress_status(
            &i,
            &programmed(true, Probe::Succeeded, None),
            None,
            &lbs(),
            "t",
        );
        assert!(s.status.condition(CONDITION_DOMAIN_CLAIMED).is_none());
        assert!(is_ready(&s));
    }

    #[test]
    fn unchanged_conditions_keep_their_transition_time() {
        let mut i = ingress();
        i.status = ingress_status(
            &i,
            &programmed(true, Probe::Succeeded, None),
            None,
            &lbs(),
            "t1",
        );
        let s = ingress_status(
            &i,
            &programmed(true, Probe::Succeeded, None),
            None,
            &lbs(),
            "t2",
        );
        let c = s.status.condition(CONDITION_READY).unwrap();
        assert_eq!(c.last_transition_time.as_deref(), Some("t1"));
    }
}
