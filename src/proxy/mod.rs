//! The proxy: public listeners in front, the agent port behind, the CA beside.
//!
//! A client connection travels through these files in order: `accept.rs` (the accept
//! loop, connection permits), `public.rs` (peek -> route -> open a tunnel stream ->
//! splice), with `peek.rs` reading its first bytes for a name, `registry.rs` answering
//! "which live tunnels serve this name", `static_route.rs` joining a `tcp://` backend and
//! `replies.rs` telling a refused client why. Tunnels arrive on the agent port
//! (`agent_port.rs`: TLS, then enrollment or a tunnel by ALPN; `quic_port.rs`: QUIC on
//! UDP), are admitted by their certificate and the current grants (`admit.rs`) and
//! registered. Enrollment and renewal are `enroll.rs` (with `ratelimit.rs`); `state.rs`
//! keeps the in-memory view of revocations and grants, and `background.rs` the tasks that
//! keep it and the server certificate fresh. `reload.rs` applies a new configuration
//! (SIGHUP); `upgrade.rs` hands the listening sockets to a successor process (`serve
//! --upgrade`).
//!
//! [`ProxyBuilder`] (`builder.rs`) opens the CA and prepares TLS; [`Proxy::run`] (here)
//! takes already bound listeners and a shutdown future, so embedders and
//! tests bind `127.0.0.1:0` and know the address before anything runs. It owns the
//! shutdown order: stop accepting, let client connections drain, then close tunnels.

mod accept;
mod admin;
mod admit;
mod agent_port;
mod background;
mod builder;
mod enroll;
mod lookup;
mod mesh;
mod metrics;
mod peek;
mod ports;
mod public;
mod quic_port;
mod ratelimit;
mod registry;
mod reload;
mod replies;
mod state;
mod static_route;
mod status;
mod tunnel;
mod udp;
mod upgrade;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use revproxy_ca::{Ca, CaError};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{info, warn};

pub use crate::route::{Cidr, ListenerKind, Target, TargetError};
pub use builder::ProxyBuilder;
pub use reload::{Reload, ReloadError, Reloader};
pub use status::ProxyStatus;
pub use udp::UdpLimits;

use crate::runtime::handover;
use crate::runtime::shutdown::Trigger;
use crate::tls::{self, TlsError};
use agent_port::AgentPort;
use ratelimit::AttemptLimiter;
use registry::Registry;
use state::StateView;

/// Most connections on the agent port at once, per protocol (TCP: enrollments and h2
/// tunnels; UDP: QUIC tunnels) unless configured; lowered to an eighth of the open-file
/// limit (131,060 with the systemd unit's `LimitNOFILE=1048576`).
pub const MAX_AGENT_CONNECTIONS: usize = 131_072;

/// Longest a stopping proxy waits for its QUIC endpoint to let go of the socket, after its
/// tunnels were closed (their closes are bounded at 2 s).
const QUIC_CLOSE_WAIT: Duration = Duration::from_secs(5);
/// Most public client connections at once, over all public listeners; lowered to fit the
/// open-file limit.
pub const MAX_CLIENT_CONNECTIONS: usize = 65_536;
/// Most public connections one source (an IPv4 address or an IPv6 /64) may hold at once:
/// a quarter of one tunnel's streams, so one host can neither take every connection slot
/// nor fill an agent's tunnel, while a NAT of many users still gets plenty.
pub const MAX_CONNECTIONS_PER_SOURCE: usize = 256;
/// Most connections one source may have on the agent port that are not yet a registered
/// tunnel (TLS or QUIC handshakes, enrollment exchanges); established tunnels do not
/// count, so a fleet behind one NAT is not limited.
pub const MAX_HANDSHAKES_PER_SOURCE: usize = 64;
/// File descriptors kept back from the connection caps for listeners, the state files,
/// the log and the resolver.
pub const FD_RESERVE: usize = 64;
/// Public listeners the reserve also makes room for on every lane: each lane accepts
/// with a descriptor of its own (`reload::PublicListeners::start`).
const LISTENERS_PER_LANE_RESERVED: usize = 16;

