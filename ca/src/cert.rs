//! The one X.509 reader: everything revproxy reads out of a certificate or a PEM text,
//! parsed in one place. The proxy reads who a tunnel belongs to from the verified client
//! certificate, the agent reads what its own certificate grants and when it expires, and
//! both check an issued certificate against its CA and key with [`check_issued`]. Making
//! certificates is `profile.rs`.

use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use crate::state::Unix;
use crate::Pin;

/// What a certificate says, as revproxy uses it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertSummary {
    /// The subject's common name: the agent name of an agent certificate.
    pub common_name: Option<String>,
    /// The serial number, lower-case hex, as `cert list` shows it.
    pub serial: String,
    /// The DNS names (lower-cased): the names an agent certificate may serve.
    pub dns_names: Vec<String>,
    /// The URI names: an agent's SPIFFE identity, a proxy's id, granted ports.
    pub uris: Vec<String>,
    /// The ports an agent certificate may serve, as served names (`tcp:2222`), from its
    /// `revproxy:tcp:PORT` URI names.
    pub ports: Vec<String>,
    /// The IP address names.
    pub ips: Vec<std::net::IpAddr>,
    /// Start of validity, Unix seconds.
    pub not_before: Unix,
    /// End of validity, Unix seconds.
    pub not_after: Unix,
    /// Pin of the subject's public key (of a CA certificate: the CA pin).
    pub key_pin: Pin,
}

impl CertSummary {
    /// Every name an agent certificate may serve: its DNS names, then its granted ports.
    pub fn served(&self) -> Vec<String> {
        self.dns_names.iter().chain(&self.ports).cloned().collect()
    }

    /// Reads a DER certificate; `None` if it does not parse.
    pub fn from_der(der: &[u8]) -> Option<CertSummary> {
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        Some(summarize(&cert))
    }

    /// Reads the first certificate of a PEM text.
    pub fn from_pem(pem: &str) -> Option<CertSummary> {
        CertSummary::from_der(&pem_to_der(pem, "CERTIFICATE")?)
    }
}

/// Decodes the first PEM block with the given label.
pub fn pem_to_der(pem: &str, label: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = pem.find(&begin)? + begin.len();
    let stop = start + pem[start..].find(&end)?;
    let body: String = pem[start..stop].split_whitespace().collect();
    base64::engine::general_purpose::STANDARD.decode(body).ok()
}

/// The validity period (not-before, not-after) of the first certificate in `pem`.
pub fn validity(pem: &str) -> Option<(Unix, Unix)> {
    CertSummary::from_pem(pem).map(|c| (c.not_before, c.not_after))
}

fn summarize(cert: &X509Certificate<'_>) -> CertSummary {
    let (mut dns_names, mut uris, mut ips) = (Vec::new(), Vec::new(), Vec::new());
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(d) => dns_names.push(d.to_ascii_lowercase()),
                GeneralName::URI(u) => uris.push(u.to_string()),
                GeneralName::IPAddress(b) => match b.len() {
                    4 => ips.push(<[u8; 4]>::try_from(*b).expect("4 bytes").into()),
                    16 => ips.push(<[u8; 16]>::try_from(*b).expect("16 bytes").into()),
                    _ => {}
                },
                _ => {}
            }
        }
    }
    let ports = (uris.iter())
        .filter_map(|u| u.strip_prefix(crate::ports::URI_PREFIX))
        .filter(|name| crate::ports::GrantedPort::of(name).is_some())
        .map(str::to_string)
        .collect();
    let validity = cert.validity();
    CertSummary {
        common_name: cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_string),
        serial: crate::hex::encode(cert.raw_serial()),
        dns_names,
        uris,
        ports,
        ips,
        not_before: validity.not_before.timestamp(),
        not_after: validity.not_after.timestamp(),
        key_pin: Pin::from_spki(cert.public_key().raw),
    }
}

/// Whether the first certificate in `pem` is signed by the CA certificate `ca_der`.
pub fn signed_by(pem: &str, ca_der: &[u8]) -> bool {
    let (Some(der), Ok((_, ca))) = (
        pem_to_der(pem, "CERTIFICATE"),
        X509Certificate::from_der(ca_der),
    ) else {
        return false;
    };
    X509Certificate::from_der(&der)
        .is_ok_and(|(_, cert)| cert.verify_signature(Some(ca.public_key())).is_ok())
}

/// Which check an issued certificate failed ([`check_issued`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IssuedError {
    #[error("no CA certificate")]
    NoCa,
    #[error("unreadable CA certificate")]
    UnreadableCa,
    #[error("its CA certificate does not match the pinned CA")]
    UnpinnedCa,
    #[error("no certificate")]
    NoCert,
    #[error("unreadable certificate")]
    UnreadableCert,
    #[error("the certificate is not for this agent's key")]
    OtherKey,
    #[error("the certificate is not signed by the CA")]
    NotSigned,
}

/// Checks a certificate the proxy issued to us: the CA certificate matches one of `pins`,
/// the certificate is for the public key `spki` (DER SubjectPublicKeyInfo) and is signed by
/// that CA. Returns what the certificate says, or which check failed.
pub fn check_issued(
    cert_pem: &str,
    ca_pem: &str,
    pins: &[Pin],
    spki: &[u8],
) -> Result<CertSummary, IssuedError> {
    let ca_der = pem_to_der(ca_pem, "CERTIFICATE").ok_or(IssuedError::NoCa)?;
    let (_, ca) = X509Certificate::from_der(&ca_der).map_err(|_| IssuedError::UnreadableCa)?;
    if !pins.contains(&Pin::from_spki(ca.public_key().raw)) {
        return Err(IssuedError::UnpinnedCa);
    }
    let der = pem_to_der(cert_pem, "CERTIFICATE").ok_or(IssuedError::NoCert)?;
    let (_, cert) = X509Certificate::from_der(&der).map_err(|_| IssuedError::UnreadableCert)?;
    if cert.public_key().raw != spki {
        return Err(IssuedError::OtherKey);
    }
    cert.verify_signature(Some(ca.public_key()))
        .map_err(|_| IssuedError::NotSigned)?;
    Ok(summarize(&cert))
}
