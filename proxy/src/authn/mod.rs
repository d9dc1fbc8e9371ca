//! Step 3: authenticate the caller.
//!
//! Exactly one credential is read from each request: a SigV4 `Authorization`
//! header, a bearer JWT, or (when neither is present) the mTLS peer's SPIFFE
//! ID. Nothing at all yields `Warden::Anonymous`. A credential that is present
//! but invalid is a 401, never a downgrade to anonymous; so are two credentials.

pub mod jwks;
pub mod jwt;
pub mod mtls;
pub mod sigv4;
pub mod sts;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{header, HeaderMap, Request, Response};
use http_body_util::BodyExt;
use tower::{Layer, Service};

use crate::body::{self, Body};
use crate::error::ProxyError;
use crate::trace::{PeerCert, RawTarget, Trace};

/// The kind of an AWS principal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AwsKind {
    Role,
    User,
}

/// An IAM role or user, with what Cedar's parent chain needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsPrincipal {
    pub kind: AwsKind,
    /// The IAM ARN (assumed-role sessions map to their role's ARN).
    pub arn: String,
    pub account: String,
    pub session_name: Option<String>,
}

impl AwsPrincipal {
    /// Reads `arn:PARTITION:iam::ACCOUNT:role/…`, `…:user/…` or
    /// `arn:PARTITION:sts::ACCOUNT:assumed-role/NAME/SESSION`.
    pub fn from_arn(arn: &str) -> Result<Self, String> {
        let bad = || format!("`{arn}` is not an IAM role, user or assumed-role ARN");
        let parts: Vec<&str> = arn.splitn(6, ':').collect();
        let [prefix, partition, svc, region, account, resource] = parts.as_slice() else {
            return Err(bad());
        };
        if *prefix != "arn" || partition.is_empty() || !region.is_empty() {
            return Err(bad());
        }
        // Named in the upstream's identity header, which cannot carry one.
        if arn.chars().any(char::is_control) {
            return Err(bad());
        }
        if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let (kind, arn, session_name) = match *svc {
            "iam" if resource.starts_with("role/") && resource.len() > 5 => {
                (AwsKind::Role, arn.to_owned(), None)
            }
            "iam" if resource.starts_with("user/") && resource.len() > 5 => {
                (AwsKind::User, arn.to_owned(), None)
            }
            "sts" => {
                let rest = resource.strip_prefix("assumed-role/").ok_or_else(bad)?;
                let (role, session) = rest.split_once('/').ok_or_else(bad)?;
                if role.is_empty() || session.is_empty() {
                    return Err(bad());
                }
                (
                    AwsKind::Role,
                    format!("arn:{partition}:iam::{account}:role/{role}"),
                    Some(session.to_owned()),
                )
            }
            _ => return Err(bad()),
        };
        Ok(Self {
            kind,
            arn,
            account: (*account).to_owned(),
            session_name,
        })
    }
}

/// An organization id from configuration is named in the upstream's identity
/// header: it must be non-empty and free of control characters.
pub fn check_org_id(org: &str) -> Result<(), String> {
    if org.is_empty() || org.chars().any(char::is_control) {
        return Err(format!(
            "organization id {org:?} is empty or holds a control character"
        ));
    }
    Ok(())
}

/// Who is calling, as Cedar sees it (DESIGN §5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Aws(AwsPrincipal),
    Spiffe(mtls::SpiffeId),
    K8s {
        namespace: String,
        name: String,
        cluster: String,
    },
    Oidc {
        sub: String,
        iss: String,
    },
    Anonymous,
}

impl Principal {
    /// Entity type and id.
    pub fn uid(&self) -> (&'static str, Cow<'_, str>) {
        match self {
            Self::Aws(p) => (
                match p.kind {
                    AwsKind::Role => "Aws::Role",
                    AwsKind::User => "Aws::User",
                },
                Cow::Borrowed(&p.arn),
            ),
            Self::Spiffe(id) => ("Spiffe::Id", Cow::Borrowed(id.as_str())),
            Self::K8s {
                namespace, name, ..
            } => (
                "K8s::ServiceAccount",
                Cow::Owned(format!("{namespace}/{name}")),
            ),
            Self::Oidc { sub, .. } => ("Oidc::Subject", Cow::Borrowed(sub)),
            Self::Anonymous => ("Warden::Anonymous", Cow::Borrowed("anonymous")),
        }
    }

