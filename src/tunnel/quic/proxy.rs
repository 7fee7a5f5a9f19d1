//! The proxy's end of QUIC tunnels: the UDP endpoint, accepting connections (address
//! validation first), the handshake in which the agent's certificate is checked, driving
//! a tunnel (its GOAWAY control streams) until it ends, and opening one stream per
//! routed client.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use quinn::{TransportErrorCode, VarInt};
use rustls::pki_types::CertificateDer;
use tracing::debug;

pub(crate) use super::socket::{ReadSwitch, Takeover};
use super::takeover::GenerationCids;
use super::{code, read_frame, server_crypto, transport_config, Role, GOAWAY, HEADER_TIMEOUT};
use crate::tunnel::{OpenError, OpenRequest, HANDSHAKE_TIMEOUT};
use crate::wire::stream::{Answer, StreamHeader};

/// Why a QUIC tunnel handshake failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    #[error("QUIC handshake failed: {0}")]
    Failed(#[from] quinn::ConnectionError),
    #[error("QUIC handshake timed out after {HANDSHAKE_TIMEOUT:?}")]
    Timeout,
}

impl HandshakeError {
    /// Whether the agent's certificate was refused (a TLS certificate alert), which is
    /// the operator's business, rather than line noise.
    pub(crate) fn certificate_refused(&self) -> bool {
        // The TLS alerts rustls sends for a client certificate it refuses (RFC 8446
        // section 6): bad_certificate .. certificate_unknown, unknown_ca, access_denied,
        // decrypt_error (a signature from another CA), certificate_required.
        const ALERTS: [u8; 9] = [42, 43, 44, 45, 46, 48, 49, 51, 116];
        match self {
            HandshakeError::Failed(quinn::ConnectionError::TransportError(e)) => ALERTS
                .iter()
                .any(|&alert| u64::from(e.code) == u64::from(TransportErrorCode::crypto(alert))),
            _ => false,
        }
    }
}

/// The proxy's QUIC endpoint on `socket`, with the agent port's TLS configuration, and
/// the switch of its reading the socket (on unless `reading` is false: a process that
/// took the socket over reads once the old one has let go).
pub(crate) fn endpoint(
    socket: std::net::UdpSocket,
    mut tls: rustls::ServerConfig,
    reading: bool,
    config: quinn::EndpointConfig,
    takeover: Takeover,
) -> std::io::Result<(quinn::Endpoint, ReadSwitch)> {
    tls.alpn_protocols = vec![
        crate::tls::ALPN_QUIC.to_vec(),
        crate::tls::ALPN_QUIC_EXTRA.to_vec(),
    ];
    let mut server = quinn::ServerConfig::with_crypto(server_crypto(tls));
    server.transport_config(Arc::new(transport_config(Role::Proxy)));
    let (socket, switch) = super::socket::switchable(socket, reading, takeover)?;
    let endpoint = quinn::Endpoint::new_with_abstract_socket(
        config,
        Some(server),
        socket,
        Arc::new(quinn::TokioRuntime),
    )?;
    Ok((endpoint, switch))
}

/// How often the endpoint may send a stateless reset, at most (quinn's default is one in
/// 20 ms for the whole endpoint: after a restart, a fleet's keep-alives would wait their
/// turn for many seconds). A reset is always smaller than the packet that caused it, and
/// only packets with an ID this proxy could have issued get one.
const MIN_RESET_INTERVAL: Duration = Duration::from_millis(1);

/// The endpoint's configuration for stateless resets, from `secret` (kept in the state
/// directory, so it outlives the process): after a crash and restart, or an upgrade, the
/// new process recognises the connection IDs the old one issued and answers their packets
/// with a reset their agents accept (the same reset key), so they reconnect at once
/// instead of waiting out the idle timeout. Packets with IDs it could not have issued are
/// dropped without a reset.
/// Connection IDs carry the process's generation (`takeover.rs`), keyed with
/// [`cid_key`], and name the endpoint's socket in the port's group (`steer.rs`).
pub(crate) fn endpoint_config(secret: &[u8], takeover: &Takeover) -> quinn::EndpointConfig {
    let mut config = quinn::EndpointConfig::new(Arc::new(reset_key(secret)));
    let (key, generation, steer) = (takeover.key.clone(), takeover.generation, takeover.steer);
    config
        .cid_generator(move || Box::new(GenerationCids::new(&key, generation).steered(steer)))
        .min_reset_interval(MIN_RESET_INTERVAL);
    config
}

