//! The one-time enrollment token string.
//!
//! `rvp1.<base64url(JSON public part)>.<base64url(secret)>`: the public part names the
//! enrollment address, the CA pins and the token id; the secret is 32 bytes from the OS RNG.
//! The token is self-contained, so an agent needs nothing else to enroll safely: it knows
//! where to go and which CA to accept. The proxy keeps only a SHA-256 of the secret.

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::digest;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::pin::Pin;

/// Prefix of every token string; the version is part of it.
pub const TOKEN_PREFIX: &str = "rvp1";
/// Secret length in bytes (256 bits).
pub const SECRET_LEN: usize = 32;
/// Upper bound on a token string: anything longer is refused before decoding.
pub const MAX_TOKEN_LEN: usize = 4096;

/// A token secret. Its `Debug` is masked so it never reaches a log by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// Draws a fresh secret from the OS random number generator.
    pub fn generate() -> Secret {
        let mut bytes = vec![0u8; SECRET_LEN];
        SystemRandom::new()
            .fill(&mut bytes)
            .expect("the OS random number generator failed");
        Secret(bytes)
    }

    /// Decodes a base64url secret (as sent by an agent).
    pub fn from_base64(s: &str) -> Option<Secret> {
        let bytes = URL_SAFE_NO_PAD.decode(s).ok()?;
        (bytes.len() == SECRET_LEN).then_some(Secret(bytes))
    }

    /// The base64url text form.
    pub fn to_base64(&self) -> String {
        URL_SAFE_NO_PAD.encode(&self.0)
    }

    /// The hash the proxy stores instead of the secret.
    pub fn hash(&self) -> SecretHash {
        let d = digest::digest(&digest::SHA256, &self.0);
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        SecretHash(out)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// SHA-256 of a token secret. Compared in constant time.
#[derive(Clone, Copy, Debug)]
pub struct SecretHash(pub [u8; 32]);

impl SecretHash {
    /// Constant-time comparison, so response timing leaks nothing about the stored hash.
    pub fn matches(&self, other: &SecretHash) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

/// The public part of a token: safe to log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenPublic {
    /// Enrollment address, `host:port`.
    pub server: String,
    /// Acceptable CA pins (`sha256:<hex>`); more than one during a CA rotation.
    pub pins: Vec<String>,
    /// Token id, as listed by `revproxy token list`.
    pub id: String,
}

/// A whole enrollment token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Token {
    pub public: TokenPublic,
    pub secret: Secret,
}

/// Why a token string could not be read. Each says what is wrong in one sentence.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenParseError {
    #[error("token is longer than {MAX_TOKEN_LEN} characters; copy it again")]
    TooLong,
    #[error("token does not start with \"{TOKEN_PREFIX}.\"; is it a revproxy enrollment token?")]
    BadPrefix,
    #[error("token must have three parts separated by '.'; it was probably cut when copied")]
    BadShape,
    #[error("token's public part is not valid: {0}")]
    BadPublic(String),
    #[error(
        "token's secret is not {SECRET_LEN} bytes of base64url; it was probably cut when copied"
    )]
    BadSecret,
}

impl Token {
    /// The single-line text form printed by `revproxy token create`.
    pub fn encode(&self) -> String {
        let public = serde_json::to_vec(&self.public).expect("token public part serializes");
        format!(
            "{TOKEN_PREFIX}.{}.{}",
            URL_SAFE_NO_PAD.encode(public),
            self.secret.to_base64()
        )
    }

    /// Parses and checks a token string (surrounding whitespace is ignored).
    pub fn parse(s: &str) -> Result<Token, TokenParseError> {
        let s = s.trim();
        if s.len() > MAX_TOKEN_LEN {
            return Err(TokenParseError::TooLong);
        }
        let mut parts = s.split('.');
        if parts.next() != Some(TOKEN_PREFIX) {
            return Err(TokenParseError::BadPrefix);
        }
        let (Some(public), Some(secret), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(TokenParseError::BadShape);
        };
        let public = URL_SAFE_NO_PAD
            .decode(public)
            .map_err(|_| TokenParseError::BadPublic("not base64url".into()))?;
        let public: TokenPublic = serde_json::from_slice(&public)
            .map_err(|e| TokenParseError::BadPublic(e.to_string()))?;
        if public.pins.is_empty() {
            return Err(TokenParseError::BadPublic("it names no CA pin".into()));
        }
        for pin in &public.pins {
            Pin::parse(pin).map_err(|e| TokenParseError::BadPublic(e.to_string()))?;
        }
        if public.server.is_empty() || public.id.is_empty() {
            return Err(TokenParseError::BadPublic(
                "it names no server or no token id".into(),
            ));
        }
        let secret = Secret::from_base64(secret).ok_or(TokenParseError::BadSecret)?;
        Ok(Token { public, secret })
    }

    /// The CA pins, parsed (they were checked by [`Token::parse`]).
    pub fn pins(&self) -> Vec<Pin> {
        self.public
            .pins
            .iter()
            .filter_map(|p| Pin::parse(p).ok())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Token {
        Token {
            public: TokenPublic {
                server: "proxy.example.com:7443".into(),
                pins: vec![Pin::from_spki(b"ca").to_string()],
                id: "0123456789abcdef".into(),
            },
            secret: Secret::generate(),
        }
    }

    #[test]
    fn round_trip() {
        let token = sample();
        let text = token.encode();
        assert!(text.starts_with("rvp1."));
        assert!(!text.contains(char::is_whitespace));
        assert_eq!(Token::parse(&format!("  {text}\n")).unwrap(), token);
    }

    #[test]
    fn debug_masks_the_secret() {
        let token = sample();
        let debug = format!("{token:?}");
        assert!(!debug.contains(&token.secret.to_base64()));
        assert!(debug.contains("***"));
    }

    #[test]
    fn malformed_tokens_are_refused_with_a_reason() {
        let text = sample().encode();
        let (head, secret) = text.rsplit_once('.').unwrap();
        assert_eq!(Token::parse("hello"), Err(TokenParseError::BadPrefix));
        assert_eq!(Token::parse("rvp2.a.b"), Err(TokenParseError::BadPrefix));
        assert_eq!(Token::parse(head), Err(TokenParseError::BadShape));
        assert_eq!(
            Token::parse(&format!("{text}.x")),
            Err(TokenParseError::BadShape)
        );
        assert_eq!(
            Token::parse(&format!("{head}.{}", &secret[..10])),
            Err(TokenParseError::BadSecret)
        );
        assert!(matches!(
            Token::parse(&format!("rvp1.!!!.{secret}")),
            Err(TokenParseError::BadPublic(_))
        ));
        let no_pins = URL_SAFE_NO_PAD.encode(br#"{"server":"a:1","pins":[],"id":"x"}"#);
        assert!(matches!(
            Token::parse(&format!("rvp1.{no_pins}.{secret}")),
            Err(TokenParseError::BadPublic(_))
        ));
        assert_eq!(
            Token::parse(&"a".repeat(5000)),
            Err(TokenParseError::TooLong)
        );
    }

    #[test]
    fn secret_hash_compares() {
        let a = Secret::generate();
        let b = Secret::generate();
        assert!(a.hash().matches(&a.hash()));
        assert!(!a.hash().matches(&b.hash()));
    }
}
