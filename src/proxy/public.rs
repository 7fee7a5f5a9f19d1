//! One public connection, top to bottom: peek at its first bytes for a name (SNI or
//! `Host`, or the listener's fixed target) -> route (the registry's live tunnels, then a
//! static route) -> open a stream on a tunnel (the next agent if one refuses) -> splice.
//! A connection that cannot be served is told why where its protocol allows
//! (`replies.rs`).
//!
//! The peeked bytes are replayed to the backend exactly. Peeking is bounded in bytes and
//! in time, so a client that sends nothing, or one byte a second, costs a buffer of at most
//! [`MAX_PEEK`] for at most the peek timeout.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use super::accept::{PerSource, SourceSlot};
use super::metrics::Refused;
use super::registry::Tunnel;
use super::replies::{http_error, ConnId, Reply, ALERT_INTERNAL_ERROR, ALERT_UNRECOGNIZED_NAME};
use super::Shared;
use crate::route::{http, sni, ListenerKind, Target};
use crate::tunnel::{Counted, OpenError, OpenRequest, StreamCounters};
use crate::wire::proxy_header::{self, Origin, Parsed};

/// Most bytes read while looking for a name: a 16 KiB ClientHello may come in many small
/// records, each with a 5-byte header.
pub(super) const MAX_PEEK: usize = 32 * 1024;
/// Time allowed to open a stream on a tunnel (the agent dials its backend meanwhile).
pub(super) const OPEN_TIMEOUT: Duration = Duration::from_secs(15);
/// Copy buffer per direction for static `tcp://` routes (tokio's default is 8 KiB, which
/// costs a syscall pair per 8 KiB).
pub(super) const STATIC_COPY_BUFFER: usize = 64 * 1024;

/// Where a name may be served, tried in order.
enum Candidate<'a> {
    /// A tunnel of an agent granted the name, and the pattern it was granted (the name,
    /// or the wildcard covering it): the label its traffic is counted under.
    Agent(&'a Arc<Tunnel>, &'a str),
    /// A static `tcp://` route's backend, `host:port`.
    Static(&'a str),
}

/// What became of one connection: the access log line.
#[derive(Default)]
struct Access {
    host: Option<String>,
    /// The agent (or `tcp://` backend) that served it.
    served_by: Option<String>,
    /// `ok`, or why it was not routed (the reasons of the refusal metric).
    outcome: &'static str,
    /// Bytes from the client, and to it.
    up: u64,
    down: u64,
}

impl Access {
    /// Not routed, for `why`: counted and noted.
    fn refuse(&mut self, metrics: &super::metrics::ProxyMetrics, why: Refused) {
        metrics.refused(why).inc();
        self.outcome = why.label();
    }

    /// Joined to a backend; `moved` is (up, down) once it ended.
    fn served(&mut self, by: String, moved: Option<(u64, u64)>) {
        self.served_by = Some(by);
        self.outcome = "ok";
        if let Some((up, down)) = moved {
            (self.up, self.down) = (up, down);
        }
    }
}

