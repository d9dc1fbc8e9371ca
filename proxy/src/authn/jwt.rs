//! Workload-identity JWTs: EKS service-account tokens, SPIFFE JWT-SVIDs and
//! OIDC tokens, verified against each issuer's key set.
//!
//! The issuer is chosen by the token's `iss` among configured issuers; the key
//! by `kid`; the algorithm is pinned by the key (never `none`, never HS*).

use std::collections::HashMap;
use std::path::Path;

use base64::Engine;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{errors::ErrorKind, Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::mtls::SpiffeId;
use super::Principal;
use crate::config::{JwtIssuerConfig, PrincipalKind};

/// Tokens larger than this are refused before any parsing.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

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
    #[error("signature invalid")]
    Signature,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("audience mismatch")]
    Audience,
    #[error("missing claim `{0}`")]
    MissingClaim(&'static str),
    #[error("subject does not map to a principal: {0}")]
    Subject(&'static str),
}

impl JwtError {
    pub fn code(&self) -> &'static str {
        match self {
            Self::TooLarge | Self::Malformed => "malformed",
            Self::UnknownIssuer => "unknown_issuer",
            Self::UnknownKey => "unknown_key_id",
            Self::Algorithm => "algorithm",
            Self::Signature => "signature_invalid",
            Self::Expired | Self::NotYetValid => "expired",
            Self::Audience => "audience_mismatch",
            Self::MissingClaim(_) | Self::Subject(_) => "claims",
        }
    }
}

struct Key {
    key: DecodingKey,
    alg: Algorithm,
}

/// One trusted issuer and its keys.
pub struct Issuer {
    cfg: JwtIssuerConfig,
    allowed: Vec<Algorithm>,
    keys: HashMap<String, Key>,
    /// Keys without a `kid`, usable only when the set has exactly one key.
    anonymous: Vec<Key>,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("issuer", &self.cfg.issuer)
            .field("keys", &self.keys.len())
            .finish()
    }
}

/// The key algorithm a JWK pins: its `alg`, else the one its curve implies.
fn pinned_alg(jwk: &jsonwebtoken::jwk::Jwk) -> Result<Algorithm, String> {
    if let Some(ka) = &jwk.common.key_algorithm {
        return format!("{ka:?}")
            .parse()
            .map_err(|_| format!("unsupported key algorithm `{ka:?}`"));
    }
    match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Ok(Algorithm::RS256),
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => Ok(Algorithm::ES256),
            EllipticCurve::P384 => Ok(Algorithm::ES384),
            _ => Err("unsupported elliptic curve".to_owned()),
        },
        AlgorithmParameters::OctetKeyPair(_) => Ok(Algorithm::EdDSA),
        AlgorithmParameters::OctetKey(_) => Err("symmetric keys are never accepted".to_owned()),
        _ => Err("unsupported key type".to_owned()),
    }
}

fn is_hmac(alg: Algorithm) -> bool {
    matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
}

impl Issuer {
    /// Builds an issuer from its config and a JWKS document.
    pub fn new(cfg: JwtIssuerConfig, jwks: &str) -> Result<Self, String> {
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
        let set: JwkSet = serde_json::from_str(jwks).map_err(|e| format!("invalid JWKS: {e}"))?;
        let mut keys = HashMap::new();
        let mut anonymous = Vec::new();
        for jwk in &set.keys {
            let alg = pinned_alg(jwk)?;
            if is_hmac(alg) || !allowed.contains(&alg) {
                continue;
            }
            let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("invalid JWK: {e}"))?;
            match &jwk.common.key_id {
                Some(kid) => {
                    keys.insert(kid.clone(), Key { key, alg });
                }
                None => anonymous.push(Key { key, alg }),
            }
        }
        if keys.is_empty() && anonymous.is_empty() {
            return Err("JWKS has no usable key for the allowed algorithms".to_owned());
        }
        Ok(Self {
            cfg,
            allowed,
            keys,
            anonymous,
        })
    }

    pub fn load(cfg: JwtIssuerConfig, path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::new(cfg, &text).map_err(|e| format!("{}: {e}", path.display()))
    }

    fn key_for(&self, kid: Option<&str>) -> Result<&Key, JwtError> {
        match kid {
            Some(kid) => self.keys.get(kid).ok_or(JwtError::UnknownKey),
            None => match (self.keys.len(), self.anonymous.as_slice()) {
                (0, [only]) => Ok(only),
                _ => Err(JwtError::UnknownKey),
            },
        }
    }
}

#[derive(Deserialize)]
struct Unverified {
    iss: Option<String>,
}

/// The claims warden reads.
#[derive(Debug, Clone, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub sub: Option<String>,
}

/// Verifies bearer tokens against the configured issuers.
#[derive(Debug, Default)]
pub struct JwtVerifier {
    issuers: HashMap<String, Issuer>,
}

impl JwtVerifier {
    pub fn new(issuers: Vec<Issuer>) -> Self {
        Self {
            issuers: issuers
                .into_iter()
                .map(|i| (i.cfg.issuer.clone(), i))
                .collect(),
        }
    }

    /// Verifies `token` and maps it to a principal.
    pub fn verify(&self, token: &str) -> Result<(Principal, Claims), JwtError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(JwtError::TooLarge);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| JwtError::Malformed)?;
        if is_hmac(header.alg) {
            return Err(JwtError::Algorithm);
        }
        let payload = token.split('.').nth(1).ok_or(JwtError::Malformed)?;
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| JwtError::Malformed)?;
        let unverified: Unverified =
            serde_json::from_slice(&raw).map_err(|_| JwtError::Malformed)?;
        let iss = unverified.iss.ok_or(JwtError::MissingClaim("iss"))?;
        let issuer = self.issuers.get(&iss).ok_or(JwtError::UnknownIssuer)?;
        let key = issuer.key_for(header.kid.as_deref())?;
        if header.alg != key.alg || !issuer.allowed.contains(&header.alg) {
            return Err(JwtError::Algorithm);
        }
        let mut v = Validation::new(key.alg);
        v.leeway = issuer.cfg.leeway.as_secs();
        v.validate_nbf = true;
        v.set_issuer(&[&issuer.cfg.issuer]);
        v.set_audience(&issuer.cfg.audiences);
        v.set_required_spec_claims(&["exp", "iss", "aud"]);
        let data =
            jsonwebtoken::decode::<Claims>(token, &key.key, &v).map_err(|e| match e.kind() {
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
        let claims = data.claims;
        let principal = map_principal(&issuer.cfg, &claims)?;
        Ok((principal, claims))
    }
}

fn map_principal(cfg: &JwtIssuerConfig, claims: &Claims) -> Result<Principal, JwtError> {
    let sub = claims
        .sub
        .as_deref()
        .filter(|s| !s.is_empty())
        .ok_or(JwtError::MissingClaim("sub"))?;
    match cfg.principal {
        PrincipalKind::K8s => {
            let rest = sub
                .strip_prefix("system:serviceaccount:")
                .ok_or(JwtError::Subject("not a service account"))?;
            let (ns, name) = rest
                .split_once(':')
                .filter(|(ns, name)| !ns.is_empty() && !name.is_empty() && !name.contains(':'))
                .ok_or(JwtError::Subject("not a service account"))?;
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
