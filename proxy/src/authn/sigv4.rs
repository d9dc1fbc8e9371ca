//! AWS Signature Version 4 verification, as pure functions over the request's
//! method, raw request-target, headers and payload hash.
//!
//! The canonical request is rebuilt from the client's `SignedHeaders`, in the
//! one canonical form AWS signers produce for non-S3 services (dot segments
//! removed, path encoded once more). Keys are derived with
//! `aws_sigv4::sign::v4::generate_signing_key`; signatures are compared in
//! constant time. An unknown access key costs the same work as a known one.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use aws_lc_rs::digest;
use serde::Deserialize;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

pub const ALGORITHM: &str = "AWS4-HMAC-SHA256";
pub const UNSIGNED_PAYLOAD: &str = "UNSIGNED-PAYLOAD";

/// Why a signature was refused. The `Display` text is what the client sees.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SigError {
    #[error("malformed authorization header: {0}")]
    Malformed(&'static str),
    #[error("missing x-amz-date")]
    MissingDate,
    #[error("malformed x-amz-date")]
    BadDate,
    #[error("signed header `{0}` is missing from the request")]
    MissingSignedHeader(String),
    #[error("`{0}` must be signed")]
    MustSign(&'static str),
    #[error("credential scope does not match: {0}")]
    WrongScope(&'static str),
    #[error("request expired")]
    Expired,
    #[error("request not yet valid")]
    NotYetValid,
    #[error("unknown access key")]
    UnknownAccessKey,
    #[error("signature mismatch")]
    SignatureMismatch,
    #[error("malformed query string")]
    BadQuery,
}

impl SigError {
    /// A fixed label value for metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Malformed(_) | Self::BadDate | Self::BadQuery => "malformed",
            Self::MissingDate | Self::MissingSignedHeader(_) | Self::MustSign(_) => {
                "missing_signed_header"
            }
            Self::WrongScope(_) => "wrong_scope",
            Self::Expired | Self::NotYetValid => "expired",
            Self::UnknownAccessKey => "unknown_access_key",
            Self::SignatureMismatch => "signature_mismatch",
        }
    }
}

/// A parsed `Authorization: AWS4-HMAC-SHA256 …` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthHeader<'a> {
    pub access_key_id: &'a str,
    pub date: &'a str,
    pub region: &'a str,
    pub service: &'a str,
    /// As sent: lowercase, sorted, `;`-separated.
    pub signed_headers: &'a str,
    pub signature: [u8; 32],
}

impl AuthHeader<'_> {
    pub fn scope(&self) -> String {
        format!(
            "{}/{}/{}/aws4_request",
            self.date, self.region, self.service
        )
    }
}

/// Parses the header value; each of `Credential`, `SignedHeaders`, `Signature`
/// exactly once.
pub fn parse_authorization(value: &str) -> Result<AuthHeader<'_>, SigError> {
    let rest = value
        .strip_prefix(ALGORITHM)
        .and_then(|r| r.strip_prefix(' '))
        .ok_or(SigError::Malformed("unsupported algorithm"))?;
    let (mut cred, mut signed, mut sig) = (None, None, None);
    for part in rest.split(',') {
        let part = part.trim();
        let (k, v) = part
            .split_once('=')
            .ok_or(SigError::Malformed("expected `key=value` components"))?;
        let slot = match k {
            "Credential" => &mut cred,
            "SignedHeaders" => &mut signed,
            "Signature" => &mut sig,
            _ => return Err(SigError::Malformed("unknown component")),
        };
        if slot.replace(v).is_some() {
            return Err(SigError::Malformed("repeated component"));
        }
    }
    let cred = cred.ok_or(SigError::Malformed("missing Credential"))?;
    let signed_headers = signed.ok_or(SigError::Malformed("missing SignedHeaders"))?;
    let sig = sig.ok_or(SigError::Malformed("missing Signature"))?;

    let mut it = cred.split('/');
    let (Some(access_key_id), Some(date), Some(region), Some(service), Some(term), None) = (
        it.next(),
        it.next(),
        it.next(),
        it.next(),
        it.next(),
        it.next(),
    ) else {
        return Err(SigError::Malformed(
            "credential must be key/date/region/service/aws4_request",
        ));
    };
    if term != "aws4_request" {
        return Err(SigError::Malformed("credential must end in aws4_request"));
    }
    if access_key_id.is_empty() || region.is_empty() || service.is_empty() {
        return Err(SigError::Malformed("empty credential component"));
    }
    if date.len() != 8 || !date.bytes().all(|b| b.is_ascii_digit()) {
        return Err(SigError::Malformed("credential date must be YYYYMMDD"));
    }
    let mut signature = [0u8; 32];
    hex::decode_to_slice(sig, &mut signature)
        .map_err(|_| SigError::Malformed("signature must be 64 hex digits"))?;
    check_signed_headers(signed_headers)?;
    Ok(AuthHeader {
        access_key_id,
        date,
        region,
        service,
        signed_headers,
        signature,
    })
}