/// The connection caps in force, sized from the open-file limit at build time.
#[derive(Clone, Copy, Debug)]
struct Limits {
    clients: usize,
    clients_per_source: usize,
    agents: usize,
    handshakes_per_source: usize,
    /// Four addresses' worth, per IPv4 /24 or IPv6 /48.
    handshakes_per_prefix: usize,
    /// TLS handshakes under way at once on the agent port ([`HANDSHAKE_SHARE`]).
    handshakes: usize,
    /// Enrollment exchanges (no client certificate) at once ([`ENROLLMENT_SHARE`]).
    enrollments: usize,
}

/// The part of the agent port's connections that may be in their TLS handshake at once:
/// half. Each takes at most the handshake timeout; agents with certificates then hold the
/// rest, so handshakes that never finish cannot take their room.
const HANDSHAKE_SHARE: usize = 2;
/// The part that may be enrollment exchanges at once (anyone may start one: no
/// certificate): an eighth. A proxy enrolls a few agents a minute; a flood of slow
/// enrollments beyond this is closed at once and never holds what tunnels, renewals and
/// mesh channels need.
const ENROLLMENT_SHARE: usize = 8;
/// At most this many handshakes at once however many agents the port holds: each holds
/// a TLS state and its buffers for up to 10 s, and anyone may start one (the shares of
/// the 4,096 connections the port held before it could hold more).
const MAX_HANDSHAKES: usize = 2048;
/// At most this many enrollment exchanges at once, likewise.
const MAX_ENROLLMENTS: usize = 512;

/// The caps a proxy was configured with, before they are fitted to the open-file limit.
#[derive(Clone, Copy, Debug)]
struct Requested {
    clients_per_source: usize,
    handshakes_per_source: usize,
    /// Agent-port connections per protocol; `None`: [`MAX_AGENT_CONNECTIONS`] or an
    /// eighth of the descriptors, whichever is less.
    agents: Option<usize>,
}

impl Limits {
    /// The configured caps, lowered so that together they fit in `fd_limit` descriptors
    /// with [`FD_RESERVE`] to spare, plus the listeners' descriptors on `lanes` lanes:
    /// past that, accepting fails with EMFILE, which would stop the agent port and the
    /// state watch along with the public listeners. The agent port gets an eighth unless
    /// configured, and never more than seven eighths (public clients keep the rest).
    fn sized(requested: Requested, fd_limit: u64, lanes: usize) -> Limits {
        let reserve = FD_RESERVE + lanes * LISTENERS_PER_LANE_RESERVED;
        let usable = (fd_limit as usize).saturating_sub(reserve).max(16);
        let agents = requested
            .agents
            .unwrap_or(MAX_AGENT_CONNECTIONS.min(usable / 8))
            .min(usable - usable / 8)
            .max(1);
        let clients = MAX_CLIENT_CONNECTIONS.min(usable - agents).max(1);
        Limits {
            clients,
            clients_per_source: requested.clients_per_source,
            agents,
            handshakes_per_source: requested.handshakes_per_source,
            handshakes_per_prefix: 4 * requested.handshakes_per_source,
            handshakes: (agents / HANDSHAKE_SHARE).clamp(1, MAX_HANDSHAKES),
            enrollments: (agents / ENROLLMENT_SHARE).clamp(1, MAX_ENROLLMENTS),
        }
    }
}

/// Most tunnels one agent identity may hold at once, draining ones included: one, plus a
/// second while a renewed certificate or a better transport takes over, plus headroom for
/// a restart or a probe. More from one certificate is someone holding the agent port.
pub const MAX_TUNNELS_PER_AGENT: usize = 4;
/// Highest minimum renewal age the builder accepts, in percent of the lifetime: below the
/// earliest point at which an agent asks (two thirds, less 3% of jitter).
const MAX_MIN_RENEWAL_AGE_PERCENT: u8 = 60;
/// How long open client connections get to finish after shutdown starts.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How long a public client may take to send its ClientHello or request head.
pub const PEEK_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the proxy could not start or keep running.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("no agent listener was given to the proxy builder")]
    NoAgentListener,
    #[error("invalid route: {0:?} is not a host name")]
    RouteName(String),
    #[error("invalid route {name}: {source}")]
    RouteTarget {
        name: String,
        #[source]
        source: TargetError,
    },
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("invalid --advertise {0:?}: expected HOST:PORT, the address agents reach this proxy's agent listener at")]
    Advertise(String),
    #[error("upgrade: {0}; this process stopped, the running proxy goes on serving")]
    Upgrade(String),
}

