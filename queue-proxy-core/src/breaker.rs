//! Knative's breaker (pkg/queue/breaker.go), split so it holds across Envoy worker threads, each of which
//! runs its own wasm VM:
//!
//! - [`BreakerState`]: the one global state, kept in Envoy's shared data and changed only by
//!   compare-and-swap: the slots owned by workers, the workers that lend (see below), and ONE FIFO of
//!   waiting requests from every worker. Each waiter is named by its worker's shared queue and its
//!   stream's context id. A slot given back goes straight to the head of the FIFO (the count does not
//!   drop while anyone waits), and the worker that holds the head is told through its shared queue
//!   ([`Message::Granted`]).
//! - [`Lease`]: the slots one worker owns. While nobody waits, a worker *lends*: it takes slots from the
//!   shared pool in batches ([`LeasePolicy`]) and admits and releases requests against its own idle
//!   slots with no shared-data access at all; it trims its idle slots on its tick. The first request
//!   that cannot get a slot (it queues, or is refused) takes the list of lenders out of the shared state
//!   in the same swap and sends each a [`Message::Reclaim`]: each gives its idle slots back (to the FIFO
//!   head first) and stops lending until the FIFO is empty again. A worker that does not lend goes
//!   through the shared state on every arrival and release, as when every worker always did.
//! - [`Streams`]: one worker's view of its own streams that took part (holding a slot, or queued with a
//!   deadline), so it knows what to do when a stream finishes, times out, or receives a slot.
//!
//! So the limit holds at every instant (streams in flight on a worker never exceed the slots it owns,
//! and the owned slots never exceed the capacity), the queued requests are served in global FIFO order,
//! and no wake-up is lost: a slot is either free, owned by a worker (used, or idle in a lender that
//! either is listed as a lender, so no one waits, or has a Reclaim on its way), or owned by a named
//! waiter whose worker has a Granted on its way. The one ordering exception: until a lender has read
//! its Reclaim (one event-loop turn of its worker), it still admits its own new arrivals from its idle
//! slots, ahead of requests that have just queued on another worker.
//!
//! Pure: no host calls, time is a parameter.

use std::collections::{BTreeMap, VecDeque};

use thiserror::Error;

use crate::config::Limits;

/// A request waiting for a slot: the shared queue of the worker (VM) that holds it, and its context id
/// in that VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Waiter {
    pub queue: u32,
    pub context: u32,
}

/// What happens to an arriving request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// It holds a slot: proxy it now.
    Admitted,
    /// It waits in the FIFO for a slot.
    Queued,
    /// Slots and queue are full. Knative answers 503 "pending request queue full".
    Overflow,
}

/// Knative's queue-proxy answer to a request refused because slots and queue are full.
pub const QUEUE_FULL_BODY: &str = "pending request queue full\n";
/// Knative's queue-proxy answer to a queued request whose deadline passed (the context error's text).
pub const QUEUE_TIMEOUT_BODY: &str = "context deadline exceeded\n";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("breaker state of {0} bytes is malformed")]
    Malformed(usize),
    #[error("breaker state has format version {0}, want 2")]
    Version(u8),
}

/// The global breaker state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BreakerState {
    /// Slots owned by workers: used by a stream, idle in a lender, or handed to a waiter whose worker
    /// has not read its message yet.
    in_flight: u32,
    /// The shared queues of the workers that lend (admit from their idle slots without asking).
    lenders: Vec<u32>,
    waiting: VecDeque<Waiter>,
}

/// The encoding's version (its first byte).
pub const FORMAT_VERSION: u8 = 2;

