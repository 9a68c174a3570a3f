//! The container tests' own helpers, against the real engine: the static test app runs in a `FROM
//! scratch` image (served and as an exec probe), test images are labelled and removed on Drop, a
//! re-tag moves a tag, and the leftovers guard removes a run's containers and networks.

use sluice_e2e::images::{
    self, APP_IN_IMAGE, EngineLeftovers, ImageOptions, OWNER_LABEL, TestImage, docker,
};

/// A container of `image` labelled as a test's (removed by the guard that owns `owner`).
fn run_detached(image: &str, owner: &str, env: &[&str], args: &[&str]) -> String {
    let owner_label = format!("{OWNER_LABEL}={owner}");
    let mut cmd = vec![
        "run",
        "--detach",
        "--label",
        images::TEST_LABEL,
        "--label",
        &owner_label,
    ];
    for e in env {
        cmd.extend(["--env", e]);
    }
    cmd.push(image);
    cmd.extend(args);
    docker(&cmd).expect("docker run")
}

/// Exit code of `docker exec CONTAINER ARGS`.
fn exec_code(container: &str, args: &[&str]) -> i32 {
    let mut cmd = vec!["exec", container];
    cmd.extend(args);
    std::process::Command::new("docker")
        .args(&cmd)
        .status()
        .expect("docker exec")
        .code()
        .unwrap_or(-1)
}

#[test]
fn the_static_app_serves_in_a_scratch_image_and_answers_exec_probes() {
    let image = TestImage::app().expect("building the test image");
    assert!(image.tag().starts_with("sluice-test/app:"));
    assert!(image.id().starts_with("sha256:"), "{}", image.id());
    let labels = docker(&[
        "image",
        "inspect",
        "--format",
        "{{json .Config.Labels}}",
        image.id(),
    ])
    .expect("inspect");
    assert!(labels.contains("\"sluice.test\":\"1\""), "{labels}");

    let state = tempfile::tempdir().expect("temp dir");
    let guard = EngineLeftovers::new(state.path());
    let container = run_detached(
        image.tag(),
        guard.owner(),
        &["PORT=8080", "APP_READY_FILE=/tmp/ready"],
        &[],
    );
    // The server comes up (no fixed sleep: the exec probe itself is polled).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let url = "http://127.0.0.1:8080/healthz";
    while exec_code(&container, &[APP_IN_IMAGE, "get", url]) != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the app never answered /healthz in its container: {}",
            docker(&["logs", &container]).unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(
        exec_code(&container, &[APP_IN_IMAGE, "check-file", "/tmp/ready"]),
        0
    );
    assert_eq!(
        exec_code(&container, &[APP_IN_IMAGE, "check-file", "/tmp/never"]),
        1
    );
    assert_eq!(
        exec_code(
            &container,
            &[APP_IN_IMAGE, "get", "http://127.0.0.1:8080/sick"]
        ),
        0
    );
    assert_eq!(
        exec_code(&container, &[APP_IN_IMAGE, "get", url]),
        1,
        "/healthz fails after /sick"
    );
    let network = format!("sluice-test-net-{}", std::process::id());
    let owner_label = format!("{OWNER_LABEL}={}", guard.owner());
    docker(&[
        "network",
        "create",
        "--label",
        images::TEST_LABEL,
        "--label",
        &owner_label,
        &network,
    ])
    .expect("network create");
    assert_eq!(images::owned_containers(guard.owner()).unwrap().len(), 1);
    assert_eq!(images::owned_networks(guard.owner()).unwrap().len(), 1);

    let owner = guard.owner().to_string();
    drop(guard);
    assert!(images::owned_containers(&owner).unwrap().is_empty());
    assert!(images::owned_networks(&owner).unwrap().is_empty());

    let id = image.id().to_string();
    drop(image);
    assert!(images::image_id(&id).is_err(), "the image is removed");
}

#[test]
fn a_retag_moves_the_tag_and_both_images_are_removed() {
    let a = TestImage::app().expect("image a");
    let mut b = TestImage::app_with(
        "sluice-test/app",
        ImageOptions {
            env: vec![("APP_VARIANT".into(), "b".into())],
            ..Default::default()
        },
    )
    .expect("image b");
    assert_ne!(a.id(), b.id(), "an ENV line makes another image");
    b.tag_as(&a).expect("docker tag");
    assert_eq!(images::image_id(a.tag()).unwrap(), b.id());
    assert_eq!(
        images::image_id(a.id()).unwrap(),
        a.id(),
        "a is still there, by ID"
    );
    let (a_id, b_id) = (a.id().to_string(), b.id().to_string());
    drop(a);
    drop(b);
    assert!(images::image_id(&a_id).is_err());
    assert!(images::image_id(&b_id).is_err());
}
