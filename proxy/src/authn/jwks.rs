//! Key sets for JWT issuers: parsed from a file, or fetched from `jwks_uri` /
//! OIDC discovery and kept fresh in the background.
//!
//! The request path only reads the current set (an `ArcSwap`). An unknown
//! `kid` asks the refresher for one refetch per cool-down (only those fetches
//! count toward it) and waits up to 2 s for the result. A failed refresh keeps
//! the last good set; an issuer that never had keys retries with exponential
//! backoff capped at 10 s.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::{header, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};

use crate::config::{check_fetch_url, JwtIssuerConfig, KeySourceKind};
use crate::metrics::{IssuerLabels, Metrics};

/// How long a request waits for a kid-triggered refetch.
pub const KID_WAIT: Duration = Duration::from_secs(2);
/// Largest key set or discovery document accepted.
const MAX_DOCUMENT: usize = 1 << 20;
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// One verification key and the algorithms it may be used with.
pub struct Key {
    pub key: DecodingKey,
    pub algs: Vec<Algorithm>,
}

/// An immutable, parsed key set.
pub struct KeySet {
    keys: HashMap<String, Key>,
    /// Keys without a `kid`, usable only when the set has exactly one key.
    anonymous: Vec<Key>,
    pub generation: u64,
    pub fetched_at: SystemTime,
}

fn is_hmac(alg: Algorithm) -> bool {
    matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
}

/// The algorithms a JWK may verify: its `alg`, else those its type implies.
fn key_algs(jwk: &Jwk) -> Result<Vec<Algorithm>, String> {
    if let Some(ka) = &jwk.common.key_algorithm {
        let alg: Algorithm = format!("{ka:?}")
            .parse()
            .map_err(|_| format!("unsupported key algorithm `{ka:?}`"))?;
        return Ok(vec![alg]);
    }
    use Algorithm::*;
    match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Ok(vec![RS256, RS384, RS512, PS256, PS384, PS512]),
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => Ok(vec![ES256]),
            EllipticCurve::P384 => Ok(vec![ES384]),
            _ => Err("unsupported elliptic curve".to_owned()),
        },
        AlgorithmParameters::OctetKeyPair(_) => Ok(vec![EdDSA]),
        AlgorithmParameters::OctetKey(_) => Err("symmetric keys are never accepted".to_owned()),
        _ => Err("unsupported key type".to_owned()),
    }
}

impl KeySet {
    /// Parses a JWKS document, keeping the keys usable with `allowed`. Keys
    /// for encryption or of unsupported types are skipped; a set with no
    /// usable key is an error.
    pub fn parse(jwks: &[u8], allowed: &[Algorithm], generation: u64) -> Result<Self, String> {
        let set: JwkSet = serde_json::from_slice(jwks).map_err(|e| format!("invalid JWKS: {e}"))?;
        let mut keys = HashMap::new();
        let mut anonymous = Vec::new();
        let mut skipped = Vec::new();
        for jwk in &set.keys {
            if matches!(
                jwk.common.public_key_use,
                Some(jsonwebtoken::jwk::PublicKeyUse::Encryption)
            ) {
                continue;
            }
            let algs: Vec<Algorithm> = match key_algs(jwk) {
                Ok(a) => a
                    .into_iter()
                    .filter(|a| !is_hmac(*a) && allowed.contains(a))
                    .collect(),
                Err(e) => {
                    skipped.push(e);
                    continue;
                }
            };
            if algs.is_empty() {
                continue;
            }
            let key = match DecodingKey::from_jwk(jwk) {
                Ok(k) => k,
                Err(e) => {
                    skipped.push(format!("invalid JWK: {e}"));
                    continue;
                }
            };
            match &jwk.common.key_id {
                Some(kid) => {
                    keys.insert(kid.clone(), Key { key, algs });
                }
                None => anonymous.push(Key { key, algs }),
            }
        }
        if keys.is_empty() && anonymous.is_empty() {
            let why = skipped
                .first()
                .map(|s| format!(" ({s})"))
                .unwrap_or_default();
            return Err(format!(
                "JWKS has no usable key for the allowed algorithms{why}"
            ));
        }
        Ok(Self {
            keys,
            anonymous,
            generation,
            fetched_at: SystemTime::now(),
        })
    }

