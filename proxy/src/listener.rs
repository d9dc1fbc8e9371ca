//! Accepting connections: TCP, optional TLS (rustls, mTLS), then HTTP/1.1 or
//! HTTP/2 via hyper-util's auto builder, each connection tracked for drain.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::{Request, Response};
use http_body::Body as _;
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower::{Service, ServiceExt};

use crate::authn::mtls;
use crate::body::{self, Body};
use crate::metrics::{HandshakeLabels, Metrics};
use crate::observe::ObserveLayer;
use crate::stillness::{CutWhenStill, LastMoved};
use crate::trace::{ConnInfo, PeerCert, TlsInfo};

/// Connection-level settings.
#[derive(Debug, Clone, Copy)]
pub struct ConnSettings {
    pub header_read_timeout: Duration,
    pub drain_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_connections: usize,
    pub max_concurrent_streams: u32,
    pub idle_timeout: Duration,
    /// An HTTP/2 stream that nothing has woken for this long is reset (see
    /// [`StreamExec`]).
    pub stream_idle_timeout: Duration,
}

/// Spawns each HTTP/2 stream's task, and drops it once a whole
/// `stream_idle_timeout` passes in which nothing woke it: h2 then resets
/// the stream (`CANCEL`), and its response body, with the upstream
/// connection reading it, goes too. The case this bounds is a client that
/// reads its socket but gives a stream no flow-control window, which no
/// connection-level guard sees: the socket never blocks. Every other wait
/// in a stream has its own bound (the upstream's `request_timeout`, the
/// request-body clock), which `app` keeps shorter than this one.
#[derive(Clone, Copy)]
struct StreamExec {
    quiet: Duration,
}

impl<F> hyper::rt::Executor<F> for StreamExec
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, stream: F) {
        let quiet = self.quiet;
        tokio::spawn(async move {
            if CutWhenStill::new(stream, quiet).await.is_none() {
                tracing::debug!(after = ?quiet, "HTTP/2 stream made no progress; reset");
            }
        });
    }
}

/// What an accepted connection holds until it, and any WebSocket spliced
/// from it, is gone.
struct Held {
    _active: ActiveGuard,
    /// Its slot under `max_connections`.
    _slot: tokio::sync::OwnedSemaphorePermit,
    /// The drain waits until every clone is dropped.
    _alive: tokio::sync::mpsc::Sender<()>,
}

struct ActiveGuard(Arc<Metrics>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.connections_active.dec();
    }
}

/// The TLS material new handshakes use; swapped when certificates rotate.
pub type TlsSource = Arc<ArcSwap<rustls::ServerConfig>>;

