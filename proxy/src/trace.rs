//! Per-connection facts and the per-request trace the decision log reads.
//!
//! The trace is created by the outermost layer and travels in the request's
//! extensions; each later step records what it learned exactly once.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use http::HeaderValue;

/// What the listener learned about a connection, shared by its requests.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// Private, so that `forwarded_for` always says the same address.
    peer: SocketAddr,
    pub local: SocketAddr,
    pub tls: Option<TlsInfo>,
    /// The peer's address as the `x-forwarded-for` value: written once per
    /// connection, not per request.
    forwarded_for: HeaderValue,
    /// What the connection holds from the listener (its slot under
    /// `max_connections`, its count in `warden_connections_active`, the
    /// drain's wait), kept until the last holder of these facts goes: the
    /// connection's task, its requests, or a WebSocket spliced from it.
    _held: Option<Arc<dyn std::any::Any + Send + Sync>>,
}

impl ConnInfo {
    pub fn new(peer: SocketAddr, local: SocketAddr, tls: Option<TlsInfo>) -> Self {
        // An address's text is always a valid header value.
        let forwarded_for =
            HeaderValue::try_from(peer.ip().to_string()).unwrap_or(HeaderValue::from_static(""));
        Self {
            peer,
            local,
            tls,
            forwarded_for,
            _held: None,
        }
    }

    /// Keeps `held` for as long as these facts are held.
    pub fn holding(self, held: impl std::any::Any + Send + Sync) -> Self {
        Self {
            _held: Some(Arc::new(held)),
            ..self
        }
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    pub fn forwarded_for(&self) -> &HeaderValue {
        &self.forwarded_for
    }
}

/// The verified TLS session of a connection.
#[derive(Debug, Clone)]
pub struct TlsInfo {
    /// `"TLSv1.3"` or `"TLSv1.2"`.
    pub version: &'static str,
    /// The peer's verified client certificate: its SPIFFE ID or why it has none usable.
    pub peer: Option<PeerCert>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerCert {
    Spiffe(crate::authn::mtls::SpiffeId),
    /// A verified certificate without a usable SPIFFE ID, with the reason.
    NoSpiffe(&'static str),
}

/// The request-target as the client sent it, before normalization.
#[derive(Debug, Clone)]
pub struct RawTarget {
    pub path: String,
    pub query: Option<String>,
}

/// What the authorizer said; shared, so a cached decision is cloned cheaply.
#[derive(Debug, Clone)]
pub struct Decision {
    pub allow: bool,
    pub policies: Arc<[String]>,
    /// Policies that failed to evaluate (and so did not apply), with why.
    pub errors: Arc<[String]>,
    pub policy_set: Arc<str>,
}

/// Facts about one request, filled in as it moves through the pipeline.
#[derive(Debug)]
pub struct Trace {
    pub request_id: String,
    pub start: Instant,
    pub conn: Arc<ConnInfo>,
    pub grpc: bool,
    pub authn: OnceLock<&'static str>,
    pub principal: OnceLock<String>,
    pub action: OnceLock<String>,
    pub resource: OnceLock<String>,
    pub decision: OnceLock<Decision>,
    /// What the shadow policy set said (never enforced).
    pub shadow: OnceLock<Decision>,
}

impl Trace {
    pub fn new(request_id: String, conn: Arc<ConnInfo>, grpc: bool) -> Self {
        Self {
            request_id,
            start: Instant::now(),
            conn,
            grpc,
            authn: OnceLock::new(),
            principal: OnceLock::new(),
            action: OnceLock::new(),
            resource: OnceLock::new(),
            decision: OnceLock::new(),
            shadow: OnceLock::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_forwarded_for_value_is_the_peer_address() {
        for peer in [
            "10.1.2.3:40000",
            "[::1]:1",
            "[2001:db8:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
            "[::ffff:255.255.255.255]:9",
        ] {
            let peer: SocketAddr = peer.parse().expect("addr");
            let conn = ConnInfo::new(peer, peer, None);
            assert_eq!(conn.forwarded_for(), peer.ip().to_string().as_str());
            assert_eq!(conn.peer(), peer);
        }
    }
}
