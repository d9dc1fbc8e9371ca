//! Workload-identity JWTs: EKS service-account tokens, SPIFFE JWT-SVIDs and
//! OIDC tokens, verified against each issuer's key set.
//!
//! The issuer is chosen by the token's `iss` among configured issuers; the key
//! by `kid`; the algorithm is pinned by the key and the issuer's allow-list
//! (never `none`, never HS*). Verified tokens are cached by their hash until
//! the earlier of `exp` and the key set changing.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use base64::Engine;
use jsonwebtoken::{errors::ErrorKind, Algorithm, Validation};
use serde::Deserialize;
use serde_json::Value;

use super::jwks::{KeySet, KeySource};
use super::mtls::SpiffeId;
use super::Principal;
use crate::config::{JwtIssuerConfig, PrincipalKind};

/// Tokens larger than this are refused before any parsing.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Verified-token cache entries (across issuers).
const CACHE_ENTRIES: usize = 16 * 1024;
const CACHE_SHARDS: usize = 16;

/// Why a token was refused. The `Display` text is what the client sees.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("token too large")]
    TooLarge,
    #[error("malformed token")]
    Malformed,
    #[error("unknown issuer")]
    UnknownIssuer,
    #[error("unknown key id")]
    UnknownKey,
    #[error("algorithm not allowed")]
    Algorithm,
    #[error("unexpected token type")]
    Type,
    #[error("unsupported critical header")]
    Critical,
    #[error("signature invalid")]
    Signature,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("token issued in the future")]
    IssuedInFuture,
    #[error("token lifetime exceeds the allowed maximum")]
    Lifetime,
    #[error("audience mismatch")]
    Audience,
    #[error("missing claim `{0}`")]
    MissingClaim(&'static str),
    #[error("subject does not map to a principal: {0}")]
    Subject(&'static str),
    /// The issuer's key set has never been fetched: 503, not 401.
    #[error("key set for this issuer is not available yet")]
    KeysUnavailable,
}

impl JwtError {
    pub fn code(&self) -> &'static str {
        match self {
            Self::TooLarge | Self::Malformed | Self::Type | Self::Critical => "malformed",
            Self::UnknownIssuer => "unknown_issuer",
            Self::UnknownKey => "unknown_key_id",
            Self::Algorithm => "algorithm",
            Self::Signature => "signature_invalid",
            Self::Expired | Self::NotYetValid | Self::IssuedInFuture | Self::Lifetime => "expired",
            Self::Audience => "audience_mismatch",
            Self::MissingClaim(_) | Self::Subject(_) => "claims",
            Self::KeysUnavailable => "keys_unavailable",
        }
    }
}

fn is_hmac(alg: Algorithm) -> bool {
    matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
}

/// The `kubernetes.io` claim of a projected service-account token.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct K8sClaims {
    pub namespace: Option<String>,
    pub pod_name: Option<String>,
    pub pod_uid: Option<String>,
    pub service_account_uid: Option<String>,
}

/// The verified claims policies may see (`context.jwt`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Claims {
    pub iss: String,
    pub sub: Option<String>,
    pub aud: Vec<String>,
    pub exp: u64,
    pub kubernetes: Option<K8sClaims>,
    /// The issuer's configured `claims`: scalars as one-element sets.
    pub selected: BTreeMap<String, Vec<String>>,
}

/// One trusted issuer.
pub struct Issuer {
    cfg: JwtIssuerConfig,
    allowed: Vec<Algorithm>,
    pub source: Arc<KeySource>,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("issuer", &self.cfg.issuer)
            .finish()
    }
}

impl Issuer {
    /// Parses the allow-list and builds the key source (a file is read now;
    /// a remote source starts empty and is filled by its refresher).
    pub fn new(cfg: JwtIssuerConfig) -> Result<Self, String> {
        let allowed = Self::allowed(&cfg)?;
        let source = match cfg.key_source() {
            crate::config::KeySourceKind::File(path) => KeySource::from_file(&cfg, path, &allowed)?,
            _ => KeySource::remote(&cfg),
        };
        Ok(Self {
            cfg,
            allowed,
            source: Arc::new(source),
        })
    }

    /// An issuer with an in-memory JWKS (tests, benchmarks).
    pub fn with_jwks(cfg: JwtIssuerConfig, jwks: &str) -> Result<Self, String> {
        let allowed = Self::allowed(&cfg)?;
        let source = KeySource::from_document(&cfg, jwks.as_bytes(), &allowed)?;
        Ok(Self {
            cfg,
            allowed,
            source: Arc::new(source),
        })
    }

