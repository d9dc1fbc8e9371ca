//! Mutated input through the running proxy. A credential changed in any one
//! place is refused; a request head mangled at random gets one of the
//! contract's answers (never a 5xx, never a dropped connection without one),
//! and the proxy goes on serving.

use std::time::SystemTime;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::harness::{Harness, Signing};

const BODY: &[u8] = b"{\"n\":1}";

/// `s` with the character at `i` replaced by one that means something else
/// in every field of a JWT or a SigV4 `Authorization` value: `Z` is neither
/// a hex digit nor a separator, and no field is case-insensitive to it.
fn changed_at(s: &str, i: usize) -> String {
    let mut b = s.as_bytes().to_vec();
    b[i] = if b[i] == b'Z' { b'Y' } else { b'Z' };
    String::from_utf8(b).unwrap()
}

#[tokio::test]
async fn a_credential_changed_in_any_one_character_is_refused() {
    let mut h = Harness::plaintext().await;
    let bearer = |token: &str| {
        h.request("GET", "/api/catalog/items")
            .header("authorization", format!("Bearer {token}"))
            .body(Full::new(Bytes::new()))
            .unwrap()
    };

    // The token as issued is accepted (and now cached)...
    let token = h.sa_token("shop", "checkout");
    assert_eq!(h.send(bearer(&token)).await.status, StatusCode::OK);
    // ...and no one-character change of it is, the cache included.
    let mut changed = Vec::new();
    for i in 0..token.len() {
        let rsp = h.send(bearer(&changed_at(&token, i))).await;
        if rsp.status != StatusCode::UNAUTHORIZED {
            changed.push((i, rsp.status));
        }
    }
    assert!(changed.is_empty(), "JWT changed at {changed:?} not refused");
    h.upstream_got();
    h.assert_upstream_untouched();

    // The same for every character of a SigV4 `Authorization` header.
    let signed = h.sign("POST", "/api/orders/", BODY, Signing::default());
    let send = |auth: Option<String>| {
        let mut b = h.request("POST", "/api/orders/");
        for (k, v) in &signed {
            if k.eq_ignore_ascii_case("authorization") {
                if let Some(a) = &auth {
                    b = b.header(k.as_str(), a.as_str());
                    continue;
                }
            }
            b = b.header(k.as_str(), v.as_str());
        }
        h.send(b.body(Full::new(Bytes::from_static(BODY))).unwrap())
    };
    let auth = signed
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("authorization"))
        .map(|(_, v)| v.clone())
        .unwrap();
    assert_eq!(send(None).await.status, StatusCode::OK);
    for i in 0..auth.len() {
        let rsp = send(Some(changed_at(&auth, i))).await;
        if rsp.status != StatusCode::UNAUTHORIZED {
            changed.push((i, rsp.status));
        }
    }
    assert!(
        changed.is_empty(),
        "SigV4 changed at {changed:?} not refused"
    );
    h.upstream_got();
    h.assert_upstream_untouched();

    // And for every character of a presigned URL, path and query alike. A
    // change can also leave no credential (`?` or a parameter's name): then
    // the request is anonymous, and refused by policy.
    let target = h.presigned("GET", "/api/downloads/7?view=full", SystemTime::now(), 60);
    let get = |target: &str| {
        h.send(
            h.request("GET", target)
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
    };
    assert_eq!(get(&target).await.status, StatusCode::OK);
    // (From 1: without its leading `/` the target is no request at all.)
    for i in 1..target.len() {
        let status = get(&changed_at(&target, i)).await.status;
        if !matches!(status.as_u16(), 400 | 401 | 403) {
            changed.push((i, status));
        }
    }
    assert!(
        changed.is_empty(),
        "presigned URL changed at {changed:?} not refused"
    );
    h.upstream_got();
    h.assert_upstream_untouched();
}