/// State shared by every connection task.
struct Shared {
    ca: Arc<Ca>,
    /// This proxy: its id (in its server certificate) and the address it advertises.
    me: revproxy_ca::ProxyEntry,
    /// The proxies serving from the same store (this one included), as last read: what
    /// agents are told to keep a tunnel to.
    peers: std::sync::RwLock<Vec<revproxy_ca::ProxyEntry>>,
    /// Set when shutdown takes this proxy off the store's list: no heartbeat puts it back.
    withdrawn: std::sync::atomic::AtomicBool,
    /// Enrollments run one at a time: each holds the state lock and fsyncs anyway, and
    /// queueing here keeps blocking threads from piling up behind the file lock.
    enroll_gate: tokio::sync::Mutex<()>,
    /// Renewals queue apart, so that a flood of enrollment attempts (which anyone may
    /// make) cannot starve the renewals of enrolled agents.
    renew_gate: tokio::sync::Mutex<()>,
    /// Failed enrollments per source ([`accept::source_key`]).
    limiter: Mutex<AttemptLimiter<IpAddr>>,
    /// Renewal requests per certificate serial.
    renew_limiter: Mutex<AttemptLimiter<String>>,
    /// Wrong enrollment secrets per token id.
    wrong_secrets: Mutex<AttemptLimiter<String>>,
    /// Part of its lifetime a certificate must have lived before it may be renewed.
    min_renewal_age_percent: u8,
    registry: Arc<Registry>,
    state: StateView,
    /// What routing reads per connection; a reload replaces it.
    settings: std::sync::RwLock<Arc<reload::Settings>>,
    max_tunnels_per_agent: usize,
    /// What the proxy counts, for `/metrics`.
    metrics: Arc<metrics::ProxyMetrics>,
    /// Open mesh streams, cut when a state change no longer allows them.
    mesh: Arc<mesh::Streams>,
    /// One info line per client connection.
    access_log: bool,
    /// Serving: set once every listener runs, cleared when shutdown begins (`/ready`).
    ready: std::sync::atomic::AtomicBool,
    /// When the proxy was built, Unix seconds.
    started: i64,
    /// Public listeners: address and what they route by, for the status page.
    listeners: std::sync::RwLock<Vec<(String, String)>>,
    /// Fired last during shutdown, once client connections have drained.
    close_tunnels: Trigger,
    /// Fired when a successor took the sockets over: mesh channels take no new streams.
    moving: Trigger,
    /// Until then (after an upgrade), a client whose name's agents have not arrived yet
    /// waits for them instead of being told the name is offline.
    hold_until: Option<tokio::time::Instant>,
    enroll_config: Arc<rustls::ServerConfig>,
    tunnel_config: Arc<rustls::ServerConfig>,
    /// The agent listener's certificate, renewed in place.
    server_cert: Arc<tls::ServerCert>,
    /// Where h2 tunnels run, each with its client streams (`runtime::lanes`).
    lanes: crate::runtime::lanes::Lanes,
    /// The TLS configurations of the names this proxy terminates.
    terminator: crate::edge::Terminator,
    /// Where it orders their certificates (`[acme]`), if it does.
    acme: Option<crate::edge::AcmeSettings>,
}

/// Waits until `at`, or forever without one.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl Shared {
    /// The settings in force.
    fn settings(&self) -> Arc<reload::Settings> {
        self.settings.read().expect("settings lock").clone()
    }
}

