//! The proxy's end of a tunnel: accepting an agent's connection, opening a stream on it
//! for a client, and splicing that stream to the client's socket. Matches on the
//! transport; the wire work is in `h2/` and `quic/`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tracing::debug;

use super::control::CONTROL_TIMEOUT;
use super::h2::settled::Settled;
use super::HANDSHAKE_TIMEOUT;
use super::{duplex, h2, quic, Budget, Kind, Meter, StreamCounters, StreamLimits, Upward};

/// What the proxy asks of an agent for one client connection.
pub(crate) struct OpenRequest<'a> {
    /// The name the client asked for.
    pub(crate) name: &'a str,
    /// The public client's address.
    pub(crate) client: SocketAddr,
    /// The address the client connected to (a public listener's), when there is one.
    pub(crate) server: Option<SocketAddr>,
    /// The bytes already read from the client, sent with the request without waiting for
    /// the answer (a tunnel round trip less per connection); a refusing agent drops them,
    /// so the caller may offer them to the next agent.
    pub(crate) early: &'a Bytes,
    /// On a mesh stream, the calling agent's SPIFFE identity, for the serving agent.
    pub(crate) caller: Option<&'a str>,
    /// When the proxy terminated the client's TLS: what was agreed, for the backend's
    /// PROXY header.
    pub(crate) tls: Option<crate::wire::proxy_header::TlsFacts>,
}

/// Why a stream could not be opened on a tunnel.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OpenError {
    #[error("tunnel failed: {reason}")]
    Tunnel {
        reason: String,
        /// The tunnel takes no more streams (GOAWAY, connection lost), as opposed to
        /// this one stream failing.
        gone: bool,
    },
    #[error("answered {status}: {reason}")]
    Refused { status: u16, reason: String },
    /// The agent took the stream and its backend, then reset the stream (its backend
    /// failed) before its answer was read: on QUIC a reset discards what was not read
    /// yet. The backend may have had the client's first bytes: the client gets a reset,
    /// as it would a moment later, and no other agent is tried.
    #[error("the agent's backend failed before its answer arrived: {reason}")]
    Aborted { reason: String },
}

impl OpenError {
    /// Whether the tunnel itself will take no more streams (the agent sent GOAWAY, or the
    /// connection failed), as opposed to this one stream being refused.
    pub(crate) fn tunnel_is_gone(&self) -> bool {
        matches!(self, OpenError::Tunnel { gone: true, .. })
    }
}

/// How the proxy opens streams on a tunnel (and an agent its mesh streams).
#[derive(Clone)]
pub(crate) enum Link {
    /// With the tunnel's news of window narrowings that took effect (`h2/settled.rs`).
    H2(::h2::client::SendRequest<Bytes>, watch::Receiver<()>),
    Quic(quinn::Connection),
}

/// An open stream, ready to be joined to its client's socket.
pub(crate) enum TunnelStream {
    H2(::h2::SendStream<Bytes>, ::h2::RecvStream, Settled),
    /// The bytes are what followed the agent's answer in the same read.
    Quic(quinn::SendStream, quinn::RecvStream, Bytes),
}

/// A tunnel connection on the proxy whose handshakes are done, to be driven until it ends.
pub(crate) enum ProxyConn {
    /// With where to say that a window narrowing took effect.
    H2(
        Box<h2::proxy::Conn>,
        h2::settled::Narrowed,
        Arc<h2::silence::Heard>,
    ),
    Quic(quinn::Connection),
}