    fn allowed(cfg: &JwtIssuerConfig) -> Result<Vec<Algorithm>, String> {
        let mut allowed = Vec::new();
        for name in &cfg.algorithms {
            let alg: Algorithm = name
                .parse()
                .map_err(|_| format!("unknown algorithm `{name}`"))?;
            if is_hmac(alg) {
                return Err(format!("algorithm `{name}` is never accepted"));
            }
            allowed.push(alg);
        }
        Ok(allowed)
    }

    pub fn config(&self) -> &JwtIssuerConfig {
        &self.cfg
    }

    pub fn allowed_algorithms(&self) -> &[Algorithm] {
        &self.allowed
    }
}

#[derive(Clone)]
struct Cached {
    principal: Principal,
    claims: Arc<Claims>,
    generation: u64,
}

/// A bounded map from token hash to its verified result, sharded so
/// concurrent requests rarely contend; no lock is held across an await.
struct TokenCache {
    shards: Vec<Mutex<HashMap<[u8; 32], Cached>>>,
}

impl TokenCache {
    fn new() -> Self {
        Self {
            shards: (0..CACHE_SHARDS)
                .map(|_| Mutex::new(HashMap::new()))
                .collect(),
        }
    }

    fn shard(&self, key: &[u8; 32]) -> Option<&Mutex<HashMap<[u8; 32], Cached>>> {
        self.shards.get(usize::from(key[0]) % CACHE_SHARDS)
    }

    /// The entry for `key` if it has not expired; the caller checks its
    /// key-set generation.
    fn get(&self, key: &[u8; 32], now: u64) -> Option<Cached> {
        let mut shard = self.shard(key)?.lock().ok()?;
        match shard.get(key) {
            Some(c) if c.claims.exp > now => Some(c.clone()),
            Some(_) => {
                shard.remove(key);
                None
            }
            None => None,
        }
    }

    fn insert(&self, key: [u8; 32], value: Cached) {
        let Some(Ok(mut shard)) = self.shard(&key).map(|s| s.lock()) else {
            return;
        };
        if shard.len() >= CACHE_ENTRIES / CACHE_SHARDS {
            // Bounded: drop this shard's entries rather than grow.
            shard.clear();
        }
        shard.insert(key, value);
    }
}

fn cache_key(token: &str) -> [u8; 32] {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
    let mut key = [0u8; 32];
    key.copy_from_slice(digest.as_ref());
    key
}