/// Serves one public connection, and logs what became of it: at info with access logging
/// on, else at debug.
pub(super) async fn serve(
    shared: Arc<Shared>,
    kind: ListenerKind,
    mut tcp: TcpStream,
    mut peer: SocketAddr,
    // Held for the whole connection: it counts against the per-source limit.
    _source: SourceSlot,
    per_source: Arc<PerSource>,
) {
    // Logged with every line about this connection and sent with every refusal, so an
    // operator can find the details a client is not told.
    let id = ConnId::new();
    let started = std::time::Instant::now();
    let mut access = Access::default();
    // The settings in force when the connection came; a reload meanwhile applies to the
    // next one.
    let settings = shared.settings();
    let mut arrival = Arrival {
        server: tcp.local_addr().ok(),
        early: BytesMut::new(),
        settings: settings.clone(),
    };
    // A trusted load balancer's connection starts with a PROXY header naming the client:
    // from here on that is the client, counted against its own source's share.
    let mut _client_slot = None;
    let mut admitted = true;
    if settings
        .trusted_proxies
        .iter()
        .any(|net| net.contains(peer.ip()))
    {
        match read_proxy_header(&mut tcp, settings.peek_timeout).await {
            Ok((client, server, rest)) => {
                arrival.early = rest;
                // A header naming no client (a health check) counts against the
                // balancer itself.
                let counted = client.unwrap_or(peer);
                match per_source.take_counted(counted.ip()) {
                    Some(slot) => _client_slot = Some(slot),
                    None => {
                        debug!(balancer = %peer, client = %counted, conn = %id, "the client holds its share of connections; closing");
                        access.refuse(&shared.metrics, Refused::SourceLimit);
                        admitted = false;
                    }
                }
                if let Some(client) = client {
                    debug!(balancer = %peer, %client, conn = %id, "client named by a PROXY header");
                    peer = client;
                    arrival.server = server.or(arrival.server);
                }
            }
            Err(None) => {
                // Connected and closed without a byte: a plain TCP health check.
                access.refuse(&shared.metrics, Refused::ClientClosed);
                admitted = false;
            }
            Err(Some(reason)) => {
                warn!(%peer, conn = %id, %reason, "a trusted source sent no valid PROXY header; closing");
                access.refuse(&shared.metrics, Refused::BadHead);
                admitted = false;
            }
        }
    }
    if admitted {
        handle(&shared, kind, tcp, peer, arrival, id, &mut access).await;
    }
    let ms = started.elapsed().as_millis() as u64;
    let (host, by) = (
        access.host.as_deref().unwrap_or("-"),
        access.served_by.as_deref().unwrap_or("-"),
    );
    let outcome = access.outcome;
    let (up, down) = (access.up, access.down);
    if shared.access_log {
        info!(target: "revproxy::access", conn = %id, %peer, host = %host, agent = %by, outcome = %outcome, up, down, ms, "connection");
    } else {
        debug!(target: "revproxy::access", conn = %id, %peer, host = %host, agent = %by, outcome = %outcome, up, down, ms, "connection");
    }
}

/// Where a connection arrived, beyond its peer.
struct Arrival {
    /// The address the client connected to.
    server: Option<SocketAddr>,
    /// Bytes read after a PROXY header, before anything else.
    early: BytesMut,
    /// The settings in force when it came.
    settings: Arc<super::reload::Settings>,
}

/// Reads a PROXY header (v1 or v2) from the start of `tcp`, within `timeout` and
/// [`proxy_header::MAX_HEADER`] bytes: the client and the address it reached, if the
/// header names them, and the bytes that came after it. `Err(None)`: closed before any
/// byte.
async fn read_proxy_header(
    tcp: &mut TcpStream,
    timeout: Duration,
) -> Result<(Option<SocketAddr>, Option<SocketAddr>, BytesMut), Option<String>> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = BytesMut::with_capacity(512);
    loop {
        match proxy_header::parse(&buf) {
            Parsed::Header {
                client,
                server,
                len,
            } => {
                let rest = buf.split_off(len);
                return Ok((client, server, rest));
            }
            Parsed::Invalid(reason) => return Err(Some(reason)),
            Parsed::Incomplete => {}
        }
        buf.reserve(512);
        match tokio::time::timeout_at(deadline, tcp.read_buf(&mut buf)).await {
            Ok(Ok(0)) if buf.is_empty() => return Err(None),
            Ok(Ok(0)) => return Err(Some("closed before its PROXY header was complete".into())),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(Some(e.to_string())),
            Err(_) => return Err(Some(format!("no complete PROXY header within {timeout:?}"))),
        }
    }
}

