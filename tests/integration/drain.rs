//! Graceful shutdown: in-flight requests finish, new connections are refused,
//! `/readyz` says draining, and the proxy stops on its own.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::{mpsc, watch};

use tokio::io::AsyncReadExt;
use warden::devkit;

use super::harness::{policies_dir, Proxy};

/// A plaintext harness (with `extra_toml`) in front of [`held_upstream`],
/// and that upstream's arrivals and release.
pub async fn harness_before_held_upstream(
    extra_toml: &str,
) -> (
    super::harness::Harness,
    mpsc::UnboundedReceiver<()>,
    watch::Sender<bool>,
) {
    let (upstream, arrivals, release) = held_upstream().await;
    let h = super::harness::Harness::with(super::harness::Options {
        tls: false,
        upstream: Some(upstream),
        extra_toml: extra_toml.into(),
        ..super::harness::Options::default()
    })
    .await;
    (h, arrivals, release)
}

/// An upstream that holds every response until `release` turns true, and
/// reports each request it holds.
pub async fn held_upstream() -> (
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

/// Acceptance: SIGTERM to the real binary during 200 in-flight slow requests
/// (100 on their own HTTP/1.1 connections, 100 as streams of one HTTP/2
/// connection): every one completes with 200, new connections are refused,
/// `/readyz` says draining, an idle connection is closed, and warden exits 0
/// within the drain timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_then_exits_0() {
    const H1: usize = 100;
    const H2: usize = 100;
    let (upstream, mut arrivals, release) = held_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("warden.toml");
    std::fs::write(
        &config,
        format!(
            "[listener]\naddress = \"127.0.0.1:0\"\n[upstream]\naddress = \"{upstream}\"\n\
             [admin]\naddress = \"127.0.0.1:0\"\n[authz]\npolicies = \"{}\"\n\
             [runtime]\ndrain_timeout = \"20s\"\n",
            policies_dir().display()
        ),
    )
    .unwrap();
    let mut proxy = Proxy::start(&config);
    let addr = proxy.addr;
    let get = |i: usize| {
        Request::get(format!("http://localhost:{}/public/slow/{i}", addr.port()))
            .header("host", format!("localhost:{}", addr.port()))
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let mut requests = Vec::new();
    for i in 0..H1 {
        requests.push(tokio::spawn(devkit::send(addr, None, false, get(i))));
    }
    let h2 = devkit::Conn::open(addr, None, true).await.unwrap();
    let devkit::Conn::Http2(h2) = h2 else {
        unreachable!("an HTTP/2 connection")
    };
    for i in 0..H2 {
        let mut tx = h2.clone();
        let req = get(H1 + i);
        requests.push(tokio::spawn(async move {
            let rsp = tx.send_request(req).await?;
            let (parts, body) = rsp.into_parts();
            let body = http_body_util::BodyExt::collect(body).await?.to_bytes();
            Ok(devkit::Reply {
                status: parts.status,
                headers: parts.headers,
                body,
                trailers: None,
            })
        }));
    }
    for _ in 0..H1 + H2 {
        arrivals.recv().await.unwrap();
    }
    let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();

    let term = std::process::Command::new("kill")
        .args(["-TERM", &proxy.child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    // The listener closes: new connections are refused (polled, with a deadline).
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(Instant::now() < deadline, "still accepting after SIGTERM");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let readyz = Request::get("/readyz")
        .header("host", "admin")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let rsp = devkit::send(proxy.admin, None, false, readyz)
        .await
        .unwrap();
    assert_eq!(rsp.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(rsp.text().contains("draining"), "{}", rsp.text());
    // The idle connection is closed rather than waited for.
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), idle.read(&mut buf))
        .await
        .expect("the idle connection stays open while draining");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");

    // Every in-flight request completes.
    release.send(true).unwrap();
    for r in requests {
        let rsp = r.await.unwrap().unwrap();
        assert_eq!(rsp.status, StatusCode::OK);
        assert_eq!(rsp.body.as_ref(), b"done");
    }
    let status = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = proxy.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "warden did not exit within the drain timeout"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await
    .unwrap();
    assert_eq!(status.code(), Some(0));
}