/// The key of the stateless resets' tokens, from the same `secret`.
pub(crate) fn reset_key(secret: &[u8]) -> ring::hmac::Key {
    let reset = derive(secret, b"revproxy QUIC stateless reset key v1");
    ring::hmac::Key::new(ring::hmac::HMAC_SHA256, reset.as_ref())
}

/// The key of the connection IDs' signatures, from the same `secret`.
pub(crate) fn cid_key(secret: &[u8]) -> Vec<u8> {
    derive(secret, b"revproxy QUIC connection ID key v2")
        .as_ref()
        .to_vec()
}

fn derive(secret: &[u8], label: &[u8]) -> ring::hmac::Tag {
    ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret),
        label,
    )
}

/// The next connection attempt whose sender proved it owns its address; `None` once the
/// endpoint is closed. Unproven senders get a stateless Retry, so spoofed packets cost
/// one reply each, not a handshake slot.
pub(crate) async fn accept(endpoint: &quinn::Endpoint) -> Option<quinn::Incoming> {
    loop {
        let incoming = endpoint.accept().await?;
        if !incoming.remote_address_validated() && incoming.may_retry() {
            if let Err(e) = incoming.retry() {
                e.into_incoming().ignore();
            }
            continue;
        }
        return Some(incoming);
    }
}

/// Stops taking connections, closes every tunnel with `reason`, and waits (bounded) until
/// the closes went out and the UDP port is released, so a restarted proxy can bind it.
pub(crate) async fn close(endpoint: &quinn::Endpoint, reason: &'static str) {
    stop_accepting(endpoint);
    endpoint.close(VarInt::from_u32(code::CLOSED_BY_PROXY), reason.as_bytes());
    // Bounded: peers that vanished never acknowledge.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), endpoint.wait_idle()).await;
}

/// Completes the handshake (the client certificate is verified inside it, revocation
/// included) within [`HANDSHAKE_TIMEOUT`]; returns the connection and the agent's
/// certificate.
pub(crate) async fn handshake(incoming: quinn::Incoming) -> Result<Handshaken, HandshakeError> {
    let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, async { incoming.await }).await {
        Ok(conn) => conn?,
        Err(_) => return Err(HandshakeError::Timeout),
    };
    let der = conn
        .peer_identity()
        .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|certs| certs.first().map(|c| c.to_vec()));
    let extra = conn
        .handshake_data()
        .and_then(|data| data.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .is_some_and(|data| data.protocol.as_deref() == Some(crate::tls::ALPN_QUIC_EXTRA));
    Ok(Handshaken { conn, der, extra })
}

/// A QUIC tunnel whose handshake is done.
pub(crate) struct Handshaken {
    pub(crate) conn: quinn::Connection,
    /// The agent's certificate (verified in the handshake).
    pub(crate) der: Option<Vec<u8>>,
    /// An extra tunnel ([`crate::tls::ALPN_QUIC_EXTRA`]).
    pub(crate) extra: bool,
}

/// Refuses a tunnel after its handshake (the state no longer admits the agent).
pub(crate) fn refuse(conn: &quinn::Connection) {
    conn.close(VarInt::from_u32(code::CLOSED_BY_PROXY), b"refused");
}

/// Why a tunnel ended, for the log: an agent that closed it says why (stopping, or done
/// draining).
fn ended(e: quinn::ConnectionError) -> String {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => {
            format!(
                "closed by the agent: {}",
                String::from_utf8_lossy(&c.reason)
            )
        }
        e => e.to_string(),
    }
}