async fn handle(
    shared: &Arc<Shared>,
    kind: ListenerKind,
    mut tcp: TcpStream,
    peer: SocketAddr,
    arrival: Arrival,
    id: ConnId,
    access: &mut Access,
) {
    let _ = tcp.set_nodelay(true);
    let metrics = &shared.metrics;
    let settings = arrival.settings.clone();
    let arrival_server = arrival.server;
    access.outcome = "client_closed";
    let (name, peeked, reply) = match &kind {
        ListenerKind::Fixed(Target::Tcp(addr)) => {
            let deadline = tokio::time::Instant::now() + crate::runtime::CONNECT_TIMEOUT;
            match connect_static(addr, peer, id, deadline).await {
                Some(backend) => {
                    let counters = metrics.routed(&format!("tcp://{addr}"));
                    access.served(format!("tcp://{addr}"), None);
                    let origin = Origin {
                        client: Some(peer),
                        server: arrival_server,
                        name: None,
                        caller: None,
                    };
                    let first = Prelude {
                        header: header_for(&settings, addr, &origin),
                        peeked: arrival.early.freeze(),
                    };
                    let moved = forward_tcp(tcp, backend, addr, first, peer, id, counters).await;
                    access.served(format!("tcp://{addr}"), moved);
                }
                None => access.refuse(metrics, Refused::BackendDown),
            }
            return;
        }
        ListenerKind::Fixed(Target::Name(name)) => {
            (name.clone(), arrival.early.freeze(), Reply::Silent)
        }
        ListenerKind::Sni => {
            match peek(&mut tcp, arrival.early, settings.peek_timeout, sni_name).await {
                Ok((Some(name), bytes)) => (name, bytes, Reply::Tls),
                Ok((None, _)) => {
                    debug!(%peer, conn = %id, "TLS client sent no server name; no route");
                    access.refuse(metrics, Refused::NoServerName);
                    let _ = tcp.write_all(&ALERT_UNRECOGNIZED_NAME).await;
                    return;
                }
                Err(e) => {
                    debug!(%peer, conn = %id, error = %e, "no usable ClientHello; closing");
                    access.refuse(metrics, e.why);
                    return;
                }
            }
        }
        ListenerKind::Http => {
            match peek(&mut tcp, arrival.early, settings.peek_timeout, http_host).await {
                Ok((name, bytes)) => (name, bytes, Reply::Http),
                Err(e) => {
                    debug!(%peer, conn = %id, error = %e, "no usable HTTP request head; closing");
                    access.refuse(metrics, e.why);
                    if e.answerable {
                        http_error(&mut tcp, 400, "Bad Request", &e.reason, id).await;
                    }
                    return;
                }
            }
        }
    };

    access.host = Some(name.clone());
    // The most specific match first (DESIGN.md section 5): agents granted the exact name,
    // then a static route for it, then agents holding a wildcard. Only what agents serve
    // publicly is looked up: a name granted privately looks like any unknown name (and a
    // static route under a private grant is not offered either).
    let state = shared.state.get();
    let wildcard = name
        .split_once('.')
        .map(|(_, parent)| format!("*.{parent}"))
        .unwrap_or_default();
    let mut found = shared.registry.lookup(&name);
    let route = settings
        .routes
        .get(&name)
        .filter(|_| !state.covers_private(&name));
    // Just after an upgrade the agents are still moving here: a client of a name they
    // serve waits for its tunnel rather than hearing that the name is offline.
    if let Some(until) = shared.hold_until {
        if found.is_empty()
            && route.is_none()
            && tokio::time::Instant::now() < until
            && state.is_granted_anywhere(&name)
        {
            debug!(%peer, conn = %id, host = %name, "just upgraded: waiting for the agent to move here");
            found = shared.registry.wait_for(&name, until).await;
        }
    }
    if found.is_empty() && route.is_none() {
        let offline = state.is_granted_anywhere(&name);
        if offline {
            debug!(%peer, conn = %id, host = %name, "agent for this name is offline");
            access.refuse(metrics, Refused::Offline);
        } else {
            debug!(%peer, conn = %id, host = %name, "no route");
            access.refuse(metrics, Refused::NoRoute);
        }
        match (reply, offline) {
            (Reply::Tls, _) => {
                let _ = tcp.write_all(&ALERT_UNRECOGNIZED_NAME).await;
            }
            (Reply::Http, true) => {
                let reason = format!("{name} is offline");
                http_error(&mut tcp, 503, "Service Unavailable", &reason, id).await;
            }
            (Reply::Http, false) => {
                let reason = format!("no route for {name}");
                http_error(&mut tcp, 502, "Bad Gateway", &reason, id).await;
            }
            (Reply::Silent, _) => {}
        }
        return;
    }

    let routed = Routed {
        route: route.cloned(),
        name,
        wildcard,
        found,
        peeked,
        reply,
        peer,
        id,
        server: arrival_server,
        settings,
    };
    drop(state);
    // Opened and spliced where the first tunnel runs (`runtime::lanes`): the open wakes no
    // other thread. The client's socket moves there unless it was accepted there; if that
    // tunnel refuses it and the next one runs on another lane, it moves once more (and
    // stays counted in the first lane's load until it ends).
    let lane = (routed.found.exact.iter())
        .chain(&routed.found.wildcard)
        .next()
        .map(|t| t.lane.clone());
    match lane {
        Some(lane) => {
            let (shared, mut taken) = (shared.clone(), std::mem::take(access));
            let on_lane = lane.take().run_with(tcp, move |tcp| async move {
                dispatch(&shared, tcp, routed, &mut taken).await;
                taken
            });
            match on_lane.await {
                Ok(done) => *access = done,
                Err(e) => {
                    warn!(%peer, conn = %id, error = %e, "could not move a connection to its tunnel's lane; dropped");
                    access.refuse(metrics, Refused::Unavailable);
                }
            }
        }
        // A static route only: served here. Boxed, so that the state of every
        // connection's task does not hold room for it.
        None => Box::pin(dispatch(shared, tcp, routed, access)).await,
    }
}

