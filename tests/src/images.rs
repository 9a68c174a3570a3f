//! Container images for the container tests, built locally (no registry: nothing is ever pulled), and
//! guards that remove what a test left on the engine.
//!
//! - [`test_app_musl`]: `sluice-test-app` as a static binary (`x86_64-unknown-linux-musl`), built once
//!   per test process from the `sluice-test-app-static` package (tests/static-app): the same source
//!   with only its own pure-Rust dependencies, so no musl-gcc is needed (this crate's `ring`, through
//!   rustls, would need one).
//! - [`TestImage`]: a `FROM scratch` image holding that binary under a tag unique to the test
//!   (`sluice-test/app:<pid>-<n>`), labelled `sluice.test=1`; removed on Drop. [`TestImage::tag_as`]
//!   re-points another image's tag at this one (the re-tag test).
//! - [`EngineLeftovers`]: on Drop, removes every container and network whose `sluice.owner` label names
//!   the test's state dir, so a failed test leaves nothing running.
//!
//! The tests talk to the engine through the docker CLI (Sluice itself uses the engine's API).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result, bail};

use crate::sluice::workspace_root;

/// The static target the test app is built for: it runs in a `FROM scratch` image.
pub const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";
/// The label every image this module builds carries.
pub const TEST_LABEL: &str = "sluice.test=1";
/// Where the app sits in the images (their ENTRYPOINT); exec probes run it too.
pub const APP_IN_IMAGE: &str = "/sluice-test-app";
/// The label the container runtime puts on every container and network of a `sluice up` run: the
/// run's canonical state dir.
pub const OWNER_LABEL: &str = "sluice.owner";

/// Runs `docker ARGS`; an error quoting its stderr when it fails.
pub fn docker(args: &[&str]) -> Result<String> {
    let out = docker_output(args)?;
    if !out.status.success() {
        bail!(
            "docker {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn docker_output(args: &[&str]) -> Result<Output> {
    Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running the docker CLI (bash scripts/setup installs it)")
}

/// Whether a container engine answers (`docker info`).
pub fn engine_answers() -> bool {
    docker_output(&["info", "--format", "{{.ServerVersion}}"]).is_ok_and(|o| o.status.success())
}

/// The workspace's target folder (`CARGO_TARGET_DIR` honoured).
fn target_dir() -> PathBuf {
    let root = workspace_root();
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|t| if t.is_absolute() { t } else { root.join(t) })
        .unwrap_or_else(|| root.join("target"))
}

/// The static `sluice-test-app` (release, musl): built once per test process with cargo (a no-op
/// when it is fresh). `$SLUICE_TEST_APP_MUSL` names a prebuilt one instead.
pub fn test_app_musl() -> Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| build_test_app_musl().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn build_test_app_musl() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("SLUICE_TEST_APP_MUSL").filter(|v| !v.is_empty()) {
        let bin = PathBuf::from(bin);
        anyhow::ensure!(
            bin.is_file(),
            "SLUICE_TEST_APP_MUSL={} is not a file",
            bin.display()
        );
        return Ok(bin);
    }
    let args = [
        "build",
        "--release",
        "--target",
        MUSL_TARGET,
        "-p",
        "sluice-test-app-static",
    ];
    let status = crate::cargo()
        .args(args)
        .current_dir(workspace_root())
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    anyhow::ensure!(
        status.success(),
        "cargo {} failed ({status}); is the target installed (`rustup target add {MUSL_TARGET}`, \
         which scripts/setup does)?",
        args.join(" ")
    );
    let bin = target_dir()
        .join(MUSL_TARGET)
        .join("release")
        .join("sluice-test-app-static");
    anyhow::ensure!(
        bin.is_file(),
        "{} is missing after the build",
        bin.display()
    );
    Ok(bin)
}

/// A tag no other test (of this process or another) uses: `<repository>:<pid>-<n>`.
pub fn unique_tag(repository: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{repository}:{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    )
}

/// What goes into a test image beside the app.
#[derive(Debug, Clone, Default)]
pub struct ImageOptions {
    /// `ENV` lines: baked into the image, so two images of the same app differ (their IDs too).
    pub env: Vec<(String, String)>,
    /// Extra labels (beside `sluice.test=1` and `sluice.test.tag=<tag>`).
    pub labels: Vec<(String, String)>,
}

/// The Dockerfile of a test image: the static app alone, listening on every address of the
/// container's network (it is reached on the container's IP, not on loopback).
pub fn dockerfile(options: &ImageOptions) -> String {
    let mut out = format!(
        "FROM scratch\nCOPY sluice-test-app {APP_IN_IMAGE}\nENV APP_BIND=0.0.0.0\n\
         ENTRYPOINT [\"{APP_IN_IMAGE}\"]\n"
    );
    for (key, value) in &options.env {
        out.push_str(&format!("ENV {key}={}\n", quote(value)));
    }
    out
}