/// Holds the tunnel until it closes or `close` completes (then it is closed with that
/// reason). Control streams are read on their own tasks (the transport allows the agent
/// two at once), so a slow one never holds up a revocation or a shutdown; on [`GOAWAY`]
/// `retire` is called. Returns why the tunnel ended.
pub(crate) async fn drive(
    conn: quinn::Connection,
    close: impl Future<Output = &'static str>,
    retire: impl Fn(),
    upward: std::sync::Arc<dyn Fn(crate::tunnel::Upward) + Send + Sync>,
) -> String {
    tokio::pin!(close);
    let mut control = tokio::task::JoinSet::new();
    let mut heads = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            e = conn.closed() => return ended(e),
            uni = conn.accept_uni() => match uni {
                Ok(mut stream) => {
                    control.spawn(async move {
                        let read = tokio::time::timeout(HEADER_TIMEOUT, stream.read_to_end(16)).await;
                        matches!(read, Ok(Ok(ref msg)) if msg == GOAWAY)
                    });
                }
                Err(e) => return ended(e),
            },
            // A mesh stream the agent opened: its header first (bounded), then it is the
            // proxy's to route.
            bi = conn.accept_bi() => match bi {
                Ok((send, mut recv)) => {
                    let upward = upward.clone();
                    heads.spawn(async move {
                        let header = tokio::time::timeout(
                            HEADER_TIMEOUT,
                            super::read_frame(&mut recv, StreamHeader::parse),
                        )
                        .await;
                        match header {
                            Ok(Ok((header, first))) => upward(crate::tunnel::Upward::Quic {
                                header,
                                send,
                                recv,
                                first,
                            }),
                            _ => {
                                let mut send = send;
                                let _ = send.reset(VarInt::from_u32(code::PROTOCOL));
                            }
                        }
                    });
                }
                Err(e) => return ended(e),
            },
            Some(_) = heads.join_next(), if !heads.is_empty() => {}
            Some(done) = control.join_next(), if !control.is_empty() => {
                if matches!(done, Ok(true)) {
                    debug!("agent retires this tunnel: routing nothing new to it");
                    retire();
                }
            }
            reason = &mut close => {
                conn.close(VarInt::from_u32(code::CLOSED_BY_PROXY), reason.as_bytes());
                return reason.to_string();
            }
        }
    }
}

/// A stream being opened: reset (and its receive side stopped by its own drop) unless
/// taken out once the agent accepted it.
struct ResetOnDrop(Option<quinn::SendStream>);

impl Drop for ResetOnDrop {
    fn drop(&mut self) {
        if let Some(send) = &mut self.0 {
            let _ = send.reset(VarInt::from_u32(code::ABORTED));
        }
    }
}

/// Opens a stream for `req.name`, sends the header and the client's first bytes together,
/// and waits for the agent's answer (the caller bounds the wait). Returns the stream and
/// the bytes that followed the answer.
pub(crate) async fn open(
    conn: &quinn::Connection,
    req: &OpenRequest<'_>,
) -> Result<(quinn::SendStream, quinn::RecvStream, Bytes), OpenError> {
    let header = StreamHeader {
        name: req.name.to_string(),
        client: crate::tunnel::client_field(req.client, req.server, req.tls.as_ref()),
        caller: req.caller.unwrap_or_default().to_string(),
    }
    .encode()
    .ok_or_else(|| OpenError::Tunnel {
        reason: "the name or the caller's identity does not fit a stream header".into(),
        gone: false,
    })?;
    let (send, mut recv) = conn.open_bi().await.map_err(|e| OpenError::Tunnel {
        reason: e.to_string(),
        gone: true,
    })?;
    // Until the agent says 200, giving up (an error, or the caller's timeout dropping this
    // future) resets the stream, so the agent never hands the first bytes to a backend
    // while the proxy offers them to another agent.
    let mut opening = ResetOnDrop(Some(send));
    let send = opening.0.as_mut().expect("set above");
    // A refusing agent drops the header and first bytes.
    let mut chunks = [header, req.early.clone()];
    let _ = send.write_all_chunks(&mut chunks).await;
    let (answer, first) = read_frame(&mut recv, Answer::parse).await.map_err(|e| {
        let aborted = (e.get_ref())
                .and_then(|e| e.downcast_ref::<quinn::ReadError>())
                .is_some_and(|e| {
                    matches!(e, quinn::ReadError::Reset(c) if *c == VarInt::from_u32(code::ABORTED))
                });
        if aborted {
            OpenError::Aborted {
                reason: e.to_string(),
            }
        } else {
            OpenError::Tunnel {
                reason: format!("no answer: {e}"),
                gone: conn.close_reason().is_some(),
            }
        }
    })?;
    if answer.status != 200 {
        return Err(OpenError::Refused {
            status: answer.status,
            reason: answer.reason,
        });
    }
    let send = opening.0.take().expect("set above");
    Ok((send, recv, first))
}

