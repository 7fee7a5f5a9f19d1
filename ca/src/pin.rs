//! CA pins: `sha256:<hex>` of a CA's SubjectPublicKeyInfo, as kubeadm pins its CA.

use std::fmt;

use ring::digest;

/// A CA pin that does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PinError {
    #[error("CA pin {0:?} does not start with \"sha256:\"")]
    Algorithm(String),
    #[error("CA pin {0:?} is not sha256: followed by 64 hex digits")]
    Digest(String),
}

/// The SHA-256 of a certificate's SubjectPublicKeyInfo, printed as `sha256:<64 hex digits>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Pin([u8; 32]);

impl Pin {
    /// Pins the DER-encoded SubjectPublicKeyInfo `spki`.
    pub fn from_spki(spki: &[u8]) -> Pin {
        let d = digest::digest(&digest::SHA256, spki);
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        Pin(out)
    }

    /// Pins the public key of a DER-encoded certificate; `None` if it does not parse.
    pub fn from_cert_der(der: &[u8]) -> Option<Pin> {
        crate::cert::CertSummary::from_der(der).map(|c| c.key_pin)
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Parses `sha256:<hex>`.
    pub fn parse(s: &str) -> Result<Pin, PinError> {
        let hex = s
            .strip_prefix("sha256:")
            .ok_or_else(|| PinError::Algorithm(s.to_string()))?;
        let bytes = crate::hex::decode(hex)
            .filter(|b| b.len() == 32)
            .ok_or_else(|| PinError::Digest(s.to_string()))?;
        let mut out = [0u8; 32];
        out.copy_from_slice(&bytes);
        Ok(Pin(out))
    }
}

impl fmt::Display for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", crate::hex::encode(&self.0))
    }
}

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let pin = Pin::from_spki(b"key");
        let text = pin.to_string();
        assert_eq!(text.len(), "sha256:".len() + 64);
        assert_eq!(Pin::parse(&text).unwrap(), pin);
        assert!(Pin::parse("sha1:00").is_err());
        assert!(Pin::parse("sha256:abcd").is_err());
    }
}
