//! The outermost layer: request id, decision log and metrics, and the one
//! place where errors from every later step become responses.
//!
//! It always runs, so every request (allowed, refused or failed) yields one
//! decision-log line and one `warden_requests_total` increment.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{header, Request, Response};
use tower::{Layer, Service};

use crate::audit::DecisionLog;
use crate::body::Body;
use crate::config::AuthzMode;
use crate::error::{rescue, ProxyError};
use crate::metrics::{AuthnFailureLabels, DecisionLabels, Metrics, RequestLabels, ShadowLabels};
use crate::trace::{ConnInfo, Trace};

/// Whether a client-supplied `x-request-id` is safe to keep.
fn valid_request_id(v: &[u8]) -> bool {
    !v.is_empty()
        && v.len() <= 128
        && v.iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// A fresh random request id (128 bits, hex).
pub fn new_request_id() -> String {
    let mut bytes = [0u8; 16];
    if random_id(&mut bytes).is_err() {
        // The system RNG failing is not a reason to drop traffic; ids need
        // only be unique, so fall back to time and a counter.
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        return format!("{t:x}-{n:x}");
    }
    let mut id = String::with_capacity(32);
    crate::push_hex(&mut id, &bytes);
    id
}

/// 16 bytes from the system RNG, drawn from a per-thread buffer filled 256
/// ids at a time: one call into the RNG costs more than the bytes it gives.
fn random_id(out: &mut [u8; 16]) -> Result<(), aws_lc_rs::error::Unspecified> {
    const IDS: usize = 256;
    thread_local! {
        static POOL: std::cell::RefCell<(Box<[u8]>, usize)> =
            std::cell::RefCell::new((vec![0; 16 * IDS].into_boxed_slice(), IDS));
    }
    POOL.with(|pool| {
        let mut pool = pool
            .try_borrow_mut()
            .map_err(|_| aws_lc_rs::error::Unspecified)?;
        let (bytes, next) = &mut *pool;
        if *next == IDS {
            aws_lc_rs::rand::fill(bytes)?;
            *next = 0;
        }
        let id = bytes
            .get(*next * 16..(*next + 1) * 16)
            .ok_or(aws_lc_rs::error::Unspecified)?;
        out.copy_from_slice(id);
        // Never handed out twice.
        *next += 1;
        Ok(())
    })
}

#[derive(Clone)]
pub struct ObserveLayer {
    metrics: Arc<Metrics>,
    log: DecisionLog,
    mode: AuthzMode,
    explain: bool,
}

impl ObserveLayer {
    pub fn new(metrics: Arc<Metrics>, log: DecisionLog, mode: AuthzMode, explain: bool) -> Self {
        Self {
            metrics,
            log,
            mode,
            explain,
        }
    }
}

/// Why the policies denied, for `x-warden-deny-reason` (local development).
fn deny_reason(trace: &Trace) -> String {
    let Some(d) = trace.decision.get() else {
        return "denied".to_owned();
    };
    let mut reason = if d.policies.is_empty() {
        "no policy permits this request".to_owned()
    } else {
        format!("forbidden by {}", d.policies.join(", "))
    };
    if !d.errors.is_empty() {
        // Only the policy names: the messages are in the decision log.
        let failed: Vec<&str> = d
            .errors
            .iter()
            .filter_map(|e| e.split('`').nth(1))
            .collect();
        reason.push_str(&format!("; failed to evaluate: {}", failed.join(", ")));
    }
    reason
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Observe {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    layer: ObserveLayer,
}

impl<S> Service<Request<Body>> for Observe<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = ProxyError>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Inner layers are always ready or report errors per request.
        match self.inner.poll_ready(cx) {
            Poll::Ready(_) => Poll::Ready(Ok(())),
            Poll::Pending => Poll::Pending,
        }
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let conn = req
            .extensions()
            .get::<Arc<ConnInfo>>()
            .cloned()
            .unwrap_or_else(|| {
                Arc::new(ConnInfo::new(
                    ([0, 0, 0, 0], 0).into(),
                    ([0, 0, 0, 0], 0).into(),
                    None,
                ))
            });
        let request_id = req
            .headers()
            .get("x-request-id")
            .filter(|v| valid_request_id(v.as_bytes()))
            .and_then(|v| v.to_str().ok())
            .map_or_else(new_request_id, str::to_owned);
        let grpc = req
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        let trace = Arc::new(Trace::new(request_id, conn, grpc));
        req.extensions_mut().insert(trace.clone());
        let fut = self.inner.call(req);
        let mut pending = Unanswered {
            layer: self.layer.clone(),
            trace,
            answered: false,
        };
        Box::pin(async move {
            let result = fut.await;
            pending.answered = true;
            let (layer, trace) = (&pending.layer, &pending.trace);
            let (rsp, err) = match result {
                Ok(rsp) => (rsp, None),
                Err(e) => {
                    let mut rsp = rescue(&e, &trace.request_id, trace.grpc);
                    if layer.explain && matches!(e, ProxyError::Forbidden) {
                        if let Ok(v) = http::HeaderValue::try_from(deny_reason(trace)) {
                            rsp.headers_mut().insert("x-warden-deny-reason", v);
                        }
                    }
                    (rsp, Some(e))
                }
            };
            layer.record(trace, rsp.status().as_u16(), err.as_ref());
            Ok(rsp)
        })
    }
}

