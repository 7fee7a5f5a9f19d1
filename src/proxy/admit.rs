//! Certificate admission: who a tunnel belongs to, and which names it may serve now.
//!
//! The TLS layer has already verified the chain, the validity and the revocation list at
//! the handshake (a full handshake every time: the agent port resumes no session). Here
//! the verified certificate is read (agent name, serial, names, expiry) and checked against
//! a fresh read of the state, as an allow-list: its serial must be on record and not
//! revoked. The agent may have been revoked or narrowed since the last reload. A tunnel serves the names its certificate holds *and* the state
//! still grants.

use std::net::SocketAddr;

use revproxy_ca::CertSummary;
use tracing::warn;

use super::Shared;

/// Who is on the other end of a tunnel, from its verified client certificate.
pub(super) struct Peer {
    /// Agent name (the certificate's CN).
    pub(super) agent: String,
    /// Serial of the certificate, hex.
    pub(super) serial: String,
    /// Names in the certificate (DNS names, granted ports as `tcp:PORT`): the most the
    /// agent may ever serve.
    pub(super) cert_hosts: Vec<String>,
    /// End of the certificate's validity, Unix seconds: the tunnel closes then.
    pub(super) not_after: i64,
}

/// Least time between two store reads for tunnel admission (at most 20 a second).
const RELOAD_AT_MOST: std::time::Duration = std::time::Duration::from_millis(50);

/// Reads the agent's certificate `der` and returns who it is, or `None` (logged) to refuse
/// the tunnel. What it serves is decided as it is registered (`Registry::insert`).
pub(super) async fn admit(shared: &Shared, der: Option<&[u8]>, peer: SocketAddr) -> Option<Peer> {
    let Some(who) = der.and_then(peer_of) else {
        warn!(%peer, "tunnel without a readable client certificate; closing");
        shared.metrics.tunnel_refused("no_certificate");
        return None;
    };
    // TLS accepts a certificate through the second of its expiry; the proxy closes
    // tunnels at that second (`until_unix`), so one arriving then is refused here rather
    // than registered and closed at once.
    if time::OffsetDateTime::now_utc().unix_timestamp() >= who.not_after {
        warn!(%peer, agent = %who.agent, serial = %who.serial, "certificate expired; closing the tunnel");
        shared.metrics.tunnel_refused("certificate");
        return None;
    }
    // A view read after this tunnel arrived (a revocation made a moment ago, here or on
    // another proxy, is in it), but at most one store read per `RELOAD_AT_MOST` for all
    // tunnels together: a reconnecting fleet shares reads rather than queueing on the store.
    let state = shared.state.refresh_seldom(RELOAD_AT_MOST).await;
    if state.revoked.contains(&who.serial) {
        warn!(%peer, agent = %who.agent, serial = %who.serial, "certificate revoked; closing the tunnel");
        shared.metrics.tunnel_refused("revoked");
        return None;
    }
    if !state.live.contains(&who.serial) {
        warn!(%peer, agent = %who.agent, serial = %who.serial,
              "certificate not on record (signed by this CA but never issued by this proxy); closing the tunnel");
        shared.metrics.tunnel_refused("unknown_certificate");
        return None;
    }
    Some(who)
}

fn peer_of(der: &[u8]) -> Option<Peer> {
    let cert = CertSummary::from_der(der)?;
    let cert_hosts = cert.served();
    Some(Peer {
        agent: cert.common_name?,
        serial: cert.serial,
        cert_hosts,
        not_after: cert.not_after,
    })
}
