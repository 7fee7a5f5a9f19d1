//! The proxy: the agent listener (enrollment now, tunnels on the same port) and, later,
//! the public listeners.
//!
//! [`Proxy::run`] takes already bound listeners and a shutdown future, so embedders and
//! tests bind `127.0.0.1:0` and know the address before anything runs.

mod enroll;
pub mod ratelimit;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use revproxy_ca::{Ca, CaError};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn, Instrument};

use crate::tls::{self, TlsError};
use ratelimit::FailureLimiter;

/// Longest time a TLS handshake on the agent port may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most connections on the agent port at once (enrollments and tunnels).
pub const MAX_AGENT_CONNECTIONS: usize = 4096;
/// How long open connections get to finish after shutdown starts.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Why the proxy could not start or keep running.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("no agent listener was given to the proxy builder")]
    NoAgentListener,
    #[error("listener error: {0}")]
    Io(#[from] std::io::Error),
}

/// Builds a [`Proxy`] from a state directory and bound listeners.
#[derive(Debug)]
pub struct ProxyBuilder {
    state_dir: PathBuf,
    agents: Option<TcpListener>,
    max_enroll_failures: u32,
    enroll_failure_window: Duration,
}

impl ProxyBuilder {
    /// The listener agents connect to (enrollment and tunnels).
    pub fn agent_listener(mut self, listener: TcpListener) -> Self {
        self.agents = Some(listener);
        self
    }

    /// Failed enrollments allowed per source address within `window` before it gets
    /// HTTP 429 for the rest of the window.
    pub fn enroll_failure_limit(mut self, max_failures: u32, window: Duration) -> Self {
        self.max_enroll_failures = max_failures;
        self.enroll_failure_window = window;
        self
    }

    /// Opens the CA and prepares TLS. Nothing is accepted until [`Proxy::run`].
    pub fn build(self) -> Result<Proxy, ProxyError> {
        let agents = self.agents.ok_or(ProxyError::NoAgentListener)?;
        let ca = Ca::open(&self.state_dir)?;
        let (chain, key) = ca.server_identity(time::OffsetDateTime::now_utc())?;
        let config = tls::agent_listener_config(&chain, &key, ca.cert_der(), &[tls::ALPN_HTTP1])?;
        Ok(Proxy {
            shared: Arc::new(Shared {
                ca: Arc::new(ca),
                enroll_gate: tokio::sync::Mutex::new(()),
                limiter: Mutex::new(FailureLimiter::new(
                    self.max_enroll_failures,
                    self.enroll_failure_window,
                )),
            }),
            agents,
            acceptor: TlsAcceptor::from(Arc::new(config)),
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
}

/// A configured proxy, ready to run.
pub struct Proxy {
    shared: Arc<Shared>,
    agents: TcpListener,
    acceptor: TlsAcceptor,
}

impl Proxy {
    /// Starts building a proxy whose CA lives in `state_dir`.
    pub fn builder(state_dir: impl AsRef<Path>) -> ProxyBuilder {
        ProxyBuilder {
            state_dir: state_dir.as_ref().to_path_buf(),
            agents: None,
            max_enroll_failures: ratelimit::DEFAULT_MAX_FAILURES,
            enroll_failure_window: ratelimit::DEFAULT_WINDOW,
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

    /// Serves until `shutdown` completes, then stops accepting and gives open connections
    /// [`SHUTDOWN_GRACE`] to finish.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), ProxyError> {
        let addr = self.agents.local_addr()?;
        info!(%addr, pin = %self.shared.ca.pin(), "agent listener ready");
        let permits = Arc::new(Semaphore::new(MAX_AGENT_CONNECTIONS));
        let mut tasks = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                accepted = self.agents.accept() => {
                    let (tcp, peer) = match accepted {
                        Ok(conn) => conn,
                        Err(e) => {
                            // Out of file descriptors and the like: back off instead of spinning.
                            warn!(error = %e, "accept failed on the agent listener");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                    let Ok(permit) = permits.clone().try_acquire_owned() else {
                        warn!(%peer, limit = MAX_AGENT_CONNECTIONS, "agent port at its connection limit; closing");
                        continue;
                    };
                    let shared = self.shared.clone();
                    let acceptor = self.acceptor.clone();
                    let span = tracing::debug_span!("agent_conn", %peer);
                    tasks.spawn(
                        async move {
                            handle_agent_conn(shared, acceptor, tcp, peer).await;
                            drop(permit);
                        }
                        .instrument(span),
                    );
                }
            }
        }
        info!(
            open = tasks.len(),
            "shutting down; draining open connections"
        );
        let drain = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
            tasks.abort_all();
        }
        Ok(())
    }
}

async fn handle_agent_conn(
    shared: Arc<Shared>,
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
) {
    let _ = tcp.set_nodelay(true);
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            debug!(error = %e, "TLS handshake failed on the agent port");
            return;
        }
        Err(_) => {
            debug!("TLS handshake timed out on the agent port");
            return;
        }
    };
    enroll::serve(shared, tls, peer).await;
}
