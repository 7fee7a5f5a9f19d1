//! TLS configuration shared by the proxy and the agent.
//!
//! One crypto provider (ring) and TLS 1.3 only: both ends are ours, so there is nothing
//! older to talk to. The agent never uses the system trust store: it accepts the proxy only
//! if the proxy's chain ends in a CA whose public key matches a pin it holds (from the
//! token when enrolling, from `ca.crt` afterwards).

use std::fmt;
use std::sync::Arc;

use revproxy_ca::Pin;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, OtherError, SignatureScheme};

/// ALPN id of the enrollment (and later renewal) API: HTTP/1.1.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";
/// ALPN id of h2 tunnels.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN of QUIC tunnels (UDP, same port number as the agent listener).
pub const ALPN_QUIC: &[u8] = b"revproxy-quic/1";

/// DER content of the id-kp-serverAuth OID, 1.3.6.1.5.5.7.3.1.
const EKU_SERVER_AUTH: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x01];

/// Why a TLS setup step failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what} holds no usable PEM {kind}")]
    Pem { what: String, kind: &'static str },
    #[error("TLS configuration failed: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client verifier configuration failed: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// The crypto provider used everywhere in revproxy.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Parses every certificate in a PEM text.
pub fn certs_from_pem(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|_| TlsError::Pem {
            what: what.into(),
            kind: "certificate",
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            what: what.into(),
            kind: "certificate",
        });
    }
    Ok(certs)
}

/// Parses a PEM private key.
pub fn key_from_pem(pem: &str, what: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|_| TlsError::Pem {
        what: what.into(),
        kind: "private key",
    })
}

/// The proxy's server certificate, replaceable while the proxy runs (it is renewed when a
/// third of its lifetime is left, without a restart).
#[derive(Debug)]
pub struct ServerCert {
    current: std::sync::RwLock<Arc<rustls::sign::CertifiedKey>>,
}

impl ServerCert {
    /// Loads a PEM chain (server certificate first) and its key.
    pub fn new(chain_pem: &str, key_pem: &str) -> Result<Arc<ServerCert>, TlsError> {
        Ok(Arc::new(ServerCert {
            current: std::sync::RwLock::new(Arc::new(certified_key(chain_pem, key_pem)?)),
        }))
    }

    /// Serves `chain_pem` and `key_pem` from the next handshake on.
    pub fn replace(&self, chain_pem: &str, key_pem: &str) -> Result<(), TlsError> {
        let key = Arc::new(certified_key(chain_pem, key_pem)?);
        *self.current.write().expect("server cert lock") = key;
        Ok(())
    }