/// Asks the agent which protocols the service for `name` speaks (`control.rs`; the
/// caller bounds the wait): `Some(true)` when it speaks h2c, `None` when the agent gave
/// no answer (it serves no such name, or predates the question).
pub(crate) async fn ask_alpn(conn: &quinn::Connection, name: &str) -> Result<Option<bool>, String> {
    let header = StreamHeader {
        name: crate::tunnel::h2::CONTROL_AUTHORITY.into(),
        client: format!("{}{name}", crate::tunnel::control::QUIC_ALPN),
        caller: String::new(),
    }
    .encode()
    .ok_or("the name does not fit a stream header")?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    send.write_all(&header).await.map_err(|e| e.to_string())?;
    let _ = send.finish();
    let (answer, _) = read_frame(&mut recv, Answer::parse)
        .await
        .map_err(|e| e.to_string())?;
    Ok((answer.status == 200).then(|| answer.reason == "h2"))
}

/// Takes no new connections; established tunnels go on.
pub(crate) fn stop_accepting(endpoint: &quinn::Endpoint) {
    endpoint.set_server_config(None);
}

/// Tells the agent which proxies share the store now: a control stream of its own
/// (`control.rs`); the caller bounds the wait. An agent from before this takes no control
/// streams: the wait runs out, and it learns the list at its next poll.
/// Tells the agent that the proxy moves to a new process ([`QUIC_MOVING`]).
///
/// [`QUIC_MOVING`]: crate::tunnel::control::QUIC_MOVING
pub(crate) async fn tell_moving(conn: &quinn::Connection) -> Result<(), String> {
    let mut send = conn.open_uni().await.map_err(|e| e.to_string())?;
    send.write_all(crate::tunnel::control::QUIC_MOVING)
        .await
        .map_err(|e| e.to_string())?;
    send.finish().map_err(|e| e.to_string())
}

/// Tells the agent that this proxy keeps idle tunnels for the idle timeout
/// ([`QUIC_SLOW_KEEPALIVE`]); the caller bounds the wait.
///
/// [`QUIC_SLOW_KEEPALIVE`]: crate::tunnel::control::QUIC_SLOW_KEEPALIVE
pub(crate) async fn tell_slow_keepalive(conn: &quinn::Connection) -> Result<(), String> {
    let mut send = conn.open_uni().await.map_err(|e| e.to_string())?;
    send.write_all(crate::tunnel::control::QUIC_SLOW_KEEPALIVE)
        .await
        .map_err(|e| e.to_string())?;
    send.finish().map_err(|e| e.to_string())
}

pub(crate) async fn tell_proxies(conn: &quinn::Connection, list: Bytes) -> Result<(), String> {
    let mut send = conn.open_uni().await.map_err(|e| e.to_string())?;
    let mut chunks = [
        Bytes::from_static(crate::tunnel::control::QUIC_PROXIES),
        list,
    ];
    send.write_all_chunks(&mut chunks)
        .await
        .map_err(|e| e.to_string())?;
    send.finish().map_err(|e| e.to_string())
}