/// Accepts until `shutdown` resolves, then drains in-flight requests for up to
/// `drain_timeout`.
pub async fn serve<S>(
    listener: TcpListener,
    tls: Option<TlsSource>,
    service: S,
    observer: ObserveLayer,
    metrics: Arc<Metrics>,
    settings: ConnSettings,
    shutdown: impl Future<Output = ()>,
) where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let mut builder = auto::Builder::new(StreamExec {
        quiet: settings.stream_idle_timeout,
    });
    // A head over max_header_bytes is refused by the request stack, with the
    // contract's JSON 431. hyper buffers more than that, so such a head
    // reaches the stack; one that outgrows even the buffer, hyper answers
    // 431 itself, without a body. Its header timer also runs while a
    // kept-alive connection waits for its next request, so it bounds
    // HTTP/1.1 idleness as well.
    let buffer = head_buffer(settings.max_header_bytes);
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .max_buf_size(buffer);
    // hyper's HTTP/2 server refuses streams past the limit and answers a
    // burst of client resets (CVE-2023-44487) with GOAWAY.
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(settings.max_concurrent_streams)
        .max_header_list_size(u32::try_from(buffer).unwrap_or(u32::MAX));
    let builder = Arc::new(builder);
    let local = listener.local_addr().ok();
    let slots = Arc::new(tokio::sync::Semaphore::new(settings.max_connections));
    // Every connection task holds a clone; when all are gone, draining is done.
    let (alive, mut all_done) = tokio::sync::mpsc::channel::<()>(1);
    let (drain, draining) = tokio::sync::watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    // Out of descriptors and similar: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Closing at once is the bounded answer: the client sees a reset
            // and can retry elsewhere; nothing queues.
            metrics.connections_refused.inc();
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().ok().or(local).unwrap_or(peer);
        metrics.connections_active.inc();
        let held = Held {
            _active: ActiveGuard(metrics.clone()),
            _slot: slot,
            _alive: alive.clone(),
        };
        let service = service.clone();
        let observer = observer.clone();
        let builder = builder.clone();
        let tls = tls.as_ref().map(|t| t.load_full());
        let metrics = metrics.clone();
        let draining = draining.clone();
        tokio::spawn(async move {
            // `held` moves into the connection's facts once it has them: a
            // spliced upgrade holds those past the connection's task.
            let Some(config) = tls else {
                let conn = Arc::new(ConnInfo::new(peer, local, None).holding(held));
                serve_conn(
                    &builder, stream, service, conn, &observer, settings, draining,
                )
                .await;
                return;
            };
            let acceptor = TlsAcceptor::from(config);
            let handshake =
                tokio::time::timeout(settings.header_read_timeout, acceptor.accept(stream)).await;
            let stream = match handshake {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    metrics.tls_handshake_errors.inc();
                    handshake_done(&metrics, "error", "none");
                    tracing::debug!(%peer, error = %e, "tls handshake failed");
                    return;
                }
                Err(_) => {
                    metrics.tls_handshake_errors.inc();
                    handshake_done(&metrics, "timeout", "none");
                    tracing::debug!(%peer, "tls handshake timed out");
                    return;
                }
            };
            let tls_info = tls_info(stream.get_ref().1);
            handshake_done(&metrics, "ok", tls_info.version);
            metrics.count_peer(match &tls_info.peer {
                None => "none",
                Some(PeerCert::Spiffe(id)) => id.trust_domain(),
                Some(PeerCert::NoSpiffe(_)) => "not_spiffe",
            });
            let conn = Arc::new(ConnInfo::new(peer, local, Some(tls_info)).holding(held));
            serve_conn(
                &builder, stream, service, conn, &observer, settings, draining,
            )
            .await;
        });
    }
    drop(listener);
    let _ = drain.send(true);
    drop(alive);
    if tokio::time::timeout(settings.drain_timeout, all_done.recv())
        .await
        .is_err()
    {
        tracing::warn!("drain timeout elapsed with connections still open");
    }
}

fn handshake_done(metrics: &Metrics, result: &'static str, version: &'static str) {
    metrics
        .tls_handshakes
        .get_or_create(&HandshakeLabels { result, version })
        .inc();
}

