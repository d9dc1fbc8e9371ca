//! Graceful shutdown: in-flight requests finish, new connections are refused,
//! `/readyz` says draining, and the proxy stops on its own.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::{mpsc, watch};

use super::harness::{Harness, Options};

/// An upstream that holds every response until `release` turns true, and
/// reports each request it holds.
async fn held_upstream() -> (
    std::net::SocketAddr,
    mpsc::UnboundedReceiver<()>,
    watch::Sender<bool>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (arrived, arrivals) = mpsc::unbounded_channel();
    let (release, released) = watch::channel(false);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (arrived, released) = (arrived.clone(), released.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req: Request<Incoming>| {
                    let (arrived, mut released) = (arrived.clone(), released.clone());
                    async move {
                        let _ = arrived.send(());
                        let _ = released.wait_for(|r| *r).await;
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                            Bytes::from_static(b"done"),
                        )))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, arrivals, release)
}

#[tokio::test]
async fn in_flight_requests_finish_and_new_connections_are_refused() {
    const IN_FLIGHT: usize = 50;
    let (upstream, mut arrivals, release) = held_upstream().await;
    let mut h = Harness::with(Options {
        tls: false,
        upstream: Some(upstream),
        ..Options::default()
    })
    .await;
    let addr = h.addr;
    let mut requests = Vec::new();
    for i in 0..IN_FLIGHT {
        let req = h
            .request("GET", &format!("/public/slow/{i}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        requests.push(tokio::spawn(warden::devkit::send(addr, None, false, req)));
    }
    for _ in 0..IN_FLIGHT {
        arrivals.recv().await.unwrap();
    }

    h.begin_shutdown();
    // The listener closes: new connections are refused (polled, with a deadline).
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "still accepting after shutdown began"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (code, body) = h.admin_get("/readyz").await;
    assert_eq!(code, 503);
    assert!(body.contains("draining"), "{body}");

    // Every in-flight request completes.
    release.send(true).unwrap();
    for r in requests {
        let rsp = r.await.unwrap().unwrap();
        assert_eq!(rsp.status, StatusCode::OK);
        assert_eq!(rsp.body.as_ref(), b"done");
    }
    tokio::time::timeout(Duration::from_secs(15), h.stopped())
        .await
        .expect("the proxy stops within the drain timeout");
}