    /// The key for `kid` (a `kid`-less token needs a one-key set).
    pub fn get(&self, kid: Option<&str>) -> Option<&Key> {
        match kid {
            Some(kid) => self.keys.get(kid),
            None => match (self.keys.len(), self.anonymous.as_slice()) {
                (0, [only]) => Some(only),
                (1, []) => self.keys.values().next(),
                _ => None,
            },
        }
    }
}

/// The current key set of one issuer, and the way to ask for a fresh one.
pub struct KeySource {
    pub issuer: String,
    keys: ArcSwapOption<KeySet>,
    remote: bool,
    cooldown: Duration,
    /// Milliseconds since the epoch of the last kid-triggered refetch (0 = never).
    last_kid_fetch: AtomicU64,
    wake: Arc<Notify>,
    /// Completed fetch attempts, successful or not.
    attempts: watch::Sender<u64>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or_default()
}

impl KeySource {
    fn new(issuer: &str, remote: bool, cooldown: Duration, initial: Option<KeySet>) -> Self {
        Self {
            issuer: issuer.to_owned(),
            keys: ArcSwapOption::new(initial.map(Arc::new)),
            remote,
            cooldown,
            last_kid_fetch: AtomicU64::new(0),
            wake: Arc::new(Notify::new()),
            attempts: watch::channel(0).0,
        }
    }

