//! Hostile clients: a slowloris trickling its request head, an HTTP/2
//! rapid-reset burst (CVE-2023-44487) and an HTTP/2 CONTINUATION flood
//! (CVE-2024-27316 and kin), each beside a well-behaved client; HTTP/1.1
//! framing built to smuggle a second request past the proxy, and HTTP/2
//! header bytes built to inject lines into the upstream's request; bodies
//! that stop arriving or stay unfinished, an upstream that stops
//! mid-response, a client that stops reading its response, an HTTP/2 client
//! that gives a stream no flow-control window, and clients holding the admin
//! port.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use warden::devkit::Conn;

use super::harness::{Harness, Options, Signing, REGION};

#[tokio::test]
async fn a_head_sent_one_byte_per_second_is_cut_off_at_the_header_timeout() {
    let mut h = Harness::with(Options {
        tls: false,
        extra_toml: "[runtime]\nheader_read_timeout = \"3s\"\n".into(),
        ..Options::default()
    })
    .await;
    let head = format!("GET /public/x HTTP/1.1\r\nHost: {}\r\n\r\n", h.host());
    let mut s = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let started = tokio::time::Instant::now();
    let mut sent = 0;
    let mut buf = [0u8; 1024];
    let closed_after = loop {
        if sent < head.len() {
            // A write to a connection the server has closed may fail: that is
            // the cut-off too.
            if s.write_all(&head.as_bytes()[sent..=sent]).await.is_err() {
                break sent;
            }
            sent += 1;
        }
        // Wait a second for the next byte, watching for the server to close.
        match tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break sent,
            Ok(Ok(n)) => {
                let text = String::from_utf8_lossy(&buf[..n]);
                assert!(
                    !text.starts_with("HTTP/1.1 200"),
                    "the slow request was served"
                );
            }
            Err(_) => {}
        }
        assert!(started.elapsed() < Duration::from_secs(60), "never cut off");
    };
    eprintln!("cut off after {closed_after} bytes");
    assert!(
        closed_after < head.len(),
        "cut off only after the whole head ({closed_after} of {} bytes)",
        head.len()
    );
    h.assert_upstream_untouched();
    // Others are served meanwhile and after.
    let rsp = h
        .send(
            h.request("GET", "/public/x")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
    assert_eq!(rsp.status, http::StatusCode::OK);
}

/// An HTTP/2 frame: 9-byte header, then the payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
    let mut f = vec![len[1], len[2], len[3], kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Sends `attack` on its own connection while a well-behaved HTTP/2 client
/// sends `honest` requests, each of which must be answered 200. Returns what
/// the server sent the attacker before it closed the connection, which it
/// must do within 30 s.
async fn attack_beside_honest(h: &Harness, attack: &[u8], honest: usize) -> Vec<u8> {
    let host = h.host();
    let mut conn = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let (mut rd, mut wr) = conn.split();
    let write = async {
        // The server may close before the attack is written: that is the point.
        let _ = wr.write_all(attack).await;
    };
    let read = async {
        let mut seen = Vec::new();
        // A reset may end the read: what came before it is kept.
        let _ = tokio::time::timeout(Duration::from_secs(30), rd.read_to_end(&mut seen))
            .await
            .expect("the server kept the attacker's connection open");
        seen
    };
    let served = async {
        let mut conn = Conn::open(h.addr, None, true).await.unwrap();
        for _ in 0..honest {
            let req = http::Request::get(format!("http://{host}/public/x"))
                .body(Full::new(Bytes::new()))
                .unwrap();
            let rsp = conn.send(req).await.expect("the honest client was refused");
            assert_eq!(rsp.status, http::StatusCode::OK);
        }
    };
    let ((), seen, ()) = tokio::join!(write, read, served);
    seen
}

/// The error code of the last GOAWAY among the frames a server sent.
fn goaway_code(seen: &[u8]) -> Option<u32> {
    let mut goaway = None;
    let mut at = 0;
    while at + 9 <= seen.len() {
        let len = usize::from(seen[at]) << 16
            | usize::from(seen[at + 1]) << 8
            | usize::from(seen[at + 2]);
        if seen[at + 3] == 0x7 && at + 9 + 8 <= seen.len() {
            let p = &seen[at + 9..];
            goaway = Some(u32::from_be_bytes([p[4], p[5], p[6], p[7]]));
        }
        at += 9 + len;
    }
    goaway
}

/// A prior-knowledge HTTP/2 client's opening: the preface and an empty SETTINGS.
fn h2_preface() -> Vec<u8> {
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(0x4, 0, 0, &[]));
    out
}