/// A request in flight. If its future is dropped before it answers (the
/// client closed its HTTP/1.1 connection or reset its HTTP/2 stream, or the
/// connection was cut at the end of a drain), the request may already have
/// reached the upstream, so it is still logged and counted, with status 499.
struct Unanswered {
    layer: ObserveLayer,
    trace: Arc<Trace>,
    answered: bool,
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        if !self.answered {
            let gone = ProxyError::ClientGone;
            self.layer
                .write(&self.trace, gone.status().as_u16(), None, gone.reason());
        }
    }
}

impl ObserveLayer {
    /// A request whose head hyper could not parse, which hyper answered
    /// itself (400, 414 or 431, with no body) and closed the connection on,
    /// so it never reached this layer's `call`. It is counted and logged like
    /// any other refusal: a malformed or smuggling-shaped request is one an
    /// operator wants to see. No request id reached the client, and the
    /// duration is unknown (0): the head was never whole.
    pub fn record_unparsed(&self, peer: std::net::IpAddr, status: u16, reason: &str) {
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                authn: "none",
                decision: "none",
                code: status,
            })
            .inc();
        let mut ts = [0u8; 40];
        let request_id = new_request_id();
        let line = LogLine {
            ts: rfc3339(time::OffsetDateTime::now_utc(), &mut ts),
            request_id: &request_id,
            source_ip: peer,
            authn: "none",
            principal: None,
            action: None,
            resource: None,
            decision: None,
            mode: self.mode.as_str(),
            policies: &[],
            policy_set: None,
            reason: Some(reason),
            status,
            duration_us: 0,
            errors: &[],
            shadow: None,
        };
        self.log.write(line.to_json());
    }

    /// Logs and counts a request that was answered with `status`.
    fn record(&self, trace: &Trace, status: u16, err: Option<&ProxyError>) {
        let reason = match (err, trace.decision.get()) {
            (Some(e), _) => e
                .reason()
                .map(str::to_owned)
                .or_else(|| Some(e.to_string())),
            (None, Some(d)) if !d.allow => Some("would deny (audit mode)".to_owned()),
            _ => None,
        };
        self.write(trace, status, err, reason.as_deref());
    }

    /// Counts the request and writes its decision-log line.
    fn write(&self, trace: &Trace, status: u16, err: Option<&ProxyError>, reason: Option<&str>) {
        let elapsed = trace.start.elapsed();
        let authn = trace.authn.get().copied().unwrap_or("none");
        let decision = trace.decision.get();
        let decision_label = match decision {
            Some(d) if d.allow => "allow",
            Some(_) => "deny",
            None => "none",
        };
        let m = &self.metrics;
        m.requests
            .get_or_create(&RequestLabels {
                authn,
                decision: decision_label,
                code: status,
            })
            .inc();
        m.request_duration.observe(elapsed.as_secs_f64());
        if let Some(ProxyError::Unauthenticated { method, code, .. }) = err {
            m.authn_failures
                .get_or_create(&AuthnFailureLabels {
                    method,
                    reason: code,
                })
                .inc();
        }
        if decision.is_some() {
            m.authz_decisions
                .get_or_create(&DecisionLabels {
                    decision: decision_label,
                    mode: self.mode.as_str(),
                })
                .inc();
        }
        let shadow = trace.shadow.get();
        if let Some(sh) = shadow {
            m.shadow_decisions
                .get_or_create(&ShadowLabels {
                    decision: if sh.allow { "allow" } else { "deny" },
                    agrees: if decision.is_some_and(|d| d.allow == sh.allow) {
                        "true"
                    } else {
                        "false"
                    },
                })
                .inc();
        }
        let verdict = |allow: bool| if allow { "allow" } else { "deny" };
        let mut ts = [0u8; 40];
        let line = LogLine {
            ts: rfc3339(time::OffsetDateTime::now_utc(), &mut ts),
            request_id: &trace.request_id,
            source_ip: trace.conn.peer().ip(),
            authn,
            principal: trace.principal.get().map(String::as_str),
            action: trace.action.get().map(String::as_str),
            resource: trace.resource.get().map(String::as_str),
            decision: decision.map(|d| verdict(d.allow)),
            mode: self.mode.as_str(),
            policies: decision.map_or(&[], |d| &d.policies[..]),
            policy_set: decision.map(|d| &*d.policy_set),
            reason,
            status,
            duration_us: u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
            errors: decision.map_or(&[], |d| &d.errors[..]),
            shadow: shadow.map(|sh| ShadowLine {
                decision: verdict(sh.allow),
                policies: &sh.policies,
                policy_set: &sh.policy_set,
            }),
        };
        self.log.write(line.to_json());
    }
}

