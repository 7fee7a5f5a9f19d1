//! Reloading a running proxy (SIGHUP in `revproxy serve`): the settings that routing reads
//! per connection, and the public listeners. A reload is all or nothing: every new
//! listener is bound before anything changes, and a reload that cannot be applied changes
//! nothing. Listeners that stay keep accepting throughout; open connections and tunnels are
//! untouched (a removed listener stops accepting; its open connections run to their end,
//! or until shutdown).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinSet;
use tracing::{error, info, Instrument};

use revproxy_ca::ports::{GrantedPort, Protocol};

use super::accept::{self, PerSource};
use super::{metrics, public, ListenerKind, Shared, Target};
use crate::route::Cidr;
use crate::runtime::handover::{Described, Role};
use crate::runtime::shutdown::Trigger;
use crate::tunnel::StreamLimits;
use crate::wire::proxy_header::ProxyProtocol;

/// What routing reads for each connection; replaced whole by a reload.
#[derive(Debug)]
pub(super) struct Settings {
    /// Static routes: name → backend `host:port`.
    pub(super) routes: HashMap<String, String>,
    pub(super) peek_timeout: Duration,
    /// Bounds on each public client's socket.
    pub(super) stream_limits: StreamLimits,
    /// Load balancers whose PROXY headers are believed (and required).
    pub(super) trusted_proxies: Vec<Cidr>,
    /// Static backends that get a PROXY header first.
    pub(super) static_proxy_protocol: HashMap<String, ProxyProtocol>,
}

/// A new configuration for a running proxy.
#[derive(Clone, Debug)]
pub struct Reload {
    /// Every public listener wanted: those already running at the same address with the
    /// same kind stay, others are bound, running ones not listed stop accepting.
    pub listeners: Vec<(SocketAddr, ListenerKind)>,
    /// Static routes, name → `host:port`.
    pub routes: Vec<(String, String)>,
    /// Static backends that get a PROXY header.
    pub static_proxy_protocol: Vec<(String, ProxyProtocol)>,
    pub trusted_proxies: Vec<Cidr>,
    pub peek_timeout: Duration,
    pub send_timeout: Duration,
    pub idle_timeout: Option<Duration>,
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("listener {0} would change what it routes by; remove it in one reload and add it back in the next")]
    KindChanged(SocketAddr),
    #[error(transparent)]
    Route(#[from] super::ProxyError),
    #[error("the proxy is not running")]
    NotRunning,
    #[error("an upgrade is under way: the new process reads the configuration")]
    UpgradeUnderWay,
}

/// What a [`Reloader`] asks of the running proxy.
pub(super) enum Request {
    Apply(Reload, oneshot::Sender<Result<String, ReloadError>>),
    /// The new configuration did not even parse: counted, and the running one stays.
    Invalid(String),
}

/// Sends reloads to a running [`super::Proxy`].
#[derive(Clone, Debug)]
pub struct Reloader(pub(super) mpsc::Sender<Request>);

impl Reloader {
    /// Applies `reload` and says what changed, or why nothing did.
    pub async fn reload(&self, reload: Reload) -> Result<String, ReloadError> {
        let (tx, rx) = oneshot::channel();
        self.0
            .send(Request::Apply(reload, tx))
            .await
            .map_err(|_| ReloadError::NotRunning)?;
        rx.await.map_err(|_| ReloadError::NotRunning)?
    }

    /// Reports a new configuration that could not be read (`why`): the proxy logs and
    /// counts it (`revproxy_config_reloads_total{result="error"}`) and keeps running as it
    /// is.
    pub async fn invalid(&self, why: String) {
        let _ = self.0.send(Request::Invalid(why)).await;
    }
}

/// One public listener's accept loop.
struct Running {
    kind: ListenerKind,
    /// Fire to stop accepting.
    stop: Trigger,
    /// Fired by the loop once it accepts no more.
    stopped: Trigger,
    /// A second descriptor of the listening socket, for an upgrade to hand over; dropped
    /// with the entry, so a removed listener's socket closes.
    fd: OwnedFd,
}

/// Fires its trigger when dropped.
struct FiresWhenDropped(Trigger);

impl Drop for FiresWhenDropped {
    fn drop(&mut self) {
        self.0.fire();
    }
}

