//! WebSocket: the upgrade request is authorized like any other, then the
//! connections are spliced; a denied upgrade never reaches the upstream.

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;

use super::harness::{Harness, Options};

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
    let handshake = |path: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            h.host()
        )
    };
    // Allowed (public-read): 101, then bytes flow both ways through warden.
    let mut s = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    s.write_all(handshake("/public/chat").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(seen.recv().await.unwrap(), "/public/chat");
    s.write_all(b"ping through warden").await.unwrap();
    let mut echoed = [0u8; 19];
    s.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"ping through warden");

    // Denied: 403 on the upgrade request, and the upstream never sees it.
    let mut s = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    s.write_all(handshake("/api/orders/chat").as_bytes())
        .await
        .unwrap();
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"HTTP/1.1 403");
    assert!(seen.try_recv().is_err());
}
