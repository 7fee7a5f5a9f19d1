//! The live tunnels, indexed by the names they may serve.
//!
//! A tunnel is registered under the DNS names of its agent's certificate that the proxy's
//! state still grants that agent. Lookups spread streams across every tunnel that serves a
//! name (round robin), and [`Tunnel::open`] failures let the caller move to the next one.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use http::{Method, Request, StatusCode};

use crate::tunnel::quic::{Answer, StreamHeader};
use crate::tunnel::{self, CLIENT_ADDR_HEADER, ERROR_HEADER};

/// One live tunnel to an agent.
pub struct Tunnel {
    pub id: u64,
    /// Agent name (certificate CN).
    pub agent: String,
    /// Serial of the certificate the agent connected with, hex.
    pub serial: String,
    /// DNS names in the agent's certificate: the most it may ever serve.
    pub cert_hosts: Vec<String>,
    link: Link,
    /// Notified to close the tunnel (revocation, shutdown).
    pub close: tokio::sync::Notify,
    /// The agent retired this tunnel (GOAWAY): no new streams, but it stays on record so
    /// that a revocation still closes it and its open streams.
    draining: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel")
            .field("id", &self.id)
            .field("agent", &self.agent)
            .field("cert_hosts", &self.cert_hosts)
            .finish_non_exhaustive()
    }
}

/// How the proxy opens streams on a tunnel.
pub enum Link {
    /// HTTP/2 over mTLS: a `CONNECT` per stream.
    H2(SendRequest<Bytes>),
    /// QUIC: a bidirectional stream per client, started with a stream header.
    Quic(quinn::Connection),
}

/// An open stream, ready to be joined to its client's socket.
pub enum TunnelStream {
    H2(SendStream<Bytes>, RecvStream),
    /// The bytes are what followed the agent's answer in the same read.
    Quic(quinn::SendStream, quinn::RecvStream, Bytes),
}

impl TunnelStream {
    /// Copies both ways until both directions end; returns (bytes up, bytes down).
    pub async fn splice(self, tcp: tokio::net::TcpStream) -> std::io::Result<(u64, u64)> {
        match self {
            TunnelStream::H2(send, recv) => tunnel::h2::splice(tcp, send, recv).await,
            TunnelStream::Quic(send, recv, first) => {
                tunnel::quic::splice(tcp, send, recv, first).await
            }
        }
    }
}

/// A QUIC stream being opened: reset (and its receive side stopped by its own drop) unless
/// taken out once the agent accepted it.
struct ResetOnDrop(Option<quinn::SendStream>);

impl Drop for ResetOnDrop {
    fn drop(&mut self) {
        if let Some(send) = &mut self.0 {
            let _ = send.reset(quinn::VarInt::from_u32(tunnel::quic::code::ABORTED));
        }
    }
}

/// Why a stream could not be opened on a tunnel.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("tunnel to agent {agent} failed: {reason}")]
    Tunnel {
        agent: String,
        reason: String,
        /// The tunnel takes no more streams (GOAWAY, connection lost), as opposed to
        /// this one stream failing.
        gone: bool,
    },
    #[error("agent {agent} answered {status}: {reason}")]
    Refused {
        agent: String,
        status: StatusCode,
        reason: String,
    },
}

impl OpenError {
    /// Whether the tunnel itself will take no more streams (the agent sent GOAWAY, or the
    /// connection failed), as opposed to this one stream being refused.
    pub fn tunnel_is_gone(&self) -> bool {
        matches!(self, OpenError::Tunnel { gone: true, .. })
    }
}

