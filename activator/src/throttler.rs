//! A revision's throttler: which instances are healthy, how many requests each is serving, who waits.
//!
//! Pure (no I/O, no clock): Knative's `revisionThrottler` (`pkg/activator/net/throttler.go`) with its
//! revision breaker and per-pod trackers, for one activator. The async side (`crate::revision`) feeds it
//! events and hands its grants to waiting requests.
//!
//! Knative keeps two breakers: one for the whole revision (capacity containerConcurrency x pods, a queue
//! in front) and one per pod (capacity containerConcurrency). With a single activator the revision
//! capacity is exactly the sum of the pod capacities, so here the per-instance counts are the only
//! limit and the queue is a FIFO of waiting requests in front of them. containerConcurrency 0 is
//! Knative's "infinite breaker": no limit, but requests still wait while no instance is healthy.

use std::collections::VecDeque;
use std::net::SocketAddr;

use crate::lb::{self, LbPolicy, LbState};

/// Knative: `breakerQueueDepth` of the activator's throttler, the requests held before 503s.
pub const DEFAULT_MAX_QUEUE: usize = 10_000;

/// An identifier the caller gives to each waiting request.
pub type WaiterId = u64;

/// One request's claim on one instance. Give it back with [`Throttler::release`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    pub backend: SocketAddr,
    /// Which incarnation of `backend`: an address removed and added again starts a fresh count, and
    /// a late release for the old one must not lower it.
    pub generation: u64,
}

/// The answer to a request arriving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Go ahead, to this instance.
    Granted(Reservation),
    /// Wait for a grant from [`Throttler::dispatch`]. `first` is true when nobody was waiting before:
    /// the moment to poke the autoscaler.
    Queued { first: bool },
    /// Knative: `ErrRequestQueueFull` ("pending request queue full") -> 503.
    QueueFull,
    /// The revision is failed (its instances cannot start) and no instance is free: answer at once
    /// rather than hold the request until its timeout.
    Failed,
}

/// The revision's capacity: containerConcurrency x healthy instances (Knative's `calculateCapacity`
/// for one activator).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capacity {
    Limited(u64),
    /// containerConcurrency 0 with at least one healthy instance.
    Unlimited,
}

#[derive(Debug, Clone)]
struct Backend {
    addr: SocketAddr,
    generation: u64,
    /// Probed successfully (`K-Network-Probe: queue` answered 200 "queue") and not failed since.
    healthy: bool,
    in_flight: u32,
}

/// The throttler of one revision.
#[derive(Debug, Clone)]
pub struct Throttler {
    container_concurrency: u32,
    policy: LbPolicy,
    max_queue: usize,
    /// Sorted by address, as Knative sorts its trackers, so first-available and round robin are stable.
    backends: Vec<Backend>,
    waiting: VecDeque<WaiterId>,
    lb: LbState,
    next_generation: u64,
    /// Its instances cannot start (Ready=False from the runtime): requests are not held.
    failed: bool,
}

impl Throttler {
    pub fn new(container_concurrency: u32, max_queue: usize) -> Self {
        Throttler {
            container_concurrency,
            policy: LbPolicy::for_container_concurrency(container_concurrency),
            max_queue,
            backends: Vec::new(),
            waiting: VecDeque::new(),
            lb: LbState::default(),
            next_generation: 0,
            failed: false,
        }
    }

    pub fn container_concurrency(&self) -> u32 {
        self.container_concurrency
    }

    pub fn policy(&self) -> LbPolicy {
        self.policy
    }

    /// Changes containerConcurrency and the queue bound; in-flight counts are kept.
    pub fn set_limits(&mut self, container_concurrency: u32, max_queue: usize) {
        self.container_concurrency = container_concurrency;
        self.policy = LbPolicy::for_container_concurrency(container_concurrency);
        self.max_queue = max_queue;
    }

    /// Replaces the instance set. Known addresses keep their health and load; new ones start unhealthy
    /// (they get traffic only after a successful probe). Returns the addresses that need probing.
    pub fn set_backends(&mut self, addrs: &[SocketAddr]) -> Vec<SocketAddr> {
        let mut next: Vec<Backend> = Vec::with_capacity(addrs.len());
        let mut sorted: Vec<SocketAddr> = addrs.to_vec();
        sorted.sort();
        sorted.dedup();
        for addr in sorted {
            match self.backends.iter().find(|b| b.addr == addr) {
                Some(b) => next.push(b.clone()),
                None => {
                    self.next_generation += 1;
                    next.push(Backend {
                        addr,
                        generation: self.next_generation,
                        healthy: false,
                        in_flight: 0,
                    });
                }
            }
        }
        self.backends = next;
        self.unhealthy()
    }

