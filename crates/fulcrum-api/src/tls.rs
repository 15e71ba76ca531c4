//! HTTPS: a self-signed certificate made on first start and kept in the data dir.

use std::path::Path;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::server::ServeError;

/// Loads `DATA/tls/server.{crt,key}`, creating them first if absent; with the pin of the
/// certificate (see `fulcrum_se_protocol::certificate_pin`).
pub fn server_config(data_dir: &Path, names: &[String]) -> Result<(Arc<ServerConfig>, String), ServeError> {
    let dir = data_dir.join("tls");
    let (cert_path, key_path) = (dir.join("server.crt"), dir.join("server.key"));
    let tls_err = |what: &str, e: &dyn std::fmt::Display| ServeError::Tls(format!("{what}: {e}"));
    if !cert_path.exists() || !key_path.exists() {
        std::fs::create_dir_all(&dir).map_err(|e| tls_err("cannot create the tls dir", &e))?;
        let generated =
            rcgen::generate_simple_self_signed(names.to_vec()).map_err(|e| tls_err("cannot make a certificate", &e))?;
        crate::bootstrap::write_private(&key_path, generated.signing_key.serialize_pem().as_bytes())
            .map_err(|e| tls_err("cannot write the key", &e))?;
        crate::bootstrap::write_private(&cert_path, generated.cert.pem().as_bytes())
            .map_err(|e| tls_err("cannot write the certificate", &e))?;
        tracing::info!(path = %cert_path.display(), "made a self-signed certificate");
    }
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_path)
        .map_err(|e| tls_err("cannot read the certificate", &e))?
        .collect::<Result<_, _>>()
        .map_err(|e| tls_err("cannot parse the certificate", &e))?;
    let pin = certs
        .first()
        .map(|c| fulcrum_se_protocol::certificate_pin(c.as_ref()))
        .ok_or_else(|| ServeError::Tls(format!("{} holds no certificate", cert_path.display())))?;
    let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| tls_err("cannot read the key", &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err("tls setup", &e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| tls_err("the certificate and key do not match", &e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((Arc::new(config), pin))
}
