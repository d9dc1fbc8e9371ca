//! Gateway mode in-process: routes by host and path prefix to two upstreams,
//! each its own `Http::Service`; an unknown host is 404 before any upstream.

use std::time::SystemTime;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use warden::devkit;

use super::harness::{orders_key, policy_dir_with, Harness, Options};

const POLICIES: &str = r#"
@id("alpha-public-reads")
permit (principal, action == Action::"GET", resource in Http::Service::"alpha");

@id("beta-orders-role")
permit (
  principal == Aws::Role::"arn:aws:iam::123456789012:role/order-service-role",
  action in Action::"invoke",
  resource in Http::Service::"beta"
);
"#;

#[tokio::test]
async fn routes_pick_upstream_and_service() {
    let (alpha, mut alpha_seen) = devkit::spawn_upstream().await.unwrap();
    let (beta, mut beta_seen) = devkit::spawn_upstream().await.unwrap();
    let dir = policy_dir_with("gateway.cedar", POLICIES);
    let h = Harness::with(Options {
        tls: false,
        policies: Some(dir.path().to_path_buf()),
        extra_toml: format!(
            "[[route]]\nhost = \"alpha.svc\"\nupstream = \"{alpha}\"\nservice = \"alpha\"\n\n\
             [[route]]\nhost = \"*.beta.svc\"\npath_prefix = \"/api\"\nupstream = \"{beta}\"\nservice = \"beta\"\n"
        ),
        ..Options::default()
    })
    .await;
    let port = h.addr.port();
    let get = |host: &str, path: &str| {
        http::Request::get(path)
            .header("host", format!("{host}:{port}"))
            .body(Full::new(Bytes::new()))
            .unwrap()
    };

    // alpha: anyone may read.
    let rsp = h.send(get("alpha.svc", "/anything")).await;
    assert_eq!(rsp.status, StatusCode::OK, "{}", rsp.text());
    assert_eq!(alpha_seen.try_recv().unwrap().uri, "/anything");
    assert!(beta_seen.try_recv().is_err());

    // beta: a signed call from the orders role reaches the beta upstream.
    let host = format!("pay.beta.svc:{port}");
    let url = format!("http://{host}/api/charge");
    let mut req = http::Request::post("/api/charge").header("host", &host);
    for (k, v) in devkit::sign_sigv4(
        &orders_key(),
        "POST",
        &url,
        &[("host", host.as_str())],
        b"{}",
        SystemTime::now(),
        false,
    )
    .unwrap()
    {
        req = req.header(k, v);
    }
    let rsp = h
        .send(req.body(Full::new(Bytes::from_static(b"{}"))).unwrap())
        .await;
    assert_eq!(rsp.status, StatusCode::OK, "{}", rsp.text());
    assert_eq!(beta_seen.try_recv().unwrap().uri, "/api/charge");

    // beta does not let anonymous callers in; alpha's policy does not reach it.
    assert_eq!(
        h.send(get("pay.beta.svc", "/api/charge")).await.status,
        StatusCode::FORBIDDEN
    );

    // No route: unknown host, or beta's host outside its path prefix.
    for (host, path) in [
        ("gamma.svc", "/x"),
        ("pay.beta.svc", "/other"),
        ("beta.svc", "/api/x"),
    ] {
        let rsp = h.send(get(host, path)).await;
        assert_eq!(rsp.status, StatusCode::NOT_FOUND, "{host}{path}");
        let body: serde_json::Value = serde_json::from_slice(&rsp.body).unwrap();
        assert_eq!(body["error"], "no_route");
    }
    assert!(alpha_seen.try_recv().is_err());
    assert!(beta_seen.try_recv().is_err());
}