    /// A source whose keys come from a file, loaded now.
    pub fn from_file(
        cfg: &JwtIssuerConfig,
        path: &Path,
        allowed: &[Algorithm],
    ) -> Result<Self, String> {
        let text = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::from_document(cfg, &text, allowed).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// A fixed source from a JWKS document.
    pub fn from_document(
        cfg: &JwtIssuerConfig,
        jwks: &[u8],
        allowed: &[Algorithm],
    ) -> Result<Self, String> {
        let set = KeySet::parse(jwks, allowed, 1)?;
        Ok(Self::new(&cfg.issuer, false, cfg.kid_cooldown, Some(set)))
    }

    /// A source fetched by a refresher; empty until the first fetch succeeds.
    pub fn remote(cfg: &JwtIssuerConfig) -> Self {
        Self::new(&cfg.issuer, true, cfg.kid_cooldown, None)
    }

    pub fn current(&self) -> Option<Arc<KeySet>> {
        self.keys.load_full()
    }

    pub fn is_remote(&self) -> bool {
        self.remote
    }

    fn publish(&self, set: KeySet) {
        self.keys.store(Some(Arc::new(set)));
    }

    fn attempt_done(&self) {
        self.attempts.send_modify(|n| *n += 1);
    }

    /// Called for an unknown `kid`: asks for one refetch if the cool-down
    /// allows, then waits up to [`KID_WAIT`] for the next fetch to finish.
    /// Returns the newest set (which may still lack the kid).
    pub async fn refetch_for_unknown_kid(&self) -> Option<Arc<KeySet>> {
        if !self.remote {
            return None;
        }
        let mut rx = self.attempts.subscribe();
        let before = *rx.borrow_and_update();
        let now = now_ms();
        let last = self.last_kid_fetch.load(Ordering::Acquire);
        let cooldown = u64::try_from(self.cooldown.as_millis()).unwrap_or(u64::MAX);
        let due = last == 0 || now.saturating_sub(last) >= cooldown;
        if !due
            || self
                .last_kid_fetch
                .compare_exchange(last, now.max(1), Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            // Someone else triggered (or the cool-down holds): use what is there.
            return self.current();
        }
        self.wake.notify_one();
        let _ = tokio::time::timeout(KID_WAIT, rx.wait_for(|n| *n > before)).await;
        self.current()
    }
}

/// Fetches JSON documents over HTTPS (or HTTP to loopback).
#[derive(Clone)]
pub struct Fetcher {
    tls: Arc<rustls::ClientConfig>,
}

impl Fetcher {
    /// Trusts `ca_file` if given, else the Mozilla roots.
    pub fn new(ca_file: Option<&Path>) -> Result<Self, String> {
        let mut roots = rustls::RootCertStore::empty();
        match ca_file {
            Some(path) => {
                for cert in CertificateDer::pem_file_iter(path)
                    .map_err(|e| format!("{}: {e}", path.display()))?
                {
                    let cert = cert.map_err(|e| format!("{}: {e}", path.display()))?;
                    roots
                        .add(cert)
                        .map_err(|e| format!("{}: {e}", path.display()))?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("tls: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self { tls: Arc::new(tls) })
    }

    /// GETs `url`; returns the body and the `cache-control: max-age`, if any.
    pub async fn get(&self, url: &str) -> Result<(Bytes, Option<Duration>), String> {
        check_fetch_url(url)?;
        let uri: Uri = url.parse().map_err(|_| format!("`{url}` is not a URL"))?;
        let authority = uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .unwrap_or_default();
        let (status, headers, body) = tokio::time::timeout(
            FETCH_TIMEOUT,
            self.request(
                &uri,
                &authority,
                &[("accept", "application/json")],
                MAX_DOCUMENT,
            ),
        )
        .await
        .map_err(|_| format!("`{url}`: timed out"))??;
        if status != StatusCode::OK {
            return Err(format!("`{url}`: status {status}"));
        }
        let max_age = headers
            .get(header::CACHE_CONTROL)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_max_age);
        Ok((body, max_age))
    }

    /// One GET to `uri`'s host and port with the given `host` header and
    /// extra headers, on a connection of its own; never follows redirects;
    /// reads at most `max` bytes.
    pub async fn request(
        &self,
        uri: &Uri,
        host: &str,
        extra: &[(&str, &str)],
        max: usize,
    ) -> Result<(StatusCode, http::HeaderMap, Bytes), String> {
        let mut conn = self.connect(uri).await?;
        Self::send(&mut conn, uri, host, extra, max).await
    }

    /// Opens an HTTP/1.1 connection to `uri`'s host and port (TLS for
    /// `https`, verified for that host).
    pub async fn connect(&self, uri: &Uri) -> Result<Connection, String> {
        let url = uri.to_string();
        let target = uri.host().ok_or_else(|| format!("`{url}` has no host"))?;
        let https = uri.scheme_str() == Some("https");
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let bare = target
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let tcp = TcpStream::connect((bare.as_str(), port))
            .await
            .map_err(|e| format!("`{url}`: {e}"))?;
        let _ = tcp.set_nodelay(true);
        if https {
            let name = ServerName::try_from(bare).map_err(|e| format!("`{url}`: {e}"))?;
            let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| format!("`{url}`: {e}"))?;
            handshake(TokioIo::new(tls)).await
        } else {
            handshake(TokioIo::new(tcp)).await
        }
        .map_err(|e| format!("`{url}`: {e}"))
    }

    /// One GET for `uri`'s path and query on `conn`, with the given `host`
    /// header and extra headers; reads at most `max` bytes of the answer.
    pub async fn send(
        conn: &mut Connection,
        uri: &Uri,
        host: &str,
        extra: &[(&str, &str)],
        max: usize,
    ) -> Result<(StatusCode, http::HeaderMap, Bytes), String> {
        let url = uri.to_string();
        let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
        let mut req = Request::get(path).header(header::HOST, host);
        for (k, v) in extra {
            req = req.header(*k, *v);
        }
        let req = req
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("`{url}`: {e}"))?;
        conn.ready().await.map_err(|e| format!("`{url}`: {e}"))?;
        let rsp = conn
            .send_request(req)
            .await
            .map_err(|e| format!("`{url}`: {e}"))?;
        let (parts, body) = rsp.into_parts();
        let body = Limited::new(body, max)
            .collect()
            .await
            .map_err(|e| format!("`{url}`: {e}"))?
            .to_bytes();
        Ok((parts.status, parts.headers, body))
    }
}

/// An HTTP/1.1 client connection a [`Fetcher`] opened; its I/O runs on a
/// task of its own until it closes or every handle to it is dropped.
pub type Connection = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn handshake<IO>(io: TokioIo<IO>) -> Result<Connection, hyper::Error>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (tx, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(conn);
    Ok(tx)
}

/// `max-age=N` from a `cache-control` value.
pub fn parse_max_age(v: &str) -> Option<Duration> {
    v.split(',')
        .filter_map(|d| d.trim().strip_prefix("max-age="))
        .find_map(|n| n.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

#[derive(serde::Deserialize)]
struct Discovery {
    jwks_uri: String,
}

/// Fetches an issuer's key set document (via discovery when no `jwks_uri`).
async fn fetch_document(
    cfg: &JwtIssuerConfig,
    fetcher: &Fetcher,
) -> Result<(Bytes, Option<Duration>), String> {
    match cfg.key_source() {
        KeySourceKind::Uri(u) => fetcher.get(u).await,
        KeySourceKind::Discovery => {
            let url = format!(
                "{}/.well-known/openid-configuration",
                cfg.issuer.trim_end_matches('/')
            );
            let (doc, _) = fetcher.get(&url).await?;
            let d: Discovery = serde_json::from_slice(&doc)
                .map_err(|e| format!("`{url}`: invalid discovery document: {e}"))?;
            fetcher.get(&d.jwks_uri).await
        }
        KeySourceKind::File(p) => Err(format!("{}: not a remote key set", p.display())),
    }
}

/// Keeps one remote source fresh until the source is dropped.
pub async fn refresh(
    source: Weak<KeySource>,
    cfg: JwtIssuerConfig,
    allowed: Vec<Algorithm>,
    fetcher: Fetcher,
    metrics: Arc<Metrics>,
) {
    let mut backoff = Duration::from_millis(250);
    let mut generation = 0u64;
    let Some(wake) = source.upgrade().map(|s| s.wake.clone()) else {
        return;
    };
    loop {
        let result = fetch_document(&cfg, &fetcher)
            .await
            .and_then(|(doc, max_age)| {
                KeySet::parse(&doc, &allowed, generation + 1).map(|set| (set, max_age))
            });
        let Some(src) = source.upgrade() else { return };
        let label = |result| IssuerLabels {
            issuer: cfg.issuer.clone(),
            result,
        };
        let wait = match result {
            Ok((set, max_age)) => {
                generation += 1;
                metrics.jwks_refresh.get_or_create(&label("ok")).inc();
                tracing::info!(issuer = %cfg.issuer, keys = set.keys.len() + set.anonymous.len(), "key set refreshed");
                src.publish(set);
                backoff = Duration::from_millis(250);
                max_age
                    .unwrap_or(cfg.refresh_interval)
                    .min(cfg.refresh_interval)
                    .max(Duration::from_secs(1))
            }
            Err(e) => {
                metrics.jwks_refresh.get_or_create(&label("error")).inc();
                tracing::warn!(issuer = %cfg.issuer, error = %e, "key set refresh failed; keeping the last good set");
                let wait = if src.current().is_none() {
                    backoff
                } else {
                    backoff.max(Duration::from_secs(1))
                };
                backoff = (backoff * 2).min(MAX_BACKOFF);
                wait
            }
        };
        // After publishing, so a woken waiter sees the new set.
        src.attempt_done();
        drop(src);
        tokio::select! {
            () = tokio::time::sleep(wait) => {},
            () = wake.notified() => {},
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_age() {
        assert_eq!(
            parse_max_age("public, max-age=300"),
            Some(Duration::from_secs(300))
        );
        assert_eq!(parse_max_age("no-store"), None);
    }

    #[test]
    fn symmetric_and_unusable_keys_are_skipped() {
        let jwks = br#"{"keys":[{"kty":"oct","k":"c2VjcmV0","kid":"h"}]}"#;
        assert!(KeySet::parse(jwks, &[Algorithm::RS256], 1).is_err());
        let jwks = br#"{"keys":[{"kty":"EC","crv":"P-256","kid":"e","x":"WKn-ZIGevcwGIyyrzFoZNBdaq9_TsqzGl96oc0CWuis","y":"y77t-RvAHRKTsSGdIYUfweuOvwrvDD-Q3Hv5J0fSKbE"}]}"#;
        assert!(
            KeySet::parse(jwks, &[Algorithm::RS256], 1).is_err(),
            "ES256 key but only RS256 allowed"
        );
        let set = KeySet::parse(jwks, &[Algorithm::ES256], 1).unwrap();
        assert_eq!(set.get(Some("e")).unwrap().algs, vec![Algorithm::ES256]);
        assert!(set.get(Some("x")).is_none());
        assert!(
            set.get(None).is_some(),
            "one-key set serves kid-less tokens"
        );
    }
}
