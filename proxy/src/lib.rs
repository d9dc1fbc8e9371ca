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
