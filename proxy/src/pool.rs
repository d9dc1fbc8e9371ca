//! Kept-alive HTTP/1.1 connections to one upstream.
//!
//! hyper's own client connection (`hyper::client::conn::http1`) under a small
//! pool. A request takes the most recently used idle connection, or opens a
//! new one; the connection comes back when the response body has been read to
//! its end. A request that hyper hands back unsent (the connection closed
//! between the pool and the write) goes out on another connection, as
//! hyper-util's client does; a request on a new connection is never retried.
//!
//! Per request it does less than hyper-util's legacy client: it spawns no task
//! to wait for the connection to be ready again (the connection's own task has
//! marked it ready by the time the last body frame arrives), keeps no keyed map
//! behind its lock, and boxes no future.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body as _, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;

use crate::body::Body;
use crate::config::UpstreamAddr;

/// Idle connections kept per upstream; more are closed when they come back.
const MAX_IDLE: usize = 1024;

/// Why a request got no response.
#[derive(Debug)]
pub enum SendError {
    /// No connection could be opened (`TimedOut` when the connect timeout hit).
    Connect(io::Error),
    /// The connection failed while sending the request or reading the head.
    Request(hyper::Error),
}

struct Idle {
    tx: SendRequest<Body>,
    since: Instant,
}

pub struct Pool {
    addr: UpstreamAddr,
    connect_timeout: Duration,
    idle_timeout: Duration,
    /// Most recently returned last. Held only to push or pop, never across an await.
    idle: Mutex<VecDeque<Idle>>,
}

impl Pool {
    pub fn new(addr: UpstreamAddr, connect_timeout: Duration, idle_timeout: Duration) -> Self {
        Self {
            addr,
            connect_timeout,
            idle_timeout,
            idle: Mutex::new(VecDeque::new()),
        }
    }

    /// Sends `req` (origin-form URI, `host` set) and returns the response head
    /// with a lease on its connection, to go back to the pool with the body.
    pub async fn send(
        self: &Arc<Self>,
        mut req: Request<Body>,
    ) -> Result<(Response<Incoming>, Lease), SendError> {
        loop {
            let (mut tx, reused) = match self.take() {
                Some(tx) => (tx, true),
                // Boxed: the rare path's state stays out of every request's future.
                None => (Box::pin(self.connect()).await?, false),
            };
            match tx.try_send_request(req).await {
                Ok(rsp) => {
                    let lease = Lease {
                        tx: Some(tx),
                        pool: self.clone(),
                    };
                    return Ok((rsp, lease));
                }
                Err(mut e) => match e.take_message() {
                    // Never written: safe on another connection. Each retry
                    // drops one idle connection, so this ends on a new one.
                    Some(unsent) if reused => req = unsent,
                    _ => return Err(SendError::Request(e.into_error())),
                },
            }
        }
    }

    /// The most recently used idle connection that can take a request.
    fn take(&self) -> Option<SendRequest<Body>> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some(Idle { tx, since }) = idle.pop_back() {
            if tx.is_ready() && since.elapsed() < self.idle_timeout {
                return Some(tx);
            }
        }
        None
    }

    async fn connect(&self) -> Result<SendRequest<Body>, SendError> {
        let io = crate::forward::connect(&self.addr, self.connect_timeout)
            .await
            .map_err(SendError::Connect)?;
        let (tx, conn) = http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(SendError::Request)?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection closed");
            }
        });
        Ok(tx)
    }

    fn put(self: &Arc<Self>, tx: SendRequest<Body>) {
        if tx.is_ready() {
            self.push(tx);
        } else if !tx.is_closed() {
            // Still finishing the request body: back once it is done.
            let Ok(rt) = tokio::runtime::Handle::try_current() else {
                return;
            };
            let pool = self.clone();
            rt.spawn(async move {
                let mut tx = tx;
                if tx.ready().await.is_ok() {
                    pool.push(tx);
                }
            });
        }
    }

    fn push(&self, tx: SendRequest<Body>) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() >= MAX_IDLE {
            idle.pop_front();
        }
        idle.push_back(Idle {
            tx,
            since: Instant::now(),
        });
    }

    /// Idle connections still open (for tests).
    #[cfg(test)]
    fn open_idle(&self) -> usize {
        let idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        idle.iter().filter(|i| !i.tx.is_closed()).count()
    }
}