/// A GET for `path` as an HPACK block, without Huffman coding or indexing.
fn get_headers(host: &str, path: &str) -> Vec<u8> {
    // :method GET, :scheme http (static table entries 2 and 6).
    let mut block = vec![0x82, 0x86];
    // :path and :authority as literals naming static entries 4 and 1.
    for (index, value) in [(0x04u8, path), (0x01, host)] {
        block.push(index);
        block.push(u8::try_from(value.len()).unwrap());
        block.extend_from_slice(value.as_bytes());
    }
    block
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_rapid_reset_burst_is_cut_off_and_does_not_starve_others() {
    const BURST: u32 = 10_000;
    let mut h = Harness::plaintext().await;
    let host = h.host();

    // The attacker: prior-knowledge HTTP/2, then HEADERS + RST_STREAM pairs.
    let mut out = h2_preface();
    let block = get_headers(&host, "/public/x");
    for i in 0..BURST {
        let stream = 2 * i + 1;
        out.extend(frame(0x1, 0x5, stream, &block));
        out.extend(frame(0x3, 0, stream, &8u32.to_be_bytes()));
    }
    let seen = attack_beside_honest(&h, &out, 50).await;

    // ENHANCE_YOUR_CALM (0xb) is what hyper sends.
    let goaway = goaway_code(&seen);
    assert_eq!(
        goaway,
        Some(0xb),
        "no GOAWAY(ENHANCE_YOUR_CALM) for the attacker"
    );
    // Few of the reset streams reached the upstream; the honest 50 did.
    let mut forwarded = 0;
    while h.seen.try_recv().is_ok() {
        forwarded += 1;
    }
    eprintln!("forwarded {forwarded} requests, GOAWAY {goaway:?}");
    assert!(forwarded >= 50, "{forwarded}");
    assert!(
        forwarded < 50 + BURST as usize / 10,
        "{forwarded} requests of the burst were forwarded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_requests_in_flight_the_answer_is_503_not_a_queue() {
    let (h, mut arrivals, release) =
        super::drain::harness_before_held_upstream("[runtime]\nmax_requests = 5\n").await;
    let get = |path: &str| {
        h.request("GET", path)
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let mut held = Vec::new();
    for i in 0..5 {
        held.push(tokio::spawn(warden::devkit::send(
            h.addr,
            None,
            false,
            get(&format!("/public/held/{i}")),
        )));
    }
    for _ in 0..5 {
        arrivals.recv().await.unwrap();
    }
    let rsp = h.send(get("/public/one-too-many")).await;
    assert_eq!(rsp.status, http::StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(rsp.headers["retry-after"], "1");
    let body: serde_json::Value = serde_json::from_slice(&rsp.body).unwrap();
    assert_eq!(body["reason"], "overloaded", "{body}");
    release.send(true).unwrap();
    for r in held {
        assert_eq!(r.await.unwrap().unwrap().status, http::StatusCode::OK);
    }
    // The slots are given back.
    assert_eq!(
        h.send(get("/public/after")).await.status,
        http::StatusCode::OK
    );
}

#[tokio::test]
async fn an_idle_http2_connection_is_closed_after_idle_timeout() {
    let h = Harness::with(Options {
        tls: false,
        extra_toml: "[runtime]\nidle_timeout = \"1s\"\n".into(),
        ..Options::default()
    })
    .await;
    let Conn::Http2(mut tx) = Conn::open(h.addr, None, true).await.unwrap() else {
        unreachable!("an HTTP/2 connection")
    };
    let req = http::Request::get(format!("http://{}/public/x", h.host()))
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(tx.send_request(req).await.unwrap().status(), 200);
    super::harness::eventually("the idle connection is closed", || {
        let closed = tx.is_closed();
        async move { closed }
    })
    .await;
}

#[tokio::test]
async fn pipelined_http1_requests_are_answered_in_order() {
    let h = Harness::plaintext().await;
    let host = h.host();
    let mut s = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let two = format!(
        "GET /public/one HTTP/1.1\r\nHost: {host}\r\n\r\nGET /public/two HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(two.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out);
    let one = text.find("/public/one").expect("first answer");
    let two = text.find("/public/two").expect("second answer");
    assert!(one < two, "{text}");
    assert_eq!(text.matches("HTTP/1.1 200").count(), 2, "{text}");
}

/// HEADERS without END_HEADERS, then CONTINUATION frames that never end the
/// block: the server must stop reading it (it is past any header limit long
/// before the flood ends), forward nothing, and keep serving others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_continuation_flood_is_cut_off_and_forwards_nothing() {
    const FRAMES: usize = 20_000;
    let mut h = Harness::plaintext().await;
    let host = h.host();

    let mut out = h2_preface();
    // HEADERS on stream 1 with END_STREAM (0x1) but not END_HEADERS (0x4).
    out.extend(frame(0x1, 0x1, 1, &get_headers(&host, "/public/x")));
    // Each CONTINUATION holds one literal header, never indexed:
    // `x-flood-N: <1 000 bytes>`, and none sets END_HEADERS.
    let filler = "a".repeat(1000);
    for i in 0..FRAMES {
        let name = format!("x-flood-{i}");
        let mut block = vec![0x10, u8::try_from(name.len()).unwrap()];
        block.extend_from_slice(name.as_bytes());
        // A 1 000-byte value: HPACK's 7-bit prefix integer, 127 + 873.
        block.extend_from_slice(&[0x7f, 0xe9, 0x06]);
        block.extend_from_slice(filler.as_bytes());
        out.extend(frame(0x9, 0, 1, &block));
    }
    let seen = attack_beside_honest(&h, &out, 20).await;
    let goaway = goaway_code(&seen);
    eprintln!(
        "GOAWAY {goaway:?} after {} bytes from the server",
        seen.len()
    );
    assert!(
        goaway.is_some(),
        "the flood's connection ended without a GOAWAY"
    );
    // Only the honest client's requests reached the upstream.
    let mut forwarded = 0;
    while h.seen.try_recv().is_ok() {
        forwarded += 1;
    }
    assert_eq!(forwarded, 20);
}

/// Each way of framing a body that proxies have disagreed on with their
/// upstreams. Every one is either refused (400, nothing forwarded) or reaches
/// the upstream as exactly one request, framed once, whose body is what the
/// client's framing says: the smuggled request inside is only ever body.
#[tokio::test]
async fn conflicting_or_malformed_body_framing_cannot_smuggle_a_request() {
    let mut h = Harness::plaintext().await;
    let host = h.host();
    let inner = format!("GET /api/admin/x HTTP/1.1\r\nHost: {host}\r\n\r\n");
    let chunked = format!("{:x}\r\n{inner}\r\n0\r\n\r\n", inner.len());
    let te = "Transfer-Encoding: chunked\r\n";
    let cl = "Content-Length: 5\r\n";
    // (case, headers and body after the request line and Host, status, the
    // body the upstream must receive when forwarded)
    let cases: Vec<(&str, String, u16, Option<&str>)> = vec![
        // RFC 9112 §6.3: chunked wins and Content-Length is not forwarded.
        (
            "CL then TE",
            format!("{cl}{te}\r\n{chunked}"),
            200,
            Some(&inner),
        ),
        (
            "TE then CL",
            format!("{te}{cl}\r\n{chunked}"),
            200,
            Some(&inner),
        ),
        (
            "TE upper case",
            format!("Transfer-Encoding: CHUNKED\r\n\r\n{chunked}"),
            200,
            Some(&inner),
        ),
        (
            "chunk extension",
            format!("{te}\r\n5;x=y\r\nhello\r\n0\r\n\r\n"),
            200,
            Some("hello"),
        ),
        (
            "CL repeated, equal",
            format!("{cl}{cl}\r\nhello"),
            200,
            Some("hello"),
        ),
        (
            "CL repeated, differing",
            format!("{cl}Content-Length: 6\r\n\r\nhello!"),
            400,
            None,
        ),
        (
            "CL list",
            "Content-Length: 5, 6\r\n\r\nhello!".into(),
            400,
            None,
        ),
        (
            "CL signed",
            "Content-Length: +5\r\n\r\nhello".into(),
            400,
            None,
        ),
        (
            "TE chunked not last",
            format!("Transfer-Encoding: chunked, identity\r\n\r\n{chunked}"),
            400,
            None,
        ),
        // A coding before `chunked` would be dropped with the hop-by-hop
        // header, handing the upstream a body still in that coding.
        (
            "TE gzip then chunked",
            format!("Transfer-Encoding: gzip, chunked\r\n\r\n{chunked}"),
            400,
            None,
        ),
        (
            "TE identity then chunked",
            format!("Transfer-Encoding: identity\r\n{te}\r\n{chunked}"),
            400,
            None,
        ),
        // Chunked twice (RFC 9112 §6.1 forbids it) would be undone once,
        // leaving the upstream a body that is still chunked; peers disagree
        // on it, so it is refused, in one line or two.
        (
            "TE chunked twice",
            format!("Transfer-Encoding: chunked, chunked\r\n\r\n{chunked}"),
            400,
            None,
        ),
        ("TE twice", format!("{te}{te}\r\n{chunked}"), 400, None),
        (
            "TE unknown",
            format!("Transfer-Encoding: xchunked\r\n\r\n{chunked}"),
            400,
            None,
        ),
        (
            "space before colon",
            format!("Transfer-Encoding : chunked\r\n\r\n{chunked}"),
            400,
            None,
        ),
        (
            "obs-fold",
            format!("Transfer-Encoding:\r\n chunked\r\n\r\n{chunked}"),
            400,
            None,
        ),
        // Bad chunks are found while the body streams to the upstream: the
        // client's fault, so 400, never the upstream's 502.
        (
            "chunk size overflow",
            format!("{te}\r\nfffffffffffffffff1\r\nhello\r\n0\r\n\r\n"),
            400,
            None,
        ),
        (
            "chunk size not hex",
            format!("{te}\r\nzz\r\nhello\r\n0\r\n\r\n"),
            400,
            None,
        ),
        (
            "chunk longer than its size",
            format!("{te}\r\n2\r\nhello\r\n0\r\n\r\n"),
            400,
            None,
        ),
    ];
    for (case, rest, status, body) in cases {
        // The shipped policies let anyone GET /public/, so the framing alone decides.
        let req = format!("GET /public/x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{rest}");
        assert_eq!(h.raw(req.into_bytes()).await, status, "{case}");
        if let Some(body) = body {
            let got = h.upstream_got();
            assert_eq!(got.uri, "/public/x", "{case}");
            assert_eq!(got.body, body.as_bytes(), "{case}");
            let framings = ["content-length", "transfer-encoding"]
                .iter()
                .filter(|f| got.headers.contains_key(**f))
                .count();
            assert_eq!(framings, 1, "{case}: {:?}", got.headers);
        }
        // Nothing else reached the upstream: no second, smuggled request.
        h.assert_upstream_untouched();
    }
    // The refusals were the client's, not the upstream's.
    let protocol = h
        .series(r#"warden_upstream_errors_total{kind="protocol"}"#)
        .await;
    assert_eq!(protocol, Some(0));
}

/// A request body cut short by the client (its connection closed for
/// writing before the body's end) is told apart from a malformed one, in the
/// answer and the decision log; neither is blamed on the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_cut_short_is_told_apart_from_a_malformed_one() {
    let h = Harness::plaintext().await;
    let host = h.host();
    let cases = [
        (
            "content-length, closed early",
            "Content-Length: 10\r\n\r\nhello",
            "request body ended early: the connection closed",
        ),
        (
            "chunked, closed early",
            "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
            "request body ended early: the connection closed",
        ),
        (
            "chunked, malformed",
            "Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
            "malformed request body",
        ),
    ];
    // SigV4 with no payload-hash header: the body is read whole, to hash it,
    // before the request goes on.
    let signed: String = h
        .sign(
            "GET",
            "/public/x",
            b"hello world",
            super::harness::Signing::default(),
        )
        .into_iter()
        .filter(|(k, _)| k != "host")
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    let signed = format!("{signed}Content-Length: 11\r\n\r\nhello");
    let cases = cases.into_iter().chain([(
        "signed, hashed, closed early",
        signed.as_str(),
        "request body ended early: the connection closed",
    )]);
    for (case, rest, reason) in cases {
        let mut s = tokio::net::TcpStream::connect(h.addr).await.unwrap();
        let req = format!("GET /public/x HTTP/1.1\r\nHost: {host}\r\n{rest}");
        s.write_all(req.as_bytes()).await.unwrap();
        s.shutdown().await.unwrap();
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 400 "), "{case}: {answer}");
        assert!(answer.contains(reason), "{case}: {answer}");
        let line = h.next_log();
        assert_eq!(line["status"], 400, "{case}: {line}");
        assert_eq!(line["reason"], reason, "{case}: {line}");
    }
    let protocol = h
        .series(r#"warden_upstream_errors_total{kind="protocol"}"#)
        .await;
    assert_eq!(protocol, Some(0));
}

/// `Expect: 100-continue`: warden asks for the body only of a request it
/// lets through. A refused one gets its answer at once, with no
/// `100 Continue`, and its body is never read or forwarded.
#[tokio::test]
async fn a_body_is_solicited_only_for_an_allowed_request() {
    let mut h = Harness::plaintext().await;
    let host = h.host();
    // (method, path, the first answer the client reads)
    for (method, path, first) in [
        ("GET", "/public/x", "HTTP/1.1 100 Continue\r\n\r\n"),
        ("POST", "/api/admin/x", "HTTP/1.1 403 Forbidden\r\n"),
    ] {
        let mut s = tokio::net::TcpStream::connect(h.addr).await.unwrap();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {host}\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
        );
        s.write_all(head.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("no answer to the request head")
            .unwrap();
        let answer = String::from_utf8_lossy(&buf[..n]).into_owned();
        assert!(answer.starts_with(first), "{method} {path}: {answer}");
        if method == "POST" {
            assert!(!answer.contains("100 Continue"), "{answer}");
            h.assert_upstream_untouched();
            continue;
        }
        s.write_all(b"hello").await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("no answer after the body")
            .unwrap();
        let answer = String::from_utf8_lossy(&buf[..n]).into_owned();
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        let got = h.upstream_got();
        assert_eq!(
            (got.uri.as_str(), &got.body[..]),
            ("/public/x", &b"hello"[..])
        );
    }
}

/// A client that stops partway through its body is answered 408 once the
/// request timeout passes with nothing new, and the upstream is not blamed:
/// whether the body streams to the upstream, or is buffered to check a
/// SigV4 payload hash (before the signature is known to be good, so any
/// client could hold a request open that way).
#[tokio::test]
async fn a_body_that_stops_arriving_is_a_request_timeout() {
    let h = Harness::with(Options {
        tls: false,
        request_timeout: "300ms",
        ..Options::default()
    })
    .await;
    let host = h.host();
    // Signed now with the known key, so that the body must be read to check
    // it (a stale or unknown credential is refused before).
    let sigv4 = signed_lines(&h, "GET", "/public/x", b"helloworld", Signing::default());
    for (case, credential) in [("streamed", String::new()), ("buffered for SigV4", sigv4)] {
        let head = format!(
            "GET /public/x HTTP/1.1\r\nHost: {host}\r\n{credential}Content-Length: 10\r\n\r\nhello"
        );
        let answer = answer_to(&h, &head, case).await;
        assert!(answer.starts_with("HTTP/1.1 408 "), "{case}: {answer}");
        assert!(
            answer.contains(r#""error":"request_timeout""#),
            "{case}: {answer}"
        );
    }
    let timeouts = h
        .series(r#"warden_upstream_errors_total{kind="timeout"}"#)
        .await;
    assert_eq!(timeouts, Some(0));
}

/// A SigV4 request whose body must be hashed (no `x-amz-content-sha256`) is
/// refused before its body is read when its credential cannot be good: an
/// unknown access key, a signing time out of the window, a foreign region.
/// The client learns it without uploading the body, and a client with no
/// key cannot make warden buffer one.
#[tokio::test]
async fn a_credential_that_cannot_be_good_is_refused_before_the_body() {
    let mut h = Harness::plaintext().await;
    let host = h.host();
    let headers = |how: Signing<'_>| signed_lines(&h, "POST", "/api/orders/", b"", how);
    let hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
    let now = headers(Signing::default());
    let foreign = now.replace(&format!("/{REGION}/"), "/eu-west-9/");
    assert_ne!(now, foreign);
    for (case, credential, reason) in [
        (
            "unknown key",
            headers(Signing {
                access_key_id: "AKIDNOTAKEYWARDENHAS",
                ..Signing::default()
            }),
            "unknown access key",
        ),
        (
            "stale",
            headers(Signing {
                time: hour_ago,
                ..Signing::default()
            }),
            "request expired",
        ),
        (
            "foreign region",
            foreign,
            "credential scope does not match: region",
        ),
    ] {
        // No byte of the body is sent: the answer must come without it.
        let head = format!(
            "POST /api/orders/ HTTP/1.1\r\nHost: {host}\r\n{credential}Content-Length: 1000\r\n\r\n"
        );
        let answer = answer_to(&h, &head, case).await;
        assert!(answer.starts_with("HTTP/1.1 401 "), "{case}: {answer}");
        assert!(answer.contains(reason), "{case}: {answer}");
    }
    h.assert_upstream_untouched();
}

/// The SigV4 headers for `method path` with `body`, signed as `how` says,
/// as request-head lines (`host` left to the head itself).
fn signed_lines(h: &Harness, method: &str, path: &str, body: &[u8], how: Signing<'_>) -> String {
    h.sign(method, path, body, how)
        .into_iter()
        .filter(|(k, _)| k != "host")
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect()
}

/// Sends `head` on a new connection and reads until warden closes it.
async fn answer_to(h: &Harness, head: &str, case: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer))
        .await
        .unwrap_or_else(|_| panic!("{case}: no answer"));
    String::from_utf8_lossy(&answer).into_owned()
}

/// Reads a request head (an upstream's view); `None` if the connection ends
/// first.
async fn read_head(s: &mut tokio::net::TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

/// An upstream that answers each request with a response head and the
/// first piece of its body (`reply`), then sends nothing more and keeps the
/// connection open.
async fn stalling_upstream(reply: &'static str) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                if read_head(&mut s).await.is_none() {
                    return;
                }
                let _ = s.write_all(reply.as_bytes()).await;
                // Held open, silent, until warden lets go.
                let _ = s.read(&mut [0u8; 1]).await;
            });
        }
    });
    addr
}

