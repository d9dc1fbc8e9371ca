//! Step 1: reject malformed requests and normalize the path.
//!
//! Runs before authentication. The normalized path is what Cedar decides on
//! and what the upstream receives; the raw request-target is kept aside for
//! SigV4, which signs what the client sent.

use std::task::{Context, Poll};

use http::{header, Method, Request, Response, Uri, Version};
use tower::{Layer, Service};

use crate::body::Body;
use crate::error::ProxyError;
use crate::trace::RawTarget;

/// Why a path was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path must start with `/`")]
    NotAbsolute,
    #[error("malformed percent-encoding in path")]
    BadEscape,
    #[error("encoded slash or backslash in path")]
    EncodedSeparator,
    #[error("control character or NUL in path")]
    Control,
    #[error("non-ASCII byte in path (percent-encode it)")]
    NonAscii,
    #[error("fragment or `;` path parameter in path")]
    Params,
    #[error("backslash in path")]
    Backslash,
    #[error("path climbs above `/`")]
    AboveRoot,
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Normalizes a request path per DESIGN §6: decode unreserved escapes, remove
/// dot segments, merge slashes; refuse what could be read two ways.
pub fn normalize_path(raw: &str) -> Result<String, PathError> {
    if is_normal(raw) {
        return Ok(raw.to_owned());
    }
    rebuild(raw)
}

/// Whether `raw` is already its own normal form, as most paths are: absolute,
/// printable ASCII with nothing to decode or refuse, and no empty or dot
/// segment except a last empty one (a trailing `/`). One pass, no allocation.
fn is_normal(raw: &str) -> bool {
    let Some(rest) = raw.strip_prefix('/') else {
        return false;
    };
    let plain = |b: &u8| (0x20..0x7f).contains(b) && !matches!(b, b'%' | b';' | b'#' | b'\\');
    let mut segments = rest.as_bytes().split(|&b| b == b'/').peekable();
    while let Some(seg) = segments.next() {
        let last = segments.peek().is_none();
        if (seg.is_empty() && !last) || seg == b"." || seg == b".." || !seg.iter().all(plain) {
            return false;
        }
    }
    true
}

