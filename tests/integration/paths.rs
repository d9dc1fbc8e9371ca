//! The path-safety table: each tricky request form, sent as raw bytes through
//! the running proxy. The authorizer (decision-log `resource`) and the
//! upstream always see the same path, or the request is refused before both.

use super::harness::{Harness, Options};

fn get(target: &str, host: &str) -> Vec<u8> {
    format!("GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").into_bytes()
}

#[tokio::test]
async fn the_authorizer_and_the_upstream_see_the_same_path() {
    let mut h = Harness::plaintext().await;
    let host = h.host();
    let long = format!("/public/{}", "a".repeat(4000));
    // (request target, status, the path both must see when forwarded)
    let rows: Vec<(String, u16, Option<&str>)> = vec![
        ("//public//a".into(), 200, Some("/public/a")),
        ("/public/./b".into(), 200, Some("/public/b")),
        ("/api/../public/b".into(), 200, Some("/public/b")),
        ("/public/x/%2e%2e/b".into(), 200, Some("/public/b")),
        ("/public/%2e%2E/public/c".into(), 200, Some("/public/c")),
        ("/public/a%2Fb".into(), 400, None),
        ("/public/a%2fb".into(), 400, None),
        ("/public/a%5Cb".into(), 400, None),
        ("/public/100%25".into(), 200, Some("/public/100%25")),
        ("/public/a;jsessionid=1".into(), 400, None),
        ("/public/a%3Bjsessionid=1".into(), 400, None),
        ("/public/dir/".into(), 200, Some("/public/dir/")),
        ("/public/a%00b".into(), 400, None),
        ("/public/%FF%FE".into(), 200, Some("/public/%FF%FE")),
        ("/public/%7Euser".into(), 200, Some("/public/~user")),
        // A raw `#` ends the target: the HTTP parser drops the fragment before
        // warden sees the request, so nothing after it reaches either side.
        ("/public/x#frag".into(), 200, Some("/public/x")),
        ("/public/a#/../../../api/x".into(), 200, Some("/public/a")),
        ("/public/a%23b".into(), 400, None),
        ("/public/../../etc/passwd".into(), 400, None),
        (long.clone(), 200, Some(long.as_str())),
        (
            format!("http://{host}/public/abs"),
            200,
            Some("/public/abs"),
        ),
        ("http://evil.example/public/abs".into(), 400, None),
        ("*".into(), 400, None),
    ];
    for (target, status, seen) in &rows {
        let got = h.raw(get(target, &host)).await;
        assert_eq!(got, *status, "{target}");
        match seen {
            Some(path) => {
                let up = h.upstream_got();
                assert_eq!(up.uri, *path, "upstream path for {target}");
                let log = h.next_log();
                assert_eq!(
                    log["resource"],
                    format!("Http::Path::{path:?}"),
                    "authorizer path for {target}"
                );
            }
            None => {
                h.assert_upstream_untouched();
                let log = h.next_log();
                assert!(
                    log["resource"].is_null(),
                    "refused before authorization: {target}"
                );
            }
        }
    }
    // Methods are case-sensitive tokens: `get` is not an action in the schema.
    let lower =
        format!("get /public/x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").into_bytes();
    assert_eq!(h.raw(lower).await, 405);
    // OPTIONS * and CONNECT (authority form) are refused.
    let star =
        format!("OPTIONS * HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").into_bytes();
    assert_eq!(h.raw(star).await, 400);
    let connect = format!("CONNECT {host} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
        .into_bytes();
    assert_eq!(h.raw(connect).await, 400);
    // An HTTP/1.1 request must name its host (HTTP/1.0 need not).
    let hostless = b"GET /public/x HTTP/1.1\r\nConnection: close\r\n\r\n".to_vec();
    assert_eq!(h.raw(hostless).await, 400);
    // It reaches the HTTP/1.1 upstream naming the upstream's own address.
    let old = b"GET /public/x HTTP/1.0\r\n\r\n".to_vec();
    assert_eq!(h.raw(old).await, 200);
    let got = h.upstream_got();
    assert_eq!(got.uri, "/public/x");
    let sent = got.headers["host"].to_str().unwrap();
    assert!(sent.starts_with("127.0.0.1:") && sent != host, "{sent}");
    // Two Host headers are refused.
    let two = format!(
        "GET /public/x HTTP/1.1\r\nHost: {host}\r\nHost: other\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    assert_eq!(h.raw(two).await, 400);
    h.assert_upstream_untouched();
}

/// Heads hyper refuses while parsing (it answers them itself, with no body)
/// are logged and counted like every other refusal.
#[tokio::test]
async fn heads_hyper_refuses_are_logged_and_counted() {
    let mut h = Harness::plaintext().await;
    let host = h.host();
    // Two different lengths: the shape of a request-smuggling attempt.
    let smuggle = format!(
        "POST /public/x HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"
    );
    assert_eq!(h.raw(smuggle.into_bytes()).await, 400);
    let log = h.next_log();
    assert_eq!(log["status"], 400);
    assert_eq!(log["reason"], "invalid content-length parsed");
    assert_eq!(log["authn"], "none");
    assert!(log["decision"].is_null() && log["resource"].is_null());
    assert_eq!(log["request_id"].as_str().map(str::len), Some(32));
    // Over the buffer hyper reads a head into (four times max_header_bytes).
    let mut big = format!("GET /public/x HTTP/1.1\r\nHost: {host}\r\n");
    big.push_str(&format!("x-filler: {}\r\n\r\n", "x".repeat(200 * 1024)));
    assert_eq!(h.raw(big.into_bytes()).await, 431);
    let log = h.next_log();
    assert_eq!(log["status"], 431);
    assert_eq!(log["reason"], "message head is too large");
    h.assert_upstream_untouched();
    for code in [400, 431] {
        let series =
            format!("warden_requests_total{{authn=\"none\",decision=\"none\",code=\"{code}\"}}");
        assert_eq!(h.series(&series).await, Some(1), "{series}");
    }
    assert_eq!(h.raw(get("/public/x", &host)).await, 200);
    assert_eq!(h.next_log()["status"], 200);
    h.upstream_got();

    // With room for a head that large, hyper's own URI limit (64 KiB) answers 414.
    let mut h = Harness::with(Options {
        tls: false,
        extra_toml: "[runtime]\nmax_header_bytes = \"128KiB\"\n".into(),
        ..Options::default()
    })
    .await;
    let host = h.host();
    let long = format!("/public/{}", "x".repeat(70_000));
    assert_eq!(h.raw(get(&long, &host)).await, 414);
    let log = h.next_log();
    assert_eq!(
        (log["status"].as_u64(), log["reason"].as_str()),
        (Some(414), Some("URI too long"))
    );
    h.assert_upstream_untouched();
}

#[tokio::test]
async fn oversized_headers_are_431_and_never_forwarded() {
    let mut h = Harness::plaintext().await;
    let host = h.host();
    let big = "x".repeat(1024);
    let mut req = format!("GET /public/x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for i in 0..64 {
        req.push_str(&format!("x-filler-{i}: {big}\r\n"));
    }
    req.push_str("\r\n");
    assert_eq!(h.raw(req.into_bytes()).await, 431);
    h.assert_upstream_untouched();
    // A normal request on a new connection is still served.
    assert_eq!(h.raw(get("/public/x", &host)).await, 200);
    h.upstream_got();
}

/// A head over `runtime.max_header_bytes` is refused by warden with the
/// contract's answer, over HTTP/1.1 and HTTP/2 alike, and never forwarded.
#[tokio::test]
async fn heads_over_the_limit_get_the_contract_431() {
    use bytes::Bytes;
    use http_body_util::Full;
    let mut h = Harness::start().await;
    let with_filler = |h: &Harness, path: &str, len: usize| {
        h.request("GET", path)
            .header("x-filler", "x".repeat(len))
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    // The default limit is 32 KiB.
    let rsp = h.send(with_filler(&h, "/public/x", 30_000)).await;
    assert_eq!(rsp.status, 200, "{}", rsp.text());
    assert_eq!(h.next_log()["status"], 200);
    h.upstream_got();

    let rsp = h.send(with_filler(&h, "/public/x", 40_000)).await;
    assert_eq!(rsp.status, 431);
    assert_eq!(rsp.headers["content-type"], "application/json");
    let body: serde_json::Value = serde_json::from_slice(&rsp.body).unwrap();
    assert_eq!(body["error"], "headers_too_large");
    assert_eq!(
        body["reason"],
        "request head larger than the configured limit"
    );
    let log = h.next_log();
    assert_eq!(body["request_id"], log["request_id"]);
    assert_eq!(
        (log["status"].as_u64(), log["authn"].as_str()),
        (Some(431), Some("none"))
    );
    assert!(log["decision"].is_null());
    h.assert_upstream_untouched();

    let req = http::Request::get(h.url("/api/orders/42"))
        .header("x-filler", "x".repeat(40_000))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let rsp = h.send_mtls_h2(req).await;
    assert_eq!(rsp.status, 431);
    let body: serde_json::Value = serde_json::from_slice(&rsp.body).unwrap();
    assert_eq!(body["error"], "headers_too_large");
    assert_eq!(h.next_log()["status"], 431);
    h.assert_upstream_untouched();
    let series = "warden_requests_total{authn=\"none\",decision=\"none\",code=\"431\"}";
    assert_eq!(h.series(series).await, Some(2));
}