/// Serves one connection until it ends, the proxy drains, or it has been
/// idle (no request in flight) for `idle_timeout`; the last two close it
/// gracefully: in-flight requests finish, HTTP/2 gets GOAWAY. A request head
/// hyper refused goes to `observer`'s log and counts.
async fn serve_conn<IO, S>(
    builder: &auto::Builder<StreamExec>,
    io: IO,
    service: S,
    conn: Arc<ConnInfo>,
    observer: &ObserveLayer,
    settings: ConnSettings,
    mut draining: tokio::sync::watch::Receiver<bool>,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let activity = Arc::new(Activity::default());
    let io = Sending {
        io,
        activity: activity.clone(),
    };
    let peer = conn.peer().ip();
    let served = builder.serve_connection_with_upgrades(
        TokioIo::new(io),
        hyper_service(service, conn, activity.clone()),
    );
    tokio::pin!(served);
    let idle = settings.idle_timeout;
    let mut closing = false;
    loop {
        let check_at = if closing {
            activity.next_stall_check(idle)
        } else {
            activity.next_check(idle)
        };
        tokio::select! {
            ended = served.as_mut() => {
                if let Some((status, reason)) = ended.err().as_deref().and_then(refused_head) {
                    observer.record_unparsed(peer, status, &reason);
                }
                return;
            }
            changed = draining.changed(), if !closing => {
                if changed.is_err() || *draining.borrow() {
                    served.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
            () = tokio::time::sleep_until(check_at) => {
                if activity.stalled(idle) {
                    // Dropping the connection drops its responses, and
                    // with them their upstream connections.
                    tracing::debug!(after = ?idle, "client stopped reading; connection closed");
                    return;
                }
                if !closing && activity.is_idle(idle) {
                    served.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
        }
    }
}

/// How much of one request head hyper reads before it refuses the head
/// itself: four times `runtime.max_header_bytes`, so that a head over the
/// limit, but not wildly so, is refused by the request stack with a body
/// that says why. (hyper needs at least 8 KiB.)
fn head_buffer(max_header_bytes: usize) -> usize {
    max_header_bytes.saturating_mul(4).max(8192)
}

/// The answer hyper wrote itself, if a connection ended on a request head it
/// could not parse (hyper's `Server::on_error`: 400, 414 or 431, with no
/// body), and hyper's description of what was wrong: fixed text such as
/// "invalid content-length parsed", never the client's bytes. (A head that
/// fails while a pipelined answer is still being written closes the
/// connection unanswered; it is logged with the status all the same.)
fn refused_head(err: &(dyn std::error::Error + Send + Sync + 'static)) -> Option<(u16, String)> {
    let e = err.downcast_ref::<hyper::Error>()?;
    // The parse errors hyper answers no request for: an HTTP/2 preface on an
    // HTTP/1.1 connection, a response's status (client side), its own bugs.
    if !e.is_parse() || e.is_parse_version_h2() || e.is_parse_status() {
        return None;
    }
    let reason = e.to_string();
    if reason.starts_with("internal error") {
        return None;
    }
    let status = match (e.is_parse_too_large(), reason.as_str()) {
        (true, "URI too long") => 414,
        (true, _) => 431,
        (false, _) => 400,
    };
    Some((status, reason))
}

/// Requests in flight on one connection, and when the last one started or
/// finished; whether writes to the client are waiting on it, and since when.
#[derive(Default)]
struct Activity {
    in_flight: std::sync::atomic::AtomicUsize,
    moved: LastMoved,
    blocked: std::sync::atomic::AtomicBool,
    blocked_since: LastMoved,
}

impl Activity {
    fn is_idle(&self, idle: Duration) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0 && self.moved.still_for(idle)
    }

    /// Notes how a write to the client went: waiting on it (from the first
    /// such write on), or taken.
    fn wrote<T>(&self, polled: &Poll<std::io::Result<T>>) {
        match polled {
            Poll::Pending => {
                if !self.blocked.swap(true, Ordering::AcqRel) {
                    self.blocked_since.touch();
                }
            }
            Poll::Ready(Ok(_)) => {
                if self.blocked.load(Ordering::Relaxed) {
                    self.blocked.store(false, Ordering::Release);
                }
            }
            Poll::Ready(Err(_)) => {}
        }
    }

    /// Whether the client has taken nothing written to it for `idle`: a
    /// response it stopped reading (the socket's buffers full) would hold
    /// the connection, and the upstream connection behind it, forever.
    fn stalled(&self, idle: Duration) -> bool {
        self.blocked.load(Ordering::Acquire) && self.blocked_since.still_for(idle)
    }

    /// When to look again whether the client has stalled, once idleness no
    /// longer matters (the connection is closing).
    fn next_stall_check(&self, idle: Duration) -> tokio::time::Instant {
        let now = tokio::time::Instant::now();
        let later = now.checked_add(idle).unwrap_or(now);
        if self.blocked.load(Ordering::Acquire) {
            self.blocked_since.deadline(idle).max(now).min(later)
        } else {
            later
        }
    }

    /// When to look again whether the connection is idle: `idle` after the
    /// last request started or ended. A request still in flight by then (a
    /// long upload) puts the next look one `idle` further, never at a
    /// deadline already past, which would have the connection's task spin.
    fn next_check(&self, idle: Duration) -> tokio::time::Instant {
        let at = self.moved.deadline(idle);
        let now = tokio::time::Instant::now();
        if at <= now && self.in_flight.load(Ordering::Acquire) > 0 {
            now.checked_add(idle).unwrap_or(at)
        } else {
            at
        }
    }
}

/// The client's connection, telling its [`Activity`] how each write went.
struct Sending<IO> {
    io: IO,
    activity: Arc<Activity>,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Sending<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Sending<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.activity.wrote(&polled);
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.activity.wrote(&polled);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        self.activity.wrote(&polled);
        polled
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Counts a request in flight until dropped.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(activity: Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        activity.moved.touch();
        Self(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.moved.touch();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

fn tls_info(session: &rustls::ServerConnection) -> TlsInfo {
    let version = match session.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
        _ => "unknown",
    };
    let peer = session
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|leaf| match mtls::spiffe_id_of(leaf.as_ref()) {
            Ok(id) => PeerCert::Spiffe(id),
            Err(reason) => PeerCert::NoSpiffe(reason),
        });
    TlsInfo { version, peer }
}

fn hyper_service<S>(
    service: S,
    conn: Arc<ConnInfo>,
    activity: Arc<Activity>,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<Body>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<Body>, Infallible>> + Send,
> + Clone
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    hyper::service::service_fn(move |req: Request<Incoming>| {
        let mut req = req.map(body::boxed);
        req.extensions_mut().insert(conn.clone());
        let in_flight = InFlight::new(activity.clone());
        let call = service.clone().oneshot(req);
        async move {
            let rsp = call.await;
            // A response still streaming keeps its request in flight: the
            // connection is not idle while a body is being sent.
            Ok(match rsp {
                Ok(rsp) if !rsp.body().is_end_stream() => rsp.map(|inner| {
                    Counted {
                        inner,
                        _in_flight: in_flight,
                    }
                    .boxed_unsync()
                }),
                Ok(rsp) => rsp,
                Err(never) => match never {},
            })
        }
    })
}

/// A response body that counts its request in flight until it is dropped.
struct Counted {
    inner: Body,
    _in_flight: InFlight,
}

impl http_body::Body for Counted {
    type Data = bytes::Bytes;
    type Error = body::BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Pending connections the kernel may queue for `accept` (capped by
/// `net.core.somaxconn`): a burst of new clients waits here instead of having
/// its SYNs dropped and retried a second later.
const BACKLOG: u32 = 4096;

/// Binds a listener, naming the address on failure.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, String> {
    let bind = || -> std::io::Result<TcpListener> {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(BACKLOG)
    };
    bind().map_err(|e| format!("bind {addr}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request in flight past the idle timeout (a long upload) must not
    /// leave the connection's idle check at a deadline already past: the
    /// loop in `serve_conn` would wake at once, again and again.
    #[tokio::test]
    async fn the_idle_check_never_falls_due_while_a_request_is_in_flight() {
        let activity = Arc::new(Activity::default());
        let idle = Duration::from_millis(20);
        let request = InFlight::new(activity.clone());
        tokio::time::sleep(idle * 3).await;
        assert!(!activity.is_idle(idle), "a request is in flight");
        assert!(activity.next_check(idle) > tokio::time::Instant::now());
        // Once it ends, the connection is idle `idle` after its end.
        drop(request);
        let ended = tokio::time::Instant::now();
        let at = activity.next_check(idle);
        assert!(at > ended && at <= ended + idle, "{:?}", at - ended);
        tokio::time::sleep_until(at).await;
        assert!(activity.is_idle(idle));
    }
}
