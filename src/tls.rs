//! TLS on the Gearman listener (rustls through tokio-rustls): the certificate and key files
//! (`server.tls_cert`, `server.tls_key`), optional client certificates checked against
//! `server.tls_client_ca` (required when it is set), reloading the files on SIGHUP, and the
//! identity a client certificate gives a connection (its subject's common name), which the
//! access rules ([`crate::access`]) are keyed by.
//!
//! The rustls configuration sits behind a lock that each accepted connection reads once, so a
//! reload swaps it for new handshakes while connections already open keep theirs. A reload that
//! fails (a missing file, a key that does not match) keeps the previous configuration and says
//! why; the server never runs without a certificate.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio_rustls::TlsAcceptor;

/// Why TLS could not be set up (at start-up: the server refuses to start; on reload: the old
/// configuration stays).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{setting} {path:?}: {why}")]
    File {
        setting: &'static str,
        path: PathBuf,
        why: String,
    },
    #[error("TLS configuration: {0}")]
    Rustls(String),
}

/// The files TLS is built from (see `[server]` in `config/default.toml`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA certificates client certificates must chain to; `None` = no client certificates.
    pub client_ca: Option<PathBuf>,
}

/// The live TLS configuration of the Gearman listener.
pub struct Tls {
    files: TlsFiles,
    current: RwLock<Arc<rustls::ServerConfig>>,
}

impl Tls {
    /// Loads the files; any problem is an error naming the setting and the file.
    pub fn load(files: TlsFiles) -> Result<Tls, TlsError> {
        let cfg = build(&files)?;
        Ok(Tls {
            files,
            current: RwLock::new(Arc::new(cfg)),
        })
    }

    /// The acceptor for a new connection (the configuration of the moment).
    pub fn acceptor(&self) -> TlsAcceptor {
        let cfg = self
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        TlsAcceptor::from(cfg)
    }

    /// Whether connections must present a client certificate.
    pub fn requires_client_certs(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// Reads the files again (SIGHUP). On error the previous configuration stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let cfg = build(&self.files)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(cfg);
        Ok(())
    }
}

fn read(setting: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::File {
        setting,
        path: path.to_path_buf(),
        why: e.to_string(),
    })
}

/// The PEM certificates in `path` (at least one); errors name `setting` (a config key, or a
/// flag in the load generator) and the file.
pub fn certs(setting: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |why: String| TlsError::File {
        setting,
        path: path.to_path_buf(),
        why,
    };
    let certs: Vec<_> = rustls_pemfile::certs(&mut read(setting, path)?.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| bad(format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(bad("holds no PEM certificate".into()));
    }
    Ok(certs)
}

/// The PEM private key in `path`; errors name `setting` and the file.
pub fn key(setting: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bad = |why: String| TlsError::File {
        setting,
        path: path.to_path_buf(),
        why,
    };
    rustls_pemfile::private_key(&mut read(setting, path)?.as_slice())
        .map_err(|e| bad(format!("not a PEM private key: {e}")))?
        .ok_or_else(|| bad("holds no PEM private key".into()))
}

fn build(f: &TlsFiles) -> Result<rustls::ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let builder = match &f.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in certs("server.tls_client_ca", ca)? {
                roots.add(c).map_err(|e| TlsError::File {
                    setting: "server.tls_client_ca",
                    path: ca.clone(),
                    why: e.to_string(),
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::Rustls(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    builder
        .with_single_cert(
            certs("server.tls_cert", &f.cert)?,
            key("server.tls_key", &f.key)?,
        )
        .map_err(|e| TlsError::Rustls(format!("server.tls_cert and server.tls_key: {e}")))
}

/// The common name of a client certificate's subject (`None` when it has none or cannot be
/// parsed; the handshake already verified the chain).
pub fn common_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, x) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = x.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}
