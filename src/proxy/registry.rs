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
    /// Name patterns this tunnel serves.
    pub hosts: Vec<String>,
    sender: SendRequest<Bytes>,
    /// Notified to close the tunnel (revocation, shutdown).
    pub close: tokio::sync::Notify,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel")
            .field("id", &self.id)
            .field("agent", &self.agent)
            .field("hosts", &self.hosts)
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
        hosts: Vec<String>,
        sender: SendRequest<Bytes>,
    ) -> Tunnel {
        Tunnel {
            id,
            agent,
            serial,
            hosts,
            sender,
            close: tokio::sync::Notify::new(),
        }
    }

    /// Opens a stream for a client of `name`: sends `CONNECT` and waits for the agent's
    /// answer. The caller bounds the wait.
    pub async fn open(
        &self,
        name: &str,
        client: SocketAddr,
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
        let (response, send) = sender.send_request(request, false).map_err(tunnel_err)?;
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

/// All live tunnels.
#[derive(Debug)]
pub struct Registry {
    /// Name pattern (exact or `*.suffix`) → tunnels serving it.
    by_pattern: RwLock<HashMap<String, Vec<Arc<Tunnel>>>>,
    next_id: AtomicU64,
    turn: AtomicUsize,
    /// Bumped on every insert and removal, for whoever waits for a change.
    changes: tokio::sync::watch::Sender<u64>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            by_pattern: RwLock::default(),
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

    pub fn insert(&self, tunnel: Arc<Tunnel>) {
        let mut map = self.by_pattern.write().expect("registry lock");
        for host in &tunnel.hosts {
            map.entry(host.clone()).or_default().push(tunnel.clone());
        }
        drop(map);
        self.changes.send_modify(|n| *n += 1);
    }

    /// A receiver that sees every change to the set of tunnels.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    pub fn remove(&self, id: u64) {
        let mut map = self.by_pattern.write().expect("registry lock");
        map.retain(|_, tunnels| {
            tunnels.retain(|t| t.id != id);
            !tunnels.is_empty()
        });
        drop(map);
        self.changes.send_modify(|n| *n += 1);
    }

    /// Every tunnel serving `name`, rotated so that successive calls start at different
    /// tunnels.
    pub fn lookup(&self, name: &str) -> Vec<Arc<Tunnel>> {
        let map = self.by_pattern.read().expect("registry lock");
        let mut found: Vec<Arc<Tunnel>> = map.get(name).cloned().unwrap_or_default();
        if let Some((_, parent)) = name.split_once('.') {
            if let Some(wild) = map.get(&format!("*.{parent}")) {
                for t in wild {
                    if !found.iter().any(|f| f.id == t.id) {
                        found.push(t.clone());
                    }
                }
            }
        }
        drop(map);
        if found.len() > 1 {
            let start = self.turn.fetch_add(1, Ordering::Relaxed) % found.len();
            found.rotate_left(start);
        }
        found
    }

    /// Every live tunnel (each once).
    pub fn all(&self) -> Vec<Arc<Tunnel>> {
        let map = self.by_pattern.read().expect("registry lock");
        let mut out: Vec<Arc<Tunnel>> = Vec::new();
        for t in map.values().flatten() {
            if !out.iter().any(|o| o.id == t.id) {
                out.push(t.clone());
            }
        }
        out
    }
}
