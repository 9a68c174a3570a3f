//! A streaming HTTP body fed through a channel: the response side of the streaming backends and the
//! request side of the gRPC client.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::{Body, Frame};
use tokio::sync::mpsc;

/// A body whose frames (data or trailers) are sent through the [`mpsc::Sender`] returned by
/// [`ChannelBody::new`]; it ends when every sender is dropped.
pub struct ChannelBody {
    rx: mpsc::Receiver<Frame<Bytes>>,
}

impl ChannelBody {
    pub fn new(buffer: usize) -> (mpsc::Sender<Frame<Bytes>>, ChannelBody) {
        let (tx, rx) = mpsc::channel(buffer);
        (tx, ChannelBody { rx })
    }
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.rx.poll_recv(cx).map(|frame| frame.map(Ok))
    }
}

/// The body type every backend answers with.
pub type ResponseBody = BoxBody<Bytes, std::convert::Infallible>;

/// A complete body.
pub fn full(bytes: impl Into<Bytes>) -> ResponseBody {
    http_body_util::Full::new(bytes.into()).boxed()
}

/// A streaming body.
pub fn channel(body: ChannelBody) -> ResponseBody {
    body.boxed()
}
