//! The agent port: one port number, two protocols. On TCP, a TLS handshake whose ALPN
//! says what follows: `h2` is a tunnel (a client certificate is required and verified in
//! the handshake), `http/1.1` is enrollment or renewal (`enroll.rs`). On UDP, QUIC tunnels.
//! A tunnel is admitted (`admit.rs`), registered, held until it ends, and forgotten.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::LazyConfigAcceptor;
use tracing::{debug, info, warn};

use super::accept::{self, AcceptCounters, PerSource, RefusalLog, SourceSlot, REFUSAL_LOG_EVERY};
use super::admit::{admit, Peer};
use super::quic_port::{self, QuicPort};
use super::registry::{NewTunnel, NotRegistered, Tunnel};
use super::{enroll, mesh, Limits, Shared};
use crate::runtime::beat::Beat;
use crate::runtime::holding::unbox;
use crate::runtime::lanes::Lanes;
use crate::runtime::shutdown::Trigger;
use crate::tls;
use crate::tunnel::{self, quic, Upward, HANDSHAKE_TIMEOUT};

/// The agent port's listeners.
pub(super) struct AgentPort {
    tcp: TcpListener,
    quic: Option<QuicPort>,
}

impl AgentPort {
    /// TCP on `tcp`; QUIC as `quic` says (no QUIC without sockets; normally a socket
    /// per lane of `lanes`).
    pub(super) fn new(
        tcp: TcpListener,
        quic: quic_port::QuicSetup<'_>,
        lanes: &Lanes,
    ) -> std::io::Result<AgentPort> {
        let quic = QuicPort::new(quic, lanes)?;
        Ok(AgentPort { tcp, quic })
    }

    pub(super) fn addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// The QUIC endpoints and the switch that stops them reading, for an upgrade to move
    /// the agents.
    pub(super) fn quic_endpoints(&self) -> Option<(Vec<quinn::Endpoint>, quic::proxy::ReadSwitch)> {
        self.quic.as_ref().map(QuicPort::endpoints)
    }

    /// Accepts agents until `stop`, then waits for their connections to end (tunnels close
    /// when the proxy fires `close_tunnels`, after the client connections drained), at most
    /// twice `grace`. `stopped` fires once TCP accepts no more.
    pub(super) async fn run(
        self,
        shared: Arc<Shared>,
        stop: Trigger,
        stopped: Trigger,
        grace: std::time::Duration,
        limits: Limits,
    ) {
        if let Ok(addr) = self.tcp.local_addr() {
            info!(%addr, pin = %shared.ca.pin(), "agent listener ready");
        }
        let budgets = Arc::new(Budgets {
            handshakes: Arc::new(Semaphore::new(limits.handshakes)),
            enrollments: Arc::new(Semaphore::new(limits.enrollments)),
            log: Arc::default(),
        });
        let counters = AcceptCounters {
            accepted: None,
            over_limit: Some(shared.metrics.agent_port_refused("connection_limit")),
            over_source: Some(shared.metrics.agent_port_refused("source_limit")),
            log: budgets.log.clone(),
        };
        let tcp = {
            let (shared, budgets) = (shared.clone(), budgets.clone());
            let permits = Arc::new(Semaphore::new(limits.agents));
            let per_source = PerSource::with_prefix_cap(
                limits.handshakes_per_source,
                limits.handshakes_per_prefix,
            );
            // Each connection runs on a lane: a tunnel there, with its client streams.
            let handle = move |tcp: TcpStream, peer: SocketAddr, slot| {
                let (shared, budgets) = (shared.clone(), budgets.clone());
                async move {
                    let Some(unproven) = budgets.handshake(&shared, peer, slot) else {
                        return;
                    };
                    let lane = shared.lanes.pick();
                    let serve = move |tcp| serve_tcp(shared, budgets, tcp, peer, unproven);
                    if let Err(e) = lane.run_with(tcp, serve).await {
                        warn!(%peer, error = %e, "could not move a connection to a lane; dropped");
                    }
                }
            };
            let stopping = accept::Stopping {
                stopped,
                ..accept::Stopping::at(&stop)
            };
            accept::serve(
                self.tcp,
                stopping,
                permits,
                per_source,
                grace * 2,
                counters.clone(),
                handle,
            )
        };
        let quic = async {
            if let Some(port) = self.quic {
                let on = quic_port::On {
                    shared,
                    budgets,
                    stop,
                    grace,
                    counters,
                };
                port.run(on, &limits).await;
            }
        };
        tokio::join!(tcp, quic);
    }
}

