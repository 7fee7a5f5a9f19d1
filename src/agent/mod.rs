//! The agent: runs beside a backend, dials out to the proxy, and serves the streams the
//! proxy opens down its tunnel.
//!
//! [`enroll`] trades a one-time token for an identity (`identity.rs` keeps it on disk).
//! [`Agent::run`] is two halves side by side: the renewal loop (`renew.rs`, a fresh
//! certificate at about 2/3 of each lifetime; `follow.rs` takes up an identity enrolled
//! into the state directory meanwhile) and the tunnels: one supervisor per proxy
//! (`proxies.rs` learns which proxies share the store; `supervisor.rs` keeps one tunnel
//! up: reconnecting with backoff, moving to a renewed certificate or a better transport). Each tunnel is a session (`session.rs`); each stream in it is dialed
//! to a backend from the service map (`backend.rs`).

mod admin;
mod backend;
mod connect;
mod enroll;
mod follow;
mod identity;
mod metrics;
mod pool;
mod proxies;
mod refusal;
mod renew;
mod session;
mod supervisor;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use revproxy_ca::names::{normalize_host, normalize_served};
use tracing::{error, info};

pub use crate::tunnel::Transport;
pub use crate::wire::proxy_header::ProxyProtocol;
pub use backend::ServiceOptions;
pub use connect::ListenError;
pub use enroll::{enroll, EnrollClientError};
pub use follow::IDENTITY_CHECK;
pub use identity::{
    Identity, IdentityError, AGENT_CERT_FILE, AGENT_INFO_FILE, AGENT_KEY_FILE, CA_CERT_FILE,
};
pub use pool::EXTRA_TUNNEL_IDLE;
pub use proxies::{PROXIES_FILE, PROXY_REFRESH};
pub use renew::{renew_once, Clock, SystemClock};

use crate::route::name_matches;
use crate::runtime::shutdown::Trigger;
use crate::tls::TlsError;
use backend::{check_backend, ServiceMap};
use session::SessionCtx;

/// How long open streams may finish after shutdown starts.
pub const DRAIN_GRACE: Duration = Duration::from_secs(30);
/// Longest time between two looks at the wall clock while waiting to renew.
pub const RENEW_CHECK: Duration = Duration::from_secs(60);
/// With `--transport auto`: a QUIC handshake that takes longer means "use h2".
pub const QUIC_FALLBACK_AFTER: Duration = Duration::from_secs(3);
/// With `--transport auto` on h2: how often QUIC is tried again.
pub const QUIC_REPROBE: Duration = Duration::from_secs(30);

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(
        "nothing to do: give at least one --map NAME=HOST:PORT or --connect NAME=LISTEN_ADDR (or [[service]] / [[connect]] in the config)"
    )]
    NoServices,
    #[error("invalid service {0}")]
    InvalidService(String),
    #[error("this agent's certificate does not authorize {name} (it grants: {granted}); ask the operator for a token with {flag}")]
    NotAuthorized {
        name: String,
        granted: String,
        /// The `token create` flag that would grant it.
        flag: String,
    },
    #[error("{0}")]
    Expired(String),
    #[error("the admin listener {0} is not on a loopback address; bind it to 127.0.0.1 or ::1 (the agent's admin listener has no authentication)")]
    AdminNotLocal(std::net::SocketAddr),
    #[error("admin listener: {0}")]
    Admin(#[source] std::io::Error),
    #[error(transparent)]
    Connect(#[from] connect::ListenError),
    #[error("cannot start the tunnels' threads: {0}")]
    Threads(#[source] std::io::Error),
}

/// Builds an [`Agent`].
#[derive(Debug)]
pub struct AgentBuilder {
    state_dir: PathBuf,
    services: Vec<(String, String, ServiceOptions)>,
    server: Option<String>,
    drain_grace: Duration,
    stream_limits: crate::tunnel::StreamLimits,
    clock: Arc<dyn Clock>,
    renew_check: Duration,
    transport: Transport,
    quic_fallback_after: Duration,
    quic_reprobe: Duration,
    extra_tunnel_idle: Duration,
    admin: Option<tokio::net::TcpListener>,
    connects: Vec<connect::ConnectSpec>,
    proxy_refresh: Duration,
}

impl std::fmt::Debug for dyn Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Clock({})", self.now())
    }
}

