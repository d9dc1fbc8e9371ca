//! SigV4 header verification with the signing-key cache warm and cold, and
//! the STS token path with its verdict cache warm (a loopback stand-in for
//! STS answers the one cold call).

use std::time::{Duration, SystemTime};

use criterion::{criterion_group, criterion_main, Criterion};
use http::HeaderMap;
use warden::authn::sigv4::{self, Credential, SignedRequest, Verifier};
use warden::devkit::{self, SigV4Key};

const KEY: SigV4Key<'static> = SigV4Key {
    access_key_id: "AKIDBENCH00000000001",
    secret: "bench-secret-0123456789abcdef0123456789",
    session_token: None,
    region: "us-east-1",
    service: "vpc-lattice-svcs",
};

struct Req {
    path: String,
    query: Option<String>,
    headers: HeaderMap,
}

impl SignedRequest for Req {
    fn method(&self) -> &str {
        "POST"
    }
    fn raw_path(&self) -> &str {
        &self.path
    }
    fn raw_query(&self) -> Option<&str> {
        self.query.as_deref()
    }
    fn header_values<'a>(&'a self, name: &str) -> impl Iterator<Item = &'a [u8]> {
        self.headers.get_all(name).iter().map(|v| v.as_bytes())
    }
}

fn sigv4(c: &mut Criterion) {
    let now = SystemTime::now();
    let body = br#"{"order":"book","qty":1}"#;
    let url = "https://orders.local:15000/api/orders/42?view=full&lang=en";
    let extra = [
        ("host", "orders.local:15000"),
        ("content-type", "application/json"),
        ("x-tenant", "acme"),
    ];
    let signed = devkit::sign_sigv4(&KEY, "POST", url, &extra, body, now, false).expect("sign");
    let mut headers = HeaderMap::new();
    for (k, v) in extra
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .chain(signed)
    {
        headers.append(
            http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
            v.parse().expect("value"),
        );
    }
    let req = Req {
        path: "/api/orders/42".into(),
        query: Some("view=full&lang=en".into()),
        headers,
    };
    let auth = sigv4::parse_authorization(req.headers["authorization"].to_str().expect("ascii"))
        .expect("auth");
    let hash = sigv4::sha256_hex(body);
    let credential = || {
        vec![Credential::new(
            KEY.access_key_id,
            KEY.secret,
            "arn:aws:iam::123456789012:role/orders",
        )]
    };
    let warm = Verifier::new(
        vec!["us-east-1".into()],
        KEY.service.into(),
        Duration::from_secs(300),
        credential(),
    );
    let cold = Verifier::new(
        vec!["us-east-1".into()],
        KEY.service.into(),
        Duration::from_secs(300),
        credential(),
    )
    .without_key_cache();
    warm.verify(&req, &auth, &hash, now).expect("valid");
    let mut g = c.benchmark_group("sigv4_verify");
    g.bench_function("parse_authorization", |b| {
        b.iter(|| {
            sigv4::parse_authorization(req.headers["authorization"].to_str().expect("ascii"))
                .expect("auth")
        })
    });
    g.bench_function("header/warm_key_cache", |b| {
        b.iter(|| warm.verify(&req, &auth, &hash, now).expect("valid"))
    });
    g.bench_function("header/cold_key", |b| {
        b.iter(|| cold.verify(&req, &auth, &hash, now).expect("valid"))
    });
    g.bench_function("unknown_access_key", |b| {
        let other = sigv4::Auth {
            access_key_id: "AKIDNOTKNOWN00000000".into(),
            ..auth.clone()
        };
        b.iter(|| warm.verify(&req, &other, &hash, now).expect_err("unknown"))
    });
    g.finish();
}

fn sts(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (endpoint, verifier) = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|_req| async {
                        let xml = "<GetCallerIdentityResponse><GetCallerIdentityResult><Arn>arn:aws:sts::123456789012:assumed-role/orders/s1</Arn></GetCallerIdentityResult></GetCallerIdentityResponse>";
                        Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(bytes::Bytes::from(xml))))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        let endpoint = format!("http://{addr}");
        let toml = format!("[authn.sts]\nendpoint = \"{endpoint}\"\naudience = \"orders\"\n");
        let cfg = warden::config::Config::from_toml_str(&toml, std::path::Path::new("bench"), std::iter::empty())
            .expect("config");
        let sts = cfg.authn.sts.expect("sts");
        (endpoint, warden::authn::sts::StsVerifier::new(&sts, "orders").expect("verifier"))
    });
    let token = devkit::sts_token(
        &SigV4Key {
            service: "sts",
            ..KEY
        },
        &endpoint,
        "orders",
        SystemTime::now(),
    )
    .expect("token");
    rt.block_on(verifier.verify(&token))
        .expect("first call asks the stand-in");
    c.bench_function("sts_verify/warm_cache", |b| {
        b.iter(|| rt.block_on(verifier.verify(&token)).expect("cached"))
    });
    // A token not seen before: one call to the loopback stand-in, on a
    // kept-alive connection after the first. Each token is signed with an
    // access key of its own, so none is cached.
    let mut n = 0u64;
    c.bench_function("sts_verify/call", |b| {
        b.iter_batched(
            || {
                n += 1;
                let access_key_id = format!("AKIDBENCH{n:011}");
                let key = SigV4Key {
                    access_key_id: &access_key_id,
                    service: "sts",
                    ..KEY
                };
                devkit::sts_token(&key, &endpoint, "orders", SystemTime::now()).expect("token")
            },
            |token| rt.block_on(verifier.verify(&token)).expect("asked"),
            criterion::BatchSize::SmallInput,
        )
    });
}

/// The binary's allocator (proxy/src/main.rs), so an allocation costs here
/// what it costs in the proxy.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

criterion_group!(benches, sigv4, sts);
criterion_main!(benches);