/// Why an agent's tunnel could not be set up on the proxy.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AcceptError {
    #[error(transparent)]
    H2(#[from] h2::proxy::HandshakeError),
    #[error(transparent)]
    Quic(#[from] quic::proxy::HandshakeError),
}

impl AcceptError {
    /// Whether the agent's certificate was refused in the handshake.
    pub(crate) fn certificate_refused(&self) -> bool {
        match self {
            AcceptError::H2(_) => false, // checked by TLS before the h2 handshake
            AcceptError::Quic(e) => e.certificate_refused(),
        }
    }
}

/// Completes an h2 tunnel on an agent's verified TLS connection.
pub(crate) async fn accept_h2(
    tls: tokio_rustls::server::TlsStream<h2::TunnelIo>,
) -> Result<(Link, ProxyConn), AcceptError> {
    let done = h2::proxy::handshake(tls).await?;
    let (narrowed, settled) = h2::settled::channel();
    let link = Link::H2(done.sender, settled);
    Ok((
        link,
        ProxyConn::H2(Box::new(done.conn), narrowed, done.heard),
    ))
}

/// Completes a QUIC tunnel; returns it with the agent's (verified) certificate, and
/// whether it is an extra tunnel ([`crate::tls::ALPN_QUIC_EXTRA`]).
pub(crate) async fn accept_quic(
    incoming: quinn::Incoming,
) -> Result<(Link, ProxyConn, Option<Vec<u8>>, bool), AcceptError> {
    let done = quic::proxy::handshake(incoming).await?;
    let link = Link::Quic(done.conn.clone());
    Ok((link, ProxyConn::Quic(done.conn), done.der, done.extra))
}

impl Link {
    /// Which transport the tunnel runs on.
    pub(crate) fn kind(&self) -> Kind {
        match self {
            Link::H2(..) => Kind::H2,
            Link::Quic(_) => Kind::Quic,
        }
    }

    /// Opens a stream for a client and waits for the agent's answer; the caller bounds
    /// the wait.
    pub(crate) async fn open(&self, req: &OpenRequest<'_>) -> Result<TunnelStream, OpenError> {
        match self {
            Link::H2(sender, settled) => {
                let (send, recv) = h2::proxy::open(sender, req).await?;
                Ok(TunnelStream::H2(send, recv, Settled::new(settled)))
            }
            Link::Quic(conn) => {
                let (send, recv, first) = quic::proxy::open(conn, req).await?;
                Ok(TunnelStream::Quic(send, recv, first))
            }
        }
    }

    /// Whether the agent's service for `name` speaks h2c, asked within
    /// [`super::control::ALPN_TIMEOUT`]: `None` when the question failed or took too long
    /// (to be asked again); an agent before the question says no.
    pub(crate) async fn speaks_h2c(&self, name: &str) -> Option<bool> {
        let asked = async {
            match self {
                Link::H2(sender, _) => h2::proxy::ask_alpn(sender, name)
                    .await
                    .map_err(|e| e.to_string()),
                Link::Quic(conn) => quic::proxy::ask_alpn(conn, name).await,
            }
        };
        match tokio::time::timeout(super::control::ALPN_TIMEOUT, asked).await {
            Ok(Ok(said)) => Some(said.unwrap_or(false)),
            Ok(Err(e)) => {
                debug!(host = %name, error = %e, "the agent did not say which protocols its service speaks");
                None
            }
            Err(_) => None,
        }
    }

    /// Tells the agent that a new process serves this proxy now, so that it moves there at
    /// once: a control message on either transport. The agent opens its next tunnel, then
    /// retires this one, whose open streams finish here (a QUIC tunnel's packets reach
    /// this process through the new one, `quic/takeover.rs`). A QUIC tunnel that cannot be
    /// told is closed with [`quic::code::MOVING`] (see [`Self::close_moving`]). Bounded by
    /// [`HANDSHAKE_TIMEOUT`].
    pub(crate) async fn tell_moving(&self) {
        let told = async {
            match self {
                Link::H2(sender, _) => h2::proxy::tell_moving(sender)
                    .await
                    .map_err(|e| e.to_string()),
                Link::Quic(conn) => quic::proxy::tell_moving(conn).await,
            }
        };
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, told).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                debug!(error = %e, "could not tell an agent to move");
                self.close_moving();
            }
            Err(_) => self.close_moving(),
        }
    }

    /// Closes a QUIC tunnel with [`quic::code::MOVING`]: its agent reconnects without a
    /// pause (to the new process), its open streams are cut. For an agent that did not
    /// act on [`Self::tell_moving`] (one before the QUIC message), or a process whose
    /// successor does not forward its packets. An h2 tunnel is left to drain.
    pub(crate) fn close_moving(&self) {
        if let Link::Quic(conn) = self {
            conn.close(
                quinn::VarInt::from_u32(quic::code::MOVING),
                b"proxy moving to a new process",
            );
        }
    }

    /// Tells the agent which proxies share the store now (`control.rs`), within
    /// [`CONTROL_TIMEOUT`]; says whether the agent took it.
    pub(crate) async fn tell_proxies(&self, list: Bytes) -> bool {
        let told = async {
            match self {
                Link::H2(sender, _) => h2::proxy::tell_proxies(sender, list)
                    .await
                    .map_err(|e| e.to_string()),
                Link::Quic(conn) => quic::proxy::tell_proxies(conn, list).await,
            }
        };
        match tokio::time::timeout(CONTROL_TIMEOUT, told).await {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                debug!(error = %e, "could not tell an agent of the proxy list");
                false
            }
            Err(_) => false,
        }
    }
}

