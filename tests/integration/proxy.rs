//! The proxy end to end, in-process: each authentication path allowed and
//! denied, every refusal answered before the upstream, identity attached.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;

use super::harness::{Harness, Options, Signing, ISSUER};

fn empty() -> Full<Bytes> {
    Full::new(Bytes::new())
}

#[tokio::test]
async fn sigv4_allowed_by_policy_reaches_upstream_with_identity() {
    let mut h = Harness::start().await;
    let rsp = h.send(h.signed("POST", "/api/orders/", b"{\"n\":1}")).await;
    assert_eq!(rsp.status, StatusCode::OK, "{}", rsp.text());
    let seen = h.upstream_got();
    assert_eq!(seen.uri, "/api/orders/");
    assert_eq!(seen.body.as_ref(), b"{\"n\":1}");
    assert_eq!(
        seen.headers["x-amzn-lattice-identity"],
        "Principal=arn:aws:iam::123456789012:role/order-service-role; PrincipalOrgID=o-exampleorgid; Type=AWS_IAM"
    );
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen.headers["x-forwarded-proto"], "https");
    assert!(seen.headers.contains_key("x-request-id"));
    let log = h.next_log();
    assert_eq!(log["authn"], "sigv4");
    assert_eq!(log["decision"], "allow");
    assert_eq!(log["policies"][0], "orders-role-invoke");
    assert_eq!(log["status"], 200);
    assert_eq!(log["resource"], "Http::Path::\"/api/orders/\"");
}

#[tokio::test]
async fn sigv4_denied_by_policy_is_403() {
    let mut h = Harness::start().await;
    let rsp = h.send(h.signed("GET", "/api/profile/me", b"")).await;
    assert_eq!(rsp.status, StatusCode::FORBIDDEN);
    let body: serde_json::Value = serde_json::from_slice(&rsp.body).unwrap();
    assert_eq!(body["error"], "forbidden");
    assert!(body["request_id"].is_string());
    h.assert_upstream_untouched();
}

#[tokio::test]
async fn sigv4_org_membership_comes_from_accounts_map() {
    let mut h = Harness::start().await;
    // `org-read-catalog` permits any principal in o-exampleorgid.
    let rsp = h.send(h.signed("GET", "/api/catalog/books", b"")).await;
    assert_eq!(rsp.status, StatusCode::OK, "{}", rsp.text());
    h.upstream_got();
}

/// Signs `POST /api/orders/` with `signed_body` and `how`, lets `tamper`
/// change the signed headers, sends `sent_body`.
async fn post_orders(
    h: &Harness,
    signed_body: &'static [u8],
    sent_body: &'static [u8],
    how: Signing<'_>,
    extra_sent: &[(&str, &str)],
    tamper: impl Fn(&str, String) -> String,
) -> warden::devkit::Reply {
    let mut req = h.request("POST", "/api/orders/");
    for (k, v) in extra_sent {
        req = req.header(*k, *v);
    }
    for (k, v) in h.sign("POST", "/api/orders/", signed_body, how) {
        let v = tamper(&k, v);
        req = req.header(k, v);
    }
    h.send(req.body(Full::new(Bytes::from_static(sent_body))).unwrap())
        .await
}

fn untouched(_: &str, v: String) -> String {
    v
}