/// A Dockerfile string literal (JSON's quoting is Docker's).
fn quote(value: &str) -> String {
    serde_json::to_string(value).expect("a string serializes")
}

/// Builds `tag` from `binary` with the Dockerfile of `options`, in a temp context folder. Returns the
/// image ID (`sha256:...`).
pub fn build_image(binary: &Path, tag: &str, options: &ImageOptions) -> Result<String> {
    let context = tempfile::Builder::new().prefix("sluice-image-").tempdir()?;
    std::fs::copy(binary, context.path().join("sluice-test-app"))
        .with_context(|| format!("copying {}", binary.display()))?;
    std::fs::write(context.path().join("Dockerfile"), dockerfile(options))?;
    let mut args: Vec<String> = vec![
        "build".into(),
        "--quiet".into(),
        "--label".into(),
        TEST_LABEL.into(),
        "--label".into(),
        format!("sluice.test.tag={tag}"),
        "--tag".into(),
        tag.into(),
    ];
    for (key, value) in &options.labels {
        args.extend(["--label".into(), format!("{key}={value}")]);
    }
    args.push(context.path().display().to_string());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    docker_build_retrying(&args, &format!("-t {tag}"))?;
    image_id(tag)
}

/// `docker build ARGS` with the classic builder: nothing to pull for FROM scratch, and BuildKit
/// (buildx) may be missing. Concurrent classic builds of the same layers can trip over each other on
/// this engine (tests run in parallel, other test processes too): a failed build is tried again,
/// twice. `what` names the build in errors.
pub fn docker_build_retrying(args: &[&str], what: &str) -> Result<()> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let out = Command::new("docker")
            .args(args)
            .env("DOCKER_BUILDKIT", "0")
            .stdin(Stdio::null())
            .output()
            .context("running docker build")?;
        if out.status.success() {
            return Ok(());
        }
        let err = String::from_utf8_lossy(&out.stderr);
        if attempt >= 3 {
            bail!("docker build {what}: {}", err.trim());
        }
        eprintln!("docker build {what} failed (attempt {attempt}), trying again: {err}");
    }
}

/// The engine's ID of image `reference` (`sha256:...`).
pub fn image_id(reference: &str) -> Result<String> {
    docker(&["image", "inspect", "--format", "{{.Id}}", reference])
}

/// A test image: removed (every tag this guard gave it, then the image) on Drop.
pub struct TestImage {
    tag: String,
    id: String,
    /// More tags pointed at this image ([`TestImage::tag_as`]); removed with it.
    extra_tags: Vec<String>,
    /// What it was built with, for [`TestImage::rebuild`].
    options: ImageOptions,
}

impl TestImage {
    /// The test app in a scratch image under a fresh tag in repository `sluice-test/app`.
    pub fn app() -> Result<TestImage> {
        TestImage::app_with("sluice-test/app", ImageOptions::default())
    }

    /// The test app in a scratch image under a fresh tag in `repository`, with `options`.
    pub fn app_with(repository: &str, options: ImageOptions) -> Result<TestImage> {
        let binary = test_app_musl()?;
        let tag = unique_tag(repository);
        let id = build_image(&binary, &tag, &options)?;
        Ok(TestImage {
            tag,
            id,
            extra_tags: Vec::new(),
            options,
        })
    }

    /// The tag (`repository:pid-n`), what a Service's `image` names.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The engine's image ID (`sha256:...`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Removes the image from the engine (`docker rmi -f` of its tag), as a user cleaning up would.
    pub fn remove(&self) -> Result<()> {
        docker(&["rmi", "--force", &self.tag]).map(drop)
    }

    /// Builds the same image under the same tag again (after [`TestImage::remove`]): a new image ID
    /// (the classic builder stamps the build time), which this guard now removes.
    pub fn rebuild(&mut self) -> Result<()> {
        self.id = build_image(&test_app_musl()?, &self.tag, &self.options)?;
        Ok(())
    }

    /// Points `other`'s tag at this image (`docker tag`), as a user re-pushing a tag would: `other`
    /// keeps its ID, now untagged unless something else names it.
    pub fn tag_as(&mut self, other: &TestImage) -> Result<()> {
        docker(&["tag", &self.id, &other.tag])?;
        self.extra_tags.push(other.tag.clone());
        Ok(())
    }
}