impl Tunnel {
    pub fn new(
        id: u64,
        agent: String,
        serial: String,
        cert_hosts: Vec<String>,
        link: Link,
    ) -> Tunnel {
        Tunnel {
            id,
            agent,
            serial,
            cert_hosts,
            link,
            close: tokio::sync::Notify::new(),
            draining: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Which transport the tunnel runs on, for logs and status.
    pub fn transport(&self) -> &'static str {
        match self.link {
            Link::H2(_) => "h2",
            Link::Quic(_) => "quic",
        }
    }

    /// Opens a stream for a client of `name` and sends `early` (the bytes already read
    /// from the client) without waiting, then waits for the agent's answer. Sending the
    /// first bytes with the request saves a tunnel round trip per connection; an agent
    /// that refuses the stream drops them, so the caller may offer them to the next
    /// agent. The caller bounds the wait.
    pub async fn open(
        &self,
        name: &str,
        client: SocketAddr,
        early: &Bytes,
    ) -> Result<TunnelStream, OpenError> {
        match &self.link {
            Link::H2(sender) => self.open_h2(sender, name, client, early).await,
            Link::Quic(conn) => self.open_quic(conn, name, client, early).await,
        }
    }

    fn refused(&self, status: StatusCode, reason: String) -> OpenError {
        OpenError::Refused {
            agent: self.agent.clone(),
            status,
            reason,
        }
    }

    async fn open_h2(
        &self,
        sender: &SendRequest<Bytes>,
        name: &str,
        client: SocketAddr,
        early: &Bytes,
    ) -> Result<TunnelStream, OpenError> {
        let tunnel_err = |source: h2::Error| OpenError::Tunnel {
            agent: self.agent.clone(),
            gone: source.is_go_away()
                || source.is_io()
                || source.reason() == Some(h2::Reason::REFUSED_STREAM),
            reason: source.to_string(),
        };
        let mut sender = sender.clone().ready().await.map_err(tunnel_err)?;
        let request = Request::builder()
            .method(Method::CONNECT)
            .uri(name)
            .header(CLIENT_ADDR_HEADER, client.to_string())
            .body(())
            .expect("a validated name is a valid authority");
        let (response, mut send) = sender.send_request(request, false).map_err(tunnel_err)?;
        // A failure here is the stream being refused or reset: the answer says why.
        let _ = tunnel::h2::send_all(&mut send, early.clone()).await;
        let response = response.await.map_err(tunnel_err)?;
        if response.status() != StatusCode::OK {
            let reason = response
                .headers()
                .get(ERROR_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("no reason given")
                .to_string();
            return Err(self.refused(response.status(), reason));
        }
        Ok(TunnelStream::H2(send, response.into_body()))
    }

    async fn open_quic(
        &self,
        conn: &quinn::Connection,
        name: &str,
        client: SocketAddr,
        early: &Bytes,
    ) -> Result<TunnelStream, OpenError> {
        let failed = |reason: String, gone: bool| OpenError::Tunnel {
            agent: self.agent.clone(),
            reason,
            gone,
        };
        let header = StreamHeader {
            name: name.to_string(),
            client: client.to_string(),
        }
        .encode()
        .expect("a validated name fits a stream header");
        let (send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| failed(e.to_string(), true))?;
        // Until the agent says 200, giving up (an error, or the caller's timeout dropping
        // this future) resets the stream, so the agent never hands the first bytes to a
        // backend while the proxy offers them to another agent.
        let mut opening = ResetOnDrop(Some(send));
        let send = opening.0.as_mut().expect("set above");
        // Header and first bytes leave together; a refusing agent drops them.
        let mut chunks = [header, early.clone()];
        let _ = send.write_all_chunks(&mut chunks).await;
        let (answer, first) = tunnel::quic::read_frame(&mut recv, Answer::parse)
            .await
            .map_err(|e| failed(format!("no answer: {e}"), conn.close_reason().is_some()))?;
        if answer.status != 200 {
            let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_GATEWAY);
            return Err(self.refused(status, answer.reason));
        }
        let send = opening.0.take().expect("set above");
        Ok(TunnelStream::Quic(send, recv, first))
    }
}

/// The names of `cert_hosts` that `grant` still covers.
pub fn granted_hosts(cert_hosts: &[String], grant: &[String]) -> Vec<String> {
    cert_hosts
        .iter()
        .filter(|h| {
            grant
                .iter()
                .any(|g| g == *h || crate::route::name_matches(g, h))
        })
        .cloned()
        .collect()
}

#[derive(Debug, Default)]
struct Inner {
    /// Every live tunnel and the names it serves now.
    tunnels: HashMap<u64, (Arc<Tunnel>, Vec<String>)>,
    /// Name pattern (exact or `*.suffix`) → tunnels serving it; rebuilt on every change.
    by_pattern: HashMap<String, Vec<Arc<Tunnel>>>,
}

impl Inner {
    fn reindex(&mut self) {
        self.by_pattern.clear();
        let mut ids: Vec<&u64> = self.tunnels.keys().collect();
        ids.sort(); // stable order: oldest tunnel first
        for id in ids {
            let (tunnel, hosts) = &self.tunnels[id];
            if tunnel.draining.load(Ordering::Relaxed) {
                continue;
            }
            for host in hosts {
                self.by_pattern
                    .entry(host.clone())
                    .or_default()
                    .push(tunnel.clone());
            }
        }
    }
}

/// All live tunnels.
#[derive(Debug)]
pub struct Registry {
    inner: RwLock<Inner>,
    next_id: AtomicU64,
    turn: AtomicUsize,
    /// Bumped on every change, for whoever waits for one.
    changes: tokio::sync::watch::Sender<u64>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            inner: RwLock::default(),
            next_id: AtomicU64::new(1),
            turn: AtomicUsize::new(0),
            changes: tokio::sync::watch::channel(0).0,
        }
    }
}