impl AgentBuilder {
    /// Serves `name` (exact or `*.example.com`) from the backend at `addr` (`host:port`).
    pub fn service(mut self, name: &str, addr: &str) -> Self {
        self.services.push((
            name.to_string(),
            addr.to_string(),
            ServiceOptions::default(),
        ));
        self
    }

    /// Like [`AgentBuilder::service`], served as `options` say.
    pub fn service_with(mut self, name: &str, addr: &str, options: ServiceOptions) -> Self {
        self.services
            .push((name.to_string(), addr.to_string(), options));
        self
    }

    /// Like [`AgentBuilder::service`], and the backend gets a PROXY header (v1 or v2) with
    /// the public client's address before the first byte (`proxy_protocol`).
    pub fn service_with_proxy_protocol(
        self,
        name: &str,
        addr: &str,
        version: ProxyProtocol,
    ) -> Self {
        let options = ServiceOptions {
            proxy_protocol: Some(version),
            ..ServiceOptions::default()
        };
        self.service_with(name, addr, options)
    }

    /// Connects to `addr` instead of the proxy address saved at enrollment.
    pub fn server(mut self, addr: &str) -> Self {
        self.server = Some(addr.to_string());
        self
    }

    /// How long open streams may finish after shutdown starts ([`DRAIN_GRACE`]).
    pub fn drain_grace(mut self, grace: Duration) -> Self {
        self.drain_grace = grace;
        self
    }

    /// How long a backend may accept no bytes before its stream is reset
    /// ([`crate::SEND_TIMEOUT`], 60 s).
    pub fn send_timeout(mut self, timeout: Duration) -> Self {
        self.stream_limits.send_timeout = timeout;
        self
    }