    /// Marks the revision failed (its instances cannot start) or recovered. A failed revision holds
    /// no request: those waiting are returned, to be answered at once, and new ones that no instance
    /// can take are refused ([`Admission::Failed`]). Instances still healthy keep serving.
    pub fn set_failed(&mut self, failed: bool) -> Vec<WaiterId> {
        self.failed = failed;
        if failed {
            self.waiting.drain(..).collect()
        } else {
            Vec::new()
        }
    }

    pub fn is_failed(&self) -> bool {
        self.failed
    }

    /// Every instance address, healthy or not.
    pub fn backends(&self) -> Vec<SocketAddr> {
        self.backends.iter().map(|b| b.addr).collect()
    }

    /// Instances that must be probed before they get traffic.
    pub fn unhealthy(&self) -> Vec<SocketAddr> {
        self.backends
            .iter()
            .filter(|b| !b.healthy)
            .map(|b| b.addr)
            .collect()
    }

    /// A probe passed. Returns false when the address is no longer an instance of the revision.
    pub fn mark_healthy(&mut self, addr: SocketAddr) -> bool {
        self.set_health(addr, true)
    }

    /// Forwarding to it failed to connect: stop sending it traffic until a probe passes again.
    pub fn mark_unhealthy(&mut self, addr: SocketAddr) -> bool {
        self.set_health(addr, false)
    }

    fn set_health(&mut self, addr: SocketAddr, healthy: bool) -> bool {
        match self.backends.iter_mut().find(|b| b.addr == addr) {
            Some(b) => {
                b.healthy = healthy;
                true
            }
            None => false,
        }
    }

    pub fn healthy_count(&self) -> usize {
        self.backends.iter().filter(|b| b.healthy).count()
    }

    pub fn capacity(&self) -> Capacity {
        let healthy = self.healthy_count() as u64;
        if self.container_concurrency == 0 && healthy > 0 {
            Capacity::Unlimited
        } else {
            Capacity::Limited(u64::from(self.container_concurrency) * healthy)
        }
    }

