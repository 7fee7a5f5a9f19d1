//! `revproxy-agent run`: keep one tunnel to the proxy up and serve its `CONNECT`s.
//!
//! The agent dials out with its certificate, then acts as the HTTP/2 *server*: every
//! routed client arrives as a `CONNECT` naming the host it asked for. The agent checks the
//! name against its service map, dials the backend, answers, and splices bytes both ways.
//! It reconnects forever with capped exponential backoff and jitter, PINGs the proxy to
//! notice a dead path, and on shutdown stops taking streams and drains the open ones.

use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use http::{Request, Response, StatusCode};
use revproxy_ca::names::normalize_host;
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio_rustls::TlsConnector;
use tracing::{debug, error, info, warn, Instrument};

use super::identity::{Identity, IdentityError};
use super::renew::{self, Clock, SystemClock};
pub use crate::config::Transport;
use crate::route::name_matches;
use crate::signal::Trigger;
use crate::tls::{self, TlsError};
use crate::tunnel::quic::{self, Answer, StreamHeader};
use crate::tunnel::{self, CLIENT_ADDR_HEADER, ERROR_HEADER};
use quinn::VarInt;

/// First reconnect delay.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest reconnect delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Time allowed to open the TCP connection to the proxy.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for the TLS and HTTP/2 handshakes with the proxy.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed to connect to a backend.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
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
        "nothing to serve: give at least one --map NAME=HOST:PORT (or [[service]] in the config)"
    )]
    NoServices,
    #[error("invalid service {0}")]
    InvalidService(String),
    #[error("this agent's certificate does not authorize {name} (it grants: {granted}); ask the operator for a token with --host {name}")]
    NotAuthorized { name: String, granted: String },
    #[error("{0}")]
    Expired(String),
}

/// The names this agent serves and where each goes.
#[derive(Clone, Debug, Default)]
pub struct ServiceMap {
    entries: Vec<(String, String)>,
}

impl ServiceMap {
    /// The backend for `name`: an exact entry first, then a wildcard entry.
    pub fn lookup(&self, name: &str) -> Option<&str> {
        let exact = self.entries.iter().find(|(pattern, _)| pattern == name);
        exact
            .or_else(|| {
                self.entries
                    .iter()
                    .find(|(pattern, _)| name_matches(pattern, name))
            })
            .map(|(_, addr)| addr.as_str())
    }
}

/// Builds an [`Agent`].
#[derive(Debug)]
pub struct AgentBuilder {
    state_dir: PathBuf,
    services: Vec<(String, String)>,
    server: Option<String>,
    drain_grace: Duration,
    clock: Arc<dyn Clock>,
    renew_check: Duration,
    transport: Transport,
    quic_fallback_after: Duration,
    quic_reprobe: Duration,
}

impl std::fmt::Debug for dyn Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Clock({})", self.now())
    }
}

impl AgentBuilder {
    /// Serves `name` (exact or `*.example.com`) from the backend at `addr` (`host:port`).
    pub fn service(mut self, name: &str, addr: &str) -> Self {
        self.services.push((name.to_string(), addr.to_string()));
        self
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
        if self.services.is_empty() {
            return Err(AgentError::NoServices);
        }
        let mut entries = Vec::new();
        for (name, addr) in self.services {
            let name = normalize_host(&name).map_err(AgentError::InvalidService)?;
            check_backend(&addr)
                .map_err(|e| AgentError::InvalidService(format!("{name}={addr}: {e}")))?;
            let authorized = identity
                .hosts
                .iter()
                .any(|h| *h == name || name_matches(h, &name));
            if !authorized {
                return Err(AgentError::NotAuthorized {
                    name,
                    granted: identity.hosts.join(", "),
                });
            }
            entries.push((name, addr));
        }
        if identity.ca_pin().is_none() {
            return Err(IdentityError::Corrupt {
                path: self.state_dir.join(super::CA_CERT_FILE),
                reason: "not a PEM certificate".into(),
            }
            .into());
        }
        // Fail now, not at the first connection, if the key and certificate do not load.
        connector_for(&identity)?;
        Ok(Agent {
            ctx: Arc::new(SessionCtx {
                server: self.server.unwrap_or_else(|| identity.server.clone()),
                services: Arc::new(ServiceMap { entries }),
                drain_grace: self.drain_grace,
                transport: self.transport,
                quic_fallback_after: self.quic_fallback_after,
                quic_reprobe: self.quic_reprobe,
            }),
            identity: tokio::sync::watch::channel(Arc::new(identity)).0,
            state_dir: self.state_dir,
            clock: self.clock,
            renew_check: self.renew_check,
        })
    }
}

