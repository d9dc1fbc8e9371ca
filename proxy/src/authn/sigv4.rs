//! AWS Signature Version 4 verification, as pure functions over the request's
//! method, raw request-target, headers and payload hash.
//!
//! The canonical request is rebuilt from the client's `SignedHeaders`, in the
//! one canonical form AWS signers produce for non-S3 services (dot segments
//! removed, path encoded once more). Keys are derived with
//! `aws_sigv4::sign::v4::generate_signing_key`; the signature (HMAC-SHA256
//! with that key, aws-lc) is compared in constant time. An unknown access key
//! costs the same work as a known one.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_lc_rs::{digest, hmac};
use serde::Deserialize;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

pub const ALGORITHM: &str = "AWS4-HMAC-SHA256";
pub const ALGORITHM_V4A: &str = "AWS4-ECDSA-P256-SHA256";

/// SigV4 (HMAC, one region) or SigV4A (ECDSA P-256, a region set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SigAlg {
    V4,
    V4a,
}

impl SigAlg {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V4 => ALGORITHM,
            Self::V4a => ALGORITHM_V4A,
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        match name {
            ALGORITHM => Some(Self::V4),
            ALGORITHM_V4A => Some(Self::V4a),
            _ => None,
        }
    }
}
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
    #[error("signature already used")]
    Replayed,
    #[error("too many recent signatures to check for replay")]
    ReplayGuardFull,
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
            Self::Replayed | Self::ReplayGuardFull => "replayed",
        }
    }
}

/// A parsed SigV4 credential, from the `Authorization` header or from the
/// `X-Amz-*` query parameters of a presigned URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Auth {
    pub algorithm: SigAlg,
    pub access_key_id: String,
    pub date: String,
    /// Empty for SigV4A, whose scope has no region (see `x-amz-region-set`).
    pub region: String,
    pub service: String,
    /// As sent: lowercase, sorted, `;`-separated.
    pub signed_headers: String,
    /// 32 bytes (SigV4) or a DER ECDSA signature (SigV4A).
    pub signature: Vec<u8>,
    /// The presigned form's `X-Amz-Date` and `X-Amz-Expires`.
    pub presigned: Option<(String, Duration)>,
}

impl Auth {
    pub fn scope(&self) -> String {
        let mut scope = String::with_capacity(64);
        scope.push_str(&self.date);
        scope.push('/');
        if self.algorithm == SigAlg::V4 {
            // SigV4A scopes name no region; the region set is signed instead.
            scope.push_str(&self.region);
            scope.push('/');
        }
        scope.push_str(&self.service);
        scope.push_str("/aws4_request");
        scope
    }
}

/// Longest validity of a presigned URL (7 days), as AWS allows.
pub const MAX_EXPIRES: Duration = Duration::from_secs(7 * 24 * 3600);

/// `key/date/region/service/aws4_request` (SigV4A: no region).
fn parse_credential(cred: &str, alg: SigAlg) -> Result<(String, String, String, String), SigError> {
    let parts: Vec<&str> = cred.split('/').collect();
    let (access_key_id, date, region, service, term) = match (alg, parts.as_slice()) {
        (SigAlg::V4, [k, d, r, s, t]) => (*k, *d, *r, *s, *t),
        (SigAlg::V4a, [k, d, s, t]) => (*k, *d, "*", *s, *t),
        (SigAlg::V4, _) => {
            return Err(SigError::Malformed(
                "credential must be key/date/region/service/aws4_request",
            ))
        }
        (SigAlg::V4a, _) => {
            return Err(SigError::Malformed(
                "credential must be key/date/service/aws4_request",
            ))
        }
    };
    let region = if alg == SigAlg::V4a { "" } else { region };
    if term != "aws4_request" {
        return Err(SigError::Malformed("credential must end in aws4_request"));
    }
    if access_key_id.is_empty() || (alg == SigAlg::V4 && region.is_empty()) || service.is_empty() {
        return Err(SigError::Malformed("empty credential component"));
    }
    if date.len() != 8 || !date.bytes().all(|b| b.is_ascii_digit()) {
        return Err(SigError::Malformed("credential date must be YYYYMMDD"));
    }
    Ok((
        access_key_id.to_owned(),
        date.to_owned(),
        region.to_owned(),
        service.to_owned(),
    ))
}

fn parse_signature(sig: &str, alg: SigAlg) -> Result<Vec<u8>, SigError> {
    match alg {
        SigAlg::V4 => {
            let mut signature = [0u8; 32];
            hex::decode_to_slice(sig, &mut signature)
                .map_err(|_| SigError::Malformed("signature must be 64 hex digits"))?;
            Ok(signature.to_vec())
        }
        SigAlg::V4a => match hex::decode(sig) {
            Ok(der) if (8..=72).contains(&der.len()) => Ok(der),
            _ => Err(SigError::Malformed(
                "signature must be a hex DER ECDSA signature",
            )),
        },
    }
}

