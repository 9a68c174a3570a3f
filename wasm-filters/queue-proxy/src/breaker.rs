//! Knative's breaker (pkg/queue/breaker.go), split so it holds across Envoy worker threads, each of which
//! runs its own wasm VM:
//!
//! - [`BreakerState`]: the one global state, kept in Envoy's shared data and changed only by
//!   compare-and-swap: the slots in use and ONE FIFO of waiting requests from every worker. Each waiter
//!   is named by its worker's shared queue and its stream's context id. A finished request hands its
//!   slot straight to the head of the FIFO (the slot count does not drop while anyone waits), and the
//!   worker that holds the head is told through its shared queue. So the order is global FIFO, the limit
//!   holds at every instant, and no wake-up can be lost: a slot is either counted free or owned by a
//!   named waiter whose worker has a message for it.
//! - [`Streams`]: one worker's view of its own streams that took part (holding a slot, or queued with a
//!   deadline), so it knows what to do when a stream finishes, times out, or receives a slot.
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
    #[error("breaker state has format version {0}, want 1")]
    Version(u8),
}

/// The global breaker state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BreakerState {
    /// Slots in use, including slots handed to a waiter whose worker has not resumed it yet.
    in_flight: u32,
    waiting: VecDeque<Waiter>,
}

const FORMAT_VERSION: u8 = 1;

