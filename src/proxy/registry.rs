//! The live tunnels, indexed by the names they may serve: what the public path asks
//! "who serves this name?". It names no transport: a tunnel is an agent, its certificate
//! and a [`Link`] to open streams on.
//!
//! A tunnel is registered under the DNS names of its agent's certificate that the proxy's
//! state still grants that agent. A lookup finds the tunnels granted the exact name apart
//! from those granted a covering wildcard (the most specific wins), spreads streams round
//! robin within each group, and a failed open lets the caller move to the next one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use super::admit::Peer;
use super::state::Snapshot;
use crate::tunnel::{Link, OpenError, OpenRequest, TunnelStream};

/// One live tunnel to an agent.
pub(super) struct Tunnel {
    pub(super) id: u64,
    /// Agent name (certificate CN).
    pub(super) agent: String,
    /// Serial of the certificate the agent connected with, hex.
    pub(super) serial: String,
    /// DNS names in the agent's certificate: the most it may ever serve.
    pub(super) cert_hosts: Vec<String>,
    /// End of the certificate's validity, Unix seconds.
    pub(super) not_after: i64,
    /// Where the agent connected from.
    pub(super) peer: std::net::SocketAddr,
    /// When the tunnel came up, Unix seconds.
    pub(super) since: i64,
    link: Link,
    /// Where the tunnel runs (a lane for h2, the main runtime for QUIC), and its client
    /// streams are spliced too.
    pub(super) lane: crate::runtime::lanes::Lane,
    /// Notified to close the tunnel (revocation).
    pub(super) close: tokio::sync::Notify,
    /// The agent retired this tunnel (GOAWAY): no new streams, but it stays on record so
    /// that a revocation still closes it and its open streams.
    draining: AtomicBool,
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

impl Tunnel {
    pub(super) fn new(id: u64, who: Peer, link: Link, peer: std::net::SocketAddr) -> Tunnel {
        Tunnel {
            id,
            agent: who.agent,
            serial: who.serial,
            cert_hosts: who.cert_hosts,
            not_after: who.not_after,
            peer,
            since: time::OffsetDateTime::now_utc().unix_timestamp(),
            link,
            lane: crate::runtime::lanes::Lane::here(),
            close: tokio::sync::Notify::new(),
            draining: AtomicBool::new(false),
        }
    }

    /// Which transport the tunnel runs on, for logs and status.
    pub(super) fn transport(&self) -> &'static str {
        self.link.kind().name()
    }

    /// Tells the agent that a new process serves this proxy now.
    pub(super) async fn tell_moving(&self) {
        self.link.tell_moving().await;
    }

    /// Opens a stream for a client; the caller bounds the wait.
    pub(super) async fn open(&self, req: &OpenRequest<'_>) -> Result<TunnelStream, OpenError> {
        self.link.open(req).await
    }
}

/// The names a tunnel serves: to public clients, and only through the mesh.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Served {
    pub(super) public: Vec<String>,
    pub(super) private: Vec<String>,
}

impl Served {
    /// Every name, public ones first.
    pub(super) fn all(&self) -> Vec<String> {
        self.public.iter().chain(&self.private).cloned().collect()
    }
}

#[derive(Debug, Default)]
struct Inner {
    /// Every live tunnel and the names it serves now.
    tunnels: HashMap<u64, (Arc<Tunnel>, Served)>,
    /// Name pattern (exact or `*.suffix`) → tunnels serving it to public clients; rebuilt
    /// on every change.
    by_pattern: HashMap<String, Routes>,
    /// The same for names served only through the mesh.
    by_private: HashMap<String, Routes>,
}

/// The tunnels serving one name pattern: for each certificate the newest tunnel first
/// (streams are spread round robin over these: several agents, or replicas of one agent
/// enrolled apart, each with a certificate of its own), then the older tunnels of the same
/// certificate, tried only when those fail. An agent that restarts after a crash comes
/// back with the same certificate while its dead tunnel has not timed out yet (a QUIC peer
/// that died sends nothing): new streams go to the new tunnel at once. A transport change
/// keeps the certificate too, and the newer tunnel is the one that stays.
#[derive(Debug, Default, Clone)]
struct Routes {
    first: Vec<Arc<Tunnel>>,
    later: Vec<Arc<Tunnel>>,
}

impl Routes {
    fn push(&mut self, tunnel: &Arc<Tunnel>) {
        // Tunnels come newest first: a certificate seen already has a newer one here.
        if self.first.iter().any(|t| t.serial == tunnel.serial) {
            self.later.push(tunnel.clone());
        } else {
            self.first.push(tunnel.clone());
        }
    }