/// [`normalize_path`] the long way: decode, split, rebuild.
fn rebuild(raw: &str) -> Result<String, PathError> {
    let bytes = raw.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    // Pass 1: decode unreserved escapes, upper-case the rest, refuse the dangerous ones.
    let mut decoded = String::with_capacity(raw.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'%' => {
                let (h, l) = match (
                    bytes.get(i + 1).and_then(|&c| hex(c)),
                    bytes.get(i + 2).and_then(|&c| hex(c)),
                ) {
                    (Some(h), Some(l)) => (h, l),
                    _ => return Err(PathError::BadEscape),
                };
                let v = h << 4 | l;
                if unreserved(v) {
                    decoded.push(v as char);
                } else if v == b'/' || v == b'\\' {
                    return Err(PathError::EncodedSeparator);
                } else if v < 0x20 || v == 0x7f {
                    return Err(PathError::Control);
                } else if v == b';' || v == b'#' {
                    return Err(PathError::Params);
                } else {
                    decoded.push('%');
                    decoded.push(char::from(b"0123456789ABCDEF"[usize::from(h)]));
                    decoded.push(char::from(b"0123456789ABCDEF"[usize::from(l)]));
                }
                i += 3;
                continue;
            }
            b';' | b'#' => return Err(PathError::Params),
            b'\\' => return Err(PathError::Backslash),
            _ if b < 0x20 || b == 0x7f => return Err(PathError::Control),
            // A parsed `Uri` never holds one; a path from the command line
            // (`warden authorize`, `warden policy test`) might, and is
            // refused as the proxy would refuse it.
            _ if !b.is_ascii() => return Err(PathError::NonAscii),
            _ => {}
        }
        decoded.push(char::from(b));
        i += 1;
    }
    // Pass 2: dot segments and empty segments.
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = decoded.split('/').collect();
    let last = segments.len().saturating_sub(1);
    let mut trailing_slash = false;
    for (idx, seg) in segments.iter().enumerate().skip(1) {
        match *seg {
            "" => trailing_slash = idx == last,
            "." => trailing_slash = true,
            ".." => {
                if out.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
                trailing_slash = true;
            }
            s => {
                out.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut path = String::with_capacity(decoded.len());
    for seg in &out {
        path.push('/');
        path.push_str(seg);
    }
    if out.is_empty() || trailing_slash {
        path.push('/');
    }
    Ok(path)
}

/// A request head's size as `runtime.max_header_bytes` counts it.
///
/// HTTP/1.1: the request line and header lines as sent, less optional
/// whitespace. HTTP/2: the header list as SETTINGS_MAX_HEADER_LIST_SIZE
/// counts it (RFC 9113 §6.5.2), each field's name and value plus 32, the
/// pseudo-header fields included.
fn head_size<B>(req: &Request<B>) -> usize {
    let uri = req.uri();
    let method = req.method().as_str().len();
    let scheme = uri.scheme_str().map_or(0, str::len);
    let authority = uri.authority().map_or(0, |a| a.as_str().len());
    let target = uri.path_and_query().map_or(0, |pq| pq.as_str().len());
    let fields = req.headers().iter();
    if req.version() == Version::HTTP_2 {
        let pseudo = (":method".len() + method + 32)
            + (":scheme".len() + scheme + 32)
            + (":authority".len() + authority + 32)
            + (":path".len() + target + 32);
        pseudo
            + fields
                .map(|(k, v)| k.as_str().len() + v.len() + 32)
                .sum::<usize>()
    } else {
        // `GET http://host/x HTTP/1.1\r\n`, each `name: value\r\n`, the blank line.
        let absolute = if scheme > 0 { scheme + "://".len() } else { 0 } + authority;
        method
            + 1
            + absolute
            + target
            + " HTTP/1.1\r\n".len()
            + fields
                .map(|(k, v)| k.as_str().len() + 2 + v.len() + 2)
                .sum::<usize>()
            + 2
    }
}

/// Refuses request shapes warden never forwards.
fn check_shape<B>(req: &Request<B>, max_head: usize) -> Result<(), ProxyError> {
    if head_size(req) > max_head {
        return Err(ProxyError::HeadersTooLarge);
    }
    if req.method() == Method::CONNECT {
        return Err(ProxyError::bad_request("CONNECT is not supported"));
    }
    for up in req.headers().get_all(header::UPGRADE) {
        let v = up.to_str().unwrap_or("");
        if !v.trim().eq_ignore_ascii_case("websocket") {
            return Err(ProxyError::bad_request(
                "only `Upgrade: websocket` is supported",
            ));
        }
    }
    // hyper refuses a list not ending in `chunked`; this, every other coding
    // and `chunked` applied twice.
    if !crate::identity::only_chunked(req.headers()) {
        return Err(ProxyError::bad_request(
            "unsupported transfer coding: only `chunked`, once, is accepted",
        ));
    }
    if req.headers().contains_key("http2-settings") {
        return Err(ProxyError::bad_request("h2c upgrade is not supported"));
    }
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(ProxyError::bad_request("more than one Host header"));
    }
    // RFC 9112 §3.2: an HTTP/1.1 request names its host (HTTP/1.0 may not;
    // HTTP/2 names it in `:authority`, which lands in the target).
    if host.is_none() && req.version() == Version::HTTP_11 && req.uri().authority().is_none() {
        return Err(ProxyError::bad_request(
            "HTTP/1.1 request without a Host header",
        ));
    }
    // An absolute-form target must name the same host as `Host`, so routing,
    // policies and the upstream all see one host.
    if let (Some(authority), Some(host)) = (req.uri().authority(), host) {
        if !host
            .as_bytes()
            .eq_ignore_ascii_case(authority.as_str().as_bytes())
        {
            return Err(ProxyError::bad_request(
                "request target and Host name different hosts",
            ));
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Copy)]
pub struct NormalizeLayer {
    /// `runtime.max_header_bytes`: a larger head is refused with 431.
    pub max_head: usize,
}

impl<S> Layer<S> for NormalizeLayer {
    type Service = Normalize<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Normalize {
            inner,
            max_head: self.max_head,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Normalize<S> {
    inner: S,
    max_head: usize,
}

impl<S> Service<Request<Body>> for Normalize<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = ProxyError> + Send,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = ProxyError;
    type Future = crate::error::Either<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let reject = crate::error::reject::<S::Future>;
        if let Err(e) = check_shape(&req, self.max_head) {
            return reject(e);
        }
        let raw = RawTarget {
            path: req.uri().path().to_owned(),
            query: req.uri().query().map(str::to_owned),
        };
        let path = match normalize_path(&raw.path) {
            Ok(p) => p,
            Err(e) => return reject(ProxyError::bad_request(e.to_string())),
        };
        if path == raw.path {
            // Already normal: the request-target stands as it came.
            req.extensions_mut().insert(raw);
            return futures_util::future::Either::Left(self.inner.call(req));
        }
        let pq = match &raw.query {
            Some(q) => format!("{path}?{q}"),
            None => path,
        };
        let mut parts = req.uri().clone().into_parts();
        parts.path_and_query = match pq.parse() {
            Ok(pq) => Some(pq),
            Err(_) => return reject(ProxyError::bad_request("malformed request target")),
        };
        match Uri::from_parts(parts) {
            Ok(uri) => *req.uri_mut() = uri,
            Err(_) => return reject(ProxyError::bad_request("malformed request target")),
        }
        req.extensions_mut().insert(raw);
        futures_util::future::Either::Left(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_size_counts_the_head_as_sent() {
        let req = Request::get("/a/b?c=d")
            .header("host", "orders")
            .header("x-one", "1")
            .header("x-one", "22")
            .body(())
            .unwrap();
        let sent = "GET /a/b?c=d HTTP/1.1\r\nhost: orders\r\nx-one: 1\r\nx-one: 22\r\n\r\n";
        assert_eq!(head_size(&req), sent.len());
        let absolute = Request::get("http://orders/a").body(()).unwrap();
        assert_eq!(
            head_size(&absolute),
            "GET http://orders/a HTTP/1.1\r\n\r\n".len()
        );
        // RFC 9113 §6.5.2: name + value + 32 for each field, pseudo-headers too.
        let h2 = Request::get("https://orders/a")
            .version(Version::HTTP_2)
            .header("x-one", "1")
            .body(())
            .unwrap();
        let fields = [
            (":method", "GET"),
            (":scheme", "https"),
            (":authority", "orders"),
            (":path", "/a"),
            ("x-one", "1"),
        ];
        let size: usize = fields.iter().map(|(k, v)| k.len() + v.len() + 32).sum();
        assert_eq!(head_size(&h2), size);
    }

    #[test]
    fn a_head_over_the_limit_is_refused() {
        let req = Request::get("/a")
            .header("host", "orders")
            .body(())
            .unwrap();
        let size = head_size(&req);
        assert!(check_shape(&req, size).is_ok());
        assert!(matches!(
            check_shape(&req, size - 1),
            Err(ProxyError::HeadersTooLarge)
        ));
    }

    #[test]
    fn normalizes() {
        let cases = [
            ("/", "/"),
            ("/a/b", "/a/b"),
            ("/a/b/", "/a/b/"),
            ("//a///b", "/a/b"),
            ("/a/./b", "/a/b"),
            ("/a/b/..", "/a/"),
            ("/a/b/../c", "/a/c"),
            ("/a/%2e%2e/b", "/b"),
            ("/%61pi", "/api"),
            ("/a%20b", "/a%20b"),
            ("/a%2cb", "/a%2Cb"),
            ("/a/.", "/a/"),
            ("/..a/b", "/..a/b"),
        ];
        for (raw, want) in cases {
            assert_eq!(normalize_path(raw).as_deref(), Ok(want), "{raw}");
        }
    }

    #[test]
    fn rejects() {
        let cases = [
            ("/a/../../b", PathError::AboveRoot),
            ("/..", PathError::AboveRoot),
            ("/%2e%2e/x", PathError::AboveRoot),
            ("/a%2Fb", PathError::EncodedSeparator),
            ("/a%2fb", PathError::EncodedSeparator),
            ("/a%5Cb", PathError::EncodedSeparator),
            ("/a%00", PathError::Control),
            ("/a%0a", PathError::Control),
            ("/a;b=c", PathError::Params),
            ("/a%3bb", PathError::Params),
            ("/a%23b", PathError::Params),
            ("/a\\b", PathError::Backslash),
            ("/caf\u{e9}", PathError::NonAscii),
            ("/a%zz", PathError::BadEscape),
            ("/a%4", PathError::BadEscape),
            ("a", PathError::NotAbsolute),
            ("*", PathError::NotAbsolute),
        ];
        for (raw, want) in cases {
            assert_eq!(normalize_path(raw), Err(want), "{raw}");
        }
    }

    /// The shortcut for paths already normal answers exactly as the full
    /// rebuild does, on every path of up to six characters from an alphabet
    /// that reaches each rule.
    #[test]
    fn the_shortcut_agrees_with_the_rebuild() {
        let alphabet = ['/', '.', 'a', '%', '2', 'e', ';', '\\', '\u{1}', 'é'];
        let mut shortcut = 0;
        crate::testkit::for_every_string(&alphabet, 6, |p| {
            let got = normalize_path(p);
            assert_eq!(got, rebuild(p), "{p:?}");
            shortcut += usize::from(is_normal(p));
            // What the authorizer and the upstream see is in normal form:
            // normalizing it again changes nothing (no second decoding),
            // and it holds no empty or dot segment.
            if let Ok(n) = got {
                assert_eq!(normalize_path(&n).as_deref(), Ok(n.as_str()), "{p:?}");
                assert!(n.starts_with('/'), "{p:?} -> {n:?}");
                assert!(crate::testkit::segments_are_normal(&n), "{p:?} -> {n:?}");
            }
        });
        // It is taken, and not for everything.
        assert!(shortcut > 1000, "{shortcut}");
        assert!(
            !is_normal("/a//b") && !is_normal("/a/./b") && !is_normal("/a/..") && !is_normal("a")
        );
        assert!(
            is_normal("/")
                && is_normal("/api/orders/1")
                && is_normal("/a/b/")
                && is_normal("/..a/.b")
        );
    }
}
