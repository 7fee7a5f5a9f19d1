//! The agent port's QUIC side: a UDP socket per lane, each read by a quinn endpoint on
//! its lane (`tunnel/quic/steer.rs`), their accept loops, and one QUIC connection from
//! its handshake to the tunnel it holds (`agent_port.rs` holds it as it holds an h2 one).

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use super::accept::{self, AcceptCounters, Acceptor, PerSource, SourceSlot, REFUSAL_LOG_EVERY};
use super::admit::admit;
use super::agent_port::{hold, Budgets, Held, Unproven};
use super::{Limits, Shared};
use crate::runtime::holding::unbox;
use crate::runtime::lanes::{Lane, Lanes};
use crate::runtime::shutdown::Trigger;
use crate::tunnel::quic::peers::Peers;
use crate::tunnel::{self, quic};

/// An endpoint per socket of the port's group, each on its lane, and the switch of their
/// reading.
///
/// On the lanes a QUIC tunnel, its packets and its clients' streams share one thread, as
/// an h2 tunnel's do. (A stall seen there under ten thousand clients through one agent
/// was quinn's stream credit, not the lanes: `tunnel::quic::PROXY_STREAMS`.)
pub(super) struct QuicPort {
    endpoints: Vec<(Lane, quinn::Endpoint)>,
    switch: quic::proxy::ReadSwitch,
    /// This process's tunnels' agents, and where the table is written.
    peers: Arc<Peers>,
    table: std::path::PathBuf,
    /// On a cold start: the agents of the process before, to be reset (its table, a
    /// socket of the port, the reset key).
    earlier: Option<Earlier>,
}

/// What a cold start needs to reset the last process's QUIC tunnels (`peers.rs`).
struct Earlier {
    /// Their agents and the IDs they send to, from the tables in the state directory.
    peers: Vec<quic::peers::Peer>,
    socket: std::net::UdpSocket,
    reset_key: ring::hmac::Key,
}

/// The UDP sockets for QUIC tunnels at the agent listener's address: one per lane.
pub(super) fn quic_sockets(
    addr: SocketAddr,
    lanes: usize,
) -> std::io::Result<Vec<std::net::UdpSocket>> {
    let bound = quic::steer::bind_group(addr, lanes).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen for QUIC on udp {addr}: {e}"),
        )
    })?;
    bound.into_iter().map(quic::tune_udp_socket).collect()
}

/// What the accept loops share with the agent port's TCP side.
pub(super) struct On {
    pub(super) shared: Arc<Shared>,
    pub(super) budgets: Arc<Budgets>,
    pub(super) stop: Trigger,
    pub(super) grace: std::time::Duration,
    pub(super) counters: AcceptCounters,
}

/// What the QUIC side is made of.
pub(super) struct QuicSetup<'a> {
    /// The sockets of the QUIC port's group in its order.
    pub(super) sockets: Vec<std::net::UdpSocket>,
    /// The agent port's TLS configuration for tunnels.
    pub(super) tls: rustls::ServerConfig,
    /// Whether the endpoints read their sockets from the start (not in a process that
    /// took them over, until the old one lets go).
    pub(super) reading: bool,
    /// Keeps QUIC's stateless reset key (and the connection-ID key) the same across
    /// restarts.
    pub(super) reset_secret: &'a [u8],
    /// Holds the QUIC generation and the sockets an upgrade forwards packets through
    /// (`tunnel/quic/takeover.rs`).
    pub(super) state_dir: &'a std::path::Path,
}