fn check_signed_headers(list: &str) -> Result<(), SigError> {
    let mut prev: Option<&str> = None;
    for name in list.split(';') {
        let valid = !name.is_empty()
            && name.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.!#$%&'*+^`|~".contains(&b)
            });
        if !valid {
            return Err(SigError::Malformed(
                "SignedHeaders must be lowercase header names",
            ));
        }
        if prev.is_some_and(|p| p >= name) {
            return Err(SigError::Malformed(
                "SignedHeaders must be sorted and unique",
            ));
        }
        prev = Some(name);
    }
    Ok(())
}

/// Removes dot segments and empty segments, as AWS signers do for non-S3 services.
pub fn normalize_uri_path(path: &str) -> String {
    if path.is_empty() {
        return "/".to_owned();
    }
    let mut out: Vec<&str> = Vec::new();
    for seg in path.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut result = String::with_capacity(path.len());
    for seg in &out {
        result.push('/');
        result.push_str(seg);
    }
    let trailing = ["/", "/.", "/./", "/..", "/../"]
        .iter()
        .any(|s| path.ends_with(s));
    if result.is_empty() || (trailing && !result.ends_with('/')) {
        result.push('/');
    }
    result
}

fn push_encoded(out: &mut String, bytes: &[u8], keep_slash: bool) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in bytes {
        if b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'.' | b'_' | b'~')
            || (keep_slash && b == b'/')
        {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(HEX[usize::from(b >> 4)] as char);
            out.push(HEX[usize::from(b & 0xf)] as char);
        }
    }
}

/// The canonical URI: the path as received, normalized (when `normalize`),
/// then URI-encoded once more (the double encoding of non-S3 services).
pub fn canonical_uri(raw_path: &str, normalize: bool) -> String {
    let path = if normalize {
        normalize_uri_path(raw_path)
    } else if raw_path.is_empty() {
        "/".to_owned()
    } else {
        raw_path.to_owned()
    };
    let mut out = String::with_capacity(path.len() + 8);
    push_encoded(&mut out, path.as_bytes(), true);
    out
}

fn percent_decode(s: &str) -> Result<Vec<u8>, SigError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3).ok_or(SigError::BadQuery)?;
            let s = std::str::from_utf8(hex).map_err(|_| SigError::BadQuery)?;
            out.push(u8::from_str_radix(s, 16).map_err(|_| SigError::BadQuery)?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Ok(out)
}

/// The canonical query: names and values decoded, re-encoded per SigV4, sorted
/// by name then value. `skip` names a parameter to leave out (the presigned
/// signature itself).
pub fn canonical_query(raw_query: Option<&str>, skip: Option<&str>) -> Result<String, SigError> {
    let Some(q) = raw_query.filter(|q| !q.is_empty()) else {
        return Ok(String::new());
    };
    let mut pairs: Vec<(String, String)> = Vec::new();
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let mut key = String::new();
        push_encoded(&mut key, &percent_decode(k)?, false);
        if skip.is_some_and(|s| s == key) {
            continue;
        }
        let mut val = String::new();
        push_encoded(&mut val, &percent_decode(v)?, false);
        pairs.push((key, val));
    }
    pairs.sort();
    let mut out = String::with_capacity(q.len() + 8);
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(k);
        out.push('=');
        out.push_str(v);
    }
    Ok(out)
}

/// Trims and collapses whitespace runs into one space, as SigV4 asks.
fn push_trimmed(out: &mut Vec<u8>, value: &[u8]) {
    let mut first = true;
    for word in value
        .split(|b| b.is_ascii_whitespace())
        .filter(|w| !w.is_empty())
    {
        if !first {
            out.push(b' ');
        }
        out.extend_from_slice(word);
        first = false;
    }
}

/// What the verifier needs to see of a request.
pub trait SignedRequest {
    fn method(&self) -> &str;
    fn raw_path(&self) -> &str;
    fn raw_query(&self) -> Option<&str>;
    /// All values of a header (lowercase name), in order; `host` falls back to
    /// the HTTP/2 `:authority`.
    fn header_values(&self, name: &str) -> Vec<&[u8]>;
}