/// Verifies bearer tokens against the configured issuers.
pub struct JwtVerifier {
    issuers: HashMap<String, Issuer>,
    cache: TokenCache,
    cache_enabled: bool,
    /// Headers (besides `Authorization`) that may carry a token.
    pub token_headers: Vec<http::HeaderName>,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("issuers", &self.issuers.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Default for JwtVerifier {
    fn default() -> Self {
        Self::new(Vec::new())
    }
}

fn b64_json<T: serde::de::DeserializeOwned>(segment: &str) -> Result<T, JwtError> {
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(segment)
        .map_err(|_| JwtError::Malformed)?;
    serde_json::from_slice(&raw).map_err(|_| JwtError::Malformed)
}

#[derive(Deserialize)]
struct RawHeader {
    alg: String,
    kid: Option<String>,
    typ: Option<String>,
    crit: Option<Value>,
}

#[derive(Deserialize)]
struct Unverified {
    iss: Option<String>,
}

impl JwtVerifier {
    pub fn new(issuers: Vec<Issuer>) -> Self {
        let mut token_headers: Vec<http::HeaderName> = issuers
            .iter()
            .filter_map(|i| i.cfg.token_header.as_deref())
            .filter_map(|h| http::HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()).ok())
            .collect();
        token_headers.dedup();
        Self {
            issuers: issuers
                .into_iter()
                .map(|i| (i.cfg.issuer.clone(), i))
                .collect(),
            cache: TokenCache::new(),
            cache_enabled: true,
            token_headers,
        }
    }

    /// Turns the verified-token cache off (benchmarks measure the cold path).
    pub fn without_cache(mut self) -> Self {
        self.cache_enabled = false;
        self
    }

    pub fn issuers(&self) -> impl Iterator<Item = &Issuer> {
        self.issuers.values()
    }

    /// Issuers whose key set has never been loaded (for `/readyz`).
    pub fn missing_keys(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .issuers
            .values()
            .filter(|i| i.source.current().is_none())
            .map(|i| i.cfg.issuer.clone())
            .collect();
        v.sort();
        v
    }

    /// What [`verify`](Self::verify) would answer from the verified-token
    /// cache alone, without waiting: `None` when it must verify the token.
    pub fn cached(&self, token: &str) -> Option<(Principal, Arc<Claims>)> {
        if token.len() > MAX_TOKEN_BYTES {
            return None;
        }
        self.hit(&cache_key(token), jsonwebtoken::get_current_timestamp())
    }

    /// A cached verdict that has not expired and whose issuer's key set is
    /// the one it was verified with.
    fn hit(&self, key: &[u8; 32], now: u64) -> Option<(Principal, Arc<Claims>)> {
        if !self.cache_enabled {
            return None;
        }
        let hit = self.cache.get(key, now)?;
        let generation = self
            .issuers
            .get(&hit.claims.iss)
            .and_then(|i| i.source.current())
            .map(|k| k.generation);
        (generation == Some(hit.generation)).then_some((hit.principal, hit.claims))
    }

    /// Verifies `token` and maps it to a principal.
    pub async fn verify(&self, token: &str) -> Result<(Principal, Arc<Claims>), JwtError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(JwtError::TooLarge);
        }
        // A token verified before passed every check below that depends on
        // the token alone (this verifier's issuers and algorithms are fixed
        // for its life); what can change since is the clock and the issuer's
        // key set, and the cache checks both. So look it up first, before
        // decoding anything.
        let cache_key = cache_key(token);
        let now = jsonwebtoken::get_current_timestamp();
        if let Some(hit) = self.hit(&cache_key, now) {
            return Ok(hit);
        }
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(_), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwtError::Malformed);
        };
        let header: RawHeader = b64_json(h)?;
        if header.alg.eq_ignore_ascii_case("none") {
            return Err(JwtError::Algorithm);
        }
        let alg: Algorithm = header.alg.parse().map_err(|_| JwtError::Algorithm)?;
        if is_hmac(alg) {
            return Err(JwtError::Algorithm);
        }
        if let Some(typ) = &header.typ {
            let typ = typ.to_ascii_lowercase();
            if !matches!(
                typ.as_str(),
                "jwt" | "jose" | "at+jwt" | "application/jwt" | "application/at+jwt"
            ) {
                return Err(JwtError::Type);
            }
        }
        if header.crit.is_some() {
            // warden understands no JWS extensions, so any `crit` is unsupported.
            return Err(JwtError::Critical);
        }
        let unverified: Unverified = b64_json(p)?;
        let iss = unverified.iss.ok_or(JwtError::MissingClaim("iss"))?;
        let issuer = self.issuers.get(&iss).ok_or(JwtError::UnknownIssuer)?;
        let mut keys = issuer.source.current().ok_or(JwtError::KeysUnavailable)?;

        if keys.get(header.kid.as_deref()).is_none() {
            if let Some(newer) = issuer.source.refetch_for_unknown_kid().await {
                keys = newer;
            }
        }
        let (principal, claims) =
            verify_with(issuer, &keys, token, alg, header.kid.as_deref(), now)?;
        let claims = Arc::new(claims);
        if !self.cache_enabled {
            return Ok((principal, claims));
        }
        self.cache.insert(
            cache_key,
            Cached {
                principal: principal.clone(),
                claims: claims.clone(),
                generation: keys.generation,
            },
        );
        Ok((principal, claims))
    }
}

fn verify_with(
    issuer: &Issuer,
    keys: &KeySet,
    token: &str,
    alg: Algorithm,
    kid: Option<&str>,
    now: u64,
) -> Result<(Principal, Claims), JwtError> {
    let key = keys.get(kid).ok_or(JwtError::UnknownKey)?;
    if !key.algs.contains(&alg) || !issuer.allowed.contains(&alg) {
        return Err(JwtError::Algorithm);
    }
    let cfg = &issuer.cfg;
    let mut v = Validation::new(alg);
    v.leeway = cfg.leeway.as_secs();
    v.validate_nbf = true;
    v.set_issuer(&[&cfg.issuer]);
    v.set_audience(&cfg.audiences);
    v.set_required_spec_claims(&["exp", "iss", "aud"]);
    let data = jsonwebtoken::decode::<serde_json::Map<String, Value>>(token, &key.key, &v)
        .map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => JwtError::Expired,
            ErrorKind::ImmatureSignature => JwtError::NotYetValid,
            ErrorKind::InvalidAudience => JwtError::Audience,
            ErrorKind::InvalidIssuer => JwtError::UnknownIssuer,
            ErrorKind::InvalidSignature => JwtError::Signature,
            ErrorKind::InvalidAlgorithm => JwtError::Algorithm,
            ErrorKind::MissingRequiredClaim(c) => match c.as_str() {
                "exp" => JwtError::MissingClaim("exp"),
                "aud" => JwtError::MissingClaim("aud"),
                _ => JwtError::MissingClaim("iss"),
            },
            _ => JwtError::Malformed,
        })?;
    let raw = data.claims;
    let exp = raw
        .get("exp")
        .and_then(Value::as_u64)
        .ok_or(JwtError::MissingClaim("exp"))?;
    let leeway = cfg.leeway.as_secs();
    let iat = raw.get("iat").and_then(Value::as_u64);
    if iat.is_some_and(|iat| iat > now.saturating_add(leeway)) {
        return Err(JwtError::IssuedInFuture);
    }
    if let Some(max) = cfg.max_lifetime {
        let start = iat.unwrap_or(now);
        if exp.saturating_sub(start) > max.as_secs().saturating_add(leeway) {
            return Err(JwtError::Lifetime);
        }
    }
    let claims = extract_claims(cfg, &raw, exp);
    let principal = map_principal(cfg, &claims)?;
    Ok((principal, claims))
}

