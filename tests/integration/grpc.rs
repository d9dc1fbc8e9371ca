//! gRPC-shaped traffic to an HTTP/2 (prior knowledge) upstream: trailers
//! travel back to the client, and `:authority` carries the client's host.

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::mpsc;

use super::harness::{Harness, Options};

/// An h2c upstream answering with a body and gRPC trailers; reports the
/// authority and `te` it saw.
async fn h2_upstream() -> (
    std::net::SocketAddr,
    mpsc::UnboundedReceiver<(String, Option<String>)>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let tx = tx.clone();
                    async move {
                        let authority = req
                            .uri()
                            .authority()
                            .map(|a| a.to_string())
                            .unwrap_or_default();
                        let te = req
                            .headers()
                            .get("te")
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned);
                        let _ = tx.send((authority, te));
                        let mut trailers = HeaderMap::new();
                        trailers.insert("grpc-status", HeaderValue::from_static("0"));
                        trailers.insert("grpc-message", HeaderValue::from_static("ok"));
                        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = vec![
                            Ok(Frame::data(Bytes::from_static(b"\0\0\0\0\x02hi"))),
                            Ok(Frame::trailers(trailers)),
                        ];
                        let body = StreamBody::new(futures_util::stream::iter(frames));
                        let rsp = Response::builder()
                            .header("content-type", "application/grpc")
                            .body(body)
                            .unwrap();
                        Ok::<_, std::convert::Infallible>(rsp)
                    }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, rx)
}

#[tokio::test]
async fn trailers_pass_through_an_h2_upstream() {
    let (upstream, mut seen) = h2_upstream().await;
    let h = Harness::with(Options {
        upstream: Some(upstream),
        upstream_h2: true,
        ..Options::default()
    })
    .await;
    let req = Request::get(h.url("/api/orders/orders.v1.Orders/Get"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let rsp = h.send_mtls_h2(req).await;
    assert_eq!(rsp.status, StatusCode::OK);
    assert_eq!(rsp.body.as_ref(), b"\0\0\0\0\x02hi");
    let trailers = rsp.trailers.expect("trailers reach the client");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["grpc-message"], "ok");
    let (authority, te) = seen.recv().await.unwrap();
    assert_eq!(
        authority,
        h.host(),
        "the upstream sees the client's host as :authority"
    );
    assert_eq!(te.as_deref(), Some("trailers"));
}