/// Parses the header value; each of `Credential`, `SignedHeaders`, `Signature`
/// exactly once.
pub fn parse_authorization(value: &str) -> Result<Auth, SigError> {
    let (name, rest) = value
        .split_once(' ')
        .ok_or(SigError::Malformed("unsupported algorithm"))?;
    let alg = SigAlg::from_name(name).ok_or(SigError::Malformed("unsupported algorithm"))?;
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
    let (access_key_id, date, region, service) = parse_credential(cred, alg)?;
    let signature = parse_signature(sig, alg)?;
    check_signed_headers(signed_headers)?;
    Ok(Auth {
        algorithm: alg,
        access_key_id,
        date,
        region,
        service,
        signed_headers: signed_headers.to_owned(),
        signature,
        presigned: None,
    })
}

/// Parses the `X-Amz-*` parameters of a presigned URL: algorithm, credential,
/// date, expires (at most 7 days), signed headers and signature, each exactly
/// once.
pub fn parse_presigned(raw_query: &str) -> Result<Auth, SigError> {
    const NAMES: [&str; 6] = [
        "X-Amz-Algorithm",
        "X-Amz-Credential",
        "X-Amz-Date",
        "X-Amz-Expires",
        "X-Amz-SignedHeaders",
        "X-Amz-Signature",
    ];
    let mut found: [Option<String>; 6] = Default::default();
    for pair in raw_query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = percent_decode(k).map_err(|_| SigError::BadQuery)?;
        let Some(i) = NAMES.iter().position(|n| n.as_bytes() == k.as_slice()) else {
            continue;
        };
        let v = String::from_utf8(percent_decode(v)?).map_err(|_| SigError::BadQuery)?;
        if found[i].replace(v).is_some() {
            return Err(SigError::Malformed("repeated X-Amz-* query parameter"));
        }
    }
    let [Some(alg), Some(cred), Some(date), Some(expires), Some(signed), Some(sig)] = found else {
        return Err(SigError::Malformed(
            "presigned URL lacks an X-Amz-* parameter",
        ));
    };
    let alg = SigAlg::from_name(&alg).ok_or(SigError::Malformed("unsupported algorithm"))?;
    let expires: u64 = expires
        .parse()
        .map_err(|_| SigError::Malformed("X-Amz-Expires must be a number of seconds"))?;
    let expires = Duration::from_secs(expires);
    if expires.is_zero() || expires > MAX_EXPIRES {
        return Err(SigError::Malformed(
            "X-Amz-Expires must be 1 to 604800 seconds",
        ));
    }
    let (access_key_id, cdate, region, service) = parse_credential(&cred, alg)?;
    check_signed_headers(&signed)?;
    Ok(Auth {
        algorithm: alg,
        access_key_id,
        date: cdate,
        region,
        service,
        signed_headers: signed,
        signature: parse_signature(&sig, alg)?,
        presigned: Some((date, expires)),
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

/// Removes dot segments and empty segments, as AWS signers do for non-S3
/// services. A path with none (the usual case) is returned as it is.
pub fn normalize_uri_path(path: &str) -> Cow<'_, str> {
    if let Some(rest) = path.strip_prefix('/') {
        let mut segments = rest.split('/').peekable();
        let mut normal = true;
        while let Some(seg) = segments.next() {
            // An empty last segment is the trailing slash, which stays.
            if matches!(seg, "." | "..") || (seg.is_empty() && segments.peek().is_some()) {
                normal = false;
                break;
            }
        }
        if normal {
            return Cow::Borrowed(path);
        }
    }
    if path.is_empty() {
        return Cow::Borrowed("/");
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
    Cow::Owned(result)
}

/// Appends one byte URI-encoded as SigV4 asks: unreserved bytes as they are,
/// anything else as `%XX`, uppercase.
fn push_encoded_byte(out: &mut Vec<u8>, b: u8, keep_slash: bool) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    if b.is_ascii_alphanumeric()
        || matches!(b, b'-' | b'.' | b'_' | b'~')
        || (keep_slash && b == b'/')
    {
        out.push(b);
    } else {
        out.extend_from_slice(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]]);
    }
}

fn push_encoded(out: &mut Vec<u8>, bytes: &[u8], keep_slash: bool) {
    for &b in bytes {
        push_encoded_byte(out, b, keep_slash);
    }
}

fn hex_digit(d: u8) -> Result<u8, SigError> {
    match d {
        b'0'..=b'9' => Ok(d - b'0'),
        b'a'..=b'f' => Ok(d - b'a' + 10),
        b'A'..=b'F' => Ok(d - b'A' + 10),
        _ => Err(SigError::BadQuery),
    }
}

/// The byte a `%XX` escape at the start of `s` stands for.
fn escaped_byte(s: &[u8]) -> Result<u8, SigError> {
    match s {
        [b'%', hi, lo, ..] => Ok(hex_digit(*hi)? << 4 | hex_digit(*lo)?),
        _ => Err(SigError::BadQuery),
    }
}

/// Hands each byte of `s`, `%XX` escapes decoded, to `f`.
fn for_each_decoded(s: &[u8], mut f: impl FnMut(u8)) -> Result<(), SigError> {
    let mut i = 0;
    while let Some(&b) = s.get(i) {
        if b == b'%' {
            f(escaped_byte(&s[i..])?);
            i += 3;
        } else {
            f(b);
            i += 1;
        }
    }
    Ok(())
}