/// The agent port's budgets for connections that have not proven themselves yet (no
/// verified client certificate): TLS handshakes under way, and enrollment exchanges. Kept
/// apart from the port's connection limit, so that strangers can never take the room
/// agents with certificates need to reconnect, renew and open mesh channels.
pub(super) struct Budgets {
    handshakes: Arc<Semaphore>,
    enrollments: Arc<Semaphore>,
    /// Where refusals are said: once per source and interval.
    pub(super) log: Arc<RefusalLog>,
}

/// What a connection holds until it proves itself: its source's slot, and its place among
/// the handshakes (given back once TLS is done).
pub(super) struct Unproven {
    pub(super) slot: SourceSlot,
    pub(super) handshake: OwnedSemaphorePermit,
}

impl Budgets {
    /// A place among the handshakes, or `None` (counted, said) if there is none.
    pub(super) fn handshake(
        &self,
        shared: &Shared,
        peer: SocketAddr,
        slot: SourceSlot,
    ) -> Option<Unproven> {
        match self.handshakes.clone().try_acquire_owned() {
            Ok(handshake) => Some(Unproven { slot, handshake }),
            Err(_) => {
                self.refused(shared, peer, "handshakes");
                None
            }
        }
    }

    /// A place among the enrollment exchanges, or `None` (counted, said).
    fn enrollment(&self, shared: &Shared, peer: SocketAddr) -> Option<OwnedSemaphorePermit> {
        let permit = self.enrollments.clone().try_acquire_owned().ok();
        if permit.is_none() {
            self.refused(shared, peer, "enrollments");
        }
        permit
    }

    fn refused(&self, shared: &Shared, peer: SocketAddr, budget: &'static str) {
        shared.metrics.agent_port_refused(budget).inc();
        match self.log.loud(peer.ip()) {
            Some(unsaid) => {
                warn!(%peer, budget, unsaid, "agent port: this budget is full; refusing a connection (further refusals from this source for {REFUSAL_LOG_EVERY:?} at debug)")
            }
            None => debug!(%peer, budget, "agent port: this budget is full; refusing a connection"),
        }
    }
}

/// One TCP connection on the agent port: TLS, then a tunnel or an enrollment.
/// `unproven` counts against its source until the connection is a registered tunnel or its
/// enrollment exchange is over: a source cannot hold the port's permits with connections
/// that finished TLS (enrollment needs no certificate) and then sit.
///
/// A tunnel's task holds this function's state for as long as the tunnel lives, and that
/// state is as large as its largest branch: the rare or short ones (enrollment, a mesh
/// channel, the HTTP/2 handshake) are boxed, so that every idle tunnel does not carry
/// their size (issue 33).
async fn serve_tcp(
    shared: Arc<Shared>,
    budgets: Arc<Budgets>,
    tcp: TcpStream,
    peer: SocketAddr,
    unproven: Unproven,
) {
    let _ = tcp.set_nodelay(true);
    // Look at the ClientHello first: tunnels (ALPN h2) must present a certificate, which
    // is then checked in the handshake itself; enrollment cannot have one yet.
    let handshake = Box::pin(async {
        let io = tunnel::h2::tunnel_io(tcp);
        let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io).await?;
        let tunnel = tls::offers_h2(&start.client_hello());
        let config = if tunnel {
            shared.tunnel_config.clone()
        } else {
            shared.enroll_config.clone()
        };
        // Kept boxed until it is handed on: inline, the stream would take its room in
        // this function's state for the tunnel's life, though moved on long before.
        Ok::<_, std::io::Error>((tunnel, Box::new(start.into_stream(config).await?)))
    });
    let (tunnel, stream) = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(done)) => done,
        Ok(Err(e)) => {
            // A refused agent certificate is an operator's business; line noise is not.
            match e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            {
                Some(
                    tls_error @ (rustls::Error::InvalidCertificate(_)
                    | rustls::Error::NoCertificatesPresented),
                ) => {
                    shared.metrics.tunnel_refused("certificate");
                    match budgets.log.loud(peer.ip()) {
                        Some(unsaid) => {
                            warn!(%peer, error = %tls_error, unsaid, "agent certificate refused (further refusals from this source for {REFUSAL_LOG_EVERY:?} at debug)")
                        }
                        None => debug!(%peer, error = %tls_error, "agent certificate refused"),
                    }
                }
                _ => debug!(%peer, error = %e, "TLS handshake failed on the agent port"),
            }
            return;
        }
        Err(_) => {
            debug!(%peer, "TLS handshake timed out on the agent port");
            return;
        }
    };
    let Unproven {
        slot: unproven,
        handshake,
    } = unproven;
    drop(handshake);
    let der = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .map(|der| der.to_vec());
    if !tunnel {
        let client_serial = der
            .as_deref()
            .and_then(revproxy_ca::CertSummary::from_der)
            .map(|c| c.serial);
        // A renewal (a verified certificate) is an agent's; an enrollment anyone's, so it
        // takes a place among the enrollments, and counts against its source meanwhile.
        let _place = match client_serial {
            Some(_) => None,
            None => match budgets.enrollment(&shared, peer) {
                Some(permit) => Some((permit, unproven)),
                None => return,
            },
        };
        return Box::pin(enroll::serve(shared, unbox(stream), peer, client_serial)).await;
    }
    let Some(who) = admit(&shared, der.as_deref(), peer).await else {
        return;
    };
    if stream.get_ref().1.alpn_protocol() == Some(tls::ALPN_CONNECT) {
        return Box::pin(mesh_channel(shared, who, unbox(stream), peer, unproven)).await;
    }
    let extra = stream.get_ref().1.alpn_protocol() == Some(tls::ALPN_H2_EXTRA);
    match Box::pin(tunnel::accept_h2(unbox(stream))).await {
        Ok((link, conn)) => {
            let held = Held {
                who,
                link,
                peer,
                extra,
            };
            hold(shared, held, conn, unproven).await
        }
        Err(e) => debug!(%peer, agent = %who.agent, error = %e, "tunnel handshake failed"),
    }
}

