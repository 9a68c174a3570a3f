//! Ports for instances (their `PORT`) and their sidecar listeners, from a range Sluice owns.
//!
//! Probing a free port (bind port 0, close, hand the number out) races: the kernel gives the same
//! ephemeral port to the next `bind(0)` or outgoing connection, so an app's PORT and another
//! instance's sidecar listener could get the same number, and Envoy then cannot bind it. The pool
//! avoids both ways of colliding:
//! - the range lies outside the kernel's ephemeral range (`ip_local_port_range`), so the kernel never
//!   hands its ports out on its own;
//! - a port is leased until its [`PortLease`] drops, and the pool hands ports out round-robin, so a
//!   released port is reused only after the whole range has gone by (a removed Envoy listener may
//!   still be draining on it). Each port is also test-bound before it is handed out, which skips ports
//!   some other program holds.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex, OnceLock};

/// Linux's default `ip_local_port_range`.
const DEFAULT_EPHEMERAL: (u16, u16) = (32768, 60999);
/// At most this many ports below the ephemeral range (well-known ports stay clear).
const MAX_BELOW: u16 = 12768;

/// The range instance ports come from: the larger of the gaps below and above the kernel's ephemeral
/// range `(lo, hi)`, at most [`MAX_BELOW`] ports below it.
pub fn instance_port_range(ephemeral: (u16, u16)) -> RangeInclusive<u16> {
    let (lo, hi) = ephemeral;
    let below = lo.saturating_sub(MAX_BELOW).max(1024)..=lo.saturating_sub(1);
    let above = hi.saturating_add(1)..=u16::MAX;
    let len = |r: &RangeInclusive<u16>| {
        if r.is_empty() {
            0
        } else {
            u32::from(*r.end()) - u32::from(*r.start()) + 1
        }
    };
    if len(&below) >= len(&above) {
        below
    } else {
        above
    }
}

/// The kernel's ephemeral port range, or Linux's default when it cannot be read.
fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut parts = s.split_whitespace().map(|p| p.parse::<u16>());
            match (parts.next(), parts.next()) {
                (Some(Ok(lo)), Some(Ok(hi))) if lo <= hi => Some((lo, hi)),
                _ => None,
            }
        })
        .unwrap_or(DEFAULT_EPHEMERAL)
}

type Probe = Box<dyn Fn(u16) -> bool + Send + Sync>;

/// Hands out ports of one range, each to one holder at a time.
pub struct PortPool {
    range: RangeInclusive<u16>,
    /// Whether a port is free for us to hand out (nobody else has it bound).
    probe: Probe,
    state: Mutex<PoolState>,
}

impl std::fmt::Debug for PortPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PortPool")
            .field("range", &self.range)
            .finish_non_exhaustive()
    }
}

struct PoolState {
    held: HashSet<u16>,
    /// Where the round-robin search resumes.
    next: u16,
}

/// Why no port could be leased.
#[derive(Debug, thiserror::Error)]
#[error("no free port left in {start}-{end} ({held} held by instances and sidecars)")]
pub struct PortsExhausted {
    pub start: u16,
    pub end: u16,
    pub held: usize,
}

impl PortPool {
    /// The pool for instances on `address`, over [`instance_port_range`] of this machine: one per
    /// address and process (ports are the machine's, so every runtime of a process shares it). Each
    /// process starts at its own place in the range, so two `sluice up`s rarely test the same ports.
    pub fn for_instances(address: IpAddr) -> Arc<PortPool> {
        static POOLS: OnceLock<Mutex<HashMap<IpAddr, Arc<PortPool>>>> = OnceLock::new();
        let mut pools = POOLS
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        pools
            .entry(address)
            .or_insert_with(|| {
                let range = instance_port_range(ephemeral_range());
                let span = u32::from(*range.end()) - u32::from(*range.start()) + 1;
                let offset = std::process::id().wrapping_mul(2_654_435_761) % span;
                let start = (u32::from(*range.start()) + offset) as u16;
                Arc::new(PortPool::new(range, start, move |port| {
                    TcpListener::bind(SocketAddr::new(address, port)).is_ok()
                }))
            })
            .clone()
    }