/// A connection whose name was read and looked up, with somewhere to go.
struct Routed {
    name: String,
    /// The wildcard covering the name (`*.parent`).
    wildcard: String,
    found: super::registry::Found,
    /// A static route for the name.
    route: Option<String>,
    /// What was read to find the name: it goes first.
    peeked: Bytes,
    reply: Reply,
    peer: SocketAddr,
    id: ConnId,
    server: Option<SocketAddr>,
    settings: Arc<super::reload::Settings>,
}

/// Opens a stream on the first candidate that takes it (agents granted the exact name,
/// the static route, agents holding a wildcard) and joins the client to it; or tells the
/// client the name cannot be served.
async fn dispatch(shared: &Arc<Shared>, mut tcp: TcpStream, routed: Routed, access: &mut Access) {
    let metrics = &shared.metrics;
    let Routed {
        name,
        wildcard,
        found,
        route,
        peeked,
        reply,
        peer,
        id,
        server: arrival_server,
        settings,
    } = routed;
    // One deadline for the whole search, however many agents refuse or stay silent.
    let deadline = tokio::time::Instant::now() + OPEN_TIMEOUT;
    let request = OpenRequest {
        name: &name,
        client: peer,
        server: arrival_server,
        early: &peeked,
        caller: None,
    };
    let candidates = (found.exact.iter().map(|t| Candidate::Agent(t, &name)))
        .chain(route.as_deref().map(Candidate::Static))
        .chain(
            found
                .wildcard
                .iter()
                .map(|t| Candidate::Agent(t, &wildcard)),
        );
    for candidate in candidates {
        let (t, pattern) = match candidate {
            Candidate::Agent(t, pattern) => (t, pattern),
            Candidate::Static(addr) => match connect_static(addr, peer, id, deadline).await {
                Some(backend) => {
                    let counters = metrics.routed(&name);
                    let origin = Origin {
                        client: Some(peer),
                        server: arrival_server,
                        name: Some(name.clone()),
                        caller: None,
                    };
                    let first = Prelude {
                        header: header_for(&settings, addr, &origin),
                        peeked,
                    };
                    let moved = forward_tcp(tcp, backend, addr, first, peer, id, counters).await;
                    return access.served(format!("tcp://{addr}"), moved);
                }
                None => continue,
            },
        };
        let asked = std::time::Instant::now();
        match tokio::time::timeout_at(deadline, t.open(&request)).await {
            Ok(Ok(stream)) => {
                metrics
                    .open_time(t.transport())
                    .observe(asked.elapsed().as_secs_f64());
                debug!(%peer, conn = %id, host = %name, agent = %t.agent, tunnel = t.id, "stream open");
                let counters = metrics.routed(pattern);
                // The peeked bytes went out with the open request.
                counters.read(peeked.len());
                let limits = settings.stream_limits;
                // Spliced where the tunnel runs, so that the client's bytes and the
                // tunnel's frames never wake a task on another thread. (On the tunnel's
                // lane already, the connection was counted in its load when it came.)
                let moved = if t.lane.is_current() {
                    stream.splice(tcp, limits, counters).await
                } else {
                    let on_lane = (t.lane.take())
                        .run_with(tcp, move |tcp| stream.splice(tcp, limits, counters));
                    match on_lane.await {
                        Ok(moved) => moved,
                        Err(e) => {
                            warn!(%peer, conn = %id, host = %name, error = %e, "could not move a connection to its tunnel's lane; dropped");
                            return access.refuse(metrics, Refused::Unavailable);
                        }
                    }
                };
                if let Some(e) = &moved.error {
                    debug!(%peer, conn = %id, host = %name, error = %e, "stream ended with an error");
                }
                // The client's view: what it sent went up (the peeked bytes first, with
                // the open request), what it got came down.
                let moved = Some((moved.up + peeked.len() as u64, moved.down));
                return access.served(t.agent.clone(), moved);
            }
            Ok(Err(e @ OpenError::Aborted { .. })) => {
                debug!(%peer, conn = %id, host = %name, agent = %t.agent, tunnel = t.id, error = %e, "stream reset before its answer; resetting the client");
                crate::tunnel::reset_whole(tcp);
                access.served(t.agent.clone(), Some((peeked.len() as u64, 0)));
                access.outcome = "reset";
                return;
            }
            Ok(Err(e)) => {
                if e.tunnel_is_gone() {
                    // A draining agent: route nothing new to it; its open streams finish.
                    shared.registry.retire(t.id);
                }
                warn!(%peer, conn = %id, host = %name, agent = %t.agent, tunnel = t.id, error = %e, "could not open a stream; trying the next agent");
            }
            Err(_) => {
                warn!(%peer, conn = %id, host = %name, agent = %t.agent, tunnel = t.id, "no agent answered within {OPEN_TIMEOUT:?}");
                break;
            }
        }
    }
    // The client learns only that the name cannot be served now; the log above has why,
    // under the connection id the answer carries.
    access.refuse(metrics, Refused::Unavailable);
    match reply {
        Reply::Tls => {
            let _ = tcp.write_all(&ALERT_INTERNAL_ERROR).await;
        }
        Reply::Http => {
            let reason = format!("{name} cannot be served right now");
            http_error(&mut tcp, 503, "Service Unavailable", &reason, id).await
        }
        Reply::Silent => {}
    }
}

