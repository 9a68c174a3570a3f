//! Knative's queue-proxy as a proxy-wasm HTTP filter for Envoy: the breaker that holds an instance to
//! its containerConcurrency (queueing the excess), the autoscaler's metrics as Envoy stats, and the
//! Knative probes. See wasm-filters/README.md for the metric names and configuration keys.
//!
//! The decisions live in `sluice-queue-proxy-core` (queue-proxy-core/), shared with the native build
//! and re-exported here: [`config`], [`breaker`], [`stats`], [`readiness`], [`request`], [`names`].
//! [`filter`] is the proxy-wasm glue.

pub use sluice_queue_proxy_core::{breaker, config, names, readiness, request, stats};

pub mod filter;

// The VM's entry point, only in the .wasm: natively there is no host to call.
#[cfg(target_arch = "wasm32")]
mod entry {
    proxy_wasm::main! {{
        crate::filter::start();
    }}
}
