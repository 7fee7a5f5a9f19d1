//! TLS to PostgreSQL: a rustls configuration (ring only) that trusts the CA file the store
//! URL names (`sslrootcert`), handed to `tokio-postgres-rustls`, which verifies the
//! server's name against the host connected to and gives SCRAM its channel binding.

use tokio_postgres_rustls::MakeRustlsConnect;

/// Why the `sslrootcert` file cannot be trusted.
#[derive(Debug, thiserror::Error)]
pub enum RootCertError {
    #[error("cannot read sslrootcert {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error(transparent)]
    Pem(crate::tls::TlsError),
    #[error("sslrootcert {path} holds no usable CA certificate")]
    NoCa { path: String },
    #[error("{0}")]
    Rustls(rustls::Error),
}

/// TLS that trusts only the CA certificates in the PEM file `path`.
pub(super) fn verified(path: &str) -> Result<MakeRustlsConnect, RootCertError> {
    let pem = std::fs::read_to_string(path).map_err(|error| RootCertError::Read {
        path: path.into(),
        error,
    })?;
    let certs = crate::tls::certs_from_pem(&pem, path).map_err(RootCertError::Pem)?;
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(RootCertError::NoCa { path: path.into() });
    }
    config(roots).map_err(RootCertError::Rustls)
}

/// The TLS of `sslmode=disable`, which tokio-postgres asks for but never starts; were it
/// to, its empty root store would refuse every server.
pub(super) fn off() -> MakeRustlsConnect {
    config(rustls::RootCertStore::empty()).expect("ring supports the default TLS versions")
}

fn config(roots: rustls::RootCertStore) -> Result<MakeRustlsConnect, rustls::Error> {
    let config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}
