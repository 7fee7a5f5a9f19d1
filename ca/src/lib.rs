//! revproxy's certificate authority.
//!
//! The proxy is a small CA: it mints one-time enrollment tokens, trades them for agent
//! client certificates, and keeps the record of what it issued and revoked. This crate is
//! that logic and its files, with no sockets and no async runtime, so every rule here is
//! unit-testable on its own. Time is always passed in (`now`), never read from the clock,
//! so tests can move it.
//!
//! Layout: `ca.rs` (the CA on disk, tokens, certificate records), `records.rs` (what operator commands change), `issue.rs` (enrollment
//! and renewal), `cert.rs` (the one X.509 reader), `token.rs` (the token string), `pin.rs`
//! (CA pins), `names.rs` (host and agent names), `operators.rs` (admin-listener client certificates), `state.rs` (the state document and its locked file), `store.rs` (the `Store` trait),
//! `fsutil.rs` (crash-safe private files).
#![forbid(unsafe_code)]

mod ca;
pub mod cert;
mod error;
pub mod fsutil;
pub mod hex;
mod issue;
pub mod names;
mod operators;
mod pin;
mod records;
pub mod state;
pub mod store;
mod token;

pub use ca::{
    pem_to_der, proxy_id_of, proxy_uri, validate_server, validity, Ca, CertInfo, CertState,
    EnrollRequest, Enrolled, InitOptions, NewToken, ServerIdentity, TokenInfo, TokenState,
    BACKDATE, CA_CERT_FILE, CA_KEY_FILE, CA_TTL, DEFAULT_AGENT_PORT, DEFAULT_CERT_TTL,
    DEFAULT_SANS, DEFAULT_TOKEN_TTL, DEFAULT_TRUST_DOMAIN, MAX_CERT_TTL, MAX_CSR_LEN, MAX_HOSTS,
    MAX_TOKEN_TTL, MIN_CERT_TTL, MIN_RENEWAL_AGE_PERCENT, REISSUE_WINDOW, SERVER_CERT_FILE,
    SERVER_CERT_TTL, SERVER_KEY_FILE,
};
pub use cert::CertSummary;
pub use error::{CaError, EnrollError};
#[cfg(fuzzing)]
#[doc(hidden)]
pub use issue::csr_is_acceptable;
pub use operators::{OperatorCert, OperatorInfo, DEFAULT_OPERATOR_TTL, MAX_OPERATOR_TTL};
pub use pin::{Pin, PinError};
pub use store::{ProxyEntry, Store};
pub use token::{Secret, SecretHash, Token, TokenParseError, TokenPublic, TOKEN_PREFIX};