fn connector_for(identity: &Identity) -> Result<TlsConnector, AgentError> {
    let pin = identity.ca_pin().ok_or_else(|| IdentityError::Corrupt {
        path: PathBuf::from(super::CA_CERT_FILE),
        reason: "not a PEM certificate".into(),
    })?;
    let config = tls::agent_client_config(
        vec![pin],
        &identity.cert_pem,
        &identity.key_pem,
        &[tls::ALPN_H2],
    )?;
    Ok(TlsConnector::from(Arc::new(config)))
}

fn check_backend(addr: &str) -> Result<(), String> {
    let (host, port) = addr.rsplit_once(':').ok_or("expected HOST:PORT")?;
    if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err("expected HOST:PORT".into());
    }
    Ok(())
}

/// What every tunnel session needs.
struct SessionCtx {
    server: String,
    services: Arc<ServiceMap>,
    drain_grace: Duration,
    transport: Transport,
    quic_fallback_after: Duration,
    quic_reprobe: Duration,
}

/// A configured agent, ready to run.
pub struct Agent {
    ctx: Arc<SessionCtx>,
    /// The current identity; replaced by each renewal.
    identity: tokio::sync::watch::Sender<Arc<Identity>>,
    state_dir: PathBuf,
    clock: Arc<dyn Clock>,
    renew_check: Duration,
}

impl Agent {
    /// Starts building an agent from the identity enrolled in `state_dir`.
    pub fn builder(state_dir: impl AsRef<Path>) -> AgentBuilder {
        AgentBuilder {
            state_dir: state_dir.as_ref().to_path_buf(),
            services: Vec::new(),
            server: None,
            drain_grace: DRAIN_GRACE,
            clock: Arc::new(SystemClock),
            renew_check: RENEW_CHECK,
            transport: Transport::H2,
            quic_fallback_after: QUIC_FALLBACK_AFTER,
            quic_reprobe: QUIC_REPROBE,
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
            not_after = %crate::logging::rfc3339(id.not_after),
            "agent starting; certificate valid until not_after"
        );
        let mut fatal = None;
        let supervise = async {
            tokio::select! {
                e = self.renewal_loop() => {
                    error!("{e}");
                    fatal = Some(e);
                }
                () = shutdown => {}
                () = stop.cancelled() => {}
            }
            stop.fire();
        };
        tokio::join!(self.tunnel_loop(&stop), supervise);
        info!("agent stopped");
        fatal.map_or(Ok(()), Err)
    }

    /// Renews at about 2/3 of each certificate's lifetime, forever; returns only when it
    /// cannot go on.
    async fn renewal_loop(&self) -> AgentError {
        loop {
            let id = self.identity();
            let Some((not_before, not_after)) = renew::validity(&id) else {
                return AgentError::Expired("agent.crt is unreadable; enroll again".into());
            };
            let renew_at = renew::renewal_time(not_before, not_after, renew::random());
            // Re-read the wall clock at every check: after a suspend, renew at once.
            loop {
                let now = self.clock.now();
                if now >= renew_at {
                    break;
                }
                let wait = Duration::from_secs((renew_at - now) as u64).min(self.renew_check);
                tokio::time::sleep(wait).await;
            }
            let mut failures = 0;
            let mut last_error_log: Option<i64> = None;
            loop {
                let now = self.clock.now();
                if now >= not_after {
                    return AgentError::Expired(renew::reenroll_hint(
                        &id,
                        &self.state_dir,
                        "this agent's certificate expired before it could be renewed",
                        now,
                    ));
                }
                match renew::renew_once(&id, &self.state_dir).await {
                    Ok(new) => {
                        info!(
                            serial_not_after = %crate::logging::rfc3339(new.not_after),
                            "certificate renewed; new tunnels use it"
                        );
                        self.identity.send_replace(Arc::new(new));
                        break;
                    }
                    Err(e)
                        if matches!(
                            e.code(),
                            Some("cert_revoked" | "cert_expired" | "unknown_cert")
                        ) =>
                    {
                        return AgentError::Expired(renew::reenroll_hint(
                            &id,
                            &self.state_dir,
                            &format!("the proxy refused to renew this agent's certificate: {e}"),
                            now,
                        ));
                    }
                    Err(e) => {
                        failures += 1;
                        if now >= renew::urgent_time(not_before, not_after) {
                            // Past 90% of the lifetime: loud, but at most once an hour.
                            if last_error_log.is_none_or(|t| now - t >= 3600) {
                                error!(
                                    error = %e,
                                    expires = %crate::logging::rfc3339(not_after),
                                    "certificate renewal keeps failing and the certificate expires soon"
                                );
                                last_error_log = Some(now);
                            }
                        } else {
                            warn!(error = %e, attempt = failures, "certificate renewal failed; retrying");
                        }
                        tokio::time::sleep(renew::retry_delay(failures)).await;
                    }
                }
            }
        }
    }

