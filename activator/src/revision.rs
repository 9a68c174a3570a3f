//! The async side of one revision's throttler: waiting requests, grants, and slots that give their
//! capacity back when dropped.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice_api::autoscaling::RevisionKey;
use tokio::sync::{Notify, oneshot};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::throttler::{Admission, Reservation, Throttler, WaiterId};
use crate::{RevisionConfig, RevisionFailure, RevisionSnapshot, lock};

pub(crate) struct Revision {
    pub(crate) key: RevisionKey,
    state: Mutex<State>,
    /// Wakes the prober when instances may need probing.
    pub(crate) probe_wake: Notify,
    prober: Mutex<Option<AbortHandle>>,
}

struct State {
    throttler: Throttler,
    timeout: Duration,
    /// A waiter gets its slot, or the revision's failure when it fails while the request waits.
    waiters: HashMap<WaiterId, oneshot::Sender<Result<Slot, RevisionFailure>>>,
    next_id: WaiterId,
    rng: fastrand::Rng,
    removed: bool,
    failure: Option<RevisionFailure>,
}

/// A reserved place on one instance. Dropping it gives the place back and wakes the next waiter.
pub(crate) struct Slot {
    rev: Arc<Revision>,
    res: Option<Reservation>,
}

impl Slot {
    pub(crate) fn backend(&self) -> SocketAddr {
        self.res.expect("a live slot holds a reservation").backend
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(res) = self.res.take() {
            let mut st = lock(&self.rev.state);
            st.throttler.release(res);
            dispatch_locked(&self.rev, &mut st);
        }
    }
}

pub(crate) enum Acquire {
    Slot(Slot),
    /// Knative: `ErrRequestQueueFull`.
    QueueFull,
    /// The revision's timeout passed while waiting.
    TimedOut,
    /// The revision was removed while the request waited.
    Removed,
    /// The revision cannot start instances, and none could take the request.
    Failed(RevisionFailure),
}

/// Removes a waiter from the queue if it leaves before being granted (timeout, client gone).
struct WaiterGuard<'a> {
    rev: &'a Revision,
    id: WaiterId,
}

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        let mut st = lock(&self.rev.state);
        if st.throttler.cancel(self.id) {
            st.waiters.remove(&self.id);
        }
    }
}

/// Hands free capacity to waiters, oldest first. A waiter that is gone gives its grant back at once.
fn dispatch_locked(rev: &Arc<Revision>, st: &mut State) {
    loop {
        let State { throttler, rng, .. } = &mut *st;
        let grants = throttler.dispatch(&mut |n| rng.usize(0..n));
        if grants.is_empty() {
            return;
        }
        for (id, res) in grants {
            let slot = Slot {
                rev: rev.clone(),
                res: Some(res),
            };
            let sent = match st.waiters.remove(&id) {
                Some(tx) => tx.send(Ok(slot)).map_err(|back| back.ok()),
                None => Err(Some(slot)),
            };
            if let Err(Some(mut slot)) = sent {
                // Release here, under the lock we hold; the emptied slot's Drop does nothing.
                if let Some(res) = slot.res.take() {
                    st.throttler.release(res);
                }
            }
        }
    }
}

impl Revision {
    pub(crate) fn new(key: RevisionKey, config: &RevisionConfig) -> Arc<Self> {
        let mut throttler = Throttler::new(config.container_concurrency, config.max_queue);
        throttler.set_backends(&config.backends);
        throttler.set_failed(config.failure.is_some());
        Arc::new(Revision {
            key,
            state: Mutex::new(State {
                throttler,
                timeout: config.timeout,
                waiters: HashMap::new(),
                next_id: 0,
                rng: fastrand::Rng::new(),
                removed: false,
                failure: config.failure.clone(),
            }),
            probe_wake: Notify::new(),
            prober: Mutex::new(None),
        })
    }

