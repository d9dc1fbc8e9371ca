//! Step 6: forward an allowed request to the local service.
//!
//! Kept-alive connections over TCP or a Unix socket (`pool` for HTTP/1.1,
//! hyper-util's client for HTTP/2); bodies stream both ways.
//! The upstream receives the normalized path. A refused connection is 502, a
//! timeout 504.

use std::future::Future;
use std::io;
use std::pin::Pin;
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
    /// The client's request body failed while it was being sent on (a
    /// malformed chunk, a client gone mid-body): the client's fault, not
    /// the upstream's.
    ClientBody,
}

/// Whether `e`, or an error it was caused by, is a body error. The only
/// body warden hands its upstream clients is the client's request body.
fn is_client_body_error(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(e) = cause {
        if e.is::<crate::body::BodyError>() {
            return true;
        }
        cause = e.source();
    }
    false
}

/// The innermost service: sends the request to the upstream.
#[derive(Clone)]
pub struct Forward {
    /// The `[upstream]`, then one per `[[route]]`, in order.
    upstreams: Arc<Vec<Upstream>>,
    version: Version,
    request_timeout: Duration,
    metrics: Arc<Metrics>,
}

impl Forward {
    pub fn new(
        cfg: &UpstreamConfig,
        routes: &[crate::config::RouteConfig],
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
    /// HTTP/1.1 connection that its body gives back.
    async fn send(
        upstream: &Upstream,
        req: Request<Body>,
        timeout: Duration,
    ) -> Result<(Response<Incoming>, Option<Lease>), Failure> {
        match upstream {
            Upstream::Http1 { pool, .. } => {
                match tokio::time::timeout(timeout, pool.send(req)).await {
                    Err(_) => Err(Failure::Timeout),
                    Ok(Ok((rsp, lease))) => Ok((rsp, Some(lease))),
                    Ok(Err(SendError::Connect(e))) if e.kind() == io::ErrorKind::TimedOut => {
                        Err(Failure::ConnectTimeout)
                    }
                    Ok(Err(SendError::Connect(e))) => Err(Failure::Connect(e.to_string())),
                    Ok(Err(SendError::Request(e))) if is_client_body_error(&e) => {
                        Err(Failure::ClientBody)
                    }
                    Ok(Err(SendError::Request(e))) => Err(Failure::Protocol(e.to_string())),
                }
            }
            Upstream::Http2(client) => {
                match tokio::time::timeout(timeout, client.request(req)).await {
                    Err(_) => Err(Failure::Timeout),
                    Ok(Ok(rsp)) => Ok((rsp, None)),
                    Ok(Err(e)) => {
                        let timed_out = std::error::Error::source(&e)
                            .and_then(|s| s.downcast_ref::<io::Error>())
                            .is_some_and(|io| io.kind() == io::ErrorKind::TimedOut);
                        Err(if timed_out {
                            Failure::ConnectTimeout
                        } else if is_client_body_error(&e) {
                            Failure::ClientBody
                        } else if e.is_connect() {
                            Failure::Connect(e.to_string())
                        } else {
                            Failure::Protocol(e.to_string())
                        })
                    }
                }
            }
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
                Err(Failure::ClientBody) => {
                    return Err(ProxyError::bad_request("error reading request body"));
                }
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
                    match tokio::try_join!(client_upgrade, upstream_upgrade) {
                        Ok((client, upstream)) => {
                            let mut client = TokioIo::new(client);
                            let mut upstream = TokioIo::new(upstream);
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                        }
                        Err(e) => tracing::debug!(error = %e, "websocket upgrade failed"),
                    }
                });
                let (mut parts, body) = rsp.into_parts();
                parts.version = downstream;
                return Ok(Response::from_parts(parts, body::boxed(body)));
            }
            let (mut parts, body) = rsp.into_parts();
            parts.version = downstream;
            crate::identity::remove_hop_by_hop(&mut parts.headers);
            let body = match lease {
                Some(lease) => body::boxed(lease.body(body)),
                None => body::boxed(body),
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
