//! Reaching private names: `--connect NAME=LISTEN_ADDR`. The agent listens locally; each
//! local connection becomes a stream up to the proxy (on a QUIC tunnel, the tunnel itself;
//! on h2, the mesh channel, a second connection where the agent is the HTTP/2 client),
//! which checks this agent's access to NAME and joins it to an agent serving NAME.
//!
//! A refusal (no access, no such name, nobody serving it, this agent revoked) closes the
//! local connection and is logged in one sentence; `revproxy-agent status` shows each
//! listener with its last error.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::identity::Identity;
use crate::runtime::shutdown::Trigger;
use crate::tunnel::{self, Link, OpenError, OpenRequest, StreamCounters, StreamLimits};

/// Time allowed to open a stream up to the proxy and through to the serving agent (the
/// proxy's own deadline for finding one is 15 s).
const OPEN_TIMEOUT: Duration = Duration::from_secs(20);
/// Time allowed to set up the h2 mesh channel.
const CHANNEL_TIMEOUT: Duration = Duration::from_secs(15);
/// Local connections one connect listener serves at once (the proxy carries at most 64
/// mesh streams per tunnel at once; the rest wait for one, within the open timeout).
const MAX_LOCAL: usize = 256;

/// One `--connect` listener, as configured.
#[derive(Debug)]
pub(crate) struct ConnectSpec {
    pub(crate) name: String,
    pub(crate) listener: std::net::TcpListener,
}

/// What `status` shows of a connect listener.
#[derive(Clone, Debug, serde::Serialize)]
pub(crate) struct ConnectStatus {
    pub(crate) name: String,
    pub(crate) listen: String,
    pub(crate) open_streams: u64,
    pub(crate) streams: u64,
    /// The last refusal or failure, one sentence, and when (Unix seconds).
    pub(crate) last_error: Option<String>,
    pub(crate) last_error_at: Option<i64>,
}

/// The agent's ways up to the proxy, shared by its connect listeners and its sessions.
#[derive(Default)]
pub(crate) struct UpLinks {
    /// The current QUIC tunnel, and the id of the session that set it.
    quic: Mutex<Option<(u64, Link)>>,
    /// The h2 mesh channel, dialed when first needed, and whether it has ended.
    channel: tokio::sync::Mutex<Option<(Arc<Link>, Arc<std::sync::atomic::AtomicBool>)>>,
    next: AtomicU64,
    listeners: Mutex<Vec<Arc<Mutex<ConnectStatus>>>>,
}

impl UpLinks {
    /// A session's QUIC tunnel is up: mesh streams go up on it. Returns the id to give
    /// back to [`UpLinks::tunnel_down`].
    pub(crate) fn tunnel_up(&self, link: Link) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        *self.quic.lock().expect("up links") = Some((id, link));
        id
    }

    /// That session's tunnel ended.
    pub(crate) fn tunnel_down(&self, id: u64) {
        let mut quic = self.quic.lock().expect("up links");
        if quic.as_ref().is_some_and(|(current, _)| *current == id) {
            *quic = None;
        }
    }

    /// `link` takes no more streams: the next [`Self::link`] dials a new channel (a QUIC
    /// tunnel is replaced by its session).
    async fn forget(&self, link: &Arc<Link>) {
        let channel = self.channel.lock().await;
        if let Some((current, ended)) = channel.as_ref() {
            if Arc::ptr_eq(current, link) {
                ended.store(true, Ordering::Relaxed);
            }
        }
    }

    /// Every connect listener's state.
    pub(crate) fn status(&self) -> Vec<ConnectStatus> {
        self.listeners
            .lock()
            .expect("connect listeners")
            .iter()
            .map(|s| s.lock().expect("connect status").clone())
            .collect()
    }

    /// The link to open a mesh stream on: the QUIC tunnel if one is up, else the h2 mesh
    /// channel (dialed now if there is none).
    async fn link(
        &self,
        server: &str,
        identity: &watch::Receiver<Arc<Identity>>,
    ) -> Result<Arc<Link>, String> {
        if let Some((_, link)) = self.quic.lock().expect("up links").as_ref() {
            return Ok(Arc::new(link.clone()));
        }
        let mut channel = self.channel.lock().await;
        if let Some((link, ended)) = channel.as_ref() {
            if !ended.load(Ordering::Relaxed) {
                return Ok(link.clone());
            }
        }
        let id = identity.borrow().clone();
        let creds = id.credentials().map_err(|e| e.to_string())?;
        let dialed = tokio::time::timeout(
            CHANNEL_TIMEOUT,
            tunnel::connect_mesh_channel(server, &creds),
        )
        .await
        .map_err(|_| format!("the proxy did not answer within {CHANNEL_TIMEOUT:?}"))?
        .map_err(|e| format!("cannot reach the proxy: {e}"))?;
        let (link, drive) = dialed;
        let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = ended.clone();
        tokio::spawn(async move {
            if let Err(e) = drive.await {
                debug!(error = %e, "mesh channel ended");
            }
            flag.store(true, Ordering::Relaxed);
        });
        let link = Arc::new(link);
        *channel = Some((link.clone(), ended));
        Ok(link)
    }
}