impl BreakerState {
    pub fn in_flight(&self) -> u32 {
        self.in_flight
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn lenders(&self) -> &[u32] {
        &self.lenders
    }

    /// A waiter gives up (its deadline passed, or its client went away). False when it is no longer
    /// waiting: it was handed a slot, and a message telling its worker so is on its way.
    pub fn cancel(&mut self, waiter: Waiter) -> bool {
        match self.waiting.iter().position(|w| *w == waiter) {
            Some(i) => {
                self.waiting.remove(i);
                true
            }
            None => false,
        }
    }

    /// A slot handed to a waiter whose worker cannot be told (its shared queue is gone) comes back.
    /// Returns the waiters that now hold a slot.
    pub fn release_undelivered(&mut self, limits: Limits) -> Vec<Waiter> {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.fill(limits)
    }

    /// Hands free slots to waiters, in FIFO order (also after a configuration raised the capacity).
    pub fn fill(&mut self, limits: Limits) -> Vec<Waiter> {
        let mut granted = Vec::new();
        while self.in_flight < limits.capacity {
            let Some(next) = self.waiting.pop_front() else {
                break;
            };
            self.in_flight += 1;
            granted.push(next);
        }
        granted
    }

    fn is_lender(&self, queue: u32) -> bool {
        self.lenders.contains(&queue)
    }

    fn add_lender(&mut self, queue: u32) {
        if !self.is_lender(queue) {
            self.lenders.push(queue);
        }
    }

    fn remove_lender(&mut self, queue: u32) {
        self.lenders.retain(|&q| q != queue);
    }

    /// Takes every lender but `me` off the list: they must be told to give their idle slots back.
    fn take_lenders(&mut self, me: u32) -> Vec<u32> {
        let (mine, others) = self.lenders.drain(..).partition(|&q| q == me);
        self.lenders = mine;
        others
    }

    /// Bytes for shared data: version, in-flight count, lender count, lenders, waiter count, then
    /// (queue, context) pairs; all little-endian u32. Nobody waiting and one lender: 17 bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(13 + 4 * self.lenders.len() + 8 * self.waiting.len());
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes();
        out.push(FORMAT_VERSION);
        out.extend_from_slice(&self.in_flight.to_le_bytes());
        out.extend_from_slice(&count(self.lenders.len()));
        for q in &self.lenders {
            out.extend_from_slice(&q.to_le_bytes());
        }
        out.extend_from_slice(&count(self.waiting.len()));
        for w in &self.waiting {
            out.extend_from_slice(&w.queue.to_le_bytes());
            out.extend_from_slice(&w.context.to_le_bytes());
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<BreakerState, DecodeError> {
        let malformed = || DecodeError::Malformed(bytes.len());
        let (&version, rest) = bytes.split_first().ok_or_else(malformed)?;
        if version != FORMAT_VERSION {
            return Err(DecodeError::Version(version));
        }
        if rest.len() % 4 != 0 {
            return Err(malformed());
        }
        let mut words = rest
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]));
        let mut next = || words.next().ok_or_else(malformed);
        let in_flight = next()?;
        let lender_count = next()? as usize;
        if rest.len() < 12 + 4 * lender_count {
            return Err(malformed());
        }
        let lenders = (0..lender_count)
            .map(|_| next())
            .collect::<Result<_, _>>()?;
        let count = next()? as usize;
        if rest.len() != 12 + 4 * lender_count + 8 * count {
            return Err(malformed());
        }
        let mut waiting = VecDeque::with_capacity(count);
        for _ in 0..count {
            waiting.push_back(Waiter {
                queue: next()?,
                context: next()?,
            });
        }
        Ok(BreakerState {
            in_flight,
            lenders,
            waiting,
        })
    }
}

/// A message on a worker's shared queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message {
    /// The stream with this context id was handed a slot (the worker owns it now).
    Granted(u32),
    /// Someone waits: give your idle slots back and stop lending.
    Reclaim,
}

impl Message {
    pub fn encode(self) -> Vec<u8> {
        match self {
            Message::Granted(context) => {
                let mut out = vec![0];
                out.extend_from_slice(&context.to_le_bytes());
                out
            }
            Message::Reclaim => vec![1],
        }
    }

    pub fn decode(bytes: &[u8]) -> Option<Message> {
        match bytes {
            [0, a, b, c, d] => Some(Message::Granted(u32::from_le_bytes([*a, *b, *c, *d]))),
            [1] => Some(Message::Reclaim),
            _ => None,
        }
    }
}

/// Below this containerConcurrency workers do not lend: every arrival and release goes through the
/// shared state (exact and simple where a slot or two make all the difference).
pub const LEND_MIN_CAPACITY: u32 = 2;
/// A lender takes capacity / LEND_BATCH_DIVISOR slots (at least one) at a time.
pub const LEND_BATCH_DIVISOR: u32 = 8;

/// How a worker leases slots, from the limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeasePolicy {
    /// Slots taken from the pool at once, and idle slots a lender keeps past its tick; 0 = never lend.
    batch: u32,
}

impl LeasePolicy {
    pub fn new(limits: Limits) -> LeasePolicy {
        // With queueDepth 0 there is no queue to wait in while a lent slot comes back: an idle slot in
        // another worker would turn requests away. So no lending then.
        let batch = if limits.capacity < LEND_MIN_CAPACITY || limits.queue_depth == 0 {
            0
        } else {
            (limits.capacity / LEND_BATCH_DIVISOR).max(1)
        };
        LeasePolicy { batch }
    }

    /// Never lend: for a breaker whose state sits behind a lock that every worker takes (the native
    /// filter), where going through the shared state costs no more than a lease would.
    pub fn exclusive() -> LeasePolicy {
        LeasePolicy { batch: 0 }
    }

    pub fn lends(self) -> bool {
        self.batch > 0
    }

    pub fn batch(self) -> u32 {
        self.batch
    }
}

/// What the worker must carry out once a change of the shared state is stored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Effects {
    /// Waiters that now hold a slot: tell their workers ([`Message::Granted`]).
    pub granted: Vec<Waiter>,
    /// Lenders (their shared queues) that must give their idle slots back ([`Message::Reclaim`]).
    pub reclaim: Vec<u32>,
}

/// The slots one worker owns. Each change that touches the shared state is a function of (a copy of)
/// the lease and the state, so it can be retried as a whole when a compare-and-swap fails.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lease {
    /// Slots this worker owns in the shared state (its `in_flight` counts them).
    held: u32,
    /// Of those, slots its streams hold.
    used: u32,
    /// Admits from its idle slots without touching the shared state (only while nobody waits).
    lending: bool,
}

impl Lease {
    pub fn held(&self) -> u32 {
        self.held
    }

    pub fn used(&self) -> u32 {
        self.used
    }

    pub fn idle(&self) -> u32 {
        self.held.saturating_sub(self.used)
    }

    pub fn lending(&self) -> bool {
        self.lending
    }

