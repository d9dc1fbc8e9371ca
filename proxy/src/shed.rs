//! Step 1b: load shedding. At most `max_requests` requests are inside the
//! pipeline at once; past that a request is answered 503 (`retry-after: 1`)
//! at once instead of queueing without bound behind slow upstreams.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Request;
use tower::{Layer, Service};

use crate::error::ProxyError;

#[derive(Debug, Clone)]
pub struct ShedLayer {
    in_flight: Arc<AtomicUsize>,
    max: usize,
}

impl ShedLayer {
    pub fn new(max: usize) -> Self {
        Self {
            in_flight: Arc::default(),
            max,
        }
    }
}

impl<S> Layer<S> for ShedLayer {
    type Service = Shed<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Shed {
            inner,
            in_flight: self.in_flight.clone(),
            max: self.max,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Shed<S> {
    inner: S,
    in_flight: Arc<AtomicUsize>,
    max: usize,
}

/// One request's place in the pipeline, given back when dropped.
#[derive(Debug)]
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

pin_project_lite::pin_project! {
    /// The inner future, holding its slot until it completes.
    pub struct Held<F> {
        #[pin]
        inner: F,
        slot: Option<Slot>,
    }
}

impl<F: Future> Future for Held<F> {
    type Output = F::Output;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let out = std::task::ready!(this.inner.poll(cx));
        this.slot.take();
        Poll::Ready(out)
    }
}

impl<S, B> Service<Request<B>> for Shed<S>
where
    S: Service<Request<B>, Error = ProxyError>,
    S::Response: Send + 'static,
{
    type Response = S::Response;
    type Error = ProxyError;
    type Future = futures_util::future::Either<
        Held<S::Future>,
        futures_util::future::Ready<Result<S::Response, ProxyError>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let before = self.in_flight.fetch_add(1, Ordering::AcqRel);
        let slot = Slot(self.in_flight.clone());
        if before >= self.max {
            drop(slot);
            return futures_util::future::Either::Right(futures_util::future::ready(Err(
                ProxyError::Unavailable {
                    reason: "overloaded".into(),
                    retry_after: Duration::from_secs(1),
                },
            )));
        }
        futures_util::future::Either::Left(Held {
            inner: self.inner.call(req),
            slot: Some(slot),
        })
    }
}