    /// The `Type=` of the identity header.
    pub fn identity_type(&self) -> &'static str {
        match self {
            Self::Aws(_) => "AWS_IAM",
            Self::Spiffe(_) => "SPIFFE",
            Self::K8s { .. } => "K8S",
            Self::Oidc { .. } => "OIDC",
            Self::Anonymous => "Anonymous",
        }
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (ty, id) = self.uid();
        // Printable ASCII other than a quote or a backslash is what `{:?}` leaves as it is.
        let plain = id
            .bytes()
            .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\');
        if plain {
            f.write_str(ty)?;
            f.write_str("::\"")?;
            f.write_str(&id)?;
            f.write_str("\"")
        } else {
            write!(f, "{ty}::{id:?}")
        }
    }
}

/// AWS facts for `context.aws` and the identity header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsFacts {
    pub access_key_id: String,
    pub org_id: Option<String>,
    pub tags: BTreeMap<String, String>,
    /// Signed in the query (a presigned URL) rather than a header.
    pub presigned: bool,
}

/// The verified caller of one request.
#[derive(Debug, Clone)]
pub struct Identity {
    pub principal: Principal,
    /// `"sigv4"`, `"jwt"`, `"mtls"` or `"none"`.
    pub method: &'static str,
    pub aws: Option<AwsFacts>,
    /// Shared with the verified-token cache.
    pub jwt: Option<Arc<jwt::Claims>>,
}

impl Identity {
    fn anonymous() -> Self {
        Self {
            principal: Principal::Anonymous,
            method: "none",
            aws: None,
            jwt: None,
        }
    }

    /// The organization of an AWS principal, if known.
    pub fn org_id(&self) -> Option<&str> {
        self.aws.as_ref().and_then(|a| a.org_id.as_deref())
    }
}

/// SigV4 settings and credentials, validated at load.
#[derive(Debug)]
pub struct SigV4State {
    pub verifier: sigv4::Verifier,
    pub max_body: u64,
    /// The longest pause in a body buffered to check its hash (the
    /// upstream's `request_timeout`).
    pub body_timeout: Duration,
    pub accounts: BTreeMap<String, String>,
}

/// Everything authentication needs, as one immutable snapshot.
#[derive(Debug, Default)]
pub struct Authenticator {
    pub sigv4: Option<SigV4State>,
    pub jwt: jwt::JwtVerifier,
    pub sts: Option<sts::StsVerifier>,
    /// Account id -> organization id (`[authn.aws].accounts`).
    pub accounts: BTreeMap<String, String>,
    /// SPIFFE trust domains a client certificate may assert (absent = any).
    pub mtls_trust_domains: Option<Vec<String>>,
}

const MULTIPLE: &str = "more than one credential presented";

fn unauth(
    method: &'static str,
    code: &'static str,
    reason: impl Into<crate::error::Reason>,
) -> ProxyError {
    ProxyError::unauthenticated(method, code, reason)
}

/// Whether the query carries SigV4 presigning parameters (names compared
/// after percent-decoding, as the parser sees them).
fn has_presigned_query(query: Option<&str>) -> bool {
    query.is_some_and(|q| {
        q.split('&').any(|p| {
            let k = p.split('=').next().unwrap_or("");
            let k = percent_encoding::percent_decode_str(k).decode_utf8_lossy();
            k.eq_ignore_ascii_case("X-Amz-Signature")
                || k.eq_ignore_ascii_case("X-Amz-Credential")
                || k.eq_ignore_ascii_case("X-Amz-Algorithm")
        })
    })
}

/// The request as SigV4 sees it: method, raw target (the normalized URI's
/// where no raw target was recorded), headers.
struct SigV4View<'a> {
    method: &'a str,
    raw: Option<&'a RawTarget>,
    uri: &'a http::Uri,
    headers: &'a HeaderMap,
}

