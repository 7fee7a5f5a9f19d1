//! The agent's side of TLS on the agent port: it trusts the proxy only if the proxy's chain
//! ends in a CA whose key matches a pin it holds (from the token when enrolling, from
//! `ca.crt` afterwards), never the system trust store.

use std::fmt;
use std::sync::Arc;

use revproxy_ca::Pin;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, OtherError, SignatureScheme};

use super::{certs_from_pem, key_from_pem, TlsError};

/// DER content of the id-kp-serverAuth OID, 1.3.6.1.5.5.7.3.1.
const EKU_SERVER_AUTH: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x01];

/// A client configuration that trusts only a CA matching one of `pins`.
pub fn pinned_client_config(
    pins: Vec<Pin>,
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, TlsError> {
    let mut config = pinned_builder(pins, None)?.with_no_client_auth();
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
    agent_client_config_for(pins, None, cert_pem, key_pem, alpn)
}

/// Like [`agent_client_config`], and the proxy's certificate must name proxy `proxy` (when
/// given): an agent keeping a tunnel to each of several proxies tells them apart by it.
pub(crate) fn agent_client_config_for(
    pins: Vec<Pin>,
    proxy: Option<&str>,
    cert_pem: &str,
    key_pem: &str,
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, TlsError> {
    let mut config = pinned_builder(pins, proxy)?.with_client_auth_cert(
        certs_from_pem(cert_pem, "agent.crt")?,
        key_from_pem(key_pem, "agent.key")?,
    )?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

fn pinned_builder(
    pins: Vec<Pin>,
    proxy: Option<&str>,
) -> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>, TlsError>
{
    let provider = super::suites_by_speed();
    let verifier = Arc::new(PinnedServerVerifier {
        pins,
        proxy: proxy.map(str::to_string),
        provider: provider.clone(),
    });
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous() // not dangerous: the verifier below checks the chain against pinned CAs
        .with_custom_certificate_verifier(verifier))
}

/// The proxy presented a chain that ends in no pinned CA: not the proxy that made the token.
#[derive(Debug)]
pub(crate) struct PinMismatch {
    /// Pins of the CA certificates the server did present.
    pub(crate) presented: Vec<Pin>,
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

/// The address reached a proxy of the right CA, but another proxy than the one expected.
#[derive(Debug)]
pub(crate) struct OtherProxy {
    pub(crate) expected: String,
    pub(crate) presented: Option<String>,
}

impl fmt::Display for OtherProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "this address reached proxy {}, not proxy {}: each proxy must advertise an address of its own",
            self.presented.as_deref().unwrap_or("(no id)"),
            self.expected
        )
    }
}

impl std::error::Error for OtherProxy {}

/// Checks the proxy's chain against pinned CAs.
///
/// The CA certificate must be in the chain the server sends (revproxy sends server + CA),
/// its public key must match a pin, and the server certificate must chain to it, be within
/// its validity period and carry EKU serverAuth. The host name is not checked: the private
/// CA issues exactly one kind of serverAuth certificate, the proxy's, so the pin already
/// says who the peer is, and agents keep working when the proxy is reached by an address
/// its certificate does not list (NAT, a new DNS name).
#[derive(Debug)]
pub(crate) struct PinnedServerVerifier {
    pins: Vec<Pin>,
    /// The proxy id the certificate must name, when the agent dials a known proxy.
    proxy: Option<String>,
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
            .filter_map(|c| Pin::from_cert_der(c))
            .collect();
        let Some(anchor_der) = intermediates
            .iter()
            .find(|c| Pin::from_cert_der(c).is_some_and(|p| self.pins.contains(&p)))
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
        if let Some(expected) = &self.proxy {
            let uris = revproxy_ca::CertSummary::from_der(end_entity)
                .map(|c| c.uris)
                .unwrap_or_default();
            let presented = revproxy_ca::proxy_id_of(&uris);
            if presented != Some(expected.as_str()) {
                return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                    OtherError(Arc::new(OtherProxy {
                        expected: expected.clone(),
                        presented: presented.map(str::to_string),
                    })),
                )));
            }
        }
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
pub(crate) fn find_pin_mismatch<'a>(
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

/// A QUIC client configuration from a rustls one (TLS 1.3 with an AES-GCM suite, as every
/// configuration here has): for clients of the proxy's QUIC port.
pub fn quic_client_config(config: rustls::ClientConfig) -> quinn::ClientConfig {
    quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(config)
            .expect("the ring provider has the QUIC initial cipher suite"),
    ))
}

/// What an agent presents on the agent port: the pin of the CA it trusts, and its
/// certificate and key.
pub(crate) struct Credentials<'a> {
    pub(crate) pin: Pin,
    pub(crate) cert_pem: &'a str,
    pub(crate) key_pem: &'a str,
    /// The proxy id the proxy's certificate must name, if any.
    pub(crate) proxy: Option<&'a str>,
}

impl Credentials<'_> {
    /// A client configuration with these credentials, offering `alpn`.
    pub(crate) fn client_config(&self, alpn: &[u8]) -> Result<rustls::ClientConfig, TlsError> {
        agent_client_config_for(
            vec![self.pin],
            self.proxy,
            self.cert_pem,
            self.key_pem,
            &[alpn],
        )
    }
}
