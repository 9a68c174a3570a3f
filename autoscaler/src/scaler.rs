//! The edge the autoscaler drives: set a revision's instance count (Knative's `scaler.applyScale`, which
//! patches the Deployment's replicas). The lead implements it with the local process runtime; in a
//! cluster it would patch the Deployment's scale subresource.

use futures::future::BoxFuture;
use sluice_api::autoscaling::RevisionKey;

/// Why scaling failed; the service logs it and tries again at the next decision.
#[derive(Debug, thiserror::Error)]
#[error("scale {revision} to {desired}: {message}")]
pub struct ScaleError {
    pub revision: RevisionKey,
    pub desired: u32,
    pub message: String,
}

/// Sets how many instances of a revision should run.
pub trait Scaler: Send + Sync {
    /// Asks the runtime to run `desired` instances of `revision` (0 = none). Called only when the
    /// decision changes, and again after a failure.
    fn scale(&self, revision: &RevisionKey, desired: u32) -> BoxFuture<'_, Result<(), ScaleError>>;
}
