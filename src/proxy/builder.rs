//! Building a [`Proxy`]: the builder's settings and defaults, and `build`, which opens
//! the CA, prepares TLS and sizes the connection caps. Running it is in `mod.rs`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tracing::{info, warn};

use super::{
    admin, metrics, quic_port, ratelimit, reload, upgrade, AgentPort, AttemptLimiter, Limits,
    ListenerKind, Proxy, ProxyError, Registry, Shared, StateView, Target,
};
use super::{Reloader, MAX_MIN_RENEWAL_AGE_PERCENT, PEEK_TIMEOUT, SHUTDOWN_GRACE};
use super::{MAX_CONNECTIONS_PER_SOURCE, MAX_HANDSHAKES_PER_SOURCE, MAX_TUNNELS_PER_AGENT};
use crate::runtime::handover;
use crate::runtime::shutdown::Trigger;
use crate::{tls, tunnel};

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
    stream_limits: tunnel::StreamLimits,
    stream_buffer_budget: Option<u64>,
    max_tunnels_per_agent: usize,
    max_connections_per_source: usize,
    max_handshakes_per_source: usize,
    max_agent_connections: Option<usize>,
    min_renewal_age_percent: u8,
    shutdown_grace: Duration,
    quic: QuicListener,
    admin: Option<TcpListener>,
    access_log: bool,
    store: Option<crate::store::StoreUrl>,
    advertise: Option<String>,
    trusted_proxies: Vec<crate::route::Cidr>,
    acme: Option<crate::edge::AcmeSettings>,
    static_proxy_protocol: HashMap<String, crate::wire::proxy_header::ProxyProtocol>,
    upgraded: Option<handover::Confirmation>,
    granted_ports: Option<(revproxy_ca::ports::PortRange, std::net::IpAddr)>,
    /// Granted ports' listeners taken over at an upgrade.
    granted_listeners: Vec<TcpListener>,
    udp_limits: super::UdpLimits,
}

/// Where the proxy listens for QUIC tunnels.
#[derive(Debug, Default)]
enum QuicListener {
    /// UDP on the agent listener's address (the default).
    #[default]
    SamePort,
    /// A socket the caller bound: more join it, one per lane, if it shares its port.
    Socket(std::net::UdpSocket),
    /// The QUIC port's group as an upgrade hands it over, in its order.
    Group(Vec<std::net::UdpSocket>),
    Off,
}

impl ProxyBuilder {
    /// The defaults ([`Proxy::builder`]).
    pub(super) fn new(state_dir: &Path) -> ProxyBuilder {
        ProxyBuilder {
            state_dir: state_dir.to_path_buf(),
            agents: None,
            public: Vec::new(),
            routes: HashMap::new(),
            max_enroll_failures: ratelimit::DEFAULT_MAX_FAILURES,
            min_renewal_age_percent: revproxy_ca::MIN_RENEWAL_AGE_PERCENT,
            admin: None,
            access_log: false,
            enroll_failure_window: ratelimit::DEFAULT_WINDOW,
            peek_timeout: PEEK_TIMEOUT,
            stream_limits: tunnel::StreamLimits::default(),
            stream_buffer_budget: None,
            max_tunnels_per_agent: MAX_TUNNELS_PER_AGENT,
            max_connections_per_source: MAX_CONNECTIONS_PER_SOURCE,
            max_handshakes_per_source: MAX_HANDSHAKES_PER_SOURCE,
            max_agent_connections: None,
            shutdown_grace: SHUTDOWN_GRACE,
            quic: QuicListener::default(),
            store: None,
            advertise: None,
            trusted_proxies: Vec::new(),
            acme: None,
            static_proxy_protocol: HashMap::new(),
            upgraded: None,
            granted_ports: None,
            udp_limits: super::UdpLimits::default(),
            granted_listeners: Vec::new(),
        }
    }

    /// A granted port's listener handed over by the process this one upgrades
    /// (`serve --upgrade`): accepted on at once, kept while the agents move here.
    pub fn granted_listener(mut self, listener: TcpListener) -> Self {
        self.granted_listeners.push(listener);
        self
    }

    /// The public ports agents may be granted (`ports`), listened on at `bind`
    /// (`ports_bind`) while an agent holding one is connected (DESIGN.md section 11).
    /// Recorded in the store for `token create --tcp-port` to check against.
    pub fn granted_ports(
        mut self,
        range: revproxy_ca::ports::PortRange,
        bind: std::net::IpAddr,
    ) -> Self {
        self.granted_ports = Some((range, bind));
        self
    }

