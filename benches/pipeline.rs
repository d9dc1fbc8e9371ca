//! The whole request path in process — request in, forwarded request out —
//! once per authentication method: mTLS identity, a cached JWT, SigV4 with a
//! warm signing-key cache. The upstream is a minimal hyper server on loopback
//! answering 200, reached over the pooled keep-alive client, so each figure
//! is warden's work plus one loopback round trip.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http::Request;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::registry::Registry;
use tower::ServiceExt;
use warden::audit::DecisionLog;
use warden::authn::mtls::SpiffeId;
use warden::body::{self, Body};
use warden::config::Config;
use warden::devkit::{self, SigV4Key, TokenIssuer};
use warden::metrics::Metrics;
use warden::pipeline::{self, Shared};
use warden::trace::{ConnInfo, PeerCert, TlsInfo};

const ISSUER: &str = "https://oidc.bench.example/id/X";

/// (name, path, extra headers).
type Case = (&'static str, &'static str, Vec<(String, String)>);

async fn upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(b"ok"))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

fn pipeline(c: &mut Criterion) {
    warden::install_crypto_provider();
    // One thread runs warden, the upstream and the bench loop, so no time
    // goes to waking other threads.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let up = rt.block_on(upstream());
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let issuer = TokenIssuer::generate("k1").expect("issuer");
    std::fs::write(d.join("jwks.json"), issuer.jwks()).expect("write");
    std::fs::write(
        d.join("credentials.toml"),
        "[[credential]]\naccess_key_id = \"AKIDBENCH00000000001\"\nsecret_access_key = \"bench-secret\"\n\
         principal = \"arn:aws:iam::123456789012:role/order-service-role\"\n",
    )
    .expect("write");
    let policies = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let toml = format!(
        "[upstream]\naddress = \"{up}\"\n[service]\nname = \"orders\"\n\
         [authn.sigv4]\ncredentials = \"{}\"\n\
         [[authn.jwt]]\nissuer = \"{ISSUER}\"\naudiences = [\"orders\"]\njwks_file = \"{}\"\nprincipal = \"k8s\"\ncluster = \"bench\"\n\
         [authz]\npolicies = \"{}\"\n",
        d.join("credentials.toml").display(),
        d.join("jwks.json").display(),
        policies.display()
    );
    let cfg =
        Config::from_toml_str(&toml, &d.join("warden.toml"), std::iter::empty()).expect("config");
    let loaded = warden::app::load(&cfg).expect("load");
    let shared = Shared {
        authn: Arc::new(arc_swap::ArcSwap::from_pointee(loaded.authn)),
        policies: Arc::new(arc_swap::ArcSwap::from_pointee(loaded.policies)),
        shadow: None,
        metrics: Arc::new(Metrics::register(&mut Registry::default())),
        log: DecisionLog::disabled(),
        mode: cfg.authz.mode,
        explain: false,
        identity: cfg.identity.headers,
        upstream: cfg.upstream.clone(),
        routes: Vec::new(),
        max_requests: cfg.runtime.max_requests,
        max_header_bytes: usize::try_from(cfg.runtime.max_header_bytes).unwrap_or(usize::MAX),
        idle_timeout: cfg.runtime.idle_timeout,
    };
    let svc = pipeline::build(&shared);
    let conn = Arc::new(ConnInfo::new(
        "127.0.0.1:40000".parse().expect("addr"),
        "127.0.0.1:15001".parse().expect("addr"),
        Some(TlsInfo {
            version: "TLSv1.3",
            peer: Some(PeerCert::Spiffe(
                SpiffeId::parse("spiffe://example.org/ns/shop/sa/web").expect("id"),
            )),
        }),
    ));
    let token = issuer
        .sign(&serde_json::json!({
            "iss": ISSUER, "aud": "orders", "sub": "system:serviceaccount:shop:web",
            "exp": devkit::now_secs() + 3600,
        }))
        .expect("token");
    let signed = devkit::sign_sigv4(
        &SigV4Key {
            access_key_id: "AKIDBENCH00000000001",
            secret: "bench-secret",
            session_token: None,
            region: "us-east-1",
            service: "vpc-lattice-svcs",
        },
        "GET",
        "https://localhost/api/orders/1",
        &[("host", "localhost")],
        b"",
        SystemTime::now(),
        false,
    )
    .expect("sign");
    let request = |path: &str, extra: &[(String, String)]| -> Request<Body> {
        let mut b = Request::get(path).header("host", "localhost");
        for (k, v) in extra {
            b = b.header(k, v);
        }
        let mut req = b.body(body::empty()).expect("request");
        req.extensions_mut().insert(conn.clone());
        req
    };
    // Each allowed by the shipped policies.
    let cases: [Case; 3] = [
        ("mtls", "/api/orders/1", Vec::new()),
        (
            "jwt",
            "/api/catalog/1",
            vec![("authorization".into(), format!("Bearer {token}"))],
        ),
        ("sigv4", "/api/orders/1", signed),
    ];
    let mut group = c.benchmark_group("pipeline");
    for (name, path, headers) in &cases {
        // Once outside the timing: the answer must be 200 (and caches warm).
        let status = rt
            .block_on(svc.clone().oneshot(request(path, headers)))
            .expect("infallible")
            .status();
        assert_eq!(status, 200, "{name}: {status}");
        group.bench_function(*name, |b| {
            b.iter(|| {
                rt.block_on(async {
                    let rsp = svc
                        .clone()
                        .oneshot(request(path, headers))
                        .await
                        .expect("infallible");
                    http_body_util::BodyExt::collect(rsp.into_body()).await.ok()
                })
            })
        });
    }
    group.finish();
}

/// The binary's allocator (proxy/src/main.rs), so an allocation costs here
/// what it costs in the proxy.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

criterion_group!(benches, pipeline);
criterion_main!(benches);
