//! Which gateways an Ingress must be served by before it is Ready: pure, so every case is unit-tested.
//!
//! Knative's networking layers (net-kourier's status manager) call an Ingress Ready once every gateway
//! pod serves it. Sluice asks the same of every gateway connected over ADS, with one bound: a gateway
//! that has been behind (not ACKed the newest configuration) for longer than `ack_timeout` is *stale*
//! and no longer counted, so one frozen or broken Envoy cannot keep every Ingress from Ready. It is
//! reported instead, and counts again as soon as it catches up. When every connected gateway is stale
//! the fault is more likely the configuration than the gateways (a NACK all of them send), so then all
//! of them count and Ingresses wait, showing Envoy's words.
//!
//! "Behind since" is when the first generation the gateway has not ACKed was published (or when it
//! connected, if later): time is a parameter, never read here.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::ads::GatewayStatus;

/// Knative's default probe budget is similar; long enough for a gateway under load to apply a big
/// update, short enough that one stuck gateway does not hold Ingresses back for long.
pub const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_secs(30);

/// One gateway and what the controller makes of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assessed {
    pub gateway: GatewayStatus,
    /// Since when it has been behind the newest generation; None when it runs the newest.
    pub behind_since: Option<Instant>,
    /// Behind for longer than the bound.
    pub stale: bool,
    /// Counted for readiness: every Ingress must be served by it.
    pub counted: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Assessment {
    pub gateways: Vec<Assessed>,
    /// When a gateway that is behind now turns stale (the controller re-assesses then).
    pub next_check: Option<Instant>,
}

/// Assesses the connected gateways against `newest`, the generation served now. `published` holds
/// when each recent generation was first served.
pub fn assess(
    gateways: &[GatewayStatus],
    newest: u64,
    published: &BTreeMap<u64, Instant>,
    now: Instant,
    ack_timeout: Duration,
) -> Assessment {
    let mut out: Vec<Assessed> = gateways
        .iter()
        .map(|g| {
            let behind_since =
                (newest > 0 && g.acked_generation.is_none_or(|a| a < newest)).then(|| {
                    let next = g.acked_generation.map_or(1, |a| a + 1);
                    let since = published
                        .range(next..)
                        .next()
                        .map(|(_, at)| *at)
                        .unwrap_or(g.connected_at);
                    since.max(g.connected_at)
                });
            let stale = behind_since.is_some_and(|since| now >= since + ack_timeout);
            Assessed {
                gateway: g.clone(),
                behind_since,
                stale,
                counted: !stale,
            }
        })
        .collect();
    if out.iter().all(|a| a.stale) {
        for a in &mut out {
            a.counted = true;
        }
    }
    let next_check = out
        .iter()
        .filter(|a| !a.stale)
        .filter_map(|a| a.behind_since)
        .map(|since| since + ack_timeout)
        .min();
    Assessment {
        gateways: out,
        next_check,
    }
}

impl Assessment {
    pub fn counted(&self) -> impl Iterator<Item = &GatewayStatus> {
        self.gateways
            .iter()
            .filter(|a| a.counted)
            .map(|a| &a.gateway)
    }

    /// The newest generation every counted gateway has applied; None with no counted gateway.
    pub fn acked_generation(&self) -> Option<u64> {
        let mut counted = self.counted().map(|g| g.acked_generation).peekable();
        counted.peek()?;
        counted.min().flatten()
    }

    /// What `sluice status` shows of each gateway.
    pub fn report(&self, now: Instant) -> Vec<GatewayReport> {
        self.gateways
            .iter()
            .map(|a| {
                let g = &a.gateway;
                let behind = a.behind_since.map(|s| now.saturating_duration_since(s));
                let (state, message) = match (a.stale, a.counted, behind) {
                    (_, _, None) => ("Serving", String::new()),
                    (true, false, Some(d)) => (
                        "NotAcking",
                        format!(
                            "has not applied the newest configuration for {}s: not counted for readiness until it does",
                            d.as_secs()
                        ),
                    ),
                    (true, true, Some(d)) => (
                        "NotAcking",
                        format!(
                            "has not applied the newest configuration for {}s (no gateway has: still counted)",
                            d.as_secs()
                        ),
                    ),
                    (false, _, Some(_)) => ("Syncing", String::new()),
                };
                let message = match (&g.nack, message.is_empty()) {
                    (Some(nack), true) => nack.clone(),
                    (Some(nack), false) => format!("{message}; {nack}"),
                    (None, _) => message,
                };
                GatewayReport {
                    node: g.node.clone(),
                    peer: g.peer.map(|p| p.to_string()).unwrap_or_default(),
                    acked_generation: g.acked_generation,
                    state: state.to_string(),
                    counted: a.counted,
                    message,
                }
            })
            .collect()
    }
}

/// One gateway in the control API's status (`sluice status`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayReport {
    /// Envoy's node id.
    pub node: String,
    /// The ADS stream's peer address.
    pub peer: String,
    pub acked_generation: Option<u64>,
    /// `Serving` (runs the newest configuration), `Syncing` (behind, within the bound) or
    /// `NotAcking` (behind for longer than the bound).
    pub state: String,
    /// Whether Ingresses wait for it.
    pub counted: bool,
    pub message: String,
}

