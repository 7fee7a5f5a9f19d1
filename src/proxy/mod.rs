//! The proxy: the agent listener (enrollment now, tunnels on the same port) and, later,
//! the public listeners.
//!
//! [`Proxy::run`] takes already bound listeners and a shutdown future, so embedders and
//! tests bind `127.0.0.1:0` and know the address before anything runs.

mod enroll;
mod public;
pub mod ratelimit;
pub mod registry;
mod tunnels;
pub mod watch;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use revproxy_ca::{Ca, CaError};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_rustls::LazyConfigAcceptor;
use tracing::{debug, info, warn, Instrument};

pub use public::{ListenerKind, Target};
pub(crate) use tunnels::keepalive;

use crate::signal::Trigger;
use crate::tls::{self, TlsError};
use crate::tunnel::quic;
use ratelimit::FailureLimiter;
use registry::Registry;
use watch::StateView;

/// Longest time a TLS handshake on the agent port may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most connections on the agent port at once (enrollments and tunnels).
pub const MAX_AGENT_CONNECTIONS: usize = 4096;
/// Most public client connections at once, over all public listeners.
pub const MAX_CLIENT_CONNECTIONS: usize = 65_536;
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
    #[error("invalid route: {0}")]
    InvalidRoute(String),
    #[error("listener error: {0}")]
    Io(#[from] std::io::Error),
}

/// Builds a [`Proxy`] from a state directory and bound listeners.
#[derive(Debug)]
pub struct ProxyBuilder {
    state_dir: PathBuf,
    agents: Option<TcpListener>,
    public: Vec<(TcpListener, ListenerKind)>,
    routes: HashMap<String, String>,
    max_enroll_failures: u32,
    enroll_failure_window: Duration,
    peek_timeout: Duration,
    shutdown_grace: Duration,
    quic: QuicListener,
}

/// Where the proxy listens for QUIC tunnels.
#[derive(Debug, Default)]
enum QuicListener {
    /// UDP on the agent listener's address (the default).
    #[default]
    SamePort,
    Socket(std::net::UdpSocket),
    Off,
}

impl ProxyBuilder {
    /// The listener agents connect to (enrollment and tunnels).
    pub fn agent_listener(mut self, listener: TcpListener) -> Self {
        self.agents = Some(listener);
        self
    }

    /// Takes QUIC tunnels on `socket` instead of UDP at the agent listener's address.
    pub fn quic_listener(mut self, socket: std::net::UdpSocket) -> Self {
        self.quic = QuicListener::Socket(socket);
        self
    }

    /// Takes no QUIC tunnels (agents use h2 only).
    pub fn without_quic(mut self) -> Self {
        self.quic = QuicListener::Off;
        self
    }

    /// A public listener that routes on TLS SNI.
    pub fn sni_listener(self, listener: TcpListener) -> Self {
        self.listener(listener, ListenerKind::Sni)
    }

    /// A public listener that routes on the HTTP `Host` header.
    pub fn http_listener(self, listener: TcpListener) -> Self {
        self.listener(listener, ListenerKind::Http)
    }

    /// A public listener of any kind.
    pub fn listener(mut self, listener: TcpListener, kind: ListenerKind) -> Self {
        self.public.push((listener, kind));
        self
    }

    /// A static route: `name` goes to the TCP backend `addr` (`host:port`) whenever no live
    /// agent serves it.
    pub fn route(mut self, name: &str, addr: &str) -> Self {
        self.routes
            .insert(name.to_ascii_lowercase(), addr.to_string());
        self
    }

    /// Failed enrollments allowed per source address within `window` before it gets
    /// HTTP 429 for the rest of the window.
    pub fn enroll_failure_limit(mut self, max_failures: u32, window: Duration) -> Self {
        self.max_enroll_failures = max_failures;
        self.enroll_failure_window = window;
        self
    }

    /// How long a public client may take to say where it is going ([`PEEK_TIMEOUT`]).
    pub fn peek_timeout(mut self, timeout: Duration) -> Self {
        self.peek_timeout = timeout;
        self
    }

