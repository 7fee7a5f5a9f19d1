//! revproxy's certificate authority.
//!
//! The proxy is a small CA: it mints one-time enrollment tokens, trades them for agent
//! client certificates, and keeps the record of what it issued and revoked. This crate is
//! that logic and its files, with no sockets and no async runtime, so every rule here is
//! unit-testable on its own. Time is always passed in (`now`), never read from the clock,
//! so tests can move it.
#![forbid(unsafe_code)]

mod ca;
mod error;
pub mod fsutil;
pub mod hex;
pub mod names;
mod pin;
pub mod state;
mod token;

pub use ca::*;
pub use error::{CaError, EnrollError};
pub use pin::Pin;
pub use token::{Secret, SecretHash, Token, TokenParseError, TokenPublic, TOKEN_PREFIX};
