//! Certificate profiles: the rcgen parameters of the CA certificate and of the leaf
//! certificates it signs (the proxy's server certificate, agent and operator certificates).
//! No keys, no signing, no state: the callers sign and record.

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyUsagePurpose, SanType, SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
use time::OffsetDateTime;

/// Certificates are valid from this long before they are issued, against clock skew.
pub const BACKDATE: Duration = Duration::from_secs(60);
/// Lifetime of the CA certificate.
pub const CA_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// The self-signed CA certificate of `trust_domain`: may sign leaves only (path length 0),
/// valid for [`CA_TTL`].
pub(crate) fn ca(trust_domain: &str, now: OffsetDateTime) -> CertificateParams {
    let mut params = named(&format!("revproxy CA {trust_domain}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = now - BACKDATE;
    params.not_after = now + CA_TTL;
    params.serial_number = Some(random_serial());
    params
}

/// A leaf certificate: CN `common_name`, the names `sans`, the one extended key usage
/// `eku` (server or client), not a CA, valid from [`BACKDATE`] before `now` for `ttl`,
/// with a fresh random serial.
pub(crate) fn leaf(
    common_name: &str,
    sans: Vec<SanType>,
    eku: ExtendedKeyUsagePurpose,
    now: OffsetDateTime,
    ttl: Duration,
) -> CertificateParams {
    let mut params = named(common_name);
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![eku];
    params.use_authority_key_identifier_extension = true;
    params.not_before = now - BACKDATE;
    params.not_after = now + ttl;
    params.serial_number = Some(random_serial());
    params
}

/// Parameters whose subject is only the common name `cn`.
fn named(cn: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    params
}

/// A positive serial of 159 random bits (RFC 5280 allows up to 20 bytes).
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 20];
    SystemRandom::new()
        .fill(&mut bytes)
        .expect("the OS random number generator failed");
    bytes[0] = (bytes[0] & 0x7f) | 0x40; // positive, and exactly 20 bytes long
    SerialNumber::from_slice(&bytes)
}