/// One decision-log line (DESIGN §8), written straight from the trace.
///
/// By hand rather than through serde: every request writes one, and
/// serde_json's per-byte escaping, the timestamp's own `String` and the
/// formatter for the address and numbers cost about 3 000 of the 85 000
/// instructions of a kept-alive JWT request (`benches/load/run
/// --instructions`). The tests hold the output to serde_json's, byte for byte.
#[cfg_attr(test, derive(serde::Serialize))]
struct LogLine<'a> {
    ts: &'a str,
    request_id: &'a str,
    source_ip: std::net::IpAddr,
    authn: &'a str,
    principal: Option<&'a str>,
    action: Option<&'a str>,
    resource: Option<&'a str>,
    decision: Option<&'a str>,
    mode: &'a str,
    policies: &'a [String],
    policy_set: Option<&'a str>,
    reason: Option<&'a str>,
    status: u16,
    duration_us: u64,
    #[cfg_attr(test, serde(skip_serializing_if = "<[String]>::is_empty"))]
    errors: &'a [String],
    #[cfg_attr(test, serde(skip_serializing_if = "Option::is_none"))]
    shadow: Option<ShadowLine<'a>>,
}

#[cfg_attr(test, derive(serde::Serialize))]
struct ShadowLine<'a> {
    decision: &'a str,
    policies: &'a [String],
    policy_set: &'a str,
}

impl LogLine<'_> {
    fn to_json(&self) -> String {
        use std::fmt::Write as _;
        // Sized for a typical line, so writing it rarely regrows. Each key
        // goes out with its separator as one literal.
        let mut out = String::with_capacity(512);
        for (key, value) in [("{\"ts\":", self.ts), (",\"request_id\":", self.request_id)] {
            out.push_str(key);
            push_json_str(&mut out, value);
        }
        out.push_str(",\"source_ip\":\"");
        match self.source_ip {
            std::net::IpAddr::V4(ip) => {
                for (i, octet) in ip.octets().into_iter().enumerate() {
                    if i > 0 {
                        out.push('.');
                    }
                    push_decimal(&mut out, u64::from(octet));
                }
            }
            std::net::IpAddr::V6(ip) => {
                let _ = write!(out, "{ip}");
            }
        }
        out.push('"');
        for (key, value) in [
            (",\"authn\":", Some(self.authn)),
            (",\"principal\":", self.principal),
            (",\"action\":", self.action),
            (",\"resource\":", self.resource),
            (",\"decision\":", self.decision),
            (",\"mode\":", Some(self.mode)),
        ] {
            out.push_str(key);
            push_json_opt(&mut out, value);
        }
        out.push_str(",\"policies\":");
        push_json_list(&mut out, self.policies);
        for (key, value) in [
            (",\"policy_set\":", self.policy_set),
            (",\"reason\":", self.reason),
        ] {
            out.push_str(key);
            push_json_opt(&mut out, value);
        }
        for (key, value) in [
            (",\"status\":", u64::from(self.status)),
            (",\"duration_us\":", self.duration_us),
        ] {
            out.push_str(key);
            push_decimal(&mut out, value);
        }
        if !self.errors.is_empty() {
            out.push_str(",\"errors\":");
            push_json_list(&mut out, self.errors);
        }
        if let Some(sh) = &self.shadow {
            out.push_str(",\"shadow\":{\"decision\":");
            push_json_str(&mut out, sh.decision);
            out.push_str(",\"policies\":");
            push_json_list(&mut out, sh.policies);
            out.push_str(",\"policy_set\":");
            push_json_str(&mut out, sh.policy_set);
            out.push('}');
        }
        out.push('}');
        out
    }
}