/// Why a peek gave up.
#[derive(Debug)]
struct PeekError {
    reason: String,
    /// Whether the client spoke the protocol well enough to be told.
    answerable: bool,
    /// What it counts as.
    why: Refused,
}

impl std::fmt::Display for PeekError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

/// What a peek parser says about the bytes so far.
enum Peeked<T> {
    NeedMore,
    Done(T),
}

fn sni_name(buf: &[u8]) -> Result<Peeked<Option<String>>, PeekError> {
    match sni::peek_sni(buf) {
        Ok(sni::SniPeek::NeedMore) => Ok(Peeked::NeedMore),
        Ok(sni::SniPeek::Found(name)) => Ok(Peeked::Done(name)),
        Err(e) => Err(PeekError {
            reason: e.to_string(),
            answerable: false,
            why: Refused::BadHead,
        }),
    }
}

fn http_host(buf: &[u8]) -> Result<Peeked<String>, PeekError> {
    match http::peek_host(buf) {
        Ok(http::HostPeek::NeedMore) => Ok(Peeked::NeedMore),
        Ok(http::HostPeek::Found(host)) => Ok(Peeked::Done(host)),
        Err(e) => Err(PeekError {
            answerable: !matches!(e, http::HostError::NotHttp),
            reason: e.to_string(),
            why: Refused::BadHead,
        }),
    }
}

