//! Certificates for the TLS clients (webhook receivers, PostgreSQL): a PEM file of extra
//! roots, checked when it is read. A leaf: imports nothing of the crate.

use std::path::Path;

use rustls::pki_types::CertificateDer;

/// The certificates of a PEM file, each usable as a root; `what` names the setting in
/// errors (`--webhook-ca-file /etc/ca.pem`).
pub fn load_ca_file(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {what}: {e}"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{what} is not PEM: {e}"))?;
    if certs.is_empty() {
        return Err(format!(
            "{what} holds no certificate (-----BEGIN CERTIFICATE-----)"
        ));
    }
    let mut roots = rustls::RootCertStore::empty();
    let (_, refused) = roots.add_parsable_certificates(certs.iter().cloned());
    if refused > 0 {
        return Err(format!(
            "{what}: {refused} certificate(s) cannot be used as a root"
        ));
    }
    Ok(certs)
}

/// A TLS client configuration (rustls with ring, safe default versions, no client
/// certificate) trusting Mozilla's public roots plus `extra`.
pub fn client_config(extra: &[CertificateDer<'static>]) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    roots.add_parsable_certificates(extra.iter().cloned());
    Ok(
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("cannot set up TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}
