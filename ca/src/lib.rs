//! revproxy's certificate authority.
//!
//! The proxy is a small CA: it mints one-time enrollment tokens, trades them for agent
//! client certificates, and keeps the record of what it issued and revoked. This crate is
//! that logic and its files, with no sockets and no async runtime, so every rule here is
//! unit-testable on its own. Time is always passed in (`now`), never read from the clock,
//! so tests can move it.
//!
//! Layout: `ca.rs` (the CA on disk: open and init), `server.rs` (the proxy's server
//! certificate and enrollment address), `profile.rs` (what a certificate of each kind
//! holds), `csr.rs` (reading an agent's CSR), `issue.rs` (enrollment and renewal),
//! `tokens.rs` (tokens minted, listed, revoked), `certs.rs` (certificates listed, revoked),
//! `grants.rs` (names an agent may serve and reach), `operators.rs` (admin-listener client
//! certificates), `tls.rs` (names the proxy terminates TLS for), `seal.rs` (private keys
//! sealed in the store), `cert.rs` (the one X.509 reader), `token.rs` (the token string), `pin.rs`
//! (CA pins), `names.rs` (host and agent names), `state.rs` (the state document and its
//! locked file), `store.rs` (the `Store` trait), `fsutil.rs` (crash-safe private files).
#![forbid(unsafe_code)]

mod acme;
mod ca;
pub mod cert;
mod certs;
mod csr;
mod error;
pub mod fsutil;
mod grants;
pub mod hex;
mod issue;
pub mod names;
mod operators;
mod pin;
pub mod ports;
mod profile;
pub mod records;
mod seal;
mod server;
pub mod sqlite;
pub mod state;
pub mod store;
mod tls;
mod token;
mod tokens;

pub use acme::acme_account_purpose;
pub use ca::{
    Ca, InitOptions, CA_CERT_FILE, CA_KEY_FILE, DEFAULT_SANS, DEFAULT_TRUST_DOMAIN,
    SERVER_CERT_FILE, SERVER_KEY_FILE,
};
pub use cert::{pem_to_der, validity, CertSummary};
pub use certs::{CertInfo, CertState};
#[cfg(fuzzing)]
#[doc(hidden)]
pub use csr::csr_is_acceptable;
pub use csr::MAX_CSR_LEN;
pub use error::{CaError, EnrollError};
pub use issue::{
    EnrollRequest, Enrolled, DEFAULT_CERT_TTL, MAX_CERT_TTL, MIN_CERT_TTL, MIN_RENEWAL_AGE_PERCENT,
    REISSUE_WINDOW,
};
pub use names::MAX_HOSTS;
pub use operators::{OperatorCert, OperatorInfo, DEFAULT_OPERATOR_TTL, MAX_OPERATOR_TTL};
pub use pin::{Pin, PinError};
pub use profile::{BACKDATE, CA_TTL};
pub use records::{Settings, Tx};
pub use seal::Sealer;
pub use server::{
    proxy_id_of, proxy_uri, validate_server, EnrollmentAddress, NamesAdded, ServerIdentity,
    DEFAULT_AGENT_PORT, SERVER_CERT_TTL,
};
pub use store::{Changed, Changes, ProxyEntry, Store};
pub use tls::{check_own_cert, tls_key_purpose, OwnCert};
pub use token::{Secret, SecretHash, Token, TokenParseError, TokenPublic, TOKEN_PREFIX};
pub use tokens::{NewToken, TokenFilter, TokenInfo, TokenState, DEFAULT_TOKEN_TTL, MAX_TOKEN_TTL};
