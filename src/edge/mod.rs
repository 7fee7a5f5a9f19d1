//! TLS termination at the proxy (DESIGN.md section 10): for the names the operator marked
//! (`revproxy tls terminate`), the proxy completes the client's TLS handshake itself, with
//! the certificate on record, and sends the plaintext down the tunnel like any stream.
//! Every other name is passed through untouched.
//!
//! `certs.rs` turns a name's record into the configuration its handshakes use (its key
//! opened with the CA-derived key, once per certificate); `handshake.rs` completes a
//! handshake whose ClientHello was already read to route the connection (and names the
//! client's side of a routed connection, a socket or a TLS session on one); `files.rs` follows
//! the operator's certificate files and stores what they hold when it changes; `acme/`
//! orders certificates from an ACME CA and answers its challenges.

mod acme;
mod certs;
mod files;
mod handshake;

pub(crate) use acme::{answer_tls_alpn01, order_certificates, Answer, Orders};
pub use acme::{AcmeSettings, ChallengeKind};
pub(crate) use certs::Terminator;
pub(crate) use files::follow_files;
pub(crate) use handshake::{accept, Client};
