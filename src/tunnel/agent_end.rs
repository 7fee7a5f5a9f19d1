//! The agent's end of a tunnel: dialing the proxy on a transport, then serving the
//! streams the proxy opens against the agent's [`Backends`]. Matches on the transport;
//! what a backend is and how it is dialed live in `agent/backend.rs`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tracing::{debug, info, warn, Instrument};

use super::{h2, quic, Kind, Link, StreamCounters, StreamLimits, MAX_STREAMS};
use crate::runtime::beat::Beat;
use crate::runtime::lanes::with_subscriber;
use crate::runtime::shutdown::Trigger;
use crate::tls::{Credentials, TlsError};
use crate::wire::proxy_header::TlsFacts;

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

    /// Whether the service for `name` speaks h2c (`None`: no service for it), for a proxy
    /// deciding which protocols to offer a terminated name's clients.
    fn speaks_h2c(&self, name: &str) -> Option<bool>;
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
    /// When the proxy terminated the client's TLS: what was agreed.
    pub(crate) tls: Option<&'a TlsFacts>,
}

/// The stream's client field on the wire: the client's `ip:port`, then, after a space, the
/// address it connected to, then, when the proxy terminated the client's TLS, a token
/// `tls:VERSION:ALPN`. Agents before the server address read the whole field as the
/// client's address and, failing to, only log less; agents before the TLS token read the
/// first two tokens only.
pub(crate) fn client_field(
    client: SocketAddr,
    server: Option<SocketAddr>,
    tls: Option<&TlsFacts>,
) -> String {
    let mut field = client.to_string();
    if let Some(server) = server {
        field.push_str(&format!(" {server}"));
    }
    if let Some(tls) = tls {
        field.push_str(&format!(
            " tls:{}:{}",
            tls.version,
            tls.alpn.as_deref().unwrap_or("")
        ));
    }
    field
}

/// What a client field ([`client_field`]) says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct ClientField {
    pub(crate) client: Option<SocketAddr>,
    pub(crate) server: Option<SocketAddr>,
    pub(crate) tls: Option<TlsFacts>,
}

/// Reads a client field ([`client_field`]); what it cannot read is left out.
pub(crate) fn parse_client_field(field: &str) -> ClientField {
    let mut parts = field.split(' ');
    let client = parts.next().and_then(|c| c.parse().ok());
    let mut read = ClientField {
        client,
        ..ClientField::default()
    };
    for part in parts {
        if let Some(tls) = part.strip_prefix("tls:") {
            let (version, alpn) = tls.split_once(':').unwrap_or((tls, ""));
            // Printable, as they go into the backend's PROXY header.
            let printable = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic());
            if printable(version) {
                read.tls = Some(TlsFacts {
                    version: version.to_string(),
                    alpn: printable(alpn).then(|| alpn.to_string()),
                });
            }
        } else if read.server.is_none() {
            read.server = part.parse().ok();
        }
    }
    read
}

/// A backend's end of one stream: a TCP connection, or for a granted UDP port a UDP socket
/// connected to the backend (the stream is a flow of datagrams, `udp.rs`).
pub(crate) enum Backend {
    Tcp(TcpStream),
    Udp(tokio::net::UdpSocket),
}

/// A backend connected for one stream.
pub(crate) struct Dialed {
    pub(crate) stream: Backend,
    /// On a mesh stream, who calls (SPIFFE identity).
    pub(crate) caller: Option<String>,
    /// Its address, for logs.
    pub(crate) addr: String,
    /// Where the stream counts its bytes.
    pub(crate) counters: StreamCounters,
}

/// Carries one UDP flow between its tunnel stream and the backend's socket until the
/// proxy ends it (`udp.rs`).
pub(crate) async fn relay_udp(
    name: &str,
    io: super::duplex::Duplex,
    quic: Option<super::udp::QuicPath>,
    socket: tokio::net::UdpSocket,
    counters: StreamCounters,
) {
    let counts = super::udp::FlowCounts {
        bytes: counters,
        up: None,
        down: None,
    };
    let local = super::udp::Local::Backend(socket);
    let end = super::udp::relay(io, quic, local, super::udp::AGENT_IDLE, &counts).await;
    debug!(host = %name, %end, "flow done");
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
    /// The proxy's end of the connection went away without a word (a broken pipe, a
    /// reset, a QUIC stateless reset): what a proxy that stops or restarts looks like on
    /// h2, where it drops the connection rather than closing it.
    #[error("the connection closed: {0}")]
    Closed(String),
}