/// A response in a transfer coding besides `chunked` is not passed on with
/// that coding dropped (the header is hop-by-hop, hyper undoes only the
/// chunking): the client gets 502, counted as an upstream protocol error.
#[tokio::test]
async fn a_response_in_an_unsupported_transfer_coding_is_502() {
    let reply =
        "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    let h = Harness::with(Options {
        tls: false,
        upstream: Some(stalling_upstream(reply).await),
        ..Options::default()
    })
    .await;
    let rsp = h
        .send(
            h.request("GET", "/public/coded")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
    assert_eq!(rsp.status, http::StatusCode::BAD_GATEWAY);
    let body: serde_json::Value = serde_json::from_slice(&rsp.body).unwrap();
    assert_eq!(body["error"], "upstream_unavailable", "{body}");
    assert_eq!(
        body["reason"], "upstream used an unsupported transfer coding",
        "{body}"
    );
    let protocol = h
        .series(r#"warden_upstream_errors_total{kind="protocol"}"#)
        .await;
    assert_eq!(protocol, Some(1));
}

/// An upstream that stops in the middle of its response body does not hold
/// the client forever: after the request timeout the response is cut short
/// (HTTP/1.1: the connection closes before the body's end; HTTP/2: the
/// stream is reset), and the stall is counted as an upstream timeout.
#[tokio::test]
async fn a_response_body_the_upstream_stops_sending_is_cut_short() {
    let framings = [
        (
            "content-length",
            "HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello",
        ),
        (
            "chunked",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
        ),
    ];
    for (case, reply) in framings {
        let h = Harness::with(Options {
            tls: false,
            upstream: Some(stalling_upstream(reply).await),
            request_timeout: "300ms",
            ..Options::default()
        })
        .await;
        let mut s = tokio::net::TcpStream::connect(h.addr).await.unwrap();
        let get = format!("GET /public/stall HTTP/1.1\r\nHost: {}\r\n\r\n", h.host());
        s.write_all(get.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer))
            .await
            .unwrap_or_else(|_| panic!("{case}: the client was held past the request timeout"));
        let answer = String::from_utf8_lossy(&answer);
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 "), "{case}: {answer}");
        // The first piece arrived; the body's end never did.
        assert!(body.contains("hello"), "{case}: {answer}");
        if case == "chunked" {
            assert!(!body.ends_with("0\r\n\r\n"), "{case}: {answer}");
        } else {
            assert_eq!(body, "hello", "{case}: {answer}");
        }
        let Conn::Http2(mut tx) = Conn::open(h.addr, None, true).await.unwrap() else {
            unreachable!("an HTTP/2 connection")
        };
        let req = http::Request::get(format!("http://{}/public/stall", h.host()))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let rsp = tx.send_request(req).await.unwrap();
        assert_eq!(rsp.status(), 200, "{case}");
        let read = tokio::time::timeout(
            Duration::from_secs(10),
            http_body_util::BodyExt::collect(rsp.into_body()),
        )
        .await
        .unwrap_or_else(|_| panic!("{case}: the HTTP/2 stream was held past the request timeout"));
        assert!(read.is_err(), "{case}: a cut-short stream ended cleanly");
        let timeouts = h
            .series(r#"warden_upstream_errors_total{kind="timeout"}"#)
            .await;
        assert_eq!(timeouts, Some(2), "{case}");
    }
}

/// An upstream answering `GET /public/bulk/{len}` with a `len`-byte body,
/// written as fast as it is taken; it reports each connection that stops
/// taking it (closed by warden) before the end.
async fn bulk_upstream() -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<()>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (cut, cuts) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let cut = cut.clone();
            tokio::spawn(async move {
                let Some(head) = read_head(&mut s).await else {
                    return;
                };
                let len: usize = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|path| path.rsplit('/').next())
                    .and_then(|n| n.parse().ok())
                    .unwrap();
                let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {len}\r\n\r\n");
                let chunk = vec![b'x'; 64 << 10];
                let mut sent = 0;
                let mut ok = s.write_all(head.as_bytes()).await.is_ok();
                while ok && sent < len {
                    let n = chunk.len().min(len - sent);
                    ok = s.write_all(&chunk[..n]).await.is_ok();
                    sent += n;
                }
                if !ok {
                    let _ = cut.send(());
                }
            });
        }
    });
    (addr, cuts)
}