/// Appends `s` decoded once and encoded as SigV4 asks, in one pass.
fn push_reencoded(out: &mut Vec<u8>, s: &[u8]) -> Result<(), SigError> {
    for_each_decoded(s, |b| push_encoded_byte(out, b, false))
}

/// How the canonical URI is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UriEncoding {
    /// Non-S3 services: dot segments removed, slashes merged, the path as
    /// received URI-encoded once more.
    #[default]
    Double,
    /// S3 style: the path as received, decoded and encoded once, not normalized.
    Single,
}

fn push_canonical_uri(out: &mut Vec<u8>, raw_path: &str, encoding: UriEncoding) {
    match encoding {
        UriEncoding::Double => push_encoded(out, normalize_uri_path(raw_path).as_bytes(), true),
        UriEncoding::Single => {
            let path = if raw_path.is_empty() { "/" } else { raw_path };
            // A malformed escape is kept literally (and then encoded).
            let bytes = percent_decode(path).unwrap_or_else(|_| path.as_bytes().to_vec());
            push_encoded(out, &bytes, true);
        }
    }
}

/// The canonical URI of a raw request path.
pub fn canonical_uri(raw_path: &str, encoding: UriEncoding) -> String {
    let mut out = Vec::with_capacity(raw_path.len() + 8);
    push_canonical_uri(&mut out, raw_path, encoding);
    // Every byte pushed is ASCII.
    String::from_utf8_lossy(&out).into_owned()
}

fn percent_decode(s: &str) -> Result<Vec<u8>, SigError> {
    let mut out = Vec::with_capacity(s.len());
    for_each_decoded(s.as_bytes(), |b| out.push(b))?;
    Ok(out)
}

/// Appends the canonical query: names and values decoded, re-encoded per
/// SigV4, sorted by name then value. `skip` names a parameter to leave out
/// (the presigned signature itself).
fn push_canonical_query(
    out: &mut Vec<u8>,
    raw_query: Option<&str>,
    skip: Option<&str>,
) -> Result<(), SigError> {
    let Some(q) = raw_query.filter(|q| !q.is_empty()) else {
        return Ok(());
    };
    // The re-encoded pairs side by side in one buffer: (name start, value
    // start, value end).
    let mut buf = Vec::with_capacity(q.len() + 16);
    let mut pairs: Vec<(usize, usize, usize)> = Vec::with_capacity(8);
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let start = buf.len();
        push_reencoded(&mut buf, k.as_bytes())?;
        let mid = buf.len();
        if skip.is_some_and(|s| s.as_bytes() == &buf[start..mid]) {
            buf.truncate(start);
            continue;
        }
        push_reencoded(&mut buf, v.as_bytes())?;
        pairs.push((start, mid, buf.len()));
    }
    let pair = |&(s, m, e): &(usize, usize, usize)| (&buf[s..m], &buf[m..e]);
    pairs.sort_unstable_by(|a, b| pair(a).cmp(&pair(b)));
    for (i, p) in pairs.iter().enumerate() {
        if i > 0 {
            out.push(b'&');
        }
        let (k, v) = pair(p);
        out.extend_from_slice(k);
        out.push(b'=');
        out.extend_from_slice(v);
    }
    Ok(())
}

/// The canonical query of a raw query string (see `push_canonical_query`).
pub fn canonical_query(raw_query: Option<&str>, skip: Option<&str>) -> Result<String, SigError> {
    let mut out = Vec::new();
    push_canonical_query(&mut out, raw_query, skip)?;
    String::from_utf8(out).map_err(|_| SigError::BadQuery)
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
    fn header_values<'a>(&'a self, name: &str) -> impl Iterator<Item = &'a [u8]>;
}