/// `t` in RFC 3339, written into `buf` rather than a `String` of its own
/// (at most 35 bytes: "9999-12-31T23:59:59.999999999+23:59").
fn rfc3339(t: time::OffsetDateTime, buf: &mut [u8; 40]) -> &str {
    let mut w = &mut buf[..];
    // The length is what the writer used up: the count `format_into` returns
    // leaves out the fraction of a second.
    let n = match t.format_into(&mut w, &time::format_description::well_known::Rfc3339) {
        Ok(_) => 40 - w.len(),
        Err(_) => 0,
    };
    buf.get(..n)
        .and_then(|t| std::str::from_utf8(t).ok())
        .unwrap_or("")
}

/// `n` in decimal, without the formatting machinery `write!` goes through.
fn push_decimal(out: &mut String, mut n: u64) {
    // u64::MAX has 20 digits.
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    for slot in digits.iter_mut().rev() {
        // `n % 10` is a digit, so the cast keeps it whole.
        *slot = b'0' + (n % 10) as u8;
        start -= 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.push_str(
        digits
            .get(start..)
            .and_then(|d| std::str::from_utf8(d).ok())
            .unwrap_or(""),
    );
}

fn push_json_opt(out: &mut String, s: Option<&str>) {
    match s {
        Some(s) => push_json_str(out, s),
        None => out.push_str("null"),
    }
}

fn push_json_list(out: &mut String, items: &[String]) {
    out.push('[');
    for (i, s) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_json_str(out, s);
    }
    out.push(']');
}