/// Builds the canonical request from the client's `SignedHeaders`.
pub fn canonical_request(
    req: &impl SignedRequest,
    signed_headers: &str,
    payload_hash: &str,
    normalize: bool,
) -> Result<Vec<u8>, SigError> {
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(req.method().as_bytes());
    out.push(b'\n');
    out.extend_from_slice(canonical_uri(req.raw_path(), normalize).as_bytes());
    out.push(b'\n');
    out.extend_from_slice(canonical_query(req.raw_query(), None)?.as_bytes());
    out.push(b'\n');
    for name in signed_headers.split(';') {
        let values = req.header_values(name);
        if values.is_empty() {
            return Err(SigError::MissingSignedHeader(name.to_owned()));
        }
        out.extend_from_slice(name.as_bytes());
        out.push(b':');
        for (i, v) in values.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            push_trimmed(&mut out, v);
        }
        out.push(b'\n');
    }
    out.push(b'\n');
    out.extend_from_slice(signed_headers.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(payload_hash.as_bytes());
    Ok(out)
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(digest::digest(&digest::SHA256, data))
}

pub fn string_to_sign(amz_date: &str, scope: &str, canonical_request: &[u8]) -> String {
    format!(
        "{ALGORITHM}\n{amz_date}\n{scope}\n{}",
        sha256_hex(canonical_request)
    )
}

/// Parses `YYYYMMDDTHHMMSSZ`.
pub fn parse_amz_date(s: &str) -> Option<SystemTime> {
    let fmt = time::macros::format_description!("[year][month][day]T[hour][minute][second]Z");
    let dt = time::PrimitiveDateTime::parse(s, &fmt).ok()?;
    let secs = dt.assume_utc().unix_timestamp();
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).ok()?))
}

/// One entry of the credentials file.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credential {
    pub access_key_id: String,
    secret_access_key: Zeroizing<String>,
    pub principal: String,
    pub org_id: Option<String>,
    #[serde(default)]
    pub tags: std::collections::BTreeMap<String, String>,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field("principal", &self.principal)
            .finish()
    }
}