/// The streams an agent opens to reach names (the mesh): each goes to
/// [`mesh::serve_upward`] in a task of its own.
fn upward(shared: &Arc<Shared>, who: &Peer, peer: SocketAddr) -> Arc<dyn Fn(Upward) + Send + Sync> {
    let caller = Arc::new(mesh::Caller {
        agent: who.agent.clone(),
        identity: shared.ca.identity_of(&who.agent),
        serial: who.serial.clone(),
        peer,
    });
    let shared = shared.clone();
    Arc::new(move |up| {
        // Over its share: dropped unanswered (a reset), nothing routed for it.
        let Some(permit) = shared.mesh.permit(&caller.agent) else {
            debug!(agent = %caller.agent, "too many mesh streams in hand; dropping one");
            return;
        };
        let serve = mesh::serve_upward(shared.clone(), caller.clone(), up, permit);
        crate::runtime::lanes::spawn(serve);
    })
}

/// An h2 agent's mesh channel: served until the agent closes it or the proxy shuts down.
/// It serves no names; the tunnel beside it does.
async fn mesh_channel(
    shared: Arc<Shared>,
    who: Peer,
    stream: tokio_rustls::server::TlsStream<tunnel::h2::TunnelIo>,
    peer: SocketAddr,
    unproven: SourceSlot,
) {
    let Some(_slot) = shared
        .mesh
        .channel(&who.agent, shared.max_tunnels_per_agent)
    else {
        warn!(%peer, agent = %who.agent, "agent holds its most mesh channels already; refusing another");
        return;
    };
    drop(unproven);
    debug!(%peer, agent = %who.agent, "mesh channel up");
    let on_stream = upward(&shared, &who, peer);
    // Closed like a tunnel: at revocation, at the certificate's expiry, at shutdown.
    let (revoked, _registered) = shared.mesh.channel_cut(&who.serial);
    let close = async {
        tokio::select! {
            () = shared.close_tunnels.cancelled() => {}
            () = revoked.cancelled() => {}
            () = until_unix(who.not_after) => {}
        }
    };
    // An upgrade moves the agent: no new mesh streams here, open ones run on.
    let moving = shared.moving.cancelled();
    let ended = tunnel::serve_mesh_channel(stream, on_stream, moving, close).await;
    debug!(%peer, agent = %who.agent, result = ?ended, "mesh channel down");
}

/// A tunnel to hold: whose, on what, from where, and whether it is an extra one.
pub(super) struct Held {
    pub(super) who: Peer,
    pub(super) link: tunnel::Link,
    pub(super) peer: SocketAddr,
    pub(super) extra: bool,
}