/// A client that stops reading its response (a slow-read attack) is
/// disconnected once nothing written to it has been taken for
/// `runtime.idle_timeout`, and the upstream connection serving it goes
/// too. A client that reads slowly but steadily gets everything.
#[tokio::test]
async fn a_client_that_stops_reading_is_disconnected() {
    let (upstream, mut cuts) = bulk_upstream().await;
    let h = Harness::with(Options {
        tls: false,
        upstream: Some(upstream),
        extra_toml: "[runtime]\nidle_timeout = \"1s\"\n".into(),
        ..Options::default()
    })
    .await;
    let get = |len: usize| {
        format!(
            "GET /public/bulk/{len} HTTP/1.1\r\nHost: {}\r\n\r\n",
            h.host()
        )
    };
    // Steady: 256 KiB every 100 ms, about 1.6 s for 4 MiB, no pause near 1 s.
    const LEN: usize = 4 << 20;
    let mut s = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    s.write_all(get(LEN).as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 256 << 10];
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("the steady reader was left waiting")
            .unwrap();
        assert!(
            n > 0,
            "the steady reader was cut off after {} bytes",
            got.len()
        );
        got.extend_from_slice(&buf[..n]);
        let head = got.windows(4).position(|w| w == b"\r\n\r\n");
        if head.is_some_and(|at| got.len() - at - 4 == LEN) {
            break;
        }
    }
    assert!(
        cuts.try_recv().is_err(),
        "the steady reader's upstream was cut"
    );
    // Stopped: the request, then nothing read at all, for far more than
    // the socket buffers on the way hold.
    let mut s = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    s.write_all(get(1 << 30).as_bytes()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(15), cuts.recv())
        .await
        .expect("a client that stopped reading held its upstream connection")
        .unwrap();
    drop(s);
}