    /// How flows on granted UDP ports are bounded.
    pub fn udp_limits(mut self, limits: super::UdpLimits) -> Self {
        self.udp_limits = limits;
        self
    }

    /// The listener agents connect to (enrollment and tunnels).
    pub fn agent_listener(mut self, listener: TcpListener) -> Self {
        self.agents = Some(listener);
        self
    }

    /// Takes QUIC tunnels on `socket` (already bound) instead of UDP at the agent
    /// listener's address. Its buffers are enlarged as on the default socket. If it was
    /// bound with `SO_REUSEPORT`, the proxy binds more sockets at its address, one per lane
    /// in all, each read by an endpoint on its lane (as on the default port); otherwise
    /// one endpoint reads it.
    pub fn quic_listener(mut self, socket: std::net::UdpSocket) -> Self {
        self.quic = QuicListener::Socket(socket);
        self
    }

    /// Takes QUIC tunnels on exactly these sockets, an endpoint on each: the QUIC port's
    /// group of a running proxy, in the order its upgrade hands them over
    /// (`handover::Inherited::udp`).
    pub fn quic_listeners(mut self, group: Vec<std::net::UdpSocket>) -> Self {
        self.quic = match group.is_empty() {
            true => QuicListener::SamePort,
            false => QuicListener::Group(group),
        };
        self
    }

    /// Serves metrics, status and readiness on `listener`: plain HTTP on loopback; on any
    /// other address TLS that admits operator certificates only (`crate::admin`).
    pub fn admin_listener(mut self, listener: TcpListener) -> Self {
        self.admin = Some(listener);
        self
    }

    /// Logs one line per client connection at info (at debug otherwise): who, which
    /// name, served by whom, the outcome, bytes each way and how long.
    pub fn access_log(mut self, on: bool) -> Self {
        self.access_log = on;
        self
    }

    /// Keeps the CA state in the store at `url` (`postgres://...`, shared with other
    /// proxies) instead of `state.json` in the state directory.
    pub fn store(mut self, url: &str) -> Self {
        self.store = Some(crate::store::StoreUrl(url.to_string()));
        self
    }

    /// Tells agents to reach this proxy at `addr` (`host:port`); by default the agent
    /// listener's address, unless that is a wildcard.
    pub fn advertise(mut self, addr: &str) -> Self {
        self.advertise = Some(addr.to_string());
        self
    }

    /// Orders the certificates of terminated names from the ACME CA in `settings`
    /// (`[acme]`); without it the proxy orders nothing but still answers the challenges
    /// other proxies on its store publish.
    pub fn acme(mut self, settings: crate::edge::AcmeSettings) -> Self {
        self.acme = Some(settings);
        self
    }

    /// Connections to public listeners from these sources (load balancers) must start
    /// with a PROXY header (v1 or v2); the client it names is the client. A header from
    /// any other source is never believed.
    pub fn trusted_proxies(mut self, nets: Vec<crate::route::Cidr>) -> Self {
        self.trusted_proxies = nets;
        self
    }

    /// The static backend `addr` (`host:port`, of a route or a fixed `tcp://` listener)
    /// gets a PROXY header with the client's address before the first byte.
    pub fn static_proxy_protocol(
        mut self,
        addr: &str,
        version: crate::wire::proxy_header::ProxyProtocol,
    ) -> Self {
        self.static_proxy_protocol.insert(addr.to_string(), version);
        self
    }

    /// This proxy took its listeners over from a running one ([`handover::take_over`]):
    /// once it serves it says so through `confirmation`, and for a while holds clients of
    /// names whose agents have not moved here yet (10 s).
    pub fn upgraded(mut self, confirmation: handover::Confirmation) -> Self {
        self.upgraded = Some(confirmation);
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

    /// A static route: `name` goes to the TCP backend `addr` (`host:port`) when no live
    /// agent is granted exactly `name` (it comes before agents holding a wildcard).
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

    /// How long a client may accept no bytes before its stream is reset and its connection
    /// closed ([`crate::SEND_TIMEOUT`], 60 s).
    pub fn send_timeout(mut self, timeout: Duration) -> Self {
        self.stream_limits.send_timeout = timeout;
        self
    }

    /// Closes a client's stream that moved no byte either way for `timeout` (off unless
    /// set).
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.stream_limits.idle_timeout = Some(timeout);
        self
    }

