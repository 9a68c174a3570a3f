//! The engine's HTTP API as the container runtime uses it: the client (DOCKER_HOST, API version
//! negotiation), what its errors mean, the bridge network, image resolution under a pull policy, and
//! removing containers (also those a killed run left).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bollard::Docker;
use bollard::errors::Error as EngineError;
use bollard::models::NetworkCreateRequest;
use bollard::query_parameters::{
    CreateImageOptions, ListContainersOptions, ListNetworksOptions, RemoveContainerOptions,
};
use tokio_stream::StreamExt;

use crate::engine::{self, ResolveStep};
use crate::{ImageSpec, PullPolicy, RevisionFailure, RuntimeError};

/// How long `connect` waits for the engine to answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Removes every container and network labelled with `owner` (the canonical state dir): what a run
/// killed with kill -9 left. Call it with the state dir locked (see [`crate::StateLock`]), beside
/// [`crate::leftovers::reap_leftovers`]. Returns how many containers it removed.
pub async fn reap_leftover_containers(owner: &str) -> Result<usize, RuntimeError> {
    reap_leftover_containers_at(None, owner).await
}

/// [`reap_leftover_containers`] on the engine at `engine` (see [`crate::ContainerOptions::engine`]).
pub async fn reap_leftover_containers_at(
    engine: Option<&str>,
    owner: &str,
) -> Result<usize, RuntimeError> {
    let docker = engine_client(engine).await?;
    let filter = |key: &str| {
        Some(
            [(
                key.to_string(),
                vec![format!("{}={owner}", engine::LABEL_OWNER)],
            )]
            .into_iter()
            .collect(),
        )
    };
    let containers = docker
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters: filter("label"),
            ..Default::default()
        }))
        .await
        .map_err(engine_error)?;
    let ids: Vec<String> = containers.into_iter().filter_map(|c| c.id).collect();
    let count = ids.len();
    remove_all(&docker, ids).await;
    let networks = docker
        .list_networks(Some(ListNetworksOptions {
            filters: filter("label"),
        }))
        .await
        .map_err(engine_error)?;
    for net in networks {
        if let Some(name) = net.name
            && let Err(e) = docker.remove_network(&name).await
        {
            tracing::warn!(network = %name, error = %e, "cannot remove a leftover network");
        }
    }
    Ok(count)
}

/// The engine client: `DOCKER_HOST` or the default socket, API version negotiated down to the
/// engine's (Docker 20.10 speaks 1.41; Podman's compatible socket the same way).
pub(crate) async fn engine_client(engine: Option<&str>) -> Result<Docker, RuntimeError> {
    // bollard's default request timeout (seconds); streams (logs, wait) are not bound by it.
    const TIMEOUT: u64 = 120;
    let docker = match engine {
        None => Docker::connect_with_defaults(),
        Some(unix) if unix.starts_with("unix://") || unix.starts_with('/') => {
            Docker::connect_with_unix(unix, TIMEOUT, bollard::API_DEFAULT_VERSION)
        }
        Some(http) => Docker::connect_with_http(http, TIMEOUT, bollard::API_DEFAULT_VERSION),
    }
    .map_err(engine_error)?;
    match tokio::time::timeout(CONNECT_TIMEOUT, docker.negotiate_version()).await {
        Ok(Ok(docker)) => Ok(docker),
        Ok(Err(e)) => Err(engine_error(e)),
        Err(_) => Err(RuntimeError::Engine {
            message: format!("no answer from the engine within {CONNECT_TIMEOUT:?}"),
        }),
    }
}

pub(crate) fn engine_error(e: EngineError) -> RuntimeError {
    RuntimeError::Engine {
        message: engine_words(&e),
    }
}

