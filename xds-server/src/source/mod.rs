//! Where the state comes from, behind one trait: a watched folder of YAML ([`folder`]) or Kubernetes.

pub mod folder;
pub mod kube;

use futures::future::BoxFuture;
use tokio::sync::watch;

use sluice_api::{Ingress, Object};

use crate::state::ClusterState;

/// Everything a source has read, and the problems it met on the way. A bad file or object is reported
/// here and left out; the rest of the state stays.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SourceSnapshot {
    pub state: ClusterState,
    pub errors: Vec<SourceError>,
    /// Objects of kinds the xds-server does not translate itself (Knative Serving and Eventing objects,
    /// ConfigMaps), for the controllers that do; a folder reads them, Kubernetes does not yet.
    pub objects: Vec<Object>,
    /// Where each of `objects` was read (`Kind namespace/name` -> file and document), so a problem
    /// found later (a bad annotation) names the file to fix.
    pub origins: std::collections::BTreeMap<String, String>,
}

/// A problem with one file or object, naming it (`origin`: a file path with document index, or
/// `kind namespace/name`) and what is wrong with it (with the field, where known).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{origin}: {message}")]
pub struct SourceError {
    pub origin: String,
    pub message: String,
}

pub trait StateSource: Send + Sync + 'static {
    /// Runs until the future is dropped, publishing a full snapshot after every change.
    fn run(&self, tx: watch::Sender<SourceSnapshot>) -> BoxFuture<'_, Result<(), SourceError>>;

    /// Writes an Ingress's status back to where the source keeps objects (Kubernetes: the status
    /// subresource). A folder keeps status in memory only, so its implementation does nothing.
    fn write_ingress_status<'a>(
        &'a self,
        ingress: &'a Ingress,
    ) -> BoxFuture<'a, Result<(), SourceError>>;
}
