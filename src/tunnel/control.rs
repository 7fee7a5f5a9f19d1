//! Messages from the proxy to its agent that are not client streams. The proxy list
//! ([`MAX_PROXY_LIST`]): when the proxies sharing a store change, each proxy tells the
//! agents on its tunnels at once, so that they open tunnels to a proxy that joined within
//! seconds instead of at their next poll (a minute). On h2 it is a `CONNECT` with the
//! control header (`h2::PROXIES`), on QUIC a unidirectional stream starting with
//! [`QUIC_PROXIES`]; the body is the JSON `GET /v1/proxies` answers. The agent checks it
//! as it checks an answer to its poll.

use std::time::Duration;

/// Largest proxy list a message may carry: 64 proxies with long names fit many times.
pub(crate) const MAX_PROXY_LIST: usize = 64 * 1024;
/// How long one message may take, each way: a tunnel too slow for this learns the list at
/// its agent's next poll.
pub(crate) const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);
/// The first bytes of a QUIC control stream that carries the proxy list.
pub(crate) const QUIC_PROXIES: &[u8] = b"proxies\n";