/// What the engine said, or why it could not be reached.
pub(crate) fn engine_words(e: &EngineError) -> String {
    match e {
        EngineError::DockerResponseServerError { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

/// Whether the engine answered (as opposed to: could not be reached).
pub(crate) fn engine_answered(e: &EngineError) -> bool {
    matches!(
        e,
        EngineError::DockerResponseServerError { .. }
            | EngineError::DockerContainerWaitError { .. }
            | EngineError::JsonDataError { .. }
    )
}

pub(crate) fn unavailable(e: &EngineError) -> RevisionFailure {
    RevisionFailure {
        reason: engine::REASON_ENGINE_UNAVAILABLE.to_string(),
        message: format!("the container engine does not answer: {}", engine_words(e)),
    }
}

pub(crate) async fn ensure_network(
    docker: &Docker,
    name: &str,
    owner: &str,
    extra: &[(String, String)],
) -> Result<(), RuntimeError> {
    match docker
        .inspect_network(
            name,
            None::<bollard::query_parameters::InspectNetworkOptions>,
        )
        .await
    {
        Ok(_) => return Ok(()),
        Err(EngineError::DockerResponseServerError {
            status_code: 404, ..
        }) => {}
        Err(e) => return Err(engine_error(e)),
    }
    let mut labels: std::collections::HashMap<String, String> = extra.iter().cloned().collect();
    labels.insert(engine::LABEL_OWNER.to_string(), owner.to_string());
    let created = docker
        .create_network(NetworkCreateRequest {
            name: name.to_string(),
            driver: Some("bridge".to_string()),
            labels: Some(labels),
            ..Default::default()
        })
        .await;
    match created {
        Ok(_) => Ok(()),
        // Created meanwhile (a concurrent connect on the same owner).
        Err(EngineError::DockerResponseServerError {
            status_code: 409, ..
        }) => Ok(()),
        Err(e) => Err(engine_error(e)),
    }
}

/// Force-removes a container (killing it if it runs) and its anonymous volumes; a container already
/// gone is fine.
pub(crate) async fn remove_container(docker: &Docker, id: &str) -> Result<(), EngineError> {
    match docker
        .remove_container(
            id,
            Some(RemoveContainerOptions {
                force: true,
                v: true,
                ..Default::default()
            }),
        )
        .await
    {
        Err(EngineError::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(()),
        other => other,
    }
}

/// Force-removes containers concurrently and waits for all.
pub(crate) async fn remove_all(docker: &Docker, ids: impl IntoIterator<Item = String>) {
    let mut set = tokio::task::JoinSet::new();
    for id in ids {
        let docker = docker.clone();
        set.spawn(async move { remove_container(&docker, &id).await.err().map(|e| (id, e)) });
    }
    let mut failed = Vec::new();
    while let Some(done) = set.join_next().await {
        if let Ok(Some(failure)) = done {
            failed.push(failure);
        }
    }
    // Podman refuses to remove a serving container while a sidecar in its network namespace
    // exists; removed together, that sidecar is gone now: one more try for those.
    for (id, first) in failed {
        if let Err(e) = remove_container(docker, &id).await {
            tracing::warn!(container = %short(&id), error = %e, first = %first, "cannot remove container");
        }
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Resolves one image under its pull policy; returns its ID and its configured user.
pub(crate) async fn resolve_image(
    docker: &Docker,
    image: &ImageSpec,
    need_user: bool,
) -> Result<(String, Option<String>), RevisionFailure> {
    if let Some(pinned) = &image.pinned
        && !need_user
    {
        return Ok((pinned.clone(), None));
    }
    let reference = image.pinned.as_deref().unwrap_or(&image.reference);
    let missing = |words: String| RevisionFailure {
        reason: engine::REASON_CONTAINER_MISSING.to_string(),
        message: engine::image_missing_message(&image.reference, &words),
    };
    let step = if image.pinned.is_some() {
        ResolveStep::InspectOnly
    } else {
        engine::resolve_step(image.pull_policy)
    };
    let inspect = || inspect_image(docker, reference);
    match step {
        ResolveStep::InspectOnly => match inspect().await? {
            Some(found) => Ok(found),
            None => Err(missing(if image.pull_policy == PullPolicy::Never {
                format!(
                    "the image is not present locally and imagePullPolicy is Never (engine: No such image: {reference})"
                )
            } else {
                format!("No such image: {reference}")
            })),
        },
        ResolveStep::InspectThenPull => {
            if let Some(found) = inspect().await? {
                return Ok(found);
            }
            pull(docker, reference).await.map_err(&missing)?;
            inspect()
                .await?
                .ok_or_else(|| missing(format!("No such image after pull: {reference}")))
        }
        ResolveStep::PullThenInspect => {
            let pulled = pull(docker, reference).await;
            match (inspect().await?, pulled) {
                (Some(found), Ok(())) => Ok(found),
                (Some(found), Err(words)) => {
                    // No registry on a development machine is normal: run the local image.
                    tracing::warn!(image = %reference, error = %words, "imagePullPolicy Always: the pull failed, using the local image");
                    Ok(found)
                }
                (None, Err(words)) => Err(missing(words)),
                (None, Ok(())) => Err(missing(format!("No such image after pull: {reference}"))),
            }
        }
    }
}

/// `Ok(None)` when the engine has no such image.
pub(crate) async fn inspect_image(
    docker: &Docker,
    reference: &str,
) -> Result<Option<(String, Option<String>)>, RevisionFailure> {
    match docker.inspect_image(reference).await {
        Ok(info) => Ok(Some((
            info.id.unwrap_or_default(),
            info.config.and_then(|c| c.user),
        ))),
        Err(EngineError::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(None),
        Err(e) if engine_answered(&e) => Err(RevisionFailure {
            reason: engine::REASON_CONTAINER_MISSING.to_string(),
            message: engine::image_missing_message(reference, &engine_words(&e)),
        }),
        Err(e) => Err(unavailable(&e)),
    }
}

/// Pulls `reference`; `Err` holds the engine's words.
pub(crate) async fn pull(docker: &Docker, reference: &str) -> Result<(), String> {
    let mut stream = docker.create_image(
        Some(CreateImageOptions {
            from_image: Some(engine::pull_reference(reference)),
            ..Default::default()
        }),
        None,
        None,
    );
    while let Some(item) = stream.next().await {
        match item {
            Ok(info) => {
                if let Some(err) = info.error_detail.and_then(|d| d.message) {
                    return Err(err);
                }
            }
            Err(e) => return Err(engine_words(&e)),
        }
    }
    Ok(())
}

/// Retries removing `ids` every 2 s for up to 10 minutes.
pub(crate) async fn remove_when_back(
    docker: Docker,
    mut ids: Vec<String>,
    live: Arc<Mutex<BTreeSet<String>>>,
) {
    for _ in 0..300 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut left = Vec::new();
        for id in ids {
            match remove_container(&docker, &id).await {
                Ok(()) => {
                    lock(&live).remove(&id);
                }
                Err(e) if !engine_answered(&e) => left.push(id),
                Err(e) => {
                    tracing::warn!(container = %short(&id), error = %e, "cannot remove container")
                }
            }
        }
        if left.is_empty() {
            return;
        }
        ids = left;
    }
}

pub(crate) fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

pub(crate) fn short_image(id: &str) -> &str {
    let hex = id.strip_prefix("sha256:").unwrap_or(id);
    &hex[..hex.len().min(12)]
}