/// Builds the canonical request from the client's `SignedHeaders`.
/// `presigned` leaves `X-Amz-Signature` out of the canonical query.
pub fn canonical_request(
    req: &impl SignedRequest,
    signed_headers: &str,
    payload_hash: &str,
    encoding: UriEncoding,
    presigned: bool,
) -> Result<Vec<u8>, SigError> {
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(req.method().as_bytes());
    out.push(b'\n');
    push_canonical_uri(&mut out, req.raw_path(), encoding);
    out.push(b'\n');
    let skip = presigned.then_some("X-Amz-Signature");
    push_canonical_query(&mut out, req.raw_query(), skip)?;
    out.push(b'\n');
    for name in signed_headers.split(';') {
        let mut values = req.header_values(name);
        let Some(first) = values.next() else {
            return Err(SigError::MissingSignedHeader(name.to_owned()));
        };
        out.extend_from_slice(name.as_bytes());
        out.push(b':');
        push_trimmed(&mut out, first);
        for v in values {
            out.push(b',');
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
    let mut out = String::with_capacity(64);
    crate::push_hex(&mut out, digest::digest(&digest::SHA256, data).as_ref());
    out
}

pub fn string_to_sign(
    alg: SigAlg,
    amz_date: &str,
    scope: &str,
    canonical_request: &[u8],
) -> String {
    let alg = alg.as_str();
    let mut out = String::with_capacity(alg.len() + amz_date.len() + scope.len() + 67);
    for part in [alg, "\n", amz_date, "\n", scope, "\n"] {
        out.push_str(part);
    }
    let hash = digest::digest(&digest::SHA256, canonical_request);
    crate::push_hex(&mut out, hash.as_ref());
    out
}

/// Whether a SigV4A region set (`us-east-1,eu-*` or `*`) covers `region`.
pub fn region_set_covers(set: &str, region: &str) -> bool {
    set.split(',')
        .map(str::trim)
        .any(|entry| match entry.strip_suffix('*') {
            Some(prefix) => region.starts_with(prefix),
            None => entry == region,
        })
}

/// The SigV4A public key (uncompressed P-256 point) of a credential, derived
/// as the SigV4A spec does from the access key id and secret.
pub fn sigv4a_public_key(access_key_id: &str, secret: &str) -> Option<Vec<u8>> {
    let scalar = aws_sigv4::sign::v4a::generate_signing_key(access_key_id, secret);
    let private = aws_lc_rs::agreement::PrivateKey::from_private_key(
        &aws_lc_rs::agreement::ECDH_P256,
        scalar.as_ref(),
    )
    .ok()?;
    let public = private.compute_public_key().ok()?;
    Some(public.as_ref().to_vec())
}

/// Parses `YYYYMMDDTHHMMSSZ` (UTC, no leap second), byte by byte: it runs on
/// every signed request.
pub fn parse_amz_date(s: &str) -> Option<SystemTime> {
    let b: &[u8; 16] = s.as_bytes().try_into().ok()?;
    if b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let num = |range: std::ops::Range<usize>| -> Option<u32> {
        b[range].iter().try_fold(0u32, |n, &d| {
            d.is_ascii_digit().then(|| n * 10 + u32::from(d - b'0'))
        })
    };
    let (year, month, day) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (hour, minute, second) = (num(9..11)?, num(11..13)?, num(13..15)?);
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let month_days = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return None,
    };
    if year < 1970 || day == 0 || day > month_days || hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    // Days since 1970-01-01 of a proleptic Gregorian date (Hinnant's
    // days_from_civil, for years from 1970 on).
    let y = u64::from(if month <= 2 { year - 1 } else { year });
    let m = u64::from(month);
    let (era, yoe) = (y / 400, y % 400);
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + u64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + u64::from(hour * 3600 + minute * 60 + second);
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
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
    /// `principal`, read once when the credential is loaded.
    #[serde(skip)]
    parsed: Option<crate::authn::AwsPrincipal>,
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
            parsed: crate::authn::AwsPrincipal::from_arn(principal).ok(),
        }
    }

    /// The principal this credential signs as; `None` only for a credential
    /// built from an ARN that is not a role, user or assumed-role.
    pub fn aws_principal(&self) -> Option<&crate::authn::AwsPrincipal> {
        self.parsed.as_ref()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CredentialsFile {
    #[serde(default)]
    credential: Vec<Credential>,
}

/// Loads and checks a credentials file. `env:NAME` reads the file's TOML
/// from the environment variable `NAME` (ECS injects Secrets Manager and
/// SSM values as environment variables).
pub fn load_credentials(path: &Path) -> Result<Vec<Credential>, String> {
    let text = match path.to_str().and_then(|p| p.strip_prefix("env:")) {
        Some(var) => {
            std::env::var(var).map_err(|_| format!("environment variable `{var}` is not set"))?
        }
        None => std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?,
    };
    let mut file: CredentialsFile =
        toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut seen = std::collections::HashSet::new();
    for c in &mut file.credential {
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
        let parsed = crate::authn::AwsPrincipal::from_arn(&c.principal)
            .and_then(|p| {
                c.org_id
                    .as_deref()
                    .map_or(Ok(()), crate::authn::check_org_id)
                    .map(|()| p)
            })
            .map_err(|e| format!("{}: access key `{}`: {e}", path.display(), c.access_key_id))?;
        c.parsed = Some(parsed);
    }
    Ok(file.credential)
}

/// A verified signature: which credential signed.
#[derive(Debug)]
pub struct Verified<'a> {
    pub credential: &'a Credential,
    pub presigned: bool,
}

/// Signing keys per (access key, date, region, service), derived and made
/// into HMAC keys (inner and outer pads hashed) once, so a request costs one
/// HMAC for its signature, not five key derivations and a key setup.
/// Bounded: cleared when full.
#[derive(Debug, Default)]
struct KeyCache {
    keys: std::sync::Mutex<HashMap<String, Arc<hmac::Key>>>,
}

const KEY_CACHE_ENTRIES: usize = 4096;

impl KeyCache {
    fn get_or_derive(
        &self,
        credential: &Credential,
        date: &str,
        signed_at: SystemTime,
        region: &str,
        service: &str,
    ) -> Arc<hmac::Key> {
        let mut id = String::with_capacity(96);
        id.push_str(&credential.access_key_id);
        for part in [date, region, service] {
            id.push('/');
            id.push_str(part);
        }
        if let Some(k) = self.keys.lock().ok().and_then(|m| m.get(&id).cloned()) {
            return k;
        }
        let derived = aws_sigv4::sign::v4::generate_signing_key(
            &credential.secret_access_key,
            signed_at,
            region,
            service,
        );
        let key = Arc::new(hmac::Key::new(hmac::HMAC_SHA256, derived.as_ref()));
        if let Ok(mut m) = self.keys.lock() {
            if m.len() >= KEY_CACHE_ENTRIES {
                m.clear();
            }
            m.insert(id, key.clone());
        }
        key
    }
}

