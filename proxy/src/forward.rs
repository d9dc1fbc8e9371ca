//! Step 6: forward an allowed request to the local service.
//!
//! Kept-alive connections over TCP or a Unix socket (`pool` for HTTP/1.1,
//! hyper-util's client for HTTP/2); bodies stream both ways.
//! The upstream receives the normalized path. A refused connection is 502, a
//! timeout 504; a response body that stops arriving for the request timeout
//! is cut short.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{header, HeaderValue, Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tower::Service;

use crate::body::{self, Body};
use crate::config::{UpstreamAddr, UpstreamConfig};
use crate::error::ProxyError;
use crate::metrics::{KindLabels, Metrics};
use crate::pool::{Lease, Pool, SendError};
use crate::stillness::LastMoved;
use crate::trace::ConnInfo;

/// A connection to the upstream.
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Connection for Stream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Self::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Self::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_flush(cx),
            Self::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Self::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Connects every request to the one configured upstream, whatever the URI says.
#[derive(Clone)]
pub struct Connector {
    addr: Arc<UpstreamAddr>,
    timeout: Duration,
}

impl Service<Uri> for Connector {
    type Response = TokioIo<Stream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<TokioIo<Stream>>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let addr = self.addr.clone();
        let timeout = self.timeout;
        Box::pin(async move { connect(&addr, timeout).await.map(TokioIo::new) })
    }
}

/// A new connection to `addr`; a `TimedOut` error after `timeout`.
pub async fn connect(addr: &UpstreamAddr, timeout: Duration) -> io::Result<Stream> {
    let connect = async {
        match addr {
            UpstreamAddr::Tcp(a) => {
                let s = TcpStream::connect(a.as_str()).await?;
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }
            UpstreamAddr::Unix(p) => UnixStream::connect(p).await.map(Stream::Unix),
        }
    };
    match tokio::time::timeout(timeout, connect).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
    }
}

/// How requests reach one upstream.
enum Upstream {
    /// HTTP/1.1: kept-alive connections in warden's own pool, and the
    /// `Host` sent for a client that named none (HTTP/1.0): the upstream's
    /// own address, as nginx's `proxy_pass` sends.
    Http1 { pool: Arc<Pool>, host: HeaderValue },
    /// HTTP/2 with prior knowledge: hyper-util's client, one multiplexed connection.
    Http2(Box<Client<Connector, Body>>),
}

impl Upstream {
    fn new(addr: &UpstreamAddr, connect_timeout: Duration, h2: bool) -> Self {
        if !h2 {
            let pool = Pool::new(addr.clone(), connect_timeout, IDLE_TIMEOUT);
            let host = match addr {
                UpstreamAddr::Tcp(a) => HeaderValue::from_str(a).ok(),
                UpstreamAddr::Unix(_) => None,
            };
            return Self::Http1 {
                pool: Arc::new(pool),
                host: host.unwrap_or(HeaderValue::from_static("localhost")),
            };
        }
        let connector = Connector {
            addr: Arc::new(addr.clone()),
            timeout: connect_timeout,
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(IDLE_TIMEOUT)
            .set_host(false)
            .http2_only(true)
            .build(connector);
        Self::Http2(Box::new(client))
    }
}

/// How long an idle upstream connection is kept.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Why the upstream gave no response.
enum Failure {
    /// The request timeout.
    Timeout,
    ConnectTimeout,
    Connect(String),
    Protocol(String),
    /// The client's request body failed while it was being sent on (cut
    /// short or malformed, as the reason says): the client's fault, not the
    /// upstream's.
    ClientBody(&'static str),
    /// The client paused its request body for the whole request timeout.
    ClientBodyTimeout,
    /// The client reset its stream while its body was being sent on.
    ClientGone,
}

/// When a request body streaming to the upstream last moved. The request
/// timeout runs from a body's last byte, not from the request's start: a
/// large upload that keeps moving is not cut off, and a client that stops
/// sending is told so (408) instead of the upstream being blamed (504).
struct BodyClock {
    moved: LastMoved,
    done: AtomicBool,
    /// The last poll found no frame ready: the client is the one waited on,
    /// not the upstream (which may simply not be reading the body).
    waiting_on_client: AtomicBool,
}

impl BodyClock {
    fn new() -> Self {
        Self {
            moved: LastMoved::new(),
            done: AtomicBool::new(false),
            waiting_on_client: AtomicBool::new(false),
        }
    }

