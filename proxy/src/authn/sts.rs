//! STS-backed IAM identities: `k8s-aws-v1.<base64url presigned URL>` bearer
//! tokens, the format `aws eks get-token` and aws-iam-authenticator produce.
//!
//! Everything that can be checked locally is checked before any network call
//! (size, scheme, STS host, path, the allow-listed query parameters each once,
//! `Action=GetCallerIdentity`, the audience header among the signed headers,
//! a date within 15 minutes). The token is then replayed to the configured
//! STS endpoint with the configured audience in the audience header — STS
//! verifies the signature, so a token minted for another audience fails
//! there — and the answered ARN becomes the principal. Verdicts are cached
//! until the token's window ends; failures are never cached.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use base64::Engine;
use http::{StatusCode, Uri};

use super::jwks::Fetcher;
use super::sigv4::parse_amz_date;
use super::AwsPrincipal;
use crate::config::{check_fetch_url, StsConfig};

pub const PREFIX: &str = "k8s-aws-v1.";
/// Largest token accepted (prefix included).
pub const MAX_TOKEN: usize = 4096;
/// How long a token is good for after its `X-Amz-Date`, as aws-iam-authenticator.
pub const TOKEN_WINDOW: Duration = Duration::from_secs(15 * 60);
const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);
const TIMEOUT: Duration = Duration::from_secs(5);
const MAX_RESPONSE: usize = 64 * 1024;
const CACHE_ENTRIES: usize = 10_000;

const ALLOWED_PARAMS: [&str; 9] = [
    "Action",
    "Version",
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Date",
    "X-Amz-Expires",
    "X-Amz-SignedHeaders",
    "X-Amz-Signature",
    "X-Amz-Security-Token",
];

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StsError {
    #[error("malformed sts token: {0}")]
    Malformed(&'static str),
    #[error("sts token expired")]
    Expired,
    #[error("sts token not yet valid")]
    NotYetValid,
    #[error("sts rejected the token")]
    Rejected,
    #[error("sts answered with a principal warden cannot map")]
    Principal,
    /// STS could not be asked: 503, not 401.
    #[error("sts is unavailable")]
    Unavailable,
}

impl StsError {
    pub fn code(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed",
            Self::Expired | Self::NotYetValid => "expired",
            Self::Rejected => "rejected",
            Self::Principal => "principal",
            Self::Unavailable => "unavailable",
        }
    }
}

/// What STS said about a token.
#[derive(Debug, Clone)]
pub struct StsIdentity {
    pub principal: AwsPrincipal,
    pub access_key_id: String,
}

/// Verifies STS tokens by replaying them to one endpoint.
pub struct StsVerifier {
    endpoint: Uri,
    /// Hosts a token may name: the endpoint's and the partition's STS hosts.
    hosts: Vec<String>,
    audience_header: String,
    audience: String,
    cache_ttl: Duration,
    fetcher: Fetcher,
    cache: Mutex<HashMap<[u8; 32], (StsIdentity, SystemTime)>>,
}

impl std::fmt::Debug for StsVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StsVerifier")
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