    /// The fast path of an arrival: a lender with an idle slot admits at once. False: call
    /// [`Lease::arrive`] on the shared state.
    pub fn admit_local(&mut self) -> bool {
        if self.lending && self.used < self.held {
            self.used += 1;
            true
        } else {
            false
        }
    }

    /// The fast path of a release: a lender keeps the slot idle. False: call [`Lease::release`] on the
    /// shared state.
    pub fn release_local(&mut self) -> bool {
        if self.lending {
            self.used = self.used.saturating_sub(1);
            true
        } else {
            false
        }
    }

    /// A [`Message::Granted`] arrived: the slot is this worker's, and its stream's (when the stream is
    /// gone, release it as any other).
    pub fn granted(&mut self) {
        self.held += 1;
        self.used += 1;
    }

    /// A request arrives and no idle slot of this worker's own is free. Knative: at most
    /// containerConcurrency + queueDepth requests are pending (holding a slot or waiting); the rest are
    /// refused at once.
    pub fn arrive(
        &mut self,
        state: &mut BreakerState,
        limits: Limits,
        policy: LeasePolicy,
        me: Waiter,
    ) -> (Arrival, Effects) {
        // Waiters first, if a new configuration raised the capacity.
        let mut effects = Effects {
            granted: state.fill(limits),
            reclaim: Vec::new(),
        };
        if self.lending && !state.is_lender(me.queue) {
            // Asked to give the idle slots back (the Reclaim is on its way): do it now.
            effects
                .granted
                .extend(self.stop_lending(state, limits, me.queue));
        }
        let pending = u64::from(state.in_flight) + state.waiting.len() as u64;
        let max_pending = u64::from(limits.capacity) + u64::from(limits.queue_depth);
        if pending >= max_pending {
            // Idle slots lent out may be what fills the breaker: they come back.
            effects.reclaim = state.take_lenders(me.queue);
            return (Arrival::Overflow, effects);
        }
        if state.in_flight < limits.capacity && state.waiting.is_empty() {
            let take = if policy.lends() {
                policy.batch.min(limits.capacity - state.in_flight)
            } else {
                1
            };
            state.in_flight += take;
            self.held += take;
            self.used += 1;
            if policy.lends() {
                self.lending = true;
                state.add_lender(me.queue);
            }
            return (Arrival::Admitted, effects);
        }
        state.waiting.push_back(me);
        effects
            .granted
            .extend(self.stop_lending(state, limits, me.queue));
        effects.reclaim = state.take_lenders(me.queue);
        (Arrival::Queued, effects)
    }

    /// A stream that held a slot finished, and this worker does not lend: the slot goes back to the
    /// shared state, to the FIFO head first.
    pub fn release(&mut self, state: &mut BreakerState, limits: Limits) -> Effects {
        self.used = self.used.saturating_sub(1);
        self.held = self.held.saturating_sub(1);
        state.in_flight = state.in_flight.saturating_sub(1);
        Effects {
            granted: state.fill(limits),
            reclaim: Vec::new(),
        }
    }

    /// Stops lending and gives every idle slot back (on a [`Message::Reclaim`], or when the plugin goes
    /// away). Returns the waiters that now hold a slot.
    pub fn give_back(&mut self, state: &mut BreakerState, limits: Limits, me: u32) -> Vec<Waiter> {
        self.stop_lending(state, limits, me)
    }

    /// The tick of a lender: idle slots past one batch go back to the pool (so a worker whose load
    /// dropped does not sit on them); all of them if it was asked to give them back.
    pub fn trim(
        &mut self,
        state: &mut BreakerState,
        limits: Limits,
        policy: LeasePolicy,
        me: u32,
    ) -> Vec<Waiter> {
        if self.lending && !state.is_lender(me) {
            return self.stop_lending(state, limits, me);
        }
        let extra = self.idle().saturating_sub(policy.batch);
        self.held -= extra;
        state.in_flight = state.in_flight.saturating_sub(extra);
        state.fill(limits)
    }

    fn stop_lending(&mut self, state: &mut BreakerState, limits: Limits, me: u32) -> Vec<Waiter> {
        state.remove_lender(me);
        if self.lending {
            state.in_flight = state.in_flight.saturating_sub(self.idle());
            self.held = self.used;
            self.lending = false;
        }
        state.fill(limits)
    }
}

/// Where one of this worker's streams stands with the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// It holds a slot.
    Held,
    /// It waits for a slot, until `deadline` (nanoseconds since the epoch). No deadline: it timed out but
    /// a slot was already on its way, so it will be served.
    Queued { deadline: Option<u64> },
}

/// What the worker must do when a stream finishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// It held a slot: release it.
    Release,
    /// It was waiting: cancel it in the global FIFO (if that fails, its slot is on its way, and
    /// [`Grant::Orphan`] releases it on arrival).
    Cancel,
    /// It never took part (probe, refused, no breaker) or was already settled.
    Nothing,
}

/// What the worker must do when told one of its streams got a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// Resume the stream: it now holds the slot.
    Resume,
    /// The stream is gone: release the slot at once so it goes to the next waiter.
    Orphan,
}

/// One worker's streams that take part in the breaker, by context id.
#[derive(Debug, Clone, Default)]
pub struct Streams {
    slots: BTreeMap<u32, Slot>,
}

