//! The path to subscribers through Sluice's own gateway (Envoy), in `sluice up`: delivery to a
//! Service waits until that path is served, and a failure that is the gateway's own (not up yet,
//! route not programmed yet, no endpoints yet, activator not knowing the revision yet) is not the
//! subscriber's: it is retried without counting as a delivery attempt (issue 12, item 1: after a
//! restart, deliveries began before Envoy was up and each event's only attempt was refused).
//!
//! [`GatewayPaths`] and [`blame`] are pure; [`PathGate`] waits on a `watch` of the paths, which
//! `sluice up` feeds from the KIngress statuses (a Ready KIngress was probed through the gateway's
//! listener, so the route to its hosts is served).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::watch;

use crate::config::Target;
use crate::delivery::sender::{NoResponse, Response};

/// Which hosts the gateway serves.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GatewayPaths {
    /// The gateway is up and serves its listeners (`sluice up`: the broker ingress's own KIngress is
    /// Ready, i.e. was probed through the external listener).
    pub live: bool,
    /// Every host (lowercase, without port) of an external KIngress rule, and whether that KIngress
    /// is Ready.
    pub hosts: HashMap<String, bool>,
}

impl GatewayPaths {
    /// Whether a request for `host` (a Host header, port allowed) can be served now. `required`: the
    /// host must belong to a Ready KIngress (a Knative Service's host); otherwise a host no KIngress
    /// claims passes once the gateway is live (it is not ours to wait for).
    pub fn serves(&self, host: &str, required: bool) -> bool {
        if !self.live {
            return false;
        }
        match self.hosts.get(&host_name(host)) {
            Some(ready) => *ready,
            None => !required,
        }
    }
}

/// `host[:port]` -> lowercase host.
fn host_name(host: &str) -> String {
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    name.to_ascii_lowercase()
}

/// Whose failure an attempt through the gateway was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    Subscriber,
    /// Sluice's own: the gateway or the activator was not ready for this request.
    Gateway,
}

/// Envoy adds this to every response that came from an upstream; its local replies lack it.
const UPSTREAM_TIME: &str = "x-envoy-upstream-service-time";
/// Envoy's local reply when the cluster has no endpoint yet (response flag UH).
const NO_HEALTHY_UPSTREAM: &[u8] = b"no healthy upstream";
/// The activator's answer for a revision it does not know yet (Knative's own wording).
const ACTIVATOR_NO_ENDPOINT: &[u8] = b"Error getting active endpoint";

/// Decides whether a failed attempt through the gateway was the subscriber's. Ours: the gateway
/// refused the connection (Envoy not up); Envoy answered by itself 404 with no body (NR: the route
/// is not programmed yet) or 503 "no healthy upstream" (UH: no endpoint yet); the activator did not
/// know the revision yet. Everything else, including Envoy's "upstream connect error" (the
/// subscriber's instance failed), is the subscriber's.
pub fn blame(result: &Result<Response, NoResponse>) -> Blame {
    let ours = match result {
        Err(no_response) => no_response.refused,
        Ok(r) => {
            let local = !r.headers.contains_key(UPSTREAM_TIME);
            (local && r.status == 404 && r.body.is_empty())
                || (local && r.status == 503 && r.body.starts_with(NO_HEALTHY_UPSTREAM))
                || (r.status == 404 && r.body.starts_with(ACTIVATOR_NO_ENDPOINT))
        }
    };
    if ours {
        Blame::Gateway
    } else {
        Blame::Subscriber
    }
}

/// The pause before trying again after the gateway's own failure number `n` (1-based): 50 ms
/// doubling, at most 1 s. It is not a delivery attempt and does not follow the retry policy.
pub fn gateway_backoff(n: u32) -> Duration {
    Duration::from_millis(50u64.saturating_mul(1 << n.saturating_sub(1).min(5)))
        .min(Duration::from_secs(1))
}

/// Whether a URI goes to the gateway at `gateway`: its address, or a `localhost` name on its port
/// (`*.localhost` resolves to loopback) while the gateway listens on loopback.
pub fn via_gateway(uri: &http::Uri, gateway: SocketAddr) -> bool {
    let Some(host) = uri.host() else {
        return false;
    };
    let port = uri.port_u16().unwrap_or(80);
    if port != gateway.port() {
        return false;
    }
    let host = host.trim_matches(['[', ']']).to_ascii_lowercase();
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => ip == gateway.ip() || (ip.is_loopback() && gateway.ip().is_unspecified()),
        Err(_) => {
            (host == "localhost" || host.ends_with(".localhost"))
                && (gateway.ip().is_loopback() || gateway.ip().is_unspecified())
        }
    }
}

/// The gateway as the dispatchers see it: where it listens and which paths it serves.
#[derive(Debug, Clone)]
pub struct Gateway {
    pub address: SocketAddr,
    pub paths: watch::Receiver<GatewayPaths>,
}