impl<'a> SigV4View<'a> {
    fn of(req: &'a Request<Body>) -> Self {
        Self {
            method: req.method().as_str(),
            raw: req.extensions().get::<RawTarget>(),
            uri: req.uri(),
            headers: req.headers(),
        }
    }

    fn raw_path(&self) -> &'a str {
        self.raw.map_or(self.uri.path(), |r| &r.path)
    }

    fn raw_query(&self) -> Option<&'a str> {
        match self.raw {
            Some(r) => r.query.as_deref(),
            None => self.uri.query(),
        }
    }
}

/// The SigV4 credential of the `Authorization` header, or of the presigned
/// query.
fn parse_credential(req: &Request<Body>, presigned: bool) -> Result<sigv4::Auth, sigv4::SigError> {
    if presigned {
        sigv4::parse_presigned(SigV4View::of(req).raw_query().unwrap_or(""))
    } else {
        req.headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or(sigv4::SigError::Malformed("not visible ASCII"))
            .and_then(sigv4::parse_authorization)
    }
}

impl sigv4::SignedRequest for SigV4View<'_> {
    fn method(&self) -> &str {
        self.method
    }
    fn raw_path(&self) -> &str {
        SigV4View::raw_path(self)
    }
    fn raw_query(&self) -> Option<&str> {
        SigV4View::raw_query(self)
    }
    fn header_values<'v>(&'v self, name: &str) -> impl Iterator<Item = &'v [u8]> {
        let mut values = self.headers.get_all(name).iter().peekable();
        let authority = match values.peek() {
            None if name == "host" => self.uri.authority().map(|a| a.as_str()),
            _ => None,
        };
        values
            .map(|v| v.as_bytes())
            .chain(authority.map(str::as_bytes))
    }
}

fn sig_err(e: sigv4::SigError) -> ProxyError {
    unauth("sigv4", e.code(), e.to_string())
}

/// Reads the whole body, refusing more than `limit` bytes with 413, and a
/// body that pauses for `idle` with 408: this runs before the signature is
/// known to be good, so any client could otherwise hold a request open.
async fn buffer_body(
    req: Request<Body>,
    limit: u64,
    idle: Duration,
) -> Result<(http::request::Parts, Bytes), ProxyError> {
    let (parts, mut body) = req.into_parts();
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ProxyError::PayloadTooLarge);
    }
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    // Most bodies are one frame, kept as it came; more are copied together.
    let mut first: Option<Bytes> = None;
    let mut joined: Option<bytes::BytesMut> = None;
    let mut len = 0usize;
    loop {
        let frame = match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => return Err(ProxyError::RequestTimeout),
            Ok(None) => break,
            Ok(Some(Err(e))) if e.is_client_reset() => return Err(ProxyError::ClientGone),
            Ok(Some(Err(e))) => return Err(ProxyError::bad_request(e.client_reason())),
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        len = len.saturating_add(data.len());
        if len > limit {
            return Err(ProxyError::PayloadTooLarge);
        }
        match (&mut joined, first.take()) {
            (Some(all), _) => all.extend_from_slice(&data),
            (None, None) => first = Some(data),
            (None, Some(before)) => {
                let mut all = bytes::BytesMut::with_capacity(len);
                all.extend_from_slice(&before);
                all.extend_from_slice(&data);
                joined = Some(all);
            }
        }
    }
    let bytes = match joined {
        Some(all) => all.freeze(),
        None => first.unwrap_or_default(),
    };
    Ok((parts, bytes))
}

/// What `x-amz-content-sha256` asks for.
enum PayloadMode {
    /// No header: hash the body.
    Compute,
    Unsigned,
    /// The declared hash; the body must match it.
    Declared(String),
}

fn payload_mode(headers: &HeaderMap) -> Result<PayloadMode, ProxyError> {
    let mut values = headers.get_all("x-amz-content-sha256").iter();
    let Some(v) = values.next() else {
        return Ok(PayloadMode::Compute);
    };
    if values.next().is_some() {
        return Err(ProxyError::bad_request("repeated x-amz-content-sha256"));
    }
    let v = v.to_str().unwrap_or("");
    if v == sigv4::UNSIGNED_PAYLOAD {
        Ok(PayloadMode::Unsigned)
    } else if v.starts_with("STREAMING-") {
        Err(ProxyError::bad_request(
            "streaming payload signatures are not supported",
        ))
    } else if v.len() == 64
        && v.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(PayloadMode::Declared(v.to_owned()))
    } else {
        Err(ProxyError::bad_request("malformed x-amz-content-sha256"))
    }
}