/// An HTTP/2 client that keeps reading its socket but gives one stream no
/// more flow-control window holds that stream, and the upstream connection
/// behind it, only until the stream has been still for the longer of
/// `runtime.idle_timeout` and `upstream.request_timeout`: then the stream
/// is reset. The connection's other streams carry on, and a stream whose
/// client reads slowly but steadily gets everything.
#[tokio::test]
async fn an_http2_stream_given_no_window_is_reset() {
    use http_body_util::BodyExt;
    let (upstream, mut cuts) = bulk_upstream().await;
    let h = Harness::with(Options {
        tls: false,
        upstream: Some(upstream),
        request_timeout: "1s",
        extra_toml: "[runtime]\nidle_timeout = \"1s\"\n".into(),
        ..Options::default()
    })
    .await;
    let tcp = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    // A 64 KiB window per stream: a stream not read stops the server
    // after 64 KiB, while the connection's window leaves room for others.
    let (mut tx, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .initial_stream_window_size(65_535)
            .initial_connection_window_size(64 << 20)
            .handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let get = |path: String| {
        http::Request::get(format!("http://{}{path}", h.host()))
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    // Withheld: the response head, then nothing taken from the body.
    let held = tx.send_request(get(format!("/public/bulk/{}", 1 << 30)));
    let held = tokio::time::timeout(Duration::from_secs(10), held)
        .await
        .expect("no response head")
        .unwrap();
    assert_eq!(held.status(), 200);
    // Steady, on the same connection: 256 KiB every 100 ms, 3.2 s for 8 MiB.
    const LEN: usize = 8 << 20;
    let rsp = tx
        .send_request(get(format!("/public/bulk/{LEN}")))
        .await
        .unwrap();
    let mut body = rsp.into_body();
    let (mut got, mut paced) = (0, 0);
    while got < LEN {
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("the steady reader was left waiting")
            .expect("the steady reader's stream ended early")
            .expect("the steady reader's stream was reset");
        got += frame.data_ref().map_or(0, Bytes::len);
        if got - paced >= 256 << 10 {
            paced = got;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // The withheld stream was cut meanwhile, its upstream connection with it.
    tokio::time::timeout(Duration::from_secs(10), cuts.recv())
        .await
        .expect("a stream given no window held its upstream connection")
        .unwrap();
    assert!(
        cuts.try_recv().is_err(),
        "the steady reader's upstream was cut"
    );
    let mut held = held.into_body();
    let reset = loop {
        match tokio::time::timeout(Duration::from_secs(10), held.frame()).await {
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(e))) => break e,
            Ok(None) => panic!("the withheld stream ended as if complete"),
            Err(_) => panic!("the withheld stream was never reset"),
        }
    };
    // hyper's error names the HTTP/2 reset and its code.
    assert!(format!("{reset:?}").contains("CANCEL"), "{reset:?}");
    // The connection itself is still good: streams that kept sending for
    // longer than the idle timeout did not make it idle.
    tx.ready().await.expect("the connection was closed");
    let rsp = tx
        .send_request(get("/public/bulk/10".into()))
        .await
        .unwrap();
    assert_eq!(rsp.status(), 200);
}

/// The admin port may be reachable beyond the host (a scrape target) and
/// shares the process's descriptors with the proxy: a client trickling a
/// request head there is cut off at `header_read_timeout`, as on the proxy
/// port.
#[tokio::test]
async fn a_head_trickled_to_the_admin_port_is_cut_off() {
    let h = Harness::with(Options {
        tls: false,
        extra_toml: "[runtime]\nheader_read_timeout = \"1s\"\n".into(),
        ..Options::default()
    })
    .await;
    let mut slow = tokio::net::TcpStream::connect(h.admin).await.unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: admin\r\n")
        .await
        .unwrap();
    let mut seen = Vec::new();
    // A reset may end the read: closing is the point.
    let _ = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut seen))
        .await
        .expect("a trickled head held an admin connection open");
    assert!(
        !seen.starts_with(b"HTTP/1.1 200"),
        "answered an unfinished head"
    );
    assert_eq!(h.admin_get("/healthz").await.0, 200);
}