    /// What all streams together may hold of bytes their clients have not taken yet
    /// (default: a sixteenth of memory, between 64 MiB and 1 GiB). Kept by narrowing the
    /// streams' windows as they multiply; it ends no stream.
    pub fn stream_buffer_budget(mut self, bytes: u64) -> Self {
        self.stream_buffer_budget = Some(bytes);
        self
    }

    /// Most public connections one source address may hold at once
    /// ([`MAX_CONNECTIONS_PER_SOURCE`]).
    pub fn max_connections_per_source(mut self, max: usize) -> Self {
        self.max_connections_per_source = max;
        self
    }

    /// Most handshakes one source address may have under way on the agent port
    /// ([`MAX_HANDSHAKES_PER_SOURCE`]).
    pub fn max_handshakes_per_source(mut self, max: usize) -> Self {
        self.max_handshakes_per_source = max;
        self
    }

    /// Most connections on the agent port at once, per protocol (default
    /// [`MAX_AGENT_CONNECTIONS`](super::MAX_AGENT_CONNECTIONS) or an eighth of the
    /// open-file limit, whichever is less); lowered to seven eighths of the open-file
    /// limit, with a warning.
    pub fn max_agent_connections(mut self, max: usize) -> Self {
        self.max_agent_connections = Some(max);
        self
    }

    /// Most tunnels one agent identity may hold at once ([`MAX_TUNNELS_PER_AGENT`]).
    pub fn max_tunnels_per_agent(mut self, max: usize) -> Self {
        self.max_tunnels_per_agent = max;
        self
    }

    /// Part of its lifetime, in percent, a certificate must have lived before the proxy
    /// renews it ([`revproxy_ca::MIN_RENEWAL_AGE_PERCENT`]); at most 60, below the earliest
    /// point at which an agent asks (two thirds, less 3% of jitter). Tests that run many
    /// renewals of one agent within seconds lower it.
    pub fn min_renewal_age_percent(mut self, percent: u8) -> Self {
        self.min_renewal_age_percent = percent.min(MAX_MIN_RENEWAL_AGE_PERCENT);
        self
    }

