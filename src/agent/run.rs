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
use tracing::{debug, info, warn, Instrument};

use super::identity::{Identity, IdentityError};
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

    /// Loads the identity and checks every service against the certificate.
    pub fn build(self) -> Result<Agent, AgentError> {
        let identity = Identity::load(&self.state_dir)?;
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
        let pin = identity.ca_pin().ok_or_else(|| IdentityError::Corrupt {
            path: self.state_dir.join(super::CA_CERT_FILE),
            reason: "not a PEM certificate".into(),
        })?;
        let config = tls::agent_client_config(
            vec![pin],
            &identity.cert_pem,
            &identity.key_pem,
            &[tls::ALPN_H2],
        )?;
        Ok(Agent {
            server: self.server.unwrap_or_else(|| identity.server.clone()),
            identity,
            services: Arc::new(ServiceMap { entries }),
            connector: TlsConnector::from(Arc::new(config)),
            drain_grace: self.drain_grace,
        })
    }
}

fn check_backend(addr: &str) -> Result<(), String> {
    let (host, port) = addr.rsplit_once(':').ok_or("expected HOST:PORT")?;
    if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err("expected HOST:PORT".into());
    }
    Ok(())
}

/// A configured agent, ready to run.
pub struct Agent {
    identity: Identity,
    server: String,
    services: Arc<ServiceMap>,
    connector: TlsConnector,
    drain_grace: Duration,
}

impl Agent {
    /// Starts building an agent from the identity enrolled in `state_dir`.
    pub fn builder(state_dir: impl AsRef<Path>) -> AgentBuilder {
        AgentBuilder {
            state_dir: state_dir.as_ref().to_path_buf(),
            services: Vec::new(),
            server: None,
            drain_grace: DRAIN_GRACE,
        }
    }

    /// The identity the agent runs as.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Keeps a tunnel up until `shutdown` completes, then drains and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let stop = Trigger::default();
        let trigger = stop.clone();
        let main = async {
            let mut backoff = Backoff::default();
            info!(server = %self.server, identity = %self.identity.identity, "agent starting");
            while !stop.is_fired() {
                let mut established = false;
                let span = tracing::info_span!("tunnel", server = %self.server);
                match self.session(&stop, &mut established).instrument(span).await {
                    Ok(()) if stop.is_fired() => break,
                    Ok(()) => info!("tunnel closed by the proxy; reconnecting"),
                    Err(e) => warn!(error = %e, "tunnel failed"),
                }
                if established {
                    backoff.reset();
                }
                let delay = backoff.next_delay();
                debug!(?delay, "reconnecting after a pause");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = stop.cancelled() => break,
                }
            }
            info!("agent stopped");
        };
        tokio::pin!(main, shutdown);
        tokio::select! {
            () = &mut main => return,
            () = &mut shutdown => trigger.fire(),
        }
        main.await;
    }

    /// One connection to the proxy, served until it ends.
    async fn session(&self, stop: &Trigger, established: &mut bool) -> Result<(), String> {
        let name = tls::server_name(&self.server)?;
        let connect = async {
            let tcp =
                tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(self.server.as_str()))
                    .await
                    .map_err(|_| "connection timed out".to_string())?
                    .map_err(|e| format!("cannot connect: {e}"))?;
            let _ = tcp.set_nodelay(true);
            let mut tls = self
                .connector
                .connect(name, tunnel::tunnel_io(tcp))
                .await
                .map_err(|e| format!("TLS handshake failed: {e}"))?;
            tunnel::h2::server_builder()
                .handshake::<_, Bytes>({
                    tls.get_mut()
                        .1
                        .set_buffer_limit(Some(tunnel::TLS_SEND_BUFFER));
                    tls
                })
                .await
                .map_err(|e| format!("HTTP/2 handshake failed: {e}"))
        };
        let mut conn = tokio::select! {
            r = tokio::time::timeout(HANDSHAKE_TIMEOUT + CONNECT_TIMEOUT, connect) => {
                r.map_err(|_| "handshake timed out".to_string())??
            }
            () = stop.cancelled() => return Ok(()),
        };
        *established = true;
        info!("tunnel up");
        let keepalive = crate::proxy::keepalive(conn.ping_pong().expect("ping_pong is taken once"));
        tokio::pin!(keepalive);
        let mut streams = JoinSet::new();
        let mut drain_until: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                accepted = conn.accept() => match accepted {
                    Some(Ok((request, respond))) => {
                        let services = self.services.clone();
                        let span = tracing::debug_span!("stream");
                        streams.spawn(serve_stream(services, request, respond).instrument(span));
                    }
                    Some(Err(e)) => return Err(format!("tunnel error: {e}")),
                    None => break,
                },
                reason = &mut keepalive => return Err(reason),
                () = stop.cancelled(), if drain_until.is_none() => {
                    info!(open = streams.len(), "shutting down: no new streams; draining");
                    conn.graceful_shutdown();
                    drain_until = Some(tokio::time::Instant::now() + self.drain_grace);
                }
                () = sleep_until(drain_until), if drain_until.is_some() => {
                    warn!(open = streams.len(), "streams still open after the grace period; closing them");
                    return Ok(());
                }
                Some(_) = streams.join_next(), if !streams.is_empty() => {}
            }
        }
        // The proxy closed the tunnel (or our graceful shutdown completed).
        Ok(())
    }
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