impl QuicPort {
    /// An endpoint per socket of `setup`, each on a lane of `lanes` (round robin: as many
    /// sockets as lanes, normally); `None` without sockets.
    pub(super) fn new(setup: QuicSetup<'_>, lanes: &Lanes) -> std::io::Result<Option<QuicPort>> {
        let QuicSetup {
            sockets: quic,
            tls: tunnel_tls,
            reading,
            reset_secret,
            state_dir,
        } = setup;
        if quic.is_empty() {
            return Ok(None);
        }
        let count = u8::try_from(quic.len())
            .ok()
            .filter(|&n| usize::from(n) <= quic::steer::MAX_GROUP)
            .ok_or_else(|| std::io::Error::other("too many QUIC sockets"))?;
        if quic.len() < lanes.all().len() {
            info!(
                endpoints = quic.len(),
                lanes = lanes.all().len(),
                "the QUIC port has fewer sockets than this process has lanes (taken over from \
                 a process that had fewer, or a socket given without SO_REUSEPORT); it keeps \
                 that many until the proxy is restarted"
            );
        }
        let generation = quic::takeover::next_generation(state_dir);
        let key = quic::proxy::cid_key(reset_secret);
        let peers = Arc::new(Peers::new(quic::takeover::GenerationCids::new(
            &key, generation,
        )));
        let table = quic::peers::table_path(state_dir, generation);
        // A process that takes the sockets over leaves the old one's tunnels be. Read
        // before this process's table is first written (a file of tunnels younger than
        // the idle timeout).
        let earlier = match reading {
            true => (quic[0].try_clone())
                .map(|socket| Earlier {
                    // A table is marked current every few seconds while unchanged.
                    peers: quic::peers::take_earlier(
                        state_dir,
                        quic::IDLE_TIMEOUT + quic::peers::REFRESH,
                    ),
                    socket,
                    reset_key: quic::proxy::reset_key(reset_secret),
                })
                .ok(),
            false => None,
        };
        let (mut endpoints, mut switches) = (Vec::new(), Vec::new());
        for ((index, socket), lane) in (0..).zip(quic).zip(lanes.all().iter().cycle()) {
            let takeover = quic::proxy::Takeover {
                dir: state_dir.to_path_buf(),
                generation,
                key: key.clone(),
                steer: quic::steer::Steer { index, count },
                peers: peers.clone(),
            };
            let config = quic::proxy::endpoint_config(reset_secret, &takeover);
            // Its socket, its driver and the connections it accepts are the lane's.
            let _on_lane = lane.enter();
            let (endpoint, switch) =
                quic::proxy::endpoint(socket, tunnel_tls.clone(), reading, config, takeover)?;
            endpoints.push((lane.clone(), endpoint));
            switches.push(switch);
        }
        let switch = quic::proxy::ReadSwitch::join(switches);
        Ok(Some(QuicPort {
            endpoints,
            switch,
            peers,
            table,
            earlier,
        }))
    }

    /// The endpoints and the switch that stops them reading.
    pub(super) fn endpoints(&self) -> (Vec<quinn::Endpoint>, quic::proxy::ReadSwitch) {
        let endpoints = self.endpoints.iter().map(|(_, e)| e.clone()).collect();
        (endpoints, self.switch.clone())
    }

    /// Accepts on every endpoint, each on its lane, until `on.stop`; then closes them
    /// (bounded).
    pub(super) async fn run(self, on: On, limits: &Limits) {
        let On {
            shared,
            budgets,
            stop,
            grace,
            counters,
        } = on;
        if let Some(Ok(addr)) = self.endpoints.first().map(|(_, e)| e.local_addr()) {
            let endpoints = self.endpoints.len();
            info!(%addr, endpoints, "QUIC tunnel listener ready (udp)");
        }
        // The agents of a crashed process before this one reconnect now, not at their
        // next keep-alive; this process's own are written down for the next one.
        if let Some(earlier) = self.earlier {
            let Earlier {
                peers,
                socket,
                reset_key,
            } = earlier;
            tokio::spawn(quic::peers::reset(peers, socket, reset_key));
        }
        let keeping = tokio::spawn(self.peers.clone().keep(self.table, stop.clone()));
        let permits = Arc::new(Semaphore::new(limits.agents));
        let per_source =
            PerSource::with_prefix_cap(limits.handshakes_per_source, limits.handshakes_per_prefix);
        // Each endpoint accepts on its lane: a connection runs where it was accepted
        // (quinn spawns its task there), with its streams and its clients.
        let loops = self.endpoints.into_iter().map(|(lane, endpoint)| {
            let (shared, budgets, peers) = (shared.clone(), budgets.clone(), self.peers.clone());
            let handle = move |incoming: quinn::Incoming, peer: SocketAddr, slot| {
                let (shared, budgets) = (shared.clone(), budgets.clone());
                let tracked = peers.track(peer);
                // Boxed, as what follows is: the task that holds the tunnel holds this.
                let incoming = Box::new(incoming);
                async move {
                    let Some(unproven) = budgets.handshake(&shared, peer, slot) else {
                        return incoming.refuse();
                    };
                    let arrival = Box::new(Arrival {
                        incoming,
                        peer,
                        unproven,
                        tracked,
                    });
                    serve_quic(shared, budgets, arrival).await
                }
            };
            let serve = accept::serve(
                QuicAcceptor(endpoint.clone()),
                accept::Stopping::at(&stop),
                permits.clone(),
                per_source.clone(),
                grace * 2,
                counters.clone(),
                handle,
            );
            lane.run(async move {
                serve.await;
                quic::proxy::close(&endpoint, "proxy shutting down").await;
            })
        });
        // Spawned on their lanes as they are collected; each then awaited.
        for running in loops.collect::<Vec<_>>() {
            running.await;
        }
        let _ = keeping.await;
    }
}

