//! Private keys at rest in the store (a terminated name's certificate key): sealed with
//! AES-256-GCM under a key derived from the CA key (HKDF-SHA256), so that whoever can read
//! the store but has no `ca.key` (a database administrator, a backup) learns nothing of
//! them. Every proxy holds `ca.key`, so every proxy can open them.
//!
//! A sealed value is `v1.` and the base64url of a fresh 96-bit nonce and the ciphertext
//! with its tag; what the value is for (`tls-key:NAME`) is bound in as associated data,
//! so a sealed key moved to another record does not open.

use base64::Engine as _;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};

use crate::error::CaError;

const PREFIX: &str = "v1.";
/// Domain separation: this derived key is for sealing values in the store, nothing else.
const SALT: &[u8] = b"revproxy store sealing";
const INFO: &[u8] = b"revproxy v1 aes-256-gcm";

/// Seals and opens private values kept in the store.
pub struct Sealer {
    key: LessSafeKey,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer")
    }
}

impl Sealer {
    /// The sealer of the CA whose private key is `ca_key_der` (PKCS#8).
    pub fn new(ca_key_der: &[u8]) -> Sealer {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, SALT).extract(ca_key_der);
        let okm = prk
            .expand(&[INFO], &AES_256_GCM)
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        Sealer {
            key: LessSafeKey::new(UnboundKey::from(okm)),
        }
    }

    /// `plain` sealed, for the purpose `what`.
    pub fn seal(&self, what: &str, plain: &[u8]) -> Result<String, CaError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| CaError::InvalidInput("no randomness for sealing a key".into()))?;
        let mut out = plain.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(what.as_bytes()),
                &mut out,
            )
            .map_err(|_| CaError::InvalidInput("could not seal a key".into()))?;
        let mut all = nonce.to_vec();
        all.extend_from_slice(&out);
        out.iter_mut().for_each(|b| *b = 0);
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(all);
        Ok(format!("{PREFIX}{b64}"))
    }

    /// What `sealed` holds, if it was sealed by this CA for `what`.
    pub fn open(&self, what: &str, sealed: &str) -> Result<Vec<u8>, CaError> {
        let refused = || {
            CaError::InvalidInput(format!(
                "the sealed {what} does not open with this CA's key (sealed by another CA, or damaged)"
            ))
        };
        let body = sealed.strip_prefix(PREFIX).ok_or_else(refused)?;
        let mut all = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| refused())?;
        if all.len() < NONCE_LEN {
            return Err(refused());
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&all[..NONCE_LEN]);
        let plain = self
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(what.as_bytes()),
                &mut all[NONCE_LEN..],
            )
            .map_err(|_| refused())?
            .to_vec();
        all.iter_mut().for_each(|b| *b = 0);
        Ok(plain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sealed value opens with the same CA key for the same purpose, and with nothing
    /// else: another CA's key, another purpose, a flipped byte.
    #[test]
    fn sealed_values_open_only_with_their_key_and_purpose() {
        let (a, b) = (Sealer::new(b"ca key one"), Sealer::new(b"ca key two"));
        let sealed = a.seal("tls-key:a.example.com", b"secret").unwrap();
        assert!(!sealed.contains("secret"));
        assert_eq!(a.open("tls-key:a.example.com", &sealed).unwrap(), b"secret");
        assert!(b.open("tls-key:a.example.com", &sealed).is_err());
        assert!(a.open("tls-key:b.example.com", &sealed).is_err());
        let mut bytes = sealed.into_bytes();
        let last = bytes.len() - 1;
        bytes[last] = if bytes[last] == b'A' { b'B' } else { b'A' };
        let damaged = String::from_utf8(bytes).unwrap();
        assert!(a.open("tls-key:a.example.com", &damaged).is_err());
        // Two seals of one value differ (a fresh nonce each).
        assert_ne!(a.seal("x", b"same").unwrap(), a.seal("x", b"same").unwrap());
    }
}
