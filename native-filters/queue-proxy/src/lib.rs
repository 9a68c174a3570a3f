//! Knative's queue-proxy as an Envoy dynamic module: the same pure core as the proxy-wasm filter
//! (`sluice_queue_proxy`: configuration, breaker, autoscaler windows, probes, metric names), run as
//! native code inside Envoy's workers. See README.md.
//!
//! [`instance`] is the shared per-instance state (pure, unit-tested); [`abi`] declares the Envoy 1.40
//! dynamic-module ABI this module uses; [`module`] is the glue Envoy calls.

pub mod instance;

#[allow(unsafe_code)]
pub mod abi;
#[allow(unsafe_code)]
mod module;
