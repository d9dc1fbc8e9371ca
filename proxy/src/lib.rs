//! warden: a per-workload authentication and authorization sidecar.
//!
//! The request path, in order (assembled in [`pipeline::build`]):
//! normalize the path, strip spoofable headers, authenticate, authorize with
//! Cedar, attach the verified identity, forward to the local service.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod audit;
pub mod authn;
pub mod authz;
pub mod body;
pub mod certs;
pub mod cli;
pub mod config;
pub mod demo;
pub mod devkit;
pub mod error;
pub mod forward;
pub mod identity;
pub mod lattice;
pub mod listener;
pub mod metrics;
pub mod normalize;
pub mod observe;
pub mod pipeline;
pub mod pool;
pub mod process;
pub mod reload;
pub mod route;
pub mod shed;
pub mod stillness;
pub mod strip;
pub mod tools;
pub mod trace;

/// Appends `bytes` as lowercase hex: a table lookup per nibble, where
/// `hex::encode` goes through a char iterator and a second `String`.
pub fn push_hex(out: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.reserve(bytes.len() * 2);
    for &b in bytes {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
}

/// Installs the one crypto provider used for everything (aws-lc-rs). Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// Helpers for the unit tests.
#[cfg(test)]
mod testkit {
    /// Calls `f` with every string of one to `max_len` characters from
    /// `alphabet`, shorter strings first.
    pub fn for_every_string(alphabet: &[char], max_len: usize, mut f: impl FnMut(&str)) {
        let mut s = String::new();
        for len in 1..=max_len {
            // An odometer over the alphabet, the last character turning fastest.
            let mut digits = vec![0; len];
            'strings: loop {
                s.clear();
                s.extend(digits.iter().map(|&d| alphabet[d]));
                f(&s);
                for d in digits.iter_mut().rev() {
                    *d += 1;
                    if *d < alphabet.len() {
                        continue 'strings;
                    }
                    *d = 0;
                }
                break;
            }
        }
    }

    /// Whether an absolute path has no empty, `.` or `..` segment; only the
    /// last may be empty (a trailing `/`).
    pub fn segments_are_normal(path: &str) -> bool {
        let inner = path.strip_suffix('/').unwrap_or(path);
        inner.is_empty()
            || inner
                .strip_prefix('/')
                .is_some_and(|rest| rest.split('/').all(|s| !matches!(s, "" | "." | "..")))
    }

    #[test]
    fn every_string_once() {
        let mut seen = Vec::new();
        for_every_string(&['a', 'b'], 2, |s| seen.push(s.to_owned()));
        assert_eq!(seen, ["a", "b", "aa", "ab", "ba", "bb"]);
        assert!(segments_are_normal("/") && segments_are_normal("/a/b/"));
        assert!(!segments_are_normal("/a//b") && !segments_are_normal("/./a"));
        assert!(!segments_are_normal("/a/..") && !segments_are_normal("a/b"));
    }
}