    /// A pool over `range` whose search starts at `start`; `probe` says whether a port is free.
    pub fn new(
        range: RangeInclusive<u16>,
        start: u16,
        probe: impl Fn(u16) -> bool + Send + Sync + 'static,
    ) -> PortPool {
        assert!(!range.is_empty(), "an empty port range");
        let start = start.clamp(*range.start(), *range.end());
        PortPool {
            range,
            probe: Box::new(probe),
            state: Mutex::new(PoolState {
                held: HashSet::new(),
                next: start,
            }),
        }
    }

    /// The next port of the range that is neither held nor bound by anyone, leased until the lease
    /// drops.
    pub fn lease(self: &Arc<Self>) -> Result<PortLease, PortsExhausted> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (start, end) = (*self.range.start(), *self.range.end());
        let span = u32::from(end) - u32::from(start) + 1;
        for _ in 0..span {
            let port = state.next;
            state.next = if port == end { start } else { port + 1 };
            if state.held.contains(&port) || !(self.probe)(port) {
                continue;
            }
            state.held.insert(port);
            return Ok(PortLease {
                port,
                pool: Arc::clone(self),
            });
        }
        Err(PortsExhausted {
            start,
            end,
            held: state.held.len(),
        })
    }

    /// Ports leased now.
    pub fn held(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .held
            .len()
    }

    fn release(&self, port: u16) {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .held
            .remove(&port);
    }
}

/// One leased port; back to the pool on drop.
#[derive(Debug)]
pub struct PortLease {
    port: u16,
    pool: Arc<PortPool>,
}

impl PortLease {
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for PortLease {
    fn drop(&mut self) {
        self.pool.release(self.port);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_range_lies_outside_the_ephemeral_range() {
        assert_eq!(instance_port_range((32768, 60999)), 20000..=32767);
        // A kernel whose ephemeral range starts low leaves the ports above it.
        assert_eq!(instance_port_range((1024, 50000)), 50001..=65535);
        assert_eq!(instance_port_range((10000, 65535)), 1024..=9999);
    }

    #[test]
    fn a_held_port_is_never_handed_out_twice() {
        let pool = Arc::new(PortPool::new(100..=103, 100, |_| true));
        let leases: Vec<_> = (0..4).map(|_| pool.lease().unwrap()).collect();
        let ports: HashSet<u16> = leases.iter().map(PortLease::port).collect();
        assert_eq!(ports.len(), 4);
        assert!(pool.lease().is_err(), "all four are held");
        drop(leases);
        assert_eq!(pool.held(), 0);
    }

    #[test]
    fn a_released_port_comes_back_only_after_the_rest_of_the_range() {
        let pool = Arc::new(PortPool::new(100..=102, 100, |_| true));
        let first = pool.lease().unwrap();
        assert_eq!(first.port(), 100);
        drop(first);
        let order: Vec<u16> = (0..3).map(|_| pool.lease().unwrap().port()).collect();
        assert_eq!(order, [101, 102, 100]);
    }

    #[test]
    fn ports_bound_by_others_are_skipped() {
        let pool = Arc::new(PortPool::new(100..=103, 102, |p| p != 102 && p != 103));
        let a = pool.lease().unwrap();
        let b = pool.lease().unwrap();
        assert_eq!((a.port(), b.port()), (100, 101));
        assert!(pool.lease().is_err());
    }

    #[test]
    fn the_machine_pool_skips_a_port_in_use() {
        let range = instance_port_range(ephemeral_range());
        let held = range
            .clone()
            .find_map(|p| TcpListener::bind(("127.0.0.1", p)).ok())
            .unwrap();
        let taken = held.local_addr().unwrap().port();
        let pool = Arc::new(PortPool::new(range, taken, |port| {
            TcpListener::bind(("127.0.0.1", port)).is_ok()
        }));
        assert_ne!(pool.lease().unwrap().port(), taken);
    }
}
