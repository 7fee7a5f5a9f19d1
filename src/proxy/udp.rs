//! Granted UDP ports (DESIGN.md section 11): the proxy reads a granted UDP port's socket
//! while some live tunnel serves `udp:PORT` ([`super::ports`] decides when), and each
//! client address there is a flow: a tunnel stream to an agent holding the port, which
//! carries the client's datagrams to the agent's backend and the backend's answers back
//! from the same socket to that address (`tunnel/udp.rs` has the wire).
//!
//! Bounded everywhere: flows in all and per source address ([`UdpLimits`]), a queue per
//! flow that drops rather than grows, and an idle timeout that ends a flow nothing moved
//! on. Counted per port: datagrams each way, drops by reason, open flows.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::net::UdpSocket;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{debug, info, Instrument};

use super::accept::PerSource;
use super::public::OPEN_TIMEOUT;
use super::replies::ConnId;
use super::Shared;
use crate::runtime::shutdown::Trigger;
use crate::tunnel::udp::{self, FlowCounts, Local, QuicPath};
use crate::tunnel::OpenRequest;

/// How UDP flows on granted ports are bounded (`udp_idle_timeout`, `max_udp_flows`,
/// `max_udp_flows_per_source` in the proxy's configuration).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpLimits {
    /// A flow that moved no datagram either way for this long ends.
    pub idle: Duration,
    /// Most flows on all granted UDP ports together.
    pub flows: usize,
    /// Most flows of one source on one port: an IPv4 address, or an IPv6 /64.
    pub per_source: usize,
}

impl Default for UdpLimits {
    fn default() -> UdpLimits {
        UdpLimits {
            idle: Duration::from_secs(60),
            flows: 16_384,
            per_source: 256,
        }
    }
}

/// Why a datagram from a client was dropped (the `reason` label).
#[derive(Clone, Copy, Debug)]
#[repr(usize)]
pub(super) enum Dropped {
    /// Its flow's queue was full: the tunnel or the agent is slower than the client.
    QueueFull,
    /// A new flow over [`UdpLimits::flows`] or [`UdpLimits::per_source`].
    FlowLimit,
    /// No agent could take the flow (none serves the port now, or none answered).
    NoAgent,
}

impl Dropped {
    pub(super) fn label(self) -> &'static str {
        match self {
            Dropped::QueueFull => "queue_full",
            Dropped::FlowLimit => "flow_limit",
            Dropped::NoAgent => "no_agent",
        }
    }
}

/// Where a port counts its datagrams ([`super::metrics::ProxyMetrics::udp`]).
#[derive(Clone)]
pub(super) struct UdpMetrics {
    pub(super) up: prometheus::IntCounter,
    pub(super) down: prometheus::IntCounter,
    /// By [`Dropped`], in its order.
    pub(super) dropped: [prometheus::IntCounter; 3],
}

impl UdpMetrics {
    fn dropped(&self, why: Dropped) {
        self.dropped[why as usize].inc();
    }
}

/// The granted UDP ports read now, by port.
#[derive(Default)]
pub(super) struct UdpPorts {
    running: HashMap<u16, Running>,
    /// What their flows share, made with the limits at the first port.
    shares: Option<Shares>,
    /// Fired when the ports close for good (a successor binds them now).
    closed: Trigger,
}

/// One port's socket and the task that reads it (flows included: they end with it).
struct Running {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What every flow of the proxy shares.
#[derive(Clone)]
struct Shares {
    limits: UdpLimits,
    /// A permit per flow, [`UdpLimits::flows`] in all (as the public listeners' clients).
    flows: Arc<Semaphore>,
    /// Bytes of client datagrams queued in all flows ([`udp::QUEUED_BYTES`]).
    queued: Arc<std::sync::atomic::AtomicUsize>,
}

impl UdpPorts {
    /// The ports read now.
    pub(super) fn ports(&self) -> Vec<u16> {
        self.running.keys().copied().collect()
    }

    /// The sockets' addresses, for the status page.
    pub(super) fn addrs(&self) -> impl Iterator<Item = (&u16, &SocketAddr)> {
        self.running.iter().map(|(port, r)| (port, &r.addr))
    }

