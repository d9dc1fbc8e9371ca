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
        let layer = self.layer.clone();
        Box::pin(async move {
            let result = fut.await;
            let (rsp, err) = match result {
                Ok(rsp) => (rsp, None),
                Err(e) => {
                    let mut rsp = rescue(&e, &trace.request_id, trace.grpc);
                    if layer.explain && matches!(e, ProxyError::Forbidden) {
                        if let Ok(v) = http::HeaderValue::try_from(deny_reason(&trace)) {
                            rsp.headers_mut().insert("x-warden-deny-reason", v);
                        }
                    }
                    (rsp, Some(e))
                }
            };
            layer.record(&trace, rsp.status().as_u16(), err.as_ref());
            Ok(rsp)
        })
    }
}

impl ObserveLayer {
    fn record(&self, trace: &Trace, status: u16, err: Option<&ProxyError>) {
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
        let ts = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let reason = match (err, decision) {
            (Some(e), _) => e
                .reason()
                .map(str::to_owned)
                .or_else(|| Some(e.to_string())),
            (None, Some(d)) if !d.allow => Some("would deny (audit mode)".to_owned()),
            _ => None,
        };
        let verdict = |allow: bool| if allow { "allow" } else { "deny" };
        let line = LogLine {
            ts: &ts,
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
            reason: reason.as_deref(),
            status,
            duration_us: u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
            errors: decision.map_or(&[], |d| &d.errors[..]),
            shadow: shadow.map(|sh| ShadowLine {
                decision: verdict(sh.allow),
                policies: &sh.policies,
                policy_set: &sh.policy_set,
            }),
        };
        // Sized for a typical line, so serializing it rarely regrows.
        let mut out = Vec::with_capacity(512);
        if serde_json::to_writer(&mut out, &line).is_ok() {
            if let Ok(line) = String::from_utf8(out) {
                self.log.write(line);
            }
        }
    }
}

/// One decision-log line (DESIGN §8), serialized straight from the trace.
#[derive(serde::Serialize)]
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
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    errors: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    shadow: Option<ShadowLine<'a>>,
}

#[derive(serde::Serialize)]
struct ShadowLine<'a> {
    decision: &'a str,
    policies: &'a [String],
    policy_set: &'a str,
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
}
