//! Words the autoscaler, the activator and the serving controller share: which revision, and the
//! concurrency/request statistics Knative's queue-proxy and activator report (Knative's `Stat` message).

use std::fmt;

/// A revision, by namespace and name (Knative's `types.NamespacedName` for a revision).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RevisionKey {
    pub namespace: String,
    pub name: String,
}

impl RevisionKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        RevisionKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for RevisionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One second's statistics from one reporter (a revision instance's queue-proxy, or the activator), as
/// Knative's `autoscaler/metrics.Stat`. Knative's autoscaler subtracts the proxied parts of an instance's
/// stat, because the activator has already reported those requests itself.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Stat {
    /// The instance (or "activator") that reported it: Knative's `PodName`.
    pub pod_name: String,
    /// Time-weighted average of requests in flight over the window.
    pub average_concurrent_requests: f64,
    /// The same, for requests that came through the activator (`K-Proxy-Request: activator`).
    pub average_proxied_concurrent_requests: f64,
    /// Requests that arrived during the window.
    pub request_count: f64,
    /// The same, activator-proxied only.
    pub proxied_request_count: f64,
    /// Seconds since the reporter started.
    pub process_uptime: f64,
}

/// The pod name the activator reports its own stats under.
pub const ACTIVATOR_POD_NAME: &str = "activator";

/// Knative's header naming the revision on requests the gateway sends to a revision (set by the Route's
/// KIngress appendHeaders); the activator reads it to know which revision a request is for.
pub const REVISION_HEADER: &str = "Knative-Serving-Revision";
/// Knative's header naming the revision's namespace, beside [`REVISION_HEADER`].
pub const NAMESPACE_HEADER: &str = "Knative-Serving-Namespace";
/// Knative: the activator marks what it forwards, so the queue-proxy can count it apart.
pub const PROXY_HEADER: &str = "K-Proxy-Request";
/// The value of [`PROXY_HEADER`].
pub const PROXY_HEADER_VALUE: &str = "activator";
