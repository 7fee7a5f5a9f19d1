//! Messages from the proxy to its agent that are not client streams. The proxy list
//! ([`MAX_PROXY_LIST`]): when the proxies sharing a store change, each proxy tells the
//! agents on its tunnels at once, so that they open tunnels to a proxy that joined within
//! seconds instead of at their next poll (a minute). On h2 it is a `CONNECT` with the
//! control header (`h2::PROXIES`), on QUIC a unidirectional stream starting with
//! [`QUIC_PROXIES`]; the body is the JSON `GET /v1/proxies` answers. The agent checks it
//! as it checks an answer to its poll.
//!
//! When a QUIC tunnel comes up the proxy says that it keeps idle tunnels for the idle
//! timeout ([`QUIC_SLOW_KEEPALIVE`]), so the agent's keep-alive alone is enough.
//!
//! And one question, proxy to agent: which protocols the service for a name speaks
//! (before a proxy offers `h2` to the clients of a name whose TLS it terminates). On h2 a
//! control `CONNECT` (`h2::ALPN`); on QUIC a stream whose header names
//! `h2::CONTROL_AUTHORITY` with the client field [`QUIC_ALPN`]`NAME`. The answer: `200`
//! saying `h2` (h2c) or `http/1.1`, or `404` (no such service, or an agent before this).

use std::time::Duration;

/// Largest proxy list a message may carry: 64 proxies with long names fit many times.
pub(crate) const MAX_PROXY_LIST: usize = 64 * 1024;
/// How long one message may take, each way: a tunnel too slow for this learns the list at
/// its agent's next poll.
pub(crate) const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);
/// How the client field of a QUIC question about a service's protocols starts.
pub(crate) const QUIC_ALPN: &str = "alpn:";
/// Longest a proxy waits for the answer about a service's protocols (a client's
/// handshake waits for it, once per tunnel and name).
pub(crate) const ALPN_TIMEOUT: Duration = Duration::from_secs(2);

/// What an agent says of a service that speaks h2c (`true`) or not.
pub(crate) fn alpn_answer(h2c: bool) -> &'static str {
    match h2c {
        true => "h2",
        false => "http/1.1",
    }
}

/// The first bytes of a QUIC control stream that carries the proxy list.
pub(crate) const QUIC_PROXIES: &[u8] = b"proxies\n";
/// The whole of a QUIC control stream that says the proxy moves to a new process: the
/// agent opens a tunnel there and retires this one, whose open streams finish here (the
/// new process forwards this tunnel's packets, `quic/takeover.rs`). Agents before it
/// ignore it; the proxy then closes their tunnel with `MOVING` a moment later.
pub(crate) const QUIC_MOVING: &[u8] = b"moving\n";
/// The whole of a QUIC control stream the proxy sends when a tunnel comes up: it holds an
/// idle tunnel for `quic::IDLE_TIMEOUT` (27 s), so the agent's keep-alive every 15 s is
/// enough. A proxy before it times an idle tunnel out after 10 s: until the agent hears
/// this, it opens its keep-alive (an empty unidirectional stream, which every proxy reads
/// and ignores) every [`NUDGE_EVERY`], not only on the beat. Agents before it ignore the
/// message.
pub(crate) const QUIC_SLOW_KEEPALIVE: &[u8] = b"keepalive 15s\n";
/// How often an agent that has not heard [`QUIC_SLOW_KEEPALIVE`] nudges its proxy.
pub(crate) const NUDGE_EVERY: Duration = Duration::from_secs(4);