/// The STS hosts of the commercial, China and GovCloud partitions.
fn is_aws_sts_host(host: &str) -> bool {
    let host = host.to_ascii_lowercase();
    if host == "sts.amazonaws.com" {
        return true;
    }
    let Some(rest) = host
        .strip_prefix("sts.")
        .or_else(|| host.strip_prefix("sts-fips."))
    else {
        return false;
    };
    let region_ok = |r: &str| {
        !r.is_empty()
            && r.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    [".amazonaws.com", ".amazonaws.com.cn", ".api.aws"]
        .iter()
        .any(|suffix| rest.strip_suffix(suffix).is_some_and(region_ok))
}

impl StsVerifier {
    pub fn new(cfg: &StsConfig, default_audience: &str) -> Result<Self, String> {
        check_fetch_url(&cfg.endpoint).map_err(|e| format!("[authn.sts] endpoint: {e}"))?;
        let endpoint: Uri = cfg
            .endpoint
            .parse()
            .map_err(|_| format!("[authn.sts] endpoint `{}` is not a URL", cfg.endpoint))?;
        let authority = endpoint
            .authority()
            .map(|a| a.as_str().to_ascii_lowercase())
            .ok_or_else(|| format!("[authn.sts] endpoint `{}` has no host", cfg.endpoint))?;
        Ok(Self {
            endpoint,
            hosts: vec![authority],
            audience_header: cfg.audience_header.to_ascii_lowercase(),
            audience: cfg
                .audience
                .clone()
                .unwrap_or_else(|| default_audience.to_owned()),
            cache_ttl: cfg.cache_ttl,
            fetcher: Fetcher::new(cfg.ca_file.as_deref())
                .map_err(|e| format!("[authn.sts]: {e}"))?,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Checks everything that needs no network; returns the URL to replay,
    /// the host it names, the access key and when the token's window ends.
    pub fn precheck(
        &self,
        token: &str,
        now: SystemTime,
    ) -> Result<(Uri, String, String, SystemTime), StsError> {
        if token.len() > MAX_TOKEN {
            return Err(StsError::Malformed("token too large"));
        }
        let encoded = token
            .strip_prefix(PREFIX)
            .ok_or(StsError::Malformed("not a k8s-aws-v1 token"))?;
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(encoded.trim_end_matches('='))
            .map_err(|_| StsError::Malformed("invalid base64"))?;
        let url = String::from_utf8(raw).map_err(|_| StsError::Malformed("invalid URL"))?;
        let uri: Uri = url
            .parse()
            .map_err(|_| StsError::Malformed("invalid URL"))?;
        check_fetch_url(&url).map_err(|_| StsError::Malformed("URL must be https"))?;
        let host = uri
            .authority()
            .map(|a| a.as_str().to_ascii_lowercase())
            .unwrap_or_default();
        if host.contains('@') {
            return Err(StsError::Malformed("URL must not carry userinfo"));
        }
        let bare = uri.host().unwrap_or("");
        let allowed = self.hosts.contains(&host) || (is_aws_sts_host(bare) && uri.port().is_none());
        if !allowed {
            return Err(StsError::Malformed("not an STS host"));
        }
        if uri.path() != "/" {
            return Err(StsError::Malformed("path must be /"));
        }
        let mut seen: HashMap<&str, String> = HashMap::new();
        for pair in uri
            .query()
            .unwrap_or("")
            .split('&')
            .filter(|p| !p.is_empty())
        {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let k = percent_encoding::percent_decode_str(k).decode_utf8_lossy();
            let name = ALLOWED_PARAMS
                .iter()
                .find(|n| **n == k)
                .ok_or(StsError::Malformed("unexpected query parameter"))?;
            let v = percent_encoding::percent_decode_str(v)
                .decode_utf8_lossy()
                .into_owned();
            if seen.insert(name, v).is_some() {
                return Err(StsError::Malformed("repeated query parameter"));
            }
        }
        let get = |k: &str| seen.get(k).map(String::as_str);
        if get("Action") != Some("GetCallerIdentity") {
            return Err(StsError::Malformed("Action must be GetCallerIdentity"));
        }
        if get("Version").is_some_and(|v| v != "2011-06-15") {
            return Err(StsError::Malformed("unsupported Version"));
        }
        if get("X-Amz-Algorithm") != Some("AWS4-HMAC-SHA256") {
            return Err(StsError::Malformed(
                "X-Amz-Algorithm must be AWS4-HMAC-SHA256",
            ));
        }
        let signed =
            get("X-Amz-SignedHeaders").ok_or(StsError::Malformed("missing X-Amz-SignedHeaders"))?;
        if !signed.split(';').any(|h| h == self.audience_header) {
            return Err(StsError::Malformed("audience header is not signed"));
        }
        if !signed.split(';').any(|h| h == "host") {
            return Err(StsError::Malformed("host is not signed"));
        }
        if get("X-Amz-Signature").is_none() {
            return Err(StsError::Malformed("missing X-Amz-Signature"));
        }
        let access_key_id = get("X-Amz-Credential")
            .and_then(|c| c.split('/').next())
            .filter(|k| !k.is_empty())
            .ok_or(StsError::Malformed("missing X-Amz-Credential"))?
            .to_owned();
        let date = get("X-Amz-Date")
            .and_then(parse_amz_date)
            .ok_or(StsError::Malformed("missing or malformed X-Amz-Date"))?;
        let until = date + TOKEN_WINDOW;
        if now > until {
            return Err(StsError::Expired);
        }
        if date
            .duration_since(now)
            .is_ok_and(|ahead| ahead > CLOCK_SKEW)
        {
            return Err(StsError::NotYetValid);
        }
        // Replay to the configured endpoint, keeping the signed path and query.
        let mut parts = self.endpoint.clone().into_parts();
        parts.path_and_query = uri.path_and_query().cloned();
        let replay = Uri::from_parts(parts).map_err(|_| StsError::Malformed("invalid URL"))?;
        Ok((replay, host, access_key_id, until))
    }

    /// Verifies a token: prechecks, cache, then STS.
    pub async fn verify(&self, token: &str) -> Result<StsIdentity, StsError> {
        let now = SystemTime::now();
        let (replay, host, access_key_id, until) = self.precheck(token, now)?;
        let mut key = [0u8; 32];
        key.copy_from_slice(
            aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes()).as_ref(),
        );
        if let Some((id, expires)) = self.cache.lock().ok().and_then(|c| c.get(&key).cloned()) {
            if now < expires {
                return Ok(id);
            }
        }
        let headers = [
            (self.audience_header.as_str(), self.audience.as_str()),
            ("accept", "application/json"),
        ];
        let answer = tokio::time::timeout(
            TIMEOUT,
            self.fetcher.request(&replay, &host, &headers, MAX_RESPONSE),
        )
        .await;
        let (status, _, body) = match answer {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "sts request failed");
                return Err(StsError::Unavailable);
            }
            Err(_) => {
                tracing::warn!("sts request timed out");
                return Err(StsError::Unavailable);
            }
        };
        if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            return Err(StsError::Unavailable);
        }
        if status != StatusCode::OK {
            return Err(StsError::Rejected);
        }
        let arn = caller_arn(&body).ok_or(StsError::Rejected)?;
        let principal = AwsPrincipal::from_arn(&arn).map_err(|_| StsError::Principal)?;
        let identity = StsIdentity {
            principal,
            access_key_id,
        };
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= CACHE_ENTRIES {
                cache.retain(|_, (_, t)| *t > now);
                if cache.len() >= CACHE_ENTRIES {
                    cache.clear();
                }
            }
            cache.insert(key, (identity.clone(), until.min(now + self.cache_ttl)));
        }
        Ok(identity)
    }
}