    /// Reads each port of `wanted` (on `bind`) not read yet, and closes those no longer
    /// wanted (their flows end). Returns the ports that could not be bound.
    pub(super) fn sync(
        &mut self,
        shared: &Arc<Shared>,
        wanted: &BTreeSet<u16>,
        bind: IpAddr,
        limits: UdpLimits,
    ) -> (bool, Vec<(u16, std::io::Error)>) {
        let before = self.running.len();
        let open = !self.closed.is_fired();
        self.running.retain(|port, _| {
            let keep = open && wanted.contains(port);
            if !keep {
                info!(
                    port,
                    "no agent holding this UDP port is connected: no longer reading it"
                );
            }
            keep
        });
        let mut changed = self.running.len() != before;
        let mut failed = Vec::new();
        let shares = (self.shares)
            .get_or_insert_with(|| Shares {
                limits,
                flows: Arc::new(Semaphore::new(limits.flows.min(Semaphore::MAX_PERMITS))),
                queued: Arc::default(),
            })
            .clone();
        for &port in wanted {
            if !open || self.running.contains_key(&port) {
                continue;
            }
            match bind_udp(SocketAddr::new(bind, port)) {
                Ok(socket) => {
                    let addr = socket.local_addr().unwrap_or(SocketAddr::new(bind, port));
                    info!(%addr, "granted UDP port ready");
                    let serving =
                        serve_port(shared.clone(), Arc::new(socket), port, shares.clone());
                    let closed = self.closed.clone();
                    let serving = async move {
                        tokio::select! {
                            () = serving => {}
                            () = closed.cancelled() => {}
                        }
                    };
                    let task = tokio::spawn(serving.instrument(tracing::info_span!("udp", %addr)));
                    self.running.insert(port, Running { addr, task });
                    changed = true;
                }
                Err(e) => failed.push((port, e)),
            }
        }
        (changed, failed)
    }

    /// Closes every port for good, their flows with them (a successor binds them now, or
    /// the proxy shuts down).
    pub(super) fn close(&self) {
        self.closed.fire();
    }
}

/// A UDP socket on `addr` with room for bursts (the OS may give less).
fn bind_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let socket = crate::tunnel::quic::udp_socket(addr)?;
    UdpSocket::from_std(socket)
}

/// One flow as the port's reader knows it.
struct Flow {
    to: udp::QueueTx,
}

/// Reads the port's datagrams, starting a flow for each new client address.
async fn serve_port(shared: Arc<Shared>, socket: Arc<UdpSocket>, port: u16, shares: Shares) {
    let name = revproxy_ca::ports::udp_name(port);
    let metrics = shared.metrics.udp(port);
    let server = socket.local_addr().ok();
    let mut flows: HashMap<SocketAddr, Flow> = HashMap::new();
    // Per port: a source's flows here do not count against it on other ports.
    let per_source = PerSource::with_exempt(shares.limits.per_source, Vec::new());
    let mut tasks: JoinSet<()> = JoinSet::new();
    let mut clients: HashMap<tokio::task::Id, SocketAddr> = HashMap::new();
    let mut buf = vec![0u8; udp::MAX_PAYLOAD];
    loop {
        let (n, client) = tokio::select! {
            received = socket.recv_from(&mut buf) => match received {
                Ok(received) => received,
                Err(e) => {
                    // An ICMP error for an answer sent earlier: the socket goes on.
                    debug!(error = %e, "reading the port");
                    continue;
                }
            },
            Some(ended) = tasks.join_next_with_id() => {
                let id = match ended {
                    Ok((id, ())) => id,
                    Err(e) => e.id(),
                };
                if let Some(client) = clients.remove(&id) {
                    flows.remove(&client);
                }
                continue;
            }
        };
        let payload = Bytes::copy_from_slice(&buf[..n]);
        if let Some(flow) = flows.get(&client) {
            match flow.to.push(payload) {
                Ok(()) => {}
                Err(udp::NotQueued::Full) => metrics.dropped(Dropped::QueueFull),
                // Its flow found no agent, or just ended.
                Err(udp::NotQueued::Closed) => metrics.dropped(Dropped::NoAgent),
            }
            continue;
        }
        // Both given back as the flow's task ends, however it ends (the port closing
        // aborts it).
        let held = per_source
            .take_counted(client.ip())
            .zip(shares.flows.clone().try_acquire_owned().ok());
        let Some(held) = held else {
            metrics.dropped(Dropped::FlowLimit);
            continue;
        };
        let (to, from) = udp::queue(shares.queued.clone());
        flows.insert(client, Flow { to });
        let start = FlowStart {
            name: name.clone(),
            metrics: metrics.clone(),
            client,
            server,
            first: payload,
            from,
            socket: socket.clone(),
            idle: shares.limits.idle,
        };
        let shared = shared.clone();
        let task = tasks.spawn(async move {
            let _held = held;
            run_flow(&shared, start).await;
        });
        clients.insert(task.id(), client);
    }
}

