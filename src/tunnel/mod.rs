//! Tunnel transports and the byte pumps that join a stream to a TCP connection.
//!
//! A tunnel is one agent↔proxy connection; each client connection rides in it as one
//! stream. Over h2 the proxy is the HTTP/2 *client* and sends `CONNECT` (see
//! `docs/protocol.md`); the agent is the *server*. The copying here releases HTTP/2 flow
//! control capacity only after bytes were written onward, so a reader that stops holds
//! back its own stream and nothing else.

pub mod h2;
pub mod quic;

use std::time::Duration;

/// Header carrying the public client's address on a `CONNECT`.
pub const CLIENT_ADDR_HEADER: &str = "x-revproxy-client";
/// Header carrying a one-line reason on a refused `CONNECT`.
pub const ERROR_HEADER: &str = "x-revproxy-error";

/// Read buffer under a tunnel's TLS: rustls reads about one record per syscall, so a
/// large buffer below it cuts the receive syscalls of a busy tunnel several-fold.
pub const TUNNEL_READ_BUFFER: usize = 256 * 1024;

/// Plaintext rustls may hold for encryption (its default is 64 KiB): more lets one write
/// from h2 carry several frames.
pub const TLS_SEND_BUFFER: usize = 1024 * 1024;

/// The socket under a tunnel's TLS.
pub type TunnelIo = tokio::io::BufReader<tokio::net::TcpStream>;

/// Wraps a tunnel's TCP connection in the read buffer.
pub fn tunnel_io(tcp: tokio::net::TcpStream) -> TunnelIo {
    tokio::io::BufReader::with_capacity(TUNNEL_READ_BUFFER, tcp)
}

/// Interval between keep-alive PINGs on an idle tunnel, from either side.
pub const PING_INTERVAL: Duration = Duration::from_secs(10);
/// A PING unanswered this long means the tunnel is dead.
pub const PING_TIMEOUT: Duration = Duration::from_secs(10);
