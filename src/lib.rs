//! revproxy: a TCP proxy that routes by port, HTTP `Host` and TLS SNI to backends behind
//! NAT, reached through tunnels their agents dial out to.
//!
//! The library is what the two binaries are made of, so that a Rust program can embed a
//! [`Proxy`] (built with [`ProxyBuilder`] over listeners it has bound) or an [`Agent`]
//! (after [`agent::enroll`] traded a one-time token for an identity). The CA lives in its
//! own crate, re-exported as [`ca`]; the configuration files are [`config`].
//!
//! # What is public
//!
//! For embedders: the builders, [`Proxy`] and [`Agent`] with their handles
//! ([`proxy::Reloader`], [`ProxyStatus`], [`agent::AgentReloader`]), the [`config`] types,
//! and each operation's error. For the command-line tools (and tests that act as one):
//! [`store`] (opening and migrating the CA state), [`admin::client`] (`status`, `ready`),
//! [`tls`]'s client configurations, and [`runtime`]'s process plumbing (logging, signals,
//! listening sockets, state directories, handing sockets to a successor). Everything
//! else is crate-private.
//!
//! # Layout
//!
//! The data path reads top to bottom, one module per step:
//!
//! | module | what |
//! |---|---|
//! | `proxy` | accept loop → one public connection (peek → route → open → splice; static routes apart) → replies to refused clients; the registry of live tunnels; the agent port (TLS, enrollment, tunnels), certificate admission, the state view, background tasks; the builder |
//! | `route` | pure: listener kinds and targets, the SNI and HTTP `Host` peeks, name matching |
//! | `tunnel` | one file an end matches on the transport (`link.rs` the proxy's, `agent_end.rs` the agent's, `upward.rs` mesh streams); `meter.rs` and `pump.rs` serve both transports; `h2/` and `quic/` each hold their proxy end, agent end and byte pumps |
//! | `agent` | enrollment, identity on disk, renewal, the supervisor that keeps a tunnel up, one session, the backend dial |
//! | `tls` | TLS for the agent port: the proxy's server side, the agent's pinned client side |
//! | `wire` | pure codecs: enrollment bodies, the QUIC stream header |
//! | `config` | the TOML files and duration syntax |
//! | `runtime` | what both programs need from the process: shutdown, the one backoff, logging, directories |
//! | `admin` | the admin listener of both programs: metrics, status, readiness, the status page |
//! | `store` | opening the CA state's store: the embedded store, or PostgreSQL shared by several proxies |
// No unsafe code but two audited calls no safe wrapper offers: the QUIC port's steering
// program (`tunnel/quic/steer.rs`, `SO_ATTACH_REUSEPORT_CBPF`) and glibc's `malloc_trim`
// (`runtime/memory.rs`).
#![deny(unsafe_code)]

pub mod admin;
pub mod agent;
pub mod config;
mod edge;
pub use edge::{AcmeSettings, ChallengeKind};
#[cfg(fuzzing)]
#[doc(hidden)]
pub mod fuzzing;
pub mod proxy;
mod route;
pub mod runtime;
pub mod store;
pub mod tls;
mod tunnel;
mod wire;

pub use agent::{Agent, AgentBuilder, AgentError, Transport};
pub use proxy::{ListenerKind, Proxy, ProxyBuilder, ProxyError, ProxyStatus, Target};
pub use revproxy_ca as ca;
pub use tunnel::SEND_TIMEOUT;
