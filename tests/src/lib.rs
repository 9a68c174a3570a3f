//! End-to-end harness for Sluice: the real `sluice` binary with a real Envoy, driven through a folder of
//! Knative YAML, and the backends Knative's KIngress conformance suite uses, run in-process on loopback.
//!
//! - [`sluice::Sluice`]: a temp folder + `sluice up` on free ports (killed on Drop, logs printed on panic),
//!   `wait_ready` on the control API, and the gateway's addresses.
//! - [`client`]: HTTP/1.1, h2c and HTTPS requests to the gateway with a given Host.
//! - [`yaml`]: builders for Ingress, Service, Endpoints and Secret objects.
//! - [`images`]: `FROM scratch` images of the test app (static musl build), and guards that remove
//!   test images and a run's containers from the engine; [`containers`]: the container tests' fixture.
//! - [`cluster`]: Sluice's own images from docker/ and a cluster's container topology; [`manifests`]:
//!   manifests/ as typed Kubernetes objects.
//! - [`backends`]: the echo (HTTP/1.1 + h2c), websocket and gRPC-style streaming backends, and TLS material.
//!
//! Errors are `anyhow`: this crate is only ever used by tests, which print them.

pub mod backends;
pub mod body;
pub mod client;
pub mod cluster;
pub mod containers;
pub mod images;
pub mod knative;
pub mod manifests;
pub mod ports;
pub mod process;
pub mod queue_proxy;
pub mod sluice;
pub mod tls;
pub mod yaml;

pub use backends::echo::{Echo, EchoOptions, EchoServer};
pub use backends::grpc::{GrpcClient, GrpcEchoServer, GrpcStream};
pub use backends::websocket::{WebsocketClient, WebsocketEchoServer};
pub use client::{Conn, Proto, Req, Resp};
pub use ports::free_port;
pub use sluice::{Condition, Sluice, StartOptions};

/// `cargo` for a build a test needs (the binary under test, an image's contents), as a shell runs
/// it: without the variables `cargo test` sets for the test process (`CARGO_PKG_NAME`,
/// `CARGO_MANIFEST_DIR`...). Build scripts that watch those (ring's) would otherwise see them change
/// and rebuild what scripts/test has just built.
pub fn cargo() -> std::process::Command {
    let mut cmd =
        std::process::Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let set_by_cargo_test = key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_BIN_EXE_")
            || matches!(
                key,
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_MANIFEST_LINKS"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
                    | "CARGO_RUSTC_CURRENT_DIR"
                    | "OUT_DIR"
            );
        if set_by_cargo_test {
            cmd.env_remove(key);
        }
    }
    cmd
}