#[tokio::test]
async fn sigv4_bad_credentials_are_401_and_never_forwarded() {
    let mut h = Harness::start().await;
    let body: &'static [u8] = b"{\"amount\":100}";
    let other: &'static [u8] = b"{\"amount\":999}";
    let now = SystemTime::now();
    let at = |time| Signing {
        time,
        ..Default::default()
    };
    let flip_last = |k: &str, mut v: String| {
        if k == "authorization" {
            let c = v.pop().unwrap_or('0');
            v.push(if c == '0' { '1' } else { '0' });
        }
        v
    };
    let cases: Vec<(&str, warden::devkit::Reply, &str)> = vec![
        (
            "bad signature",
            post_orders(&h, body, body, at(now), &[], flip_last).await,
            "signature mismatch",
        ),
        (
            "wrong secret",
            post_orders(
                &h,
                body,
                body,
                Signing {
                    secret: "not-the-secret",
                    ..at(now)
                },
                &[],
                untouched,
            )
            .await,
            "signature mismatch",
        ),
        (
            "expired date",
            post_orders(
                &h,
                body,
                body,
                at(now - Duration::from_secs(600)),
                &[],
                untouched,
            )
            .await,
            "request expired",
        ),
        (
            "tampered signed header",
            post_orders(
                &h,
                body,
                body,
                Signing {
                    extra: &[("x-tenant", "a")],
                    ..at(now)
                },
                &[("x-tenant", "b")],
                untouched,
            )
            .await,
            "signature mismatch",
        ),
        (
            "tampered body under x-amz-content-sha256",
            post_orders(
                &h,
                body,
                other,
                Signing {
                    content_sha256: true,
                    ..at(now)
                },
                &[],
                untouched,
            )
            .await,
            "payload hash mismatch",
        ),
        (
            "tampered body, hash computed",
            post_orders(&h, body, other, at(now), &[], untouched).await,
            "signature mismatch",
        ),
    ];
    for (what, rsp, reason) in cases {
        assert_eq!(rsp.status, StatusCode::UNAUTHORIZED, "{what}");
        assert!(rsp.text().contains(reason), "{what}: {}", rsp.text());
    }
    h.assert_upstream_untouched();

    // Untampered with the payload hash header: accepted.
    let rsp = post_orders(
        &h,
        body,
        body,
        Signing {
            content_sha256: true,
            ..at(now)
        },
        &[],
        untouched,
    )
    .await;
    assert_eq!(rsp.status, StatusCode::OK, "{}", rsp.text());
    assert_eq!(h.upstream_got().body.as_ref(), body);

    let metrics = h.metrics().await;
    assert!(
        metrics.contains(
            "warden_authn_failures_total{method=\"sigv4\",reason=\"signature_mismatch\"} 4"
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn body_over_max_body_is_413() {
    let mut h = Harness::with(Options {
        max_body: "16",
        ..Options::default()
    })
    .await;
    let rsp = h
        .send(h.signed("POST", "/api/orders/", b"0123456789abcdefXYZ"))
        .await;
    assert_eq!(rsp.status, StatusCode::PAYLOAD_TOO_LARGE);
    h.assert_upstream_untouched();
}

#[tokio::test]
async fn jwt_allowed_and_denied_by_policy() {
    let mut h = Harness::start().await;
    let token = h.sa_token("shop", "checkout");
    let req = h
        .request("GET", "/api/catalog/items")
        .header("authorization", format!("Bearer {token}"))
        .body(empty())
        .unwrap();
    let rsp = h.send(req).await;
    assert_eq!(rsp.status, StatusCode::OK, "{}", rsp.text());
    assert_eq!(
        h.upstream_got().headers["x-amzn-lattice-identity"],
        "Principal=shop/checkout; Type=K8S"
    );

    // Another namespace is not in the policy.
    let token = h.sa_token("billing", "worker");
    let req = h
        .request("GET", "/api/catalog/items")
        .header("authorization", format!("Bearer {token}"))
        .body(empty())
        .unwrap();
    assert_eq!(h.send(req).await.status, StatusCode::FORBIDDEN);
    h.assert_upstream_untouched();
}

#[tokio::test]
async fn bad_tokens_are_401_with_a_reason() {
    let mut h = Harness::start().await;
    let now = warden::devkit::now_secs();
    let sub = "system:serviceaccount:shop:checkout";
    let cases = [
        (
            serde_json::json!({"iss": ISSUER, "aud": "orders", "sub": sub, "exp": now - 3600}),
            "token expired",
        ),
        (
            serde_json::json!({"iss": ISSUER, "aud": "other", "sub": sub, "exp": now + 600}),
            "audience mismatch",
        ),
        (
            serde_json::json!({"iss": "https://evil.example", "aud": "orders", "sub": sub, "exp": now + 600}),
            "unknown issuer",
        ),
        (
            serde_json::json!({"iss": ISSUER, "aud": "orders", "sub": sub}),
            "missing claim `exp`",
        ),
        (
            serde_json::json!({"iss": ISSUER, "aud": "orders", "sub": sub, "exp": now + 600, "nbf": now + 3600}),
            "token not yet valid",
        ),
    ];
    for (claims, reason) in cases {
        let token = h.token(claims);
        let req = h
            .request("GET", "/api/catalog/items")
            .header("authorization", format!("Bearer {token}"))
            .body(empty())
            .unwrap();
        let rsp = h.send(req).await;
        assert_eq!(rsp.status, StatusCode::UNAUTHORIZED, "{reason}");
        assert!(rsp.text().contains(reason), "{reason}: {}", rsp.text());
    }
    // A token signed with HS256 using the public key as the secret is refused.
    let hs = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({"iss": ISSUER, "aud": "orders", "sub": sub, "exp": now + 600}),
        &jsonwebtoken::EncodingKey::from_secret(h.issuer.jwks().as_bytes()),
    )
    .unwrap();
    // A signature from a key not in the set.
    let stranger = warden::devkit::TokenIssuer::generate("k1").unwrap();
    let forged = stranger
        .sign(&serde_json::json!({"iss": ISSUER, "aud": "orders", "sub": sub, "exp": now + 600}))
        .unwrap();
    for (token, reason) in [
        (hs, "algorithm not allowed"),
        (forged, "signature invalid"),
        ("not.a.jwt".to_owned(), "malformed token"),
    ] {
        let req = h
            .request("GET", "/api/catalog/items")
            .header("authorization", format!("Bearer {token}"))
            .body(empty())
            .unwrap();
        let rsp = h.send(req).await;
        assert_eq!(rsp.status, StatusCode::UNAUTHORIZED, "{reason}");
        assert!(rsp.text().contains(reason), "{reason}: {}", rsp.text());
    }
    h.assert_upstream_untouched();
}

#[tokio::test]
async fn mtls_spiffe_identity_over_http2_allowed_and_denied() {
    let mut h = Harness::start().await;
    let req = http::Request::get(h.url("/api/orders/42"))
        .body(empty())
        .unwrap();
    let rsp = h.send_mtls_h2(req).await;
    assert_eq!(rsp.status, StatusCode::OK, "{}", rsp.text());
    let seen = h.upstream_got();
    assert_eq!(
        seen.headers["x-amzn-lattice-identity"],
        "Principal=spiffe://example.org/ns/shop/sa/web; Type=SPIFFE"
    );
    assert_eq!(seen.headers["host"], h.host());
    let log = h.next_log();
    assert_eq!(log["authn"], "mtls");
    assert_eq!(
        log["principal"],
        "Spiffe::Id::\"spiffe://example.org/ns/shop/sa/web\""
    );

    // The SPIFFE policy allows GET only.
    let req = http::Request::post(h.url("/api/orders/"))
        .body(empty())
        .unwrap();
    assert_eq!(h.send_mtls_h2(req).await.status, StatusCode::FORBIDDEN);
    h.assert_upstream_untouched();
}

#[tokio::test]
async fn mtls_required_refuses_a_handshake_without_a_client_certificate() {
    let h = Harness::with(Options {
        client_auth: "required",
        ..Options::default()
    })
    .await;
    let req = h.request("GET", "/public/x").body(empty()).unwrap();
    let result = warden::devkit::send(h.addr, h.tls(false, &[b"http/1.1"]), false, req).await;
    assert!(
        result.is_err(),
        "handshake without a client cert succeeded: {result:?}"
    );
    // With one it works.
    let req = http::Request::get(h.url("/api/orders/1"))
        .body(empty())
        .unwrap();
    assert_eq!(h.send_mtls_h2(req).await.status, StatusCode::OK);
    let metrics = h.metrics().await;
    assert!(
        metrics.contains("warden_tls_handshake_errors_total 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn unsigned_request_to_protected_path_is_403_public_is_allowed() {
    let mut h = Harness::start().await;
    let rsp = h
        .send(h.request("GET", "/api/orders/42").body(empty()).unwrap())
        .await;
    assert_eq!(rsp.status, StatusCode::FORBIDDEN);
    h.assert_upstream_untouched();
    let log = h.next_log();
    assert_eq!(log["principal"], "Warden::Anonymous::\"anonymous\"");
    assert_eq!(log["decision"], "deny");
    assert_eq!(log["status"], 403);

    let rsp = h
        .send(h.request("GET", "/public/status").body(empty()).unwrap())
        .await;
    assert_eq!(rsp.status, StatusCode::OK);
    assert_eq!(
        h.upstream_got().headers["x-amzn-lattice-identity"],
        "Type=Anonymous"
    );
}

#[tokio::test]
async fn malformed_paths_are_400_and_never_reach_the_upstream() {
    let mut h = Harness::start().await;
    for path in [
        "/public/../../etc/passwd",
        "/a/../../b",
        "/public/a%2Fb",
        "/public/a%2fb",
        "/public/a%5Cb",
        "/public/a%00b",
        "/public/a;jsessionid=1",
        "/public/%2e%2e/%2e%2e/x",
        "/public/a%zz",
    ] {
        let rsp = h.send(h.request("GET", path).body(empty()).unwrap()).await;
        assert_eq!(rsp.status, StatusCode::BAD_REQUEST, "{path}");
        let body: serde_json::Value = serde_json::from_slice(&rsp.body).unwrap();
        assert_eq!(body["error"], "bad_request", "{path}");
        h.assert_upstream_untouched();
    }
}

#[tokio::test]
async fn upstream_receives_the_normalized_path() {
    let mut h = Harness::start().await;
    let rsp = h
        .send(
            h.request("GET", "//public/./a/../%62?q=1")
                .body(empty())
                .unwrap(),
        )
        .await;
    assert_eq!(rsp.status, StatusCode::OK, "{}", rsp.text());
    assert_eq!(h.upstream_got().uri, "/public/b?q=1");
    // `/public` matches `/public/` but `/publicity` does not.
    let rsp = h
        .send(h.request("GET", "/public").body(empty()).unwrap())
        .await;
    assert_eq!(rsp.status, StatusCode::OK);
    h.upstream_got();
    let rsp = h
        .send(h.request("GET", "/publicity").body(empty()).unwrap())
        .await;
    assert_eq!(rsp.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn spoofed_identity_and_forwarding_headers_never_reach_the_upstream() {
    let mut h = Harness::start().await;
    let req = h
        .request("GET", "/public/x")
        .header(
            "x-amzn-lattice-identity",
            "Principal=arn:aws:iam::999999999999:role/admin; Type=AWS_IAM",
        )
        .header("x-amzn-lattice-network", "evil")
        .header("x-forwarded-for", "10.9.9.9")
        .header("x-forwarded-client-cert", "By=spiffe://evil")
        .header("x-warden-principal", "admin")
        .header("forwarded", "for=10.9.9.9")
        .header("x-real-ip", "10.9.9.9")
        .header("connection", "x-hop")
        .header("x-hop", "secret")
        .body(empty())
        .unwrap();
    assert_eq!(h.send(req).await.status, StatusCode::OK);
    let seen = h.upstream_got();
    assert_eq!(seen.headers["x-amzn-lattice-identity"], "Type=Anonymous");
    assert_eq!(seen.headers.get_all("x-forwarded-for").iter().count(), 1);
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
    for gone in [
        "x-amzn-lattice-network",
        "x-forwarded-client-cert",
        "x-warden-principal",
        "forwarded",
        "x-real-ip",
        "x-hop",
    ] {
        assert!(
            !seen.headers.contains_key(gone),
            "{gone} reached the upstream"
        );
    }
}

#[tokio::test]
async fn two_credentials_are_401() {
    let mut h = Harness::start().await;
    let token = h.sa_token("shop", "checkout");
    // A bearer token plus a presigned query.
    let req = h
        .request(
            "GET",
            "/api/catalog/x?X-Amz-Signature=00&X-Amz-Credential=a",
        )
        .header("authorization", format!("Bearer {token}"))
        .body(empty())
        .unwrap();
    let rsp = h.send(req).await;
    assert_eq!(rsp.status, StatusCode::UNAUTHORIZED);
    assert!(
        rsp.text().contains("more than one credential"),
        "{}",
        rsp.text()
    );
    // Two Authorization headers.
    let mut req = h.signed("GET", "/api/catalog/x", b"");
    req.headers_mut()
        .append("authorization", format!("Bearer {token}").parse().unwrap());
    let rsp = h.send(req).await;
    assert_eq!(rsp.status, StatusCode::UNAUTHORIZED);
    // An unknown scheme is a credential too: never anonymous.
    let req = h
        .request("GET", "/public/x")
        .header("authorization", "Basic YWxhZGRpbjpvcGVuc2VzYW1l")
        .body(empty())
        .unwrap();
    assert_eq!(h.send(req).await.status, StatusCode::UNAUTHORIZED);
    h.assert_upstream_untouched();
}

#[tokio::test]
async fn undeclared_method_is_405_and_connect_upgrade_are_400() {
    let mut h = Harness::start().await;
    let rsp = h
        .send(h.request("TRACE", "/public/x").body(empty()).unwrap())
        .await;
    assert_eq!(rsp.status, StatusCode::METHOD_NOT_ALLOWED);
    let req = h
        .request("GET", "/public/x")
        .header("connection", "upgrade")
        .header("upgrade", "h2c")
        .body(empty())
        .unwrap();
    assert_eq!(h.send(req).await.status, StatusCode::BAD_REQUEST);
    h.assert_upstream_untouched();
}

#[tokio::test]
async fn upstream_down_is_502() {
    let h = Harness::with(Options {
        upstream_down: true,
        ..Options::default()
    })
    .await;
    let rsp = h
        .send(h.request("GET", "/public/x").body(empty()).unwrap())
        .await;
    assert_eq!(rsp.status, StatusCode::BAD_GATEWAY);
    let body: serde_json::Value = serde_json::from_slice(&rsp.body).unwrap();
    assert_eq!(body["error"], "upstream_unavailable");
    let metrics = h.metrics().await;
    assert!(
        metrics.contains("warden_upstream_errors_total{kind=\"connect\"} 1"),
        "{metrics}"
    );
}

/// hyper's client would send a GET whose body has no known length without
/// it; warden frames it explicitly, so a chunked GET body arrives whole.
#[tokio::test]
async fn a_chunked_get_body_reaches_the_upstream() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut h = Harness::plaintext().await;
    let host = h.host();
    for body in [&b"hello"[..], &b""[..]] {
        let mut s = tokio::net::TcpStream::connect(h.addr).await.unwrap();
        let mut req = format!(
            "GET /public/x HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )
        .into_bytes();
        if !body.is_empty() {
            req.extend_from_slice(format!("{:x}\r\n", body.len()).as_bytes());
            req.extend_from_slice(body);
            req.extend_from_slice(b"\r\n");
        }
        req.extend_from_slice(b"0\r\n\r\n");
        s.write_all(&req).await.unwrap();
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).await.unwrap();
        assert!(
            answer.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
        assert_eq!(h.upstream_got().body.as_ref(), body);
    }
    h.assert_upstream_untouched();
}

#[tokio::test]
async fn every_metric_family_is_exported_before_its_first_event() {
    let mut h = Harness::with(Options::default()).await;
    let metrics = h.metrics().await;
    // DESIGN.md's families with fixed label sets (or none) have a `# TYPE`
    // line on a fresh proxy.
    for family in [
        "warden_request_duration_seconds",
        "warden_authz_decisions",
        "warden_policy_reloads",
        "warden_tls_handshake_errors",
        "warden_upstream_errors",
        "warden_connections_active",
        "warden_cert_reloads",
    ] {
        assert!(
            metrics.contains(&format!("# TYPE {family} ")),
            "{family} missing:\n{metrics}"
        );
    }
    // So do the process metrics every Prometheus client library exports.
    for family in [
        "process_cpu_seconds",
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_threads",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
    ] {
        assert!(
            metrics.contains(&format!("# TYPE {family} ")),
            "{family} missing:\n{metrics}"
        );
    }
    // Series with fixed label sets start at zero.
    for series in [
        "warden_upstream_errors_total{kind=\"connect\"} 0",
        "warden_upstream_errors_total{kind=\"connect_timeout\"} 0",
        "warden_upstream_errors_total{kind=\"timeout\"} 0",
        "warden_upstream_errors_total{kind=\"protocol\"} 0",
        "warden_cert_reloads_total{result=\"ok\"} 0",
        "warden_decision_log_dropped_total 0",
        "warden_cert_reloads_total{result=\"error\"} 0",
        "warden_policy_reloads_total{result=\"error\"} 0",
        "warden_authz_decisions_total{decision=\"allow\",mode=\"enforce\"} 0",
        "warden_authz_decisions_total{decision=\"deny\",mode=\"enforce\"} 0",
    ] {
        assert!(metrics.contains(series), "{series} missing:\n{metrics}");
    }
    // The two labelled by the request itself appear with the first request.
    for family in ["warden_requests", "warden_authn_failures"] {
        assert!(!metrics.contains(&format!("# TYPE {family} ")), "{family}");
    }
    let rsp = h
        .send(h.request("GET", "/public/x").body(empty()).unwrap())
        .await;
    assert_eq!(rsp.status, StatusCode::OK);
    h.upstream_got();
    let rsp = h
        .send(
            h.request("GET", "/public/x")
                .header("authorization", "Bearer not-a-token")
                .body(empty())
                .unwrap(),
        )
        .await;
    assert_eq!(rsp.status, StatusCode::UNAUTHORIZED);
    let metrics = h.metrics().await;
    for family in ["warden_requests", "warden_authn_failures"] {
        assert!(
            metrics.contains(&format!("# TYPE {family} counter")),
            "{family} missing:\n{metrics}"
        );
    }
}

#[tokio::test]
async fn plaintext_listener_and_admin_endpoints() {
    let mut h = Harness::plaintext().await;
    let rsp = h.send(h.signed("POST", "/api/orders/", b"x")).await;
    assert_eq!(rsp.status, StatusCode::OK, "{}", rsp.text());
    assert_eq!(h.upstream_got().headers["x-forwarded-proto"], "http");
    for (path, code) in [("/healthz", 200), ("/readyz", 200), ("/nope", 404)] {
        let req = http::Request::get(path)
            .header("host", "a")
            .body(empty())
            .unwrap();
        let rsp = warden::devkit::send(h.admin, None, false, req)
            .await
            .unwrap();
        assert_eq!(rsp.status.as_u16(), code, "{path}");
    }
    // `warden healthcheck` (the container health check) sees the admin endpoint.
    let url = format!("http://{}/readyz", h.admin);
    let status = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_warden"))
            .args(["healthcheck", "--url", &url])
            .status()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(status.success());
    let metrics = h.metrics().await;
    for name in [
        "warden_requests_total{authn=\"sigv4\",decision=\"allow\",code=\"200\"} 1",
        "warden_request_duration_seconds_count 1",
        "warden_authz_decisions_total{decision=\"allow\",mode=\"enforce\"} 1",
        "warden_connections_active",
        "warden_policy_reloads_total{result=\"ok\"} 1",
    ] {
        assert!(metrics.contains(name), "{name} missing from\n{metrics}");
    }
}

#[tokio::test]
async fn grpc_denial_is_trailers_only() {
    let mut h = Harness::start().await;
    let req = http::Request::post(h.url("/api/admin/Thing/Delete"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(empty())
        .unwrap();
    let rsp = h.send_mtls_h2(req).await;
    assert_eq!(rsp.status, StatusCode::OK);
    assert_eq!(rsp.headers["grpc-status"], "7");
    h.assert_upstream_untouched();
}

#[tokio::test]
async fn unix_socket_upstream() {
    let mut h = Harness::with(Options {
        upstream_unix: true,
        ..Options::default()
    })
    .await;
    let rsp = h.send(h.signed("POST", "/api/orders/", b"over unix")).await;
    assert_eq!(rsp.status, StatusCode::OK, "{}", rsp.text());
    let seen = h.upstream_got();
    assert_eq!(seen.body.as_ref(), b"over unix");
    assert_eq!(seen.headers["host"], h.host());
}

#[tokio::test]
async fn presigned_urls_are_accepted_until_they_expire() {
    let mut h = Harness::start().await;
    let target = h.presigned("GET", "/api/downloads/7?view=full", SystemTime::now(), 60);
    let rsp = h
        .send(h.request("GET", &target).body(empty()).unwrap())
        .await;
    assert_eq!(rsp.status, StatusCode::OK, "{}", rsp.text());
    let seen = h.upstream_got();
    assert!(
        seen.uri.starts_with("/api/downloads/7?view=full&X-Amz-"),
        "{}",
        seen.uri
    );
    assert!(seen.headers["x-amzn-lattice-identity"]
        .to_str()
        .unwrap()
        .contains("order-service-role"));
    assert_eq!(h.next_log()["policies"][0], "presigned-downloads");
    // `presigned-only-downloads`: the same role, presigned, may not read orders.
    let orders = h.presigned("GET", "/api/orders/7", SystemTime::now(), 60);
    let rsp = h
        .send(h.request("GET", &orders).body(empty()).unwrap())
        .await;
    assert_eq!(rsp.status, StatusCode::FORBIDDEN);
    let log = h.next_log();
    assert_eq!(log["decision"], "deny");
    assert_eq!(log["policies"][0], "presigned-only-downloads");

    // Signed two minutes ago for one minute: expired.
    let old = h.presigned(
        "GET",
        "/api/orders/7",
        SystemTime::now() - Duration::from_secs(120),
        60,
    );
    let rsp = h.send(h.request("GET", &old).body(empty()).unwrap()).await;
    assert_eq!(rsp.status, StatusCode::UNAUTHORIZED);
    assert!(rsp.text().contains("request expired"), "{}", rsp.text());

    // A changed query parameter or method breaks the signature.
    let tampered = target.replace("view=full", "view=all");
    let rsp = h
        .send(h.request("GET", &tampered).body(empty()).unwrap())
        .await;
    assert_eq!(rsp.status, StatusCode::UNAUTHORIZED);
    assert!(rsp.text().contains("signature mismatch"), "{}", rsp.text());
    let rsp = h
        .send(h.request("DELETE", &target).body(empty()).unwrap())
        .await;
    assert_eq!(rsp.status, StatusCode::UNAUTHORIZED);

    // Presigned plus an Authorization header is two credentials.
    let req = h
        .request("GET", &target)
        .header("authorization", "Bearer x.y.z")
        .body(empty())
        .unwrap();
    let rsp = h.send(req).await;
    assert_eq!(rsp.status, StatusCode::UNAUTHORIZED);
    assert!(
        rsp.text().contains("more than one credential"),
        "{}",
        rsp.text()
    );
    h.assert_upstream_untouched();
}

#[tokio::test]
async fn sigv4_over_http2_signs_the_authority() {
    let mut h = Harness::start().await;
    let body: &'static [u8] = b"{\"via\":\"h2\"}";
    let mut req = http::Request::post(h.url("/api/orders/"));
    // No `host` header on HTTP/2: `:authority` stands in for it.
    for (k, v) in h.sign("POST", "/api/orders/", body, Signing::default()) {
        if k != "host" {
            req = req.header(k, v);
        }
    }
    let req = req.body(Full::new(Bytes::from_static(body))).unwrap();
    assert!(!req.headers().contains_key("host"));
    let rsp = warden::devkit::send(h.addr, h.tls(false, &[b"h2"]), true, req)
        .await
        .unwrap();
    assert_eq!(rsp.status, StatusCode::OK, "{}", rsp.text());
    assert_eq!(h.upstream_got().body.as_ref(), body);
}

/// Sends GET `path` over mTLS with `cert` as the client certificate.
async fn with_cert(
    h: &Harness,
    cert: &warden::devkit::CertPair,
    path: &str,
) -> Result<warden::devkit::Reply, Box<dyn std::error::Error + Send + Sync>> {
    let tls = warden::devkit::client_tls(&h.ca.pem(), Some(cert), &[b"http/1.1"]).unwrap();
    let req = h.request("GET", path).body(empty()).unwrap();
    warden::devkit::send(h.addr, Some(tls), false, req).await
}

#[tokio::test]
async fn x509_svid_rules_are_enforced() {
    use rcgen::KeyUsagePurpose as Ku;
    let mut h = Harness::with(Options {
        trust_domains: Some("[\"example.org\"]"),
        ..Options::default()
    })
    .await;
    let ok =
        h.ca.client_with(
            &["spiffe://example.org/ns/shop/sa/web"],
            false,
            &[Ku::DigitalSignature],
        )
        .unwrap();
    assert_eq!(
        with_cert(&h, &ok, "/api/orders/1").await.unwrap().status,
        StatusCode::OK
    );
    h.upstream_got();
    // Refused as 401, with the reason: the certificate chains to the CA, but
    // its identity breaks the SPIFFE rules.
    for (uris, usages, reason) in [
        (
            vec!["spiffe://example.org/a", "spiffe://example.org/b"],
            vec![Ku::DigitalSignature],
            "more than one URI SAN",
        ),
        (
            vec!["spiffe://Example.org/x"],
            vec![Ku::DigitalSignature],
            "trust domain has invalid characters",
        ),
        (
            vec!["spiffe://example.org/a/../b"],
            vec![Ku::DigitalSignature],
            "empty or dot segment",
        ),
        (
            vec!["spiffe://other.org/ns/x"],
            vec![Ku::DigitalSignature],
            "trust domain not allowed",
        ),
        (
            vec!["spiffe://example.org/ns/x"],
            vec![Ku::DigitalSignature, Ku::KeyCertSign],
            "key usage",
        ),
    ] {
        let cert = h.ca.client_with(&uris, false, &usages).unwrap();
        let rsp = with_cert(&h, &cert, "/api/orders/1").await.unwrap();
        assert_eq!(rsp.status, StatusCode::UNAUTHORIZED, "{uris:?}");
        assert!(rsp.text().contains(reason), "{uris:?}: {}", rsp.text());
    }
    // A CA certificate as the leaf is refused at the handshake (webpki will not
    // take a CA as an end entity), before any SPIFFE rule is read.
    let ca_leaf =
        h.ca.client_with(
            &["spiffe://example.org/ns/x"],
            true,
            &[Ku::DigitalSignature, Ku::KeyCertSign],
        )
        .unwrap();
    assert!(with_cert(&h, &ca_leaf, "/api/orders/1").await.is_err());
    // No URI SAN at all: a verified certificate without an identity is anonymous.
    let plain =
        h.ca.client_with(&[], false, &[Ku::DigitalSignature])
            .unwrap();
    assert_eq!(
        with_cert(&h, &plain, "/api/orders/1").await.unwrap().status,
        StatusCode::FORBIDDEN
    );
    h.assert_upstream_untouched();
}

#[tokio::test]
async fn audit_mode_forwards_denies_and_logs_them() {
    let mut h = Harness::with(Options {
        authz_extra: "mode = \"audit\"".into(),
        ..Options::default()
    })
    .await;
    let rsp = h
        .send(h.request("GET", "/api/orders/42").body(empty()).unwrap())
        .await;
    assert_eq!(
        rsp.status,
        StatusCode::OK,
        "audit mode forwards a policy deny"
    );
    h.upstream_got();
    let log = h.next_log();
    assert_eq!(log["decision"], "deny");
    assert_eq!(log["mode"], "audit");
    assert_eq!(log["reason"], "would deny (audit mode)");
    // 400 and 401 are answered as always.
    let req = h
        .request("GET", "/public/x")
        .header("authorization", "Bearer not.a.jwt")
        .body(empty())
        .unwrap();
    assert_eq!(h.send(req).await.status, StatusCode::UNAUTHORIZED);
    let rsp = h
        .send(h.request("GET", "/a/../../b").body(empty()).unwrap())
        .await;
    assert_eq!(rsp.status, StatusCode::BAD_REQUEST);
    h.assert_upstream_untouched();
    let metrics = h.metrics().await;
    assert!(
        metrics.contains("warden_authz_decisions_total{decision=\"deny\",mode=\"audit\"} 1"),
        "{metrics}"
    );
}

/// A proxy with the explain header on, and its answer to an anonymous GET.
async fn explained(policies: Option<std::path::PathBuf>) -> (Harness, warden::devkit::Reply) {
    let h = Harness::with(Options {
        policies,
        authz_extra: "explain_header = true".into(),
        ..Options::default()
    })
    .await;
    let rsp = h
        .send(h.request("GET", "/api/orders/42").body(empty()).unwrap())
        .await;
    assert_eq!(rsp.status, StatusCode::FORBIDDEN);
    (h, rsp)
}

#[tokio::test]
async fn explain_header_names_the_deciding_policies_when_enabled() {
    let (h, rsp) = explained(None).await;
    assert_eq!(
        rsp.headers["x-warden-deny-reason"],
        "no policy permits this request"
    );
    let rsp = h.send(h.signed("DELETE", "/api/admin/users/1", b"")).await;
    assert_eq!(rsp.status, StatusCode::FORBIDDEN);
    assert_eq!(
        rsp.headers["x-warden-deny-reason"],
        "forbidden by no-admin-writes"
    );
    // Off by default.
    let quiet = Harness::start().await;
    let rsp = quiet
        .send(
            quiet
                .request("GET", "/api/orders/42")
                .body(empty())
                .unwrap(),
        )
        .await;
    assert!(!rsp.headers.contains_key("x-warden-deny-reason"));
}

#[tokio::test]
async fn evaluation_errors_are_explained_and_logged() {
    // Validates strictly, yet overflows at run time: the policy is skipped.
    let dir = super::harness::policy_dir_with(
        "overflow.cedar",
        "@id(\"overflowing\")\npermit (principal, action, resource) when { (context.port + 2) * 9223372036854775807 > 0 };\n",
    );
    let (mut h, rsp) = explained(Some(dir.path().to_owned())).await;
    assert_eq!(
        rsp.headers["x-warden-deny-reason"],
        "no policy permits this request; failed to evaluate: overflowing"
    );
    let line = h.next_log();
    let errors = line["errors"].as_array().expect("errors in the log line");
    assert!(
        errors[0].as_str().unwrap().contains("overflowing")
            && errors[0].as_str().unwrap().contains("overflow"),
        "{line}"
    );
    h.assert_upstream_untouched();
}

#[tokio::test]
async fn shadow_policies_are_logged_and_counted_never_enforced() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("trial.cedar"),
        "@id(\"trial-open-orders\")\npermit (principal, action == Action::\"GET\", resource in Http::Path::\"/api/orders/\");\n",
    )
    .unwrap();
    let mut h = Harness::with(Options {
        authz_extra: format!("shadow_policies = \"{}\"", dir.path().display()),
        ..Options::default()
    })
    .await;
    // Enforced: deny. Shadow: allow. The enforced answer stands.
    let rsp = h
        .send(h.request("GET", "/api/orders/1").body(empty()).unwrap())
        .await;
    assert_eq!(rsp.status, StatusCode::FORBIDDEN);
    h.assert_upstream_untouched();
    let log = h.next_log();
    assert_eq!(log["decision"], "deny");
    assert_eq!(log["shadow"]["decision"], "allow");
    assert_eq!(log["shadow"]["policies"][0], "trial-open-orders");
    // A public read: enforced allow, shadow deny.
    assert_eq!(
        h.send(h.request("GET", "/public/x").body(empty()).unwrap())
            .await
            .status,
        StatusCode::OK
    );
    h.upstream_got();
    let log = h.next_log();
    assert_eq!(
        log["shadow"]["decision"], "deny",
        "the shadow set has no public-read"
    );
    let metrics = h.metrics().await;
    assert!(
        metrics
            .contains("warden_authz_shadow_decisions_total{decision=\"allow\",agrees=\"false\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics
            .contains("warden_authz_shadow_decisions_total{decision=\"deny\",agrees=\"false\"} 1"),
        "{metrics}"
    );
}

/// A client that goes away while its allowed request is at the upstream
/// still leaves its decision-log line and its count: the request reached the
/// service, so the audit trail must say so. The line's status is 499 (the
/// code nginx logs for it), since no answer was sent. Over HTTP/1.1 the
/// client closes its connection; over HTTP/2 it resets the stream.
// Two workers: the log is read with a blocking wait while the proxy, on
// the other worker, notices the client gone and writes the line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_before_the_response_is_still_logged_and_counted() {
    use tokio::io::AsyncWriteExt;
    let (h, mut arrivals, _release) = super::drain::harness_before_held_upstream("").await;
    let mut s = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let get = format!("GET /public/gone HTTP/1.1\r\nHost: {}\r\n\r\n", h.host());
    s.write_all(get.as_bytes()).await.unwrap();
    arrivals.recv().await.unwrap();
    drop(s);
    let line = h.next_log();
    assert_eq!(line["resource"], r#"Http::Path::"/public/gone""#, "{line}");
    assert_eq!(line["decision"], "allow", "{line}");
    assert_eq!(line["status"], 499, "{line}");
    assert_eq!(
        line["reason"], "connection closed before the response",
        "{line}"
    );

    let warden::devkit::Conn::Http2(mut tx) = warden::devkit::Conn::open(h.addr, None, true)
        .await
        .unwrap()
    else {
        unreachable!("an HTTP/2 connection")
    };
    let req = http::Request::get(format!("http://{}/public/gone/h2", h.host()))
        .body(empty())
        .unwrap();
    let pending = tokio::spawn(tx.send_request(req));
    arrivals.recv().await.unwrap();
    // Dropping the response future resets the stream (RST_STREAM CANCEL).
    pending.abort();
    let line = h.next_log();
    assert_eq!(
        line["resource"], r#"Http::Path::"/public/gone/h2""#,
        "{line}"
    );
    assert_eq!(line["status"], 499, "{line}");
    let counted = h
        .series(r#"warden_requests_total{authn="none",decision="allow",code="499"}"#)
        .await;
    assert_eq!(counted, Some(2));
}