/// Remembers signatures until their window ends, refusing a second use.
#[derive(Debug)]
pub struct ReplayGuard {
    seen: std::sync::Mutex<HashMap<[u8; 32], u64>>,
    capacity: usize,
}

impl ReplayGuard {
    pub fn new(capacity: usize) -> Self {
        Self {
            seen: std::sync::Mutex::new(HashMap::new()),
            capacity,
        }
    }

    /// Records `signature` as used until `until` (seconds since the epoch).
    fn check(&self, signature: &[u8; 32], until: u64, now: u64) -> Result<(), SigError> {
        let mut seen = self.seen.lock().map_err(|_| SigError::ReplayGuardFull)?;
        if seen.get(signature).is_some_and(|&t| t >= now) {
            return Err(SigError::Replayed);
        }
        if seen.len() >= self.capacity {
            seen.retain(|_, t| *t >= now);
            if seen.len() >= self.capacity {
                return Err(SigError::ReplayGuardFull);
            }
        }
        seen.insert(*signature, until);
        Ok(())
    }
}

fn epoch_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// Verifies SigV4 requests (header or presigned) against a set of credentials.
#[derive(Debug)]
pub struct Verifier {
    regions: Vec<String>,
    service: String,
    max_skew: Duration,
    encoding: UriEncoding,
    credentials: HashMap<String, Credential>,
    /// Used for unknown keys so they cost the same work as known ones.
    decoy: Credential,
    /// SigV4A public keys, derived once per credential (and the decoy's).
    v4a_keys: HashMap<String, Vec<u8>>,
    decoy_v4a: Vec<u8>,
    keys: Option<KeyCache>,
    replay: Option<ReplayGuard>,
}

impl Verifier {
    pub fn new(
        regions: Vec<String>,
        service: String,
        max_skew: Duration,
        credentials: Vec<Credential>,
    ) -> Self {
        let decoy = Credential::new(
            "decoy",
            "decoy-secret-never-matches",
            "arn:aws:iam::000000000000:user/decoy",
        );
        let v4a_keys = credentials
            .iter()
            .filter_map(|c| {
                sigv4a_public_key(&c.access_key_id, &c.secret_access_key)
                    .map(|k| (c.access_key_id.clone(), k))
            })
            .collect();
        let decoy_v4a =
            sigv4a_public_key(&decoy.access_key_id, &decoy.secret_access_key).unwrap_or_default();
        Self {
            regions,
            service,
            max_skew,
            encoding: UriEncoding::Double,
            credentials: credentials
                .into_iter()
                .map(|c| (c.access_key_id.clone(), c))
                .collect(),
            decoy,
            v4a_keys,
            decoy_v4a,
            keys: Some(KeyCache::default()),
            replay: None,
        }
    }

    pub fn with_encoding(mut self, encoding: UriEncoding) -> Self {
        self.encoding = encoding;
        self
    }

    /// Refuses a signature seen before within its window (bounded memory).
    pub fn with_replay_guard(mut self, capacity: usize) -> Self {
        self.replay = Some(ReplayGuard::new(capacity));
        self
    }

    /// Derives the signing key on every request (benchmarks of the cold path).
    pub fn without_key_cache(mut self) -> Self {
        self.keys = None;
        self
    }

    /// What can be refused before the body is read and before any secret is
    /// used: the credential's scope, the headers that must be signed, the
    /// signing time's window, and an access key warden does not know. A
    /// request whose body must be hashed is checked this far first, so a
    /// client learns its mistake without uploading the body (and a client
    /// with no known key cannot make warden buffer one).
    pub fn precheck(
        &self,
        req: &impl SignedRequest,
        auth: &Auth,
        now: SystemTime,
    ) -> Result<(), SigError> {
        self.scope_and_window(req, auth, now)?;
        if !self.credentials.contains_key(&auth.access_key_id) {
            return Err(SigError::UnknownAccessKey);
        }
        Ok(())
    }

