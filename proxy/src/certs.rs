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
    // The watched directories may hold other files (logs, say): only a
    // change in these files' bytes (or SIGHUP) reloads.
    let mut last = fingerprint(&files);
    while changes.next().await {
        let tls = tls.clone();
        let active = active.clone();
        let metrics = metrics.clone();
        let files = files.clone();
        let forced = changes.by_signal();
        // File reads and parsing stay off the async workers.
        let seen = tokio::task::spawn_blocking(move || {
            reload_if_changed(&tls, &files, last, forced, &active, &metrics)
        })
        .await;
        if let Ok(now) = seen {
            last = now;
        }
    }
}

/// Reloads unless the files still read as `last` (and this is not SIGHUP);
/// returns what they read as now.
fn reload_if_changed(
    tls: &TlsConfig,
    files: &[PathBuf],
    last: Option<[u8; 32]>,
    forced: bool,
    active: &ArcSwap<ServerConfig>,
    metrics: &Metrics,
) -> Option<[u8; 32]> {
    let now = fingerprint(files);
    if forced || now.is_none() || now != last {
        reload_once(tls, active, metrics);
    }
    now
}

/// Digest of the files' bytes; `None` if one cannot be read.
fn fingerprint(files: &[PathBuf]) -> Option<[u8; 32]> {
    let mut d = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for f in files {
        let bytes = std::fs::read(f).ok()?;
        d.update(&(bytes.len() as u64).to_be_bytes());
        d.update(&bytes);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(d.finish().as_ref());
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devkit::{CertPair, DevCa};

    fn reloads(metrics: &Metrics, result: &'static str) -> u64 {
        metrics
            .cert_reloads
            .get_or_create(&ResultLabels { result })
            .get()
    }

    #[test]
    fn only_a_change_in_the_files_or_sighup_reloads() {
        crate::install_crypto_provider();
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = DevCa::new("watch CA").expect("ca");
        let (a, b) = (ca.server().expect("server"), ca.server().expect("server"));
        let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        let write = |p: &CertPair| {
            std::fs::write(&cert, &p.cert_pem).expect("write");
            std::fs::write(&key, &p.key_pem).expect("write");
        };
        write(&a);
        let tls = TlsConfig {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: None,
            client_auth: ClientAuth::Optional,
            trust_domains: None,
            versions: vec![TlsVersion::V1_3],
        };
        let files = vec![cert.clone(), key.clone()];
        let metrics = Metrics::register(&mut prometheus_client::registry::Registry::default());
        let active = ArcSwap::new(load(&tls).expect("load").config);
        let mut last = fingerprint(&files);

        // Another file in the same directory (a log, say): nothing reloads.
        std::fs::write(dir.path().join("warden.log"), "a line").expect("write");
        last = reload_if_changed(&tls, &files, last, false, &active, &metrics);
        assert_eq!(reloads(&metrics, "ok"), 0);

        // New bytes: reloaded once, and not again while they stay.
        write(&b);
        last = reload_if_changed(&tls, &files, last, false, &active, &metrics);
        assert_eq!(reloads(&metrics, "ok"), 1);
        last = reload_if_changed(&tls, &files, last, false, &active, &metrics);
        assert_eq!(reloads(&metrics, "ok"), 1);

        // SIGHUP always reloads.
        reload_if_changed(&tls, &files, last, true, &active, &metrics);
        assert_eq!(reloads(&metrics, "ok"), 2);
    }
}