/// Appends `s` as a JSON string, escaped as serde_json escapes it: `"`, `\`
/// and the control characters, nothing else. Eight bytes at a time, which is
/// most of every line.
fn push_json_str(out: &mut String, s: &str) {
    const ONES: u64 = u64::from_le_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_le_bytes([0x80; 8]);
    // The high bit of each byte of `w` below `n` (n <= 0x80). A borrow can
    // mark a byte above a true one, never below it: the lowest mark is exact.
    let below = |w: u64, n: u64| w.wrapping_sub(ONES * n) & !w & HIGH;
    let bytes = s.as_bytes();
    out.push('"');
    // `s[run..i]` needs no escape and is not yet written.
    let mut run = 0;
    let mut i = 0;
    while i < bytes.len() {
        if let Some(word) = bytes
            .get(i..i + 8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
        {
            let w = u64::from_le_bytes(word);
            let marks = below(w, 0x20)
                | below(w ^ (ONES * u64::from(b'"')), 1)
                | below(w ^ (ONES * u64::from(b'\\')), 1);
            if marks == 0 {
                i += 8;
                continue;
            }
            // Straight to the first byte to escape (little-endian: lowest first).
            i += (marks.trailing_zeros() / 8) as usize;
        }
        let Some(&b) = bytes.get(i) else { break };
        let escape: &str = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0..=0x1f => "",
            _ => {
                i += 1;
                continue;
            }
        };
        // Escaped bytes are ASCII, so `run..i` lies on character boundaries.
        out.push_str(s.get(run..i).unwrap_or(""));
        if escape.is_empty() {
            out.push_str("\\u00");
            crate::push_hex(out, &[b]);
        } else {
            out.push_str(escape);
        }
        i += 1;
        run = i;
    }
    out.push_str(s.get(run..).unwrap_or(""));
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids() {
        assert!(valid_request_id(b"abc-123_x.y:z"));
        assert!(!valid_request_id(b""));
        assert!(!valid_request_id(b"a b"));
        assert!(!valid_request_id(b"a\"b"));
        assert!(!valid_request_id(&[b'a'; 129]));
        let a = new_request_id();
        assert_eq!(a.len(), 32);
        assert!(
            a.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
            "{a}"
        );
        assert_ne!(a, new_request_id());
        // Across refills of the per-thread buffer, every id is new.
        let ids: std::collections::HashSet<String> = (0..1000).map(|_| new_request_id()).collect();
        assert_eq!(ids.len(), 1000);
    }

    fn serde(s: &str) -> String {
        serde_json::to_string(s).unwrap()
    }

    fn ours(s: &str) -> String {
        let mut out = String::new();
        push_json_str(&mut out, s);
        out
    }

    #[test]
    fn json_strings_are_escaped_as_serde_json_escapes_them() {
        let specials = (0u8..0x80)
            .map(char::from)
            .chain(['é', '€', '😀', '\u{2028}', '\u{ffff}']);
        // Each character at every offset of an eight-byte word, and in the tail.
        for c in specials {
            for before in 0..18 {
                for after in [0, 1, 7, 8, 9] {
                    let s = format!("{}{c}{}", "a".repeat(before), "b".repeat(after));
                    assert_eq!(ours(&s), serde(&s), "{s:?}");
                }
            }
        }
        // Mixed strings from a small alphabet, deterministic.
        let alphabet = [
            'a', '"', '\\', '\n', '\u{1}', '\u{1f}', ' ', 'é', '😀', '/', '\u{7f}',
        ];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 40) as usize;
            let s: String = (0..len)
                .map(|i| alphabet[((x >> (i % 50)) as usize + i) % alphabet.len()])
                .collect();
            assert_eq!(ours(&s), serde(&s), "{s:?}");
        }
        assert_eq!(ours(""), "\"\"");
    }

    #[test]
    fn log_lines_are_what_serde_json_would_write() {
        let policies = vec!["allow-orders".to_owned(), "q\"uote\\d".to_owned()];
        let errors = vec!["error while evaluating policy `p`: \u{1}".to_owned()];
        let mut ts = [0u8; 40];
        let full = LogLine {
            ts: rfc3339(time::OffsetDateTime::now_utc(), &mut ts),
            request_id: "4f9c2a",
            source_ip: "::1".parse().unwrap(),
            authn: "jwt",
            principal: Some("Jwt::Subject::\"system:serviceaccount:shop:web\""),
            action: Some("Action::\"GET\""),
            resource: Some("Http::Path::\"/api/orders/1\""),
            decision: Some("deny"),
            mode: "audit",
            policies: &policies,
            policy_set: Some("0a1b2c3d4e5f6071"),
            reason: Some("would deny (audit mode)"),
            status: 200,
            duration_us: u64::MAX,
            errors: &errors,
            shadow: Some(ShadowLine {
                decision: "allow",
                policies: &policies[..1],
                policy_set: "feed",
            }),
        };
        assert_eq!(full.to_json(), serde_json::to_string(&full).unwrap());
        let bare = LogLine {
            source_ip: "10.0.0.7".parse().unwrap(),
            principal: None,
            action: None,
            resource: None,
            decision: None,
            policies: &[],
            policy_set: None,
            reason: None,
            status: 400,
            duration_us: 0,
            errors: &[],
            shadow: None,
            ..full
        };
        let json = bare.to_json();
        assert_eq!(json, serde_json::to_string(&bare).unwrap());
        for (ip, status, duration_us) in [
            ("0.0.0.0", 0, 0),
            ("255.255.255.255", 65535, 9),
            ("10.200.3.45", 503, 10),
            ("fe80::1:2", 101, 1_234_567_890),
        ] {
            let line = LogLine {
                source_ip: ip.parse().unwrap(),
                status,
                duration_us,
                shadow: None,
                ..bare
            };
            assert_eq!(line.to_json(), serde_json::to_string(&line).unwrap());
        }
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert!(
            v.get("errors").is_none() && v.get("shadow").is_none(),
            "{json}"
        );
    }

    #[test]
    fn timestamps_are_rfc3339_as_the_time_crate_writes_them() {
        use time::format_description::well_known::Rfc3339;
        let base = time::macros::datetime!(2026-11-24 08:30:05 UTC);
        for nanos in [0, 1, 10, 100_000, 120_000_000, 123_456_789, 999_999_999] {
            let t = base + time::Duration::nanoseconds(nanos);
            let mut buf = [0u8; 40];
            assert_eq!(rfc3339(t, &mut buf), t.format(&Rfc3339).unwrap());
        }
        let far = time::macros::datetime!(9999-12-31 23:59:59.999_999_999 +23:59);
        let mut buf = [0u8; 40];
        assert_eq!(
            rfc3339(far, &mut buf),
            "9999-12-31T23:59:59.999999999+23:59"
        );
    }
}