/// Reads (after the bytes already in `buf`) until `parse` decides, within `timeout`
/// overall and [`MAX_PEEK`] bytes.
async fn peek<T>(
    tcp: &mut TcpStream,
    mut buf: BytesMut,
    timeout: Duration,
    parse: impl Fn(&[u8]) -> Result<Peeked<T>, PeekError>,
) -> Result<(T, Bytes), PeekError> {
    let deadline = tokio::time::Instant::now() + timeout;
    buf.reserve(2048);
    loop {
        if let Peeked::Done(v) = parse(&buf)? {
            return Ok((v, buf.freeze()));
        }
        if buf.len() >= MAX_PEEK {
            return Err(PeekError {
                reason: format!("nothing to route on in the first {MAX_PEEK} bytes"),
                answerable: true,
                why: Refused::BadHead,
            });
        }
        buf.reserve(4096.min(MAX_PEEK - buf.len()));
        let read = tokio::time::timeout_at(deadline, tcp.read_buf(&mut buf)).await;
        match read {
            Ok(Ok(0)) => {
                return Err(PeekError {
                    reason: "client closed before saying where to go".into(),
                    answerable: false,
                    why: Refused::ClientClosed,
                })
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                return Err(PeekError {
                    reason: e.to_string(),
                    answerable: false,
                    why: Refused::ClientClosed,
                })
            }
            Err(_) => {
                return Err(PeekError {
                    reason: format!("client did not say where to go within {timeout:?}"),
                    answerable: true,
                    why: Refused::PeekTimeout,
                })
            }
        }
    }
}

/// The PROXY header the static backend `addr` wants (empty if none).
fn header_for(settings: &super::reload::Settings, addr: &str, origin: &Origin) -> Vec<u8> {
    match settings.static_proxy_protocol.get(addr) {
        Some(version) => proxy_header::encode(*version, origin),
        None => Vec::new(),
    }
}

/// Connects to a static route's backend within the connection's deadline.
async fn connect_static(
    addr: &str,
    peer: SocketAddr,
    id: ConnId,
    deadline: tokio::time::Instant,
) -> Option<TcpStream> {
    match tokio::time::timeout_at(deadline, crate::runtime::connect(addr)).await {
        Ok(Ok(backend)) => Some(backend),
        Ok(Err(e)) => {
            warn!(%peer, conn = %id, backend = addr, error = %e, "cannot reach static backend");
            None
        }
        Err(_) => {
            warn!(%peer, conn = %id, backend = addr, "static backend did not accept in time");
            None
        }
    }
}

/// What a static backend gets before the client's bytes flow.
struct Prelude {
    /// The PROXY header it wants (empty if none).
    header: Vec<u8>,
    /// The client's bytes already read (counted as the client's).
    peeked: Bytes,
}

/// Joins a client to a static route's backend, the prelude first.
async fn forward_tcp(
    client: TcpStream,
    mut backend: TcpStream,
    addr: &str,
    first: Prelude,
    peer: SocketAddr,
    id: ConnId,
    counters: StreamCounters,
) -> Option<(u64, u64)> {
    let Prelude { header, peeked } = first;
    counters.read(peeked.len());
    if backend.write_all(&header).await.is_err() || backend.write_all(&peeked).await.is_err() {
        return None;
    }
    // Counted as the bytes move, like a tunnel stream; each direction on its own, so that
    // a break resets only the side that did not get its whole stream.
    let mut client = client;
    let (mut from_client, mut to_client) = client.split();
    let (mut from_backend, mut to_backend) = backend.split();
    let mut counted_in = Counted::new(&mut from_client, &counters);
    let mut counted_out = Counted::new(&mut to_client, &counters);
    let up = async {
        let mut from = tokio::io::BufReader::with_capacity(STATIC_COPY_BUFFER, &mut counted_in);
        let n = tokio::io::copy_buf(&mut from, &mut to_backend).await?;
        to_backend.shutdown().await?;
        Ok(n)
    };
    let down = async {
        let mut from = tokio::io::BufReader::with_capacity(STATIC_COPY_BUFFER, &mut from_backend);
        let n = tokio::io::copy_buf(&mut from, &mut counted_out).await?;
        counted_out.shutdown().await?;
        Ok(n)
    };
    // No idle timeout on a static route (as before).
    let pumped = crate::tunnel::both_ways(up, down, std::future::pending()).await;
    let (up, down) = (counted_in.totals.0, counted_out.totals.1);
    if let Err(e) = &pumped.result {
        debug!(%peer, conn = %id, backend = addr, error = %e, "static route ended with an error");
        // Broken: a side that did not get its whole stream is reset, so it never takes
        // the cut stream for a complete one.
        if !pumped.delivered {
            let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
        }
        if !pumped.sent {
            let _ = socket2::SockRef::from(&backend).set_linger(Some(Duration::ZERO));
        }
    }
    Some((up + peeked.len() as u64, down))
}