/// A change of the connect listeners (SIGHUP): every `(name, listen address)` wanted, and
/// where to say what became of it.
pub(crate) type Reload = (
    Vec<(String, SocketAddr)>,
    tokio::sync::oneshot::Sender<Result<String, ListenError>>,
);

/// A connect listener that could not be bound (on a reload nothing changed then).
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {listen} for [[connect]] {name}: {source}")]
pub struct ListenError {
    listen: SocketAddr,
    name: String,
    #[source]
    source: std::io::Error,
}

/// One running connect listener.
struct Running {
    listen: SocketAddr,
    /// Fire to stop accepting (its open connections run on).
    accepting: Trigger,
    status: Arc<Mutex<ConnectStatus>>,
}

/// The running connect listeners, each an accept loop of its own.
struct Listeners {
    up: Arc<UpLinks>,
    server: String,
    identity: watch::Receiver<Arc<Identity>>,
    limits: StreamLimits,
    stop: Trigger,
    running: std::collections::HashMap<String, Running>,
    tasks: tokio::task::JoinSet<()>,
}

impl Listeners {
    fn start(&mut self, name: String, listener: TcpListener) {
        let listen = match listener.local_addr() {
            Ok(addr) => addr,
            Err(e) => return warn!(host = %name, error = %e, "cannot use the connect listener"),
        };
        info!(host = %name, addr = %listen, "connect listener ready");
        let status = Arc::new(Mutex::new(ConnectStatus {
            name: name.clone(),
            listen: listen.to_string(),
            open_streams: 0,
            streams: 0,
            last_error: None,
            last_error_at: None,
        }));
        (self.up.listeners.lock().expect("connect listeners")).push(status.clone());
        let accepting = Trigger::default();
        self.tasks.spawn(accept_loop(
            name.clone(),
            listener,
            status.clone(),
            self.up.clone(),
            self.server.clone(),
            self.identity.clone(),
            self.limits.clone(),
            accepting.clone(),
            self.stop.clone(),
        ));
        self.running.insert(
            name,
            Running {
                listen,
                accepting,
                status,
            },
        );
    }

    /// Makes the running listeners those of `wanted`: each new one is bound before
    /// anything changes (one that cannot be changes nothing), listeners that stay keep
    /// accepting, removed ones stop accepting while their connections run on.
    async fn apply(&mut self, wanted: Vec<(String, SocketAddr)>) -> Result<String, ListenError> {
        let mut added = Vec::new();
        for (name, listen) in &wanted {
            let same = self.running.get(name).is_some_and(|r| {
                r.listen == *listen || (listen.port() == 0 && r.listen.ip() == listen.ip())
            });
            if !same {
                let listener = TcpListener::bind(listen)
                    .await
                    .map_err(|source| ListenError {
                        listen: *listen,
                        name: name.clone(),
                        source,
                    })?;
                added.push((name.clone(), listener));
            }
        }
        let gone: Vec<String> = (self.running.iter())
            .filter(|(name, r)| {
                let kept = wanted.iter().any(|(n, listen)| {
                    n == *name
                        && (r.listen == *listen
                            || (listen.port() == 0 && r.listen.ip() == listen.ip()))
                });
                !kept
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in &gone {
            if let Some(running) = self.running.remove(name) {
                info!(host = %name, addr = %running.listen, "connect listener removed: no new connections; open ones run to their end");
                running.accepting.fire();
                (self.up.listeners.lock().expect("connect listeners"))
                    .retain(|s| !Arc::ptr_eq(s, &running.status));
            }
        }
        let count = added.len();
        for (name, listener) in added {
            self.start(name, listener);
        }
        Ok(format!(
            "{count} connect listener(s) added, {} removed, {} in all",
            gone.len(),
            self.running.len()
        ))
    }
}

/// Serves the connect listeners until `stop` fires, applying each [`Reload`] that comes.
pub(crate) async fn serve(
    specs: Vec<ConnectSpec>,
    up: Arc<UpLinks>,
    server: String,
    identity: watch::Receiver<Arc<Identity>>,
    limits: StreamLimits,
    stop: Trigger,
    mut reloads: tokio::sync::mpsc::Receiver<Reload>,
) {
    let mut listeners = Listeners {
        up,
        server,
        identity,
        limits,
        stop: stop.clone(),
        running: std::collections::HashMap::new(),
        tasks: tokio::task::JoinSet::new(),
    };
    for spec in specs {
        let listener = spec
            .listener
            .set_nonblocking(true)
            .and_then(|()| TcpListener::from_std(spec.listener));
        match listener {
            Ok(listener) => listeners.start(spec.name, listener),
            Err(e) => warn!(host = %spec.name, error = %e, "cannot use the connect listener"),
        }
    }
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            Some((wanted, reply)) = reloads.recv() => {
                let _ = reply.send(listeners.apply(wanted).await);
            }
            Some(_) = listeners.tasks.join_next(), if !listeners.tasks.is_empty() => {}
        }
    }
    while listeners.tasks.join_next().await.is_some() {}
}

