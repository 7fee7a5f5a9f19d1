//! The proxy's end of a tunnel: after an agent's mTLS handshake with ALPN `h2`, register
//! the tunnel under the names it may serve, drive the HTTP/2 connection (the proxy is the
//! client), and PING it so a dead agent is noticed without waiting for TCP.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_rustls::server::TlsStream;
use tracing::{debug, info, warn};

use super::registry::Tunnel;
use super::Shared;
use crate::tunnel::{self, TunnelIo, PING_INTERVAL, PING_TIMEOUT};

/// Time allowed for the HTTP/2 preface and settings exchange.
pub const H2_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Who is on the other end, from the verified client certificate.
struct Peer {
    agent: String,
    serial: String,
    hosts: Vec<String>,
}

fn peer_of(tls: &TlsStream<TunnelIo>) -> Option<Peer> {
    use x509_parser::prelude::*;
    let der = tls.get_ref().1.peer_certificates()?.first()?;
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

/// Serves one tunnel until it closes, dies, or the proxy shuts down.
pub(super) async fn serve(shared: Arc<Shared>, tls: TlsStream<TunnelIo>, peer: SocketAddr) {
    let Some(who) = peer_of(&tls) else {
        warn!(%peer, "tunnel without a readable client certificate; closing");
        return;
    };
    // Serve only what the certificate names *and* the state grants right now (a fresh
    // read: the agent may have enrolled, or been revoked, since the last reload).
    let state = shared.state.refresh().await;
    if state.revoked.contains(&who.serial) {
        warn!(%peer, agent = %who.agent, serial = %who.serial, "certificate revoked; closing the tunnel");
        return;
    }
    let granted = state.grants.get(&who.agent).cloned().unwrap_or_default();
    let hosts = super::registry::granted_hosts(&who.hosts, &granted);
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
    let id = shared.registry.next_id();
    let tunnel = Arc::new(Tunnel::new(
        id,
        who.agent.clone(),
        who.serial,
        who.hosts,
        sender,
    ));
    shared.registry.insert(tunnel.clone(), hosts.clone());
    info!(%peer, agent = %who.agent, tunnel = id, ?hosts, "tunnel up");

    let reason = tokio::select! {
        r = &mut conn => match r {
            Ok(()) => "closed by the agent".to_string(),
            Err(e) => format!("connection failed: {e}"),
        },
        e = keepalive(ping) => e,
        () = tunnel.close.notified() => "closed by the proxy".to_string(),
        () = shared.close_tunnels.cancelled() => "proxy shutting down".to_string(),
    };
    shared.registry.remove(id);
    info!(%peer, agent = %who.agent, tunnel = id, %reason, "tunnel down");
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
