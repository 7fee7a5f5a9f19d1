//! Tunnels: one agent↔proxy connection, each client connection riding in it as one
//! stream. Two transports, each in its own folder holding both of its ends and its byte
//! pumps: [`h2`] (TCP + mutual TLS + HTTP/2 `CONNECT`, the default) and [`quic`].
//!
//! Only the files beside this one match on the transport, one file an end: `link.rs` is
//! the proxy's end (a [`Link`] opens a stream for a client, a [`ProxyConn`] is driven until
//! it ends), `agent_end.rs` the agent's (an [`AgentConn`] serves the proxy's streams
//! against its [`Backends`]), `upward.rs` the mesh streams an agent opens, and `choice.rs`
//! which transport to dial. `meter.rs` counts a stream's bytes and `pump.rs` holds what
//! both transports' pumps share. Neither the proxy nor the agent names h2 or QUIC.
//!
//! Back pressure is per stream on both transports: a pump releases flow-control credit only
//! after the bytes were written onward, so a reader that stops holds back its own stream.

mod agent_end;
mod budget;
mod choice;
pub(crate) mod control;
pub(crate) mod duplex;
pub(crate) mod h2;
mod link;
mod meter;
mod pump;
pub(crate) mod quic;
mod splice_io;
pub(crate) mod udp;
mod upward;

use std::time::Duration;

use serde::Deserialize;

pub(crate) use agent_end::{
    client_field, connect, is_gone, parse_client_field, AgentConn, Backend, Backends, ConnectError,
    DialRequest, Dialed, Load, Refusal, Serving, TunnelError,
};
pub(crate) use budget::{default_budget, Budget, Gauges, Receiving};
pub(crate) use choice::Choice;
pub(crate) use link::{
    accept_h2, accept_quic, Link, OpenError, OpenRequest, ProxyConn, TunnelStream,
};
pub(crate) use meter::{Counted, Meter, StreamCounters, StreamLimits};
pub(crate) use pump::{both_ways, read_some, reset, reset_whole, Progress};
pub(crate) use upward::{connect_mesh_channel, serve_mesh_channel, Upward};

/// Longest time a tunnel handshake may take on the proxy's side, per step: TLS on the agent
/// port, the HTTP/2 preface and settings, the QUIC handshake. The agent allows this plus
/// [`crate::runtime::CONNECT_TIMEOUT`] for a whole connection attempt.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Per-stream receive window, on both transports and both ends. It bounds what one stream
/// can have in flight, and so the memory a reader that stopped pins on the far side: at
/// most this much per stalled stream. Measured on loopback (`docs/benchmarks.md`), 2 MiB
/// gave about 5.3 Gbit/s single-stream and 8 MiB 6-7 (over a WAN, 2 MiB allows about
/// 2 MiB per round trip: 560 Mbit/s at 30 ms).
pub(crate) const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
/// Most client streams one tunnel carries at once (the agent advertises it; more wait for
/// a free one, within the proxy's open deadline).
pub(crate) const MAX_STREAMS: u32 = 1023;
/// Per-connection receive window: every stream's full window at once, so no number of
/// stalled streams (up to [`MAX_STREAMS`]) can use it up and hold back the others. It is
/// also the most one tunnel's stalled streams can pin: 1023 x 2 MiB, just under HTTP/2's
/// largest window (2^31 - 1 bytes). Window and stream count trade against each other
/// under that ceiling; this split keeps a thousand concurrent clients per tunnel.
pub(crate) const CONNECTION_WINDOW: u32 = STREAM_WINDOW * MAX_STREAMS;
/// Most extra tunnels an agent adds to one proxy beside its own when its tunnels near
/// their stream limit (`agent/pool.rs`), and the most the proxy admits for one identity:
/// with its own tunnel, 64 x [`MAX_STREAMS`], about 65,000 clients at once per agent. An
/// h2 tunnel cannot carry more streams than [`MAX_STREAMS`] without giving up the stall
/// isolation its connection window gives; more tunnels can (`docs/protocol.md`).
pub(crate) const MAX_EXTRA_TUNNELS: usize = 63;
/// Mesh streams (agent → proxy, to reach a private name) one agent may have open at once
/// on one tunnel; each pins at most [`STREAM_WINDOW`] at either end like any stream.
pub(crate) const MAX_UPWARD: u32 = 64;
/// A stream whose reader (the client on the proxy, the backend on the agent) accepts no
/// bytes for this long is reset and its socket closed, as nginx's `send_timeout` does.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(60);

// HTTP/2 windows are at most 2^31 - 1 bytes.
const _: () = assert!((CONNECTION_WINDOW as u64) < (1 << 31));

/// The tunnel transport an agent is configured with (`--transport`, `transport = ...`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// HTTP/2 over mTLS on TCP.
    #[default]
    H2,
    /// QUIC on UDP, same port number.
    Quic,
    /// QUIC when it works, h2 when it does not; moves back to QUIC when it works again.
    Auto,
}

/// A transport actually in use (`auto` resolves to one of these).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    H2,
    Quic,
}

impl Kind {
    /// For logs and status.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::H2 => "h2",
            Kind::Quic => "quic",
        }
    }
}
