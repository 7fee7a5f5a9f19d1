//! Tunnels: one agent↔proxy connection, each client connection riding in it as one
//! stream. Two transports, each in its own folder holding both of its ends and its byte
//! pumps: [`h2`] (TCP + mutual TLS + HTTP/2 `CONNECT`, the default) and [`quic`].
//!
//! This file is the only place that matches on the transport. The proxy sees a tunnel as
//! a [`Link`] (open a stream for a client) and a [`ProxyConn`] (drive the connection until
//! it ends); the agent sees an [`AgentConn`] (serve the proxy's streams against its
//! [`Backends`]) and a [`Choice`] of which transport to dial. Neither names h2 or QUIC.
//!
//! Back pressure is per stream on both transports: a pump releases flow-control credit only
//! after the bytes were written onward, so a reader that stops holds back its own stream.

mod choice;
pub(crate) mod duplex;
pub(crate) mod h2;
pub(crate) mod quic;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tracing::{debug, info, warn, Instrument};

pub(crate) use choice::Choice;

use crate::runtime::lanes::with_subscriber;
use crate::runtime::shutdown::Trigger;
use crate::tls::{Credentials, TlsError};

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
/// Mesh streams (agent → proxy, to reach a private name) one agent may have open at once
/// on one tunnel; each pins at most [`STREAM_WINDOW`] at either end like any stream.
pub(crate) const MAX_UPWARD: u32 = 64;
/// A stream whose reader (the client on the proxy, the backend on the agent) accepts no
/// bytes for this long is reset and its socket closed, as nginx's `send_timeout` does.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(60);

/// What bounds the sockets of one stream, from the proxy's or the agent's configuration.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StreamLimits {
    /// A socket that accepts no byte this long: the stream is reset ([`SEND_TIMEOUT`]).
    pub(crate) send_timeout: Duration,
    /// No byte either way this long: the stream is closed. Off unless configured: an idle
    /// SSH or database session is not a fault.
    pub(crate) idle_timeout: Option<Duration>,
}

impl Default for StreamLimits {
    fn default() -> Self {
        StreamLimits {
            send_timeout: SEND_TIMEOUT,
            idle_timeout: None,
        }
    }
}

/// Where one stream counts what it moves, as it moves it (metrics): bytes read from and
/// written to its socket, and an open-streams gauge held up for the stream's life. The
/// default counts nothing. Each count is one relaxed atomic add per chunk moved.
#[derive(Debug, Default)]
pub(crate) struct StreamCounters {
    read: Option<prometheus::IntCounter>,
    written: Option<prometheus::IntCounter>,
    open: Option<prometheus::IntGauge>,
}

impl StreamCounters {
    /// Counts into `read` and `written`, and holds `open` one higher until dropped.
    pub(crate) fn new(
        read: prometheus::IntCounter,
        written: prometheus::IntCounter,
        open: prometheus::IntGauge,
    ) -> StreamCounters {
        open.inc();
        StreamCounters {
            read: Some(read),
            written: Some(written),
            open: Some(open),
        }
    }
}

impl StreamCounters {
    /// `n` bytes were read from the stream's socket.
    pub(crate) fn read(&self, n: usize) {
        if let Some(c) = &self.read {
            c.inc_by(n as u64);
        }
    }

    /// `n` bytes were written to the stream's socket.
    pub(crate) fn written(&self, n: usize) {
        if let Some(c) = &self.written {
            c.inc_by(n as u64);
        }
    }
}

/// A socket whose reads and writes are counted into [`StreamCounters`] as they happen
/// (for a plain copy, such as a static route's).
pub(crate) struct Counted<'a, S> {
    inner: &'a mut S,
    counters: &'a StreamCounters,
    /// Bytes read and written so far.
    pub(crate) totals: (u64, u64),
}

impl<'a, S> Counted<'a, S> {
    pub(crate) fn new(inner: &'a mut S, counters: &'a StreamCounters) -> Self {
        Counted {
            inner,
            counters,
            totals: (0, 0),
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Counted<'_, S> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut *this.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        this.counters.read(n);
        this.totals.0 += n as u64;
        polled
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Counted<'_, S> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut *this.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = polled {
            this.counters.written(n);
            this.totals.1 += n as u64;
        }
        polled
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.get_mut().inner).poll_shutdown(cx)
    }
}

impl Drop for StreamCounters {
    fn drop(&mut self) {
        if let Some(open) = &self.open {
            open.dec();
        }
    }
}

