//! mTLS identity: the SPIFFE ID in a verified client certificate's URI SAN.
//!
//! The TLS layer has already verified the chain against the client CA; this
//! module only reads the identity out of the leaf.

use std::fmt;

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

const SCHEME: &str = "spiffe://";

/// A SPIFFE ID: `spiffe://<trust domain>/<path>`, kept as its text (the
/// form policies, headers and logs use on every request) and where its
/// trust domain ends.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    uri: Box<str>,
    /// The end of the trust domain in `uri`.
    td_end: usize,
}

impl SpiffeId {
    /// Parses per the SPIFFE ID spec: lowercase trust domain of `[a-z0-9.-_]`,
    /// path segments of `[a-zA-Z0-9.-_]`, none empty, `.` or `..`; no query,
    /// fragment, port or userinfo; at most 2048 bytes.
    pub fn parse(s: &str) -> Result<Self, &'static str> {
        if s.len() > 2048 {
            return Err("spiffe id longer than 2048 bytes");
        }
        let rest = s.strip_prefix(SCHEME).ok_or("not a spiffe:// uri")?;
        if rest.contains(['?', '#']) {
            return Err("spiffe id has a query or fragment");
        }
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if td.is_empty() || td.len() > 255 {
            return Err("spiffe trust domain is empty or too long");
        }
        if !td.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        }) {
            return Err("spiffe trust domain has invalid characters");
        }
        if !path.is_empty() {
            for seg in path[1..].split('/') {
                if seg.is_empty() || seg == "." || seg == ".." {
                    return Err("spiffe path has an empty or dot segment");
                }
                if !seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
                {
                    return Err("spiffe path has invalid characters");
                }
            }
        }
        Ok(Self {
            uri: s.into(),
            td_end: SCHEME.len() + td.len(),
        })
    }

    pub fn trust_domain(&self) -> &str {
        self.uri.get(SCHEME.len()..self.td_end).unwrap_or("")
    }

    /// The ID as written: `spiffe://<trust domain><path>`.
    pub fn as_str(&self) -> &str {
        &self.uri
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

/// Why a verified certificate carries no identity (not an error: anonymous).
pub const NO_URI_SAN: &str = "client certificate has no URI SAN";

/// Reads the SPIFFE ID of a (verified) leaf certificate.
pub fn spiffe_id_of(der: &[u8]) -> Result<SpiffeId, &'static str> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|_| "unparsable client certificate")?;
    let san = cert
        .subject_alternative_name()
        .map_err(|_| "malformed subject alternative name")?
        .ok_or(NO_URI_SAN)?;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    let uri = uris.next().ok_or(NO_URI_SAN)?;
    if uris.next().is_some() {
        return Err("client certificate has more than one URI SAN");
    }
    let id = SpiffeId::parse(uri)?;
    // X.509-SVID rules for the leaf: not a CA; if key usage is present it
    // allows digital signatures and no certificate or CRL signing.
    if cert.is_ca() {
        return Err("an X.509-SVID leaf must not be a CA");
    }
    if let Ok(Some(ku)) = cert.key_usage() {
        let ku = ku.value;
        if !ku.digital_signature() || ku.key_cert_sign() || ku.crl_sign() {
            return Err(
                "X.509-SVID key usage must be digitalSignature without certificate signing",
            );
        }
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_valid_ids() {
        let id = SpiffeId::parse("spiffe://example.org/ns/default/sa/web").unwrap();
        assert_eq!(id.trust_domain(), "example.org");
        assert_eq!(id.to_string(), "spiffe://example.org/ns/default/sa/web");
        assert!(SpiffeId::parse("spiffe://example.org").is_ok());
    }

    #[test]
    fn refuses_invalid_ids() {
        for bad in [
            "http://example.org/x",
            "spiffe://Example.org/x",
            "spiffe:///x",
            "spiffe://example.org/",
            "spiffe://example.org//x",
            "spiffe://example.org/./x",
            "spiffe://example.org/../x",
            "spiffe://example.org/x?y",
            "spiffe://example.org/x#y",
            "spiffe://example.org:8080/x",
            "spiffe://user@example.org/x",
            "SPIFFE://example.org/x",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad}");
        }
    }
}
