//! One revision instance's queue-proxy state, shared by every Envoy worker thread and every filter
//! configuration that names the instance: the breaker, the streams that take part in it, and the
//! autoscaler's windows. Natively the workers share memory, so this is one value behind one lock; the
//! decisions are the wasm filter's pure core (`sluice_queue_proxy_core::{breaker, stats}`), here with a
//! [`LeasePolicy::exclusive`] lease (no lending: taking the lock costs what a lease would save).
//!
//! No Envoy calls: a stream that must be resumed or answered later is told through its [`Wake`]
//! (natively, the stream's Envoy scheduler, which runs the event on the stream's own worker). So this
//! module is unit-tested with plain values.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use sluice_queue_proxy_core::breaker::{Arrival, BreakerState, Lease, LeasePolicy, Waiter};
use sluice_queue_proxy_core::config::Limits;
use sluice_queue_proxy_core::stats::{Report, WINDOW, Windows};

/// What a stream is told later, on its own worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// It was handed a slot: continue the request.
    Granted = 1,
    /// Its queue timeout passed: answer 503 `context deadline exceeded`.
    TimedOut = 2,
}

impl Event {
    pub fn from_id(id: u64) -> Option<Event> {
        match id {
            1 => Some(Event::Granted),
            2 => Some(Event::TimedOut),
            _ => None,
        }
    }
}

/// How a queued stream is woken on its own worker. Called with the instance's lock held, so it must
/// only post the event (never run the stream inline).
pub trait Wake: Send {
    fn wake(&self, event: Event);
}

/// What happens to an arriving user request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Proxy it now (it holds a slot, or there is no breaker).
    Proceed,
    /// It waits for a slot; a [`Event::Granted`] or [`Event::TimedOut`] follows.
    Wait,
    /// Slots and queue are full: 503 `pending request queue full`.
    Overflow,
}

enum Place<W> {
    /// Holds a slot.
    Held,
    /// Waits in the FIFO until `deadline` (nanoseconds since the epoch).
    Queued { deadline: u64, waker: W },
    /// Was handed a slot; its [`Event::Granted`] is on its way.
    Granted,
    /// Timed out and left the FIFO; its [`Event::TimedOut`] is on its way.
    TimedOut,
}

/// Totals since the instance was created, and the figures of the last closed window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub report: Option<Report>,
    pub requests_total: u64,
    pub proxied_requests_total: u64,
    pub overflow_total: u64,
    pub queue_timeout_total: u64,
    /// Streams holding a slot (breaker only).
    pub in_flight: u64,
    /// Streams waiting for a slot.
    pub queued: u64,
}

struct Inner<W> {
    limits: Option<Limits>,
    queue_timeout: Duration,
    breaker: BreakerState,
    lease: Lease,
    streams: HashMap<u32, Place<W>>,
    windows: Windows,
    snapshot: Snapshot,
}