impl BreakerState {
    pub fn in_flight(&self) -> u32 {
        self.in_flight
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// A request arrives. Knative: at most containerConcurrency + queueDepth requests are pending
    /// (holding a slot or waiting); the rest are refused at once. Returns what happens to it and the
    /// waiters that were given a slot on the way (only after the limits were raised by a new config).
    pub fn arrive(&mut self, limits: Limits, me: Waiter) -> (Arrival, Vec<Waiter>) {
        let granted = self.fill(limits);
        let pending = u64::from(self.in_flight) + self.waiting.len() as u64;
        let max_pending = u64::from(limits.capacity) + u64::from(limits.queue_depth);
        let arrival = if pending >= max_pending {
            Arrival::Overflow
        } else if self.in_flight < limits.capacity && self.waiting.is_empty() {
            self.in_flight += 1;
            Arrival::Admitted
        } else {
            self.waiting.push_back(me);
            Arrival::Queued
        };
        (arrival, granted)
    }

    /// A request that held a slot finished. Returns the waiters that now hold a slot: their workers must
    /// resume them (or release the slot again if they are gone).
    pub fn release(&mut self, limits: Limits) -> Vec<Waiter> {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.fill(limits)
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

    /// Hands free slots to waiters, in FIFO order.
    fn fill(&mut self, limits: Limits) -> Vec<Waiter> {
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

    /// Bytes for shared data: version, in-flight count, waiter count, then (queue, context) pairs; all
    /// little-endian u32.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(9 + 8 * self.waiting.len());
        out.push(FORMAT_VERSION);
        out.extend_from_slice(&self.in_flight.to_le_bytes());
        let count = u32::try_from(self.waiting.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&count.to_le_bytes());
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
        let mut words = rest
            .chunks(4)
            .map(|c| <[u8; 4]>::try_from(c).map(u32::from_le_bytes));
        let mut next = || words.next().and_then(Result::ok).ok_or_else(malformed);
        let in_flight = next()?;
        let count = next()?;
        if rest.len() != 8 + 8 * count as usize {
            return Err(malformed());
        }
        let mut waiting = VecDeque::with_capacity(count as usize);
        for _ in 0..count {
            waiting.push_back(Waiter {
                queue: next()?,
                context: next()?,
            });
        }
        Ok(BreakerState { in_flight, waiting })
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

    #[test]
    fn admits_up_to_capacity_then_queues_then_overflows() {
        let l = limits(2, 3);
        let mut s = BreakerState::default();
        let arrivals: Vec<Arrival> = (0..7).map(|i| s.arrive(l, w(1, i)).0).collect();
        use Arrival::*;
        assert_eq!(
            arrivals,
            [
                Admitted, Admitted, Queued, Queued, Queued, Overflow, Overflow
            ]
        );
        assert_eq!(s.in_flight(), 2);
        assert_eq!(s.waiting(), 3);
    }

    #[test]
    fn queue_depth_zero_refuses_everything_past_capacity() {
        let l = limits(1, 0);
        let mut s = BreakerState::default();
        assert_eq!(s.arrive(l, w(1, 1)).0, Arrival::Admitted);
        assert_eq!(s.arrive(l, w(1, 2)).0, Arrival::Overflow);
        assert!(s.release(l).is_empty());
        assert_eq!(s.arrive(l, w(1, 3)).0, Arrival::Admitted);
    }

    #[test]
    fn a_release_hands_the_slot_to_the_head_in_fifo_order_across_workers() {
        let l = limits(1, 10);
        let mut s = BreakerState::default();
        assert_eq!(s.arrive(l, w(1, 10)).0, Arrival::Admitted);
        // Waiters from two workers, interleaved.
        for waiter in [w(2, 20), w(1, 11), w(2, 21)] {
            assert_eq!(s.arrive(l, waiter).0, Arrival::Queued);
        }
        assert_eq!(s.release(l), [w(2, 20)]);
        assert_eq!(s.in_flight(), 1, "the slot moved, it was never free");
        assert_eq!(s.release(l), [w(1, 11)]);
        assert_eq!(s.release(l), [w(2, 21)]);
        assert!(s.release(l).is_empty());
        assert_eq!(s.in_flight(), 0);
    }

    #[test]
    fn an_arrival_never_jumps_the_queue() {
        let l = limits(1, 10);
        let mut s = BreakerState::default();
        s.arrive(l, w(1, 1));
        s.arrive(l, w(1, 2));
        // The slot was handed to 2; a newcomer waits behind nobody but must not take it.
        assert_eq!(s.release(l), [w(1, 2)]);
        assert_eq!(s.arrive(l, w(1, 3)).0, Arrival::Queued);
    }

    #[test]
    fn cancel_removes_a_waiter_once() {
        let l = limits(1, 10);
        let mut s = BreakerState::default();
        s.arrive(l, w(1, 1));
        s.arrive(l, w(1, 2));
        s.arrive(l, w(1, 3));
        assert!(s.cancel(w(1, 2)));
        assert!(!s.cancel(w(1, 2)));
        assert_eq!(s.release(l), [w(1, 3)]);
        // A waiter that already got the slot cannot cancel: its slot is on its way.
        assert!(!s.cancel(w(1, 3)));
    }

    #[test]
    fn raised_limits_grant_waiting_requests_at_the_next_event() {
        let mut s = BreakerState::default();
        s.arrive(limits(1, 10), w(1, 1));
        s.arrive(limits(1, 10), w(1, 2));
        s.arrive(limits(1, 10), w(1, 3));
        let (arrival, granted) = s.arrive(limits(3, 10), w(1, 4));
        assert_eq!(granted, [w(1, 2), w(1, 3)]);
        assert_eq!(arrival, Arrival::Queued, "slots are full again");
        assert_eq!(s.in_flight(), 3);
    }

    #[test]
    fn lowered_limits_drain_before_anyone_is_handed_a_slot() {
        let mut s = BreakerState::default();
        for i in 0..3 {
            s.arrive(limits(3, 10), w(1, i));
        }
        s.arrive(limits(1, 10), w(1, 9));
        assert!(s.release(limits(1, 10)).is_empty());
        assert!(s.release(limits(1, 10)).is_empty());
        assert_eq!(s.release(limits(1, 10)), [w(1, 9)]);
    }

    #[test]
    fn state_round_trips_through_bytes() {
        let l = limits(2, 10);
        let mut s = BreakerState::default();
        for i in 0..5 {
            s.arrive(l, w(7 + i % 2, i));
        }
        let bytes = s.encode();
        assert_eq!(bytes.len(), 9 + 8 * 3);
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
            s.arrive(limits(0, 5), w(1, 2));
            s.encode()
        };
        for cut in 0..good.len() {
            assert!(BreakerState::decode(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = good.clone();
        longer.push(0);
        assert!(BreakerState::decode(&longer).is_err());
        let mut wrong_version = good;
        wrong_version[0] = 9;
        assert_eq!(
            BreakerState::decode(&wrong_version),
            Err(DecodeError::Version(9))
        );
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

    /// A model of several workers sharing one BreakerState, with messages delivered late and streams
    /// cancelling at random points: the limit holds at every step, nobody waits forever, and every slot
    /// comes back.
    #[test]
    fn simulated_workers_never_exceed_the_limit_and_never_lose_a_slot() {
        let l = limits(3, 12);
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rand = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let mut global = BreakerState::default();
        let workers = 3u32;
        let mut streams: Vec<Streams> = (0..workers).map(|_| Streams::default()).collect();
        let mut inboxes: Vec<VecDeque<u32>> = (0..workers).map(|_| VecDeque::new()).collect();
        let mut running: Vec<(u32, u32)> = Vec::new(); // (worker, context) proxied now
        let mut next_context = 1u32;
        let mut served = 0u32;
        let mut cancelled = 0u32;
        let mut refused = 0u32;
        let deliver = |inboxes: &mut Vec<VecDeque<u32>>, granted: Vec<Waiter>| {
            for g in granted {
                inboxes[g.queue as usize].push_back(g.context);
            }
        };
        for step in 0..20_000 {
            match rand(4) {
                // A request arrives on some worker.
                0 if step < 15_000 => {
                    let worker = rand(u64::from(workers)) as u32;
                    let context = next_context;
                    next_context += 1;
                    let (arrival, granted) = global.arrive(l, w(worker, context));
                    deliver(&mut inboxes, granted);
                    match arrival {
                        Arrival::Admitted => {
                            streams[worker as usize].admitted(context);
                            running.push((worker, context));
                        }
                        Arrival::Queued => streams[worker as usize].queued(context, 0),
                        Arrival::Overflow => refused += 1,
                    }
                }
                // A running request finishes.
                1 if !running.is_empty() => {
                    let (worker, context) =
                        running.swap_remove(rand(running.len() as u64) as usize);
                    assert_eq!(streams[worker as usize].finish(context), Finish::Release);
                    deliver(&mut inboxes, global.release(l));
                    served += 1;
                }
                // A worker reads its shared queue.
                2 => {
                    let worker = rand(u64::from(workers)) as usize;
                    while let Some(context) = inboxes[worker].pop_front() {
                        match streams[worker].grant(context) {
                            Grant::Resume => running.push((worker as u32, context)),
                            Grant::Orphan => deliver(&mut inboxes, global.release(l)),
                        }
                    }
                }
                // A queued client goes away.
                _ => {
                    let worker = rand(u64::from(workers)) as usize;
                    let queued: Vec<u32> = streams[worker]
                        .slots
                        .iter()
                        .filter(|(_, s)| matches!(s, Slot::Queued { .. }))
                        .map(|(c, _)| *c)
                        .collect();
                    if let Some(&context) = queued.first() {
                        assert_eq!(streams[worker].finish(context), Finish::Cancel);
                        global.cancel(w(worker as u32, context));
                        cancelled += 1;
                    }
                }
            }
            assert!(running.len() <= l.capacity as usize, "step {step}");
            assert!(global.in_flight() <= l.capacity, "step {step}");
            assert!(running.len() <= global.in_flight() as usize);
        }
        // Drain: finish everything, deliver every message.
        loop {
            if let Some((worker, context)) = running.pop() {
                streams[worker as usize].finish(context);
                deliver(&mut inboxes, global.release(l));
                served += 1;
                continue;
            }
            let Some(worker) = inboxes.iter().position(|i| !i.is_empty()) else {
                break;
            };
            let context = inboxes[worker].pop_front().unwrap();
            match streams[worker].grant(context) {
                Grant::Resume => running.push((worker as u32, context)),
                Grant::Orphan => deliver(&mut inboxes, global.release(l)),
            }
        }
        assert_eq!(global, BreakerState::default(), "every slot came back");
        assert!(
            streams.iter().all(Streams::is_empty),
            "nobody waits forever"
        );
        assert_eq!(served + cancelled + refused, next_context - 1);
        assert!(served > 1000 && refused > 0 && cancelled > 0);
    }
}