    /// How long client connections may drain after shutdown starts ([`SHUTDOWN_GRACE`]).
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.shutdown_grace = grace;
        self
    }

    /// Opens the CA and prepares TLS. Nothing is accepted until [`Proxy::run`].
    pub fn build(self) -> Result<Proxy, ProxyError> {
        let agents = self.agents.ok_or(ProxyError::NoAgentListener)?;
        for (name, addr) in &self.routes {
            if let Ok(Target::Tcp(_)) | Err(_) = Target::parse(name) {
                return Err(ProxyError::InvalidRoute(format!(
                    "{name:?} is not a host name"
                )));
            }
            Target::parse(&format!("tcp://{addr}")).map_err(ProxyError::InvalidRoute)?;
        }
        let ca = Ca::open(&self.state_dir)?;
        let state = StateView::load(ca.state().clone())?;
        let (chain, key) = ca.server_identity(time::OffsetDateTime::now_utc())?;
        let server_cert = tls::ServerCert::new(&chain, &key)?;
        let enroll_config =
            tls::agent_listener_config(server_cert.clone(), ca.cert_der(), &[tls::ALPN_HTTP1])?;
        let revocations = state.clone();
        let is_revoked: Arc<dyn Fn(&str) -> bool + Send + Sync> =
            Arc::new(move |serial| revocations.get().revoked.contains(serial));
        let tunnel_config =
            tls::tunnel_listener_config(server_cert.clone(), ca.cert_der(), is_revoked.clone())?;
        let quic = match self.quic {
            QuicListener::Off => None,
            QuicListener::SamePort => {
                Some(quic::udp_socket(agents.local_addr()?).map_err(|e| {
                    std::io::Error::new(
                        e.kind(),
                        format!(
                            "cannot listen for QUIC on udp {}: {e}",
                            agents.local_addr().map_or("?".into(), |a| a.to_string())
                        ),
                    )
                })?)
            }
            QuicListener::Socket(socket) => Some(socket),
        };
        let quic = match quic {
            Some(socket) => {
                let mut config =
                    tls::tunnel_listener_config(server_cert.clone(), ca.cert_der(), is_revoked)?;
                config.alpn_protocols = vec![tls::ALPN_QUIC.to_vec()];
                let mut server = quinn::ServerConfig::with_crypto(quic::server_crypto(config));
                server.transport_config(Arc::new(quic::transport_config(quic::Role::Proxy)));
                socket.set_nonblocking(true)?;
                Some(quinn::Endpoint::new(
                    quinn::EndpointConfig::default(),
                    Some(server),
                    socket,
                    Arc::new(quinn::TokioRuntime),
                )?)
            }
            None => None,
        };
        Ok(Proxy {
            shared: Arc::new(Shared {
                ca: Arc::new(ca),
                enroll_gate: tokio::sync::Mutex::new(()),
                limiter: Mutex::new(FailureLimiter::new(
                    self.max_enroll_failures,
                    self.enroll_failure_window,
                )),
                registry: Arc::new(Registry::default()),
                state,
                routes: self.routes,
                peek_timeout: self.peek_timeout,
                close_tunnels: Trigger::default(),
                enroll_config: Arc::new(enroll_config),
                server_cert,
                tunnel_config: Arc::new(tunnel_config),
            }),
            agents,
            quic,
            public: self.public,
            shutdown_grace: self.shutdown_grace,
        })
    }
}

/// State shared by every connection task.
struct Shared {
    ca: Arc<Ca>,
    /// Enrollments run one at a time: each holds the state lock and fsyncs anyway, and
    /// queueing here keeps blocking threads from piling up behind the file lock.
    enroll_gate: tokio::sync::Mutex<()>,
    limiter: Mutex<FailureLimiter>,
    registry: Arc<Registry>,
    state: StateView,
    routes: HashMap<String, String>,
    peek_timeout: Duration,
    /// Fired last during shutdown, once client connections have drained.
    close_tunnels: Trigger,
    enroll_config: Arc<rustls::ServerConfig>,
    tunnel_config: Arc<rustls::ServerConfig>,
    /// The agent listener's certificate, renewed in place.
    server_cert: Arc<tls::ServerCert>,
}

/// A configured proxy, ready to run.
pub struct Proxy {
    shared: Arc<Shared>,
    agents: TcpListener,
    quic: Option<quinn::Endpoint>,
    public: Vec<(TcpListener, ListenerKind)>,
    shutdown_grace: Duration,
}

impl Proxy {
    /// Starts building a proxy whose CA lives in `state_dir`.
    pub fn builder(state_dir: impl AsRef<Path>) -> ProxyBuilder {
        ProxyBuilder {
            state_dir: state_dir.as_ref().to_path_buf(),
            agents: None,
            public: Vec::new(),
            routes: HashMap::new(),
            max_enroll_failures: ratelimit::DEFAULT_MAX_FAILURES,
            enroll_failure_window: ratelimit::DEFAULT_WINDOW,
            peek_timeout: PEEK_TIMEOUT,
            shutdown_grace: SHUTDOWN_GRACE,
            quic: QuicListener::default(),
        }
    }

