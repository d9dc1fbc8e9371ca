//! Step 5: attach the verified identity for the upstream.
//!
//! Removes hop-by-hop headers (and any a `Connection` header names), then sets
//! `x-amzn-lattice-identity`, `x-forwarded-for` (the socket peer),
//! `x-forwarded-proto` and `x-request-id`. Runs only for allowed requests.
//! An identity the header cannot carry (a control character in a value) is
//! refused with 401, never forwarded unlabelled: earlier steps refuse every
//! known source of one, so this is the last line, not the first.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{header, HeaderMap, HeaderName, HeaderValue, Request};
use tower::{Layer, Service};

use crate::authn::{Identity, Principal};
use crate::body::Body;
use crate::config::IdentityHeaders;
use crate::error::{reject, Either, ProxyError};
use crate::trace::Trace;

pub const LATTICE_IDENTITY: &str = "x-amzn-lattice-identity";

const HOPS: usize = 9;
/// Hop-by-hop headers; `connection` first.
const HOP_BY_HOP: [HeaderName; HOPS] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
    header::TRANSFER_ENCODING,
];

const X_AMZN_LATTICE_IDENTITY: HeaderName = HeaderName::from_static(LATTICE_IDENTITY);
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Removes hop-by-hop headers, including those a `Connection` header names.
/// `te: trailers` survives (gRPC needs it), even when `Connection` names `te`
/// as RFC 9110 asks of the client that sends it.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names notes which of the fixed set are present: most
    // requests carry none, and most responses only `connection: keep-alive`,
    // so only those are looked up again.
    let mut present = [false; HOPS];
    for k in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == k) {
            present[i] = true;
        }
    }
    if !present.contains(&true) {
        return;
    }
    // Other headers a `Connection` header names, only those present: tokens
    // such as `keep-alive` or `close` allocate nothing.
    let named: Vec<HeaderName> = if present[0] {
        headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|t| {
                !HOP_BY_HOP
                    .iter()
                    .any(|h| h.as_str().eq_ignore_ascii_case(t))
                    && headers.contains_key(*t)
            })
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect()
    } else {
        Vec::new()
    };
    for name in named {
        headers.remove(name);
    }
    let te_trailers = headers
        .get(header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for (name, _) in HOP_BY_HOP.iter().zip(present).filter(|(_, p)| *p) {
        headers.remove(name);
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Whether the message has no `Transfer-Encoding`, or one coding in all its
/// `Transfer-Encoding` lines: `chunked`. hyper undoes the chunked framing
/// once and nothing else, and the header is hop-by-hop, so a message with any
/// other coding (`gzip, chunked`) would be passed on with its body still in
/// that coding and nothing left naming it, and one chunked twice (`chunked,
/// chunked`, or in two lines) with its body still chunked.
pub fn only_chunked(headers: &HeaderMap) -> bool {
    let mut lines = headers.get_all(header::TRANSFER_ENCODING).iter().peekable();
    // Most messages have none: one lookup.
    if lines.peek().is_none() {
        return true;
    }
    let mut codings = lines
        .flat_map(|te| te.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|coding| !coding.is_empty());
    // A list with no coding at all (`Transfer-Encoding: ,`) is refused too.
    codings
        .next()
        .is_some_and(|coding| coding.eq_ignore_ascii_case(b"chunked"))
        && codings.next().is_none()
}

fn escape(value: &str, out: &mut String) -> Result<(), ()> {
    // Most values are printable ASCII with nothing to escape.
    if value
        .bytes()
        .all(|b| (0x20..0x7f).contains(&b) && !matches!(b, b';' | b'=' | b'\\'))
    {
        out.push_str(value);
        return Ok(());
    }
    for c in value.chars() {
        if c.is_control() {
            return Err(());
        }
        if matches!(c, ';' | '=' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    Ok(())
}

/// Whether a request asks for a WebSocket upgrade (the only upgrade spliced).
pub fn is_websocket<B>(req: &Request<B>) -> bool {
    let upgrade = req
        .headers()
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    let connection = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    upgrade && connection && req.version() == http::Version::HTTP_11
}

/// `Principal=…; PrincipalOrgID=…; SessionName=…; Type=…`, or `None` when a
/// value holds a control character.
pub fn lattice_identity(identity: &Identity) -> Option<String> {
    let mut out = String::with_capacity(128);
    let principal = match &identity.principal {
        Principal::Aws(p) => p.arn.clone(),
        Principal::Anonymous => String::new(),
        other => other.uid().1.into_owned(),
    };
    if !principal.is_empty() {
        out.push_str("Principal=");
        escape(&principal, &mut out).ok()?;
        out.push_str("; ");
    }
    if let Some(org) = identity.org_id() {
        out.push_str("PrincipalOrgID=");
        escape(org, &mut out).ok()?;
        out.push_str("; ");
    }
    if let Principal::Aws(p) = &identity.principal {
        if let Some(s) = &p.session_name {
            out.push_str("SessionName=");
            escape(s, &mut out).ok()?;
            out.push_str("; ");
        }
    }
    out.push_str("Type=");
    out.push_str(identity.principal.identity_type());
    Some(out)
}

#[derive(Debug, Clone, Copy)]
pub struct IdentityLayer {
    pub headers: IdentityHeaders,
}

impl<S> Layer<S> for IdentityLayer {
    type Service = AttachIdentity<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AttachIdentity {
            inner,
            headers: self.headers,
        }
    }
}

#[derive(Debug, Clone)]
pub struct AttachIdentity<S> {
    inner: S,
    headers: IdentityHeaders,
}

impl<S, B> Service<Request<B>> for AttachIdentity<S>
where
    S: Service<Request<B>, Response = http::Response<Body>, Error = ProxyError>,
{
    type Response = http::Response<Body>;
    type Error = ProxyError;
    type Future = Either<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let identity = match (self.headers, req.extensions().get::<Identity>()) {
            (IdentityHeaders::Lattice, Some(id)) => {
                match lattice_identity(id).and_then(|v| HeaderValue::try_from(v).ok()) {
                    Some(v) => Some(v),
                    None => {
                        return reject(ProxyError::unauthenticated(
                            id.method,
                            "identity",
                            "identity holds a control character",
                        ))
                    }
                }
            }
            _ => None,
        };
        let trace = req.extensions().get::<Arc<Trace>>().cloned();
        let websocket = is_websocket(&req);
        let headers = req.headers_mut();
        remove_hop_by_hop(headers);
        if websocket {
            // The one hop-by-hop exchange warden forwards: it splices the upgrade.
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        }
        if let Some(v) = identity {
            headers.insert(X_AMZN_LATTICE_IDENTITY, v);
        }
        if let Some(t) = trace {
            headers.insert(X_FORWARDED_FOR, t.conn.forwarded_for().clone());
            let proto = if t.conn.tls.is_some() {
                "https"
            } else {
                "http"
            };
            headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
            if let Ok(v) = HeaderValue::try_from(t.request_id.as_str()) {
                headers.insert(X_REQUEST_ID, v);
            }
        }
        futures_util::future::Either::Left(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authn::{AwsFacts, AwsPrincipal};

    /// The headers left after removing hop-by-hop ones from `pairs`.
    fn hop_stripped(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        remove_hop_by_hop(&mut h);
        h
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        // The second set: named in any case, beside names absent; `te:
        // trailers` stays even when `Connection` names it, as a client
        // sending TE must. Each leaves only `te: trailers` and `x-app`.
        let sets: [&[(&str, &str)]; 2] = [
            &[
                ("connection", "x-secret, keep-alive"),
                ("x-secret", "1"),
                ("keep-alive", "timeout=5"),
                ("te", "trailers"),
                ("upgrade", "foo"),
                ("x-app", "keep"),
            ],
            &[
                ("connection", "close, X-Secret"),
                ("connection", "te, x-absent,,"),
                ("x-secret", "1"),
                ("te", "trailers"),
                ("x-app", "keep"),
            ],
        ];
        for pairs in sets {
            let h = hop_stripped(pairs);
            assert_eq!(h.len(), 2, "{h:?}");
            assert_eq!(h["te"], "trailers");
            assert_eq!(h["x-app"], "keep");
        }
        // Each one alone is found and removed.
        for name in &HOP_BY_HOP {
            let h = hop_stripped(&[(name.as_str(), "x"), ("x-app", "keep")]);
            assert!(!h.contains_key(name), "{name} stayed");
            assert_eq!(h.len(), 1, "{h:?}");
        }
        // Any other `te` goes.
        let h = hop_stripped(&[("te", "gzip")]);
        assert!(h.is_empty(), "{h:?}");
    }

    #[test]
    fn chunked_once_is_the_only_transfer_coding() {
        let headers = |lines: &[&str]| {
            let mut h = HeaderMap::new();
            for line in lines {
                h.append(header::TRANSFER_ENCODING, line.parse().unwrap());
            }
            h
        };
        for ok in [
            &[][..],
            &["chunked"],
            &["Chunked"],
            &[" chunked ,"],
            &[",chunked"],
        ] {
            assert!(only_chunked(&headers(ok)), "{ok:?} refused");
        }
        let refused: [&[&str]; 7] = [
            &["chunked, chunked"],
            &["chunked", "chunked"],
            &["gzip, chunked"],
            &["identity", "chunked"],
            &["xchunked"],
            &[","],
            &[""],
        ];
        for bad in refused {
            assert!(!only_chunked(&headers(bad)), "{bad:?} accepted");
        }
    }

    #[test]
    fn lattice_identity_escapes_and_refuses_controls() {
        let mut id = Identity {
            principal: Principal::Aws(
                AwsPrincipal::from_arn("arn:aws:sts::123456789012:assumed-role/r/a;b=c\\d")
                    .unwrap(),
            ),
            method: "sigv4",
            aws: Some(AwsFacts {
                access_key_id: "AKID".into(),
                org_id: Some("o-abc".into()),
                tags: Default::default(),
                presigned: false,
            }),
            jwt: None,
        };
        assert_eq!(
            lattice_identity(&id).unwrap(),
            "Principal=arn:aws:iam::123456789012:role/r; PrincipalOrgID=o-abc; SessionName=a\\;b\\=c\\\\d; Type=AWS_IAM"
        );
        id.aws.as_mut().unwrap().org_id = Some("o-\n".into());
        assert!(lattice_identity(&id).is_none());
    }

    /// Splits an `x-amzn-lattice-identity` value back into its fields, the
    /// way its reader must: `; ` and `=` separate only where unescaped, and
    /// a value holds no unescaped `;`, `=` or `\`.
    fn unescape_fields(header: &str) -> Vec<(String, String)> {
        let mut fields = vec![(String::new(), None::<String>)];
        let mut chars = header.chars().peekable();
        while let Some(c) = chars.next() {
            let (key, value) = fields.last_mut().unwrap();
            match c {
                '\\' => {
                    let escaped = chars.next().expect("a lone backslash at the end");
                    value.as_mut().expect("an escape in a key").push(escaped);
                }
                ';' => {
                    assert_eq!(chars.next(), Some(' '), "{header:?}");
                    fields.push((String::new(), None));
                }
                '=' => {
                    assert!(value.is_none(), "an unescaped `=` in a value: {header:?}");
                    *value = Some(String::new());
                }
                c => value.as_mut().unwrap_or(key).push(c),
            }
        }
        fields
            .into_iter()
            .map(|(k, v)| (k, v.expect("a field with no `=`")))
            .collect()
    }

    /// Every subject of up to four characters from an alphabet of the
    /// separators, the escape, a space, a non-ASCII letter and controls: the
    /// header reads back as exactly the subject, or, with a control
    /// character in it, there is no header.
    #[test]
    fn the_identity_header_reads_back_as_the_principal() {
        let alphabet = [
            ';', '=', '\\', ' ', 'a', 'é', ':', '\u{1}', '\u{7f}', '\u{85}',
        ];
        let mut checked = 0;
        crate::testkit::for_every_string(&alphabet, 4, |sub| {
            let id = Identity {
                principal: Principal::Oidc {
                    sub: sub.to_owned(),
                    iss: "https://idp.example".into(),
                },
                method: "jwt",
                aws: None,
                jwt: None,
            };
            let Some(header) = lattice_identity(&id) else {
                assert!(sub.chars().any(char::is_control), "{sub:?} refused");
                return;
            };
            assert!(!sub.chars().any(char::is_control), "{sub:?} -> {header:?}");
            assert!(HeaderValue::from_str(&header).is_ok(), "{header:?}");
            assert_eq!(
                unescape_fields(&header),
                [
                    ("Principal".to_owned(), sub.to_owned()),
                    ("Type".to_owned(), "OIDC".to_owned())
                ],
                "{sub:?} -> {header:?}"
            );
            checked += 1;
        });
        assert!(checked > 2000, "{checked}");
    }

    /// An identity the header cannot carry is refused here, and the request
    /// goes no further; a representable one is forwarded with the header.
    #[tokio::test]
    async fn an_identity_the_header_cannot_carry_is_refused() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tower::ServiceExt;

        let forwarded = Arc::new(AtomicUsize::new(0));
        let seen = forwarded.clone();
        let upstream = tower::service_fn(move |req: Request<()>| {
            let seen = seen.clone();
            async move {
                assert!(req.headers().contains_key(LATTICE_IDENTITY));
                seen.fetch_add(1, Ordering::SeqCst);
                Ok::<_, ProxyError>(http::Response::new(crate::body::empty()))
            }
        });
        let svc = IdentityLayer {
            headers: IdentityHeaders::Lattice,
        }
        .layer(upstream);
        let request = |sub: &str| {
            let mut req = Request::new(());
            req.extensions_mut().insert(Identity {
                principal: Principal::Oidc {
                    sub: sub.into(),
                    iss: "https://idp.example".into(),
                },
                method: "jwt",
                aws: None,
                jwt: None,
            });
            req
        };
        let rsp = svc.clone().oneshot(request("alice")).await.unwrap();
        assert_eq!(rsp.status(), 200);
        assert_eq!(forwarded.load(Ordering::SeqCst), 1);
        for sub in ["al\u{7}ice", "line\nbreak", "del\u{7f}", "c1\u{85}"] {
            let err = svc.clone().oneshot(request(sub)).await.unwrap_err();
            assert_eq!(err.status(), 401, "{sub:?}");
            assert_eq!(err.reason(), Some("identity holds a control character"));
        }
        assert_eq!(
            forwarded.load(Ordering::SeqCst),
            1,
            "a refused request was forwarded"
        );
    }
}