    fn contains(&self, id: u64) -> bool {
        self.first.iter().chain(&self.later).any(|t| t.id == id)
    }
}

impl Inner {
    fn reindex(&mut self) {
        self.by_pattern.clear();
        self.by_private.clear();
        let mut ids: Vec<&u64> = self.tunnels.keys().collect();
        ids.sort_by(|a, b| b.cmp(a)); // newest tunnel first
        for id in ids {
            let (tunnel, served) = &self.tunnels[id];
            if tunnel.draining.load(Ordering::Relaxed) {
                continue;
            }
            for host in &served.public {
                self.by_pattern
                    .entry(host.clone())
                    .or_default()
                    .push(tunnel);
            }
            for host in &served.private {
                self.by_private
                    .entry(host.clone())
                    .or_default()
                    .push(tunnel);
            }
        }
    }
}

/// All live tunnels.
#[derive(Debug)]
pub(super) struct Registry {
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

/// Why a tunnel was not registered.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum NotRegistered {
    /// Its agent holds this many tunnels already.
    OverLimit(usize),
    /// Its certificate was revoked since it was admitted.
    Revoked,
    /// Its certificate is no longer on record.
    NotOnRecord,
}

impl Registry {
    /// A fresh tunnel id.
    pub(super) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Registers `tunnel` as serving what the state in force grants it, and returns that,
    /// unless its agent already holds `max` tunnels (draining ones included) or its
    /// certificate is revoked by now.
    ///
    /// The state is read (`current`) under the registry's lock: a tunnel admitted on a
    /// state read just before a revocation is either refused here or still registered
    /// when the state watch applies the revocation ([`Self::apply`]), never missed by
    /// both.
    pub(super) fn insert(
        &self,
        tunnel: Arc<Tunnel>,
        max: usize,
        current: impl FnOnce() -> Arc<Snapshot>,
    ) -> Result<Served, NotRegistered> {
        let mut inner = self.inner.write().expect("registry lock");
        let held = inner
            .tunnels
            .values()
            .filter(|(t, _)| t.agent == tunnel.agent)
            .count();
        if held >= max {
            return Err(NotRegistered::OverLimit(held));
        }
        let state = current();
        if state.revoked.contains(&tunnel.serial) {
            return Err(NotRegistered::Revoked);
        }
        if !state.live.contains(&tunnel.serial) {
            return Err(NotRegistered::NotOnRecord);
        }
        let hosts = state.served(&tunnel.agent, &tunnel.cert_hosts);
        inner.tunnels.insert(tunnel.id, (tunnel, hosts.clone()));
        inner.reindex();
        drop(inner);
        self.changes.send_modify(|n| *n += 1);
        Ok(hosts)
    }

    /// The tunnels serving `name` to public clients ([`Self::lookup`]), waiting until
    /// `until` for one to register if none is there yet.
    pub(super) async fn wait_for(&self, name: &str, until: tokio::time::Instant) -> Found {
        let mut changes = self.subscribe();
        loop {
            let found = self.lookup(name);
            if !found.is_empty() {
                return found;
            }
            match tokio::time::timeout_at(until, changes.changed()).await {
                Ok(Ok(())) => {}
                _ => return found,
            }
        }
    }