/// The QUIC endpoint as an [`Acceptor`].
struct QuicAcceptor(quinn::Endpoint);

impl Acceptor for QuicAcceptor {
    type Conn = quinn::Incoming;

    async fn accept(&mut self) -> Option<(quinn::Incoming, SocketAddr)> {
        let incoming = quic::proxy::accept(&self.0).await?;
        let peer = incoming.remote_address();
        Some((incoming, peer))
    }

    fn refuse(incoming: quinn::Incoming) {
        incoming.refuse();
    }

    fn stop(self) {
        quic::proxy::stop_accepting(&self.0);
    }
}

/// A QUIC connection the agent port took on.
struct Arrival {
    incoming: Box<quinn::Incoming>,
    peer: SocketAddr,
    /// Its share of the handshake caps.
    unproven: Unproven,
    /// Its agent in this process's table, once it is a tunnel.
    tracked: quic::peers::Tracked,
}

/// One QUIC connection on the agent port: always a tunnel. Its handshake and admission
/// are boxed: the task holds this function's state for the tunnel's life, and theirs is
/// larger than the rest (issue 33).
async fn serve_quic(shared: Arc<Shared>, budgets: Arc<Budgets>, arrival: Box<Arrival>) {
    let Some(arrived) = Box::pin(arrive(&shared, &budgets, arrival)).await else {
        return;
    };
    let Arrived {
        held,
        conn,
        unproven,
        _counted,
        _tracked,
    } = arrived;
    hold(shared, held, conn, unproven).await;
}

/// A QUIC tunnel admitted, to hold.
struct Arrived {
    held: Held,
    conn: tunnel::ProxyConn,
    unproven: SourceSlot,
    /// Counted in its lane's load, as an h2 tunnel is: new h2 tunnels go elsewhere first.
    _counted: crate::runtime::lanes::Picked,
    /// Its agent in this process's table.
    _tracked: quic::peers::Tracked,
}

/// Completes a QUIC connection's handshake and admits its agent.
async fn arrive(shared: &Arc<Shared>, budgets: &Budgets, arrival: Box<Arrival>) -> Option<Arrived> {
    let Arrival {
        incoming,
        peer,
        unproven,
        mut tracked,
    } = unbox(arrival);
    let accepted = tunnel::accept_quic(unbox(incoming)).await;
    let Unproven {
        slot: unproven,
        handshake,
    } = unproven;
    drop(handshake);
    let (link, conn, der, extra) = match accepted {
        Ok(accepted) => accepted,
        Err(e) if e.certificate_refused() => {
            shared.metrics.tunnel_refused("certificate");
            match budgets.log.loud(peer.ip()) {
                Some(unsaid) => {
                    warn!(%peer, error = %e, unsaid, "agent certificate refused (QUIC; further refusals from this source for {REFUSAL_LOG_EVERY:?} at debug)")
                }
                None => debug!(%peer, error = %e, "agent certificate refused (QUIC)"),
            }
            return None;
        }
        Err(e) => {
            debug!(%peer, error = %e, "QUIC handshake failed");
            return None;
        }
    };
    let Some(who) = admit(shared, der.as_deref(), peer).await else {
        conn.refuse();
        return None;
    };
    let counted = Lane::here().take();
    tracked.up();
    if let tunnel::Link::Quic(conn) = &link {
        let conn = conn.clone();
        tokio::spawn(async move {
            let told = quic::proxy::tell_slow_keepalive(&conn);
            if tokio::time::timeout(tunnel::control::CONTROL_TIMEOUT, told)
                .await
                .is_err()
            {
                debug!("the agent did not take the keep-alive message in time");
            }
        });
    }
    Some(Arrived {
        held: Held {
            who,
            link,
            peer,
            extra,
        },
        conn,
        unproven,
        _counted: counted,
        _tracked: tracked,
    })
}
