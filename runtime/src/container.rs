//! The container runtime: revision instances as containers on a Docker-compatible engine (Docker,
//! Podman's compatible socket), through the engine's HTTP API.

use tokio::sync::watch;

use crate::{
    InstanceRuntime, LaunchSpec, RevisionKey, RuntimeError, RuntimeKind, RuntimeOptions,
    RuntimeSnapshot,
};

/// Runs revision instances as containers.
pub struct ContainerRuntime {
    snapshot: watch::Sender<RuntimeSnapshot>,
}

impl ContainerRuntime {
    /// Connects to the engine named by `DOCKER_HOST`, else the default socket; an error when no
    /// engine answers (the caller then falls back to processes, or reports why images cannot run).
    pub async fn connect(_options: RuntimeOptions) -> Result<ContainerRuntime, RuntimeError> {
        Err(RuntimeError::Engine {
            message: "the container runtime is not built yet".to_string(),
        })
    }
}

impl InstanceRuntime for ContainerRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Container
    }
    fn set_revision(&self, _key: RevisionKey, _spec: LaunchSpec) -> Result<(), RuntimeError> {
        Err(RuntimeError::Engine {
            message: "the container runtime is not built yet".to_string(),
        })
    }
    fn scale(&self, _key: &RevisionKey, _desired: u32) -> Result<(), RuntimeError> {
        Err(RuntimeError::Engine {
            message: "the container runtime is not built yet".to_string(),
        })
    }
    fn remove_revision(&self, _key: &RevisionKey) -> Result<(), RuntimeError> {
        Ok(())
    }
    fn subscribe(&self) -> watch::Receiver<RuntimeSnapshot> {
        self.snapshot.subscribe()
    }
    fn snapshot(&self) -> RuntimeSnapshot {
        self.snapshot.borrow().clone()
    }
    fn shutdown(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(async {})
    }
    fn kill_now(&self) {}
}