impl Credential {
    pub fn new(access_key_id: &str, secret: &str, principal: &str) -> Self {
        Self {
            access_key_id: access_key_id.to_owned(),
            secret_access_key: Zeroizing::new(secret.to_owned()),
            principal: principal.to_owned(),
            org_id: None,
            tags: Default::default(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CredentialsFile {
    #[serde(default)]
    credential: Vec<Credential>,
}

/// Loads and checks a credentials file.
pub fn load_credentials(path: &Path) -> Result<Vec<Credential>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let file: CredentialsFile =
        toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut seen = std::collections::HashSet::new();
    for c in &file.credential {
        if !seen.insert(c.access_key_id.clone()) {
            return Err(format!(
                "{}: access key `{}` appears twice",
                path.display(),
                c.access_key_id
            ));
        }
        if c.secret_access_key.is_empty() {
            return Err(format!(
                "{}: access key `{}` has an empty secret",
                path.display(),
                c.access_key_id
            ));
        }
        crate::authn::AwsPrincipal::from_arn(&c.principal)
            .map_err(|e| format!("{}: access key `{}`: {e}", path.display(), c.access_key_id))?;
    }
    Ok(file.credential)
}

/// A verified signature: which credential signed.
#[derive(Debug)]
pub struct Verified<'a> {
    pub credential: &'a Credential,
}

/// Verifies header-authenticated SigV4 requests against a set of credentials.
#[derive(Debug)]
pub struct Verifier {
    regions: Vec<String>,
    service: String,
    max_skew: Duration,
    credentials: HashMap<String, Credential>,
    /// Used for unknown keys so they cost the same work as known ones.
    decoy: Credential,
}

impl Verifier {
    pub fn new(
        regions: Vec<String>,
        service: String,
        max_skew: Duration,
        credentials: Vec<Credential>,
    ) -> Self {
        Self {
            regions,
            service,
            max_skew,
            credentials: credentials
                .into_iter()
                .map(|c| (c.access_key_id.clone(), c))
                .collect(),
            decoy: Credential::new(
                "decoy",
                "decoy-secret-never-matches",
                "arn:aws:iam::000000000000:user/decoy",
            ),
        }
    }

    /// Checks the signature of `req` given its `Authorization` header and the
    /// payload hash to put in the canonical request.
    pub fn verify<'s>(
        &'s self,
        req: &impl SignedRequest,
        auth: &AuthHeader<'_>,
        payload_hash: &str,
        now: SystemTime,
    ) -> Result<Verified<'s>, SigError> {
        if !self.regions.iter().any(|r| r == auth.region) {
            return Err(SigError::WrongScope("region"));
        }
        if auth.service != self.service {
            return Err(SigError::WrongScope("service"));
        }
        let names = auth.signed_headers.split(';');
        if !names.clone().any(|n| n == "host") {
            return Err(SigError::MustSign("host"));
        }
        if !names.clone().any(|n| n == "x-amz-date") {
            return Err(SigError::MustSign("x-amz-date"));
        }
        let amz_date = match req.header_values("x-amz-date").as_slice() {
            [] => return Err(SigError::MissingDate),
            [one] => std::str::from_utf8(one).map_err(|_| SigError::BadDate)?,
            _ => return Err(SigError::BadDate),
        };
        let signed_at = parse_amz_date(amz_date).ok_or(SigError::BadDate)?;
        if !amz_date.starts_with(auth.date) {
            return Err(SigError::WrongScope("date does not match x-amz-date"));
        }
        match now.duration_since(signed_at) {
            Ok(age) if age > self.max_skew => return Err(SigError::Expired),
            Err(ahead) if ahead.duration() > self.max_skew => return Err(SigError::NotYetValid),
            _ => {}
        }
        let canonical = canonical_request(req, auth.signed_headers, payload_hash, true)?;
        let sts = string_to_sign(amz_date, &auth.scope(), &canonical);
        let known = self.credentials.get(auth.access_key_id);
        let credential = known.unwrap_or(&self.decoy);
        let key = aws_sigv4::sign::v4::generate_signing_key(
            &credential.secret_access_key,
            signed_at,
            auth.region,
            auth.service,
        );
        let expected = aws_sigv4::sign::v4::calculate_signature(key, sts.as_bytes());
        let mut expected_bytes = [0u8; 32];
        let decoded = hex::decode_to_slice(&expected, &mut expected_bytes).is_ok();
        let equal: bool = expected_bytes.ct_eq(&auth.signature).into();
        match known {
            None => Err(SigError::UnknownAccessKey),
            Some(c) if decoded && equal => Ok(Verified { credential: c }),
            Some(_) => Err(SigError::SignatureMismatch),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_authorization() {
        let v = "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders=host;x-amz-date, Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31";
        let a = parse_authorization(v).unwrap();
        assert_eq!(a.access_key_id, "AKIDEXAMPLE");
        assert_eq!(a.region, "us-east-1");
        assert_eq!(a.signed_headers, "host;x-amz-date");
        assert_eq!(a.scope(), "20150830/us-east-1/service/aws4_request");
    }

    #[test]
    fn refuses_malformed_authorization() {
        let good = "Credential=A/20150830/r/s/aws4_request, SignedHeaders=host;x-amz-date, Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31";
        assert!(parse_authorization(&format!("AWS4-HMAC-SHA256 {good}")).is_ok());
        for bad in [
            format!("AWS4-HMAC-SHA1 {good}"),
            format!("AWS4-HMAC-SHA256 {good}, Signature=00"),
            "AWS4-HMAC-SHA256 Credential=A/20150830/r/s/aws4_request, SignedHeaders=x-amz-date;host, Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31".to_owned(),
            "AWS4-HMAC-SHA256 Credential=A/20150830/r/s/aws4_request, SignedHeaders=Host, Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31".to_owned(),
            "AWS4-HMAC-SHA256 Credential=A/2015/r/s/aws4_request, SignedHeaders=host, Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31".to_owned(),
            "AWS4-HMAC-SHA256 Credential=A/20150830/r/s/aws4, SignedHeaders=host, Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31".to_owned(),
            "AWS4-HMAC-SHA256 Credential=A/20150830/r/s/aws4_request, SignedHeaders=host, Signature=zz".to_owned(),
        ] {
            assert!(parse_authorization(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn canonical_uri_encodes_once_more() {
        assert_eq!(canonical_uri("/a%3Db/@x", true), "/a%253Db/%40x");
        assert_eq!(canonical_uri("//a/./b/../c/", true), "/a/c/");
        assert_eq!(canonical_uri("", true), "/");
    }

    #[test]
    fn canonical_query_sorts_and_reencodes() {
        assert_eq!(
            canonical_query(Some("b=2&a=%7e&a=1&c"), None).unwrap(),
            "a=1&a=~&b=2&c="
        );
        assert!(canonical_query(Some("a=%zz"), None).is_err());
    }
}