    /// Resolves when the body has been still for `timeout`, with whose
    /// fault that is.
    async fn expiry(&self, timeout: Duration) -> Failure {
        self.moved.until_still_for(timeout).await;
        let client =
            !self.done.load(Ordering::Acquire) && self.waiting_on_client.load(Ordering::Acquire);
        if client {
            Failure::ClientBodyTimeout
        } else {
            Failure::Timeout
        }
    }
}

/// A request body that keeps its [`BodyClock`] up to date.
struct Clocked {
    inner: Body,
    clock: Arc<BodyClock>,
}

impl http_body::Body for Clocked {
    type Data = bytes::Bytes;
    type Error = crate::body::BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        let clock = &self.clock;
        clock
            .waiting_on_client
            .store(polled.is_pending(), Ordering::Release);
        match &polled {
            Poll::Ready(Some(Ok(_))) => clock.moved.touch(),
            Poll::Ready(None) => {
                clock.moved.touch();
                clock.done.store(true, Ordering::Release);
            }
            Poll::Ready(Some(Err(_))) | Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The upstream stopped sending a response body it had begun.
#[derive(Debug)]
struct ResponseStalled;

impl std::fmt::Display for ResponseStalled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("upstream response body stalled")
    }
}

impl std::error::Error for ResponseStalled {}

/// An upstream response body that must keep moving, as nginx's
/// `proxy_read_timeout` has it: once the upstream has sent nothing for the
/// request timeout, the body ends in an error, so hyper closes the client's
/// HTTP/1.1 connection or resets its HTTP/2 stream. The client learns the
/// response is cut short, and the stalled upstream connection is dropped
/// rather than pooled. A timer is armed only when a poll finds nothing to
/// read: a body that is ready when asked for (most are) reads no clock.
struct Watchdog<B> {
    inner: B,
    timeout: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A frame came since the timer was last set.
    moved: bool,
    metrics: Arc<Metrics>,
}

impl<B> Watchdog<B> {
    fn new(inner: B, timeout: Duration, metrics: Arc<Metrics>) -> Self {
        Self {
            inner,
            timeout,
            timer: None,
            moved: false,
            metrics,
        }
    }
}

impl<B> http_body::Body for Watchdog<B>
where
    B: http_body::Body<Data = bytes::Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = bytes::Bytes;
    type Error = crate::body::BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            this.moved = true;
            return Poll::Ready(frame.map(|f| f.map_err(crate::body::BodyError::new)));
        }
        // Nothing to read: the upstream has until `timeout` from now, or
        // from when it last went quiet if nothing has come since.
        let timeout = this.timeout;
        let moved = std::mem::take(&mut this.moved);
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if moved {
            let now = tokio::time::Instant::now();
            let deadline = now
                .checked_add(timeout)
                .unwrap_or_else(|| now + crate::config::MAX_DURATION);
            timer.as_mut().reset(deadline);
        }
        if timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        this.timer = None;
        this.metrics
            .upstream_errors
            .get_or_create(&KindLabels { kind: "timeout" })
            .inc();
        tracing::warn!(after = ?timeout, "upstream response body stalled; response cut short");
        Poll::Ready(Some(Err(crate::body::BodyError::new(ResponseStalled))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Copies bytes both ways between an upgraded client connection and its
/// upstream until either side closes, or neither has sent a byte for `idle`
/// (then both are closed, as an idle connection is).
async fn splice(
    client: hyper::upgrade::Upgraded,
    upstream: hyper::upgrade::Upgraded,
    idle: Duration,
) {
    let moved = LastMoved::new();
    let mut client = Moving {
        io: TokioIo::new(client),
        moved: &moved,
    };
    let mut upstream = Moving {
        io: TokioIo::new(upstream),
        moved: &moved,
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
        () = moved.until_still_for(idle) => {
            tracing::debug!(after = ?idle, "upgraded connection idle; closed");
        }
    }
}

/// A connection that marks `moved` whenever bytes arrive on it.
struct Moving<'a, IO> {
    io: IO,
    moved: &'a LastMoved,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Moving<'_, IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.moved.touch();
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Moving<'_, IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The failure `e` is if it, or an error it was caused by, is a body error:
/// the only body warden hands its upstream clients is the client's request
/// body.
fn client_body_failure(e: &(dyn std::error::Error + 'static)) -> Option<Failure> {
    let mut cause = Some(e);
    while let Some(e) = cause {
        if let Some(body) = e.downcast_ref::<crate::body::BodyError>() {
            if body.is_client_reset() {
                return Some(Failure::ClientGone);
            }
            return Some(Failure::ClientBody(body.client_reason()));
        }
        cause = e.source();
    }
    None
}

/// The innermost service: sends the request to the upstream.
#[derive(Clone)]
pub struct Forward {
    /// The `[upstream]`, then one per `[[route]]`, in order.
    upstreams: Arc<Vec<Upstream>>,
    version: Version,
    request_timeout: Duration,
    /// How long a spliced (upgraded) connection may carry nothing either way.
    idle_timeout: Duration,
    metrics: Arc<Metrics>,
}

impl Forward {
    pub fn new(
        cfg: &UpstreamConfig,
        routes: &[crate::config::RouteConfig],
        idle_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        let h2 = cfg.protocol == crate::config::UpstreamProtocol::H2;
        let upstreams = std::iter::once(&cfg.address)
            .chain(routes.iter().map(|r| &r.upstream))
            .map(|addr| Upstream::new(addr, cfg.connect_timeout, h2))
            .collect();
        Self {
            upstreams: Arc::new(upstreams),
            version: if h2 {
                Version::HTTP_2
            } else {
                Version::HTTP_11
            },
            request_timeout: cfg.request_timeout,
            idle_timeout,
            metrics,
        }
    }

    /// Where the request goes: the socket is fixed; only the path matters.
    /// The connector ignores the URI's host (the socket is fixed); it names
    /// the request's host so HTTP/2 upstreams get it as `:authority`.
    fn target(uri: &Uri, host: Option<&HeaderValue>) -> Result<Uri, ProxyError> {
        let authority = host
            .and_then(|h| http::uri::Authority::try_from(h.as_bytes()).ok())
            .unwrap_or_else(|| http::uri::Authority::from_static("upstream"));
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(http::uri::Scheme::HTTP);
        parts.authority = Some(authority);
        parts.path_and_query = Some(origin_form(uri));
        Uri::from_parts(parts).map_err(|_| ProxyError::bad_request("malformed request target"))
    }

    /// Sends `req` on `upstream`: the response, and the lease on a pooled
    /// HTTP/1.1 connection that its body gives back. `timeout` runs from the
    /// start, or for a request with a body, from the body's last byte.
    async fn send(
        upstream: &Upstream,
        mut req: Request<Body>,
        timeout: Duration,
    ) -> Result<(Response<Incoming>, Option<Lease>), Failure> {
        use http_body::Body as _;
        if req.body().is_end_stream() {
            return tokio::time::timeout(timeout, Forward::exchange(upstream, req))
                .await
                .unwrap_or(Err(Failure::Timeout));
        }
        let clock = Arc::new(BodyClock::new());
        let inner = std::mem::replace(req.body_mut(), body::empty());
        *req.body_mut() = http_body_util::BodyExt::boxed_unsync(Clocked {
            inner,
            clock: clock.clone(),
        });
        // Boxed: only requests with a body carry this future's state.
        Box::pin(async move {
            tokio::select! {
                sent = Forward::exchange(upstream, req) => sent,
                failure = clock.expiry(timeout) => Err(failure),
            }
        })
        .await
    }

    /// Sends `req` and waits for the response head, with no deadline.
    async fn exchange(
        upstream: &Upstream,
        req: Request<Body>,
    ) -> Result<(Response<Incoming>, Option<Lease>), Failure> {
        match upstream {
            Upstream::Http1 { pool, .. } => match pool.send(req).await {
                Ok((rsp, lease)) => Ok((rsp, Some(lease))),
                Err(SendError::Connect(e)) if e.kind() == io::ErrorKind::TimedOut => {
                    Err(Failure::ConnectTimeout)
                }
                Err(SendError::Connect(e)) => Err(Failure::Connect(e.to_string())),
                Err(SendError::Request(e)) => {
                    Err(client_body_failure(&e).unwrap_or_else(|| Failure::Protocol(e.to_string())))
                }
            },
            Upstream::Http2(client) => match client.request(req).await {
                Ok(rsp) => Ok((rsp, None)),
                Err(e) => {
                    let timed_out = std::error::Error::source(&e)
                        .and_then(|s| s.downcast_ref::<io::Error>())
                        .is_some_and(|io| io.kind() == io::ErrorKind::TimedOut);
                    Err(if timed_out {
                        Failure::ConnectTimeout
                    } else if let Some(client) = client_body_failure(&e) {
                        client
                    } else if e.is_connect() {
                        Failure::Connect(e.to_string())
                    } else {
                        Failure::Protocol(e.to_string())
                    })
                }
            },
        }
    }
}

/// Whether an HTTP/1.1 request's body would be dropped on the way out.
/// hyper's client sends a `GET` or `HEAD` whose body has no known length
/// with no body at all unless the framing is set explicitly: a client's
/// chunked `GET` body (the client's `transfer-encoding` is hop-by-hop, so it
/// is gone by now) must reach the upstream, not vanish.
fn body_needs_explicit_framing(req: &Request<Body>) -> bool {
    use http_body::Body as _;
    let body = req.body();
    matches!(*req.method(), http::Method::GET | http::Method::HEAD)
        && !body.is_end_stream()
        && body.size_hint().exact().is_none()
        && !req.headers().contains_key(header::CONTENT_LENGTH)
}

/// The request's path and query: what an HTTP/1.1 upstream is sent.
fn origin_form(uri: &Uri) -> http::uri::PathAndQuery {
    uri.path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"))
}

impl Service<Request<Body>> for Forward {
    type Response = Response<Body>;
    type Error = ProxyError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, ProxyError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let index = req
            .extensions()
            .get::<crate::route::Route>()
            .map_or(0, |r| r.index + 1);
        // The shared list, not a clone of one upstream's client.
        let upstreams = self.upstreams.clone();
        let version = self.version;
        let timeout = self.request_timeout;
        let idle_timeout = self.idle_timeout;
        let metrics = self.metrics.clone();
        // The client's protocol, not the upstream's, frames the answer (an
        // HTTP/1.0 upstream must not turn a kept-alive HTTP/1.1 client into
        // a closing HTTP/1.0 one).
        let downstream = req.version();
        Box::pin(async move {
            let Some(upstream) = upstreams.get(index) else {
                return Err(ProxyError::NoRoute);
            };
            // An HTTP/2 request names its host in `:authority`; HTTP/1.1 needs
            // `host`, which an HTTP/1.0 client may not have sent.
            if !req.headers().contains_key(header::HOST) {
                let host = req
                    .uri()
                    .authority()
                    .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
                    .or_else(|| match upstream {
                        Upstream::Http1 { host, .. } => Some(host.clone()),
                        Upstream::Http2(_) => None,
                    });
                if let Some(v) = host {
                    req.headers_mut().insert(header::HOST, v);
                }
            }
            *req.version_mut() = version;
            if version == Version::HTTP_2 {
                *req.uri_mut() = Forward::target(req.uri(), req.headers().get(header::HOST))?;
                // `:authority` carries the host on HTTP/2.
                req.headers_mut().remove(header::HOST);
            } else {
                *req.uri_mut() = Uri::from(origin_form(req.uri()));
                if body_needs_explicit_framing(&req) {
                    req.headers_mut().insert(
                        header::TRANSFER_ENCODING,
                        HeaderValue::from_static("chunked"),
                    );
                }
            }
            // A WebSocket upgrade: keep the client's side of the upgrade to splice.
            let client_upgrade = req
                .headers()
                .get(header::UPGRADE)
                .is_some()
                .then(|| hyper::upgrade::on(&mut req));
            let conn = client_upgrade
                .as_ref()
                .and_then(|_| req.extensions().get::<Arc<ConnInfo>>().cloned());
            let fail = |kind: &'static str| {
                metrics
                    .upstream_errors
                    .get_or_create(&KindLabels { kind })
                    .inc();
            };
            let (mut rsp, lease) = match Forward::send(upstream, req, timeout).await {
                Ok(sent) => sent,
                Err(Failure::Timeout) => {
                    fail("timeout");
                    return Err(ProxyError::UpstreamTimeout);
                }
                Err(Failure::ConnectTimeout) => {
                    fail("connect_timeout");
                    return Err(ProxyError::UpstreamTimeout);
                }
                Err(Failure::Connect(e)) => {
                    fail("connect");
                    tracing::warn!(error = %e, "upstream connect failed");
                    return Err(ProxyError::UpstreamUnavailable(
                        "upstream connection failed".into(),
                    ));
                }
                Err(Failure::ClientBody(reason)) => return Err(ProxyError::bad_request(reason)),
                Err(Failure::ClientBodyTimeout) => return Err(ProxyError::RequestTimeout),
                Err(Failure::ClientGone) => return Err(ProxyError::ClientGone),
                Err(Failure::Protocol(e)) => {
                    fail("protocol");
                    tracing::warn!(error = %e, "upstream request failed");
                    return Err(ProxyError::UpstreamUnavailable(
                        "upstream request failed".into(),
                    ));
                }
            };
            if rsp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
                // The upgraded connection is the splice's, never the pool's.
                drop(lease);
                let Some(client_upgrade) = client_upgrade else {
                    fail("protocol");
                    return Err(ProxyError::UpstreamUnavailable(
                        "unexpected upgrade from upstream".into(),
                    ));
                };
                let upstream_upgrade = hyper::upgrade::on(&mut rsp);
                tokio::spawn(async move {
                    // Holding the connection's facts keeps what it holds
                    // from the listener: its slot under `max_connections`,
                    // its count as active, and the drain's wait.
                    let _conn = conn;
                    match tokio::try_join!(client_upgrade, upstream_upgrade) {
                        Ok((client, upstream)) => splice(client, upstream, idle_timeout).await,
                        Err(e) => tracing::debug!(error = %e, "websocket upgrade failed"),
                    }
                });
                let (mut parts, body) = rsp.into_parts();
                parts.version = downstream;
                return Ok(Response::from_parts(parts, body::boxed(body)));
            }
            if !crate::identity::only_chunked(rsp.headers()) {
                fail("protocol");
                return Err(ProxyError::UpstreamUnavailable(
                    "upstream used an unsupported transfer coding".into(),
                ));
            }
            let (mut parts, body) = rsp.into_parts();
            parts.version = downstream;
            crate::identity::remove_hop_by_hop(&mut parts.headers);
            use http_body_util::BodyExt as _;
            let body = match lease {
                Some(lease) => Watchdog::new(lease.body(body), timeout, metrics).boxed_unsync(),
                None => Watchdog::new(body, timeout, metrics).boxed_unsync(),
            };
            Ok(Response::from_parts(parts, body))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_upstream_that_takes_the_request_and_never_answers_is_a_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (accepted, mut took) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let (conn, _) = listener.accept().await.unwrap();
            accepted.send(()).unwrap();
            std::future::pending::<()>().await;
            drop(conn);
        });
        for h2 in [false, true] {
            let upstream =
                Upstream::new(&UpstreamAddr::Tcp(addr.clone()), Duration::from_secs(5), h2);
            let req = Request::get("http://a/x")
                .header(header::HOST, "a")
                .body(body::empty())
                .unwrap();
            let sent = Forward::send(&upstream, req, Duration::from_millis(200)).await;
            assert!(matches!(sent, Err(Failure::Timeout)), "h2: {h2}");
            if !h2 {
                took.recv().await.unwrap();
            }
        }
    }

    /// A body whose frames come `gap` apart, `chunks` of them, then (unless
    /// `stall`) its end; a stalled one never ends.
    fn trickle(chunks: usize, gap: Duration, stall: bool) -> Body {
        let frames = futures_util::stream::unfold(0, move |i| async move {
            if i == chunks {
                if stall {
                    std::future::pending::<()>().await;
                }
                return None;
            }
            tokio::time::sleep(gap).await;
            let frame = http_body::Frame::data(bytes::Bytes::from_static(b"chunk"));
            Some((Ok::<_, std::convert::Infallible>(frame), i + 1))
        });
        body::boxed(http_body_util::StreamBody::new(frames))
    }

    fn post(path: &str, body: Body) -> Request<Body> {
        Request::post(format!("http://a{path}"))
            .header(header::HOST, "a")
            .header(header::TRANSFER_ENCODING, "chunked")
            .body(body)
            .unwrap()
    }

    /// The request timeout runs from a body's last byte: an upload that
    /// keeps moving outlasts it; one the client stops sending is the
    /// client's timeout, not the upstream's.
    #[tokio::test]
    async fn the_request_timeout_runs_from_the_last_byte_of_the_body() {
        let (addr, mut seen) = crate::devkit::spawn_upstream().await.unwrap();
        let timeout = Duration::from_millis(300);
        for h2 in [false, true] {
            let upstream = Upstream::new(&UpstreamAddr::Tcp(addr.to_string()), timeout, h2);
            // Eight chunks 100 ms apart: 800 ms in all, each gap well inside 300 ms.
            let req = post("/moving", trickle(8, Duration::from_millis(100), false));
            let sent = Forward::send(&upstream, req, timeout).await;
            assert!(sent.is_ok(), "h2: {h2}: a moving upload was cut off");
            // The echo upstream also reports the stalled upload, cut short.
            let moved = loop {
                let got = tokio::time::timeout(Duration::from_secs(10), seen.recv())
                    .await
                    .expect("the upstream saw no upload")
                    .unwrap();
                if got.uri.ends_with("/moving") {
                    break got;
                }
            };
            assert_eq!(moved.body.len(), 8 * 5, "h2: {h2}");
            // One chunk, then nothing.
            let req = post("/stalled", trickle(1, Duration::ZERO, true));
            let sent = Forward::send(&upstream, req, timeout).await;
            assert!(
                matches!(sent, Err(Failure::ClientBodyTimeout)),
                "h2: {h2}: a stalled client"
            );
        }
    }

    /// An upstream that stops reading a large body is the upstream's
    /// timeout, though the body is unfinished.
    #[tokio::test]
    async fn an_upstream_that_stops_reading_the_body_is_a_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = listener.accept().await {
                held.push(conn);
            }
        });
        let upstream = Upstream::new(&UpstreamAddr::Tcp(addr), Duration::from_secs(5), false);
        // Far more than the socket buffers hold.
        let req = post("/large", body::full(vec![b'x'; 64 << 20]));
        let sent = Forward::send(&upstream, req, Duration::from_millis(300)).await;
        assert!(matches!(sent, Err(Failure::Timeout)));
    }

    /// A response body that keeps moving outlasts the request timeout; one
    /// that stops is cut off with an error and counted as an upstream
    /// timeout.
    #[tokio::test]
    async fn a_response_body_that_stops_arriving_is_cut_short() {
        use http_body_util::BodyExt as _;
        let metrics = Arc::new(Metrics::register(
            &mut prometheus_client::registry::Registry::default(),
        ));
        let timeout = Duration::from_millis(300);
        let timeouts = |m: &Metrics| {
            m.upstream_errors
                .get_or_create(&KindLabels { kind: "timeout" })
                .get()
        };
        // Eight chunks 100 ms apart: 800 ms in all, each gap well inside 300 ms.
        let moving = Watchdog::new(
            trickle(8, Duration::from_millis(100), false),
            timeout,
            metrics.clone(),
        );
        let read = moving.collect().await.expect("a moving body was cut off");
        assert_eq!(read.to_bytes().len(), 8 * 5);
        assert_eq!(timeouts(&metrics), 0);
        // Two chunks, then nothing.
        let started = tokio::time::Instant::now();
        let stalled = Watchdog::new(trickle(2, Duration::ZERO, true), timeout, metrics.clone());
        let read = tokio::time::timeout(Duration::from_secs(10), stalled.collect())
            .await
            .expect("a stalled body was never cut off");
        let e = read.expect_err("a stalled body ended cleanly");
        assert_eq!(e.to_string(), "upstream response body stalled");
        assert!(started.elapsed() >= timeout);
        assert_eq!(timeouts(&metrics), 1);
    }

    #[test]
    fn the_target_keeps_path_and_query_and_takes_a_valid_host_only() {
        let uri: Uri = "/a/b?x=1&y=%2F".parse().unwrap();
        let host = HeaderValue::from_static("orders.local:8080");
        assert_eq!(
            Forward::target(&uri, Some(&host)).unwrap(),
            "http://orders.local:8080/a/b?x=1&y=%2F"
        );
        assert_eq!(
            Forward::target(&uri, None).unwrap(),
            "http://upstream/a/b?x=1&y=%2F"
        );
        for bad in ["a b", "[::1", "h/ost", ""] {
            let host = HeaderValue::from_str(bad).unwrap();
            assert_eq!(
                Forward::target(&uri, Some(&host)).unwrap(),
                "http://upstream/a/b?x=1&y=%2F",
                "{bad:?}"
            );
        }
        let absolute: Uri = "http://elsewhere.example/p".parse().unwrap();
        assert_eq!(
            Forward::target(&absolute, Some(&host)).unwrap(),
            "http://orders.local:8080/p"
        );
    }
}