pub struct Instance<W> {
    inner: Mutex<Inner<W>>,
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl<W: Wake> Instance<W> {
    pub fn new(limits: Option<Limits>, queue_timeout: Duration, now: u64) -> Instance<W> {
        Instance {
            inner: Mutex::new(Inner {
                limits,
                queue_timeout,
                breaker: BreakerState::default(),
                lease: Lease::default(),
                streams: HashMap::new(),
                windows: Windows::new(WINDOW, now),
                snapshot: Snapshot::default(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<W>> {
        // A panic elsewhere while holding the lock leaves counts that are still consistent enough to go
        // on with; refusing every later request would be worse.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A newer configuration of the same instance (containerConcurrency or queue timeout changed). A
    /// lower limit drains before anyone new is admitted; a higher one serves waiters at the next event.
    pub fn reconfigure(&self, limits: Option<Limits>, queue_timeout: Duration) {
        let mut guard = self.lock();
        let inner = &mut *guard;
        inner.limits = limits;
        inner.queue_timeout = queue_timeout;
        if limits.is_none() {
            // No breaker any more: nobody waits.
            let granted = inner.breaker.fill(effective(None));
            grant(inner, granted);
        }
    }

    /// A user request arrived (counted before the breaker, as Knative counts: queued requests count
    /// toward concurrency). `waker` is only called when the request must wait.
    pub fn arrive(
        &self,
        stream: u32,
        proxied: bool,
        now: u64,
        waker: impl FnOnce() -> W,
    ) -> Admission {
        let mut guard = self.lock();
        let inner = &mut *guard;
        if let Some(report) = inner.windows.request_in(now, proxied) {
            inner.snapshot.report = Some(report);
        }
        inner.snapshot.requests_total += 1;
        if proxied {
            inner.snapshot.proxied_requests_total += 1;
        }
        let Some(limits) = inner.limits else {
            return Admission::Proceed;
        };
        let me = Waiter {
            queue: 0,
            context: stream,
        };
        let (arrival, effects) =
            inner
                .lease
                .arrive(&mut inner.breaker, limits, LeasePolicy::exclusive(), me);
        grant(inner, effects.granted);
        match arrival {
            Arrival::Admitted => {
                inner.streams.insert(stream, Place::Held);
                Admission::Proceed
            }
            Arrival::Queued => {
                let deadline = now.saturating_add(nanos(inner.queue_timeout));
                let waker = waker();
                inner
                    .streams
                    .insert(stream, Place::Queued { deadline, waker });
                Admission::Wait
            }
            Arrival::Overflow => {
                inner.snapshot.overflow_total += 1;
                Admission::Overflow
            }
        }
    }

    /// The stream's [`Event::Granted`] arrived on its worker: true when it holds the slot now and must
    /// continue (false: it finished meanwhile, and its slot went back then).
    pub fn resume(&self, stream: u32) -> bool {
        let mut inner = self.lock();
        match inner.streams.get_mut(&stream) {
            Some(place @ Place::Granted) => {
                *place = Place::Held;
                true
            }
            _ => false,
        }
    }

    /// Whether the stream still waits (its body and trailers must wait too).
    pub fn is_waiting(&self, stream: u32) -> bool {
        matches!(
            self.lock().streams.get(&stream),
            Some(Place::Queued { .. } | Place::Granted)
        )
    }

    /// The stream ended, however it ended (answered, refused, client gone). `counted`: Some(proxied)
    /// when [`Instance::arrive`] counted it.
    pub fn finish(&self, stream: u32, counted: Option<bool>, now: u64) {
        let mut guard = self.lock();
        let inner = &mut *guard;
        if let Some(proxied) = counted
            && let Some(report) = inner.windows.request_out(now, proxied)
        {
            inner.snapshot.report = Some(report);
        }
        let Some(place) = inner.streams.remove(&stream) else {
            return;
        };
        let limits = effective(inner.limits);
        match place {
            // A granted stream that never resumed holds its slot too: it goes back.
            Place::Held | Place::Granted => {
                let effects = inner.lease.release(&mut inner.breaker, limits);
                grant(inner, effects.granted);
            }
            Place::Queued { .. } => {
                inner.breaker.cancel(Waiter {
                    queue: 0,
                    context: stream,
                });
            }
            Place::TimedOut => {}
        }
    }

    /// The periodic tick (100 ms): closes the autoscaler's window, times out queued streams, and
    /// returns the figures to publish.
    pub fn tick(&self, now: u64) -> Snapshot {
        let mut guard = self.lock();
        let inner = &mut *guard;
        if let Some(report) = inner.windows.advance(now) {
            inner.snapshot.report = Some(report);
        }
        let mut expired: Vec<(u64, u32)> = inner
            .streams
            .iter()
            .filter_map(|(&stream, place)| match place {
                Place::Queued { deadline, .. } if *deadline <= now => Some((*deadline, stream)),
                _ => None,
            })
            .collect();
        expired.sort_unstable();
        for (_, stream) in expired {
            inner.breaker.cancel(Waiter {
                queue: 0,
                context: stream,
            });
            if let Some(Place::Queued { waker, .. }) = inner.streams.insert(stream, Place::TimedOut)
            {
                waker.wake(Event::TimedOut);
            }
            inner.snapshot.queue_timeout_total += 1;
        }
        let mut snapshot = inner.snapshot;
        snapshot.in_flight = inner
            .streams
            .values()
            .filter(|p| matches!(p, Place::Held | Place::Granted))
            .count() as u64;
        snapshot.queued = inner
            .streams
            .values()
            .filter(|p| matches!(p, Place::Queued { .. }))
            .count() as u64;
        snapshot
    }
}

/// The limits slots are counted against; with no breaker (a configuration dropped it while streams
/// held slots) every waiter may go.
fn effective(limits: Option<Limits>) -> Limits {
    limits.unwrap_or(Limits {
        capacity: u32::MAX,
        queue_depth: 0,
    })
}

/// Hands the slots to the waiters the breaker chose, and wakes them.
fn grant<W: Wake>(inner: &mut Inner<W>, granted: Vec<Waiter>) {
    for waiter in granted {
        match inner.streams.insert(waiter.context, Place::Granted) {
            Some(Place::Queued { waker, .. }) => waker.wake(Event::Granted),
            // Cannot happen (only queued streams are in the FIFO); keep the books right regardless.
            Some(other) => {
                inner.streams.insert(waiter.context, other);
            }
            None => {
                inner.streams.remove(&waiter.context);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// Records the events a stream was sent.
    #[derive(Clone, Default)]
    struct Inbox(Arc<Mutex<Vec<Event>>>);

    impl Wake for Inbox {
        fn wake(&self, event: Event) {
            self.0.lock().unwrap().push(event);
        }
    }

    impl Inbox {
        fn take(&self) -> Vec<Event> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    const SECOND: u64 = 1_000_000_000;

    fn breaker(capacity: u32, queue_depth: u32) -> Instance<Inbox> {
        Instance::new(
            Some(Limits {
                capacity,
                queue_depth,
            }),
            Duration::from_secs(2),
            10 * SECOND,
        )
    }

    #[test]
    fn no_breaker_lets_everything_through_and_counts_it() {
        let i: Instance<Inbox> = Instance::new(None, Duration::from_secs(1), 0);
        for s in 0..5 {
            assert_eq!(
                i.arrive(s, s % 2 == 0, 1, || unreachable!()),
                Admission::Proceed
            );
        }
        let snap = i.tick(2);
        assert_eq!(snap.requests_total, 5);
        assert_eq!(snap.proxied_requests_total, 3);
        assert_eq!(snap.in_flight, 0);
    }

    #[test]
    fn slots_go_to_waiters_in_fifo_order_and_the_queue_overflows() {
        let i = breaker(1, 2);
        let t = 10 * SECOND;
        assert_eq!(i.arrive(1, false, t, Inbox::default), Admission::Proceed);
        let (a, b) = (Inbox::default(), Inbox::default());
        assert_eq!(i.arrive(2, false, t, || a.clone()), Admission::Wait);
        assert_eq!(i.arrive(3, false, t, || b.clone()), Admission::Wait);
        assert_eq!(i.arrive(4, false, t, Inbox::default), Admission::Overflow);
        assert!(i.is_waiting(2));

        i.finish(1, Some(false), t + 1);
        assert_eq!(a.take(), vec![Event::Granted]);
        assert!(b.take().is_empty());
        assert!(i.resume(2));
        assert!(!i.is_waiting(2));

        i.finish(4, Some(false), t + 1);
        i.finish(2, Some(false), t + 2);
        assert_eq!(b.take(), vec![Event::Granted]);
        let snap = i.tick(t + 3);
        assert_eq!(
            (snap.in_flight, snap.queued, snap.overflow_total),
            (1, 0, 1)
        );
    }

    #[test]
    fn a_granted_stream_that_is_gone_gives_its_slot_to_the_next() {
        let i = breaker(1, 5);
        let t = 10 * SECOND;
        i.arrive(1, false, t, Inbox::default);
        let (a, b) = (Inbox::default(), Inbox::default());
        i.arrive(2, false, t, || a.clone());
        i.arrive(3, false, t, || b.clone());
        i.finish(1, Some(false), t);
        assert_eq!(a.take(), vec![Event::Granted]);
        // Stream 2's client went away before its event ran.
        i.finish(2, Some(false), t);
        assert!(!i.resume(2));
        assert_eq!(b.take(), vec![Event::Granted]);
        assert!(i.resume(3));
    }

    #[test]
    fn a_client_gone_while_queued_leaves_the_fifo() {
        let i = breaker(1, 5);
        let t = 10 * SECOND;
        i.arrive(1, false, t, Inbox::default);
        let (a, b) = (Inbox::default(), Inbox::default());
        i.arrive(2, false, t, || a.clone());
        i.arrive(3, false, t, || b.clone());
        i.finish(2, Some(false), t);
        i.finish(1, Some(false), t);
        assert!(a.take().is_empty());
        assert_eq!(b.take(), vec![Event::Granted]);
    }

    #[test]
    fn queued_streams_time_out_on_the_tick() {
        let i = breaker(1, 5);
        let t = 10 * SECOND;
        i.arrive(1, false, t, Inbox::default);
        let a = Inbox::default();
        i.arrive(2, false, t, || a.clone());
        assert_eq!(i.tick(t + SECOND).queued, 1);
        assert!(a.take().is_empty());
        let snap = i.tick(t + 2 * SECOND);
        assert_eq!(a.take(), vec![Event::TimedOut]);
        assert_eq!((snap.queued, snap.queue_timeout_total), (0, 1));
        // Answered 503, then finished: no slot to give back, and the holder is unaffected.
        i.finish(2, Some(false), t + 2 * SECOND);
        assert_eq!(i.tick(t + 2 * SECOND).in_flight, 1);
    }

    #[test]
    fn a_raised_limit_serves_waiters_at_the_next_event() {
        let i = breaker(1, 5);
        let t = 10 * SECOND;
        i.arrive(1, false, t, Inbox::default);
        let a = Inbox::default();
        i.arrive(2, false, t, || a.clone());
        i.reconfigure(
            Some(Limits {
                capacity: 3,
                queue_depth: 5,
            }),
            Duration::from_secs(2),
        );
        assert_eq!(i.arrive(3, false, t, Inbox::default), Admission::Proceed);
        assert_eq!(a.take(), vec![Event::Granted]);
    }

    #[test]
    fn dropping_the_breaker_lets_the_waiters_go() {
        let i = breaker(1, 5);
        let t = 10 * SECOND;
        i.arrive(1, false, t, Inbox::default);
        let a = Inbox::default();
        i.arrive(2, false, t, || a.clone());
        i.reconfigure(None, Duration::from_secs(2));
        assert_eq!(a.take(), vec![Event::Granted]);
        assert!(i.resume(2));
        i.finish(1, Some(false), t);
        i.finish(2, Some(false), t);
        assert_eq!(i.tick(t).in_flight, 0);
    }

    #[test]
    fn the_window_averages_concurrency_over_a_second() {
        let i: Instance<Inbox> = Instance::new(None, Duration::from_secs(1), 10 * SECOND);
        i.arrive(1, false, 10 * SECOND, || unreachable!());
        i.arrive(2, true, 10 * SECOND + SECOND / 2, || unreachable!());
        i.finish(2, Some(true), 11 * SECOND);
        let report = i.tick(11 * SECOND).report.unwrap();
        assert_eq!(report.average_concurrency_milli, 1500);
        assert_eq!(report.average_proxied_concurrency_milli, 500);
        assert_eq!((report.request_count, report.proxied_request_count), (2, 1));
    }

    #[test]
    fn the_limit_holds_across_threads() {
        use std::sync::atomic::{AtomicU32, Ordering};
        // Four threads hammer a cc=2 breaker; each granted waiter resumes itself when woken.
        #[derive(Clone)]
        struct Flag(Arc<(Mutex<Option<Event>>, std::sync::Condvar)>);
        impl Wake for Flag {
            fn wake(&self, event: Event) {
                *self.0.0.lock().unwrap() = Some(event);
                self.0.1.notify_one();
            }
        }
        let i: Arc<Instance<Flag>> = Arc::new(Instance::new(
            Some(Limits {
                capacity: 2,
                queue_depth: 100,
            }),
            Duration::from_secs(60),
            0,
        ));
        let in_flight = Arc::new(AtomicU32::new(0));
        let most = Arc::new(AtomicU32::new(0));
        let next = Arc::new(AtomicU32::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (i, in_flight, most, next) =
                    (i.clone(), in_flight.clone(), most.clone(), next.clone());
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        let s = next.fetch_add(1, Ordering::SeqCst);
                        let flag = Flag(Arc::new((Mutex::new(None), std::sync::Condvar::new())));
                        let f = flag.clone();
                        match i.arrive(s, false, 1, move || f) {
                            Admission::Proceed => {}
                            Admission::Wait => {
                                let mut e = flag.0.0.lock().unwrap();
                                while e.is_none() {
                                    e = flag.0.1.wait(e).unwrap();
                                }
                                assert_eq!(*e, Some(Event::Granted));
                                drop(e);
                                assert!(i.resume(s));
                            }
                            Admission::Overflow => panic!("queue of 100 overflowed"),
                        }
                        let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        std::thread::yield_now();
                        in_flight.fetch_sub(1, Ordering::SeqCst);
                        i.finish(s, Some(false), 2);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(most.load(Ordering::SeqCst) <= 2);
        let snap = i.tick(3);
        assert_eq!((snap.in_flight, snap.queued), (0, 0));
        assert_eq!(snap.requests_total, 800);
    }
}
