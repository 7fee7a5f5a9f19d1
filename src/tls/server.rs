//! The proxy's side of TLS on the agent port: the server certificate (renewed in place),
//! the listener configurations for enrollment and tunnels, and the client-certificate
//! verifier that adds the revocation check to the CA chain check.

use std::fmt;
use std::sync::Arc;

use revproxy_ca::CertSummary;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};

use crate::runtime::rfc3339;

use super::{certs_from_pem, key_from_pem, provider, TlsError, ALPN_H2};

/// The proxy's server certificate, replaceable while the proxy runs (it is renewed when a
/// third of its lifetime is left, without a restart).
#[derive(Debug)]
pub(crate) struct ServerCert {
    current: std::sync::RwLock<Arc<rustls::sign::CertifiedKey>>,
}

impl ServerCert {
    /// Loads a PEM chain (server certificate first) and its key.
    pub(crate) fn new(chain_pem: &str, key_pem: &str) -> Result<Arc<ServerCert>, TlsError> {
        Ok(Arc::new(ServerCert {
            current: std::sync::RwLock::new(Arc::new(certified_key(chain_pem, key_pem)?)),
        }))
    }

    /// Serves `chain_pem` and `key_pem` from the next handshake on.
    pub(crate) fn replace(&self, chain_pem: &str, key_pem: &str) -> Result<(), TlsError> {
        let key = Arc::new(certified_key(chain_pem, key_pem)?);
        *self.current.write().expect("server cert lock") = key;
        Ok(())
    }

    /// The DER of the certificate served now.
    pub(crate) fn current_der(&self) -> Vec<u8> {
        self.current.read().expect("server cert lock").cert[0].to_vec()
    }
}

impl rustls::server::ResolvesServerCert for ServerCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.current.read().expect("server cert lock").clone())
    }
}

fn certified_key(chain_pem: &str, key_pem: &str) -> Result<rustls::sign::CertifiedKey, TlsError> {
    Ok(rustls::sign::CertifiedKey::from_der(
        certs_from_pem(chain_pem, "server.crt")?,
        key_from_pem(key_pem, "server.key")?,
        &provider(),
    )?)
}

/// The agent listener's server configuration.
///
/// Client certificates chained to `ca_der` are verified when presented but not required at
/// the TLS layer, because enrollment (which has no certificate yet) shares the port; the
/// protocols above decide what needs one.
pub(crate) fn agent_listener_config(
    cert: Arc<ServerCert>,
    ca_der: &[u8],
    alpn: &[&[u8]],
) -> Result<rustls::ServerConfig, TlsError> {
    let provider = provider();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(ca_der.to_vec()))?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()?;
    server_config(verifier, cert, alpn)
}

/// The tunnel side of the agent listener: a client certificate is required, must chain to
/// `ca_der`, be within its validity, carry EKU clientAuth, and not be revoked according to
/// `is_revoked` (called with the hex serial, at every handshake). Tunnels and mesh
/// channels.
pub(crate) fn tunnel_listener_config(
    cert: Arc<ServerCert>,
    ca_der: &[u8],
    is_revoked: Arc<dyn Fn(&str) -> bool + Send + Sync>,
) -> Result<rustls::ServerConfig, TlsError> {
    verified_client_config(
        cert,
        ca_der,
        is_revoked,
        &[ALPN_H2, super::ALPN_CONNECT, super::ALPN_H2_EXTRA],
    )
}

/// The admin listener beyond loopback: the same client-certificate checks as a tunnel's
/// (the admin layer then admits operator certificates only), with ALPN `http/1.1`.
pub(crate) fn admin_listener_config(
    cert: Arc<ServerCert>,
    ca_der: &[u8],
    is_revoked: Arc<dyn Fn(&str) -> bool + Send + Sync>,
) -> Result<rustls::ServerConfig, TlsError> {
    verified_client_config(cert, ca_der, is_revoked, &[super::ALPN_HTTP1])
}

/// A configuration that requires a client certificate chained to `ca_der`, valid, EKU
/// clientAuth and not revoked, offering `alpn`.
fn verified_client_config(
    cert: Arc<ServerCert>,
    ca_der: &[u8],
    is_revoked: Arc<dyn Fn(&str) -> bool + Send + Sync>,
    alpn: &[&[u8]],
) -> Result<rustls::ServerConfig, TlsError> {
    let provider = provider();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(ca_der.to_vec()))?;
    let inner =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build()?;
    let verifier = Arc::new(RevocationCheckingVerifier { inner, is_revoked });
    server_config(verifier, cert, alpn)
}