/// Past `ADMIN_CONNECTIONS` open admin connections, a new one is closed
/// unanswered; once they go, the admin port answers again, and the proxy
/// port served throughout.
#[tokio::test]
async fn admin_connections_past_the_cap_are_closed_unanswered() {
    use super::harness::{answered, eventually};
    let h = Harness::plaintext().await;
    let mut held = Vec::new();
    for _ in 0..warden::admin::ADMIN_CONNECTIONS {
        held.push(tokio::net::TcpStream::connect(h.admin).await.unwrap());
    }
    assert!(
        !answered(h.admin, "/healthz").await,
        "an admin connection past the cap was served"
    );
    assert!(
        answered(h.addr, "/public/x").await,
        "the proxy port stopped serving"
    );
    drop(held);
    eventually("the admin port answers once connections close", || {
        answered(h.admin, "/healthz")
    })
    .await;
}

/// An HTTP/2 client that resets its stream while its request body is still
/// being forwarded has gone before the response, as one that closes its
/// connection has: the line says 499, whichever part of warden sees the
/// reset first (the upstream connection reading the body, or the stream's
/// own task). Each round is a fresh connection.
// Two workers: the log is read with a blocking wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_reset_mid_body_is_logged_as_the_client_gone() {
    let (h, mut arrivals, _release) = super::drain::harness_before_held_upstream("").await;
    for round in 0..8 {
        let mut conn = tokio::net::TcpStream::connect(h.addr).await.unwrap();
        let mut opening = h2_preface();
        // HEADERS, END_HEADERS without END_STREAM: a body follows.
        let path = format!("/public/reset/{round}");
        opening.extend(frame(0x1, 0x4, 1, &get_headers(&h.host(), &path)));
        opening.extend(frame(0x0, 0, 1, b"part of a body"));
        conn.write_all(&opening).await.unwrap();
        arrivals.recv().await.unwrap();
        // RST_STREAM, CANCEL (0x8).
        conn.write_all(&frame(0x3, 0, 1, &8u32.to_be_bytes()))
            .await
            .unwrap();
        let line = h.next_log();
        assert_eq!(
            line["resource"],
            format!("Http::Path::\"{path}\""),
            "{line}"
        );
        assert_eq!(line["decision"], "allow", "{line}");
        assert_eq!(line["status"], 499, "round {round}: {line}");
        assert_eq!(
            line["reason"], "connection closed before the response",
            "{line}"
        );
        drop(conn);
    }
}