/// The `Arn` of a GetCallerIdentity answer, in JSON or XML.
fn caller_arn(body: &[u8]) -> Option<String> {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
        return v
            .pointer("/GetCallerIdentityResponse/GetCallerIdentityResult/Arn")
            .and_then(|a| a.as_str())
            .map(str::to_owned);
    }
    let text = std::str::from_utf8(body).ok()?;
    let start = text.find("<Arn>")? + "<Arn>".len();
    let end = start + text[start..].find("</Arn>")?;
    let arn = &text[start..end];
    (!arn.contains('<') && !arn.contains('&')).then(|| arn.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sts_hosts() {
        for ok in [
            "sts.amazonaws.com",
            "sts.us-east-1.amazonaws.com",
            "sts.cn-north-1.amazonaws.com.cn",
            "sts-fips.us-gov-west-1.amazonaws.com",
        ] {
            assert!(is_aws_sts_host(ok), "{ok}");
        }
        for bad in [
            "sts.amazonaws.com.evil.com",
            "evil.com",
            "sts..amazonaws.com",
            "xsts.amazonaws.com",
            "sts.us-east-1.amazonaws.co",
        ] {
            assert!(!is_aws_sts_host(bad), "{bad}");
        }
    }

    fn verifier() -> StsVerifier {
        let cfg = crate::config::Config::from_toml_str(
            "[authn.sts]\nendpoint = \"https://sts.us-east-1.amazonaws.com\"\n",
            std::path::Path::new("t"),
            std::iter::empty(),
        )
        .unwrap();
        StsVerifier::new(cfg.authn.sts.as_ref().unwrap(), "orders").unwrap()
    }

    fn token(url: &str) -> String {
        format!(
            "{PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(url)
        )
    }

    #[test]
    fn prechecks_refuse_before_any_network_call() {
        let v = verifier();
        let now = SystemTime::now();
        let date = {
            let fmt =
                time::macros::format_description!("[year][month][day]T[hour][minute][second]Z");
            time::OffsetDateTime::now_utc().format(&fmt).unwrap()
        };
        let q = format!(
            "Action=GetCallerIdentity&Version=2011-06-15&X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKID%2F20260101%2Fus-east-1%2Fsts%2Faws4_request&X-Amz-Date={date}&X-Amz-Expires=60&X-Amz-SignedHeaders=host%3Bx-k8s-aws-id&X-Amz-Signature=00"
        );
        let ok = format!("https://sts.us-east-1.amazonaws.com/?{q}");
        assert!(v.precheck(&token(&ok), now).is_ok());
        for (url, why) in [
            (
                format!("https://x@sts.us-east-1.amazonaws.com/?{q}"),
                "userinfo",
            ),
            (
                format!("https://sts.us-east-1.amazonaws.com:8443/?{q}"),
                "not an STS host",
            ),
            (format!("http://sts.us-east-1.amazonaws.com/?{q}"), "https"),
            (format!("https://sts.us-east-1.amazonaws.com/x?{q}"), "path"),
            (ok.replace("host%3Bx-k8s-aws-id", "host"), "audience header"),
            (format!("{ok}&Extra=1"), "unexpected"),
        ] {
            let err = v.precheck(&token(&url), now).unwrap_err().to_string();
            assert!(err.contains(why), "{why}: {err}");
        }
    }

    #[test]
    fn arn_from_json_and_xml() {
        let json = br#"{"GetCallerIdentityResponse":{"GetCallerIdentityResult":{"Arn":"arn:aws:iam::1:user/a","Account":"1"}}}"#;
        assert_eq!(caller_arn(json).as_deref(), Some("arn:aws:iam::1:user/a"));
        let xml = b"<GetCallerIdentityResponse><GetCallerIdentityResult><Arn>arn:aws:sts::1:assumed-role/r/s</Arn></GetCallerIdentityResult></GetCallerIdentityResponse>";
        assert_eq!(
            caller_arn(xml).as_deref(),
            Some("arn:aws:sts::1:assumed-role/r/s")
        );
        assert_eq!(caller_arn(b"<Error/>"), None);
    }
}