impl Drop for TestImage {
    fn drop(&mut self) {
        // Tags first (another image may still hold one of them), then the image by ID. Failures are
        // only reported: a container still using the image keeps it, and its guard removes that.
        for tag in std::iter::once(&self.tag).chain(&self.extra_tags) {
            if image_id(tag).is_ok_and(|id| id == self.id) {
                let _ = docker_output(&["rmi", tag]);
            }
        }
        if let Ok(out) = docker_output(&["rmi", "--force", &self.id])
            && !out.status.success()
        {
            let err = String::from_utf8_lossy(&out.stderr);
            if !err.contains("No such image") {
                eprintln!("removing test image {}: {}", self.id, err.trim());
            }
        }
    }
}

/// The containers whose `sluice.owner` label is `owner`: (ID, name, labels as `k=v,...`).
pub fn owned_containers(owner: &str) -> Result<Vec<String>> {
    let filter = format!("label={OWNER_LABEL}={owner}");
    let out = docker(&["ps", "--all", "--quiet", "--filter", &filter])?;
    Ok(out.lines().map(str::to_string).collect())
}

/// The containers of `owner` that also carry label `key=value` (e.g. `sluice.revision=hello-00001`).
pub fn owned_containers_with(owner: &str, key: &str, value: &str) -> Result<Vec<String>> {
    let owner = format!("label={OWNER_LABEL}={owner}");
    let other = format!("label={key}={value}");
    let out = docker(&[
        "ps", "--all", "--quiet", "--filter", &owner, "--filter", &other,
    ])?;
    Ok(out.lines().map(str::to_string).collect())
}

/// The running containers of `owner` with label `key=value`.
pub fn running_containers_with(owner: &str, key: &str, value: &str) -> Result<Vec<String>> {
    let owner = format!("label={OWNER_LABEL}={owner}");
    let other = format!("label={key}={value}");
    let out = docker(&[
        "ps",
        "--quiet",
        "--filter",
        &owner,
        "--filter",
        &other,
        "--filter",
        "status=running",
    ])?;
    Ok(out.lines().map(str::to_string).collect())
}

/// The networks whose `sluice.owner` label is `owner`.
pub fn owned_networks(owner: &str) -> Result<Vec<String>> {
    let filter = format!("label={OWNER_LABEL}={owner}");
    let out = docker(&["network", "ls", "--quiet", "--filter", &filter])?;
    Ok(out.lines().map(str::to_string).collect())
}

/// Removes every container and network labelled with `owner` (a `sluice up` run's state dir).
pub fn remove_owned(owner: &str) -> Result<()> {
    let containers = owned_containers(owner)?;
    if !containers.is_empty() {
        let mut args = vec!["rm", "--force", "--volumes"];
        args.extend(containers.iter().map(String::as_str));
        docker(&args)?;
    }
    let networks = owned_networks(owner)?;
    if !networks.is_empty() {
        let mut args = vec!["network", "rm"];
        args.extend(networks.iter().map(String::as_str));
        docker(&args)?;
    }
    Ok(())
}

/// On Drop, removes every container and network of the `sluice up` run whose state dir is `owner`,
/// even when the test failed. Declare it before the [`crate::Sluice`] it cleans after (locals drop in
/// reverse order), so `sluice up` has stopped first.
pub struct EngineLeftovers {
    owner: String,
}

impl EngineLeftovers {
    /// For the run whose (canonical) state dir is `state_dir`.
    pub fn new(state_dir: &Path) -> EngineLeftovers {
        EngineLeftovers {
            owner: state_dir.display().to_string(),
        }
    }

    /// The `sluice.owner` label value.
    pub fn owner(&self) -> &str {
        &self.owner
    }
}

impl Drop for EngineLeftovers {
    fn drop(&mut self) {
        if let Err(e) = remove_owned(&self.owner) {
            eprintln!("removing the containers of {}: {e:#}", self.owner);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dockerfile_runs_the_app_alone_on_every_address() {
        let file = dockerfile(&ImageOptions {
            env: vec![("APP_VARIANT".into(), "b \"2\"".into())],
            ..Default::default()
        });
        assert_eq!(
            file,
            "FROM scratch\nCOPY sluice-test-app /sluice-test-app\nENV APP_BIND=0.0.0.0\n\
             ENTRYPOINT [\"/sluice-test-app\"]\nENV APP_VARIANT=\"b \\\"2\\\"\"\n"
        );
    }

    #[test]
    fn unique_tags_differ_within_a_process() {
        let a = unique_tag("sluice-test/app");
        let b = unique_tag("sluice-test/app");
        assert_ne!(a, b);
        assert!(a.starts_with(&format!("sluice-test/app:{}-", std::process::id())));
    }
}
