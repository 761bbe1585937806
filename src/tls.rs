//! TLS on the data plane (rustls: TLS 1.2 and 1.3 only, ALPN h2 then http/1.1) and the
//! rustls client configuration of `https` upstreams.
//!
//! The certificate and key are read at start and again on SIGHUP; a reload that fails keeps
//! the previous pair (and says why in the log). Connections already open keep the
//! configuration they were accepted with; new ones get the new one.

use std::path::Path;
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::config::TlsConfig;

/// Why a certificate, key or CA file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what} {path}: {message}")]
    File {
        what: &'static str,
        path: String,
        message: String,
    },
    #[error("certificate and key do not go together: {0}")]
    Mismatch(#[source] rustls::Error),
}

fn file_error(what: &'static str, path: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        what,
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// The provider every TLS object here uses (aws-lc-rs), whatever else the process links.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Reads a certificate chain and its key into a server configuration.
pub fn server_config(tls: &TlsConfig) -> Result<Arc<ServerConfig>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&tls.cert)
        .map_err(|e| file_error("tls.cert", &tls.cert, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_error("tls.cert", &tls.cert, e))?;
    if certs.is_empty() {
        return Err(file_error(
            "tls.cert",
            &tls.cert,
            "no PEM certificate in it",
        ));
    }
    let key =
        PrivateKeyDer::from_pem_file(&tls.key).map_err(|e| file_error("tls.key", &tls.key, e))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("aws-lc-rs supports TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(TlsError::Mismatch)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The data plane's current server configuration, replaced on SIGHUP.
#[derive(Debug)]
pub(crate) struct Certificates {
    source: TlsConfig,
    current: RwLock<Arc<ServerConfig>>,
}

impl Certificates {
    pub(crate) fn load(source: &TlsConfig) -> Result<Certificates, TlsError> {
        Ok(Certificates {
            current: RwLock::new(server_config(source)?),
            source: source.clone(),
        })
    }

    pub(crate) fn current(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Reads the files again; keeps the configuration in use if they cannot be used.
    pub(crate) fn reload(&self) -> Result<(), TlsError> {
        let config = server_config(&self.source)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = config;
        Ok(())
    }
}

/// The client configuration of an `https` upstream: the system's roots, plus the PEM
/// certificates of `ca_file` when the route names one (a private CA).
pub(crate) fn client_config(ca_file: Option<&Path>) -> Result<ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = ca_file {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(|e| file_error("ca_file", path, e))?
            .collect::<Result<_, _>>()
            .map_err(|e| file_error("ca_file", path, e))?;
        if certs.is_empty() {
            return Err(file_error("ca_file", path, "no PEM certificate in it"));
        }
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| file_error("ca_file", path, e))?;
        }
    }
    // ALPN is left to the connector, which offers http/1.1 (the protocol we speak upstream).
    Ok(ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("aws-lc-rs supports TLS 1.2 and 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The TLS files a config names, read as `serve` would read them: one line per problem, each
/// naming its field (for `check-config`).
pub fn check_files(config: &crate::config::Config) -> Vec<String> {
    let mut problems = Vec::new();
    if let Some(tls) = &config.tls
        && let Err(e) = server_config(tls)
    {
        problems.push(e.to_string());
    }
    for (i, route) in config.routes.iter().enumerate() {
        if let Some(ca_file) = &route.ca_file
            && let Err(e) = client_config(Some(ca_file))
        {
            problems.push(format!("routes[{i}].{e}"));
        }
    }
    problems
}