    /// The agent listener's address.
    pub fn agent_addr(&self) -> std::io::Result<SocketAddr> {
        self.agents.local_addr()
    }

    /// The CA pin agents will see.
    pub fn pin(&self) -> revproxy_ca::Pin {
        self.shared.ca.pin()
    }

    /// A handle that reports which names live tunnels serve, usable while the proxy runs.
    pub fn status(&self) -> ProxyStatus {
        ProxyStatus {
            registry: self.shared.registry.clone(),
        }
    }

    /// Serves until `shutdown` completes. Then it stops accepting, gives client connections
    /// the shutdown grace period to finish, and closes the tunnels last.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), ProxyError> {
        let addr = self.agents.local_addr()?;
        info!(%addr, pin = %self.shared.ca.pin(), "agent listener ready");
        let stop = Trigger::default();
        let grace = self.shutdown_grace;
        let mut loops = JoinSet::new();
        let clients = Arc::new(Semaphore::new(MAX_CLIENT_CONNECTIONS));
        for (listener, kind) in self.public {
            let addr = listener.local_addr()?;
            info!(%addr, kind = ?kind, "public listener ready");
            let shared = self.shared.clone();
            let permits = clients.clone();
            let span = tracing::info_span!("listener", %addr);
            loops.spawn(
                accept_loop(listener, stop.clone(), permits, grace, move |tcp, peer| {
                    public::serve(shared.clone(), kind.clone(), tcp, peer)
                })
                .instrument(span),
            );
        }
        let renewal = tokio::spawn(renew_server_cert(self.shared.clone()));
        let registry = self.shared.registry.clone();
        let watch = tokio::spawn(self.shared.state.clone().watch(move |s| registry.apply(s)));
        let agents = {
            let shared = self.shared.clone();
            let permits = Arc::new(Semaphore::new(MAX_AGENT_CONNECTIONS));
            // Tunnels end on `close_tunnels`, fired after the client connections drained.
            tokio::spawn(accept_loop(
                self.agents,
                stop.clone(),
                permits,
                grace + grace,
                move |tcp, peer| handle_agent_conn(shared.clone(), tcp, peer),
            ))
        };

        let quic = self.quic.clone().map(|endpoint| {
            if let Ok(addr) = endpoint.local_addr() {
                info!(%addr, "QUIC tunnel listener ready (udp)");
            }
            tokio::spawn(quic_accept_loop(
                endpoint,
                self.shared.clone(),
                stop.clone(),
            ))
        });

        shutdown.await;
        info!("shutting down: no new connections; draining open ones");
        stop.fire();
        while loops.join_next().await.is_some() {}
        self.shared.close_tunnels.fire();
        let _ = agents.await;
        if let Some(quic) = quic {
            let _ = quic.await;
        }
        if let Some(endpoint) = &self.quic {
            endpoint.close(
                quinn::VarInt::from_u32(quic::code::CLOSED_BY_PROXY),
                b"proxy shutting down",
            );
            // Let the closes go out and the UDP port be released before returning, so a
            // restarted proxy can bind it again (bounded: peers that vanished don't ack).
            let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        }
        watch.abort();
        renewal.abort();
        Ok(())
    }
}

/// How often the proxy checks whether its own server certificate is due for renewal.
pub const SERVER_CERT_CHECK: Duration = Duration::from_secs(3600);

/// Reissues the agent listener's certificate when a third of its lifetime is left, and
/// serves the new one from the next handshake on: a proxy that runs for years never
/// presents an expired certificate.
async fn renew_server_cert(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(SERVER_CERT_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is now; `build` has just checked
    loop {
        tick.tick().await;
        let ca = shared.ca.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            ca.server_identity(time::OffsetDateTime::now_utc())
        })
        .await;
        let (chain, key) = match loaded {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => {
                warn!(error = %e, "cannot check the server certificate; will try again");
                continue;
            }
            Err(e) => {
                warn!(error = %e, "server certificate check failed");
                continue;
            }
        };
        let served = shared.server_cert.current_der();
        if tls::certs_from_pem(&chain, "server.crt")
            .is_ok_and(|c| c[0].as_ref() != served.as_slice())
        {
            match shared.server_cert.replace(&chain, &key) {
                Ok(()) => info!("server certificate renewed"),
                Err(e) => warn!(error = %e, "cannot load the renewed server certificate"),
            }
        }
    }
}

/// What the running proxy serves, for embedders, health checks and tests.
#[derive(Clone, Debug)]
pub struct ProxyStatus {
    registry: Arc<Registry>,
}