/// A bound listener made ready to start ([`PublicListeners::prepare`]).
struct Prepared {
    addr: SocketAddr,
    kind: ListenerKind,
    /// For an upgrade to hand over.
    fd: OwnedFd,
    /// A descriptor of the socket for each lane to accept with.
    sockets: Vec<(crate::runtime::lanes::Lane, std::net::TcpListener)>,
}

/// The running public listeners, each an accept loop with a trigger of its own.
pub(super) struct PublicListeners {
    shared: Arc<Shared>,
    clients: Arc<Semaphore>,
    per_source: Arc<PerSource>,
    grace: Duration,
    running: HashMap<SocketAddr, Running>,
    /// The granted TCP ports' listeners ([`super::ports`]), by port.
    granted: HashMap<u16, (SocketAddr, Running)>,
    /// The granted UDP ports' sockets.
    udp: super::udp::UdpPorts,
    /// Fired at shutdown: every accept loop, running or removed, then gives its
    /// connections the grace period.
    shutdown: Trigger,
    tasks: JoinSet<()>,
}

impl PublicListeners {
    pub(super) fn new(
        shared: Arc<Shared>,
        clients: Arc<Semaphore>,
        per_source: Arc<PerSource>,
        grace: Duration,
    ) -> PublicListeners {
        PublicListeners {
            shared,
            clients,
            per_source,
            grace,
            running: HashMap::new(),
            granted: HashMap::new(),
            udp: super::udp::UdpPorts::default(),
            shutdown: Trigger::default(),
            tasks: JoinSet::new(),
        }
    }

    /// Starts accepting on `listener`: one accept loop on each lane (`runtime::lanes`),
    /// all over the same socket. A connection is read and routed on the lane that took it,
    /// and moves only if its tunnel runs on another one: with its tunnel on the same lane,
    /// a client's whole path stays on one thread.
    pub(super) fn start(
        &mut self,
        listener: TcpListener,
        kind: ListenerKind,
    ) -> std::io::Result<()> {
        let prepared = self.prepare(listener, kind)?;
        let (addr, running) = self.launch(prepared);
        self.running.insert(addr, running);
        self.publish();
        Ok(())
    }

    /// Accepts on a granted port's listener taken over from the process this one
    /// upgraded; returns its port.
    pub(super) fn adopt_granted(&mut self, listener: TcpListener) -> std::io::Result<u16> {
        let port = listener.local_addr()?.port();
        let kind = ListenerKind::Fixed(Target::Name(revproxy_ca::ports::tcp_name(port)));
        let prepared = self.prepare(listener, kind)?;
        let launched = self.launch(prepared);
        self.granted.insert(port, launched);
        self.publish();
        Ok(port)
    }

    /// The granted ports listened on now.
    pub(super) fn granted_ports(&self) -> Vec<GrantedPort> {
        let tcp = self.granted.keys().map(|p| GrantedPort::tcp(*p));
        tcp.chain(self.udp.ports().into_iter().map(GrantedPort::udp))
            .collect()
    }

    /// Listens on each port of `wanted` (on `bind`) that has no socket yet, and stops
    /// listening on those no longer wanted (open TCP connections run on; UDP flows end).
    /// Returns the ports that could not be bound (the caller tries again later).
    pub(super) fn sync_granted(
        &mut self,
        wanted: &std::collections::BTreeSet<GrantedPort>,
        bind: std::net::IpAddr,
        udp: super::udp::UdpLimits,
    ) -> Vec<(GrantedPort, std::io::Error)> {
        let port_of = |protocol| {
            (wanted.iter())
                .filter(move |g| g.protocol == protocol)
                .map(|g| g.port)
        };
        let wanted_udp = port_of(Protocol::Udp).collect();
        let (udp_changed, udp_failed) = self.udp.sync(&self.shared, &wanted_udp, bind, udp);
        let mut failed: Vec<_> = (udp_failed.into_iter())
            .map(|(port, e)| (GrantedPort::udp(port), e))
            .collect();
        let wanted: std::collections::BTreeSet<u16> = port_of(Protocol::Tcp).collect();
        let before = self.granted.len();
        let mut started = udp_changed;
        self.granted.retain(|port, (_, running)| {
            let keep = wanted.contains(port);
            if !keep {
                info!(
                    port,
                    "no agent holding this port is connected: no longer listening"
                );
                running.stop.fire();
            }
            keep
        });
        for &port in &wanted {
            if self.granted.contains_key(&port) {
                continue;
            }
            let addr = SocketAddr::new(bind, port);
            let kind = ListenerKind::Fixed(Target::Name(revproxy_ca::ports::tcp_name(port)));
            match crate::runtime::listen(addr).and_then(|l| self.prepare(l, kind)) {
                Ok(prepared) => {
                    let launched = self.launch(prepared);
                    self.granted.insert(port, launched);
                    started = true;
                }
                Err(e) => failed.push((GrantedPort::tcp(port), e)),
            }
        }
        // Called at every registry change: the status page's list only when it moved.
        if started || self.granted.len() != before {
            self.publish();
        }
        failed
    }