    /// Keeps one tunnel up until `stop` fires. After a renewal a new tunnel is opened with
    /// the new certificate and the old one drains: its open streams run to their end. With
    /// [`Transport::Auto`] a QUIC tunnel is tried first, h2 is used when no QUIC handshake
    /// completes in time, and QUIC is probed again in the background; when a probe
    /// succeeds, the probe's connection becomes the tunnel and the h2 one drains. Every
    /// session task lives in one `JoinSet`, so dropping the agent ends them all.
    async fn tunnel_loop(&self, stop: &Trigger) {
        let mut backoff = Backoff::default();
        let mut renewed = self.identity.subscribe();
        let mut sessions = JoinSet::new();
        // Tunnels on an old certificate or transport, retired as soon as the next tunnel
        // is up (not before: a client must always find one).
        let to_retire: Arc<std::sync::Mutex<Vec<Trigger>>> = Arc::default();
        // Auto mode: QUIC did not work at the last attempt, so h2 is in use.
        let mut on_fallback = false;
        // Auto mode: the fallback was logged and QUIC has not worked since (log it once).
        let mut fallback_logged = false;
        // A QUIC connection a probe made, and the identity it was made with.
        let mut preconnected: Option<(Connected, Arc<Identity>)> = None;
        'connect: while !stop.is_fired() {
            let id = renewed.borrow_and_update().clone();
            // A probe that raced a renewal used the old certificate: not that one.
            let ready = preconnected
                .take()
                .filter(|(_, used)| Arc::ptr_eq(used, &id))
                .map(|(conn, _)| conn);
            let kind = match self.ctx.transport {
                Transport::H2 => Kind::H2,
                Transport::Quic => Kind::Quic,
                Transport::Auto if on_fallback => Kind::H2,
                Transport::Auto => Kind::Quic,
            };
            let retire = Trigger::default();
            let established = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let span =
                tracing::info_span!("tunnel", server = %self.ctx.server, transport = kind.name());
            let current = sessions
                .spawn(
                    session(
                        self.ctx.clone(),
                        kind,
                        ready,
                        id.clone(),
                        stop.clone(),
                        retire.clone(),
                        established.clone(),
                        to_retire.clone(),
                    )
                    .instrument(span),
                )
                .id();
            // While on the h2 fallback, QUIC is tried again every `quic_reprobe`. The probe
            // lives across loop turns, so nothing else happening cancels a handshake.
            let probing = self.ctx.transport == Transport::Auto && kind == Kind::H2;
            let new_probe = || {
                let (ctx, id) = (self.ctx.clone(), id.clone());
                Box::pin(async move {
                    tokio::time::sleep(ctx.quic_reprobe).await;
                    connect(&ctx, Kind::Quic, &id, ctx.quic_fallback_after).await
                })
            };
            let mut probe = new_probe();
            let mut next_preconnected = None;
            let outcome = loop {
                tokio::select! {
                    Some(done) = sessions.join_next_with_id() => match done {
                        Ok((task, r)) if task == current => break Ok(r),
                        Err(e) if e.id() == current => break Err(e),
                        _ => {} // a retired session finished draining
                    },
                    Ok(()) = renewed.changed() => {
                        info!("opening a tunnel with the renewed certificate; the old one drains once it is up");
                        to_retire.lock().expect("retire list").push(retire.clone());
                        backoff.reset();
                        continue 'connect;
                    }
                    probed = &mut probe, if probing => match probed {
                        Ok(conn) => {
                            info!("QUIC works again: new streams go over QUIC; the h2 tunnel drains");
                            on_fallback = false;
                            fallback_logged = false;
                            next_preconnected = Some((conn, id.clone()));
                            to_retire.lock().expect("retire list").push(retire.clone());
                            break Ok(Ok(()));
                        }
                        Err(e) => {
                            debug!(error = %e, "QUIC still unavailable; staying on h2");
                            probe = new_probe();
                        }
                    },
                }
            };
            if next_preconnected.is_some() {
                preconnected = next_preconnected;
                continue 'connect;
            }
            let was_up = established.load(std::sync::atomic::Ordering::Relaxed);
            match outcome {
                Ok(Ok(())) if stop.is_fired() => break,
                Ok(Ok(())) => info!("tunnel closed by the proxy; reconnecting"),
                Ok(Err(e))
                    if self.ctx.transport == Transport::Auto && kind == Kind::Quic && !was_up =>
                {
                    // No QUIC handshake: use h2 now, without a pause.
                    if fallback_logged {
                        debug!(error = %e, "QUIC still unavailable; using h2");
                    } else {
                        warn!(error = %e, retry_every = ?self.ctx.quic_reprobe, "QUIC unavailable; falling back to h2 and trying QUIC again in the background");
                        fallback_logged = true;
                    }
                    on_fallback = true;
                    continue;
                }
                Ok(Err(e)) if self.ctx.transport == Transport::Auto && !was_up => {
                    // h2 did not come up either: next time, QUIC first again.
                    warn!(error = %e, "tunnel failed");
                    on_fallback = false;
                }
                Ok(Err(e)) => warn!(error = %e, "tunnel failed"),
                Err(e) => warn!(error = %e, "tunnel task failed"),
            }
            if was_up {
                backoff.reset();
                // Auto: a tunnel that was up and failed gets QUIC tried first again.
                on_fallback = false;
                if kind == Kind::Quic {
                    fallback_logged = false;
                }
            }
            let delay = backoff.next_delay();
            debug!(?delay, "reconnecting after a pause");
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                Ok(()) = renewed.changed() => {}
                () = stop.cancelled() => break,
            }
        }
        // Retired sessions saw `stop` too and end within the drain grace.
        while sessions.join_next().await.is_some() {}
    }
}