    /// Requests forwarded and not finished, over the current instances.
    pub fn in_flight(&self) -> u64 {
        self.backends.iter().map(|b| u64::from(b.in_flight)).sum()
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// A request arrives. It is granted at once only when nobody waits before it (FIFO).
    pub fn admit(&mut self, id: WaiterId, rand: &mut dyn FnMut(usize) -> usize) -> Admission {
        if self.waiting.is_empty()
            && let Some(r) = self.try_reserve(rand)
        {
            return Admission::Granted(r);
        }
        if self.failed {
            return Admission::Failed;
        }
        if self.waiting.len() >= self.max_queue {
            return Admission::QueueFull;
        }
        let first = self.waiting.is_empty();
        self.waiting.push_back(id);
        Admission::Queued { first }
    }

    /// A waiting request gave up (timeout, client gone). Returns whether it was still waiting.
    pub fn cancel(&mut self, id: WaiterId) -> bool {
        match self.waiting.iter().position(|&w| w == id) {
            Some(i) => {
                self.waiting.remove(i);
                true
            }
            None => false,
        }
    }

    /// A forwarded request finished (or was never sent).
    pub fn release(&mut self, r: Reservation) {
        if let Some(b) = self
            .backends
            .iter_mut()
            .find(|b| b.addr == r.backend && b.generation == r.generation)
        {
            b.in_flight = b.in_flight.saturating_sub(1);
        }
    }

    /// Grants free slots to waiting requests, oldest first. Call after anything that may free capacity
    /// (a release, a probe passing, new limits).
    pub fn dispatch(
        &mut self,
        rand: &mut dyn FnMut(usize) -> usize,
    ) -> Vec<(WaiterId, Reservation)> {
        let mut grants = Vec::new();
        while !self.waiting.is_empty() {
            match self.try_reserve(rand) {
                Some(r) => {
                    let id = self.waiting.pop_front().expect("checked non-empty");
                    grants.push((id, r));
                }
                None => break,
            }
        }
        grants
    }

    fn try_reserve(&mut self, rand: &mut dyn FnMut(usize) -> usize) -> Option<Reservation> {
        let healthy: Vec<usize> = (0..self.backends.len())
            .filter(|&i| self.backends[i].healthy)
            .collect();
        let loads: Vec<u32> = healthy
            .iter()
            .map(|&i| self.backends[i].in_flight)
            .collect();
        let chosen = lb::pick(
            self.policy,
            self.container_concurrency,
            &loads,
            &mut self.lb,
            rand,
        )?;
        let b = &mut self.backends[healthy[chosen]];
        b.in_flight += 1;
        Some(Reservation {
            backend: b.addr,
            generation: b.generation,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn zero(_: usize) -> usize {
        0
    }

    fn healthy_throttler(cc: u32, max_queue: usize, ports: &[u16]) -> Throttler {
        let mut t = Throttler::new(cc, max_queue);
        let addrs: Vec<_> = ports.iter().map(|&p| addr(p)).collect();
        t.set_backends(&addrs);
        for a in addrs {
            t.mark_healthy(a);
        }
        t
    }

    #[test]
    fn capacity_is_container_concurrency_times_healthy_instances() {
        let table: [(u32, &[u16], usize, Capacity); 5] = [
            (1, &[1, 2], 2, Capacity::Limited(2)),
            (10, &[1, 2, 3], 1, Capacity::Limited(10)),
            (5, &[1], 0, Capacity::Limited(0)),
            (0, &[1, 2], 1, Capacity::Unlimited),
            (0, &[1], 0, Capacity::Limited(0)),
        ];
        for (cc, ports, healthy, want) in table {
            let mut t = Throttler::new(cc, 10);
            let addrs: Vec<_> = ports.iter().map(|&p| addr(p)).collect();
            t.set_backends(&addrs);
            for a in addrs.iter().take(healthy) {
                t.mark_healthy(*a);
            }
            assert_eq!(
                t.capacity(),
                want,
                "cc={cc} ports={ports:?} healthy={healthy}"
            );
        }
    }

    #[test]
    fn requests_wait_while_no_instance_is_healthy_then_get_the_probed_one() {
        let mut t = Throttler::new(1, 10);
        assert_eq!(t.admit(1, &mut zero), Admission::Queued { first: true });
        assert_eq!(t.admit(2, &mut zero), Admission::Queued { first: false });
        assert_eq!(t.set_backends(&[addr(9)]), vec![addr(9)]);
        // Not probed yet: no grant.
        assert!(t.dispatch(&mut zero).is_empty());
        t.mark_healthy(addr(9));
        let grants = t.dispatch(&mut zero);
        assert_eq!(grants.len(), 1, "cc=1 with one instance grants one");
        assert_eq!(grants[0].0, 1, "oldest waiter first");
        assert_eq!(t.waiting(), 1);
        t.release(grants[0].1);
        let grants = t.dispatch(&mut zero);
        assert_eq!(grants.iter().map(|g| g.0).collect::<Vec<_>>(), vec![2]);
    }

    #[test]
    fn container_concurrency_one_never_puts_two_requests_on_one_instance() {
        let mut t = healthy_throttler(1, 10, &[1, 2]);
        let a = t.admit(1, &mut zero);
        let b = t.admit(2, &mut zero);
        let (Admission::Granted(ra), Admission::Granted(rb)) = (a, b) else {
            panic!("two instances with cc=1 serve two requests: {a:?} {b:?}");
        };
        assert_ne!(ra.backend, rb.backend);
        assert_eq!(t.admit(3, &mut zero), Admission::Queued { first: true });
        assert_eq!(t.in_flight(), 2);
    }

    #[test]
    fn a_full_queue_rejects_and_a_cancelled_waiter_frees_its_place() {
        let mut t = Throttler::new(1, 2);
        assert!(matches!(t.admit(1, &mut zero), Admission::Queued { .. }));
        assert!(matches!(t.admit(2, &mut zero), Admission::Queued { .. }));
        assert_eq!(t.admit(3, &mut zero), Admission::QueueFull);
        assert!(t.cancel(1));
        assert!(!t.cancel(1), "already gone");
        assert_eq!(t.admit(4, &mut zero), Admission::Queued { first: false });
    }

    #[test]
    fn zero_max_queue_rejects_instead_of_waiting() {
        let mut t = Throttler::new(1, 0);
        assert_eq!(t.admit(1, &mut zero), Admission::QueueFull);
    }

    #[test]
    fn arrivals_do_not_overtake_waiting_requests() {
        let mut t = healthy_throttler(1, 10, &[1]);
        let Admission::Granted(r) = t.admit(1, &mut zero) else {
            panic!("free instance")
        };
        assert!(matches!(t.admit(2, &mut zero), Admission::Queued { .. }));
        t.release(r);
        // A slot is free but request 2 waits: a newcomer queues behind it.
        assert_eq!(t.admit(3, &mut zero), Admission::Queued { first: false });
        let grants = t.dispatch(&mut zero);
        assert_eq!(grants.iter().map(|g| g.0).collect::<Vec<_>>(), vec![2]);
    }

    #[test]
    fn unlimited_concurrency_grants_everything_once_an_instance_is_healthy() {
        let mut t = Throttler::new(0, 10);
        assert!(matches!(t.admit(1, &mut zero), Admission::Queued { .. }));
        t.set_backends(&[addr(1)]);
        t.mark_healthy(addr(1));
        assert_eq!(t.dispatch(&mut zero).len(), 1);
        for id in 2..100 {
            assert!(matches!(t.admit(id, &mut zero), Admission::Granted(_)));
        }
    }

    #[test]
    fn a_failed_instance_gets_no_traffic_until_probed_again() {
        let mut t = healthy_throttler(1, 10, &[1, 2]);
        t.mark_unhealthy(addr(1));
        assert_eq!(t.unhealthy(), vec![addr(1)]);
        let Admission::Granted(r) = t.admit(1, &mut zero) else {
            panic!("instance 2 is free")
        };
        assert_eq!(r.backend, addr(2));
        assert!(matches!(t.admit(2, &mut zero), Admission::Queued { .. }));
    }

    #[test]
    fn removed_instances_are_forgotten_and_a_late_release_does_not_touch_a_new_incarnation() {
        let mut t = healthy_throttler(1, 10, &[1]);
        let Admission::Granted(old) = t.admit(1, &mut zero) else {
            panic!("free")
        };
        t.set_backends(&[]);
        assert_eq!(t.capacity(), Capacity::Limited(0));
        assert_eq!(
            t.set_backends(&[addr(1)]),
            vec![addr(1)],
            "a new incarnation is probed"
        );
        t.mark_healthy(addr(1));
        let Admission::Granted(new) = t.admit(2, &mut zero) else {
            panic!("free")
        };
        t.release(old);
        assert_eq!(
            t.in_flight(),
            1,
            "the old release must not free the new request's slot"
        );
        t.release(new);
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn a_failed_revision_releases_its_waiters_and_refuses_new_ones_until_it_recovers() {
        let mut t = Throttler::new(1, 10);
        assert_eq!(t.admit(1, &mut zero), Admission::Queued { first: true });
        assert_eq!(t.admit(2, &mut zero), Admission::Queued { first: false });
        assert_eq!(
            t.set_failed(true),
            vec![1, 2],
            "held requests, oldest first"
        );
        assert_eq!(t.waiting(), 0);
        assert_eq!(t.admit(3, &mut zero), Admission::Failed);
        assert!(t.set_failed(true).is_empty(), "nobody waits while failed");
        // Recovered: requests are held again until an instance is probed.
        assert!(t.set_failed(false).is_empty());
        assert_eq!(t.admit(4, &mut zero), Admission::Queued { first: true });
        t.set_backends(&[addr(1)]);
        t.mark_healthy(addr(1));
        assert_eq!(t.dispatch(&mut zero).len(), 1);
    }

    #[test]
    fn a_failed_revision_still_serves_on_a_free_healthy_instance() {
        let mut t = healthy_throttler(1, 10, &[1]);
        t.set_failed(true);
        assert!(matches!(t.admit(1, &mut zero), Admission::Granted(_)));
        assert_eq!(t.admit(2, &mut zero), Admission::Failed, "busy: not held");
    }

    #[test]
    fn known_instances_keep_health_and_load_across_updates() {
        let mut t = healthy_throttler(2, 10, &[1]);
        assert!(matches!(t.admit(1, &mut zero), Admission::Granted(_)));
        assert_eq!(t.set_backends(&[addr(1), addr(2)]), vec![addr(2)]);
        assert_eq!(t.healthy_count(), 1);
        assert_eq!(t.in_flight(), 1);
    }
}