/// xorshift64*: the same sequence on every run, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Bytes that mean something to a parser somewhere on the request path.
const SPICE: &[u8] = b"\0\t\r\n \"#%+,./:;=?@\\~\x7f\x80\xc3\xff";

fn mangle(rng: &mut Rng, head: &[u8]) -> Vec<u8> {
    let mut b = head.to_vec();
    for _ in 0..1 + rng.below(3) {
        let i = rng.below(b.len());
        let byte = if rng.below(4) == 0 {
            b'A' + rng.below(26) as u8
        } else {
            SPICE[rng.below(SPICE.len())]
        };
        match rng.below(4) {
            0 => b[i] = byte,
            1 => b.insert(i, byte),
            2 => {
                b.remove(i);
            }
            _ => {
                // Repeat a stretch: doubled headers, separators, escapes.
                let end = (i + 1 + rng.below(24)).min(b.len());
                let stretch = b[i..end].to_vec();
                b.splice(i..i, stretch);
            }
        }
    }
    b
}

/// Sends `head` and the end of a head on a new connection; returns the
/// status of the answer, or `None` when the connection closed (or stayed
/// silent for longer than any of warden's own timeouts) without one.
async fn status_of(h: &Harness, head: &[u8]) -> Option<u16> {
    let mut s = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    s.write_all(head).await.unwrap();
    s.write_all(b"\r\n\r\n").await.unwrap();
    let mut buf = Vec::new();
    let read_head = async {
        let mut chunk = [0u8; 4096];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    // A bound on a failure, not a synchronization: every answer comes at once.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(30), read_head).await;
    let line = buf.split(|&b| b == b'\r').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let rest = line.strip_prefix("HTTP/1.1 ")?;
    rest.get(..3)?.parse().ok()
}

#[tokio::test]
async fn mangled_request_heads_get_a_contract_answer() {
    let h = Harness::plaintext().await;
    let host = h.host();
    let token = h.sa_token("shop", "checkout");
    // No body anywhere: a mangled head never leaves warden waiting for one.
    let mut seeds = vec![
        format!("GET /public/x?a=1&b=%20 HTTP/1.1\r\nHost: {host}\r\nAccept: */*"),
        format!("GET /api/catalog/items HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}"),
        format!("POST /public/x HTTP/1.1\r\nHost: {host}\r\nX-Forwarded-For: 10.0.0.1"),
    ];
    let mut signed = format!("GET /api/orders/1 HTTP/1.1\r\nHost: {host}");
    for (k, v) in h.sign("GET", "/api/orders/1", b"", Signing::default()) {
        signed.push_str(&format!("\r\n{k}: {v}"));
    }
    seeds.push(signed);

    // Unmangled, each seed is answered as it should be: the public read, the
    // token and the signature allowed, the anonymous POST denied.
    for (seed, want) in seeds.iter().zip([200, 200, 403, 200]) {
        assert_eq!(status_of(&h, seed.as_bytes()).await, Some(want), "{seed}");
    }

    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut odd = Vec::new();
    for n in 0..1500 {
        let head = mangle(&mut rng, seeds[n % seeds.len()].as_bytes());
        let lower = head.to_ascii_lowercase();
        if [&b"content-length"[..], b"transfer-encoding"]
            .iter()
            .any(|f| lower.windows(f.len()).any(|w| w == *f))
        {
            continue;
        }
        // What the contract answers with: 200 when the mangling left an
        // allowed request, 400/405/431 for malformed ones, 401/403 from
        // authentication and policy.
        let answer = status_of(&h, &head).await;
        if !matches!(answer, Some(200 | 400 | 401 | 403 | 405 | 431)) {
            odd.push((String::from_utf8_lossy(&head).into_owned(), answer));
        }
    }
    assert!(odd.is_empty(), "{} odd answers: {odd:#?}", odd.len());

    // And the proxy still serves.
    let plain = format!("GET /public/x HTTP/1.1\r\nHost: {host}");
    assert_eq!(status_of(&h, plain.as_bytes()).await, Some(200));
}