/// A configured proxy, ready to run.
pub struct Proxy {
    reloader: Reloader,
    reloads: tokio::sync::mpsc::Receiver<reload::Request>,
    shared: Arc<Shared>,
    agent_port: AgentPort,
    limits: Limits,
    public: Vec<(TcpListener, ListenerKind)>,
    shutdown_grace: Duration,
    /// The admin listener, and its TLS when it is not on loopback.
    admin: Option<(TcpListener, Option<crate::admin::AdminTls>)>,
    /// The agent, QUIC and admin sockets, for an upgrade to hand over.
    sockets: Vec<(handover::Described, std::os::fd::OwnedFd)>,
    /// Where successors ask for the sockets.
    handover: Option<handover::Listener>,
    /// Told once this proxy serves, when it took its sockets over.
    upgraded: Option<handover::Confirmation>,
    /// The ports agents may be granted, and where they listen.
    granted_ports: Option<ports::GrantedPorts>,
    /// Granted ports' listeners taken over at an upgrade.
    granted_listeners: Vec<TcpListener>,
}

impl Proxy {
    /// Starts building a proxy whose CA lives in `state_dir`.
    pub fn builder(state_dir: impl AsRef<Path>) -> ProxyBuilder {
        ProxyBuilder::new(state_dir.as_ref())
    }

    /// The agent listener's address.
    pub fn agent_addr(&self) -> std::io::Result<SocketAddr> {
        self.agent_port.addr()
    }

    /// This proxy's id, as its server certificate names it.
    pub fn id(&self) -> &str {
        &self.shared.me.id
    }

    /// The CA pin agents will see.
    pub fn pin(&self) -> revproxy_ca::Pin {
        self.shared.ca.pin()
    }

    /// Hands this proxy's listening sockets to a successor that asks on `listener`
    /// (`serve --upgrade`); once the successor serves, this one stops accepting, moves its
    /// agents there, lets open connections finish and returns from [`Proxy::run`].
    pub fn answer_upgrades(mut self, listener: handover::Listener) -> Self {
        self.handover = Some(listener);
        self
    }

    /// A handle that applies new settings and listeners while the proxy runs.
    pub fn reloader(&self) -> Reloader {
        self.reloader.clone()
    }

    /// A handle that reports which names live tunnels serve, usable while the proxy runs.
    pub fn status(&self) -> ProxyStatus {
        ProxyStatus::new(self.shared.registry.clone())
    }

    /// Serves until `shutdown` completes. Then it stops accepting, gives client connections
    /// the shutdown grace period to finish, and closes the tunnels last.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), ProxyError> {
        let stop = Trigger::default();
        let agents_stopped = Trigger::default();
        let grace = self.shutdown_grace;
        let clients = Arc::new(Semaphore::new(self.limits.clients));
        let per_source = accept::PerSource::with_exempt(
            self.limits.clients_per_source,
            self.shared.settings().trusted_proxies.clone(),
        );
        let mut public =
            reload::PublicListeners::new(self.shared.clone(), clients, per_source, grace);
        for (listener, kind) in self.public {
            public.start(listener, kind)?;
        }
        let background = background::start(self.shared.clone());
        let quic = self.agent_port.quic_endpoints();
        // Tunnels end on `close_tunnels`, fired after the client connections drained.
        let agents = tokio::spawn(self.agent_port.run(
            self.shared.clone(),
            stop.clone(),
            agents_stopped.clone(),
            grace,
            self.limits,
        ));

