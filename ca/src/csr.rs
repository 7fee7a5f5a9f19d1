//! Reading an agent's certificate signing request: its signature is checked and its public
//! key (ECDSA P-256) taken; everything else in it is ignored. What is issued is `issue.rs`.

use rcgen::PublicKeyData;

use crate::cert::pem_to_der;
use crate::error::EnrollError;
use crate::hex;
use crate::pin::Pin;

/// Longest accepted CSR, in bytes of PEM.
pub const MAX_CSR_LEN: usize = 16 * 1024;

/// The key an enrollment or a renewal asks a certificate for: the CSR's public key, and
/// the hex SHA-256 of its SubjectPublicKeyInfo (what a retry is recognized by).
pub(crate) fn requested_key(csr_pem: &str) -> Result<(CsrKey, String), EnrollError> {
    if csr_pem.len() > MAX_CSR_LEN {
        return Err(EnrollError::BadCsr(format!(
            "it is larger than {MAX_CSR_LEN} bytes"
        )));
    }
    let public_key = csr_public_key(csr_pem)?;
    let spki = hex::encode(Pin::from_spki(&public_key.subject_public_key_info()).as_bytes());
    Ok((public_key, spki))
}

/// An agent's public key, taken from a CSR.
pub(crate) struct CsrKey(Vec<u8>);

impl PublicKeyData for CsrKey {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

/// Verifies a PEM CSR's signature (the requester holds the key) and returns its public
/// key, which must be ECDSA P-256. Everything else in the CSR is ignored.
fn csr_public_key(pem: &str) -> Result<CsrKey, EnrollError> {
    let der = pem_to_der(pem, "CERTIFICATE REQUEST")
        .ok_or_else(|| EnrollError::BadCsr("it is not a PEM CERTIFICATE REQUEST".to_string()))?;
    csr_der_public_key(&der)
}

/// [`csr_public_key`] once the PEM armour is off.
fn csr_der_public_key(der: &[u8]) -> Result<CsrKey, EnrollError> {
    use x509_parser::prelude::FromDer;
    const EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
    const P256: &str = "1.2.840.10045.3.1.7";
    let bad = |m: &str| EnrollError::BadCsr(m.to_string());
    let (rest, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(der)
        .map_err(|_| bad("it is not a valid PKCS#10 request"))?;
    if !rest.is_empty() {
        return Err(bad("it has trailing bytes"));
    }
    csr.verify_signature()
        .map_err(|_| bad("its signature does not verify"))?;
    let spki = &csr.certification_request_info.subject_pki;
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok())
        .map(|o| o.to_id_string());
    if spki.algorithm.algorithm.to_id_string() != EC_PUBLIC_KEY || curve.as_deref() != Some(P256) {
        return Err(bad("its key is not ECDSA P-256"));
    }
    Ok(CsrKey(spki.subject_public_key.data.to_vec()))
}

/// For the fuzz targets: whether a CSR, as PEM and as DER, is one enrollment takes.
#[cfg(fuzzing)]
pub fn csr_is_acceptable(pem: &str, der: &[u8]) -> (bool, bool) {
    (csr_public_key(pem).is_ok(), csr_der_public_key(der).is_ok())
}
