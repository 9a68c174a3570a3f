//! Metric names. Envoy stats from wasm are global by name (across plugins, VMs and worker threads), and
//! /stats/prometheus prints them bare, so the revision and the instance go into the name:
//!
//! - per instance: `sluice_qp__<namespace>__<revision>__<instance>__<stat>`
//! - per revision: `sluice_qp__<namespace>__<revision>__<stat>` (the sum over the revision's instances
//!   whose filters run in the same Envoy)
//!
//! Each name part is the Kubernetes name with '-' and '.' turned into '_' (Prometheus allows neither);
//! parts are joined with "__", which a part never holds (the configuration refuses names with two
//! non-alphanumerics in a row), so a name splits back into its parts.

use crate::config::Identity;

/// The prefix of every metric this filter defines.
pub const PREFIX: &str = "sluice_qp";

/// Time-weighted average concurrency over the last complete 1 s window, in milli-requests (gauge).
/// Knative's Stat.AverageConcurrentRequests x 1000.
pub const AVERAGE_CONCURRENCY: &str = "average_concurrency_milli";
/// The same, only requests proxied by the activator (gauge). Stat.AverageProxiedConcurrentRequests x 1000.
pub const AVERAGE_PROXIED_CONCURRENCY: &str = "average_proxied_concurrency_milli";
/// Requests that arrived in the last complete 1 s window (gauge). Stat.RequestCount.
pub const REQUEST_COUNT: &str = "request_count";
/// The same, only requests proxied by the activator (gauge). Stat.ProxiedRequestCount.
pub const PROXIED_REQUEST_COUNT: &str = "proxied_request_count";
/// Requests counted since Envoy started (counter): for rates over any scrape period.
pub const REQUESTS_TOTAL: &str = "requests_total";
/// Requests proxied by the activator counted since Envoy started (counter).
pub const PROXIED_REQUESTS_TOTAL: &str = "proxied_requests_total";

/// Per instance only: requests holding one of the containerConcurrency slots (gauge).
pub const IN_FLIGHT: &str = "in_flight";
/// Per instance only: requests waiting for a slot (gauge).
pub const QUEUED: &str = "queued";
/// Per instance only: requests answered 503 "pending request queue full" (counter).
pub const OVERFLOW_TOTAL: &str = "overflow_total";
/// Per instance only: queued requests answered 503 when their queue timeout passed (counter).
pub const QUEUE_TIMEOUT_TOTAL: &str = "queue_timeout_total";
/// Per instance only: 1 when the instance is ready (what `K-Network-Probe: queue` answers), else 0.
pub const READY: &str = "ready";

/// A name part: '-' and '.' become '_'; anything else outside [a-z0-9_] too (the configuration already
/// refuses such names; this keeps the output a valid Prometheus name whatever it is given).
pub fn part(name: &str) -> String {
    name.chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '_',
        })
        .collect()
}

/// `sluice_qp__<namespace>__<revision>__<stat>`.
pub fn revision_metric(namespace: &str, revision: &str, stat: &str) -> String {
    format!("{PREFIX}__{}__{}__{stat}", part(namespace), part(revision))
}

/// `sluice_qp__<namespace>__<revision>__<instance>__<stat>`.
pub fn instance_metric(namespace: &str, revision: &str, instance: &str, stat: &str) -> String {
    format!(
        "{PREFIX}__{}__{}__{}__{stat}",
        part(namespace),
        part(revision),
        part(instance)
    )
}

/// The names for one filter's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    identity: Identity,
}

impl Names {
    pub fn new(identity: &Identity) -> Names {
        Names {
            identity: identity.clone(),
        }
    }

    pub fn revision(&self, stat: &str) -> String {
        revision_metric(&self.identity.namespace, &self.identity.revision, stat)
    }

    pub fn instance(&self, stat: &str) -> String {
        instance_metric(
            &self.identity.namespace,
            &self.identity.revision,
            &self.identity.instance,
            stat,
        )
    }

    /// The shared-data key (and shared-queue name prefix) of this instance's breaker and readiness.
    pub fn shared_key(&self, what: &str) -> String {
        format!(
            "{PREFIX}/{}/{}/{}/{what}",
            self.identity.namespace, self.identity.revision, self.identity.instance
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_put_kubernetes_names_into_prometheus_names() {
        assert_eq!(
            instance_metric(
                "default",
                "hello-00001",
                "hello-00001-deployment-7f9c.2",
                AVERAGE_CONCURRENCY
            ),
            "sluice_qp__default__hello_00001__hello_00001_deployment_7f9c_2__average_concurrency_milli"
        );
        assert_eq!(
            revision_metric("team-a", "web-00002", REQUEST_COUNT),
            "sluice_qp__team_a__web_00002__request_count"
        );
    }

    #[test]
    fn names_split_back_into_their_parts() {
        let name = instance_metric("a-b", "c", "d-e-f", PROXIED_REQUEST_COUNT);
        let parts: Vec<&str> = name.split("__").collect();
        assert_eq!(
            parts,
            ["sluice_qp", "a_b", "c", "d_e_f", "proxied_request_count"]
        );
        let name = revision_metric("a", "b-c", AVERAGE_PROXIED_CONCURRENCY);
        let parts: Vec<&str> = name.split("__").collect();
        assert_eq!(
            parts,
            ["sluice_qp", "a", "b_c", "average_proxied_concurrency_milli"]
        );
    }

    #[test]
    fn every_name_is_a_valid_prometheus_name() {
        let names = [
            instance_metric("Weird Name!", "r", "i", IN_FLIGHT),
            revision_metric("n", "r.x", REQUESTS_TOTAL),
        ];
        for name in names {
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{name}"
            );
        }
    }
}