    /// The scope, the headers that must be signed and the signing time's
    /// window: the `x-amz-date` (or presigned date) as sent, the signing
    /// time, and the end of the window.
    fn scope_and_window<'r>(
        &self,
        req: &'r impl SignedRequest,
        auth: &'r Auth,
        now: SystemTime,
    ) -> Result<(&'r str, SystemTime, SystemTime), SigError> {
        match auth.algorithm {
            SigAlg::V4 if !self.regions.contains(&auth.region) => {
                return Err(SigError::WrongScope("region"));
            }
            SigAlg::V4 => {}
            SigAlg::V4a => {
                // The region set travels in a signed header or the signed query.
                let set = match &auth.presigned {
                    Some(_) => query_value(req.raw_query(), "X-Amz-Region-Set")?,
                    None => {
                        if !auth
                            .signed_headers
                            .split(';')
                            .any(|n| n == "x-amz-region-set")
                        {
                            return Err(SigError::MustSign("x-amz-region-set"));
                        }
                        let mut sets = req.header_values("x-amz-region-set");
                        match (sets.next(), sets.next()) {
                            (Some(one), None) => std::str::from_utf8(one).ok().map(str::to_owned),
                            _ => None,
                        }
                    }
                }
                .ok_or(SigError::MissingSignedHeader("x-amz-region-set".to_owned()))?;
                if !self.regions.iter().any(|r| region_set_covers(&set, r)) {
                    return Err(SigError::WrongScope("region set"));
                }
            }
        }
        if auth.service != self.service {
            return Err(SigError::WrongScope("service"));
        }
        if !auth.signed_headers.split(';').any(|n| n == "host") {
            return Err(SigError::MustSign("host"));
        }
        let (amz_date, window) = match &auth.presigned {
            Some((date, expires)) => (date.as_str(), Some(*expires)),
            None => {
                if !auth.signed_headers.split(';').any(|n| n == "x-amz-date") {
                    return Err(SigError::MustSign("x-amz-date"));
                }
                let mut dates = req.header_values("x-amz-date");
                let date = match (dates.next(), dates.next()) {
                    (None, _) => return Err(SigError::MissingDate),
                    (Some(one), None) => std::str::from_utf8(one).map_err(|_| SigError::BadDate)?,
                    (Some(_), Some(_)) => return Err(SigError::BadDate),
                };
                (date, None)
            }
        };
        let signed_at = parse_amz_date(amz_date).ok_or(SigError::BadDate)?;
        if !amz_date.starts_with(auth.date.as_str()) {
            return Err(SigError::WrongScope("date does not match x-amz-date"));
        }
        // Header form: within the skew either way. Presigned: from the signing
        // time (less the skew) until it expires.
        let valid_until = signed_at + window.unwrap_or(self.max_skew);
        if now > valid_until {
            return Err(SigError::Expired);
        }
        if signed_at
            .duration_since(now)
            .is_ok_and(|ahead| ahead > self.max_skew)
        {
            return Err(SigError::NotYetValid);
        }
        Ok((amz_date, signed_at, valid_until))
    }

    /// Checks the signature of `req` given its parsed credential and the
    /// payload hash to put in the canonical request.
    pub fn verify<'s>(
        &'s self,
        req: &impl SignedRequest,
        auth: &Auth,
        payload_hash: &str,
        now: SystemTime,
    ) -> Result<Verified<'s>, SigError> {
        let (amz_date, signed_at, valid_until) = self.scope_and_window(req, auth, now)?;
        let canonical = canonical_request(
            req,
            &auth.signed_headers,
            payload_hash,
            self.encoding,
            auth.presigned.is_some(),
        )?;
        let sts = string_to_sign(auth.algorithm, amz_date, &auth.scope(), &canonical);
        let known = self.credentials.get(&auth.access_key_id);
        let credential = known.unwrap_or(&self.decoy);
        if auth.algorithm == SigAlg::V4a {
            let public = match known {
                Some(c) => self
                    .v4a_keys
                    .get(&c.access_key_id)
                    .unwrap_or(&self.decoy_v4a),
                None => &self.decoy_v4a,
            };
            let valid = aws_lc_rs::signature::UnparsedPublicKey::new(
                &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1,
                public,
            )
            .verify(sts.as_bytes(), &auth.signature)
            .is_ok();
            let credential = match known {
                None => return Err(SigError::UnknownAccessKey),
                Some(c) if valid => c,
                Some(_) => return Err(SigError::SignatureMismatch),
            };
            return self.finish(credential, auth, valid_until, now);
        }
        let key = match &self.keys {
            Some(cache) => cache.get_or_derive(
                credential,
                &auth.date,
                signed_at,
                &auth.region,
                &auth.service,
            ),
            None => KeyCache::default().get_or_derive(
                credential,
                &auth.date,
                signed_at,
                &auth.region,
                &auth.service,
            ),
        };
        // HMAC-SHA256 of the string to sign, as raw bytes: no hex round trip.
        let expected = hmac::sign(&key, sts.as_bytes());
        let equal: bool = expected.as_ref().ct_eq(&auth.signature).into();
        let credential = match known {
            None => return Err(SigError::UnknownAccessKey),
            Some(c) if equal => c,
            Some(_) => return Err(SigError::SignatureMismatch),
        };
        self.finish(credential, auth, valid_until, now)
    }

    /// The replay guard, then the verdict.
    fn finish<'s>(
        &'s self,
        credential: &'s Credential,
        auth: &Auth,
        valid_until: SystemTime,
        now: SystemTime,
    ) -> Result<Verified<'s>, SigError> {
        if let Some(guard) = &self.replay {
            let mut id = [0u8; 32];
            id.copy_from_slice(digest::digest(&digest::SHA256, &auth.signature).as_ref());
            guard.check(&id, epoch_secs(valid_until), epoch_secs(now))?;
        }
        Ok(Verified {
            credential,
            presigned: auth.presigned.is_some(),
        })
    }
}