    /// How long client connections may drain after shutdown starts ([`SHUTDOWN_GRACE`]).
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.shutdown_grace = grace;
        self
    }

    /// Opens the CA and prepares TLS. Nothing is accepted until [`Proxy::run`].
    pub fn build(mut self) -> Result<Proxy, ProxyError> {
        let agents = self.agents.ok_or(ProxyError::NoAgentListener)?;
        let routes = checked_routes(self.routes)?;
        let advertise = match self.advertise {
            Some(addr) => {
                Some(revproxy_ca::validate_server(&addr).map_err(|_| ProxyError::Advertise(addr))?)
            }
            None => Some(agents.local_addr()?)
                .filter(|a| !a.ip().is_unspecified())
                .map(|a| a.to_string()),
        };
        let ca = crate::store::open_ca(&self.state_dir, self.store.as_ref().map(|u| u.0.as_str()))?;
        let state = StateView::load(ca.state().clone())?;
        let identity = ca.server_identity(
            time::OffsetDateTime::now_utc(),
            advertise.as_deref().map(advertised_host),
        )?;
        // For `token create` to name where agents really reach this proxy.
        if let Err(e) =
            ca.record_agent_listener(&agents.local_addr()?.to_string(), advertise.as_deref())
        {
            warn!(error = %e, "cannot record the agent listener's address; tokens name the one chosen at `ca init`");
        }
        if let Some((range, _)) = self.granted_ports {
            if let Err(e) = ca.record_ports(range) {
                warn!(error = %e, %range, "cannot record the ports agents may be granted; `token create --tcp-port` checks against the range recorded before");
            }
        }
        let server_cert = tls::ServerCert::new(&identity.chain_pem, &identity.key_pem)?;
        let enroll_config =
            tls::agent_listener_config(server_cert.clone(), ca.cert_der(), &[tls::ALPN_HTTP1])?;
        let revocations = state.clone();
        let is_revoked: Arc<dyn Fn(&str) -> bool + Send + Sync> =
            Arc::new(move |serial| revocations.get().revoked.contains(serial));
        let tunnel_config =
            tls::tunnel_listener_config(server_cert.clone(), ca.cert_der(), is_revoked)?;
        let lanes = crate::runtime::lanes::Lanes::shared()?;
        let quic_sockets = match self.quic {
            QuicListener::Off => Vec::new(),
            QuicListener::SamePort => {
                quic_port::quic_sockets(agents.local_addr()?, lanes.all().len())?
            }
            QuicListener::Socket(socket) => {
                let group = tunnel::quic::steer::grow(socket, lanes.all().len())?;
                (group.into_iter().map(tunnel::quic::tune_udp_socket)).collect::<Result<_, _>>()?
            }
            QuicListener::Group(group) => (group.into_iter())
                .map(tunnel::quic::tune_udp_socket)
                .collect::<Result<_, _>>()?,
        };
        // A second descriptor of each fixed listener, for an upgrade to hand over.
        let mut sockets = vec![upgrade::described(
            handover::Role::Agents,
            &agents,
            agents.local_addr()?,
        )?];
        for socket in &quic_sockets {
            sockets.push(upgrade::described(
                handover::Role::Quic,
                socket,
                socket.local_addr()?,
            )?);
        }
        if let Some(admin) = &self.admin {
            sockets.push(upgrade::described(
                handover::Role::Admin,
                admin,
                admin.local_addr()?,
            )?);
        }
        let quic = quic_port::QuicSetup {
            sockets: quic_sockets,
            tls: tunnel_config.clone(),
            reading: self.upgraded.is_none(),
            reset_secret: &quic_secret(&self.state_dir)?,
            state_dir: &self.state_dir,
        };
        let agent_port = AgentPort::new(agents, quic, &lanes)?;
        // Beyond loopback the admin listener takes operator certificates only.
        let admin_tls = match &self.admin {
            Some(admin) if !crate::admin::is_local(admin.local_addr()?) => {
                let revocations = state.clone();
                let is_revoked: Arc<dyn Fn(&str) -> bool + Send + Sync> =
                    Arc::new(move |serial| revocations.get().revoked.contains(serial));
                let config =
                    tls::admin_listener_config(server_cert.clone(), ca.cert_der(), is_revoked)?;
                Some(crate::admin::AdminTls {
                    config: Arc::new(config),
                    authorize: admin::authorize_operator(state.clone(), ca.operator_identity("")),
                    still: admin::operator_still_admitted(state.clone()),
                })
            }
            _ => None,
        };
        let listeners = self
            .public
            .iter()
            .map(|(l, kind)| Ok((l.local_addr()?.to_string(), reload::describe(kind))))
            .collect::<Result<Vec<_>, std::io::Error>>()?;
        let fd_limit = crate::runtime::fd_limit();
        let limits = Limits::sized(
            super::Requested {
                clients_per_source: self.max_connections_per_source,
                handshakes_per_source: self.max_handshakes_per_source,
                agents: self.max_agent_connections,
            },
            fd_limit,
            crate::runtime::lanes::Lanes::shared()?.all().len(),
        );
        if let Some(asked) = self.max_agent_connections.filter(|&n| n > limits.agents) {
            warn!(
                asked,
                agents = limits.agents,
                fd_limit,
                "max_agent_connections is more than the open-file limit allows (the agent \
                 port takes at most seven eighths of it): raise the limit (LimitNOFILE= in \
                 a systemd unit) to hold that many"
            );
        }
        info!(
            fd_limit,
            clients = limits.clients,
            clients_per_source = limits.clients_per_source,
            agents = limits.agents,
            handshakes = limits.handshakes,
            handshakes_per_source = limits.handshakes_per_source,
            handshakes_per_prefix = limits.handshakes_per_prefix,
            enrollments = limits.enrollments,
            "connection caps"
        );
        let metrics = Arc::new(metrics::ProxyMetrics::new());
        // Shown as revproxy_stream_buffer_budget_bytes; each window change is logged.
        let budget = (self.stream_buffer_budget).unwrap_or_else(tunnel::default_budget);
        self.stream_limits.budget = Arc::new(metrics.stream_buffer_budget(budget));
        metrics.ensure_reloads();
        let (reloader, reloads) = tokio::sync::mpsc::channel(1);
        Ok(Proxy {
            reloader: Reloader(reloader),
            reloads,
            shared: Arc::new(Shared {
                terminator: crate::edge::Terminator::new(ca.sealer()),
                acme: self.acme,
                ca: Arc::new(ca),
                me: revproxy_ca::ProxyEntry {
                    id: identity.proxy_id,
                    address: advertise,
                },
                peers: std::sync::RwLock::default(),
                withdrawn: std::sync::atomic::AtomicBool::new(false),
                enroll_gate: tokio::sync::Mutex::new(()),
                renew_gate: tokio::sync::Mutex::new(()),
                limiter: Mutex::new(AttemptLimiter::new(
                    self.max_enroll_failures,
                    self.enroll_failure_window,
                )),
                renew_limiter: Mutex::new(AttemptLimiter::new(
                    ratelimit::RENEWALS_PER_WINDOW,
                    ratelimit::RENEWAL_WINDOW,
                )),
                wrong_secrets: Mutex::new(AttemptLimiter::new(
                    ratelimit::WRONG_SECRETS_PER_TOKEN,
                    ratelimit::WRONG_SECRET_WINDOW,
                )),
                min_renewal_age_percent: self.min_renewal_age_percent,
                registry: Arc::new(Registry::default()),
                state,
                settings: std::sync::RwLock::new(Arc::new(reload::Settings {
                    routes,
                    peek_timeout: self.peek_timeout,
                    stream_limits: self.stream_limits,
                    trusted_proxies: self.trusted_proxies,
                    static_proxy_protocol: self.static_proxy_protocol,
                })),
                max_tunnels_per_agent: self.max_tunnels_per_agent,
                metrics,
                mesh: Arc::default(),
                ready: std::sync::atomic::AtomicBool::new(false),
                access_log: self.access_log,
                started: time::OffsetDateTime::now_utc().unix_timestamp(),
                listeners: std::sync::RwLock::new(listeners),
                close_tunnels: Trigger::default(),
                moving: Trigger::default(),
                lanes: crate::runtime::lanes::Lanes::shared()?,
                hold_until: self
                    .upgraded
                    .as_ref()
                    .map(|_| tokio::time::Instant::now() + upgrade::HOLD),
                enroll_config: Arc::new(enroll_config),
                server_cert,
                tunnel_config: Arc::new(tunnel_config),
            }),
            agent_port,
            limits,
            public: self.public,
            shutdown_grace: self.shutdown_grace,
            admin: self.admin.map(|listener| (listener, admin_tls)),
            sockets,
            handover: None,
            upgraded: self.upgraded,
            granted_ports: (self.granted_ports)
                .map(|(range, bind)| super::ports::GrantedPorts::new(range, bind, self.udp_limits)),
            granted_listeners: self.granted_listeners,
        })
    }
}

