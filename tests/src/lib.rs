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