/// What [`early_answering_upstream`] saw on one of its connections.
#[derive(Debug, PartialEq)]
enum UpstreamSaw {
    /// The connection's first request head (connections counted from 0).
    Head(usize, String),
    /// The connection ended; every byte that followed its first head.
    End(usize, Vec<u8>),
}

/// An upstream that answers `200 ok` as soon as a connection's first request
/// head arrives, before any of its body (as some servers do), and reports
/// what each connection carried.
async fn early_answering_upstream() -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<UpstreamSaw>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (saw, seen) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        for id in 0.. {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let saw = saw.clone();
            tokio::spawn(async move {
                let (mut got, mut head_end) = (Vec::new(), None);
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = s.read(&mut buf).await {
                    got.extend_from_slice(&buf[..n]);
                    if head_end.is_none() {
                        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                            head_end = Some(i + 4);
                            let head = String::from_utf8_lossy(&got[..i]).into_owned();
                            let _ = saw.send(UpstreamSaw::Head(id, head));
                            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if s.write_all(answer).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                let rest = got.split_off(head_end.unwrap_or(got.len()));
                let _ = saw.send(UpstreamSaw::End(id, rest));
            });
        }
    });
    (addr, seen)
}

/// A request whose upstream answered before its body was all sent keeps its
/// upstream connection until the body is: the next request goes out on
/// another connection, never after the first one's unfinished body (where
/// the upstream would read it as the rest of that body, or as a request of
/// the first client's making). When the client then leaves mid-body, that
/// connection is closed with nothing sent past what the client sent.
#[tokio::test]
async fn an_unfinished_request_body_keeps_its_upstream_connection_from_the_next_request() {
    let (upstream, mut seen) = early_answering_upstream().await;
    let h = Harness::with(Options {
        tls: false,
        upstream: Some(upstream),
        ..Options::default()
    })
    .await;
    let host = h.host();
    let mut first = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let head = format!("GET /public/first HTTP/1.1\r\nHost: {host}\r\nContent-Length: 10\r\n\r\n");
    first.write_all(head.as_bytes()).await.unwrap();
    first.write_all(b"hello").await.unwrap();
    match seen.recv().await.unwrap() {
        UpstreamSaw::Head(0, head) => assert!(head.starts_with("GET /public/first "), "{head}"),
        other => panic!("expected the first head on connection 0, got {other:?}"),
    }
    // The upstream's whole answer reaches the client while its body is unfinished.
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    while !answer.ends_with(b"\r\n\r\nok") {
        let n = tokio::time::timeout(Duration::from_secs(10), first.read(&mut buf))
            .await
            .expect("the upstream's answer was not forwarded")
            .unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&buf[..n]);
    }
    assert!(answer.starts_with(b"HTTP/1.1 200 "));

    let second =
        format!("GET /public/second HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    assert_eq!(h.raw(second.into_bytes()).await, 200);
    match seen.recv().await.unwrap() {
        UpstreamSaw::Head(1, head) => assert!(head.starts_with("GET /public/second "), "{head}"),
        other => panic!("expected the second head on a new connection, got {other:?}"),
    }

    drop(first);
    let ended = tokio::time::timeout(Duration::from_secs(10), seen.recv())
        .await
        .expect("the cut-short request's upstream connection stayed open");
    assert_eq!(ended, Some(UpstreamSaw::End(0, b"hello".to_vec())));
}

