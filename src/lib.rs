//! revproxy: a TCP proxy that routes by port, HTTP `Host` and TLS SNI to backends behind
//! NAT, reached through tunnels their agents dial out to.
//!
//! The library exposes what the two binaries are made of, so that a Rust program can embed
//! a [`Proxy`] or an agent: [`agent::enroll`] trades a one-time token for an identity.
#![forbid(unsafe_code)]

pub mod agent;
pub mod config;
pub mod dirs;
pub mod duration;
pub mod enroll_wire;
pub mod logging;
pub mod proxy;
pub mod route;
pub mod signal;
pub mod tls;
pub mod tunnel;

pub use agent::{Agent, AgentBuilder};
pub use proxy::{Proxy, ProxyBuilder, ProxyError, ProxyStatus};
pub use revproxy_ca as ca;
