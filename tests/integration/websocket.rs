//! WebSocket: the upgrade request is authorized like any other, then the
//! connections are spliced; a denied upgrade never reaches the upstream.

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;

use super::harness::{answered, Harness, Options};

/// An upstream that accepts WebSocket upgrades and echoes the spliced bytes.
async fn echo_ws_upstream() -> (std::net::SocketAddr, mpsc::UnboundedReceiver<String>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (seen, seen_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                    let seen = seen.clone();
                    async move {
                        let _ = seen.send(req.uri().path().to_owned());
                        let upgrade = hyper::upgrade::on(&mut req);
                        tokio::spawn(async move {
                            if let Ok(io) = upgrade.await {
                                let mut io = TokioIo::new(io);
                                let mut buf = [0u8; 64];
                                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                                while let Ok(n) = io.read(&mut buf).await {
                                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                                        break;
                                    }
                                }
                            }
                        });
                        let rsp = Response::builder()
                            .status(StatusCode::SWITCHING_PROTOCOLS)
                            .header("connection", "upgrade")
                            .header("upgrade", "websocket")
                            .body(Full::new(Bytes::new()))
                            .unwrap();
                        Ok::<_, std::convert::Infallible>(rsp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    (addr, seen_rx)
}

/// Sends a WebSocket upgrade request for `path` on a new connection: the
/// connection and the response head, read byte by byte so nothing after it
/// is consumed.
async fn upgrade(h: &Harness, path: &str) -> (tokio::net::TcpStream, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        h.host()
    );
    s.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    (s, String::from_utf8_lossy(&head).into_owned())
}

/// A proxy with `extra_toml` in front of the echo upstream, and a WebSocket
/// spliced through it on `/public/chat`.
async fn spliced(extra_toml: &str) -> (Harness, tokio::net::TcpStream) {
    let (upstream, _seen) = echo_ws_upstream().await;
    let h = Harness::with(Options {
        tls: false,
        upstream: Some(upstream),
        extra_toml: extra_toml.into(),
        ..Options::default()
    })
    .await;
    let (s, head) = upgrade(&h, "/public/chat").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    (h, s)
}

#[tokio::test]
async fn websocket_upgrades_are_authorized_then_spliced() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (upstream, mut seen) = echo_ws_upstream().await;
    let h = Harness::with(Options {
        tls: false,
        upstream: Some(upstream),
        ..Options::default()
    })
    .await;
    // Allowed (public-read): 101, then bytes flow both ways through warden.
    let (mut s, head) = upgrade(&h, "/public/chat").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(seen.recv().await.unwrap(), "/public/chat");
    s.write_all(b"ping through warden").await.unwrap();
    let mut echoed = [0u8; 19];
    s.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"ping through warden");

    // Denied: 403 on the upgrade request, and the upstream never sees it.
    let (_, head) = upgrade(&h, "/api/orders/chat").await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert!(seen.try_recv().is_err());
}

/// A spliced connection lives as long as bytes keep crossing it; one that
/// carries nothing either way for `runtime.idle_timeout` is closed.
#[tokio::test]
async fn a_spliced_connection_is_closed_once_idle() {
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_h, mut s) = spliced("[runtime]\nidle_timeout = \"1s\"\n").await;
    let mut byte = [0u8; 1];
    // Ten messages 300 ms apart: 3 s of use, no gap near the idle timeout.
    for i in 0..10u8 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.write_all(&[b'a' + i]).await.unwrap();
        s.read_exact(&mut byte)
            .await
            .expect("a connection in use was closed");
        assert_eq!(byte[0], b'a' + i);
    }
    let quiet = tokio::time::Instant::now();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read(&mut byte))
        .await
        .expect("an idle spliced connection was never closed");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(quiet.elapsed() >= Duration::from_millis(900));
}

/// A spliced connection open when the proxy is told to stop (SIGTERM) is
/// drained like a request in flight: it carries bytes until it closes,
/// for up to `runtime.drain_timeout`, and the proxy stops once it has.
#[tokio::test]
async fn a_spliced_connection_is_drained_not_cut() {
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut h, mut s) = spliced("[runtime]\ndrain_timeout = \"30s\"\n").await;
    let mut drained = h.shut_down();
    s.write_all(b"after the stop").await.unwrap();
    let mut echoed = [0u8; 14];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut echoed))
        .await
        .expect("the spliced connection went quiet")
        .expect("the spliced connection was cut");
    assert_eq!(&echoed, b"after the stop");
    // Stopping without it would take a few milliseconds: it waits instead.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut drained)
            .await
            .is_err(),
        "the proxy stopped with a spliced connection open"
    );
    drop(s);
    tokio::time::timeout(Duration::from_secs(10), drained)
        .await
        .expect("the proxy kept waiting after the spliced connection closed")
        .unwrap();
}

/// A spliced WebSocket is still a connection: it keeps its slot under
/// `runtime.max_connections` and its count in `warden_connections_active`
/// until it closes.
#[tokio::test]
async fn a_spliced_connection_counts_against_max_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (h, mut s) = spliced("[runtime]\nmax_connections = 1\n").await;
    s.write_all(b"spliced").await.unwrap();
    let mut echoed = [0u8; 7];
    s.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"spliced");
    assert_eq!(h.series("warden_connections_active").await, Some(1));
    // The echo upstream makes any other request a 502: answered all the same.
    assert!(
        !answered(h.addr, "/public/x").await,
        "a second connection was served beside a spliced one, past max_connections = 1"
    );
    drop(s);
    super::harness::eventually("the slot is free once the WebSocket closed", || {
        answered(h.addr, "/public/x")
    })
    .await;
    assert_eq!(h.series("warden_connections_active").await, Some(0));
}