/// A tunnel transport actually in use (auto resolves to one of these).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    H2,
    Quic,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::H2 => "h2",
            Kind::Quic => "quic",
        }
    }
}

type H2Conn = h2::server::Connection<tokio_rustls::client::TlsStream<tunnel::TunnelIo>, Bytes>;

/// A tunnel connection whose handshakes are done.
enum Connected {
    H2(Box<H2Conn>),
    /// The endpoint is kept so that the close is sent before its socket goes.
    Quic(quinn::Connection, quinn::Endpoint),
}

fn handshake_error(e: impl std::fmt::Display, id: &Identity) -> String {
    // Both clocks' view helps with "expired" or "not yet valid" refusals.
    format!(
        "TLS handshake failed: {e} (our certificate is valid until {}; this machine's clock says {})",
        crate::logging::rfc3339(id.not_after),
        crate::logging::rfc3339(time::OffsetDateTime::now_utc().unix_timestamp()),
    )
}

/// Connects to the proxy and completes every handshake within `limit`.
async fn connect(
    ctx: &SessionCtx,
    kind: Kind,
    id: &Identity,
    limit: Duration,
) -> Result<Connected, String> {
    let attempt = async {
        match kind {
            Kind::H2 => connect_h2(ctx, id)
                .await
                .map(|c| Connected::H2(Box::new(c))),
            Kind::Quic => connect_quic(ctx, id).await,
        }
    };
    tokio::time::timeout(limit, attempt)
        .await
        .map_err(|_| format!("{} handshake timed out after {limit:?}", kind.name()))?
}