        let admin_stop = Trigger::default();
        let admin = self.admin.map(|(listener, tls)| {
            let view = Arc::new(admin::ProxyView(self.shared.clone()));
            tokio::spawn(crate::admin::serve(listener, view, tls, admin_stop.clone()))
        });
        self.shared
            .ready
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let mut handover = self.handover;
        // Taken over from a running proxy: it steps aside once told that this one serves,
        // and says so; without that answer this process must not serve beside it.
        // With a QUIC endpoint this process forwards its predecessor's QUIC packets.
        let takes_over_from = quic.is_some();
        let released = match self.upgraded {
            None => Ok(()),
            Some(confirmation) => {
                tokio::task::spawn_blocking(move || confirmation.ready(takes_over_from))
                    .await
                    .unwrap_or(Err(handover::HandoverError::NotReleased))
            }
        };
        if let Err(e) = &released {
            warn!(error = %e, "the old process did not step aside; stopping, it goes on serving");
        } else {
            if let Some((_, switch)) = &quic {
                switch.resume();
            }
            if let Some(listener) = handover.as_mut() {
                if let Err(e) = listener.take_name() {
                    warn!(error = %e, "cannot take the upgrade socket's name; the next upgrade will not find this process");
                }
            }
            if self.shared.hold_until.is_some() {
                info!("serving on the sockets taken over; the old process stops accepting and moves its agents here");
            }
            crate::runtime::notify::ready(self.shared.hold_until.is_some());
        }

