//! Kept-alive HTTP/1.1 connections to instances, reused across requests (Knative's activator reuses
//! connections through Go's transport, `MaxIdleConnsPerHost`).
//!
//! Hand-written rather than hyper-util's pooled client because the activator must know whether a
//! request left before a failure (to retry on another instance) and must connect to the one instance
//! its throttler chose; hyper's `SendRequest::try_send_request` gives the request back when it did not
//! leave, which a small per-address pool can use directly.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;

use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;

use crate::lock;

/// Knative's activator transport keeps up to 100 idle connections per host.
const MAX_IDLE_PER_BACKEND: usize = 100;

#[derive(Default)]
pub(crate) struct Pool {
    idle: Mutex<HashMap<SocketAddr, Vec<SendRequest<Incoming>>>>,
}

impl Pool {
    /// An idle connection to `backend` that is still open, if any.
    pub(crate) fn take(&self, backend: SocketAddr) -> Option<SendRequest<Incoming>> {
        let mut idle = lock(&self.idle);
        let conns = idle.get_mut(&backend)?;
        while let Some(c) = conns.pop() {
            if !c.is_closed() {
                return Some(c);
            }
        }
        idle.remove(&backend);
        None
    }

    /// Gives back a connection whose last response was read to the end.
    pub(crate) fn put(&self, backend: SocketAddr, conn: SendRequest<Incoming>) {
        if conn.is_closed() {
            return;
        }
        let mut idle = lock(&self.idle);
        let conns = idle.entry(backend).or_default();
        conns.retain(|c| !c.is_closed());
        if conns.len() < MAX_IDLE_PER_BACKEND {
            conns.push(conn);
        }
    }

    /// Forgets the connections to addresses that are no longer instances of any revision.
    pub(crate) fn retain_backends(&self, keep: impl Fn(&SocketAddr) -> bool) {
        lock(&self.idle).retain(|addr, _| keep(addr));
    }
}