    /// Closes a stream that moved no byte either way for `timeout` (off unless set).
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.stream_limits.idle_timeout = Some(timeout);
        self
    }

    /// The wall clock renewal is scheduled by (tests move it instead of sleeping).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// How often the clock is read while waiting for the renewal time ([`RENEW_CHECK`]).
    pub fn renew_check(mut self, every: Duration) -> Self {
        self.renew_check = every;
        self
    }

    /// The tunnel transport ([`Transport::H2`] unless set).
    pub fn transport(mut self, transport: Transport) -> Self {
        self.transport = transport;
        self
    }

    /// With [`Transport::Auto`]: how long a QUIC handshake may take before the agent
    /// falls back to h2 ([`QUIC_FALLBACK_AFTER`]), and how often it tries QUIC again while
    /// on h2 ([`QUIC_REPROBE`]).
    pub fn quic_fallback(mut self, after: Duration, reprobe: Duration) -> Self {
        self.quic_fallback_after = after;
        self.quic_reprobe = reprobe;
        self
    }

    /// How long the streams must have fitted in one tunnel fewer before the agent retires
    /// an extra tunnel it added while its tunnels were crowded ([`EXTRA_TUNNEL_IDLE`]).
    pub fn extra_tunnel_idle(mut self, idle: Duration) -> Self {
        self.extra_tunnel_idle = idle;
        self
    }

    /// How often the agent asks which proxies to keep a tunnel to ([`PROXY_REFRESH`]).
    pub fn proxy_refresh(mut self, every: Duration) -> Self {
        self.proxy_refresh = every;
        self
    }

    /// Serves metrics, status and readiness on `listener`, which must be on a loopback
    /// address (the agent has no certificate an operator's client could check).
    pub fn admin_listener(mut self, listener: tokio::net::TcpListener) -> Self {
        self.admin = Some(listener);
        self
    }

    /// Reaches `name` for every connection to `listener` (`--connect NAME=LISTEN_ADDR`):
    /// each becomes a stream up to the proxy, which lets it through if this agent's access
    /// rules allow.
    pub fn connect(mut self, name: &str, listener: std::net::TcpListener) -> Self {
        self.connects.push(connect::ConnectSpec {
            name: name.to_string(),
            listener,
        });
        self
    }

    /// Loads the identity and checks every service against the certificate.
    pub fn build(self) -> Result<Agent, AgentError> {
        let identity = Identity::load(&self.state_dir)?;
        let now = self.clock.now();
        if now >= identity.not_after {
            return Err(AgentError::Expired(renew::reenroll_hint(
                &identity,
                &self.state_dir,
                "this agent's certificate has expired",
                now,
            )));
        }
        if self.services.is_empty() && self.connects.is_empty() {
            return Err(AgentError::NoServices);
        }
        let mut connects = Vec::new();
        for mut spec in self.connects {
            spec.name = checked_connect_name(&spec.name)?;
            connects.push(spec);
        }
        let entries = checked_services(&identity, self.services)?;
        if identity.ca_pin().is_none() {
            return Err(IdentityError::Corrupt {
                path: self.state_dir.join(CA_CERT_FILE),
                reason: "not a PEM certificate".into(),
            }
            .into());
        }
        // Fail now, not at the first connection, if the key and certificate do not load.
        identity.credentials()?.client_config(crate::tls::ALPN_H2)?;
        if let Some(admin) = &self.admin {
            let addr = admin.local_addr().map_err(AgentError::Admin)?;
            if !crate::admin::is_local(addr) {
                return Err(AgentError::AdminNotLocal(addr));
            }
        }
        let metrics = Arc::new(metrics::AgentMetrics::new());
        let identity = tokio::sync::watch::channel(Arc::new(identity)).0;
        Ok(Agent {
            admin: self.admin,
            connects,
            connect_reloads: tokio::sync::mpsc::channel(1),
            ctx: Arc::new(SessionCtx {
                server: self
                    .server
                    .unwrap_or_else(|| identity.borrow().server.clone()),
                tunnels_up: tokio::sync::watch::channel(Default::default()).0,
                services: Arc::new(ServiceMap::new(
                    entries,
                    identity.subscribe(),
                    metrics.clone(),
                )),
                metrics,
                up: Arc::default(),
                drain_grace: self.drain_grace,
                stream_limits: self.stream_limits,
                transport: self.transport,
                quic_fallback_after: self.quic_fallback_after,
                quic_reprobe: self.quic_reprobe,
                extra_tunnel_idle: self.extra_tunnel_idle,
                lanes: crate::runtime::lanes::Lanes::shared().map_err(AgentError::Threads)?,
                state_dir: self.state_dir.clone(),
                told: Default::default(),
                proxies_told: tokio::sync::watch::channel(bytes::Bytes::new()).0,
            }),
            identity,
            state_dir: self.state_dir,
            clock: self.clock,
            renew_check: self.renew_check,
            proxy_refresh: self.proxy_refresh,
        })
    }
}

/// Checks services against the certificate: names normalized, backends `HOST:PORT`, and
/// every name one the certificate grants.
fn checked_services(
    identity: &Identity,
    services: Vec<(String, String, ServiceOptions)>,
) -> Result<Vec<backend::Service>, AgentError> {
    let mut entries = Vec::new();
    for (name, addr, options) in services {
        let name =
            normalize_served(&name).map_err(|e| AgentError::InvalidService(e.to_string()))?;
        check_backend(&addr)
            .map_err(|e| AgentError::InvalidService(format!("{name}={addr}: {e}")))?;
        let udp = revproxy_ca::ports::udp_port_of(&name).is_some();
        if udp && (options.proxy_protocol.is_some() || options.h2c) {
            return Err(AgentError::InvalidService(format!(
                "{name}={addr}: proxy_protocol and h2c are for TCP services; a UDP port's \
                 backend gets the datagrams as they came"
            )));
        }
        let authorized = identity
            .hosts
            .iter()
            .any(|h| *h == name || name_matches(h, &name));
        if !authorized {
            let flag = match revproxy_ca::ports::GrantedPort::of(&name) {
                Some(port) => port.flag(),
                None => format!("--host {name}"),
            };
            return Err(AgentError::NotAuthorized {
                name,
                granted: identity.hosts.join(", "),
                flag,
            });
        }
        entries.push(backend::Service {
            pattern: name,
            addr,
            proxy_protocol: options.proxy_protocol,
            h2c: options.h2c,
        });
    }
    Ok(entries)
}