impl ProxyStatus {
    /// How many live tunnels serve `name`.
    pub fn tunnels_for(&self, name: &str) -> usize {
        self.registry.lookup(name).len()
    }

    /// The transports (`"h2"`, `"quic"`) of the live tunnels serving `name`, sorted.
    pub fn transports_for(&self, name: &str) -> Vec<&'static str> {
        let mut kinds: Vec<_> = self
            .registry
            .lookup(name)
            .iter()
            .map(|t| t.transport())
            .collect();
        kinds.sort_unstable();
        kinds
    }

    /// Waits until exactly `count` live tunnels serve `name`, or `timeout` passes; returns
    /// whether it happened.
    pub async fn wait_for_tunnels(&self, name: &str, count: usize, timeout: Duration) -> bool {
        self.wait_until(|| self.tunnels_for(name) == count, timeout)
            .await
    }

    /// Waits until the live tunnels serving `name` run on exactly `transports` (sorted, as
    /// [`Self::transports_for`] gives them), or `timeout` passes; returns whether it did.
    pub async fn wait_for_transports(
        &self,
        name: &str,
        transports: &[&str],
        timeout: Duration,
    ) -> bool {
        self.wait_until(|| self.transports_for(name) == transports, timeout)
            .await
    }

    async fn wait_until(&self, done: impl Fn() -> bool, timeout: Duration) -> bool {
        let mut changes = self.registry.subscribe();
        let wait = async {
            loop {
                if done() {
                    return;
                }
                if changes.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }
}

/// Accepts QUIC tunnels until `stop`, then waits for them to close (they close when the
/// proxy fires `close_tunnels`). At most [`MAX_AGENT_CONNECTIONS`] at once.
async fn quic_accept_loop(endpoint: quinn::Endpoint, shared: Arc<Shared>, stop: Trigger) {
    let permits = Arc::new(Semaphore::new(MAX_AGENT_CONNECTIONS));
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                // A sender must first prove it owns its address (a Retry round trip), so
                // spoofed packets cost one stateless reply each, not a handshake slot.
                if !incoming.remote_address_validated() && incoming.may_retry() {
                    if let Err(e) = incoming.retry() {
                        e.into_incoming().ignore();
                    }
                    continue;
                }
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    warn!(peer = %incoming.remote_address(), "at the QUIC connection limit; refusing");
                    incoming.refuse();
                    continue;
                };
                let shared = shared.clone();
                tasks.spawn(async move {
                    tunnels::serve_quic(shared, incoming).await;
                    drop(permit);
                });
            }
        }
    }
    endpoint.set_server_config(None);
    while tasks.join_next().await.is_some() {}
}

/// Accepts connections until `stop` fires, running `handle` for each in a tracked task;
/// then lets them finish for `grace` and aborts the rest.
async fn accept_loop<F, Fut>(
    listener: TcpListener,
    stop: Trigger,
    permits: Arc<Semaphore>,
    grace: Duration,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            accepted = listener.accept() => {
                let (tcp, peer) = match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    warn!(%peer, "at the connection limit; closing");
                    continue;
                };
                let span = tracing::debug_span!("conn", %peer);
                let work = handle(tcp, peer);
                tasks.spawn(async move {
                    work.await;
                    drop(permit);
                }.instrument(span));
            }
        }
    }
    drop(listener);
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(grace, drain).await.is_err() {
        warn!(
            open = tasks.len(),
            "connections still open after the grace period; closing them"
        );
        tasks.abort_all();
    }
}

async fn handle_agent_conn(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr) {
    let _ = tcp.set_nodelay(true);
    // Look at the ClientHello first: tunnels (ALPN h2) must present a certificate, which
    // is then checked in the handshake itself; enrollment cannot have one yet.
    let handshake = async {
        let io = crate::tunnel::tunnel_io(tcp);
        let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io).await?;
        let tunnel = tls::offers_h2(&start.client_hello());
        let config = if tunnel {
            shared.tunnel_config.clone()
        } else {
            shared.enroll_config.clone()
        };
        Ok::<_, std::io::Error>((tunnel, start.into_stream(config).await?))
    };
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
                ) => warn!(%peer, error = %tls_error, "agent certificate refused"),
                _ => debug!(%peer, error = %e, "TLS handshake failed on the agent port"),
            }
            return;
        }
        Err(_) => {
            debug!(%peer, "TLS handshake timed out on the agent port");
            return;
        }
    };
    if tunnel {
        tunnels::serve(shared, stream, peer).await;
    } else {
        let client_serial = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(|der| tls::cert_serial(der));
        enroll::serve(shared, stream, peer, client_serial).await;
    }
}