/// File in the state directory holding the secret QUIC's stateless resets and connection
/// IDs are derived from (`tunnel::quic::proxy::endpoint_config`): 32 random bytes, 0600,
/// made at the first start and kept, so that a restarted or upgraded proxy's resets are
/// accepted by the agents of the one before.
pub(crate) const QUIC_SECRET_FILE: &str = "quic.secret";

/// The QUIC secret, made now if there is none yet.
fn quic_secret(dir: &Path) -> Result<Vec<u8>, ProxyError> {
    use revproxy_ca::fsutil::{unsafe_file, FileProblem};
    let path = dir.join(QUIC_SECRET_FILE);
    // A key like `ca.key`: whoever reads it can forge resets that end this proxy's QUIC tunnels.
    match unsafe_file(&path, 0o077) {
        Ok(None) => {}
        Ok(Some(FileProblem::Mode(mode))) => {
            return Err(revproxy_ca::CaError::InsecurePermissions { path, mode }.into())
        }
        Ok(Some(FileProblem::Owner { owner, me })) => {
            return Err(revproxy_ca::CaError::ForeignFile { path, owner, me }.into())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    match std::fs::read(&path) {
        Ok(secret) if secret.len() == 32 => return Ok(secret),
        Ok(_) => warn!(path = %path.display(), "the QUIC secret is not 32 bytes; making a new one"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    use ring::rand::SecureRandom;
    let mut secret = vec![0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut secret)
        .map_err(|_| std::io::Error::other("the OS random number generator failed"))?;
    revproxy_ca::fsutil::write_atomic(&path, &secret, 0o600)?;
    Ok(secret)
}

/// The host of a `host:port` address (IPv6 without its brackets).
pub(super) fn advertised_host(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

/// Checks static routes: each a host name to a `host:port`.
pub(super) fn checked_routes(
    routes: HashMap<String, String>,
) -> Result<HashMap<String, String>, ProxyError> {
    for (name, addr) in &routes {
        if let Ok(Target::Tcp(_)) | Err(_) = Target::parse(name) {
            return Err(ProxyError::RouteName(name.clone()));
        }
        Target::parse(&format!("tcp://{addr}")).map_err(|source| ProxyError::RouteTarget {
            name: name.clone(),
            source,
        })?;
    }
    Ok(routes)
}