fn strings(v: &Value) -> Vec<String> {
    match v {
        Value::String(s) => vec![s.clone()],
        Value::Bool(b) => vec![b.to_string()],
        Value::Number(n) => vec![n.to_string()],
        Value::Array(a) => a
            .iter()
            .filter_map(|x| x.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    }
}

fn extract_claims(cfg: &JwtIssuerConfig, raw: &serde_json::Map<String, Value>, exp: u64) -> Claims {
    let s = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_owned);
    let kubernetes = raw
        .get("kubernetes.io")
        .and_then(Value::as_object)
        .map(|k| K8sClaims {
            namespace: s(k.get("namespace")),
            pod_name: s(k.get("pod").and_then(|p| p.get("name"))),
            pod_uid: s(k.get("pod").and_then(|p| p.get("uid"))),
            service_account_uid: s(k.get("serviceaccount").and_then(|p| p.get("uid"))),
        });
    Claims {
        iss: cfg.issuer.clone(),
        sub: s(raw.get("sub")),
        aud: raw.get("aud").map(strings).unwrap_or_default(),
        exp,
        kubernetes,
        selected: cfg
            .claims
            .iter()
            .filter_map(|name| raw.get(name).map(|v| (name.clone(), strings(v))))
            .collect(),
    }
}

fn map_principal(cfg: &JwtIssuerConfig, claims: &Claims) -> Result<Principal, JwtError> {
    let sub = claims
        .sub
        .as_deref()
        .filter(|s| !s.is_empty())
        .ok_or(JwtError::MissingClaim("sub"))?;
    // The principal is named in the decision log and in the upstream's
    // identity header; neither can carry a control character.
    if sub.chars().any(char::is_control) {
        return Err(JwtError::Subject("control character in sub"));
    }
    match cfg.principal {
        PrincipalKind::K8s => {
            let rest = sub
                .strip_prefix("system:serviceaccount:")
                .ok_or(JwtError::Subject("not a service account"))?;
            let (ns, name) = rest
                .split_once(':')
                .filter(|(ns, name)| !ns.is_empty() && !name.is_empty() && !name.contains(':'))
                .ok_or(JwtError::Subject("not a service account"))?;
            if claims
                .kubernetes
                .as_ref()
                .and_then(|k| k.namespace.as_deref())
                .is_some_and(|claimed| claimed != ns)
            {
                return Err(JwtError::Subject("namespace claim disagrees with sub"));
            }
            Ok(Principal::K8s {
                namespace: ns.to_owned(),
                name: name.to_owned(),
                cluster: cfg.cluster.clone().unwrap_or_else(|| cfg.issuer.clone()),
            })
        }
        PrincipalKind::Spiffe => {
            let id = SpiffeId::parse(sub).map_err(JwtError::Subject)?;
            if let Some(tds) = &cfg.trust_domains {
                if !tds.iter().any(|td| td == id.trust_domain()) {
                    return Err(JwtError::Subject("trust domain not allowed"));
                }
            }
            Ok(Principal::Spiffe(id))
        }
        PrincipalKind::Oidc => Ok(Principal::Oidc {
            sub: sub.to_owned(),
            iss: claims.iss.clone(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cached(exp: u64, generation: u64) -> Cached {
        Cached {
            principal: Principal::Anonymous,
            claims: Arc::new(Claims {
                exp,
                ..Claims::default()
            }),
            generation,
        }
    }

    #[test]
    fn cache_honors_expiry() {
        let cache = TokenCache::new();
        let key = [7u8; 32];
        cache.insert(key, cached(100, 1));
        assert_eq!(cache.get(&key, 99).map(|c| c.generation), Some(1));
        assert!(
            cache.get(&key, 100).is_none(),
            "expired entries are not served"
        );
        assert!(
            cache.get(&key, 50).is_none(),
            "and the expired entry is gone"
        );
    }

    #[test]
    fn cache_is_bounded() {
        let cache = TokenCache::new();
        for i in 0..(CACHE_ENTRIES * 2) {
            let mut key = [0u8; 32];
            key[..8].copy_from_slice(&(i as u64).to_le_bytes());
            key[0] = (i % 251) as u8;
            cache.insert(key, cached(u64::MAX, 1));
        }
        let total: usize = cache.shards.iter().map(|s| s.lock().unwrap().len()).sum();
        assert!(total <= CACHE_ENTRIES, "{total}");
    }
}