/// Forgets publish times no gateway can still be waiting on (keeps the newest).
pub fn prune_published(published: &mut BTreeMap<u64, Instant>, gateways: &[GatewayStatus]) {
    let Some(oldest) = gateways
        .iter()
        .map(|g| g.acked_generation.unwrap_or(0))
        .min()
    else {
        // Nobody connected: a gateway that connects later waits from when it connected.
        let newest = published.pop_last();
        published.clear();
        published.extend(newest);
        return;
    };
    let newest = published.keys().next_back().copied();
    published.retain(|g, _| *g > oldest || Some(*g) == newest);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gw(stream: u64, connected_at: Instant, acked: Option<u64>) -> GatewayStatus {
        GatewayStatus {
            stream,
            node: format!("node-{stream}"),
            peer: Some(format!("10.0.0.{stream}:4000").parse().unwrap()),
            connected_at,
            acked_generation: acked,
            nack: None,
        }
    }

    const BOUND: Duration = Duration::from_secs(30);

    fn counted(a: &Assessment) -> Vec<u64> {
        a.counted().map(|g| g.stream).collect()
    }

    #[test]
    fn a_gateway_behind_for_longer_than_the_bound_is_not_counted() {
        let t0 = Instant::now();
        let published = BTreeMap::from([(1, t0), (2, t0 + Duration::from_secs(10))]);
        let gateways = [gw(1, t0, Some(2)), gw(2, t0, Some(1))];
        // Behind since generation 2 was published (t0 + 10 s).
        let a = assess(
            &gateways,
            2,
            &published,
            t0 + Duration::from_secs(39),
            BOUND,
        );
        assert_eq!(counted(&a), [1, 2], "within the bound");
        assert_eq!(a.next_check, Some(t0 + Duration::from_secs(40)));
        assert_eq!(a.acked_generation(), Some(1));
        let a = assess(
            &gateways,
            2,
            &published,
            t0 + Duration::from_secs(40),
            BOUND,
        );
        assert_eq!(counted(&a), [1], "stale");
        assert_eq!(a.next_check, None);
        assert_eq!(a.acked_generation(), Some(2));
        let report = a.report(t0 + Duration::from_secs(40));
        assert_eq!(report[0].state, "Serving");
        assert_eq!(
            (
                report[1].state.as_str(),
                report[1].counted,
                report[1].node.as_str()
            ),
            ("NotAcking", false, "node-2")
        );
        assert!(report[1].message.contains("30s"), "{}", report[1].message);
        // It catches up: counted again.
        let caught_up = [gw(1, t0, Some(2)), gw(2, t0, Some(2))];
        let a = assess(
            &caught_up,
            2,
            &published,
            t0 + Duration::from_secs(90),
            BOUND,
        );
        assert_eq!(counted(&a), [1, 2]);
    }

    #[test]
    fn a_gateway_that_never_acks_is_stale_from_when_it_connected() {
        let t0 = Instant::now();
        let published = BTreeMap::from([(5, t0)]);
        let late = t0 + Duration::from_secs(100);
        let gateways = [gw(1, t0, Some(5)), gw(2, late, None)];
        let a = assess(
            &gateways,
            5,
            &published,
            late + Duration::from_secs(29),
            BOUND,
        );
        assert_eq!(counted(&a), [1, 2], "a newcomer gets the bound to catch up");
        let a = assess(&gateways, 5, &published, late + BOUND, BOUND);
        assert_eq!(counted(&a), [1]);
    }

    #[test]
    fn when_every_gateway_is_stale_all_count() {
        let t0 = Instant::now();
        let published = BTreeMap::from([(1, t0), (2, t0)]);
        let mut rejecting = gw(2, t0, Some(1));
        rejecting.nack = Some("Envoy \"node-2\" rejected routes: bad".into());
        let gateways = [gw(1, t0, Some(1)), rejecting];
        let a = assess(&gateways, 2, &published, t0 + BOUND, BOUND);
        assert_eq!(
            counted(&a),
            [1, 2],
            "the configuration, not a gateway, is at fault"
        );
        assert_eq!(a.acked_generation(), Some(1));
        let report = a.report(t0 + BOUND);
        assert!(
            report[1].message.ends_with("rejected routes: bad"),
            "{report:?}"
        );
    }

    #[test]
    fn no_gateway_means_nothing_counted() {
        let a = assess(&[], 3, &BTreeMap::new(), Instant::now(), BOUND);
        assert_eq!(a.acked_generation(), None);
        assert!(a.gateways.is_empty());
    }

    #[test]
    fn publish_times_are_kept_only_while_a_gateway_may_wait_on_them() {
        let t0 = Instant::now();
        let mut published: BTreeMap<u64, Instant> = (1..=5).map(|g| (g, t0)).collect();
        prune_published(&mut published, &[gw(1, t0, Some(3)), gw(2, t0, Some(5))]);
        assert_eq!(published.keys().copied().collect::<Vec<_>>(), [4, 5]);
        prune_published(&mut published, &[]);
        assert_eq!(published.keys().copied().collect::<Vec<_>>(), [5]);
    }
}
