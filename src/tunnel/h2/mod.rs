//! The h2 tunnel: TCP + mutual TLS + HTTP/2, with the roles turned around. The agent
//! dials and is the HTTP/2 *server*; the proxy is the *client* and sends one `CONNECT` per
//! routed client (`:authority` = the name, [`CLIENT_ADDR_HEADER`] = the client's address,
//! the client's first bytes in the request body right away). The agent answers `200` once
//! its backend accepted, or a 4xx/5xx with a reason in [`ERROR_HEADER`]; then bytes flow
//! both ways in the request and response bodies (`docs/protocol.md`).
//!
//! This folder holds both ends: `proxy.rs` (handshake, driving the connection, opening
//! streams), `agent.rs` (dialing, accepting streams, serving one), `splice.rs` (the byte
//! pumps). Here: the settings both ends share and the keep-alive PING.

pub(crate) mod agent;
pub(crate) mod gather;
pub(crate) mod mesh;
pub(crate) mod proxy;
pub(crate) mod read_ahead;
pub(crate) mod settled;
pub(crate) mod silence;
pub(crate) mod splice;

use std::io;
use std::sync::Arc;
use std::time::Duration;

pub(crate) use super::{CONNECTION_WINDOW, MAX_STREAMS, STREAM_WINDOW};

/// Largest DATA frame. Bigger frames mean fewer frame headers and wakeups per byte.
pub(crate) const MAX_FRAME_SIZE: u32 = 64 * 1024;
/// Largest header list either end accepts: a `CONNECT` or its answer carries a name, an
/// address and a one-line reason, far below this (h2's default is 16 MiB).
pub(crate) const MAX_HEADER_LIST: u32 = 16 * 1024;

/// Header carrying the public client's address on a `CONNECT`.
pub(crate) const CLIENT_ADDR_HEADER: &str = "x-revproxy-client";
/// On a mesh stream, the calling agent's SPIFFE identity (set by the proxy only).
pub(crate) const CALLER_HEADER: &str = "x-revproxy-caller";
/// Header carrying a one-line reason on a refused `CONNECT`.
pub(crate) const ERROR_HEADER: &str = "x-revproxy-error";
/// A `CONNECT` with this header is no stream but a message from the proxy: [`MOVING`] or
/// [`PROXIES`].
pub(crate) const CONTROL_HEADER: &str = "x-revproxy-control";
/// A new process serves the proxy's sockets now (`serve --upgrade`): the agent opens a
/// tunnel there at once and retires this one once that is up.
pub(crate) const MOVING: &str = "moving";
/// The proxies sharing the store changed: the body is the new list, as `GET /v1/proxies`
/// answers it (at most [`crate::tunnel::control::MAX_PROXY_LIST`] bytes).
pub(crate) const PROXIES: &str = "proxies";
/// Which protocols the service for a name speaks (the name in [`SERVICE_HEADER`]): the
/// agent answers `200` with [`ALPN_HEADER`] `h2` (it speaks h2c) or `http/1.1`, or `404`
/// when it serves no such name. A proxy asks before offering `h2` to the clients of a
/// name whose TLS it terminates; agents before this answer `404`.
pub(crate) const ALPN: &str = "alpn";
pub(crate) const SERVICE_HEADER: &str = "x-revproxy-service";
pub(crate) const ALPN_HEADER: &str = "x-revproxy-alpn";
/// The authority a control message's `CONNECT` names (never a real name).
pub(crate) const CONTROL_AUTHORITY: &str = "control.revproxy.invalid";

/// The host of the authority that names a granted TCP port: `CONNECT` for `tcp:2222` asks
/// for `tcp.port.revproxy.invalid:2222` (an authority's host cannot hold the colon).
const PORT_HOST: &str = "tcp.port.revproxy.invalid";
/// The same for a granted UDP port's flows: `udp.port.revproxy.invalid:53`.
const UDP_PORT_HOST: &str = "udp.port.revproxy.invalid";

/// The `:authority` a `CONNECT` for `name` carries: the name itself, or for a granted port
/// ([`revproxy_ca::ports`]) [`PORT_HOST`] or [`UDP_PORT_HOST`] with the port.
pub(crate) fn authority_of(name: &str) -> std::borrow::Cow<'_, str> {
    use revproxy_ca::ports::{GrantedPort, Protocol};
    match GrantedPort::of(name) {
        Some(GrantedPort {
            protocol: Protocol::Tcp,
            port,
        }) => format!("{PORT_HOST}:{port}").into(),
        Some(GrantedPort {
            protocol: Protocol::Udp,
            port,
        }) => format!("{UDP_PORT_HOST}:{port}").into(),
        None => name.into(),
    }
}