/// Reads an HTTP/2 server's frames until `stream`'s response HEADERS (true)
/// or the end of the connection (false: a GOAWAY closed it).
async fn answered_on(conn: &mut tokio::net::TcpStream, stream: u32) -> bool {
    let read = async {
        let mut head = [0u8; 9];
        while conn.read_exact(&mut head).await.is_ok() {
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]);
            let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            let mut payload = vec![0u8; len as usize];
            if conn.read_exact(&mut payload).await.is_err() {
                break;
            }
            match head[3] {
                0x1 if id == stream => return true,
                0x7 => return false,
                _ => {}
            }
        }
        false
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("the server neither answered nor closed")
}

/// An HTTP/2 request whose header block carries what would end a header
/// line on the HTTP/1.1 upstream (CR, LF, NUL in a value, in `:path` or in
/// `:authority`), or a name HTTP/2 forbids (upper case), is refused before
/// anything reaches the upstream: nothing the client wrote there can become
/// a header or a request of its own. The same connection's next, honest
/// request goes through alone, if the connection survived.
#[tokio::test]
async fn an_http2_header_cannot_inject_lines_into_the_upstream_request() {
    let mut h = Harness::plaintext().await;
    let host = h.host();
    let smuggled = "x\r\nx-injected: 1\r\n\r\nGET /api/admin/x HTTP/1.1\r\nhost: upstream";
    // (case, the header block of a GET for /public/x)
    let literal = |name: &str, value: &str| {
        let mut f = vec![0x00, u8::try_from(name.len()).unwrap()];
        f.extend_from_slice(name.as_bytes());
        f.push(u8::try_from(value.len()).unwrap());
        f.extend_from_slice(value.as_bytes());
        f
    };
    // A field whose name is the static table's entry `index`, not indexed.
    let named = |index: u8, value: &str| {
        let mut f = vec![index, u8::try_from(value.len()).unwrap()];
        f.extend_from_slice(value.as_bytes());
        f
    };
    let cases: [(&str, Vec<u8>); 5] = [
        ("CR LF in a value", {
            let mut b = get_headers(&host, "/public/x");
            b.extend(literal("x-note", smuggled));
            b
        }),
        ("NUL in a value", {
            let mut b = get_headers(&host, "/public/x");
            b.extend(literal("x-note", "a\0b"));
            b
        }),
        ("upper case name", {
            let mut b = get_headers(&host, "/public/x");
            b.extend(literal("X-Note", "a"));
            b
        }),
        ("CR LF in :path", {
            let mut b = vec![0x82, 0x86];
            b.extend(named(0x04, &format!("/public/x HTTP/1.1\r\n{smuggled}")));
            b.extend(named(0x01, &host));
            b
        }),
        ("CR LF in :authority", {
            let mut b = vec![0x82, 0x86];
            b.extend(named(0x04, "/public/x"));
            b.extend(named(0x01, &format!("{host}\r\nx-injected: 1")));
            b
        }),
    ];
    // The same fields, well formed, go through: the refusals below are the
    // bytes', not the frames'.
    let mut conn = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let mut block = vec![0x82, 0x86];
    block.extend(named(0x04, "/public/x"));
    block.extend(named(0x01, &host));
    block.extend(literal("x-note", "fine"));
    let mut out = h2_preface();
    out.extend(frame(0x1, 0x5, 1, &block));
    conn.write_all(&out).await.unwrap();
    assert!(answered_on(&mut conn, 1).await);
    let got = h.upstream_got();
    assert_eq!(got.uri, "/public/x");
    assert_eq!(got.headers["x-note"], "fine");
    for (case, block) in cases {
        let mut conn = tokio::net::TcpStream::connect(h.addr).await.unwrap();
        let mut out = h2_preface();
        out.extend(frame(0x1, 0x5, 1, &block));
        out.extend(frame(0x1, 0x5, 3, &get_headers(&host, "/public/honest")));
        // The server may close before all of it is written.
        let _ = conn.write_all(&out).await;
        if answered_on(&mut conn, 3).await {
            let got = h.upstream_got();
            assert_eq!(got.uri, "/public/honest", "{case}");
            assert!(!got.headers.contains_key("x-injected"), "{case}");
            assert!(!got.headers.contains_key("x-note"), "{case}");
        }
        h.assert_upstream_untouched();
    }
}

/// An HTTP/1.1 client that closes its connection mid-body, with a FIN or a
/// reset, cannot be told from one that half-closed and still reads: both
/// are logged as the body ended early (400), as nginx logs a client that
/// closed while its body was read, whichever part of warden sees it first.
/// (An HTTP/2 client's stream reset says it has gone: 499, above.)
// Two workers: the log is read with a blocking wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_client_closing_mid_body_is_logged_as_the_body_cut_short() {
    let h = Harness::plaintext().await;
    let host = h.host();
    for round in 0..8 {
        let mut s = tokio::net::TcpStream::connect(h.addr).await.unwrap();
        let path = format!("/public/cut/{round}");
        let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 10\r\n\r\nhello");
        s.write_all(req.as_bytes()).await.unwrap();
        if round % 2 == 1 {
            // A reset rather than a FIN.
            s.set_zero_linger().unwrap();
        }
        drop(s);
        let line = h.next_log();
        assert_eq!(
            line["resource"],
            format!("Http::Path::\"{path}\""),
            "{line}"
        );
        assert_eq!(line["status"], 400, "round {round}: {line}");
        assert_eq!(
            line["reason"], "request body ended early: the connection closed",
            "round {round}: {line}"
        );
    }
}