/// A private name to reach (`--connect NAME=...`), lower-cased: an exact host name.
fn checked_connect_name(name: &str) -> Result<String, AgentError> {
    normalize_host(name)
        .ok()
        .filter(|n| !n.starts_with('*'))
        .ok_or_else(|| {
            AgentError::InvalidService(format!("--connect {name}: expected an exact host name"))
        })
}

/// Changes a running agent's services and connect listeners (SIGHUP in `revproxy-agent
/// run`): new streams use the new map, new local connections the new listeners; open
/// streams and the tunnels are untouched.
#[derive(Clone)]
pub struct AgentReloader {
    services: Arc<ServiceMap>,
    identity: tokio::sync::watch::Receiver<Arc<Identity>>,
    connects: tokio::sync::mpsc::Sender<connect::Reload>,
}

impl AgentReloader {
    /// Replaces the services with `services` ((name, backend, options)), checked as
    /// at start against the current certificate, and the connect listeners with
    /// `connects` ((name, listen address): those that stay keep accepting, new ones are
    /// bound, removed ones stop accepting while their connections run on). All or
    /// nothing: on an error nothing changes. Says what changed.
    pub async fn apply(
        &self,
        services: Vec<(String, String, ServiceOptions)>,
        connects: Vec<(String, std::net::SocketAddr)>,
    ) -> Result<String, AgentError> {
        let identity = self.identity.borrow().clone();
        let entries = checked_services(&identity, services)?;
        let connects = (connects.into_iter())
            .map(|(name, listen)| Ok((checked_connect_name(&name)?, listen)))
            .collect::<Result<Vec<_>, AgentError>>()?;
        let (reply, answer) = tokio::sync::oneshot::channel();
        let stopped = || AgentError::InvalidService("the agent is not running".into());
        self.connects
            .send((connects, reply))
            .await
            .map_err(|_| stopped())?;
        let connected = answer
            .await
            .map_err(|_| stopped())?
            .map_err(AgentError::Connect)?;
        let count = entries.len();
        // Proxies ask a tunnel once whether a service speaks h2c: a change reaches them
        // with this agent's next tunnels.
        let before = self.services.entries();
        let h2c_changed: Vec<String> = (entries.iter())
            .filter(|e| {
                let was = before.iter().find(|b| b.pattern == e.pattern);
                was.map_or(e.h2c, |b| b.h2c != e.h2c)
            })
            .map(|e| e.pattern.clone())
            .collect();
        self.services.replace(entries);
        let mut said = format!("{count} service(s); {connected}");
        if !h2c_changed.is_empty() {
            let names = h2c_changed.join(", ");
            tracing::warn!(services = %names, "h2c changed: proxies that terminate these names learn it when this agent's tunnels reconnect (restart the agent)");
            said.push_str(&format!(
                "; h2c changed for {names}: restart the agent for proxies to learn it"
            ));
        }
        Ok(said)
    }
}