/// What a `CONNECT` asks for: the name (`:authority`, lower-cased; a granted port as
/// `tcp:PORT`, see [`authority_of`]) and the client address header as sent (the proxy's
/// for a public client, the caller's agent's for a mesh stream).
pub(crate) fn connect_target<B>(request: &http::Request<B>) -> (String, Option<&str>) {
    let name = (request.uri().authority())
        .map(|a| match (a.host().to_ascii_lowercase(), a.port_u16()) {
            (host, Some(port)) if host == PORT_HOST => revproxy_ca::ports::tcp_name(port),
            (host, Some(port)) if host == UDP_PORT_HOST => revproxy_ca::ports::udp_name(port),
            (host, _) => host,
        })
        .unwrap_or_default();
    let client = request
        .headers()
        .get(CLIENT_ADDR_HEADER)
        .and_then(|v| v.to_str().ok());
    (name, client)
}

/// Interval between the agent's keep-alive PINGs on a tunnel (and both ends' on a mesh
/// connection): each costs the proxy a read and an answer.
pub(crate) const PING_INTERVAL: Duration = Duration::from_secs(15);
/// A PING unanswered this long means the tunnel is dead.
pub(crate) const PING_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a keep-alive gave up on the peer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum KeepaliveError {
    #[error("ping failed: {0}")]
    Failed(#[source] h2::Error),
    #[error("no answer to a ping within {PING_TIMEOUT:?}")]
    NoAnswer,
}

/// The proxy PINGs a tunnel it has heard nothing from for this long (the agent PINGs every
/// [`PING_INTERVAL`], so a live agent is heard well within it).
pub(crate) const SILENCE: Duration = Duration::from_secs(17);

/// The proxy's keep-alive: the agent PINGs every [`PING_INTERVAL`] and the proxy answers;
/// the proxy PINGs only a tunnel it has heard nothing from for [`SILENCE`] (one thread
/// looks at every tunnel's silence once a second, [`silence`]), and gives it up if that
/// goes unanswered for [`PING_TIMEOUT`]. A frozen agent is found within
/// `SILENCE + SWEEP_EVERY + PING_TIMEOUT` (28 s) of its last word, at the cost of an
/// answer per agent PING, not a PING of its own or a timer per tunnel.
pub(crate) async fn watch_silence(
    mut ping: h2::PingPong,
    heard: Arc<silence::Heard>,
) -> KeepaliveError {
    let watch = silence::Watch::new(heard);
    loop {
        watch.silent().await;
        if let Err(e) = ping_once(&mut ping).await {
            return e;
        }
    }
}

/// One PING, answered within [`PING_TIMEOUT`].
async fn ping_once(ping: &mut h2::PingPong) -> Result<(), KeepaliveError> {
    match tokio::time::timeout(PING_TIMEOUT, ping.ping(h2::Ping::opaque())).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(KeepaliveError::Failed(e)),
        Err(_) => Err(KeepaliveError::NoAnswer),
    }
}

/// PINGs the peer every [`PING_INTERVAL`], on the shared beat ([`crate::runtime::beat`]);
/// returns why it stopped answering. The agent runs it on its tunnels (and both ends on
/// mesh connections); the proxy watches its tunnels with [`watch_silence`].
pub(crate) async fn keepalive(mut ping: h2::PingPong) -> KeepaliveError {
    let beat = crate::runtime::beat::Beat::new(PING_INTERVAL);
    loop {
        tokio::time::sleep(beat.wait()).await;
        if let Err(e) = ping_once(&mut ping).await {
            return e;
        }
    }
}

/// An h2 error as an I/O error, keeping the I/O error inside when there is one.
pub(crate) fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io()
            .unwrap_or_else(|| io::Error::other("h2 I/O error"))
    } else {
        io::Error::other(e)
    }
}

/// Plaintext rustls may hold for encryption (its default is 64 KiB): more lets one write
/// from h2 carry several frames.
pub(crate) const TLS_SEND_BUFFER: usize = 1024 * 1024;

pub(crate) use read_ahead::TunnelIo;

/// Wraps a tunnel's TCP connection for its TLS ([`read_ahead`]).
pub(crate) fn tunnel_io(tcp: tokio::net::TcpStream) -> TunnelIo {
    TunnelIo::new(tcp)
}