async fn authenticate_sigv4(
    authn: Arc<Authenticator>,
    req: Request<Body>,
    presigned: bool,
) -> Result<(Request<Body>, Identity), ProxyError> {
    let Some(state) = authn.sigv4.as_ref() else {
        return Err(unauth("sigv4", "not_configured", "sigv4 is not configured"));
    };
    let mode = payload_mode(req.headers())?;
    let auth = parse_credential(&req, presigned).map_err(sig_err)?;
    let (req, body_hash) = match mode {
        PayloadMode::Compute => {
            // Refused now if it can be, before a body is read (a request with
            // none is checked once, below).
            if !http_body::Body::is_end_stream(req.body()) {
                state
                    .verifier
                    .precheck(&SigV4View::of(&req), &auth, SystemTime::now())
                    .map_err(sig_err)?;
            }
            let (parts, bytes) = buffer_body(req, state.max_body, state.body_timeout).await?;
            let hash = sigv4::sha256_hex(&bytes);
            (Request::from_parts(parts, body::full(bytes)), hash)
        }
        PayloadMode::Unsigned => (req, sigv4::UNSIGNED_PAYLOAD.to_owned()),
        PayloadMode::Declared(h) => (req, h),
    };
    let (credential, verified_declared) = {
        let verified = state
            .verifier
            .verify(&SigV4View::of(&req), &auth, &body_hash, SystemTime::now())
            .map_err(sig_err)?;
        let declared = matches!(payload_mode(req.headers()), Ok(PayloadMode::Declared(_)));
        (verified.credential, declared)
    };
    // The signature covers the declared hash; now the body must match it.
    let req = if verified_declared {
        let (parts, bytes) = buffer_body(req, state.max_body, state.body_timeout).await?;
        if sigv4::sha256_hex(&bytes) != body_hash {
            return Err(unauth(
                "sigv4",
                "payload_hash_mismatch",
                "payload hash mismatch",
            ));
        }
        Request::from_parts(parts, body::full(bytes))
    } else {
        req
    };
    let principal = credential.aws_principal().cloned().ok_or_else(|| {
        unauth(
            "sigv4",
            "misconfigured",
            "credential has no usable principal",
        )
    })?;
    let org_id = credential
        .org_id
        .clone()
        .or_else(|| state.accounts.get(&principal.account).cloned());
    let identity = Identity {
        principal: Principal::Aws(principal),
        method: "sigv4",
        aws: Some(AwsFacts {
            access_key_id: credential.access_key_id.clone(),
            org_id,
            tags: credential.tags.clone(),
            presigned,
        }),
        jwt: None,
    };
    Ok((req, identity))
}

/// The one credential a request carries.
enum Presented {
    SigV4 { presigned: bool },
    Sts(String),
    Bearer(String),
    Peer(Option<PeerCert>),
}