    /// What can fail in starting a listener: its address and its descriptors, one for the
    /// hand-over and one per lane.
    fn prepare(&self, listener: TcpListener, kind: ListenerKind) -> std::io::Result<Prepared> {
        let addr = listener.local_addr()?;
        let fd = listener.as_fd().try_clone_to_owned()?;
        let listener = listener.into_std()?;
        let mut sockets = Vec::new();
        for lane in self.shared.lanes.all() {
            sockets.push((lane.clone(), listener.try_clone()?));
        }
        Ok(Prepared {
            addr,
            kind,
            fd,
            sockets,
        })
    }

    /// Starts the accept loops of a prepared listener; nothing here fails. The caller
    /// keeps the returned entry (dropping it closes the socket).
    fn launch(&mut self, prepared: Prepared) -> (SocketAddr, Running) {
        let Prepared {
            addr,
            kind,
            fd,
            sockets,
        } = prepared;
        info!(%addr, kind = %kind.name(), to = kind.target().map(tracing::field::display), lanes = sockets.len(), "public listener ready");
        let stop = Trigger::default();
        let (shared, sources) = (self.shared.clone(), self.per_source.clone());
        let routing = kind.clone();
        let handle = move |tcp, peer, slot| {
            public::serve(
                shared.clone(),
                routing.clone(),
                tcp,
                peer,
                slot,
                sources.clone(),
            )
        };
        let metrics = &self.shared.metrics;
        let counters = accept::AcceptCounters {
            accepted: Some(metrics.accepted(&addr.to_string())),
            over_limit: Some(metrics.refused(metrics::Refused::ConnectionLimit)),
            over_source: Some(metrics.refused(metrics::Refused::SourceLimit)),
            log: Arc::default(),
        };
        let stopped = Trigger::default();
        let mut each_stopped = Vec::new();
        for (lane, socket) in sockets {
            let stopping = accept::Stopping {
                accepting: stop.clone(),
                shutdown: self.shutdown.clone(),
                stopped: Trigger::default(),
            };
            each_stopped.push(stopping.stopped.clone());
            let (clients, per_source) = (self.clients.clone(), self.per_source.clone());
            let (grace, counters, handle) = (self.grace, counters.clone(), handle.clone());
            let loop_ = async move {
                // However the loop ends (a panic too), it accepts no more: an upgrade
                // waiting for that must not wait for its timeout.
                let _stopped = FiresWhenDropped(stopping.stopped.clone());
                // Registered with the lane's runtime, so it must be made there.
                let listener = match TcpListener::from_std(socket) {
                    Ok(listener) => listener,
                    Err(e) => {
                        error!(error = %e, "could not accept on a lane");
                        return;
                    }
                };
                accept::serve(
                    listener, stopping, clients, per_source, grace, counters, handle,
                )
                .await
            };
            let loop_ = loop_.instrument(tracing::info_span!("listener", %addr));
            self.tasks.spawn(lane.run(loop_));
        }
        // The listener has stopped accepting once every lane's loop has.
        let all_stopped = stopped.clone();
        self.tasks.spawn(async move {
            for lane in each_stopped {
                lane.cancelled().await;
            }
            all_stopped.fire();
        });
        (
            addr,
            Running {
                kind,
                stop,
                stopped,
                fd,
            },
        )
    }

    /// The listeners as the status page shows them, granted ports included.
    fn publish(&self) {
        let granted = self.granted.values().map(|(addr, running)| (addr, running));
        let mut list: Vec<(String, String)> = (self.running.iter().chain(granted))
            .map(|(addr, running)| (addr.to_string(), describe(&running.kind)))
            .collect();
        let udp = self.udp.addrs();
        list.extend(udp.map(|(port, addr)| (format!("udp {addr}"), format!("to udp:{port}"))));
        list.sort();
        *self.shared.listeners.write().expect("listeners lock") = list;
    }