/// Registers a tunnel under `hosts` and holds it until it closes, dies, is closed by the
/// proxy (revocation) or the proxy shuts down; then forgets it. The source's slot is given
/// back once the tunnel is registered (or refused).
pub(super) async fn hold(
    shared: Arc<Shared>,
    held: Held,
    conn: tunnel::ProxyConn,
    unproven: SourceSlot,
) {
    let Held {
        who,
        link,
        peer,
        extra,
    } = held;
    let id = shared.registry.next_id();
    let on_upward = upward(&shared, &who, peer);
    let tunnel = Arc::new(Tunnel::new(NewTunnel {
        id,
        who,
        link,
        peer,
        extra,
        room: shared.registry.room(),
    }));
    let current = || shared.state.get();
    let registered =
        (shared.registry).insert(tunnel.clone(), shared.max_tunnels_per_agent, current);
    let hosts = match registered {
        Ok(hosts) => hosts,
        Err(NotRegistered::OverLimit(held)) => {
            warn!(%peer, agent = %tunnel.agent, held, "agent holds its most tunnels already; refusing another");
            shared.metrics.tunnel_refused("over_limit");
            return conn.refuse();
        }
        Err(NotRegistered::NotBusy { streams, tunnels }) => {
            debug!(%peer, agent = %tunnel.agent, streams, tunnels, "an extra tunnel while the agent's tunnels are not busy; refusing it");
            shared.metrics.tunnel_refused("not_busy");
            return conn.refuse();
        }
        Err(NotRegistered::Revoked) => {
            warn!(%peer, agent = %tunnel.agent, serial = %tunnel.serial, "certificate revoked while its tunnel was being admitted; closing it");
            shared.metrics.tunnel_refused("revoked");
            return conn.refuse();
        }
        Err(NotRegistered::NotOnRecord) => {
            warn!(%peer, agent = %tunnel.agent, serial = %tunnel.serial, "certificate no longer on record; closing the tunnel");
            shared.metrics.tunnel_refused("unknown_certificate");
            return conn.refuse();
        }
    };
    drop(unproven);
    shared.metrics.tunnel_up(tunnel.transport());
    info!(agent = %tunnel.agent, tunnel = id, transport = %tunnel.transport(), extra = tunnel.extra.then_some(true), hosts = %crate::runtime::logging::list(&hosts.public), private = %crate::runtime::logging::list(&hosts.private), "tunnel up");
    super::background::tell_new_tunnel(&shared, &tunnel);
    // Which of the proxy's reasons closed it, if one did (the metric's label).
    let closed_by = std::sync::OnceLock::new();
    // Boxed: handed down through the drive functions, it would be held again at each.
    let close = Box::pin(async {
        let (label, reason) = tokio::select! {
            () = tunnel.close.notified() => ("revoked", "closed by the proxy"),
            () = shared.close_tunnels.cancelled() => ("shutdown", "proxy shutting down"),
            // A renewed agent has moved to its new certificate long before this.
            () = until_unix(tunnel.not_after) => ("expired", "certificate expired"),
        };
        let _ = closed_by.set(label);
        reason
    });
    let retire = || shared.registry.retire(id);
    // When a new process takes the sockets over, this tunnel's agent is told to move.
    let _mover = {
        let (shared, tunnel) = (shared.clone(), tunnel.clone());
        tokio_util::task::AbortOnDropHandle::new(crate::runtime::lanes::spawn(async move {
            shared.moving.cancelled().await;
            tunnel.tell_moving().await;
            // An agent that moves retires this tunnel within a moment (its new one is up);
            // a QUIC agent before the message does not, and is moved the old way. (An h2
            // agent has always acted on its message.)
            if tunnel.quic_connection().is_none() {
                return;
            }
            let mut changes = shared.registry.subscribe();
            let retired = tokio::time::timeout(MOVE_WAIT, async {
                while !tunnel.is_draining() {
                    if changes.changed().await.is_err() {
                        return std::future::pending().await;
                    }
                }
            });
            if retired.await.is_err() {
                tunnel.close_moving();
            }
        }))
    };
    let budget = shared.settings().stream_limits.budget.clone();
    let reason = conn.drive(close, retire, on_upward, &budget).await;
    shared.registry.remove(id);
    // After an upgrade every tunnel here ends because its agent moved.
    let moved = shared.moving.is_fired().then_some("upgrade");
    shared
        .metrics
        .tunnel_down(closed_by.get().copied().or(moved).unwrap_or("agent"));
    info!(%peer, agent = %tunnel.agent, tunnel = id, %reason, "tunnel down");
}

/// How long an agent told to move has to retire its tunnel here before a QUIC tunnel is
/// closed (an agent before QUIC's moving message). An agent moves within a second or two:
/// its new tunnel up, it retires the old one once that served for a second.
const MOVE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Completes at the Unix time `at` by the wall clock, re-read about every minute so a
/// clock step is noticed. The looks fall on the shared beat (`runtime::beat`): a
/// proxy's tunnels look together, at one wake-up, instead of one wake-up each.
async fn until_unix(at: i64) {
    let beat = Beat::new(std::time::Duration::from_secs(60));
    loop {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        if now >= at {
            return;
        }
        let left = std::time::Duration::from_secs((at - now) as u64);
        tokio::time::sleep(left.min(beat.wait())).await;
    }
}
