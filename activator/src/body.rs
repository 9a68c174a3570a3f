//! Response bodies: streamed from the instance, holding the request's throttler slot and its
//! concurrency count until the last byte is sent (Knative holds both for the whole `proxy.ServeHTTP`).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, SizeHint};

/// The body type of every response the activator sends.
pub(crate) type ProxyBody = UnsyncBoxBody<Bytes, hyper::Error>;

pub(crate) fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub(crate) fn empty() -> ProxyBody {
    full(Bytes::new())
}

/// A body that keeps `guard` alive until it is dropped (after its last frame, or when the client
/// goes away), and runs `on_end` if the body was read to its end (its connection can be reused).
pub(crate) struct Guarded<B: Body, G> {
    inner: B,
    _guard: G,
    ended: bool,
    on_end: Option<Box<dyn FnOnce() + Send>>,
}

impl<B: Body, G> Guarded<B, G> {
    pub(crate) fn new(inner: B, guard: G, on_end: Option<Box<dyn FnOnce() + Send>>) -> Self {
        Guarded {
            inner,
            _guard: guard,
            ended: false,
            on_end,
        }
    }
}

impl<B: Body, G> Drop for Guarded<B, G> {
    fn drop(&mut self) {
        // hyper stops polling once `is_end_stream` is true, so that counts as the end too.
        if (self.ended || self.inner.is_end_stream())
            && let Some(f) = self.on_end.take()
        {
            f();
        }
    }
}

impl<B: Body + Unpin, G: Unpin> Body for Guarded<B, G> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            self.ended = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