/// What a stream's pumps report as bytes move: the counters, and when the stream last
/// moved a byte either way, for the idle timeout (one clock read and one atomic store per
/// chunk, and nothing at all when no idle timeout is set).
pub(crate) struct Meter {
    limit: Option<Duration>,
    start: tokio::time::Instant,
    /// Milliseconds from `start` to the last byte moved.
    last: std::sync::atomic::AtomicU64,
    counters: StreamCounters,
    /// Bytes read from and written to the socket so far, whatever becomes of the stream.
    read_total: std::sync::atomic::AtomicU64,
    written_total: std::sync::atomic::AtomicU64,
}

impl Meter {
    pub(crate) fn new(limit: Option<Duration>, counters: StreamCounters) -> Meter {
        Meter {
            limit,
            start: tokio::time::Instant::now(),
            last: std::sync::atomic::AtomicU64::new(0),
            counters,
            read_total: std::sync::atomic::AtomicU64::new(0),
            written_total: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// `n` bytes were read from the socket (and sent on into the tunnel).
    pub(crate) fn read(&self, n: usize) {
        self.counters.read(n);
        self.read_total
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        self.touch();
    }

    /// `n` bytes were written to the socket.
    pub(crate) fn written(&self, n: usize) {
        self.counters.written(n);
        self.written_total
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        self.touch();
    }

    /// Bytes (read from, written to) the socket so far.
    pub(crate) fn totals(&self) -> (u64, u64) {
        (
            self.read_total.load(std::sync::atomic::Ordering::Relaxed),
            self.written_total
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    fn touch(&self) {
        if self.limit.is_some() {
            let ms = self.start.elapsed().as_millis() as u64;
            self.last.store(ms, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Completes (with the error to end the stream with) once nothing moved for the
    /// limit; never without one.
    pub(crate) async fn idle(&self) -> std::io::Error {
        let Some(limit) = self.limit else {
            return std::future::pending().await;
        };
        loop {
            let last = self.last.load(std::sync::atomic::Ordering::Relaxed);
            let due = self.start + Duration::from_millis(last) + limit;
            if tokio::time::Instant::now() >= due {
                return std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no byte either way for {limit:?}"),
                );
            }
            tokio::time::sleep_until(due).await;
        }
    }
}

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

// ---- The proxy's end ----------------------------------------------------------------

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
    H2(::h2::client::SendRequest<Bytes>),
    Quic(quinn::Connection),
}

/// An open stream, ready to be joined to its client's socket.
pub(crate) enum TunnelStream {
    H2(::h2::SendStream<Bytes>, ::h2::RecvStream),
    /// The bytes are what followed the agent's answer in the same read.
    Quic(quinn::SendStream, quinn::RecvStream, Bytes),
}

/// A tunnel connection on the proxy whose handshakes are done, to be driven until it ends.
pub(crate) enum ProxyConn {
    H2(Box<h2::proxy::Conn>),
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
    let (sender, conn) = h2::proxy::handshake(tls).await?;
    Ok((Link::H2(sender), ProxyConn::H2(Box::new(conn))))
}

/// Completes a QUIC tunnel; returns it with the agent's (verified) certificate.
pub(crate) async fn accept_quic(
    incoming: quinn::Incoming,
) -> Result<(Link, ProxyConn, Option<Vec<u8>>), AcceptError> {
    let (conn, der) = quic::proxy::handshake(incoming).await?;
    Ok((Link::Quic(conn.clone()), ProxyConn::Quic(conn), der))
}

impl Link {
    /// Which transport the tunnel runs on.
    pub(crate) fn kind(&self) -> Kind {
        match self {
            Link::H2(_) => Kind::H2,
            Link::Quic(_) => Kind::Quic,
        }
    }

    /// Opens a stream for a client and waits for the agent's answer; the caller bounds
    /// the wait.
    pub(crate) async fn open(&self, req: &OpenRequest<'_>) -> Result<TunnelStream, OpenError> {
        match self {
            Link::H2(sender) => {
                let (send, recv) = h2::proxy::open(sender, req).await?;
                Ok(TunnelStream::H2(send, recv))
            }
            Link::Quic(conn) => {
                let (send, recv, first) = quic::proxy::open(conn, req).await?;
                Ok(TunnelStream::Quic(send, recv, first))
            }
        }
    }

    /// Tells the agent that a new process serves this proxy now, so that it moves there at
    /// once. On h2 a control message: the agent opens its next tunnel, then retires this
    /// one, whose open streams finish here. A QUIC tunnel cannot outlive the swap (both
    /// processes would read its UDP socket), so it is closed with [`quic::code::MOVING`]
    /// and the agent reconnects without a pause; its open streams are cut. Bounded by
    /// [`HANDSHAKE_TIMEOUT`].
    pub(crate) async fn tell_moving(&self) {
        match self {
            Link::H2(sender) => {
                let told = tokio::time::timeout(HANDSHAKE_TIMEOUT, h2::proxy::tell_moving(sender));
                if let Ok(Err(e)) = told.await {
                    debug!(error = %e, "could not tell an agent to move");
                }
            }
            Link::Quic(conn) => conn.close(
                quinn::VarInt::from_u32(quic::code::MOVING),
                b"proxy moving to a new process",
            ),
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
    /// The stream as a byte pipe, to be joined to another tunnel stream (the mesh).
    pub(crate) fn into_duplex(self) -> duplex::Duplex {
        match self {
            TunnelStream::H2(send, recv) => duplex::Duplex::H2(duplex::H2Io::new(send, recv)),
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
        let meter = Meter::new(limits.idle_timeout, counters);
        let result = match self {
            TunnelStream::H2(send, recv) => {
                h2::splice::splice(tcp, send, recv, limits.send_timeout, &meter).await
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
    pub(crate) async fn drive(
        self,
        close: impl Future<Output = &'static str>,
        retire: impl Fn(),
        upward: Arc<dyn Fn(Upward) + Send + Sync>,
    ) -> String {
        match self {
            // An h2 agent retires a tunnel with GOAWAY, which the proxy learns from the
            // next stream it tries to open there.
            ProxyConn::H2(conn) => h2::proxy::drive(*conn, close).await,
            ProxyConn::Quic(conn) => quic::proxy::drive(conn, close, retire, upward).await,
        }
    }
}

// ---- Mesh streams: agent → proxy ----------------------------------------------------

/// A stream an agent opened to reach a name (the mesh), not yet answered.
pub(crate) enum Upward {
    H2(h2::mesh::Incoming),
    Quic {
        header: crate::wire::stream::StreamHeader,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        /// Bytes that came after the header.
        first: Bytes,
    },
}

impl Upward {
    /// The name asked for.
    pub(crate) fn name(&self) -> &str {
        match self {
            Upward::H2(incoming) => &incoming.name,
            Upward::Quic { header, .. } => &header.name,
        }
    }

    /// The caller's local client address, as its agent reported it (for logs).
    pub(crate) fn client(&self) -> &str {
        match self {
            Upward::H2(incoming) => &incoming.client,
            Upward::Quic { header, .. } => &header.client,
        }
    }

    /// Refuses the stream with an HTTP status and a one-line reason.
    pub(crate) async fn refuse(self, status: u16, reason: &str) {
        match self {
            Upward::H2(incoming) => incoming.refuse(status, reason),
            Upward::Quic { mut send, .. } => {
                let answer = crate::wire::stream::Answer {
                    status,
                    reason: reason.to_string(),
                };
                let _ = send.write_all(&answer.encode()).await;
                let _ = send.finish();
            }
        }
    }

    /// Accepts the stream (answers 200) and returns it as a byte pipe; `None` if it is
    /// gone already.
    pub(crate) async fn accept(self) -> Option<duplex::Duplex> {
        match self {
            Upward::H2(incoming) => incoming.accept().map(duplex::Duplex::H2),
            Upward::Quic {
                mut send,
                recv,
                first,
                ..
            } => {
                send.write_all(&crate::wire::stream::Answer::ok().encode())
                    .await
                    .ok()?;
                Some(duplex::Duplex::Quic(duplex::quic_io(send, recv, first)))
            }
        }
    }
}

/// Serves an h2 agent's mesh channel (TLS done, ALPN [`crate::tls::ALPN_CONNECT`]) until
/// it ends or `close` completes, handing each stream to `upward`.
pub(crate) async fn serve_mesh_channel(
    tls: tokio_rustls::server::TlsStream<h2::TunnelIo>,
    upward: Arc<dyn Fn(Upward) + Send + Sync>,
    retire: impl Future<Output = ()>,
    close: impl Future<Output = ()>,
) -> Result<(), String> {
    h2::mesh::serve(
        tls,
        move |incoming| upward(Upward::H2(incoming)),
        retire,
        close,
    )
    .await
}

/// The agent's way up to the proxy for mesh streams: on QUIC its tunnel connection, on h2
/// a mesh channel (see `h2/mesh.rs`). Opening a stream is what the proxy does on a tunnel,
/// so it is a [`Link`].
pub(crate) async fn connect_mesh_channel(
    server: &str,
    creds: &Credentials<'_>,
) -> Result<
    (
        Link,
        std::pin::Pin<Box<dyn Future<Output = Result<(), String>> + Send>>,
    ),
    ConnectError,
> {
    let (sender, drive) = h2::mesh::connect(server, creds).await?;
    Ok((Link::H2(sender), drive))
}

// ---- The agent's end ----------------------------------------------------------------

/// A refused stream: an HTTP status code (on both transports) and a one-line reason.
#[derive(Debug)]
pub(crate) struct Refusal {
    pub(crate) status: u16,
    pub(crate) reason: String,
}

/// What the agent's end of a tunnel does with each stream: find and dial the backend for
/// a name. `caller` is the calling agent's SPIFFE identity on a mesh stream (set by the
/// proxy), kept with the stream for whoever hands it to the backend.
pub(crate) trait Backends: Send + Sync + 'static {
    fn dial(
        &self,
        request: DialRequest<'_>,
    ) -> impl Future<Output = Result<Dialed, Refusal>> + Send;
}

/// What the proxy said about a stream it opened.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DialRequest<'a> {
    /// The name the client asked for.
    pub(crate) name: &'a str,
    /// On a mesh stream, who calls (SPIFFE identity).
    pub(crate) caller: Option<&'a str>,
    /// The public client's address.
    pub(crate) client: Option<SocketAddr>,
    /// The address it connected to (the proxy's public listener).
    pub(crate) server: Option<SocketAddr>,
}

/// The stream's client field on the wire: the client's `ip:port`, then, after a space, the
/// address it connected to. Agents before the server address read the whole field as the
/// client's address and, failing to, only log less.
pub(crate) fn client_field(client: SocketAddr, server: Option<SocketAddr>) -> String {
    match server {
        Some(server) => format!("{client} {server}"),
        None => client.to_string(),
    }
}

/// Reads a client field ([`client_field`]): (client, server).
pub(crate) fn parse_client_field(field: &str) -> (Option<SocketAddr>, Option<SocketAddr>) {
    let mut parts = field.split(' ');
    let client = parts.next().and_then(|c| c.parse().ok());
    let server = parts.next().and_then(|s| s.parse().ok());
    (client, server)
}

/// A backend connected for one stream.
pub(crate) struct Dialed {
    pub(crate) stream: TcpStream,
    /// On a mesh stream, who calls (SPIFFE identity).
    pub(crate) caller: Option<String>,
    /// Its address, for logs.
    pub(crate) addr: String,
    /// Where the stream counts its bytes.
    pub(crate) counters: StreamCounters,
}

/// Why the agent could not connect to the proxy.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    #[error("cannot resolve the proxy's address: {0}")]
    Resolve(#[source] std::io::Error),
    #[error("the proxy's address resolves to nothing")]
    NoAddress,
    #[error("cannot connect: {0}")]
    Connect(#[source] std::io::Error),
    #[error("cannot open a UDP socket: {0}")]
    Udp(#[source] std::io::Error),
    #[error(transparent)]
    Config(#[from] TlsError),
    #[error("TLS handshake failed: {0}")]
    Tls(String),
    #[error("HTTP/2 handshake failed: {0}")]
    H2(#[source] ::h2::Error),
    #[error("{} handshake timed out after {limit:?}", kind.name())]
    Timeout { kind: Kind, limit: Duration },
}

impl ConnectError {
    /// Whether the TLS handshake itself failed (the proxy refused our certificate, or we
    /// refused its), as opposed to the network.
    pub(crate) fn is_handshake(&self) -> bool {
        matches!(self, ConnectError::Tls(_))
    }
}

/// Why a tunnel that was up ended badly.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TunnelError {
    #[error("tunnel error: {0}")]
    Broken(String),
}

impl AgentConn {
    /// For a QUIC tunnel, the link to open mesh streams on (an h2 tunnel has none: its
    /// agent is the HTTP/2 server).
    pub(crate) fn up_link(&self) -> Option<Link> {
        match self {
            AgentConn::H2(_) => None,
            AgentConn::Quic(conn) => Some(Link::Quic(conn.connection())),
        }
    }
}

/// An agent's tunnel whose handshakes are done.
pub(crate) enum AgentConn {
    H2(Box<h2::agent::Conn>),
    Quic(quic::agent::Conn),
}

/// One stream the proxy opened on an agent's tunnel, not yet answered.
enum Incoming {
    H2(h2::agent::Incoming),
    Quic(quic::agent::Incoming),
}

/// Dials the proxy at `server` on `kind` and completes every handshake within `limit`.
pub(crate) async fn connect(
    kind: Kind,
    server: &str,
    creds: &Credentials<'_>,
    limit: Duration,
) -> Result<AgentConn, ConnectError> {
    let attempt = async {
        Ok(match kind {
            Kind::H2 => AgentConn::H2(Box::new(h2::agent::connect(server, creds).await?)),
            Kind::Quic => AgentConn::Quic(quic::agent::connect(server, creds).await?),
        })
    };
    tokio::time::timeout(limit, attempt)
        .await
        .map_err(|_| ConnectError::Timeout { kind, limit })?
}

impl AgentConn {
    async fn accept(&mut self) -> Result<Option<Incoming>, TunnelError> {
        Ok(match self {
            AgentConn::H2(conn) => conn.accept().await?.map(Incoming::H2),
            AgentConn::Quic(conn) => conn.accept().await?.map(Incoming::Quic),
        })
    }

    /// Tells the proxy to route nothing new here.
    async fn goaway(&mut self) {
        match self {
            AgentConn::H2(conn) => conn.goaway(),
            AgentConn::Quic(conn) => conn.goaway().await,
        }
    }

    /// Closes the tunnel once draining is over. An h2 tunnel closes by itself when its
    /// last stream ends after a GOAWAY; a QUIC one is closed here.
    fn close(&self, reason: &'static str) {
        if let AgentConn::Quic(conn) = self {
            conn.close(reason);
        }
    }

    /// Whether the proxy closed the tunnel because it moved to a new process (QUIC; on h2
    /// the move is a message and the tunnel stays until the next one is up).
    fn moved(&self) -> bool {
        matches!(self, AgentConn::Quic(conn) if conn.moved())
    }

    /// Whether draining ends when the last stream does (QUIC) or when the connection says
    /// so after its GOAWAY (h2, whose `accept` then returns `None`).
    fn drained_when_idle(&self) -> bool {
        matches!(self, AgentConn::Quic(_))
    }

    async fn finish(self) {
        if let AgentConn::Quic(conn) = self {
            conn.finish().await;
        }
    }

    /// Serves the proxy's streams until the tunnel ends. `retire` (a renewal, or a better
    /// transport up) stops new streams and lets open ones finish however long they take;
    /// `stop` (shutdown) does the same with `grace` as a deadline. `limits` bound each
    /// stream's backend socket. `moving` fires when the proxy says a new process serves it
    /// now (the supervisor then opens the next tunnel at once).
    pub(crate) async fn serve<B: Backends>(
        mut self,
        backends: Arc<B>,
        stop: Trigger,
        retire: Trigger,
        moving: Trigger,
        grace: Duration,
        limits: StreamLimits,
    ) -> Result<(), TunnelError> {
        // On a lane (`runtime::lanes`) the streams' tasks run on the tunnel's thread.
        let mut streams = JoinSet::new();
        let mut retiring = false;
        let mut deadline: Option<tokio::time::Instant> = None;
        let result = loop {
            let draining = retiring || deadline.is_some();
            if draining && streams.is_empty() && self.drained_when_idle() {
                self.close("drained");
                break Ok(());
            }
            tokio::select! {
                accepted = self.accept() => match accepted {
                    Ok(Some(Incoming::H2(mut s))) => {
                        if h2::agent::is_moving(&mut s) {
                            info!("the proxy is moving to a new process");
                            moving.fire();
                        } else {
                            let span = tracing::debug_span!("stream");
                            streams.spawn(with_subscriber(h2::agent::serve_stream(backends.clone(), s, limits).instrument(span)));
                        }
                    }
                    Ok(Some(Incoming::Quic(s))) => {
                        let span = tracing::debug_span!("stream");
                        streams.spawn(with_subscriber(quic::agent::serve_stream(backends.clone(), s, limits).instrument(span)));
                    }
                    // The proxy closed the tunnel, or a graceful shutdown completed.
                    Ok(None) => {
                        if self.moved() {
                            info!("the proxy is moving to a new process");
                            moving.fire();
                        }
                        break Ok(());
                    }
                    Err(e) => break Err(e),
                },
                () = retire.cancelled(), if !retiring => {
                    debug!(open = streams.len(), "retiring this tunnel: no new streams");
                    self.goaway().await;
                    retiring = true;
                }
                () = stop.cancelled(), if deadline.is_none() => {
                    info!(open = streams.len(), "shutting down: no new streams; draining");
                    if !retiring {
                        self.goaway().await;
                    }
                    deadline = Some(tokio::time::Instant::now() + grace);
                }
                () = sleep_until(deadline), if deadline.is_some() => {
                    warn!(open = streams.len(), "streams still open after the grace period; closing them");
                    self.close("drain grace over");
                    break Ok(());
                }
                Some(_) = streams.join_next(), if !streams.is_empty() => {}
            }
        };
        drop(streams);
        self.finish().await;
        result
    }
}

// ---- Shared by the pumps of both transports ----------------------------------------

/// Waits until `rd` is readable, then reads what is there into `buf`, growing it by
/// `chunk` first. The buffer is only allocated once data is there, so an idle stream holds
/// none; once the previous chunk was split off and dropped downstream, `reserve` gets the
/// same allocation back. Returns the bytes read, 0 at EOF.
pub(crate) async fn read_some(
    rd: &tokio::net::tcp::OwnedReadHalf,
    buf: &mut bytes::BytesMut,
    chunk: usize,
) -> std::io::Result<usize> {
    loop {
        rd.readable().await?;
        buf.reserve(chunk);
        match rd.try_read_buf(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            read => return read,
        }
    }
}

/// How a two-way pump ended: the bytes each way, or the first error; and which
/// directions had finished by then (a side that got its whole stream is not reset, see
/// [`reset`]).
pub(crate) struct Pumped {
    pub(crate) result: std::io::Result<(u64, u64)>,
    /// `up` (from the socket) had finished.
    pub(crate) sent: bool,
    /// `down` (toward the socket) had finished.
    pub(crate) delivered: bool,
}

/// Runs both directions of a splice, `up` (from the socket) and `down` (toward it), until
/// both finish, one fails, or `idle` completes (nothing moved for the idle timeout).
pub(crate) async fn both_ways(
    up: impl Future<Output = std::io::Result<u64>>,
    down: impl Future<Output = std::io::Result<u64>>,
    idle: impl Future<Output = std::io::Error>,
) -> Pumped {
    tokio::pin!(up, down, idle);
    let (mut sent, mut received) = (None, None);
    let result = loop {
        if let (Some(s), Some(r)) = (sent, received) {
            break Ok((s, r));
        }
        tokio::select! {
            r = &mut up, if sent.is_none() => match r {
                Ok(n) => sent = Some(n),
                Err(e) => break Err(e),
            },
            r = &mut down, if received.is_none() => match r {
                Ok(n) => received = Some(n),
                Err(e) => break Err(e),
            },
            e = &mut idle => break Err(e),
        }
    };
    Pumped {
        result,
        sent: sent.is_some(),
        delivered: received.is_some(),
    }
}

/// [`reset`] for a socket not split in halves.
pub(crate) fn reset_whole(tcp: tokio::net::TcpStream) {
    let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
}

/// Closes a socket with a reset (RST) instead of an orderly end (FIN): for a stream that
/// broke (its other side reset, or a timeout cut it), so that the far end sees an error
/// and never takes a cut download for a complete one. (Dropping the write half alone
/// would send a FIN first.) With a zero linger time the close does not block.
pub(crate) fn reset(rd: tokio::net::tcp::OwnedReadHalf, wr: tokio::net::tcp::OwnedWriteHalf) {
    if let Ok(tcp) = rd.reunite(wr) {
        let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
    }
}

/// Runs one socket write, failing with `TimedOut` if it makes no progress within
/// `timeout` (the send timeout: the reader accepts nothing).
pub(crate) async fn within<T>(
    timeout: Duration,
    write: impl Future<Output = std::io::Result<T>>,
) -> std::io::Result<T> {
    tokio::time::timeout(timeout, write)
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the reader accepted nothing for {timeout:?}"),
            ))
        })
}

/// Writes all of `buf`, failing if the socket accepts no byte for `timeout`.
pub(crate) async fn write_all_within(
    wr: &mut tokio::net::tcp::OwnedWriteHalf,
    mut buf: &[u8],
    timeout: Duration,
) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    while !buf.is_empty() {
        let n = within(timeout, wr.write(buf)).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        buf = &buf[n..];
    }
    Ok(())
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