impl Streams {
    pub fn admitted(&mut self, context: u32) {
        self.slots.insert(context, Slot::Held);
    }

    pub fn queued(&mut self, context: u32, deadline: u64) {
        self.slots.insert(
            context,
            Slot::Queued {
                deadline: Some(deadline),
            },
        );
    }

    pub fn get(&self, context: u32) -> Option<Slot> {
        self.slots.get(&context).copied()
    }

    pub fn is_queued(&self, context: u32) -> bool {
        matches!(self.get(context), Some(Slot::Queued { .. }))
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The stream finished (its log or done callback); forgets it.
    pub fn finish(&mut self, context: u32) -> Finish {
        match self.slots.remove(&context) {
            Some(Slot::Held) => Finish::Release,
            Some(Slot::Queued { .. }) => Finish::Cancel,
            None => Finish::Nothing,
        }
    }

    /// The stream was handed a slot.
    pub fn grant(&mut self, context: u32) -> Grant {
        match self.slots.get_mut(&context) {
            Some(slot @ Slot::Queued { .. }) => {
                *slot = Slot::Held;
                Grant::Resume
            }
            // Held already cannot happen (one waiter entry per stream); releasing keeps the count right.
            Some(Slot::Held) | None => Grant::Orphan,
        }
    }

    /// Queued streams whose deadline is at or before `now`, earliest first.
    pub fn expired(&self, now: u64) -> Vec<u32> {
        let mut expired: Vec<(u64, u32)> = self
            .slots
            .iter()
            .filter_map(|(&context, slot)| match slot {
                Slot::Queued {
                    deadline: Some(deadline),
                } if *deadline <= now => Some((*deadline, context)),
                _ => None,
            })
            .collect();
        expired.sort_unstable();
        expired.into_iter().map(|(_, context)| context).collect()
    }

    /// A queued stream timed out and was removed from the global FIFO: forget it (it is answered 503).
    pub fn timed_out(&mut self, context: u32) {
        self.slots.remove(&context);
    }

    /// A queued stream timed out but was already handed a slot: keep it, with no deadline, until the slot
    /// arrives.
    pub fn slot_on_its_way(&mut self, context: u32) {
        if let Some(slot @ Slot::Queued { .. }) = self.slots.get_mut(&context) {
            *slot = Slot::Queued { deadline: None };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(capacity: u32, queue_depth: u32) -> Limits {
        Limits {
            capacity,
            queue_depth,
        }
    }

    fn w(queue: u32, context: u32) -> Waiter {
        Waiter { queue, context }
    }

    const NO_LEND: LeasePolicy = LeasePolicy { batch: 0 };

    /// One worker's arrival as the glue does it: its own idle slot first, else the shared state.
    fn arrive(
        s: &mut BreakerState,
        lease: &mut Lease,
        l: Limits,
        p: LeasePolicy,
        me: Waiter,
    ) -> (Arrival, Effects) {
        if lease.admit_local() {
            return (Arrival::Admitted, Effects::default());
        }
        lease.arrive(s, l, p, me)
    }

    fn release(s: &mut BreakerState, lease: &mut Lease, l: Limits) -> Vec<Waiter> {
        if lease.release_local() {
            return Vec::new();
        }
        lease.release(s, l).granted
    }

    #[test]
    fn admits_up_to_capacity_then_queues_then_overflows() {
        let l = limits(2, 3);
        let mut s = BreakerState::default();
        let mut lease = Lease::default();
        let arrivals: Vec<Arrival> = (0..7)
            .map(|i| arrive(&mut s, &mut lease, l, NO_LEND, w(1, i)).0)
            .collect();
        use Arrival::*;
        assert_eq!(
            arrivals,
            [
                Admitted, Admitted, Queued, Queued, Queued, Overflow, Overflow
            ]
        );
        assert_eq!(s.in_flight(), 2);
        assert_eq!(s.waiting(), 3);
        assert_eq!((lease.held(), lease.used()), (2, 2));
    }

    #[test]
    fn queue_depth_zero_refuses_everything_past_capacity() {
        let l = limits(1, 0);
        let mut s = BreakerState::default();
        let mut lease = Lease::default();
        let p = LeasePolicy::new(l);
        assert_eq!(
            arrive(&mut s, &mut lease, l, p, w(1, 1)).0,
            Arrival::Admitted
        );
        assert_eq!(
            arrive(&mut s, &mut lease, l, p, w(1, 2)).0,
            Arrival::Overflow
        );
        assert!(release(&mut s, &mut lease, l).is_empty());
        assert_eq!(
            arrive(&mut s, &mut lease, l, p, w(1, 3)).0,
            Arrival::Admitted
        );
    }

    #[test]
    fn workers_lend_only_with_room_to_lend_and_a_queue_to_wait_in() {
        assert!(!LeasePolicy::new(limits(1, 10)).lends());
        assert!(!LeasePolicy::new(limits(100, 0)).lends());
        assert_eq!(LeasePolicy::new(limits(2, 20)).batch(), 1);
        assert_eq!(LeasePolicy::new(limits(100, 1000)).batch(), 12);
    }

    #[test]
    fn a_release_hands_the_slot_to_the_head_in_fifo_order_across_workers() {
        let l = limits(1, 10);
        let mut s = BreakerState::default();
        let mut leases = [Lease::default(); 3];
        assert_eq!(
            arrive(&mut s, &mut leases[1], l, NO_LEND, w(1, 10)).0,
            Arrival::Admitted
        );
        // Waiters from two workers, interleaved.
        for waiter in [w(2, 20), w(1, 11), w(2, 21)] {
            let lease = &mut leases[waiter.queue as usize];
            assert_eq!(arrive(&mut s, lease, l, NO_LEND, waiter).0, Arrival::Queued);
        }
        assert_eq!(release(&mut s, &mut leases[1], l), [w(2, 20)]);
        assert_eq!(s.in_flight(), 1, "the slot moved, it was never free");
        leases[2].granted();
        assert_eq!(release(&mut s, &mut leases[2], l), [w(1, 11)]);
        leases[1].granted();
        assert_eq!(release(&mut s, &mut leases[1], l), [w(2, 21)]);
        leases[2].granted();
        assert!(release(&mut s, &mut leases[2], l).is_empty());
        assert_eq!(s, BreakerState::default());
        assert_eq!(leases, [Lease::default(); 3]);
    }

    #[test]
    fn an_arrival_never_jumps_the_queue() {
        let l = limits(1, 10);
        let mut s = BreakerState::default();
        let mut lease = Lease::default();
        arrive(&mut s, &mut lease, l, NO_LEND, w(1, 1));
        arrive(&mut s, &mut lease, l, NO_LEND, w(1, 2));
        // The slot was handed to 2; a newcomer waits behind nobody but must not take it.
        assert_eq!(release(&mut s, &mut lease, l), [w(1, 2)]);
        assert_eq!(
            arrive(&mut s, &mut lease, l, NO_LEND, w(1, 3)).0,
            Arrival::Queued
        );
    }

    #[test]
    fn cancel_removes_a_waiter_once() {
        let l = limits(1, 10);
        let mut s = BreakerState::default();
        let mut lease = Lease::default();
        for i in 1..=3 {
            arrive(&mut s, &mut lease, l, NO_LEND, w(1, i));
        }
        assert!(s.cancel(w(1, 2)));
        assert!(!s.cancel(w(1, 2)));
        assert_eq!(release(&mut s, &mut lease, l), [w(1, 3)]);
        // A waiter that already got the slot cannot cancel: its slot is on its way.
        assert!(!s.cancel(w(1, 3)));
    }

    #[test]
    fn raised_limits_grant_waiting_requests_at_the_next_event() {
        let mut s = BreakerState::default();
        let mut lease = Lease::default();
        for i in 1..=3 {
            arrive(&mut s, &mut lease, limits(1, 10), NO_LEND, w(1, i));
        }
        let (arrival, effects) = arrive(&mut s, &mut lease, limits(3, 10), NO_LEND, w(1, 4));
        assert_eq!(effects.granted, [w(1, 2), w(1, 3)]);
        assert_eq!(arrival, Arrival::Queued, "slots are full again");
        assert_eq!(s.in_flight(), 3);
    }

    #[test]
    fn lowered_limits_drain_before_anyone_is_handed_a_slot() {
        let mut s = BreakerState::default();
        let mut lease = Lease::default();
        for i in 0..3 {
            arrive(&mut s, &mut lease, limits(3, 10), NO_LEND, w(1, i));
        }
        arrive(&mut s, &mut lease, limits(1, 10), NO_LEND, w(1, 9));
        assert!(release(&mut s, &mut lease, limits(1, 10)).is_empty());
        assert!(release(&mut s, &mut lease, limits(1, 10)).is_empty());
        assert_eq!(release(&mut s, &mut lease, limits(1, 10)), [w(1, 9)]);
    }

    #[test]
    fn a_lender_admits_and_releases_without_the_shared_state() {
        let l = limits(16, 10);
        let p = LeasePolicy::new(l);
        assert_eq!(p.batch(), 2);
        let mut s = BreakerState::default();
        let mut lease = Lease::default();
        // The first arrival takes a batch and makes the worker a lender.
        assert_eq!(lease.arrive(&mut s, l, p, w(1, 1)).0, Arrival::Admitted);
        assert_eq!((s.in_flight(), s.lenders()), (2, &[1][..]));
        assert!(lease.lending());
        let before = s.clone();
        assert!(lease.admit_local(), "the second slot of the batch");
        assert!(!lease.admit_local(), "no idle slot left");
        assert!(lease.release_local());
        assert!(lease.admit_local());
        assert!(lease.release_local());
        assert!(lease.release_local());
        assert_eq!((lease.held(), lease.used(), lease.idle()), (2, 0, 2));
        assert_eq!(s, before, "all of it without the shared state");
    }

    #[test]
    fn a_waiter_reclaims_the_idle_slots_of_lenders() {
        let l = limits(4, 10);
        let p = LeasePolicy { batch: 2 };
        let mut s = BreakerState::default();
        let (mut a, mut b) = (Lease::default(), Lease::default());
        for i in 0..4 {
            assert_eq!(arrive(&mut s, &mut a, l, p, w(1, i)).0, Arrival::Admitted);
        }
        assert!(a.release_local() && a.release_local());
        assert_eq!((s.in_flight(), a.idle()), (4, 2));
        // B finds the pool empty: it queues, and A is told to give its idle slots back.
        let (arrival, effects) = arrive(&mut s, &mut b, l, p, w(2, 7));
        assert_eq!(arrival, Arrival::Queued);
        assert_eq!(effects.reclaim, [1]);
        assert!(s.lenders().is_empty());
        // Until it reads the Reclaim, A still admits from its idle slots (the one ordering exception).
        assert!(a.admit_local());
        // The Reclaim: A's last idle slot goes to the FIFO head.
        assert_eq!(a.give_back(&mut s, l, 1), [w(2, 7)]);
        assert!(!a.lending());
        assert_eq!(
            (a.held(), a.used(), s.in_flight(), s.waiting()),
            (3, 3, 4, 0)
        );
        b.granted();
        // Nobody waits: B's next arrival would lend again; A's releases go through the shared state.
        assert_eq!(release(&mut s, &mut a, l), []);
        assert_eq!(s.in_flight(), 3);
        assert_eq!(arrive(&mut s, &mut b, l, p, w(2, 8)).0, Arrival::Admitted);
        assert_eq!(s.lenders(), [2]);
    }

    #[test]
    fn a_lender_asked_to_give_back_does_it_at_its_next_arrival() {
        let l = limits(4, 10);
        let p = LeasePolicy { batch: 2 };
        let mut s = BreakerState::default();
        let (mut a, mut b) = (Lease::default(), Lease::default());
        arrive(&mut s, &mut a, l, p, w(1, 1));
        arrive(&mut s, &mut a, l, p, w(1, 2));
        arrive(&mut s, &mut b, l, p, w(2, 1));
        arrive(&mut s, &mut b, l, p, w(2, 2));
        assert_eq!(s.lenders(), [1, 2]);
        assert!(a.release_local());
        arrive(&mut s, &mut b, l, p, w(2, 3)); // queued; A and B told
        assert!(s.lenders().is_empty());
        // A has not read its Reclaim; an arrival that finds no idle slot... has one: admitted locally.
        assert!(a.admit_local());
        assert!(a.release_local());
        // A trim on its tick notices it is no longer a lender and gives everything back.
        assert_eq!(a.trim(&mut s, l, p, 1), [w(2, 3)]);
        assert!(!a.lending());
        // The Reclaim that arrives later finds nothing to do.
        assert_eq!(a.give_back(&mut s, l, 1), []);
        assert_eq!(s.in_flight(), 4);
    }

    #[test]
    fn a_lender_trims_its_idle_slots_to_one_batch() {
        let l = limits(40, 10);
        let p = LeasePolicy::new(l);
        let mut s = BreakerState::default();
        let mut lease = Lease::default();
        for i in 0..12 {
            arrive(&mut s, &mut lease, l, p, w(1, i));
        }
        assert_eq!((lease.held(), s.in_flight()), (15, 15));
        for _ in 0..10 {
            lease.release_local();
        }
        assert_eq!(lease.trim(&mut s, l, p, 1), []);
        assert_eq!((lease.held(), lease.used(), s.in_flight()), (7, 2, 7));
        assert!(lease.lending());
    }

    #[test]
    fn an_overflow_also_brings_idle_slots_back() {
        // Lowered capacity: the pool is over the new limit while a lender sits on idle slots.
        let mut s = BreakerState::default();
        let (mut a, mut b) = (Lease::default(), Lease::default());
        let p = LeasePolicy { batch: 4 };
        arrive(&mut s, &mut a, limits(8, 2), p, w(1, 1));
        let (arrival, effects) = arrive(&mut s, &mut b, limits(2, 0), NO_LEND, w(2, 1));
        assert_eq!(arrival, Arrival::Overflow);
        assert_eq!(effects.reclaim, [1]);
        assert!(a.give_back(&mut s, limits(2, 0), 1).is_empty());
        assert_eq!(s.in_flight(), 1);
        assert_eq!(
            arrive(&mut s, &mut b, limits(2, 0), NO_LEND, w(2, 2)).0,
            Arrival::Admitted
        );
    }

    #[test]
    fn state_round_trips_through_bytes() {
        let l = limits(2, 10);
        let mut s = BreakerState::default();
        let mut leases = [Lease::default(); 2];
        for i in 0..5 {
            let q = i % 2;
            arrive(&mut s, &mut leases[q as usize], l, NO_LEND, w(q, i));
        }
        s.add_lender(3);
        s.add_lender(4);
        let bytes = s.encode();
        assert_eq!(bytes.len(), 13 + 4 * 2 + 8 * 3);
        assert_eq!(BreakerState::decode(&bytes), Ok(s));
        assert_eq!(
            BreakerState::decode(&BreakerState::default().encode()),
            Ok(BreakerState::default())
        );
    }

    #[test]
    fn malformed_state_is_an_error_not_a_panic() {
        let good = {
            let mut s = BreakerState::default();
            Lease::default().arrive(&mut s, limits(0, 5), NO_LEND, w(1, 2));
            s.add_lender(9);
            s.encode()
        };
        for cut in 0..good.len() {
            assert!(BreakerState::decode(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = good.clone();
        longer.extend_from_slice(&[0; 4]);
        assert!(BreakerState::decode(&longer).is_err());
        let mut huge_count = good.clone();
        huge_count[5..9].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(BreakerState::decode(&huge_count).is_err());
        let mut wrong_version = good;
        wrong_version[0] = 9;
        assert_eq!(
            BreakerState::decode(&wrong_version),
            Err(DecodeError::Version(9))
        );
    }

    #[test]
    fn messages_round_trip_and_junk_is_refused() {
        for m in [
            Message::Granted(0),
            Message::Granted(u32::MAX),
            Message::Reclaim,
        ] {
            assert_eq!(Message::decode(&m.encode()), Some(m));
        }
        for junk in [&[][..], &[1, 0], &[0, 1, 2, 3], &[2]] {
            assert_eq!(Message::decode(junk), None);
        }
    }

    #[test]
    fn streams_track_slots_grants_and_finishes() {
        let mut streams = Streams::default();
        streams.admitted(1);
        streams.queued(2, 100);
        streams.queued(3, 50);
        assert!(streams.is_queued(2));
        assert_eq!(streams.expired(49), Vec::<u32>::new());
        assert_eq!(streams.expired(100), [3, 2]);

        assert_eq!(streams.grant(2), Grant::Resume);
        assert_eq!(streams.get(2), Some(Slot::Held));
        assert_eq!(streams.finish(2), Finish::Release);
        assert_eq!(streams.finish(2), Finish::Nothing, "settled once");
        assert_eq!(streams.finish(3), Finish::Cancel);
        // A slot for a stream that finished while queued is an orphan: release it.
        assert_eq!(streams.grant(3), Grant::Orphan);
        assert_eq!(streams.finish(1), Finish::Release);
        assert!(streams.is_empty());
    }

    #[test]
    fn a_timed_out_stream_whose_slot_is_on_its_way_waits_for_it() {
        let mut streams = Streams::default();
        streams.queued(5, 10);
        streams.slot_on_its_way(5);
        assert!(streams.expired(u64::MAX).is_empty());
        assert_eq!(streams.grant(5), Grant::Resume);
        streams.queued(6, 10);
        streams.timed_out(6);
        assert_eq!(streams.finish(6), Finish::Nothing);
    }

    /// One simulated worker: its lease, its streams, its shared queue.
    #[derive(Default)]
    struct SimWorker {
        lease: Lease,
        streams: Streams,
        inbox: VecDeque<Message>,
        running: Vec<u32>,
    }

    struct Sim {
        l: Limits,
        p: LeasePolicy,
        global: BreakerState,
        workers: Vec<SimWorker>,
        /// The arrival order of queued waiters, to check that slots go out in that order.
        queued_seq: BTreeMap<Waiter, u64>,
        next_seq: u64,
        last_granted_seq: Option<u64>,
    }

    impl Sim {
        fn carry_out(&mut self, effects: Effects) {
            for g in effects.granted {
                let seq = self
                    .queued_seq
                    .remove(&g)
                    .expect("a granted waiter had queued");
                assert!(
                    self.last_granted_seq.is_none_or(|last| seq > last),
                    "FIFO: slot for waiter #{seq} after #{:?}",
                    self.last_granted_seq
                );
                self.last_granted_seq = Some(seq);
                self.workers[g.queue as usize]
                    .inbox
                    .push_back(Message::Granted(g.context));
            }
            for q in effects.reclaim {
                self.workers[q as usize].inbox.push_back(Message::Reclaim);
            }
        }

        fn release(&mut self, worker: usize) {
            let me = &mut self.workers[worker];
            if !me.lease.release_local() {
                let effects = me.lease.release(&mut self.global, self.l);
                self.carry_out(effects);
            }
        }

        fn read_inbox(&mut self, worker: usize) {
            while let Some(message) = self.workers[worker].inbox.pop_front() {
                let me = &mut self.workers[worker];
                match message {
                    Message::Granted(context) => {
                        me.lease.granted();
                        match me.streams.grant(context) {
                            Grant::Resume => me.running.push(context),
                            Grant::Orphan => self.release(worker),
                        }
                    }
                    Message::Reclaim => {
                        if me.lease.lending() {
                            let granted =
                                me.lease.give_back(&mut self.global, self.l, worker as u32);
                            self.carry_out(Effects {
                                granted,
                                reclaim: Vec::new(),
                            });
                        }
                    }
                }
            }
        }

        fn check(&self, step: usize) {
            let running: usize = self.workers.iter().map(|w| w.running.len()).sum();
            assert!(running <= self.l.capacity as usize, "step {step}");
            let held: u32 = self.workers.iter().map(|w| w.lease.held()).sum();
            assert!(held <= self.global.in_flight(), "step {step}");
            assert!(self.global.in_flight() <= self.l.capacity, "step {step}");
            for (i, w) in self.workers.iter().enumerate() {
                assert_eq!(w.running.len() as u32, w.lease.used(), "step {step}");
                if self.global.lenders().contains(&(i as u32)) {
                    assert!(w.lease.lending(), "step {step}: listed but not lending");
                }
                // No lost wake-up: while anyone waits, idle slots are on their way back.
                if self.global.waiting() > 0 && w.lease.idle() > 0 {
                    assert!(
                        w.inbox.contains(&Message::Reclaim),
                        "step {step}: worker {i} sits on idle slots while someone waits"
                    );
                }
            }
            if self.global.waiting() > 0 {
                assert!(self.global.lenders().is_empty(), "step {step}");
            }
        }
    }

    /// A model of several workers sharing one BreakerState, with messages delivered late, lenders
    /// trimming on ticks, and streams cancelling at random points: the limit holds at every step, slots
    /// go out in FIFO order, nobody waits forever, and every slot comes back.
    fn simulate(l: Limits, p: LeasePolicy, mut seed: u64) {
        let mut rand = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let workers = 3u32;
        let mut sim = Sim {
            l,
            p,
            global: BreakerState::default(),
            workers: (0..workers).map(|_| SimWorker::default()).collect(),
            queued_seq: BTreeMap::new(),
            next_seq: 0,
            last_granted_seq: None,
        };
        let mut next_context = 1u32;
        let (mut served, mut cancelled, mut refused, mut local) = (0u32, 0u32, 0u32, 0u32);
        for step in 0..30_000 {
            let worker = rand(u64::from(workers)) as usize;
            // Heavy load (the breaker fills, requests queue) and light load (lenders serve) in turns.
            let heavy = (step / 2000) % 2 == 0;
            let choice = match rand(6) {
                1 if !heavy => 2,
                choice => choice,
            };
            match choice {
                // A request arrives.
                0 | 1 if step < 25_000 => {
                    let context = next_context;
                    next_context += 1;
                    let me = &mut sim.workers[worker];
                    if me.lease.admit_local() {
                        me.streams.admitted(context);
                        me.running.push(context);
                        local += 1;
                    } else {
                        let waiter = w(worker as u32, context);
                        let (arrival, effects) = me.lease.arrive(&mut sim.global, l, p, waiter);
                        match arrival {
                            Arrival::Admitted => {
                                me.streams.admitted(context);
                                me.running.push(context);
                            }
                            Arrival::Queued => {
                                me.streams.queued(context, 0);
                                sim.queued_seq.insert(waiter, sim.next_seq);
                                sim.next_seq += 1;
                            }
                            Arrival::Overflow => refused += 1,
                        }
                        sim.carry_out(effects);
                    }
                }
                // A running request finishes.
                2 if !sim.workers[worker].running.is_empty() => {
                    let me = &mut sim.workers[worker];
                    let context = me
                        .running
                        .swap_remove(rand(me.running.len() as u64) as usize);
                    assert_eq!(me.streams.finish(context), Finish::Release);
                    sim.release(worker);
                    served += 1;
                }
                // The worker reads its shared queue.
                3 => sim.read_inbox(worker),
                // Its tick.
                4 => {
                    let me = &mut sim.workers[worker];
                    if me.lease.lending() && me.lease.idle() > sim.p.batch() {
                        let granted = me.lease.trim(&mut sim.global, l, p, worker as u32);
                        sim.carry_out(Effects {
                            granted,
                            reclaim: Vec::new(),
                        });
                    }
                }
                // A queued client goes away.
                _ => {
                    let me = &mut sim.workers[worker];
                    let queued = me
                        .streams
                        .slots
                        .iter()
                        .find_map(|(c, s)| matches!(s, Slot::Queued { .. }).then_some(*c));
                    if let Some(context) = queued {
                        assert_eq!(me.streams.finish(context), Finish::Cancel);
                        let waiter = w(worker as u32, context);
                        if sim.global.cancel(waiter) {
                            sim.queued_seq.remove(&waiter);
                        }
                        cancelled += 1;
                    }
                }
            }
            sim.check(step);
        }
        // Drain: finish everything, deliver every message.
        loop {
            if let Some(worker) = sim.workers.iter().position(|w| !w.running.is_empty()) {
                let context = sim.workers[worker].running.pop().unwrap();
                sim.workers[worker].streams.finish(context);
                sim.release(worker);
                served += 1;
            } else if let Some(worker) = sim.workers.iter().position(|w| !w.inbox.is_empty()) {
                sim.read_inbox(worker);
            } else {
                break;
            }
            sim.check(usize::MAX);
        }
        assert!(
            sim.workers.iter().all(|w| w.streams.is_empty()),
            "nobody waits forever"
        );
        // The plugins go away: lenders give their idle slots back.
        for worker in 0..workers {
            let me = &mut sim.workers[worker as usize];
            assert!(me.lease.give_back(&mut sim.global, l, worker).is_empty());
        }
        assert_eq!(sim.global, BreakerState::default(), "every slot came back");
        assert_eq!(served + cancelled + refused, next_context - 1);
        assert!(
            served > 1000 && refused > 0 && cancelled > 0,
            "{served} {refused} {cancelled}"
        );
        if p.lends() {
            assert!(local > 500, "lenders admitted {local} locally");
        }
    }

    #[test]
    fn simulated_workers_never_exceed_the_limit_and_never_lose_a_slot() {
        simulate(limits(3, 12), NO_LEND, 0x2545_f491_4f6c_dd1d);
    }

    #[test]
    fn simulated_lending_workers_never_exceed_the_limit_and_never_lose_a_slot() {
        for seed in [0x2545_f491_4f6c_dd1d, 0x9e37_79b9_7f4a_7c15, 42] {
            simulate(limits(6, 12), LeasePolicy { batch: 2 }, seed);
            simulate(limits(6, 12), LeasePolicy { batch: 1 }, seed);
        }
    }
}