async fn connect_h2(ctx: &SessionCtx, id: &Identity) -> Result<H2Conn, String> {
    let connector = connector_for(id).map_err(|e| e.to_string())?;
    let name = tls::server_name(&ctx.server)?;
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(ctx.server.as_str()))
        .await
        .map_err(|_| "connection timed out".to_string())?
        .map_err(|e| format!("cannot connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let mut tls = connector
        .connect(name, tunnel::tunnel_io(tcp))
        .await
        .map_err(|e| handshake_error(e, id))?;
    tls.get_mut()
        .1
        .set_buffer_limit(Some(tunnel::TLS_SEND_BUFFER));
    tunnel::h2::server_builder()
        .handshake::<_, Bytes>(tls)
        .await
        .map_err(|e| format!("HTTP/2 handshake failed: {e}"))
}

async fn connect_quic(ctx: &SessionCtx, id: &Identity) -> Result<Connected, String> {
    let addr = tokio::net::lookup_host(ctx.server.as_str())
        .await
        .map_err(|e| format!("cannot resolve {}: {e}", ctx.server))?
        .next()
        .ok_or_else(|| format!("{} has no address", ctx.server))?;
    let pin = id
        .ca_pin()
        .ok_or_else(|| "ca.crt is not a PEM certificate".to_string())?;
    let crypto = tls::agent_client_config(vec![pin], &id.cert_pem, &id.key_pem, &[tls::ALPN_QUIC])
        .map_err(|e| e.to_string())?;
    let mut config = quinn::ClientConfig::new(quic::client_crypto(crypto));
    config.transport_config(Arc::new(quic::transport_config(quic::Role::Agent)));
    let local: SocketAddr = if addr.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let socket = quic::udp_socket(local).map_err(|e| format!("cannot open a UDP socket: {e}"))?;
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|e| format!("cannot start QUIC: {e}"))?;
    // The verifier checks the pinned CA, not the name; quinn still wants a valid one.
    let host = ctx
        .server
        .rsplit_once(':')
        .map_or(ctx.server.as_str(), |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    let conn = endpoint
        .connect_with(config, addr, host)
        .map_err(|e| format!("cannot connect: {e}"))?
        .await
        .map_err(|e| handshake_error(e, id))?;
    Ok(Connected::Quic(conn, endpoint))
}

/// One connection to the proxy, served until it ends. `retire` (a renewal, or QUIC back
/// after a fallback) stops new streams and lets open ones finish however long they take;
/// `stop` (shutdown) does the same with the drain grace as a deadline.
#[allow(clippy::too_many_arguments)]
async fn session(
    ctx: Arc<SessionCtx>,
    kind: Kind,
    preconnected: Option<Connected>,
    id: Arc<Identity>,
    stop: Trigger,
    retire: Trigger,
    established: Arc<std::sync::atomic::AtomicBool>,
    to_retire: Arc<std::sync::Mutex<Vec<Trigger>>>,
) -> Result<(), String> {
    let limit = match (ctx.transport, kind) {
        (Transport::Auto, Kind::Quic) => ctx.quic_fallback_after,
        _ => HANDSHAKE_TIMEOUT + CONNECT_TIMEOUT,
    };
    let conn = match preconnected {
        Some(conn) => conn,
        None => tokio::select! {
            r = connect(&ctx, kind, &id, limit) => r?,
            () = stop.cancelled() => return Ok(()),
            () = retire.cancelled() => return Ok(()),
        },
    };
    established.store(true, std::sync::atomic::Ordering::Relaxed);
    info!("tunnel up");
    // This tunnel can take the traffic now: older ones stop taking new streams.
    for old in to_retire.lock().expect("retire list").drain(..) {
        old.fire();
    }
    match conn {
        Connected::H2(conn) => serve_h2(&ctx, *conn, stop, retire).await,
        Connected::Quic(conn, endpoint) => {
            let r = serve_quic(&ctx, &conn, stop, retire).await;
            // Let the close reach the proxy before the socket goes (bounded).
            let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
            r
        }
    }
}

/// Where a tunnel session stands on the way out.
struct Drain {
    retiring: bool,
    until: Option<tokio::time::Instant>,
}

async fn serve_h2(
    ctx: &SessionCtx,
    mut conn: H2Conn,
    stop: Trigger,
    retire: Trigger,
) -> Result<(), String> {
    let keepalive = crate::proxy::keepalive(conn.ping_pong().expect("ping_pong is taken once"));
    tokio::pin!(keepalive);
    let mut streams = JoinSet::new();
    let mut drain = Drain {
        retiring: false,
        until: None,
    };
    loop {
        tokio::select! {
            accepted = conn.accept() => match accepted {
                Some(Ok((request, respond))) => {
                    let services = ctx.services.clone();
                    let span = tracing::debug_span!("stream");
                    streams.spawn(serve_h2_stream(services, request, respond).instrument(span));
                }
                Some(Err(e)) => return Err(format!("tunnel error: {e}")),
                None => break,
            },
            reason = &mut keepalive => return Err(reason),
            () = retire.cancelled(), if !drain.retiring => {
                debug!(open = streams.len(), "retiring this tunnel: no new streams");
                conn.graceful_shutdown();
                drain.retiring = true;
            }
            () = stop.cancelled(), if drain.until.is_none() => {
                info!(open = streams.len(), "shutting down: no new streams; draining");
                if !drain.retiring {
                    conn.graceful_shutdown();
                }
                drain.until = Some(tokio::time::Instant::now() + ctx.drain_grace);
            }
            () = sleep_until(drain.until), if drain.until.is_some() => {
                warn!(open = streams.len(), "streams still open after the grace period; closing them");
                return Ok(());
            }
            Some(_) = streams.join_next(), if !streams.is_empty() => {}
        }
    }
    // The proxy closed the tunnel, or a graceful shutdown completed.
    Ok(())
}

/// Tells the proxy to route nothing new to this QUIC tunnel (see [`quic::GOAWAY`]).
async fn quic_goaway(conn: &quinn::Connection) {
    let send = async {
        if let Ok(mut control) = conn.open_uni().await {
            let _ = control.write_all(quic::GOAWAY).await;
            let _ = control.finish();
        }
    };
    // Bounded: a tunnel too broken to take this is closing anyway.
    let _ = tokio::time::timeout(Duration::from_secs(1), send).await;
}

async fn serve_quic(
    ctx: &SessionCtx,
    conn: &quinn::Connection,
    stop: Trigger,
    retire: Trigger,
) -> Result<(), String> {
    let mut streams = JoinSet::new();
    let mut drain = Drain {
        retiring: false,
        until: None,
    };
    loop {
        if (drain.retiring || drain.until.is_some()) && streams.is_empty() {
            conn.close(VarInt::from_u32(quic::code::DONE), b"drained");
            return Ok(());
        }
        tokio::select! {
            accepted = conn.accept_bi() => match accepted {
                Ok((send, recv)) => {
                    let services = ctx.services.clone();
                    let span = tracing::debug_span!("stream");
                    streams.spawn(serve_quic_stream(services, send, recv).instrument(span));
                }
                Err(quinn::ConnectionError::ApplicationClosed(close)) => {
                    debug!(reason = %String::from_utf8_lossy(&close.reason), "tunnel closed by the proxy");
                    return Ok(());
                }
                Err(e) => return Err(format!("tunnel error: {e}")),
            },
            () = retire.cancelled(), if !drain.retiring => {
                debug!(open = streams.len(), "retiring this tunnel: no new streams");
                quic_goaway(conn).await;
                drain.retiring = true;
            }
            () = stop.cancelled(), if drain.until.is_none() => {
                info!(open = streams.len(), "shutting down: no new streams; draining");
                if !drain.retiring {
                    quic_goaway(conn).await;
                }
                drain.until = Some(tokio::time::Instant::now() + ctx.drain_grace);
            }
            () = sleep_until(drain.until), if drain.until.is_some() => {
                warn!(open = streams.len(), "streams still open after the grace period; closing them");
                conn.close(VarInt::from_u32(quic::code::DONE), b"drain grace over");
                return Ok(());
            }
            Some(_) = streams.join_next(), if !streams.is_empty() => {}
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// A refused stream: the status (HTTP codes on both transports) and a one-line reason.
type Refusal = (StatusCode, String);

/// Finds the backend for `name` and connects to it.
async fn dial(services: &ServiceMap, name: &str) -> Result<(TcpStream, String), Refusal> {
    let Some(addr) = services.lookup(name) else {
        return Err((
            StatusCode::NOT_FOUND,
            format!("this agent serves no {name}"),
        ));
    };
    match tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(backend)) => {
            let _ = backend.set_nodelay(true);
            Ok((backend, addr.to_string()))
        }
        Ok(Err(e)) => Err((StatusCode::BAD_GATEWAY, format!("backend {addr}: {e}"))),
        Err(_) => Err((
            StatusCode::GATEWAY_TIMEOUT,
            format!("backend {addr} did not accept within {DIAL_TIMEOUT:?}"),
        )),
    }
}

/// Serves one `CONNECT`: find the backend, dial it, answer, splice.
async fn serve_h2_stream(
    services: Arc<ServiceMap>,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    let name = request
        .uri()
        .authority()
        .map(|a| a.host().to_ascii_lowercase())
        .unwrap_or_default();
    let client = request
        .headers()
        .get(CLIENT_ADDR_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<SocketAddr>().ok());
    let refuse = |respond: &mut SendResponse<Bytes>, (status, reason): Refusal| {
        warn!(host = %name, ?client, %status, %reason, "stream refused");
        let response = Response::builder()
            .status(status)
            .header(ERROR_HEADER, reason)
            .body(())
            .expect("valid response");
        let _ = respond.send_response(response, true);
    };
    if request.method() != http::Method::CONNECT {
        return refuse(
            &mut respond,
            (
                StatusCode::METHOD_NOT_ALLOWED,
                "only CONNECT is served".into(),
            ),
        );
    }
    let (backend, addr) = match dial(&services, &name).await {
        Ok(dialed) => dialed,
        Err(refusal) => return refuse(&mut respond, refusal),
    };
    let send = match respond.send_response(Response::new(()), false) {
        Ok(send) => send,
        Err(e) => return debug!(error = %e, "stream gone before the answer"),
    };
    debug!(host = %name, ?client, backend = addr, "stream open");
    match tunnel::h2::splice(backend, send, request.into_body()).await {
        Ok((up, down)) => debug!(host = %name, to_backend = down, from_backend = up, "stream done"),
        Err(e) => debug!(host = %name, error = %e, "stream ended with an error"),
    }
}

/// Serves one QUIC stream: read its header, dial the backend, answer, splice.
async fn serve_quic_stream(
    services: Arc<ServiceMap>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let header = tokio::time::timeout(
        quic::HEADER_TIMEOUT,
        quic::read_frame(&mut recv, StreamHeader::parse),
    )
    .await
    .unwrap_or_else(|_| {
        Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "no stream header in time",
        ))
    });
    let (header, first) = match header {
        Ok(read) => read,
        Err(e) => {
            warn!(error = %e, "bad stream header; resetting the stream");
            let _ = send.reset(VarInt::from_u32(quic::code::PROTOCOL));
            return;
        }
    };
    let (name, client) = (header.name, header.client);
    let (backend, addr) = match dial(&services, &name).await {
        Ok(dialed) => dialed,
        Err((status, reason)) => {
            warn!(host = %name, %client, %status, %reason, "stream refused");
            let answer = Answer {
                status: status.as_u16(),
                reason,
            };
            let _ = send.write_all(&answer.encode()).await;
            let _ = send.finish();
            return;
        }
    };
    if let Err(e) = send.write_all(&Answer::ok().encode()).await {
        return debug!(error = %e, "stream gone before the answer");
    }
    debug!(host = %name, %client, backend = addr, "stream open");
    match quic::splice(backend, send, recv, first).await {
        Ok((up, down)) => debug!(host = %name, to_backend = down, from_backend = up, "stream done"),
        Err(e) => debug!(host = %name, error = %e, "stream ended with an error"),
    }
}