/// A configured agent, ready to run.
pub struct Agent {
    ctx: Arc<SessionCtx>,
    admin: Option<tokio::net::TcpListener>,
    connects: Vec<connect::ConnectSpec>,
    /// Where [`AgentReloader::apply`] sends new connect listeners, and where they arrive.
    connect_reloads: (
        tokio::sync::mpsc::Sender<connect::Reload>,
        tokio::sync::mpsc::Receiver<connect::Reload>,
    ),
    /// The current identity; replaced by each renewal.
    identity: tokio::sync::watch::Sender<Arc<Identity>>,
    state_dir: PathBuf,
    clock: Arc<dyn Clock>,
    renew_check: Duration,
    proxy_refresh: Duration,
}

impl Agent {
    /// Starts building an agent from the identity enrolled in `state_dir`.
    pub fn builder(state_dir: impl AsRef<Path>) -> AgentBuilder {
        AgentBuilder {
            state_dir: state_dir.as_ref().to_path_buf(),
            services: Vec::new(),
            server: None,
            drain_grace: DRAIN_GRACE,
            stream_limits: crate::tunnel::StreamLimits::default(),
            clock: Arc::new(SystemClock),
            renew_check: RENEW_CHECK,
            transport: Transport::H2,
            quic_fallback_after: QUIC_FALLBACK_AFTER,
            quic_reprobe: QUIC_REPROBE,
            extra_tunnel_idle: EXTRA_TUNNEL_IDLE,
            admin: None,
            connects: Vec::new(),
            proxy_refresh: PROXY_REFRESH,
        }
    }

    /// A handle that changes the services while the agent runs.
    pub fn reloader(&self) -> AgentReloader {
        AgentReloader {
            services: self.ctx.services.clone(),
            identity: self.identity.subscribe(),
            connects: self.connect_reloads.0.clone(),
        }
    }

    /// The identity the agent runs as now.
    pub fn identity(&self) -> Arc<Identity> {
        self.identity.borrow().clone()
    }

    /// Sees every renewal of the identity.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Arc<Identity>> {
        self.identity.subscribe()
    }

    /// Keeps a tunnel up and the certificate renewed until `shutdown` completes, then
    /// drains. Returns an error only if the agent cannot go on: its certificate expired or
    /// was refused for renewal (the message says how to re-enroll).
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
        let stop = Trigger::default();
        let id = self.identity();
        info!(
            server = %self.ctx.server,
            identity = %id.identity,
            valid_until = %crate::runtime::rfc3339(id.not_after),
            "agent starting"
        );
        let admin_stop = Trigger::default();
        let admin = self.admin.map(|listener| {
            let view = Arc::new(admin::AgentView {
                ctx: self.ctx.clone(),
                identity: self.identity.subscribe(),
            });
            tokio::spawn(crate::admin::serve(
                listener,
                view,
                None,
                admin_stop.clone(),
            ))
        });
        // Joined below, not spawned: when `run` is dropped, the connect listeners (and
        // the tunnel links they hold) go with it.
        let connects = connect::serve(
            self.connects,
            self.ctx.up.clone(),
            self.ctx.server.clone(),
            self.identity.subscribe(),
            self.ctx.stream_limits.clone(),
            stop.clone(),
            self.connect_reloads.1,
        );
        let mut fatal = None;
        let renewal = renew::renewal_loop(
            &self.identity,
            &self.state_dir,
            self.clock.as_ref(),
            self.renew_check,
        );
        let follow = follow::follow_state_dir(&self.identity, &self.state_dir, IDENTITY_CHECK);
        let supervise = async {
            tokio::select! {
                e = renewal => {
                    error!("{e}");
                    fatal = Some(e);
                }
                () = follow => {}
                () = shutdown => {}
                () = stop.cancelled() => {}
            }
            stop.fire();
        };
        tokio::join!(
            proxies::keep_tunnels_up(
                self.ctx.clone(),
                self.identity.subscribe(),
                self.state_dir.clone(),
                self.proxy_refresh,
                stop.clone(),
            ),
            supervise,
            connects,
        );
        admin_stop.fire();
        if let Some(admin) = admin {
            let _ = admin.await;
        }
        info!("agent stopped");
        fatal.map_or(Ok(()), Err)
    }
}
