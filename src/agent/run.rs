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
use crate::route::name_matches;
use crate::signal::Trigger;
use crate::tls::{self, TlsError};
use crate::tunnel::{self, CLIENT_ADDR_HEADER, ERROR_HEADER};

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
    /// the new certificate and the old one drains: its open streams run to their end.
    /// Every session task lives in one `JoinSet`, so dropping the agent ends them all.
    async fn tunnel_loop(&self, stop: &Trigger) {
        let mut backoff = Backoff::default();
        let mut renewed = self.identity.subscribe();
        let mut sessions = JoinSet::new();
        // Tunnels on an old certificate, retired as soon as the next tunnel is up (not
        // before: a client must always find one).
        let to_retire: Arc<std::sync::Mutex<Vec<Trigger>>> = Arc::default();
        'connect: while !stop.is_fired() {
            let id = renewed.borrow_and_update().clone();
            let connector = match connector_for(&id) {
                Ok(c) => c,
                Err(e) => {
                    error!(error = %e, "cannot use the agent certificate");
                    break;
                }
            };
            let retire = Trigger::default();
            let established = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let span = tracing::info_span!("tunnel", server = %self.ctx.server);
            let current = sessions
                .spawn(
                    session(
                        self.ctx.clone(),
                        connector,
                        id,
                        stop.clone(),
                        retire.clone(),
                        established.clone(),
                        to_retire.clone(),
                    )
                    .instrument(span),
                )
                .id();
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
                }
            };
            match outcome {
                Ok(Ok(())) if stop.is_fired() => break,
                Ok(Ok(())) => info!("tunnel closed by the proxy; reconnecting"),
                Ok(Err(e)) => warn!(error = %e, "tunnel failed"),
                Err(e) => warn!(error = %e, "tunnel task failed"),
            }
            if established.load(std::sync::atomic::Ordering::Relaxed) {
                backoff.reset();
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

/// One connection to the proxy, served until it ends. `retire` (a renewal) stops new
/// streams and lets open ones finish however long they take; `stop` (shutdown) does the
/// same with the drain grace as a deadline.
async fn session(
    ctx: Arc<SessionCtx>,
    connector: TlsConnector,
    id: Arc<Identity>,
    stop: Trigger,
    retire: Trigger,
    established: Arc<std::sync::atomic::AtomicBool>,
    to_retire: Arc<std::sync::Mutex<Vec<Trigger>>>,
) -> Result<(), String> {
    let name = tls::server_name(&ctx.server)?;
    let connect = async {
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(ctx.server.as_str()))
            .await
            .map_err(|_| "connection timed out".to_string())?
            .map_err(|e| format!("cannot connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let mut tls = connector.connect(name, tunnel::tunnel_io(tcp)).await.map_err(|e| {
            // Both clocks' view helps with "expired" or "not yet valid" refusals.
            format!(
                "TLS handshake failed: {e} (our certificate is valid until {}; this machine's clock says {})",
                crate::logging::rfc3339(id.not_after),
                crate::logging::rfc3339(time::OffsetDateTime::now_utc().unix_timestamp()),
            )
        })?;
        tls.get_mut()
            .1
            .set_buffer_limit(Some(tunnel::TLS_SEND_BUFFER));
        tunnel::h2::server_builder()
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|e| format!("HTTP/2 handshake failed: {e}"))
    };
    let mut conn = tokio::select! {
        r = tokio::time::timeout(HANDSHAKE_TIMEOUT + CONNECT_TIMEOUT, connect) => {
            r.map_err(|_| "handshake timed out".to_string())??
        }
        () = stop.cancelled() => return Ok(()),
        () = retire.cancelled() => return Ok(()),
    };
    established.store(true, std::sync::atomic::Ordering::Relaxed);
    info!("tunnel up");
    // This tunnel can take the traffic now: older ones stop taking new streams.
    for old in to_retire.lock().expect("retire list").drain(..) {
        old.fire();
    }
    let keepalive = crate::proxy::keepalive(conn.ping_pong().expect("ping_pong is taken once"));
    tokio::pin!(keepalive);
    let mut streams = JoinSet::new();
    let mut retiring = false;
    let mut drain_until: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            accepted = conn.accept() => match accepted {
                Some(Ok((request, respond))) => {
                    let services = ctx.services.clone();
                    let span = tracing::debug_span!("stream");
                    streams.spawn(serve_stream(services, request, respond).instrument(span));
                }
                Some(Err(e)) => return Err(format!("tunnel error: {e}")),
                None => break,
            },
            reason = &mut keepalive => return Err(reason),
            () = retire.cancelled(), if !retiring => {
                debug!(open = streams.len(), "retiring this tunnel: no new streams");
                conn.graceful_shutdown();
                retiring = true;
            }
            () = stop.cancelled(), if drain_until.is_none() => {
                info!(open = streams.len(), "shutting down: no new streams; draining");
                if !retiring {
                    conn.graceful_shutdown();
                }
                drain_until = Some(tokio::time::Instant::now() + ctx.drain_grace);
            }
            () = sleep_until(drain_until), if drain_until.is_some() => {
                warn!(open = streams.len(), "streams still open after the grace period; closing them");
                return Ok(());
            }
            Some(_) = streams.join_next(), if !streams.is_empty() => {}
        }
    }
    // The proxy closed the tunnel, or a graceful shutdown completed.
    Ok(())
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Serves one `CONNECT`: find the backend, dial it, answer, splice.
async fn serve_stream(
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
    let refuse = |respond: &mut SendResponse<Bytes>, status: StatusCode, reason: String| {
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
            StatusCode::METHOD_NOT_ALLOWED,
            "only CONNECT is served".into(),
        );
    }
    let Some(addr) = services.lookup(&name) else {
        return refuse(
            &mut respond,
            StatusCode::NOT_FOUND,
            format!("this agent serves no {name}"),
        );
    };
    let backend = match tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            return refuse(
                &mut respond,
                StatusCode::BAD_GATEWAY,
                format!("backend {addr}: {e}"),
            )
        }
        Err(_) => {
            return refuse(
                &mut respond,
                StatusCode::GATEWAY_TIMEOUT,
                format!("backend {addr} did not accept within {DIAL_TIMEOUT:?}"),
            )
        }
    };
    let _ = backend.set_nodelay(true);
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