/// A TLS 1.3 server configuration that never resumes a session: a resumed handshake skips
/// the client certificate verifier, so a certificate that expired or was revoked since the
/// first handshake would get back in. Every handshake on the agent port is a full one
/// (the cost, one signature per connection, is paid once per tunnel or enrollment).
fn server_config(
    verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    cert: Arc<ServerCert>,
    alpn: &[&[u8]],
) -> Result<rustls::ServerConfig, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(super::suites_by_speed())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(cert);
    config.ignore_client_order = true;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// Whether a ClientHello offers ALPN `h2`, an extra tunnel's or the mesh channel's: a
/// connection that needs a client certificate (a tunnel), rather than an enrollment.
pub(crate) fn offers_h2(hello: &rustls::server::ClientHello<'_>) -> bool {
    hello.alpn().is_some_and(|mut protocols| {
        protocols.any(|p| [ALPN_H2, super::ALPN_CONNECT, super::ALPN_H2_EXTRA].contains(&p))
    })
}

/// Adds a revocation check to the standard client certificate verification.
struct RevocationCheckingVerifier {
    inner: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    is_revoked: Arc<dyn Fn(&str) -> bool + Send + Sync>,
}

impl fmt::Debug for RevocationCheckingVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RevocationCheckingVerifier")
            .finish_non_exhaustive()
    }
}

impl rustls::server::danger::ClientCertVerifier for RevocationCheckingVerifier {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        let verified = match self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
        {
            Ok(v) => v,
            Err(e) => {
                if let rustls::Error::InvalidCertificate(
                    CertificateError::Expired
                    | CertificateError::NotValidYet
                    | CertificateError::ExpiredContext { .. }
                    | CertificateError::NotValidYetContext { .. },
                ) = &e
                {
                    // Both clocks' view: the certificate's window and ours.
                    if let Some(cert) = CertSummary::from_der(end_entity) {
                        tracing::warn!(
                            serial = %cert.serial,
                            not_before = %rfc3339(cert.not_before),
                            not_after = %rfc3339(cert.not_after),
                            proxy_clock = %rfc3339(now.as_secs() as i64),
                            "client certificate outside its validity period (check both clocks if this is unexpected)"
                        );
                    }
                }
                return Err(e);
            }
        };
        let cert = CertSummary::from_der(end_entity).ok_or(rustls::Error::InvalidCertificate(
            CertificateError::BadEncoding,
        ))?;
        if (self.is_revoked)(&cert.serial) {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_renewed_server_certificate_is_served_without_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let now = time::OffsetDateTime::now_utc();
        let ca =
            revproxy_ca::Ca::init(dir.path(), &revproxy_ca::InitOptions::default(), now).unwrap();
        let first = ca.server_identity(now, None).unwrap();
        let (chain, key) = (first.chain_pem.clone(), first.key_pem.clone());
        let served = ServerCert::new(&chain, &key).unwrap();
        let before = served.current_der();
        // Ten months on, a third of the year is left: the CA reissues it, for the same
        // proxy id.
        let renewed = ca
            .server_identity(now + time::Duration::days(300), None)
            .unwrap();
        let (renewed_chain, renewed_key) = (renewed.chain_pem, renewed.key_pem);
        assert_ne!(renewed_chain, chain);
        assert_eq!(renewed.proxy_id, first.proxy_id);
        let summary = revproxy_ca::CertSummary::from_pem(&renewed_chain).unwrap();
        assert_eq!(
            revproxy_ca::proxy_id_of(&summary.uris),
            Some(first.proxy_id.as_str())
        );
        // An advertised address the certificate does not name yet is added to it.
        let advertised = ca
            .server_identity(now + time::Duration::days(300), Some("10.1.2.3"))
            .unwrap();
        let summary = revproxy_ca::CertSummary::from_pem(&advertised.chain_pem).unwrap();
        assert!(summary.ips.contains(&"10.1.2.3".parse().unwrap()));
        assert_eq!(advertised.proxy_id, first.proxy_id);
        served.replace(&renewed_chain, &renewed_key).unwrap();
        let after = served.current_der();
        assert_ne!(after, before);
        assert_eq!(
            after,
            certs_from_pem(&renewed_chain, "x").unwrap()[0].to_vec()
        );
        assert!(
            served.replace(&renewed_chain, &key).is_err(),
            "a key that does not match is refused"
        );
    }
}