impl Gateway {
    /// The gate for deliveries to `target`, when they go through the gateway.
    pub fn gate(&self, target: &Target) -> Option<PathGate> {
        let Target::Http { uri, host, .. } = target else {
            return None;
        };
        match host {
            // A Knative Service: its KIngress must be Ready.
            Some(host) => Some(PathGate {
                paths: self.paths.clone(),
                host: host.clone(),
                required: true,
            }),
            None if via_gateway(uri, self.address) => Some(PathGate {
                paths: self.paths.clone(),
                host: uri.authority().map(|a| a.to_string()).unwrap_or_default(),
                required: false,
            }),
            None => None,
        }
    }
}

/// Waits until the gateway serves one destination.
#[derive(Debug, Clone)]
pub struct PathGate {
    paths: watch::Receiver<GatewayPaths>,
    host: String,
    required: bool,
}

impl PathGate {
    /// Returns once the path is served (at once when it is; also when the gateway's state is no
    /// longer fed, i.e. shutting down).
    pub async fn ready(&mut self) {
        let PathGate {
            paths,
            host,
            required,
        } = self;
        if !paths.borrow().serves(host, *required) {
            tracing::debug!(%host, "waiting for the gateway to serve the subscriber");
            let _ = paths.wait_for(|p| p.serves(host, *required)).await;
        }
    }

    pub fn host(&self) -> &str {
        &self.host
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::HeaderMap;

    fn paths(live: bool, hosts: &[(&str, bool)]) -> GatewayPaths {
        GatewayPaths {
            live,
            hosts: hosts.iter().map(|(h, r)| (h.to_string(), *r)).collect(),
        }
    }

    #[test]
    fn a_path_is_served_once_the_gateway_is_live_and_its_kingress_ready() {
        let p = paths(
            true,
            &[
                ("web.default.localhost", true),
                ("new.default.localhost", false),
            ],
        );
        for (host, required, want) in [
            ("web.default.localhost:8080", true, true),
            ("WEB.default.localhost", true, true),
            ("new.default.localhost:8080", true, false),
            ("new.default.localhost:8080", false, false),
            ("missing.default.localhost:8080", true, false),
            ("elsewhere.example:8080", false, true),
        ] {
            assert_eq!(p.serves(host, required), want, "{host} required={required}");
        }
        let down = paths(false, &[("web.default.localhost", true)]);
        assert!(!down.serves("web.default.localhost:8080", true));
        assert!(!down.serves("elsewhere.example", false));
    }

    fn response(
        status: u16,
        headers: &[(&'static str, &'static str)],
        body: &'static str,
    ) -> Result<Response, NoResponse> {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.insert(*k, v.parse().unwrap());
        }
        Ok(Response {
            status,
            headers: map,
            body: Bytes::from_static(body.as_bytes()),
        })
    }

    #[test]
    fn only_the_gateways_and_activators_own_failures_are_blamed_on_the_gateway() {
        let upstream = [(UPSTREAM_TIME, "3"), ("server", "envoy")];
        let local = [("server", "envoy")];
        let refused = Err(NoResponse {
            refused: true,
            why: "connection refused".into(),
        });
        let reset = Err(NoResponse {
            refused: false,
            why: "connection reset".into(),
        });
        for (result, want) in [
            (refused, Blame::Gateway),
            (reset, Blame::Subscriber),
            (response(404, &local, ""), Blame::Gateway),
            (response(404, &upstream, ""), Blame::Subscriber),
            (response(404, &local, "not here"), Blame::Subscriber),
            (response(503, &local, "no healthy upstream"), Blame::Gateway),
            (
                response(503, &upstream, "no healthy upstream"),
                Blame::Subscriber,
            ),
            (
                response(
                    503,
                    &local,
                    "upstream connect error or disconnect/reset before headers",
                ),
                Blame::Subscriber,
            ),
            (
                response(
                    404,
                    &upstream,
                    "Error getting active endpoint: revision default/web-00001 not found",
                ),
                Blame::Gateway,
            ),
            (response(500, &upstream, "boom"), Blame::Subscriber),
            (response(200, &upstream, ""), Blame::Subscriber),
        ] {
            assert_eq!(blame(&result), want, "{result:?}");
        }
    }

    #[test]
    fn gateway_backoff_doubles_from_50ms_to_1s() {
        let ms = |n| Duration::from_millis(n);
        let got: Vec<Duration> = (1..=8).map(gateway_backoff).collect();
        assert_eq!(
            got,
            [
                ms(50),
                ms(100),
                ms(200),
                ms(400),
                ms(800),
                ms(1000),
                ms(1000),
                ms(1000)
            ]
        );
    }

    #[test]
    fn uris_to_the_gateway_are_recognised() {
        let gw: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        for (uri, want) in [
            ("http://127.0.0.1:8080/", true),
            ("http://web.default.localhost:8080/x", true),
            ("http://localhost:8080", true),
            ("http://127.0.0.1:9000/", false),
            ("http://10.0.0.1:8080/", false),
            ("http://example.com:8080/", false),
            ("http://web.default.localhost/", false),
        ] {
            assert_eq!(via_gateway(&uri.parse().unwrap(), gw), want, "{uri}");
        }
    }
}