impl Registry {
    /// A fresh tunnel id.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Registers `tunnel` as serving `hosts`.
    pub fn insert(&self, tunnel: Arc<Tunnel>, hosts: Vec<String>) {
        let mut inner = self.inner.write().expect("registry lock");
        inner.tunnels.insert(tunnel.id, (tunnel, hosts));
        inner.reindex();
        drop(inner);
        self.changes.send_modify(|n| *n += 1);
    }

    /// A receiver that sees every change to the set of tunnels.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Routes nothing new to tunnel `id` (its agent retired it, or it failed to open a
    /// stream); it stays on record, so revocation still reaches it, until [`Self::remove`].
    pub fn retire(&self, id: u64) {
        let mut inner = self.inner.write().expect("registry lock");
        let Some((tunnel, _)) = inner.tunnels.get(&id) else {
            return;
        };
        if tunnel.draining.swap(true, Ordering::Relaxed) {
            return;
        }
        inner.reindex();
        drop(inner);
        self.changes.send_modify(|n| *n += 1);
    }

    /// Forgets tunnel `id`: it has closed.
    pub fn remove(&self, id: u64) {
        let mut inner = self.inner.write().expect("registry lock");
        if inner.tunnels.remove(&id).is_none() {
            return;
        }
        inner.reindex();
        drop(inner);
        self.changes.send_modify(|n| *n += 1);
    }

    /// Brings live tunnels in line with the proxy state: tunnels of revoked certificates
    /// are closed, and every tunnel serves what its agent is granted now.
    pub fn apply(&self, state: &super::watch::Snapshot) {
        let mut inner = self.inner.write().expect("registry lock");
        let mut changed = false;
        inner.tunnels.retain(|_, (tunnel, hosts)| {
            if state.revoked.contains(&tunnel.serial) {
                tracing::warn!(agent = %tunnel.agent, serial = %tunnel.serial, tunnel = tunnel.id, "certificate revoked; closing its tunnel");
                tunnel.close.notify_one();
                changed = true;
                return false;
            }
            let grant = state.grants.get(&tunnel.agent).map(Vec::as_slice).unwrap_or_default();
            let now = granted_hosts(&tunnel.cert_hosts, grant);
            if now != *hosts {
                tracing::info!(agent = %tunnel.agent, tunnel = tunnel.id, before = ?hosts, after = ?now, "grant changed; tunnel now serves these names");
                *hosts = now;
                changed = true;
            }
            true
        });
        if changed {
            inner.reindex();
            drop(inner);
            self.changes.send_modify(|n| *n += 1);
        }
    }

    /// Every tunnel serving `name`, rotated so that successive calls start at different
    /// tunnels.
    pub fn lookup(&self, name: &str) -> Vec<Arc<Tunnel>> {
        let inner = self.inner.read().expect("registry lock");
        let mut found: Vec<Arc<Tunnel>> = inner.by_pattern.get(name).cloned().unwrap_or_default();
        if let Some((_, parent)) = name.split_once('.') {
            if let Some(wild) = inner.by_pattern.get(&format!("*.{parent}")) {
                for t in wild {
                    if !found.iter().any(|f| f.id == t.id) {
                        found.push(t.clone());
                    }
                }
            }
        }
        drop(inner);
        if found.len() > 1 {
            let start = self.turn.fetch_add(1, Ordering::Relaxed) % found.len();
            found.rotate_left(start);
        }
        found
    }
}