/// Decides which credential a request carries, refusing two or an unknown kind.
fn presented(authn: &Authenticator, req: &Request<Body>) -> Result<Presented, ProxyError> {
    let mut auths = req.headers().get_all(header::AUTHORIZATION).iter();
    let auth = auths.next();
    if auths.next().is_some() {
        return Err(unauth("none", "multiple_credentials", MULTIPLE));
    }
    let presigned = req.extensions().get::<RawTarget>().map_or_else(
        || has_presigned_query(req.uri().query()),
        |r| has_presigned_query(r.query.as_deref()),
    );
    if presigned {
        if auth.is_some() {
            return Err(unauth("sigv4", "multiple_credentials", MULTIPLE));
        }
        return Ok(Presented::SigV4 { presigned: true });
    }
    let Some(value) = auth else {
        let mut tokens = authn
            .jwt
            .token_headers
            .iter()
            .flat_map(|h| req.headers().get_all(h).iter());
        if let Some(v) = tokens.next() {
            if tokens.next().is_some() {
                return Err(unauth("jwt", "multiple_credentials", MULTIPLE));
            }
            let v = v
                .to_str()
                .map_err(|_| unauth("jwt", "malformed", "malformed token"))?
                .trim();
            let token = match v.get(..7) {
                Some(p) if p.eq_ignore_ascii_case("bearer ") => &v[7..],
                _ => v,
            };
            return Ok(Presented::Bearer(token.trim().to_owned()));
        }
        let peer = req
            .extensions()
            .get::<Arc<Trace>>()
            .and_then(|t| t.conn.tls.as_ref())
            .and_then(|tls| tls.peer.clone());
        return Ok(Presented::Peer(peer));
    };
    let bytes = value.as_bytes();
    if bytes.starts_with(sigv4::ALGORITHM.as_bytes())
        || bytes.starts_with(sigv4::ALGORITHM_V4A.as_bytes())
    {
        return Ok(Presented::SigV4 { presigned: false });
    }
    if authn
        .jwt
        .token_headers
        .iter()
        .any(|h| req.headers().contains_key(h))
    {
        return Err(unauth("jwt", "multiple_credentials", MULTIPLE));
    }
    if bytes.len() > 7 && bytes[..7].eq_ignore_ascii_case(b"bearer ") {
        let token = std::str::from_utf8(&bytes[7..])
            .map_err(|_| unauth("jwt", "malformed", "malformed token"))?
            .trim();
        if token.starts_with(sts::PREFIX) {
            return Ok(Presented::Sts(token.to_owned()));
        }
        return Ok(Presented::Bearer(token.to_owned()));
    }
    Err(unauth(
        "none",
        "unsupported",
        "unsupported authorization scheme",
    ))
}

/// Verifies the credential a request carries (as [`presented`] read it).
async fn authenticate(
    authn: Arc<Authenticator>,
    req: Request<Body>,
    presented: Presented,
) -> Result<(Request<Body>, Identity), ProxyError> {
    match presented {
        Presented::SigV4 { presigned } => authenticate_sigv4(authn, req, presigned).await,
        Presented::Sts(token) => {
            let Some(verifier) = authn.sts.as_ref() else {
                return Err(unauth(
                    "sts",
                    "not_configured",
                    "sts tokens are not configured",
                ));
            };
            let id = verifier.verify(&token).await.map_err(|e| match e {
                sts::StsError::Unavailable | sts::StsError::Busy => ProxyError::Unavailable {
                    reason: e.to_string().into(),
                    retry_after: std::time::Duration::from_secs(1),
                },
                e => unauth("sts", e.code(), e.to_string()),
            })?;
            let org_id = authn.accounts.get(&id.principal.account).cloned();
            let identity = Identity {
                principal: Principal::Aws(id.principal),
                method: "sts",
                aws: Some(AwsFacts {
                    access_key_id: id.access_key_id,
                    org_id,
                    tags: BTreeMap::new(),
                    presigned: false,
                }),
                jwt: None,
            };
            Ok((req, identity))
        }
        Presented::Bearer(token) => {
            let (principal, claims) = authn.jwt.verify(&token).await.map_err(|e| match e {
                jwt::JwtError::KeysUnavailable => ProxyError::Unavailable {
                    reason: e.to_string().into(),
                    retry_after: std::time::Duration::from_secs(1),
                },
                e => unauth("jwt", e.code(), e.to_string()),
            })?;
            let identity = Identity {
                principal,
                method: "jwt",
                aws: None,
                jwt: Some(claims),
            };
            Ok((req, identity))
        }
        Presented::Peer(peer) => peer_identity(&authn, peer).map(|id| (req, id)),
    }
}

