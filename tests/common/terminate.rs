//! An operator's own certificates for terminated names (`revproxy tls terminate --cert
//! --key`), and TLS clients that trust them.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An operator's own PKI: a CA that signs a certificate for some names, written to files
/// as `tls terminate --cert --key` takes them.
pub struct OperatorCert {
    pub dir: tempfile::TempDir,
    /// The CA's certificate: what clients trust.
    pub ca_pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    names: Vec<String>,
    /// When the certificates it writes expire (rcgen's default when `None`).
    pub not_after: Option<time::OffsetDateTime>,
}

impl OperatorCert {
    pub fn new(names: &[&str]) -> OperatorCert {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "operator test CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let pki = OperatorCert {
            dir,
            ca_pem: ca_cert.pem(),
            issuer: rcgen::Issuer::new(ca_params, ca_key),
            names: names.iter().map(|n| n.to_string()).collect(),
            not_after: None,
        };
        pki.renew();
        pki
    }

    /// As [`OperatorCert::new`], its certificate expiring at `not_after`.
    pub fn expiring(names: &[&str], not_after: time::OffsetDateTime) -> OperatorCert {
        let mut pki = OperatorCert::new(names);
        pki.not_after = Some(not_after);
        pki.renew();
        pki
    }

    /// Writes a new certificate and key into the files (as certbot's renewal would):
    /// the new certificate's DER.
    pub fn renew(&self) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(self.names.clone()).unwrap();
        if let Some(not_after) = self.not_after {
            params.not_before = not_after - time::Duration::days(30);
            params.not_after = not_after;
        }
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        std::fs::write(self.cert(), cert.pem() + &self.ca_pem).unwrap();
        std::fs::write(self.key(), key.serialize_pem()).unwrap();
        cert.der().to_vec()
    }

    pub fn cert(&self) -> PathBuf {
        self.dir.path().join("chain.pem")
    }

    pub fn key(&self) -> PathBuf {
        self.dir.path().join("key.pem")
    }

    pub fn key_pem(&self) -> String {
        std::fs::read_to_string(self.key()).unwrap()
    }

    /// The files as `tls terminate --cert --key` reads them.
    pub fn own(&self) -> revproxy::ca::OwnCert {
        revproxy::ca::OwnCert {
            chain_pem: std::fs::read_to_string(self.cert()).unwrap(),
            key_pem: self.key_pem(),
            cert_path: self.cert().to_str().unwrap().to_string(),
            key_path: self.key().to_str().unwrap().to_string(),
        }
    }

    /// A TLS client that trusts this CA only, offering `alpn`.
    pub fn client(&self, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
        tls_client(&self.ca_pem, alpn)
    }
}

/// A TLS client trusting only the certificates in `roots_pem`, offering `alpn`.
pub fn tls_client(roots_pem: &str, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(roots_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(revproxy::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// A TLS connection to `name` on the SNI listener, its handshake verified by `with`.
pub async fn connect_tls(
    sni: std::net::SocketAddr,
    with: &tokio_rustls::TlsConnector,
    name: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(sni).await?;
    with.connect(name.to_string().try_into().unwrap(), tcp)
        .await
}

/// Sends `data` over TLS to `name`, half-closes, and returns what comes back.
pub async fn tls_round_trip(
    sni: std::net::SocketAddr,
    with: &tokio_rustls::TlsConnector,
    name: &str,
    data: &[u8],
) -> std::io::Result<Vec<u8>> {
    let mut tls = connect_tls(sni, with, name).await?;
    tls.write_all(data).await?;
    tls.shutdown().await?;
    let mut back = Vec::new();
    tls.read_to_end(&mut back).await?;
    Ok(back)
}

/// The first bytes a TLS client sends to `name`: its ClientHello.
pub fn client_hello(name: &str) -> Vec<u8> {
    let config = rustls::ClientConfig::builder_with_provider(revproxy::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let mut conn =
        rustls::ClientConnection::new(Arc::new(config), name.to_string().try_into().unwrap())
            .unwrap();
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).unwrap();
    hello
}
