//! `sluice xds` flags and helpers for running as one of several replicas: which gateways Ingresses wait
//! for, the Lease that picks the replica that writes status, and the signals that stop it.

use std::time::Duration;

use anyhow::{Context, Result};

// The defaults are knative.dev/pkg leaderelection's (`sluice_xds_server::lease::DEFAULT_*`) and
// `gateways::DEFAULT_ACK_TIMEOUT`; a test checks they agree.
use sluice_xds_server::lease::{DEFAULT_LEASE_NAME, LeaseConfig};

fn duration(s: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(s)
}

#[derive(clap::Args)]
pub struct ReplicaArgs {
    /// How long a gateway may go without applying the newest configuration before Ingresses stop
    /// waiting for it (it is then reported as NotAcking in `sluice status`, and counts again once it
    /// catches up).
    #[arg(long, value_parser = duration, default_value = "30s")]
    pub ack_timeout: Duration,
    /// With --kube: this replica's identity in the leader Lease (the pod name; default: the host name).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// With --kube: the coordination.k8s.io/v1 Lease whose holder writes KIngress status and probes.
    #[arg(long, default_value = DEFAULT_LEASE_NAME)]
    pub lease_name: String,
    /// The Lease's namespace (default: the pod's, from POD_NAMESPACE or the client's namespace).
    #[arg(long, env = "POD_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// How long the other replicas wait for an unrenewed Lease before taking it.
    #[arg(long, value_parser = duration, default_value = "60s")]
    pub lease_duration: Duration,
    /// The leader steps down when it could not renew for this long (shorter than --lease-duration).
    #[arg(long, value_parser = duration, default_value = "40s")]
    pub renew_deadline: Duration,
    /// How often the Lease is tried and renewed.
    #[arg(long, value_parser = duration, default_value = "10s")]
    pub retry_period: Duration,
}

impl ReplicaArgs {
    pub fn lease_config(&self, client: &kube::Client) -> Result<LeaseConfig> {
        let identity = match &self.identity {
            Some(id) if !id.is_empty() => id.clone(),
            _ => hostname().context("no --identity or POD_NAME, and no host name")?,
        };
        let config = LeaseConfig {
            namespace: self
                .lease_namespace
                .clone()
                .filter(|ns| !ns.is_empty())
                .unwrap_or_else(|| client.default_namespace().to_string()),
            name: self.lease_name.clone(),
            identity,
            lease_duration: self.lease_duration,
            renew_deadline: self.renew_deadline,
            retry_period: self.retry_period,
        };
        config.validate()?;
        Ok(config)
    }
}

fn hostname() -> Option<String> {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty())
        })
}

/// Completes on SIGTERM (what Kubernetes sends) or SIGINT.
pub async fn shutdown_signal() -> Result<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        replicas: ReplicaArgs,
    }

    #[test]
    fn defaults_are_the_libraries() {
        let cli = Cli::parse_from(["x"]);
        let r = cli.replicas;
        assert_eq!(
            r.ack_timeout,
            sluice_xds_server::gateways::DEFAULT_ACK_TIMEOUT
        );
        assert_eq!(
            r.lease_duration,
            sluice_xds_server::lease::DEFAULT_LEASE_DURATION
        );
        assert_eq!(
            r.renew_deadline,
            sluice_xds_server::lease::DEFAULT_RENEW_DEADLINE
        );
        assert_eq!(
            r.retry_period,
            sluice_xds_server::lease::DEFAULT_RETRY_PERIOD
        );
        let cli = Cli::parse_from(["x", "--lease-duration", "2s", "--retry-period", "300ms"]);
        assert_eq!(cli.replicas.lease_duration, Duration::from_secs(2));
        assert_eq!(cli.replicas.retry_period, Duration::from_millis(300));
    }
}
