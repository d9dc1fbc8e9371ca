//! Step 2: remove headers a client could use to impersonate warden.
//!
//! Runs before authentication, so nothing downstream (policies, the upstream)
//! ever sees a client-supplied identity or forwarding header. warden sets its
//! own later; it never appends to a client's.

use std::task::{Context, Poll};

use http::{HeaderMap, Request};
use tower::{Layer, Service};

/// Whether `name` (lowercase) is one a client may never send through.
pub fn is_spoofable(name: &str) -> bool {
    name.starts_with("x-amzn-lattice-")
        || name.starts_with("x-warden-")
        || name.starts_with("x-forwarded-")
        || name == "forwarded"
        || name == "x-real-ip"
}

/// Removes every spoofable header.
pub fn strip_spoofable(headers: &mut HeaderMap) {
    let names: Vec<_> = headers
        .keys()
        .filter(|n| is_spoofable(n.as_str()))
        .cloned()
        .collect();
    for name in names {
        headers.remove(&name);
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct StripLayer;

impl<S> Layer<S> for StripLayer {
    type Service = Strip<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Strip { inner }
    }
}

#[derive(Debug, Clone)]
pub struct Strip<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for Strip<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> S::Future {
        strip_spoofable(req.headers_mut());
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_identity_and_forwarding_headers() {
        let mut h = HeaderMap::new();
        for name in [
            "x-amzn-lattice-identity",
            "x-amzn-lattice-network",
            "x-warden-principal",
            "x-forwarded-for",
            "x-forwarded-client-cert",
            "forwarded",
            "x-real-ip",
        ] {
            h.append(name, "spoof".parse().unwrap());
        }
        h.append("x-forwarded-for", "again".parse().unwrap());
        h.insert("x-app", "keep".parse().unwrap());
        strip_spoofable(&mut h);
        assert_eq!(h.len(), 1);
        assert_eq!(h["x-app"], "keep");
    }
}
