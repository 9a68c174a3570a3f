//! The one interface the serving plane uses, whichever runtime runs the instances.

use std::future::Future;
use std::pin::Pin;

use tokio::sync::watch;

use crate::{LaunchSpec, RevisionKey, RuntimeError, RuntimeSnapshot};

/// Which runtime runs the instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuntimeKind {
    /// Local processes from the container's `command`.
    Process,
    /// Containers from the container's `image`, on a Docker-compatible engine.
    Container,
}

impl std::fmt::Display for RuntimeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RuntimeKind::Process => "process",
            RuntimeKind::Container => "container",
        })
    }
}

/// Runs revision instances: the autoscaler scales through it, the serving plane reads its snapshots.
/// Implemented by [`crate::Runtime`] over either backend ([`crate::ProcessRuntime`],
/// [`crate::ContainerRuntime`]).
pub trait InstanceRuntime: Send + Sync {
    fn kind(&self) -> RuntimeKind;
    fn set_revision(&self, key: RevisionKey, spec: LaunchSpec) -> Result<(), RuntimeError>;
    fn scale(&self, key: &RevisionKey, desired: u32) -> Result<(), RuntimeError>;
    fn remove_revision(&self, key: &RevisionKey) -> Result<(), RuntimeError>;
    fn subscribe(&self) -> watch::Receiver<RuntimeSnapshot>;
    fn snapshot(&self) -> RuntimeSnapshot;
    /// Stops every instance gracefully and waits until all are gone.
    fn shutdown(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
    /// Kills every instance now (a second Ctrl-C).
    fn kill_now(&self);
}