/// Returns once tunnel `id` no longer serves `name` (revoked, narrowed away, gone): its
/// flows end, and the client's next datagram is a new flow to a tunnel that does. A
/// retired tunnel (its agent moving, renewing) keeps its flows, as it keeps its streams.
async fn no_longer_served(shared: &Shared, name: &str, id: u64) {
    let mut changes = shared.registry.subscribe();
    loop {
        if !shared.registry.serves(id, name) {
            return;
        }
        if changes.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// What a new flow starts with.
struct FlowStart {
    name: String,
    metrics: UdpMetrics,
    client: SocketAddr,
    server: Option<SocketAddr>,
    /// The datagram that started it: sent with the stream's open request.
    first: Bytes,
    /// The client's next datagrams.
    from: udp::QueueRx,
    socket: Arc<UdpSocket>,
    idle: Duration,
}

/// Finds an agent for the flow, opens its stream, and relays until the flow ends.
async fn run_flow(shared: &Arc<Shared>, start: FlowStart) {
    let FlowStart {
        name,
        metrics,
        client,
        server,
        first,
        from,
        socket,
        idle,
    } = start;
    let id = ConnId::new();
    let settings = shared.settings();
    let found = match super::lookup::lookup(shared, &name, &settings, client, id).await {
        Ok((found, _)) => found,
        Err(_) => {
            debug!(%client, host = %name, "no agent serves this UDP port now; datagram dropped");
            return metrics.dropped(Dropped::NoAgent);
        }
    };
    let early = udp::capsule(&first);
    let request = OpenRequest {
        name: &name,
        client,
        server,
        early: &early,
        caller: None,
        tls: None,
    };
    let deadline = tokio::time::Instant::now() + OPEN_TIMEOUT;
    for t in &found.exact {
        let Some((t, slot)) = shared.registry.claim(t, deadline).await else {
            continue;
        };
        let opened = tokio::time::timeout_at(deadline, t.open(&request, &slot)).await;
        let stream = match opened {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                if e.tunnel_is_gone() {
                    shared.registry.retire(t.id);
                }
                // Debug only: any source may cause this at packet rate (counted when no
                // agent takes the flow).
                debug!(%client, host = %name, agent = %t.agent, tunnel = t.id, error = %e, "could not open a UDP flow; trying the next agent");
                continue;
            }
            Err(_) => break,
        };
        debug!(%client, host = %name, agent = %t.agent, tunnel = t.id, "flow open");
        let quic = match (t.quic_connection(), stream.quic_id()) {
            (Some(conn), Some(stream_id)) => Some(QuicPath::join(conn, stream_id, true)),
            _ => None,
        };
        let counts = FlowCounts {
            bytes: shared.metrics.routed(&name),
            up: Some(metrics.up.clone()),
            down: Some(metrics.down.clone()),
        };
        counts.bytes.read(first.len());
        metrics.up.inc();
        let local = Local::Client {
            from,
            socket,
            addr: client,
        };
        let relay = udp::relay(stream.into_duplex(), quic, local, idle, &counts);
        let end = tokio::select! {
            end = relay => end.to_string(),
            () = no_longer_served(shared, &name, t.id) => "its tunnel no longer serves the port".into(),
        };
        debug!(%client, host = %name, agent = %t.agent, %end, "flow done");
        drop(slot);
        return;
    }
    debug!(%client, host = %name, "no agent took the UDP flow within {OPEN_TIMEOUT:?}");
    metrics.dropped(Dropped::NoAgent);
}