impl TunnelError {
    /// Whether the proxy's end went away, rather than the tunnel failing.
    pub(crate) fn went_away(&self) -> bool {
        matches!(self, TunnelError::Closed(_))
    }
}

/// Whether an I/O error is the other end of the connection going away.
pub(crate) fn is_gone(kind: std::io::ErrorKind) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        kind,
        BrokenPipe | ConnectionReset | ConnectionAborted | UnexpectedEof
    )
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
    /// A control stream (`control.rs`).
    QuicControl(quinn::RecvStream),
}

/// Dials the proxy at `server` on `kind` and completes every handshake within `limit`.
/// An `extra` tunnel is one the agent adds beside its tunnel while that one is busy
/// ([`crate::tls::ALPN_H2_EXTRA`]).
pub(crate) async fn connect(
    kind: Kind,
    server: &str,
    creds: &Credentials<'_>,
    limit: Duration,
    extra: bool,
) -> Result<AgentConn, ConnectError> {
    let attempt = async {
        Ok(match kind {
            Kind::H2 => {
                let alpn = if extra {
                    crate::tls::ALPN_H2_EXTRA
                } else {
                    crate::tls::ALPN_H2
                };
                AgentConn::H2(Box::new(h2::agent::connect(server, creds, alpn).await?))
            }
            Kind::Quic => {
                let alpn = if extra {
                    crate::tls::ALPN_QUIC_EXTRA
                } else {
                    crate::tls::ALPN_QUIC
                };
                AgentConn::Quic(quic::agent::connect(server, creds, alpn).await?)
            }
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
            AgentConn::Quic(conn) => conn.accept().await?.map(|accepted| match accepted {
                quic::agent::Accepted::Stream(s) => Incoming::Quic(s),
                quic::agent::Accepted::Control(c) => Incoming::QuicControl(c),
            }),
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

    /// The QUIC connection, on a QUIC tunnel.
    fn quic(&self) -> Option<quinn::Connection> {
        match self {
            AgentConn::Quic(conn) => Some(conn.connection()),
            AgentConn::H2(_) => None,
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

    /// Serves the proxy's streams until the tunnel ends ([`Serving`] says how).
    pub(crate) async fn serve<B: Backends>(
        mut self,
        serving: Serving<B>,
    ) -> Result<(), TunnelError> {
        let Serving {
            backends,
            stop,
            retire,
            moving,
            grace,
            limits,
            load,
            proxies,
        } = serving;
        // On a lane (`runtime::lanes`) the streams' tasks run on the tunnel's thread.
        let mut streams = JoinSet::new();
        // Control messages being read (each bounded by `CONTROL_TIMEOUT`).
        let mut messages = JoinSet::new();
        let mut retiring = false;
        let mut deadline: Option<tokio::time::Instant> = None;
        // Over QUIC the agent keeps an idle tunnel alive with an empty unidirectional
        // stream on the shared beat (`runtime::beat`), so that its proxy handles many
        // tunnels' keep-alives at one wake-up; quinn's own keep-alive is the backstop. Until
        // the proxy says it keeps idle tunnels long enough (a proxy before that times them
        // out after 10 s), every NUDGE_EVERY instead.
        let beat = Beat::new(quic::KEEPALIVE);
        let mut on_beat = false;
        let mut nudge = self
            .quic()
            .map(|_| tokio::time::Instant::now() + crate::tunnel::control::NUDGE_EVERY);
        let result = loop {
            let draining = retiring || deadline.is_some();
            if draining && streams.is_empty() && self.drained_when_idle() {
                self.close("drained");
                break Ok(());
            }
            tokio::select! {
                accepted = self.accept() => match accepted {
                    Ok(Some(Incoming::H2(mut s))) => match h2::agent::control(&mut s) {
                        Some(h2::agent::Control::Moving) => {
                            info!("the proxy is moving to a new process");
                            moving.fire();
                        }
                        Some(h2::agent::Control::Proxies) => {
                            let told = told(h2::agent::read_proxy_list(s), proxies.clone());
                            messages.spawn(with_subscriber(async { told.await; false }));
                        }
                        Some(h2::agent::Control::Alpn) => h2::agent::answer_alpn(s, &*backends),
                        None => {
                            let span = tracing::debug_span!("stream");
                            let open = load.opened();
                            streams.spawn(with_subscriber(counted(open, h2::agent::serve_stream(backends.clone(), s, limits.clone())).instrument(span)));
                        }
                    },
                    Ok(Some(Incoming::QuicControl(c))) => {
                        messages.spawn(with_subscriber(told_quic(quic::agent::read_control(c), proxies.clone(), moving.clone())));
                    }
                    Ok(Some(Incoming::Quic(s))) => {
                        let span = tracing::debug_span!("stream");
                        let open = load.opened();
                        streams.spawn(with_subscriber(counted(open, quic::agent::serve_stream(backends.clone(), s, limits.clone())).instrument(span)));
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
                () = sleep_until(nudge), if nudge.is_some() => {
                    if let Some(conn) = self.quic() {
                        messages.spawn(nudge_proxy(conn));
                    }
                    let wait = if on_beat { beat.wait() } else { crate::tunnel::control::NUDGE_EVERY };
                    nudge = Some(tokio::time::Instant::now() + wait);
                }
                Some(_) = streams.join_next(), if !streams.is_empty() => {}
                Some(slow) = messages.join_next(), if !messages.is_empty() => {
                    if matches!(slow, Ok(true)) && !on_beat {
                        on_beat = true;
                        nudge = Some(tokio::time::Instant::now() + beat.wait());
                    }
                }
            }
        };
        drop((streams, messages));
        self.finish().await;
        result
    }
}

/// How an [`AgentConn`] serves the proxy's streams.
pub(crate) struct Serving<B> {
    /// Where each stream goes.
    pub(crate) backends: Arc<B>,
    /// Shutdown: no new streams, open ones finish within `grace`.
    pub(crate) stop: Trigger,
    /// A renewal, a better transport up, or a tunnel no longer needed: no new streams,
    /// open ones finish however long they take.
    pub(crate) retire: Trigger,
    /// Fired when the proxy says a new process serves it now (the supervisor then opens
    /// the next tunnel at once).
    pub(crate) moving: Trigger,
    pub(crate) grace: Duration,
    /// Bounds on each stream's backend socket.
    pub(crate) limits: StreamLimits,
    /// Where the streams open on the agent's tunnels to this proxy are counted.
    pub(crate) load: Arc<Load>,
    /// Where a proxy list the proxy sends goes (`control.rs`), as the proxy sent it: the
    /// agent checks it as it checks an answer to its poll.
    pub(crate) proxies: tokio::sync::watch::Sender<Bytes>,
}

/// Acts on a QUIC control message: the proxy list, or the news that the proxy moves.
/// Returns whether it said the proxy keeps idle tunnels long enough for the keep-alive
/// alone.
async fn told_quic(
    message: impl Future<Output = Option<quic::agent::Told>>,
    to: tokio::sync::watch::Sender<Bytes>,
    moving: Trigger,
) -> bool {
    match message.await {
        Some(quic::agent::Told::Proxies(list)) => told(std::future::ready(Some(list)), to).await,
        Some(quic::agent::Told::Moving) => {
            info!("the proxy is moving to a new process");
            moving.fire();
        }
        Some(quic::agent::Told::SlowKeepalive) => return true,
        None => {}
    }
    false
}

/// An empty unidirectional stream to the proxy (bounded): the QUIC agent's keep-alive on
/// the beat. Every proxy reads it and ignores it, and its idle timer starts again (a proxy
/// before [`QUIC_SLOW_KEEPALIVE`] needs one every [`NUDGE_EVERY`]).
///
/// [`NUDGE_EVERY`]: crate::tunnel::control::NUDGE_EVERY
/// [`QUIC_SLOW_KEEPALIVE`]: crate::tunnel::control::QUIC_SLOW_KEEPALIVE
async fn nudge_proxy(conn: quinn::Connection) -> bool {
    let nudge = async {
        if let Ok(mut send) = conn.open_uni().await {
            let _ = send.finish();
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), nudge).await;
    false
}

/// Hands on the proxy list a control message carries, once read.
async fn told(list: impl Future<Output = Option<Bytes>>, to: tokio::sync::watch::Sender<Bytes>) {
    if let Some(list) = list.await {
        debug!("the proxy told of the proxies sharing its store");
        to.send_replace(list);
    }
}

/// The streams open on an agent's tunnels to one proxy (its tunnel and the extra ones it
/// added beside it), and whether they crowd those tunnels: when the streams reach
/// [`CROWDED`] of every tunnel's [`MAX_STREAMS`], the agent adds a tunnel.
#[derive(Debug, Default)]
pub(crate) struct Load {
    open: AtomicUsize,
    /// Tunnels up and taking streams.
    tunnels: AtomicUsize,
    crowded: tokio::sync::Notify,
}

/// The share of its streams a tunnel carries when the agent adds another: early enough
/// that the next one is up before the last stream is taken (its handshakes take a round
/// trip or two), late enough that a tunnel is never added for a few streams.
pub(crate) const CROWDED: (usize, usize) = (3, 4);

impl Load {
    /// Counts a stream opened; returns its place, which counts it closed as it drops.
    fn opened(self: &Arc<Self>) -> OpenStream {
        let open = self.open.fetch_add(1, Ordering::Relaxed) + 1;
        if open >= self.crowded_at() {
            self.crowded.notify_one();
        }
        OpenStream(self.clone())
    }

    /// How many streams make the tunnels crowded now.
    fn crowded_at(&self) -> usize {
        let tunnels = self.tunnels.load(Ordering::Relaxed).max(1);
        tunnels * MAX_STREAMS as usize * CROWDED.0 / CROWDED.1
    }

    /// Streams open now.
    pub(crate) fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Tunnels counted as taking streams.
    pub(crate) fn tunnels(&self) -> usize {
        self.tunnels.load(Ordering::Relaxed)
    }

    /// Sets the number of tunnels taking streams.
    pub(crate) fn set_tunnels(&self, tunnels: usize) {
        self.tunnels.store(tunnels, Ordering::Relaxed);
    }

    /// Completes once a stream opened while the tunnels were crowded (at once if one did
    /// since the last call).
    pub(crate) async fn crowded(&self) {
        self.crowded.notified().await;
        // A notification left from before a tunnel was added may be stale.
        while self.open() < self.crowded_at() {
            self.crowded.notified().await;
        }
    }
}

/// One open stream's place in a [`Load`].
struct OpenStream(Arc<Load>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Runs `stream`, counted open meanwhile.
async fn counted(open: OpenStream, stream: impl Future<Output = ()>) {
    stream.await;
    drop(open);
}

/// Completes at `deadline`; never without one.
async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The client field reads back; an older proxy's field (one or two tokens) reads as
    /// it did; what does not parse is left out.
    #[test]
    fn client_fields() {
        let client: SocketAddr = "203.0.113.9:51234".parse().unwrap();
        let server: SocketAddr = "[2001:db8::1]:443".parse().unwrap();
        let tls = TlsFacts {
            version: "TLSv1.3".into(),
            alpn: Some("http/1.1".into()),
        };
        let field = client_field(client, Some(server), Some(&tls));
        assert_eq!(
            field,
            "203.0.113.9:51234 [2001:db8::1]:443 tls:TLSv1.3:http/1.1"
        );
        let read = parse_client_field(&field);
        assert_eq!(
            read,
            ClientField {
                client: Some(client),
                server: Some(server),
                tls: Some(tls.clone())
            }
        );
        let no_server = parse_client_field(&client_field(client, None, Some(&tls)));
        assert_eq!((no_server.server, no_server.tls), (None, Some(tls)));
        let old = parse_client_field("203.0.113.9:51234 198.51.100.1:443");
        assert_eq!(old.server, Some("198.51.100.1:443".parse().unwrap()));
        assert_eq!(old.tls, None);
        let no_alpn = parse_client_field("203.0.113.9:51234 tls:TLSv1.2:");
        assert_eq!(no_alpn.tls.unwrap().alpn, None);
        assert_eq!(
            parse_client_field("garbage tls: tls:\u{7f}:x"),
            ClientField::default()
        );
    }

    /// An agent's end that has no backend.
    struct NoBackends;

    impl Backends for NoBackends {
        async fn dial(&self, _: DialRequest<'_>) -> Result<Dialed, Refusal> {
            Err(Refusal {
                status: 404,
                reason: "no backends here".into(),
            })
        }

        fn speaks_h2c(&self, _: &str) -> Option<bool> {
            None
        }
    }

    /// Serves the QUIC tunnel `near` as an agent does, until the task is dropped.
    fn serving(near: quinn::Connection, endpoint: quinn::Endpoint) -> tokio::task::JoinHandle<()> {
        let conn = AgentConn::Quic(quic::agent::Conn::from_parts(near, endpoint));
        tokio::spawn(async move {
            let _ = conn
                .serve(Serving {
                    backends: Arc::new(NoBackends),
                    stop: Trigger::default(),
                    retire: Trigger::default(),
                    moving: Trigger::default(),
                    grace: Duration::from_secs(1),
                    limits: StreamLimits::default(),
                    load: Arc::default(),
                    proxies: tokio::sync::watch::channel(Bytes::new()).0,
                })
                .await;
        })
    }

    /// When (wall clock) the proxy's end `far` got each empty unidirectional stream within
    /// `within`, read as a proxy reads control streams.
    async fn nudges(far: &quinn::Connection, within: Duration) -> Vec<std::time::SystemTime> {
        let mut got = Vec::new();
        let _ = tokio::time::timeout(within, async {
            while let Ok(mut recv) = far.accept_uni().await {
                if recv.read_to_end(16).await.is_ok_and(|read| read.is_empty()) {
                    got.push(std::time::SystemTime::now());
                }
            }
        })
        .await;
        got
    }

    /// A proxy before the slow keep-alive times an idle QUIC tunnel out after 10 s, and
    /// an agent's keep-alive is 15 s apart: the agent nudges such a proxy (which says
    /// nothing) every few seconds and keeps its tunnel; a proxy that says it keeps idle
    /// tunnels long enough gets the keep-alive only on the beat (`runtime::beat`).
    #[tokio::test]
    async fn a_quic_agent_nudges_only_a_proxy_that_times_idle_tunnels_out_sooner() {
        let mut older = quic::transport_config(quic::Role::Proxy);
        older.max_idle_timeout(Some(Duration::from_secs(10).try_into().unwrap()));
        let (client, _server, near, far) = quic::tests::pair_with(older).await;
        let _old = serving(near, client);
        let (client, _server, near, newer) =
            quic::tests::pair_with(quic::transport_config(quic::Role::Proxy)).await;
        quic::proxy::tell_slow_keepalive(&newer).await.unwrap();
        let _new = serving(near, client);

        // The first beat is 1 to 16 s away.
        let watch = quic::KEEPALIVE + Duration::from_secs(2);
        let (to_old, to_new) = tokio::join!(nudges(&far, watch), nudges(&newer, watch));
        assert!(
            far.close_reason().is_none(),
            "the idle tunnel to the older proxy timed out: {:?}",
            far.close_reason()
        );
        assert!(
            to_old.len() >= 3,
            "the older proxy was nudged {} times in {watch:?}",
            to_old.len()
        );
        assert!(
            (1..=2).contains(&to_new.len()),
            "the newer proxy got {} keep-alives in {watch:?}",
            to_new.len()
        );
        let every = quic::KEEPALIVE.as_millis();
        let slack = (crate::runtime::beat::SPREAD + Duration::from_millis(500)).as_millis();
        for at in to_new {
            let into = at
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis()
                % every;
            assert!(into <= slack, "a keep-alive {into} ms after the beat");
        }
        assert!(newer.close_reason().is_none());
    }
}