/// Capped exponential backoff with jitter: each delay is drawn from [d/2, d], and d doubles
/// from [`BACKOFF_MIN`] up to [`BACKOFF_MAX`].
#[derive(Debug)]
struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: BACKOFF_MIN }
    }
}

impl Backoff {
    fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }

    fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (d * 2).min(BACKOFF_MAX);
        let random = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        d / 2 + d.mul_f64((random % 1000) as f64 / 2000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_with_jitter() {
        let mut b = Backoff::default();
        let first = b.next_delay();
        assert!(first >= BACKOFF_MIN / 2 && first <= BACKOFF_MIN);
        let mut last = first;
        for _ in 0..20 {
            last = b.next_delay();
        }
        assert!(last >= BACKOFF_MAX / 2 && last <= BACKOFF_MAX);
        b.reset();
        assert!(b.next_delay() <= BACKOFF_MIN);
    }

    #[test]
    fn service_lookup_prefers_exact_names() {
        let map = ServiceMap {
            entries: vec![
                ("*.example.com".into(), "127.0.0.1:1".into()),
                ("app.example.com".into(), "127.0.0.1:2".into()),
            ],
        };
        assert_eq!(map.lookup("app.example.com"), Some("127.0.0.1:2"));
        assert_eq!(map.lookup("x.example.com"), Some("127.0.0.1:1"));
        assert_eq!(map.lookup("example.com"), None);
    }
}