        let mut reloads = self.reloads;
        let mut granted = self.granted_ports;
        // Taken over at an upgrade (only with a range: `serve` passes none without).
        let until = self
            .shared
            .hold_until
            .unwrap_or_else(tokio::time::Instant::now);
        for listener in self.granted_listeners {
            let Some(g) = granted.as_mut() else { break };
            match public.adopt_granted(listener) {
                Ok(port) => g.adopted(port, until),
                Err(e) => warn!(error = %e, "cannot accept on a granted port handed over"),
            }
        }
        let mut tunnels_changed = self.shared.registry.subscribe();
        let mut ports_again =
            (granted.as_mut()).and_then(|g| g.sync(&self.shared.registry, &mut public));
        let mut handing_over: Option<upgrade::HandingOver> = None;
        // Whether the successor forwards our QUIC tunnels' packets (`quic/takeover.rs`).
        let mut takes_over = false;
        // Kept across turns of the loop: it reads the request after accepting.
        let mut asking = Box::pin(upgrade::next_successor(handover.as_ref()));
        tokio::pin!(shutdown);
        let upgraded = loop {
            if released.is_err() {
                break false;
            }
            tokio::select! {
                () = &mut shutdown => break false,
                Some(request) = reloads.recv() => match request {
                    reload::Request::Apply(_, reply) if handing_over.is_some() => {
                        self.shared.metrics.reloaded(false);
                        warn!("configuration not reloaded: an upgrade is under way");
                        let _ = reply.send(Err(reload::ReloadError::UpgradeUnderWay));
                    }
                    reload::Request::Apply(new, reply) => {
                        let applied = public.apply(new).await;
                        self.shared.metrics.reloaded(applied.is_ok());
                        match &applied {
                            Ok(what) => info!(%what, "configuration reloaded"),
                            Err(e) => warn!(error = %e, "configuration not reloaded; the running one stays"),
                        }
                        let _ = reply.send(applied);
                    }
                    reload::Request::Invalid(why) => {
                        self.shared.metrics.reloaded(false);
                        warn!(error = %why, "configuration not reloaded; the running one stays");
                    }
                },
                () = public.reap() => {}
                _ = tunnels_changed.changed(), if granted.is_some() => {
                    ports_again = (granted.as_mut()).and_then(|g| g.sync(&self.shared.registry, &mut public));
                }
                () = sleep_until_some(ports_again), if ports_again.is_some() => {
                    ports_again = (granted.as_mut()).and_then(|g| g.sync(&self.shared.registry, &mut public));
                }
                asked = asking.as_mut(), if handing_over.is_none() => {
                    asking.set(upgrade::next_successor(handover.as_ref()));
                    // Before the successor reads the UDP socket: where our QUIC tunnels'
                    // packets will come from (without it they are closed, as before).
                    if let (Ok(_), Some((_, switch))) = (&asked, &quic) {
                        if let Err(e) = switch.prepare_takeover() {
                            warn!(error = %e, "cannot prepare to receive this process's QUIC packets from its successor; its QUIC tunnels will be closed at the upgrade");
                        }
                    }
                    match asked.and_then(|successor| Ok((successor, upgrade::sockets(&self.sockets, &public)?))) {
                        Ok((successor, sockets)) => match upgrade::hand_over(successor, sockets, quic.as_ref().map(|(_, s)| s.clone())) {
                            Ok(under_way) => handing_over = Some(under_way),
                            Err(e) => warn!(error = %e, "cannot serve an upgrade request"),
                        },
                        Err(e) => warn!(error = %e, "cannot serve an upgrade request"),
                    }
                }
                served = upgrade::finished(&mut handing_over) => {
                    self.shared.metrics.upgraded(served.is_some());
                    if let Some(forwarded) = served {
                        takes_over = forwarded;
                        break true;
                    }
                }
            }
        };
        // A hand-over under way ends here: its blocking wait returns, its descriptors close.
        if let Some(under_way) = handing_over.take() {
            under_way.abort();
        }
        self.shared
            .ready
            .store(false, std::sync::atomic::Ordering::Relaxed);
        // No successor is answered any more (after an upgrade the name is the new one's).
        drop(asking);
        drop(handover);
        stop.fire();
        if upgraded {
            info!("the new process serves: no new connections here; agents move to it; open connections drain");
            // The admin socket is the new process's too.
            admin_stop.fire();
            upgrade::step_aside(
                &self.shared,
                &public,
                &agents_stopped,
                quic.as_ref(),
                takes_over,
            )
            .await;
        } else {
            info!("shutting down: no new connections; draining open ones");
        }
        // Our descriptors of the listeners close: after a shutdown a client is refused
        // rather than queued; after an upgrade the new process holds its own.
        drop(self.sockets);
        public.stop_all().await;
        self.shared.close_tunnels.fire();
        let _ = agents.await;
        // The QUIC socket closes before this returns, as the TCP ones do.
        if let Some((endpoints, switch)) = quic {
            drop(endpoints);
            if !switch.closed(QUIC_CLOSE_WAIT).await {
                warn!("a QUIC endpoint still held its socket {QUIC_CLOSE_WAIT:?} after closing");
            }
        }
        drop(background);
        // The successor is this same proxy (same id): it stays on the store's list; and a
        // successor the old process did not let go leaves the list to the old one.
        if !upgraded && released.is_ok() {
            background::withdraw(&self.shared).await;
        }
        admin_stop.fire();
        if let Some(admin) = admin {
            let _ = admin.await;
        }
        released.map_err(|e| ProxyError::Upgrade(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn requested(agents: Option<usize>) -> Requested {
        Requested {
            clients_per_source: MAX_CONNECTIONS_PER_SOURCE,
            handshakes_per_source: MAX_HANDSHAKES_PER_SOURCE,
            agents,
        }
    }

    #[test]
    fn the_agent_port_gets_an_eighth_of_the_descriptors_unless_configured() {
        // 20,000 descriptors, 2 lanes: 19,904 usable.
        let default = Limits::sized(requested(None), 20_000, 2);
        assert_eq!((default.agents, default.clients), (2_488, 17_416));
        let configured = Limits::sized(requested(Some(12_000)), 20_000, 2);
        assert_eq!((configured.agents, configured.clients), (12_000, 7_904));
        assert_eq!(configured.handshakes, MAX_HANDSHAKES);
        assert_eq!(configured.enrollments, MAX_ENROLLMENTS);
        assert_eq!(default.handshakes, 1_244);
        // Public clients keep an eighth whatever is asked.
        let greedy = Limits::sized(requested(Some(1_000_000)), 20_000, 2);
        assert_eq!((greedy.agents, greedy.clients), (17_416, 2_488));
        // The systemd unit's LimitNOFILE: an eighth, just under the cap.
        let large = Limits::sized(requested(None), 1_048_576, 2);
        assert_eq!(large.agents, (1_048_576 - 96) / 8);
        let larger = Limits::sized(requested(None), 4_000_000, 2);
        assert_eq!(larger.agents, MAX_AGENT_CONNECTIONS);
        assert_eq!(large.clients, MAX_CLIENT_CONNECTIONS);
    }
}