/// What a spliced stream moved: bytes from the client (`up`) and to it (`down`), and the
/// error that ended it, if one did.
pub(crate) struct Moved {
    pub(crate) up: u64,
    pub(crate) down: u64,
    pub(crate) error: Option<std::io::Error>,
}

impl TunnelStream {
    /// A QUIC stream's id, as both ends of the tunnel know it.
    pub(crate) fn quic_id(&self) -> Option<u64> {
        match self {
            TunnelStream::Quic(send, ..) => Some(send.id().into()),
            TunnelStream::H2(..) => None,
        }
    }

    /// The stream as a byte pipe, to be joined to another tunnel stream (the mesh).
    pub(crate) fn into_duplex(self) -> duplex::Duplex {
        match self {
            TunnelStream::H2(send, recv, settled) => {
                duplex::Duplex::H2(duplex::H2Io::new(send, recv, settled))
            }
            TunnelStream::Quic(send, recv, first) => {
                duplex::Duplex::Quic(duplex::quic_io(send, recv, first))
            }
        }
    }

    /// Copies both ways until both directions end, or `limits` end the stream.
    pub(crate) async fn splice(
        self,
        tcp: TcpStream,
        limits: StreamLimits,
        counters: StreamCounters,
    ) -> Moved {
        let meter = Meter::new(&limits, counters);
        let result = match self {
            TunnelStream::H2(send, recv, settled) => {
                h2::splice::splice(tcp, send, recv, settled, limits.send_timeout, &meter).await
            }
            TunnelStream::Quic(send, recv, first) => {
                let send = quic::Unfinished::new(send);
                quic::splice::splice(tcp, send, recv, first, limits.send_timeout, &meter).await
            }
        };
        let (up, down) = meter.totals();
        Moved {
            up,
            down,
            error: result.err(),
        }
    }
}

impl ProxyConn {
    /// Refuses the tunnel right after its handshake (an h2 one closes as it is dropped).
    pub(crate) fn refuse(self) {
        if let ProxyConn::Quic(conn) = &self {
            quic::proxy::refuse(conn);
        }
    }

    /// Drives the tunnel until the agent closes it, it dies, or `close` completes (then it
    /// is closed with that reason). `retire` is called when the agent retires the tunnel
    /// (new streams should go elsewhere; open ones finish). Returns why it ended.
    ///
    /// A QUIC agent opens its mesh streams on the tunnel itself; each is handed to
    /// `upward` once its header arrived (an h2 agent uses a mesh channel instead:
    /// [`serve_mesh_channel`]).
    ///
    /// An h2 tunnel's streams get the window `budget` gives ([`Budget`]); quinn fixes a
    /// QUIC stream's window when its tunnel starts, so a QUIC tunnel keeps full windows.
    pub(crate) async fn drive(
        self,
        close: impl Future<Output = &'static str>,
        retire: impl Fn(),
        upward: Arc<dyn Fn(Upward) + Send + Sync>,
        budget: &Budget,
    ) -> String {
        match self {
            // An h2 agent retires a tunnel with GOAWAY, which the proxy learns from the
            // next stream it tries to open there.
            ProxyConn::H2(conn, narrowed, heard) => {
                h2::proxy::drive(conn, heard, close, budget, narrowed).await
            }
            ProxyConn::Quic(conn) => quic::proxy::drive(conn, close, retire, upward).await,
        }
    }
}