/// The caller a connection's client certificate names, or anonymous.
fn peer_identity(authn: &Authenticator, peer: Option<PeerCert>) -> Result<Identity, ProxyError> {
    match peer {
        Some(PeerCert::Spiffe(id)) => {
            if let Some(tds) = &authn.mtls_trust_domains {
                if !tds.iter().any(|td| td == id.trust_domain()) {
                    return Err(unauth("mtls", "trust_domain", "trust domain not allowed"));
                }
            }
            Ok(Identity {
                principal: Principal::Spiffe(id),
                method: "mtls",
                aws: None,
                jwt: None,
            })
        }
        Some(PeerCert::NoSpiffe(reason)) if reason != mtls::NO_URI_SAN => {
            Err(unauth("mtls", "invalid_spiffe_id", reason))
        }
        _ => Ok(Identity::anonymous()),
    }
}

#[derive(Clone)]
pub struct AuthnLayer {
    authn: Arc<ArcSwap<Authenticator>>,
}

impl AuthnLayer {
    pub fn new(authn: Arc<ArcSwap<Authenticator>>) -> Self {
        Self { authn }
    }
}

impl<S> Layer<S> for AuthnLayer {
    type Service = Authn<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Authn {
            inner,
            authn: self.authn.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Authn<S> {
    inner: S,
    authn: Arc<ArcSwap<Authenticator>>,
}

impl<S> Service<Request<Body>> for Authn<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = ProxyError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = ProxyError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, ProxyError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let snapshot = self.authn.load_full();
        // Take the service that was driven to readiness; leave a clone behind.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        // Most requests are answered without waiting (a cached token, a peer
        // certificate, a refusal): they skip the future that can wait for a
        // key set, a body or STS, which is kilobytes to build per request.
        let presented = match authenticate_now(&snapshot, &req) {
            Now::Wait(presented) => presented,
            Now::Done(result) => {
                let trace = req.extensions().get::<Arc<Trace>>();
                record(trace.map(|t| &**t), result.as_ref());
                return match result {
                    Ok(identity) => {
                        req.extensions_mut().insert(identity);
                        Box::pin(inner.call(req))
                    }
                    Err(e) => Box::pin(std::future::ready(Err(e))),
                };
            }
        };
        Box::pin(async move {
            let trace = req.extensions().get::<Arc<Trace>>().cloned();
            let result = authenticate(snapshot, req, presented).await;
            record(trace.as_deref(), result.as_ref().map(|(_, id)| id));
            let (mut req, identity) = result?;
            req.extensions_mut().insert(identity);
            inner.call(req).await
        })
    }
}

/// Whether a request's authentication is answered at once.
enum Now {
    Done(Result<Identity, ProxyError>),
    /// [`authenticate`] must verify this credential, and may wait.
    Wait(Presented),
}

/// What [`authenticate`] would answer, when it can be had without waiting.
fn authenticate_now(authn: &Authenticator, req: &Request<Body>) -> Now {
    match presented(authn, req) {
        Err(e) => Now::Done(Err(e)),
        Ok(Presented::Bearer(token)) => match authn.jwt.cached(&token) {
            Some((principal, claims)) => Now::Done(Ok(Identity {
                principal,
                method: "jwt",
                aws: None,
                jwt: Some(claims),
            })),
            None => Now::Wait(Presented::Bearer(token)),
        },
        Ok(Presented::Peer(peer)) => Now::Done(peer_identity(authn, peer)),
        Ok(wait @ (Presented::SigV4 { .. } | Presented::Sts(_))) => Now::Wait(wait),
    }
}

