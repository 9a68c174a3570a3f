//! The public face of both runtimes: one generic type over the backend (`process.rs` or
//! `container.rs`), whose methods hand over to the shared core (`core.rs`), and the one
//! [`InstanceRuntime`] impl. Each backend file adds only its constructor and what is its own.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::watch;

use crate::container::ContainerBackend;
use crate::core::{Backend, Core};
use crate::process::ProcessBackend;
use crate::{
    InstanceRuntime, LaunchSpec, LogQuery, RevisionKey, RuntimeError, RuntimeKind, RuntimeSnapshot,
};

/// Runs revision instances as local child processes. Create it inside a Tokio runtime
/// ([`ProcessRuntime::new`]); its methods are synchronous (they start work on that runtime) except
/// [`Runtime::shutdown`].
///
/// Dropping it SIGKILLs every instance's process group at once, so no process outlives it even when
/// the caller panics; call [`Runtime::shutdown`] for a graceful stop.
pub type ProcessRuntime = Runtime<ProcessBackend>;

/// Runs revision instances as containers ([`ContainerRuntime::connect`]).
///
/// Dropping it removes every container it started (a blocking best effort on a thread of its own,
/// since Drop cannot await); `sluice up` should still call [`Runtime::shutdown`] (graceful) or
/// [`Runtime::kill_now`]. A run that died by kill -9 leaves containers labelled with its owner:
/// [`crate::reap_leftover_containers`] removes them.
pub type ContainerRuntime = Runtime<ContainerBackend>;

/// A runtime over one of the crate's two backends: use [`ProcessRuntime`] or [`ContainerRuntime`].
pub struct Runtime<B: Backend> {
    pub(crate) core: Arc<Core<B>>,
}

impl<B: Backend> Runtime<B> {
    pub(crate) fn with_core(core: Core<B>) -> Self {
        Runtime {
            core: Arc::new(core),
        }
    }

    /// Registers a revision (with desired scale 0). Revisions are immutable: registering the same key
    /// again with an equal spec is a no-op, with a different spec an error ([`RuntimeError::SpecChanged`]),
    /// unless the revision was removed (its old instances may still be terminating). Containers: the
    /// images are resolved in the background (see the crate README).
    pub fn set_revision(&self, key: RevisionKey, spec: LaunchSpec) -> Result<(), RuntimeError> {
        self.core.set_revision(key, spec)
    }

    /// Starts or stops instances to reach `desired`. Scale-down stops not-ready, then newest instances
    /// first. A spawn failure is returned (the desired count is kept and retried with backoff, as a
    /// crash would be).
    pub fn scale(&self, key: &RevisionKey, desired: u32) -> Result<(), RuntimeError> {
        self.core.scale(key, desired)
    }

    /// Stops all instances of a revision and forgets it once they have exited.
    pub fn remove_revision(&self, key: &RevisionKey) -> Result<(), RuntimeError> {
        self.core.remove_revision(key)
    }

    /// The current snapshot and every change after it.
    pub fn subscribe(&self) -> watch::Receiver<RuntimeSnapshot> {
        self.core.subscribe()
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> RuntimeSnapshot {
        self.core.snapshot()
    }

    /// The log lines of the selected instances, merged in time order (see [`crate::read_logs`]).
    pub fn logs(&self, query: &LogQuery) -> Result<Vec<String>, RuntimeError> {
        crate::read_logs(&self.core.options.state_dir, query)
    }

    /// Follows the selected logs (see [`crate::LogFollower`]).
    pub fn follow_logs(&self, query: LogQuery) -> crate::LogFollower {
        crate::LogFollower::new(&self.core.options.state_dir, query)
    }

    pub fn state_dir(&self) -> &std::path::Path {
        &self.core.options.state_dir
    }

    /// The owner mark (the canonical state dir) of everything this runtime starts: the containers'
    /// `sluice.owner` label, the processes' `SLUICE_UP_STATE_DIR`.
    pub fn owner(&self) -> &str {
        &self.core.owner
    }

    /// Stops every instance (SIGTERM, then SIGKILL after each revision's grace period) and waits until
    /// all have exited (containers: removed, then the network). Later `set_revision`/`scale` calls
    /// fail with [`RuntimeError::ShuttingDown`].
    pub async fn shutdown(&self) {
        self.core.shutdown().await;
        self.core.backend.after_shutdown().await;
    }

    /// Kills every instance now, without a grace period (a second Ctrl-C). Their tasks reap them as
    /// usual, so a pending [`Runtime::shutdown`] then returns soon.
    pub fn kill_now(&self) {
        self.core.kill_now()
    }
}

impl<B: Backend> Drop for Runtime<B> {
    fn drop(&mut self) {
        self.core.kill_all_on_drop();
        self.core.backend.on_drop();
    }
}

impl<B: Backend> InstanceRuntime for Runtime<B> {
    fn kind(&self) -> RuntimeKind {
        B::KIND
    }
    fn set_revision(&self, key: RevisionKey, spec: LaunchSpec) -> Result<(), RuntimeError> {
        Runtime::set_revision(self, key, spec)
    }
    fn scale(&self, key: &RevisionKey, desired: u32) -> Result<(), RuntimeError> {
        Runtime::scale(self, key, desired)
    }
    fn remove_revision(&self, key: &RevisionKey) -> Result<(), RuntimeError> {
        Runtime::remove_revision(self, key)
    }
    fn subscribe(&self) -> watch::Receiver<RuntimeSnapshot> {
        Runtime::subscribe(self)
    }
    fn snapshot(&self) -> RuntimeSnapshot {
        Runtime::snapshot(self)
    }
    fn shutdown(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(Runtime::shutdown(self))
    }
    fn kill_now(&self) {
        Runtime::kill_now(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtimes_can_be_shared_across_tasks() {
        fn is<T: Send + Sync>() {}
        is::<ProcessRuntime>();
        is::<ContainerRuntime>();
    }
}