/// The decoded value of a query parameter that appears exactly once.
fn query_value(raw_query: Option<&str>, name: &str) -> Result<Option<String>, SigError> {
    let mut found = None;
    for pair in raw_query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if percent_decode(k)? == name.as_bytes() {
            if found.is_some() {
                return Err(SigError::Malformed("repeated X-Amz-* query parameter"));
            }
            found = Some(String::from_utf8(percent_decode(v)?).map_err(|_| SigError::BadQuery)?);
        }
    }
    Ok(found)
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
        assert_eq!(
            canonical_uri("/a%3Db/@x", UriEncoding::Double),
            "/a%253Db/%40x"
        );
        assert_eq!(canonical_uri("//a/./b/../c/", UriEncoding::Double), "/a/c/");
        assert_eq!(canonical_uri("", UriEncoding::Double), "/");
        assert_eq!(
            canonical_uri("/a%3Db/@x", UriEncoding::Single),
            "/a%3Db/%40x"
        );
        assert_eq!(canonical_uri("//a/./b", UriEncoding::Single), "//a/./b");
    }

    #[test]
    fn normal_paths_are_kept_and_others_normalized() {
        for normal in ["/", "/a", "/a/b/", "/a.b/..c/.d", "/%2E%2E/x"] {
            assert!(
                matches!(normalize_uri_path(normal), Cow::Borrowed(p) if p == normal),
                "{normal}"
            );
        }
        for (path, want) in [
            ("", "/"),
            ("//", "/"),
            ("/a//b", "/a/b"),
            ("/a/./b", "/a/b"),
            ("/a/b/..", "/a/"),
            ("/a/b/../", "/a/"),
            ("/..", "/"),
            ("/a/.", "/a/"),
            ("a/b", "/a/b"),
        ] {
            assert_eq!(normalize_uri_path(path), want, "{path}");
        }
    }

    #[test]
    fn presigned_parameters() {
        let q = "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKID%2F20150830%2Fus-east-1%2Fservice%2Faws4_request&X-Amz-Date=20150830T123600Z&X-Amz-Expires=60&X-Amz-SignedHeaders=host&X-Amz-Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31&a=1";
        let a = parse_presigned(q).unwrap();
        assert_eq!(a.access_key_id, "AKID");
        assert_eq!(
            a.presigned,
            Some(("20150830T123600Z".to_owned(), Duration::from_secs(60)))
        );
        for bad in [
            q.replace("X-Amz-Expires=60", "X-Amz-Expires=604801"),
            q.replace("X-Amz-Expires=60", "X-Amz-Expires=0"),
            q.replace("&a=1", "&X-Amz-Date=20150830T123600Z"),
            q.replace(
                "X-Amz-Algorithm=AWS4-HMAC-SHA256",
                "X-Amz-Algorithm=AWS4-HMAC-SHA1",
            ),
            q.replace("&X-Amz-SignedHeaders=host", ""),
        ] {
            assert!(parse_presigned(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn replay_guard_refuses_a_second_use_and_is_bounded() {
        let g = ReplayGuard::new(2);
        assert_eq!(g.check(&[1; 32], 100, 10), Ok(()));
        assert_eq!(g.check(&[1; 32], 100, 11), Err(SigError::Replayed));
        assert_eq!(g.check(&[2; 32], 100, 12), Ok(()));
        assert_eq!(g.check(&[3; 32], 100, 13), Err(SigError::ReplayGuardFull));
        // Once the window of the first ends, it may be forgotten.
        assert_eq!(g.check(&[3; 32], 200, 150), Ok(()));
    }

    #[test]
    fn canonical_query_sorts_and_reencodes() {
        assert_eq!(
            canonical_query(Some("b=2&a=%7e&a=1&c"), None).unwrap(),
            "a=1&a=~&b=2&c="
        );
        for bad in ["a=%zz", "a=%4", "a%=1", "a=%+1", "a=%-1", "a=1&b=%"] {
            assert!(canonical_query(Some(bad), None).is_err(), "{bad}");
        }
        assert_eq!(
            canonical_query(
                Some("X-Amz-Signature=ab&b=%2f%2F&a=%41"),
                Some("X-Amz-Signature")
            )
            .unwrap(),
            "a=A&b=%2F%2F"
        );
    }

    #[test]
    fn amz_dates_parse_as_the_calendar_says_and_nothing_else() {
        let fmt = time::macros::format_description!("[year][month][day]T[hour][minute][second]Z");
        // Every day from 1970 to 2100 at a few times of day, leap days included.
        let mut day = time::macros::datetime!(1970-01-01 00:00:00);
        let end = time::macros::datetime!(2100-03-02 00:00:00);
        let mut n = 0u64;
        while day < end {
            let t = day + time::Duration::seconds(i64::try_from(n % 86_400).unwrap());
            let text = t.format(&fmt).unwrap();
            let want = SystemTime::UNIX_EPOCH
                + Duration::from_secs(u64::try_from(t.assume_utc().unix_timestamp()).unwrap());
            assert_eq!(parse_amz_date(&text), Some(want), "{text}");
            day += time::Duration::days(1);
            n += 12_347;
        }
        for bad in [
            "",
            "20150830T123600",
            "20150830T123600ZZ",
            "20150830t123600Z",
            "20150830T123600z",
            "2015083OT123600Z",
            "+0150830T123600Z",
            "20151330T123600Z",
            "20150001T123600Z",
            "20150800T123600Z",
            "20150431T123600Z",
            "20150229T123600Z",
            "21000229T123600Z",
            "20150830T243600Z",
            "20150830T126000Z",
            "20150830T123660Z",
            "19691231T235959Z",
            "2015-08-30T12:36",
        ] {
            assert_eq!(parse_amz_date(bad), None, "{bad}");
        }
        assert!(parse_amz_date("20160229T000000Z").is_some());
        assert!(parse_amz_date("20000229T235959Z").is_some());
    }

    /// A deterministic stream of pseudo-random numbers (xorshift64).
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n as u64) as usize
        }
    }

    /// `s` changed in one to three places: a character replaced, inserted or
    /// removed, a stretch repeated, or the rest cut off.
    fn mutate(s: &str, alphabet: &[char], rng: &mut Rng) -> String {
        let mut c: Vec<char> = s.chars().collect();
        for _ in 0..=rng.below(3) {
            let at = rng.below(c.len() + 1);
            match rng.below(5) {
                4 => c.truncate(at),
                0 if at < c.len() => c[at] = alphabet[rng.below(alphabet.len())],
                1 => c.insert(at, alphabet[rng.below(alphabet.len())]),
                2 if at < c.len() => {
                    c.remove(at);
                }
                _ => {
                    let end = (at + rng.below(12)).min(c.len());
                    let stretch: Vec<char> = c[at..end].to_vec();
                    c.splice(at..at, stretch);
                }
            }
        }
        c.into_iter().collect()
    }

    /// Whether every byte is unreserved or a `%XX` escape with upper-case
    /// hex digits, besides the bytes `extra` lets through.
    fn encoded_only(s: &str, extra: &[u8]) -> bool {
        let b = s.as_bytes();
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'%' => {
                    let upper_hex = |c: Option<&u8>| {
                        c.is_some_and(|c| c.is_ascii_digit() || (b'A'..=b'F').contains(c))
                    };
                    if !(upper_hex(b.get(i + 1)) && upper_hex(b.get(i + 2))) {
                        return false;
                    }
                    i += 3;
                }
                c if c.is_ascii_alphanumeric() || b"-._~".contains(&c) || extra.contains(&c) => {
                    i += 1;
                }
                _ => return false,
            }
        }
        true
    }

    /// Every parser a signed request's bytes reach takes any input without
    /// panicking, and what the canonical forms give back is canonical: every
    /// string of up to four characters from an alphabet that reaches each
    /// rule, then 40 000 mutations of well-formed headers, queries and paths.
    #[test]
    fn hostile_input_never_panics_and_canonical_forms_are_canonical() {
        let alphabet = [
            'a', 'Z', '0', '9', 'F', '%', '2', '=', '&', '/', '.', ';', ',', ' ', '+', '~', '*',
            'é', '\0', '\u{7f}',
        ];
        let check = |s: &str| {
            let _ = parse_authorization(s);
            let _ = parse_presigned(s);
            let _ = parse_amz_date(s);
            if let Ok(q) = canonical_query(Some(s), None) {
                assert!(encoded_only(&q, b"=&"), "{s:?} -> {q:?}");
                // Canonical already: a second pass changes nothing.
                assert_eq!(
                    canonical_query(Some(&q), None).as_deref(),
                    Ok(q.as_str()),
                    "{s:?}"
                );
                let pairs: Vec<&str> = q.split('&').collect();
                let keyed = |p: &&str| {
                    let (k, v) = p.split_once('=').unwrap_or((p, ""));
                    (k.to_owned(), v.to_owned())
                };
                assert!(
                    pairs.windows(2).all(|w| keyed(&w[0]) <= keyed(&w[1])),
                    "{q:?}"
                );
            }
            for encoding in [UriEncoding::Double, UriEncoding::Single] {
                let uri = canonical_uri(s, encoding);
                assert!(encoded_only(&uri, b"/"), "{s:?} {encoding:?} -> {uri:?}");
            }
            if s.starts_with('/') {
                let n = normalize_uri_path(s);
                assert_eq!(normalize_uri_path(&n), n, "{s:?}");
                assert!(crate::testkit::segments_are_normal(&n), "{s:?} -> {n:?}");
            }
        };
        crate::testkit::for_every_string(&alphabet, 4, check);
        let seeds = [
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders=host;x-amz-date, Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
            "AWS4-ECDSA-P256-SHA256 Credential=AKIDEXAMPLE/20150830/service/aws4_request, SignedHeaders=host;x-amz-region-set, Signature=3044022011111111111111111111111111",
            "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIDEXAMPLE%2F20150830%2Fus-east-1%2Fservice%2Faws4_request&X-Amz-Date=20150830T123600Z&X-Amz-Expires=60&X-Amz-SignedHeaders=host&X-Amz-Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
            "/api/v1/../orders/%2e%2E/./x//y%20z/",
            "20150830T123600Z",
        ];
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for i in 0..40_000 {
            check(&mutate(seeds[i % seeds.len()], &alphabet, &mut rng));
        }
        // The seeds themselves parse, so the mutations start from inputs that
        // reach past the first checks.
        assert!(parse_authorization(seeds[0]).is_ok() && parse_authorization(seeds[1]).is_ok());
        assert!(parse_presigned(seeds[2]).is_ok() && parse_amz_date(seeds[4]).is_some());
    }
}
