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

use crate::tunnel::{CLIENT_ADDR_HEADER, ERROR_HEADER};

/// One live tunnel to an agent.
pub struct Tunnel {
    pub id: u64,
    /// Agent name (certificate CN).
    pub agent: String,
    /// Serial of the certificate the agent connected with, hex.
    pub serial: String,
    /// DNS names in the agent's certificate: the most it may ever serve.
    pub cert_hosts: Vec<String>,
    sender: SendRequest<Bytes>,
    /// Notified to close the tunnel (revocation, shutdown).
    pub close: tokio::sync::Notify,
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

/// Why a stream could not be opened on a tunnel.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("tunnel to agent {agent} failed: {source}")]
    Tunnel {
        agent: String,
        #[source]
        source: h2::Error,
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
        match self {
            OpenError::Tunnel { source, .. } => {
                source.is_go_away()
                    || source.is_io()
                    || source.reason() == Some(h2::Reason::REFUSED_STREAM)
            }
            OpenError::Refused { .. } => false,
        }
    }
}

impl Tunnel {
    pub fn new(
        id: u64,
        agent: String,
        serial: String,
        cert_hosts: Vec<String>,
        sender: SendRequest<Bytes>,
    ) -> Tunnel {
        Tunnel {
            id,
            agent,
            serial,
            cert_hosts,
            sender,
            close: tokio::sync::Notify::new(),
        }
    }

    /// Opens a stream for a client of `name`: sends `CONNECT`, then `early` (the bytes
    /// already read from the client) without waiting, and waits for the agent's answer.
    /// Sending the first bytes with the request saves a tunnel round trip per connection;
    /// an agent that refuses the stream drops them, so the caller may offer them to the
    /// next agent. The caller bounds the wait.
    pub async fn open(
        &self,
        name: &str,
        client: SocketAddr,
        early: &Bytes,
    ) -> Result<(SendStream<Bytes>, RecvStream), OpenError> {
        let tunnel_err = |source| OpenError::Tunnel {
            agent: self.agent.clone(),
            source,
        };
        let mut sender = self.sender.clone().ready().await.map_err(tunnel_err)?;
        let request = Request::builder()
            .method(Method::CONNECT)
            .uri(name)
            .header(CLIENT_ADDR_HEADER, client.to_string())
            .body(())
            .expect("a validated name is a valid authority");
        let (response, mut send) = sender.send_request(request, false).map_err(tunnel_err)?;
        // A failure here is the stream being refused or reset: the answer says why.
        let _ = crate::tunnel::h2::send_all(&mut send, early.clone()).await;
        let response = response.await.map_err(tunnel_err)?;
        if response.status() != StatusCode::OK {
            let reason = response
                .headers()
                .get(ERROR_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("no reason given")
                .to_string();
            return Err(OpenError::Refused {
                agent: self.agent.clone(),
                status: response.status(),
                reason,
            });
        }
        Ok((send, response.into_body()))
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