#[allow(clippy::too_many_arguments)]
async fn accept_loop(
    name: String,
    listener: TcpListener,
    status: Arc<Mutex<ConnectStatus>>,
    up: Arc<UpLinks>,
    server: String,
    identity: watch::Receiver<Arc<Identity>>,
    limits: StreamLimits,
    accepting: Trigger,
    stop: Trigger,
) {
    let mut streams = tokio::task::JoinSet::new();
    loop {
        let (tcp, peer) = tokio::select! {
            () = stop.cancelled() => break,
            () = accepting.cancelled() => break,
            Some(_) = streams.join_next(), if !streams.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    warn!(host = %name, error = %e, "connect listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        if streams.len() >= MAX_LOCAL {
            warn!(host = %name, client = %peer, "{MAX_LOCAL} connections to {name} are open already; closing this one");
            continue;
        }
        let _ = tcp.set_nodelay(true);
        let (name, status, up, server, identity, limits) = (
            name.clone(),
            status.clone(),
            up.clone(),
            server.clone(),
            identity.clone(),
            limits.clone(),
        );
        streams.spawn(async move {
            let failed = |why: String| {
                warn!(host = %name, client = %peer, "cannot connect to {name}: {why}");
                let mut s = status.lock().expect("connect status");
                s.last_error = Some(why);
                s.last_error_at = Some(time::OffsetDateTime::now_utc().unix_timestamp());
            };
            let early = Bytes::new();
            let request = OpenRequest {
                name: &name,
                client: peer,
                server: None,
                early: &early,
                caller: None,
                tls: None,
            };
            let mut retried = false;
            let stream = loop {
                let link = match up.link(&server, &identity).await {
                    Ok(link) => link,
                    Err(why) => return failed(why),
                };
                let opened = tokio::time::timeout(OPEN_TIMEOUT, link.open(&request)).await;
                match opened {
                    Ok(Ok(stream)) => break stream,
                    // The channel takes no more streams (the proxy moved to a new process,
                    // or it broke): once more on a fresh one.
                    Ok(Err(e)) if e.tunnel_is_gone() && !retried => {
                        debug!(host = %name, error = %e, "mesh channel gone; dialing a new one");
                        up.forget(&link).await;
                        retried = true;
                    }
                    Ok(Err(OpenError::Refused { status, reason })) => {
                        return failed(format!("the proxy refused ({status}): {reason}"))
                    }
                    Ok(Err(e)) => return failed(format!("the tunnel failed: {e}")),
                    Err(_) => return failed(format!("no answer within {OPEN_TIMEOUT:?}")),
                }
            };
            {
                let mut s = status.lock().expect("connect status");
                s.open_streams += 1;
                s.streams += 1;
            }
            debug!(host = %name, client = %peer, "connected");
            let moved = stream.splice(tcp, limits, StreamCounters::default()).await;
            if let Some(e) = moved.error {
                debug!(host = %name, client = %peer, error = %e, "connection ended with an error");
            }
            status.lock().expect("connect status").open_streams -= 1;
        });
    }
    drop(listener);
    // A removed listener's connections run on until they end, or the agent stops.
    tokio::select! {
        () = async { while streams.join_next().await.is_some() {} } => {}
        () = stop.cancelled() => {}
    }
    streams.abort_all();
}