    /// A receiver that sees every change to the set of tunnels.
    pub(super) fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Routes nothing new to tunnel `id` (its agent retired it, or it failed to open a
    /// stream); it stays on record, so revocation still reaches it, until [`Self::remove`].
    pub(super) fn retire(&self, id: u64) {
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
    pub(super) fn remove(&self, id: u64) {
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
    pub(super) fn apply(&self, state: &Snapshot) {
        let mut inner = self.inner.write().expect("registry lock");
        let mut changed = false;
        inner.tunnels.retain(|_, (tunnel, hosts)| {
            if state.revoked.contains(&tunnel.serial) {
                tracing::warn!(agent = %tunnel.agent, serial = %tunnel.serial, tunnel = tunnel.id, "certificate revoked; closing its tunnel");
                tunnel.close.notify_one();
                changed = true;
                return false;
            }
            let now = state.served(&tunnel.agent, &tunnel.cert_hosts);
            if now != *hosts {
                tracing::info!(agent = %tunnel.agent, tunnel = tunnel.id, hosts = %crate::runtime::logging::list(&now.public), private = %crate::runtime::logging::list(&now.private), was = %crate::runtime::logging::list(hosts.all()), "grant changed; tunnel now serves these names");
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

    /// How many tunnels each agent holds, by transport (draining ones included).
    pub(super) fn counts(&self) -> Vec<(String, &'static str, usize)> {
        let inner = self.inner.read().expect("registry lock");
        let mut counts: HashMap<(String, &'static str), usize> = HashMap::new();
        for (tunnel, _) in inner.tunnels.values() {
            *counts
                .entry((tunnel.agent.clone(), tunnel.transport()))
                .or_default() += 1;
        }
        counts
            .into_iter()
            .map(|((agent, transport), n)| (agent, transport, n))
            .collect()
    }

    /// Every live tunnel and the names it serves now, oldest first.
    pub(super) fn snapshot(&self) -> Vec<(Arc<Tunnel>, Vec<String>, bool)> {
        let inner = self.inner.read().expect("registry lock");
        let mut all: Vec<_> = inner
            .tunnels
            .values()
            .map(|(t, served)| (t.clone(), served.all(), t.draining.load(Ordering::Relaxed)))
            .collect();
        all.sort_by_key(|(t, _, _)| t.id);
        all
    }

    /// The tunnels serving `name` to public clients: those granted exactly `name`, and
    /// apart from them those granted a wildcard that covers it. Each group is rotated so
    /// that successive calls start at different tunnels (round robin within a group, never
    /// across).
    pub(super) fn lookup(&self, name: &str) -> Found {
        self.find(name, false)
    }

    /// The tunnels serving `name` to a mesh stream: privately or publicly, the most
    /// specific first as for [`Self::lookup`].
    pub(super) fn lookup_mesh(&self, name: &str) -> Found {
        self.find(name, true)
    }

    fn find(&self, name: &str, mesh: bool) -> Found {
        let inner = self.inner.read().expect("registry lock");
        let get = |pattern: &str| {
            let mut found = inner.by_pattern.get(pattern).cloned().unwrap_or_default();
            if mesh {
                for t in (inner.by_private.get(pattern).into_iter())
                    .flat_map(|r| r.first.iter().chain(&r.later))
                {
                    if !found.contains(t.id) {
                        found.push(t);
                    }
                }
            }
            found
        };
        let exact = get(name);
        let wildcard = name
            .split_once('.')
            .filter(|(label, _)| !label.is_empty()) // as `route::name_matches` has it
            .map(|(_, parent)| get(&format!("*.{parent}")))
            .map(|wild| Routes {
                first: (wild.first.into_iter())
                    .filter(|t| !exact.contains(t.id))
                    .collect(),
                later: (wild.later.into_iter())
                    .filter(|t| !exact.contains(t.id))
                    .collect(),
            })
            .unwrap_or_default();
        drop(inner);
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        let ordered = |routes: Routes| {
            let mut all = rotated(routes.first, turn);
            all.extend(routes.later);
            all
        };
        Found {
            exact: ordered(exact),
            wildcard: ordered(wildcard),
        }
    }
}

/// What [`Registry::lookup`] found, the most specific first.
#[derive(Debug, Default)]
pub(super) struct Found {
    /// Tunnels granted exactly the name.
    pub(super) exact: Vec<Arc<Tunnel>>,
    /// Tunnels granted a wildcard covering the name (none of `exact`).
    pub(super) wildcard: Vec<Arc<Tunnel>>,
}

impl Found {
    pub(super) fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.wildcard.is_empty()
    }

    /// Every tunnel found, the most specific first.
    pub(super) fn all(&self) -> impl Iterator<Item = &Arc<Tunnel>> {
        self.exact.iter().chain(&self.wildcard)
    }
}

fn rotated(mut tunnels: Vec<Arc<Tunnel>>, turn: usize) -> Vec<Arc<Tunnel>> {
    if tunnels.len() > 1 {
        let start = turn % tunnels.len();
        tunnels.rotate_left(start);
    }
    tunnels
}

/// What the running proxy serves, for embedders, health checks and tests.
#[derive(Clone, Debug)]
pub struct ProxyStatus {
    registry: Arc<Registry>,
}

impl ProxyStatus {
    pub(super) fn new(registry: Arc<Registry>) -> ProxyStatus {
        ProxyStatus { registry }
    }

    /// How many live tunnels serve `name` (to public clients or through the mesh).
    pub fn tunnels_for(&self, name: &str) -> usize {
        self.registry.lookup_mesh(name).all().count()
    }

    /// How many live tunnels agent `agent` holds (whether or not they serve any name).
    pub fn tunnels_of(&self, agent: &str) -> usize {
        self.registry
            .counts()
            .into_iter()
            .filter(|(a, _, _)| a == agent)
            .map(|(_, _, n)| n)
            .sum()
    }

    /// The ids of the tunnels `agent` holds now (draining ones included), oldest first.
    pub fn tunnel_ids_of(&self, agent: &str) -> Vec<u64> {
        let mut ids: Vec<u64> = (self.registry.snapshot().into_iter())
            .filter(|(t, _, _)| t.agent == agent)
            .map(|(t, _, _)| t.id)
            .collect();
        ids.sort();
        ids
    }

    /// Waits until agent `agent` holds `count` live tunnels, or `timeout` passes.
    pub async fn wait_for_agent(&self, agent: &str, count: usize, timeout: Duration) -> bool {
        self.wait_until(|| self.tunnels_of(agent) == count, timeout)
            .await
    }

    /// The transports (`"h2"`, `"quic"`) new streams for `name` go to, sorted: one per
    /// certificate, its newest tunnel's (older ones are only a fallback).
    pub fn transports_for(&self, name: &str) -> Vec<&'static str> {
        let mut certificates = std::collections::HashSet::new();
        let mut kinds: Vec<_> = (self.registry.lookup_mesh(name).all())
            .filter(|t| certificates.insert(t.serial.clone()))
            .map(|t| t.transport())
            .collect();
        kinds.sort_unstable();
        kinds
    }

    /// Waits until exactly `count` live tunnels serve `name`, or `timeout` passes; returns
    /// whether it happened.
    pub async fn wait_for_tunnels(&self, name: &str, count: usize, timeout: Duration) -> bool {
        self.wait_until(|| self.tunnels_for(name) == count, timeout)
            .await
    }

    /// Waits until the live tunnels serving `name` run on exactly `transports` (sorted, as
    /// [`Self::transports_for`] gives them), or `timeout` passes; returns whether it did.
    pub async fn wait_for_transports(
        &self,
        name: &str,
        transports: &[&str],
        timeout: Duration,
    ) -> bool {
        self.wait_until(|| self.transports_for(name) == transports, timeout)
            .await
    }

    async fn wait_until(&self, done: impl Fn() -> bool, timeout: Duration) -> bool {
        let mut changes = self.registry.subscribe();
        let wait = async {
            loop {
                if done() {
                    return;
                }
                if changes.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tunnel of agent `web` (serial `01`, certificate for `app.example.com`) over a
    /// real HTTP/2 connection in memory.
    async fn tunnel(id: u64) -> Arc<Tunnel> {
        let (client, server) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            if let Ok(mut conn) = h2::server::handshake(server).await {
                while conn.accept().await.is_some() {}
            }
        });
        let (send, conn) = h2::client::handshake(client).await.unwrap();
        tokio::spawn(conn);
        let who = Peer {
            agent: "web".into(),
            serial: "01".into(),
            cert_hosts: vec!["app.example.com".into()],
            not_after: i64::MAX,
        };
        let peer = "127.0.0.1:9".parse().unwrap();
        Arc::new(Tunnel::new(id, who, Link::H2(send), peer))
    }

    fn state(revoked: bool) -> Arc<Snapshot> {
        let mut s = Snapshot::default();
        s.live.insert("01".into());
        if revoked {
            s.live.clear();
            s.revoked.insert("01".into());
        }
        s.public
            .insert("web".into(), vec!["app.example.com".into()]);
        s.grants
            .insert("web".into(), vec!["app.example.com".into()]);
        Arc::new(s)
    }

    /// A tunnel admitted on a state read just before a revocation is checked again as it
    /// registers, against the state in force then: refused, and nothing routes to it.
    #[tokio::test]
    async fn a_tunnel_revoked_while_it_was_admitted_is_not_registered() {
        let registry = Registry::default();
        let refused = registry.insert(tunnel(1).await, 4, || state(true));
        assert_eq!(refused.err(), Some(NotRegistered::Revoked));
        assert!(registry.lookup("app.example.com").is_empty());

        let served = registry
            .insert(tunnel(2).await, 4, || state(false))
            .unwrap();
        assert_eq!(served.public, ["app.example.com"]);
        assert!(!registry.lookup("app.example.com").is_empty());
        // And one arriving once the agent holds its most is refused for that.
        let over = registry.insert(tunnel(3).await, 1, || state(false));
        assert_eq!(over.err(), Some(NotRegistered::OverLimit(1)));
    }
}
