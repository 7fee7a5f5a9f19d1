//! The proxy's end of a tunnel: after an agent's mTLS handshake (TCP with ALPN `h2`, or
//! QUIC), register the tunnel under the names it may serve and hold it until it ends. Over
//! h2 the proxy is the HTTP/2 client and PINGs the agent; QUIC has its own keep-alives.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_rustls::server::TlsStream;
use tracing::{debug, info, warn};

use quinn::VarInt;
use rustls::pki_types::CertificateDer;

use super::registry::{Link, Tunnel};
use super::Shared;
use crate::tunnel::{self, quic, TunnelIo, PING_INTERVAL, PING_TIMEOUT};

/// Time allowed for the HTTP/2 preface and settings exchange.
pub const H2_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Who is on the other end, from the verified client certificate.
struct Peer {
    agent: String,
    serial: String,
    hosts: Vec<String>,
}

fn peer_of(der: &[u8]) -> Option<Peer> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let agent = cert
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    let hosts = cert
        .subject_alternative_name()
        .ok()??
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
            _ => None,
        })
        .collect();
    Some(Peer {
        agent,
        serial: revproxy_ca::hex::encode(cert.raw_serial()),
        hosts,
    })
}

/// Who the verified certificate `der` belongs to, and the names to register the tunnel
/// under: what the certificate names *and* the state grants right now (a fresh read: the
/// agent may have enrolled, or been revoked, since the last reload). `None`: refuse.
async fn admit(
    shared: &Shared,
    der: Option<&[u8]>,
    peer: SocketAddr,
) -> Option<(Peer, Vec<String>)> {
    let Some(who) = der.and_then(peer_of) else {
        warn!(%peer, "tunnel without a readable client certificate; closing");
        return None;
    };
    let state = shared.state.refresh().await;
    if state.revoked.contains(&who.serial) {
        warn!(%peer, agent = %who.agent, serial = %who.serial, "certificate revoked; closing the tunnel");
        return None;
    }
    let granted = state.grants.get(&who.agent).cloned().unwrap_or_default();
    let hosts = super::registry::granted_hosts(&who.hosts, &granted);
    Some((who, hosts))
}

/// Registers a tunnel once its connection is up.
fn register(shared: &Shared, who: Peer, hosts: Vec<String>, link: Link) -> Arc<Tunnel> {
    let id = shared.registry.next_id();
    let tunnel = Arc::new(Tunnel::new(id, who.agent, who.serial, who.hosts, link));
    shared.registry.insert(tunnel.clone(), hosts.clone());
    info!(agent = %tunnel.agent, tunnel = id, transport = tunnel.transport(), ?hosts, "tunnel up");
    tunnel
}

/// Serves one h2 tunnel until it closes, dies, or the proxy shuts down.
pub(super) async fn serve(shared: Arc<Shared>, tls: TlsStream<TunnelIo>, peer: SocketAddr) {
    let der = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec());
    let Some((who, hosts)) = admit(&shared, der.as_deref(), peer).await else {
        return;
    };
    let mut tls = tls;
    tls.get_mut()
        .1
        .set_buffer_limit(Some(tunnel::TLS_SEND_BUFFER));
    let handshake = tunnel::h2::client_builder().handshake(tls);
    let (sender, mut conn) = match tokio::time::timeout(H2_HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => {
            debug!(%peer, agent = %who.agent, error = %e, "HTTP/2 handshake failed");
            return;
        }
        Err(_) => {
            debug!(%peer, agent = %who.agent, "HTTP/2 handshake timed out");
            return;
        }
    };
    let ping = conn.ping_pong().expect("ping_pong is taken once");
    let tunnel = register(&shared, who, hosts, Link::H2(sender));

    let reason = tokio::select! {
        r = &mut conn => match r {
            Ok(()) => "closed by the agent".to_string(),
            Err(e) => format!("connection failed: {e}"),
        },
        e = keepalive(ping) => e,
        () = tunnel.close.notified() => "closed by the proxy".to_string(),
        () = shared.close_tunnels.cancelled() => "proxy shutting down".to_string(),
    };
    shared.registry.remove(tunnel.id);
    info!(%peer, agent = %tunnel.agent, tunnel = tunnel.id, %reason, "tunnel down");
}

/// Serves one QUIC tunnel: finishes the handshake (the client certificate is checked in
/// it, revocation included), registers the tunnel, and holds it until it closes. The agent
/// retires a tunnel by sending [`quic::GOAWAY`] on a unidirectional stream: from then on
/// no new streams are routed to it, and it closes once its streams have finished.
pub(super) async fn serve_quic(shared: Arc<Shared>, incoming: quinn::Incoming) {
    let peer = incoming.remote_address();
    // The TLS handshake inside QUIC gets what the TCP agent listener gives TLS.
    let conn = match tokio::time::timeout(super::HANDSHAKE_TIMEOUT, async { incoming.await }).await
    {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            let e = e.to_string();
            if e.contains("certificate") {
                warn!(%peer, error = %e, "agent certificate refused (QUIC)");
            } else {
                debug!(%peer, error = %e, "QUIC handshake failed");
            }
            return;
        }
        Err(_) => {
            debug!(%peer, "QUIC handshake timed out");
            return;
        }
    };
    let der = conn
        .peer_identity()
        .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|certs| certs.first().map(|c| c.to_vec()));
    let Some((who, hosts)) = admit(&shared, der.as_deref(), peer).await else {
        conn.close(VarInt::from_u32(quic::code::CLOSED_BY_PROXY), b"refused");
        return;
    };
    let tunnel = register(&shared, who, hosts, Link::Quic(conn.clone()));
    // Control streams are read on their own (the transport allows the agent two at once),
    // so a slow one never holds up a revocation or a shutdown.
    let mut control = tokio::task::JoinSet::new();
    let reason = loop {
        tokio::select! {
            e = conn.closed() => break format!("{e}"),
            uni = conn.accept_uni() => match uni {
                Ok(mut stream) => {
                    let (shared, tunnel) = (shared.clone(), tunnel.clone());
                    control.spawn(async move {
                        let read = tokio::time::timeout(quic::HEADER_TIMEOUT, stream.read_to_end(16)).await;
                        if matches!(read, Ok(Ok(ref msg)) if msg == quic::GOAWAY) {
                            debug!(agent = %tunnel.agent, tunnel = tunnel.id, "agent retires this tunnel: routing nothing new to it");
                            shared.registry.retire(tunnel.id);
                        }
                    });
                }
                Err(e) => break format!("{e}"),
            },
            Some(_) = control.join_next(), if !control.is_empty() => {}
            () = tunnel.close.notified() => {
                conn.close(VarInt::from_u32(quic::code::CLOSED_BY_PROXY), b"closed by the proxy");
                break "closed by the proxy".to_string();
            }
            () = shared.close_tunnels.cancelled() => {
                conn.close(VarInt::from_u32(quic::code::CLOSED_BY_PROXY), b"proxy shutting down");
                break "proxy shutting down".to_string();
            }
        }
    };
    shared.registry.remove(tunnel.id);
    info!(%peer, agent = %tunnel.agent, tunnel = tunnel.id, %reason, "tunnel down");
}

/// PINGs the peer every [`PING_INTERVAL`]; returns why it stopped answering.
pub(crate) async fn keepalive(mut ping: h2::PingPong) -> String {
    loop {
        tokio::time::sleep(PING_INTERVAL).await;
        match tokio::time::timeout(PING_TIMEOUT, ping.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return format!("ping failed: {e}"),
            Err(_) => return format!("no answer to a ping within {PING_TIMEOUT:?}"),
        }
    }
}