    /// The DER of the certificate served now.
    pub fn current_der(&self) -> Vec<u8> {
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
pub fn agent_listener_config(
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
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(cert);
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// The tunnel side of the agent listener: a client certificate is required, must chain to
/// `ca_der`, be within its validity, carry EKU clientAuth, and not be revoked according to
/// `is_revoked` (called with the hex serial, at every handshake).
pub fn tunnel_listener_config(
    cert: Arc<ServerCert>,
    ca_der: &[u8],
    is_revoked: Arc<dyn Fn(&str) -> bool + Send + Sync>,
) -> Result<rustls::ServerConfig, TlsError> {
    let provider = provider();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(ca_der.to_vec()))?;
    let inner =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build()?;
    let verifier = Arc::new(RevocationCheckingVerifier { inner, is_revoked });
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// Whether a ClientHello offers ALPN `h2` (a tunnel rather than an enrollment).
pub fn offers_h2(hello: &rustls::server::ClientHello<'_>) -> bool {
    hello
        .alpn()
        .is_some_and(|mut protocols| protocols.any(|p| p == ALPN_H2))
}

/// A client configuration that trusts only a CA matching one of `pins`.
pub fn pinned_client_config(
    pins: Vec<Pin>,
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, TlsError> {
    let mut config = pinned_builder(pins)?.with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// A client configuration that trusts only a CA matching one of `pins` and presents the
/// agent's certificate.
pub fn agent_client_config(
    pins: Vec<Pin>,
    cert_pem: &str,
    key_pem: &str,
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, TlsError> {
    let mut config = pinned_builder(pins)?.with_client_auth_cert(
        certs_from_pem(cert_pem, "agent.crt")?,
        key_from_pem(key_pem, "agent.key")?,
    )?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

fn pinned_builder(
    pins: Vec<Pin>,
) -> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>, TlsError>
{
    let provider = provider();
    let verifier = Arc::new(PinnedServerVerifier {
        pins,
        provider: provider.clone(),
    });
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous() // not dangerous: the verifier below checks the chain against pinned CAs
        .with_custom_certificate_verifier(verifier))
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
                    if let Some((not_before, not_after)) = cert_validity(end_entity) {
                        tracing::warn!(
                            serial = cert_serial(end_entity).unwrap_or_default(),
                            not_before = %crate::logging::rfc3339(not_before),
                            not_after = %crate::logging::rfc3339(not_after),
                            proxy_clock = %crate::logging::rfc3339(now.as_secs() as i64),
                            "agent certificate outside its validity period (check both clocks if this is unexpected)"
                        );
                    }
                }
                return Err(e);
            }
        };
        let serial = cert_serial(end_entity).ok_or(rustls::Error::InvalidCertificate(
            CertificateError::BadEncoding,
        ))?;
        if (self.is_revoked)(&serial) {
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

/// The validity period of a DER certificate, as Unix seconds.
pub fn cert_validity(der: &[u8]) -> Option<(i64, i64)> {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
    let v = cert.validity();
    Some((v.not_before.timestamp(), v.not_after.timestamp()))
}

/// The hex serial of a DER certificate.
pub fn cert_serial(der: &[u8]) -> Option<String> {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
    Some(revproxy_ca::hex::encode(cert.raw_serial()))
}

/// The server name to send for a `host:port` address (an IP address or a DNS name).
pub fn server_name(addr: &str) -> Result<ServerName<'static>, String> {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    ServerName::try_from(host.to_string()).map_err(|_| format!("{host:?} is not a valid host name"))
}

/// The proxy presented a chain that ends in no pinned CA: not the proxy that made the token.
#[derive(Debug)]
pub struct PinMismatch {
    /// Pins of the CA certificates the server did present.
    pub presented: Vec<Pin>,
}

impl fmt::Display for PinMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the server's CA does not match the pinned CA")?;
        if let Some(p) = self.presented.first() {
            write!(f, " (it presented {p})")?;
        }
        Ok(())
    }
}

impl std::error::Error for PinMismatch {}

/// Checks the proxy's chain against pinned CAs.
///
/// The CA certificate must be in the chain the server sends (revproxy sends server + CA),
/// its public key must match a pin, and the server certificate must chain to it, be within
/// its validity period and carry EKU serverAuth. The host name is not checked: the private
/// CA issues exactly one kind of serverAuth certificate, the proxy's, so the pin already
/// says who the peer is, and agents keep working when the proxy is reached by an address
/// its certificate does not list (NAT, a new DNS name).
#[derive(Debug)]
pub struct PinnedServerVerifier {
    pins: Vec<Pin>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented: Vec<Pin> = intermediates
            .iter()
            .filter_map(|c| Pin::from_cert_der(c).ok())
            .collect();
        let Some(anchor_der) = intermediates
            .iter()
            .find(|c| Pin::from_cert_der(c).is_ok_and(|p| self.pins.contains(&p)))
        else {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(PinMismatch { presented })),
            )));
        };
        let anchor = webpki::anchor_from_trusted_cert(anchor_der).map_err(webpki_error)?;
        let ee = webpki::EndEntityCert::try_from(end_entity).map_err(webpki_error)?;
        ee.verify_for_usage(
            self.provider.signature_verification_algorithms.all,
            &[anchor],
            &[],
            now,
            // Required, not just "if present": a certificate without any EKU is refused.
            webpki::KeyUsage::required(EKU_SERVER_AUTH),
            None,
            None,
        )
        .map_err(webpki_error)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn webpki_error(e: webpki::Error) -> rustls::Error {
    use webpki::Error as W;
    let cert = match e {
        W::CertExpired { .. } => CertificateError::Expired,
        W::CertNotValidYet { .. } => CertificateError::NotValidYet,
        W::UnknownIssuer => CertificateError::UnknownIssuer,
        W::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        W::RequiredEkuNotFoundContext(_) => CertificateError::InvalidPurpose,
        other => CertificateError::Other(OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(cert)
}

/// Finds a [`PinMismatch`] in an error's source chain.
pub fn find_pin_mismatch<'a>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a PinMismatch> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(m) = e.downcast_ref::<PinMismatch>() {
            return Some(m);
        }
        if let Some(rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner)))) =
            e.downcast_ref::<rustls::Error>()
        {
            if let Some(m) = inner.downcast_ref::<PinMismatch>() {
                return Some(m);
            }
        }
        // io::Error's own `source` skips the error it wraps; look inside it explicitly.
        cur = match e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => e.source(),
        };
    }
    None
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
        let (chain, key) = ca.server_identity(now).unwrap();
        let served = ServerCert::new(&chain, &key).unwrap();
        let before = served.current_der();
        // Ten months on, a third of the year is left: the CA reissues it.
        let (renewed_chain, renewed_key) =
            ca.server_identity(now + time::Duration::days(300)).unwrap();
        assert_ne!(renewed_chain, chain);
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