    pub(crate) fn update(self: &Arc<Self>, config: &RevisionConfig) {
        let mut st = lock(&self.state);
        st.timeout = config.timeout;
        st.throttler
            .set_limits(config.container_concurrency, config.max_queue);
        let to_probe = st.throttler.set_backends(&config.backends);
        // New limits may free capacity for waiters.
        dispatch_locked(self, &mut st);
        st.failure = config.failure.clone();
        let released = st.throttler.set_failed(config.failure.is_some());
        if let Some(failure) = &config.failure {
            for id in released {
                if let Some(tx) = st.waiters.remove(&id) {
                    // A waiter that left meanwhile has nothing to answer.
                    let _ = tx.send(Err(failure.clone()));
                }
            }
        }
        drop(st);
        if !to_probe.is_empty() {
            self.probe_wake.notify_one();
        }
    }

    pub(crate) fn timeout(&self) -> Duration {
        lock(&self.state).timeout
    }

    /// Waits for a place on an instance until `deadline`. `poke` runs when this request is the first
    /// to wait (the revision has no free capacity), and for each request refused because the
    /// revision is failed: demand keeps the revision scaled up, so the runtime keeps trying to start
    /// it and it recovers on its own once it can (as a Deployment retries its pods).
    pub(crate) async fn acquire(
        self: &Arc<Self>,
        deadline: Instant,
        poke: impl FnOnce(),
        queued: impl FnOnce(),
    ) -> Acquire {
        let (id, rx, first) = {
            let mut st = lock(&self.state);
            if st.removed {
                return Acquire::Removed;
            }
            let id = st.next_id;
            st.next_id += 1;
            let State { throttler, rng, .. } = &mut *st;
            match throttler.admit(id, &mut |n| rng.usize(0..n)) {
                Admission::Granted(res) => {
                    return Acquire::Slot(Slot {
                        rev: self.clone(),
                        res: Some(res),
                    });
                }
                Admission::QueueFull => return Acquire::QueueFull,
                Admission::Failed => {
                    let failure = st.failure.clone().unwrap_or_else(|| RevisionFailure {
                        reason: "RevisionFailed".into(),
                        message: String::new(),
                    });
                    drop(st);
                    poke();
                    return Acquire::Failed(failure);
                }
                Admission::Queued { first } => {
                    queued();
                    let (tx, rx) = oneshot::channel();
                    st.waiters.insert(id, tx);
                    (id, rx, first)
                }
            }
        };
        let _guard = WaiterGuard { rev: self, id };
        if first {
            poke();
        }
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(Ok(slot))) => Acquire::Slot(slot),
            Ok(Ok(Err(failure))) => Acquire::Failed(failure),
            Ok(Err(_)) => Acquire::Removed,
            Err(_) => Acquire::TimedOut,
        }
    }

    pub(crate) fn backends(&self) -> Vec<SocketAddr> {
        lock(&self.state).throttler.backends()
    }

    pub(crate) fn unhealthy(&self) -> Vec<SocketAddr> {
        lock(&self.state).throttler.unhealthy()
    }

    pub(crate) fn mark_healthy(self: &Arc<Self>, addr: SocketAddr) {
        let mut st = lock(&self.state);
        if st.throttler.mark_healthy(addr) {
            dispatch_locked(self, &mut st);
        }
    }

    /// Connecting failed: no traffic until a probe passes again.
    pub(crate) fn mark_unhealthy(&self, addr: SocketAddr) {
        let changed = lock(&self.state).throttler.mark_unhealthy(addr);
        if changed {
            self.probe_wake.notify_one();
        }
    }

    pub(crate) fn remove(&self) {
        self.stop_prober();
        let mut st = lock(&self.state);
        st.removed = true;
        // Dropping the senders tells every waiter the revision is gone.
        st.waiters.clear();
    }

    pub(crate) fn set_prober(&self, handle: AbortHandle) {
        *lock(&self.prober) = Some(handle);
    }

    pub(crate) fn stop_prober(&self) {
        if let Some(h) = lock(&self.prober).take() {
            h.abort();
        }
    }

    pub(crate) fn snapshot(&self) -> RevisionSnapshot {
        let st = lock(&self.state);
        let t = &st.throttler;
        RevisionSnapshot {
            container_concurrency: t.container_concurrency(),
            policy: t.policy(),
            capacity: t.capacity(),
            healthy: t.healthy_count(),
            backends: t.healthy_count() + t.unhealthy().len(),
            in_flight: t.in_flight(),
            waiting: t.waiting(),
            failed: t.is_failed(),
        }
    }
}