/// Writes who (or which failed method) a request's authentication found
/// into its trace.
fn record(trace: Option<&Trace>, outcome: Result<&Identity, &ProxyError>) {
    let Some(t) = trace else {
        return;
    };
    let method = match outcome {
        Ok(id) => id.method,
        Err(ProxyError::Unauthenticated { method, .. }) => method,
        Err(_) => "none",
    };
    let _ = t.authn.set(method);
    if let Ok(id) = outcome {
        let _ = t.principal.set(id.principal.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body of `frames` (data, or trailers for `None`), then, if `stall`,
    /// no end.
    fn framed(frames: Vec<Option<&'static [u8]>>, stall: bool) -> Request<Body> {
        let frames = frames.into_iter().map(|f| {
            Ok::<_, std::convert::Infallible>(match f {
                Some(data) => http_body::Frame::data(Bytes::from_static(data)),
                None => http_body::Frame::trailers(HeaderMap::new()),
            })
        });
        let end = futures_util::stream::once(async move {
            if stall {
                std::future::pending::<()>().await;
            }
            Ok(http_body::Frame::data(Bytes::new()))
        });
        let stream = futures_util::StreamExt::chain(futures_util::stream::iter(frames), end);
        Request::new(body::boxed(http_body_util::StreamBody::new(stream)))
    }

    #[tokio::test]
    async fn a_buffered_body_is_whole_bounded_and_timed() {
        let idle = Duration::from_millis(200);
        let whole = |frames, limit| async move {
            buffer_body(framed(frames, false), limit, idle)
                .await
                .map(|(_, bytes)| bytes)
        };
        let one = whole(vec![Some(b"hello".as_slice())], 5).await.unwrap();
        assert_eq!(one, "hello");
        let three = vec![Some(b"he".as_slice()), Some(b"ll"), None, Some(b"o")];
        assert_eq!(whole(three.clone(), 5).await.unwrap(), "hello");
        assert!(matches!(
            whole(three, 4).await,
            Err(ProxyError::PayloadTooLarge)
        ));
        assert_eq!(whole(vec![], 5).await.unwrap(), "");
        let stalled = buffer_body(framed(vec![Some(b"he")], true), 5, idle).await;
        assert!(matches!(stalled, Err(ProxyError::RequestTimeout)));
    }

    #[test]
    fn a_principal_prints_as_its_type_and_debug_quoted_id() {
        let mut ids: Vec<String> = (0u8..0x80)
            .map(|b| format!("a{}b", char::from(b)))
            .collect();
        ids.extend(
            [
                "", "plain-id", "é", "\u{200b}", "\u{7f}", "tab\tq\"", "x\\y",
            ]
            .map(String::from),
        );
        for sub in ids {
            let p = Principal::Oidc {
                sub: sub.clone(),
                iss: "https://issuer".into(),
            };
            assert_eq!(p.to_string(), format!("Oidc::Subject::{sub:?}"), "{sub:?}");
        }
    }

    #[test]
    fn maps_arns() {
        let r = AwsPrincipal::from_arn("arn:aws:iam::123456789012:role/orders").unwrap();
        assert_eq!(r.kind, AwsKind::Role);
        assert_eq!(r.account, "123456789012");
        let s =
            AwsPrincipal::from_arn("arn:aws:sts::123456789012:assumed-role/orders/sess-1").unwrap();
        assert_eq!(s.arn, "arn:aws:iam::123456789012:role/orders");
        assert_eq!(s.session_name.as_deref(), Some("sess-1"));
        let u = AwsPrincipal::from_arn("arn:aws:iam::123456789012:user/alice").unwrap();
        assert_eq!(u.kind, AwsKind::User);
        for bad in [
            "arn:aws:iam::12345:role/x",
            "arn:aws:s3:::bucket",
            "arn:aws:iam::123456789012:group/x",
            "arn:aws:iam::123456789012:role/",
            "arn:aws:sts::123456789012:assumed-role/x",
            "arn:aws:iam::123456789012:role/x\ny",
            "arn:aws:sts::123456789012:assumed-role/r/s\u{7}",
            "not-an-arn",
        ] {
            assert!(AwsPrincipal::from_arn(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn presigned_parameters_are_recognized_however_encoded() {
        assert!(has_presigned_query(Some("a=1&X-Amz-Signature=00")));
        assert!(has_presigned_query(Some("x-amz-credential=a")));
        assert!(has_presigned_query(Some(
            "X%2DAmz%2DAlgorithm=AWS4-HMAC-SHA256"
        )));
        assert!(!has_presigned_query(Some("X-Amz-Date=1&a=2")));
        assert!(!has_presigned_query(None));
    }

    #[test]
    fn principal_display() {
        let p = Principal::K8s {
            namespace: "ns".into(),
            name: "sa".into(),
            cluster: "c".into(),
        };
        assert_eq!(p.to_string(), "K8s::ServiceAccount::\"ns/sa\"");
        assert_eq!(
            Principal::Anonymous.to_string(),
            "Warden::Anonymous::\"anonymous\""
        );
    }
}