    /// Applies `reload`: binds what is new, then (only if every bind worked) stops what is
    /// gone and swaps the settings.
    pub(super) async fn apply(&mut self, reload: Reload) -> Result<String, ReloadError> {
        let routes = super::builder::checked_routes(reload.routes.iter().cloned().collect())?;
        let mut added = Vec::new();
        for (addr, kind) in &reload.listeners {
            match self.running.get(addr) {
                Some(running) if running.kind == *kind => {}
                Some(_) => return Err(ReloadError::KindChanged(*addr)),
                None => {
                    let listener =
                        crate::runtime::listen(*addr).map_err(|source| ReloadError::Bind {
                            addr: *addr,
                            source,
                        })?;
                    let prepared = self.prepare(listener, kind.clone()).map_err(|source| {
                        ReloadError::Bind {
                            addr: *addr,
                            source,
                        }
                    })?;
                    added.push(prepared);
                }
            }
        }
        let wanted: Vec<SocketAddr> = reload.listeners.iter().map(|(a, _)| *a).collect();
        let removed: Vec<SocketAddr> = (self.running.keys())
            .filter(|a| !wanted.contains(a))
            .copied()
            .collect();
        for addr in &removed {
            if let Some(running) = self.running.remove(addr) {
                info!(%addr, "public listener removed: no new connections; open ones run to their end");
                running.stop.fire();
            }
        }
        let count = added.len();
        for prepared in added {
            let (addr, running) = self.launch(prepared);
            self.running.insert(addr, running);
        }
        self.publish();
        self.per_source.set_exempt(reload.trusted_proxies.clone());
        let old = self.shared.settings();
        *self.shared.settings.write().expect("settings lock") = Arc::new(Settings {
            routes,
            peek_timeout: reload.peek_timeout,
            stream_limits: StreamLimits {
                send_timeout: reload.send_timeout,
                idle_timeout: reload.idle_timeout,
                // Sized at start: streams under way hold charges against it.
                budget: old.stream_limits.budget.clone(),
            },
            trusted_proxies: reload.trusted_proxies,
            static_proxy_protocol: reload.static_proxy_protocol.into_iter().collect(),
        });
        let new = self.shared.settings();
        Ok(format!(
            "{count} listener(s) added, {} removed, {} kept; {} route(s) (were {})",
            removed.len(),
            self.running.len() - count,
            new.routes.len(),
            old.routes.len()
        ))
    }

    /// Stops every accept loop (shutdown) and waits for them, connections included (at
    /// most the grace period).
    pub(super) async fn stop_all(mut self) {
        self.shutdown.fire();
        // The sockets close now (their accept loops let go of them at once): a client is
        // refused, not left waiting in a queue nobody reads.
        self.running.clear();
        self.granted.clear();
        self.udp.close();
        while self.tasks.join_next().await.is_some() {}
    }

    /// The listening sockets, granted ports' too, for an upgrade to hand over (a descriptor of
    /// each).
    pub(super) fn sockets(&self) -> std::io::Result<Vec<(Described, OwnedFd)>> {
        let granted = self.granted.values().map(|(addr, running)| (addr, running));
        (self.running.iter().chain(granted))
            .map(|(addr, running)| {
                let described = Described {
                    role: Role::Public,
                    addr: *addr,
                };
                Ok((described, running.fd.try_clone()?))
            })
            .collect()
    }

    /// Stops accepting on every listener (an upgrade: the new process accepts now) and
    /// returns once none will accept again. Open connections run on until
    /// [`Self::stop_all`].
    pub(super) async fn stop_accepting(&self) {
        // A UDP port has no queue to hand over: its socket closes, the successor binds it.
        self.udp.close();
        let all = || (self.running.values()).chain(self.granted.values().map(|(_, r)| r));
        for running in all() {
            running.stop.fire();
        }
        for running in all() {
            running.stopped.cancelled().await;
        }
    }

    /// Reaps accept loops of removed listeners that have finished.
    pub(super) async fn reap(&mut self) {
        if self.tasks.join_next().await.is_none() {
            std::future::pending::<()>().await;
        }
    }
}

/// What a listener routes by, as the status page says it.
pub(super) fn describe(kind: &ListenerKind) -> String {
    match kind {
        ListenerKind::Sni => "sni".to_string(),
        ListenerKind::Http => "http".to_string(),
        ListenerKind::Fixed(Target::Name(name)) => format!("to {name}"),
        ListenerKind::Fixed(Target::Tcp(addr)) => format!("to tcp://{addr}"),
    }
}