/// A response's hold on its connection.
pub struct Lease {
    tx: Option<SendRequest<Body>>,
    pool: Arc<Pool>,
}

impl Lease {
    /// `body`, giving the connection back to the pool once read to its end.
    pub fn body(self, body: Incoming) -> PooledBody {
        PooledBody {
            body,
            done: false,
            lease: self,
        }
    }
}

/// An upstream response body that returns its connection when finished; one
/// dropped before its end takes the connection with it.
pub struct PooledBody {
    body: Incoming,
    done: bool,
    lease: Lease,
}

impl http_body::Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let frame = Pin::new(&mut this.body).poll_frame(cx);
        match &frame {
            // Trailers are the last frame there is.
            Poll::Ready(None) => this.done = true,
            Poll::Ready(Some(Ok(f))) if f.is_trailers() => this.done = true,
            _ => {}
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        if self.is_end_stream() {
            if let Some(tx) = self.lease.tx.take() {
                self.lease.pool.put(tx);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// An upstream that answers each request on a connection with `reply`,
    /// reporting every connection it accepts. Given `close`, it closes a
    /// connection after its first answer once `close` is notified, without
    /// saying so in a header.
    async fn upstream(
        reply: &'static [u8],
        close: Option<Arc<tokio::sync::Notify>>,
    ) -> (String, tokio::sync::mpsc::UnboundedReceiver<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (seen, accepted) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                seen.send(()).unwrap();
                let close = close.clone();
                tokio::spawn(async move {
                    while read_head(&mut s).await {
                        s.write_all(reply).await.unwrap();
                        if let Some(close) = &close {
                            close.notified().await;
                            return;
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    /// Reads one request head (requests here have no body); false at EOF.
    async fn read_head(s: &mut TcpStream) -> bool {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match s.read(&mut byte).await {
                Ok(1) => head.push(byte[0]),
                _ => return false,
            }
        }
        true
    }

    fn get() -> Request<Body> {
        Request::get("/x")
            .header("host", "upstream")
            .body(crate::body::empty())
            .unwrap()
    }

    async fn fetch(pool: &Arc<Pool>) -> Bytes {
        let (rsp, lease) = pool.send(get()).await.unwrap();
        assert_eq!(rsp.status(), 200);
        let body = lease.body(rsp.into_body());
        body.collect().await.unwrap().to_bytes()
    }

    fn pool(addr: String) -> Arc<Pool> {
        Arc::new(Pool::new(
            UpstreamAddr::Tcp(addr),
            Duration::from_secs(5),
            Duration::from_secs(60),
        ))
    }

    #[tokio::test]
    async fn a_connection_is_reused_once_its_body_is_read() {
        for reply in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"[..],
            &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"[..],
        ] {
            let (addr, mut accepted) = upstream(reply, None).await;
            let pool = pool(addr);
            for _ in 0..5 {
                assert_eq!(fetch(&pool).await, "ok");
            }
            accepted.recv().await.unwrap();
            assert!(
                accepted.try_recv().is_err(),
                "a second connection was opened"
            );
        }
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_takes_its_connection_along() {
        let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        let (addr, mut accepted) = upstream(reply, None).await;
        let pool = pool(addr);
        let (rsp, lease) = pool.send(get()).await.unwrap();
        drop(lease.body(rsp.into_body()));
        assert_eq!(pool.open_idle(), 0);
        assert_eq!(fetch(&pool).await, "ok");
        accepted.recv().await.unwrap();
        accepted.recv().await.unwrap();
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_is_not_used_again() {
        let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        let close = Arc::new(tokio::sync::Notify::new());
        let (addr, mut accepted) = upstream(reply, Some(close.clone())).await;
        let pool = pool(addr);
        assert_eq!(fetch(&pool).await, "ok");
        assert_eq!(pool.open_idle(), 1);
        close.notify_one();
        // The connection's task notices the EOF.
        let noticed = async {
            while pool.open_idle() > 0 {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), noticed)
            .await
            .expect("the closed connection is still open in the pool");
        assert_eq!(fetch(&pool).await, "ok");
        accepted.recv().await.unwrap();
        accepted.recv().await.unwrap();
    }

    #[tokio::test]
    async fn no_upstream_is_a_connect_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        drop(listener);
        match pool(addr).send(get()).await {
            Err(SendError::Connect(_)) => {}
            other => panic!("expected a connect error, got {:?}", other.map(|r| r.0)),
        }
    }
}
