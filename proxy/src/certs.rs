//! The listener's TLS material — server certificate chain, key and client CA
//! bundle — loaded, checked, and rotated without a restart.
//!
//! A new bundle is parsed and checked in full (every PEM block, the key
//! matching the leaf, the leaf not expired, the CA bundle usable) before it
//! replaces the old one. A broken bundle is refused, logged and counted, and
//! the old one keeps serving. Connections already open keep the material they
//! shook hands with; new handshakes use the new one.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

use crate::config::{ClientAuth, TlsConfig, TlsVersion};
use crate::metrics::{Metrics, ResultLabels};

/// A checked server configuration and facts about its leaf certificate.
#[derive(Debug)]
pub struct Material {
    pub config: Arc<ServerConfig>,
    /// The leaf certificate's serial number, hex.
    pub serial: String,
    /// When the leaf certificate expires, Unix seconds.
    pub not_after: i64,
}

fn pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate found", path.display()));
    }
    Ok(certs)
}

/// Loads and checks the configured material: the chain (leaf first), the
/// key, which must match the leaf, and the client CA bundle when set.
pub fn load(tls: &TlsConfig) -> Result<Material, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let certs = pem_certs(&tls.cert)?;
    let (serial, not_after) = leaf_facts(&tls.cert, &certs[0])?;
    let key = PrivateKeyDer::from_pem_file(&tls.key)
        .map_err(|e| format!("{}: {e}", tls.key.display()))?;
    let versions: Vec<&'static rustls::SupportedProtocolVersion> = tls
        .versions
        .iter()
        .map(|v| match v {
            TlsVersion::V1_2 => &rustls::version::TLS12,
            TlsVersion::V1_3 => &rustls::version::TLS13,
        })
        .collect();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .map_err(|e| format!("tls: {e}"))?;
    let builder = match &tls.client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in pem_certs(ca)? {
                roots
                    .add(cert)
                    .map_err(|e| format!("{}: {e}", ca.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = match tls.client_auth {
                ClientAuth::Required => verifier,
                ClientAuth::Optional => verifier.allow_unauthenticated(),
            };
            let verifier = verifier
                .build()
                .map_err(|e| format!("{}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    // rustls checks that the key matches the leaf's public key.
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("{} and {}: {e}", tls.cert.display(), tls.key.display()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Material {
        config: Arc::new(config),
        serial,
        not_after,
    })
}

/// The leaf's serial and expiry; an expired leaf is refused.
fn leaf_facts(path: &Path, leaf: &CertificateDer<'_>) -> Result<(String, i64), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).map_err(|e| {
        format!(
            "{}: the first certificate does not parse: {e}",
            path.display()
        )
    })?;
    let not_after = cert.validity().not_after.timestamp();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    if not_after <= now {
        return Err(format!(
            "{}: the certificate expired at {}",
            path.display(),
            cert.validity().not_after
        ));
    }
    Ok((cert.raw_serial_as_string().replace(':', ""), not_after))
}

/// Records the active material in the metrics.
pub fn record(material: &Material, metrics: &Metrics) {
    metrics.cert_expiry.set(material.not_after);
}

/// Loads the material again; swaps it in if it is valid.
pub fn reload_once(tls: &TlsConfig, active: &ArcSwap<ServerConfig>, metrics: &Metrics) {
    match load(tls) {
        Ok(m) => {
            tracing::info!(serial = %m.serial, "certificates reloaded");
            record(&m, metrics);
            active.store(m.config);
            metrics
                .cert_reloads
                .get_or_create(&ResultLabels { result: "ok" })
                .inc();
        }
        Err(e) => {
            tracing::error!(error = %e, "certificate reload refused; the old certificates keep serving");
            metrics
                .cert_reloads
                .get_or_create(&ResultLabels { result: "error" })
                .inc();
        }
    }
}

/// Watches the certificate, key and CA files (and SIGHUP) until the task is
/// dropped.
pub async fn watch(tls: TlsConfig, active: Arc<ArcSwap<ServerConfig>>, metrics: Arc<Metrics>) {
    let files: Vec<PathBuf> = [Some(&tls.cert), Some(&tls.key), tls.client_ca.as_ref()]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
    let mut changes = crate::reload::Changes::new(&files, "certificates");
    while changes.next().await {
        let tls = tls.clone();
        let active = active.clone();
        let metrics = metrics.clone();
        // File reads and parsing stay off the async workers.
        let _ = tokio::task::spawn_blocking(move || reload_once(&tls, &active, &metrics)).await;
    }
}
