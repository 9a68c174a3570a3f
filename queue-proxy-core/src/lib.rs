//! Knative's queue-proxy decisions, pure (no host calls, time passed in), shared by the two builds of
//! the filter: the proxy-wasm module (wasm-filters/queue-proxy) and the Envoy dynamic module
//! (native-filters/queue-proxy). Kept out of both so the native library links no proxy-wasm code.
//!
//! [`config`] (the plugin configuration), [`breaker`] (containerConcurrency with a FIFO queue),
//! [`stats`] (the autoscaler's 1 s windows), [`readiness`] (the HTTP readiness probe's state),
//! [`request`] (probe or user request, from the headers), [`names`] (metric names).

pub mod breaker;
pub mod config;
pub mod names;
pub mod readiness;
pub mod request;
pub mod stats;
