//! What both programs need from the process around them, whichever side they run:
//! shutdown signals, the one reconnect backoff, logging setup, default state directories
//! and time display. Nothing here knows about tunnels, routing or certificates.

pub(crate) mod backoff;
pub(crate) mod beat;
pub mod dirs;
pub mod handover;
pub(crate) mod holding;
pub(crate) mod http1;
pub(crate) mod lanes;
pub mod logging;
pub(crate) mod memory;
pub(crate) mod notify;
pub(crate) mod shutdown;

pub use logging::rfc3339;
pub use shutdown::shutdown_signal;

use std::time::Duration;

/// Time allowed to open any outgoing TCP connection: the agent's to the proxy and to its
/// backends, the proxy's to a static `tcp://` backend.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Accept queue asked for on every listening socket revproxy binds (the kernel caps it at
/// `net.core.somaxconn`). tokio's default of 1,024 overflows when thousands of clients
/// arrive at once, and a handshake the queue dropped can end in a reset.
pub const LISTEN_BACKLOG: u32 = 4096;

/// A TCP listener on `addr` with [`LISTEN_BACKLOG`] (and `SO_REUSEADDR`, as tokio sets
/// it). Needs a tokio runtime.
pub fn listen(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = match addr {
        std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Connects to `addr` (`host:port`) within [`CONNECT_TIMEOUT`], with Nagle off: every
/// connection revproxy opens carries interactive traffic. A timeout is an error of kind
/// `TimedOut`.
pub(crate) async fn connect(addr: &str) -> std::io::Result<tokio::net::TcpStream> {
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no connection within {CONNECT_TIMEOUT:?}"),
            )
        })??;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// A UDP socket connected to `addr` (`HOST:PORT`, resolved within [`CONNECT_TIMEOUT`]),
/// bound to an ephemeral port of the address's family.
pub(crate) async fn connect_udp(addr: &str) -> std::io::Result<tokio::net::UdpSocket> {
    let resolved = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::lookup_host(addr))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("{addr} did not resolve within {CONNECT_TIMEOUT:?}"),
            )
        })??
        .next()
        .ok_or_else(|| std::io::Error::other(format!("{addr} resolves to nothing")))?;
    let local: std::net::SocketAddr = match resolved {
        std::net::SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        std::net::SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = tokio::net::UdpSocket::bind(local).await?;
    socket.connect(resolved).await?;
    Ok(socket)
}

/// Raises this process's soft limit on open files to its hard limit (often 1024 against
/// several hundred thousand): the proxy's connection caps and the agent's streams need
/// the descriptors, and running out stops accepting altogether. Returns the limit now in
/// force.
pub fn raise_fd_limit() -> std::io::Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX)
}

/// The soft limit on open files in force now.
pub(crate) fn fd_limit() -> u64 {
    rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft)
}

/// A random number for jitter and connection ids (not for secrets).
pub(crate) fn random() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}
