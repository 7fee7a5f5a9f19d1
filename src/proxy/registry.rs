//! The live tunnels, indexed by the names they may serve: what the public path asks
//! "who serves this name?". It names no transport: a tunnel is an agent, its certificate
//! and a [`Link`] to open streams on.
//!
//! A tunnel is registered under the DNS names of its agent's certificate that the proxy's
//! state still grants that agent. A lookup finds the tunnels granted the exact name apart
//! from those granted a covering wildcard (the most specific wins), spreads streams round
//! robin within each group, and a failed open lets the caller move to the next one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

mod index;

use super::state::Snapshot;
pub(super) use super::tunnel::{NewTunnel, Slot, Tunnel};
use crate::tunnel::{MAX_EXTRA_TUNNELS, MAX_STREAMS};
use index::Inner;

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

/// The tunnels serving one name pattern. For each certificate a pool: its newest tunnel
/// and the extra tunnels its agent added beside it, over which streams are spread by load
/// (several agents, or replicas of one agent enrolled apart, each with a certificate of
/// its own, take turns). Then the older tunnels of the same certificates, tried only when
/// those fail. An agent that restarts after a crash comes back with the same certificate
/// while its dead tunnels have not timed out yet (a QUIC peer that died sends nothing):
/// new streams go to the new tunnel at once. A transport change keeps the certificate
/// too, and the newer tunnel is the one that stays.
#[derive(Debug, Default, Clone)]
struct Routes {
    pools: Vec<Vec<Arc<Tunnel>>>,
    later: Vec<Arc<Tunnel>>,
}

/// Whether a pool still takes tunnels: they come newest first, so an agent's extra
/// tunnels come before the tunnel they joined, and once that one is in, every older
/// tunnel of the certificate is a fallback.
fn is_open(pool: &[Arc<Tunnel>]) -> bool {
    pool.iter().all(|t| t.extra)
}

impl Routes {
    fn push(&mut self, tunnel: &Arc<Tunnel>) {
        match (self.pools.iter_mut()).find(|pool| pool[0].serial == tunnel.serial) {
            None => self.pools.push(vec![tunnel.clone()]),
            Some(pool) if is_open(pool) => pool.push(tunnel.clone()),
            Some(_) => self.later.push(tunnel.clone()),
        }
    }

    fn contains(&self, id: u64) -> bool {
        self.all().any(|t| t.id == id)
    }

    /// Every tunnel, in the order they were pushed.
    fn all(&self) -> impl Iterator<Item = &Arc<Tunnel>> {
        self.pools.iter().flatten().chain(&self.later)
    }

    /// Without the tunnels `drop` says.
    fn without(self, drop: impl Fn(&Tunnel) -> bool) -> Routes {
        Routes {
            pools: (self.pools.into_iter())
                .map(|pool| pool.into_iter().filter(|t| !drop(t)).collect::<Vec<_>>())
                .filter(|pool| !pool.is_empty())
                .collect(),
            later: self.later.into_iter().filter(|t| !drop(t)).collect(),
        }
    }

    /// The order to try them in: the least loaded tunnel of each pool, the pools taking
    /// turns by `turn`; then the rest of each pool, least loaded first; then the older
    /// tunnels.
    fn ordered(self, turn: usize) -> Vec<Arc<Tunnel>> {
        let mut pools = self.pools;
        for pool in &mut pools {
            // Loads move while this sorts: each is read once.
            pool.sort_by_cached_key(|t| t.streams());
        }
        let heads = pools.iter().map(|pool| pool[0].clone()).collect();
        let mut all = rotated(heads, turn);
        all.extend(pools.into_iter().flat_map(|pool| pool.into_iter().skip(1)));
        all.extend(self.later);
        all
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
    /// Notified when a stream slot frees on a tunnel that had none ([`Tunnel::claim`]).
    room: Arc<tokio::sync::Notify>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            inner: RwLock::default(),
            next_id: AtomicU64::new(1),
            turn: AtomicUsize::new(0),
            changes: tokio::sync::watch::channel(0).0,
            room: Arc::default(),
        }
    }
}

/// Why a tunnel was not registered.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum NotRegistered {
    /// Its agent holds this many tunnels (of its own, or extra ones) already.
    OverLimit(usize),
    /// An extra tunnel, while the agent's tunnels carry fewer than half their streams.
    NotBusy { streams: usize, tunnels: usize },
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

    /// What a new tunnel's slots notify as they free ([`Tunnel::claim`]).
    pub(super) fn room(&self) -> Arc<tokio::sync::Notify> {
        self.room.clone()
    }

    /// Registers `tunnel` as serving what the state in force grants it, and returns that,
    /// unless its agent already holds `max` tunnels of its own (draining ones included),
    /// or its certificate is revoked by now. An extra tunnel counts apart: at most
    /// [`MAX_EXTRA_TUNNELS`] of them, each admitted only while the agent's tunnels carry
    /// at least half their streams, so the tunnels an agent holds grow with its load and
    /// an idle agent cannot pile them up.
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
        let held: Vec<&Arc<Tunnel>> = inner.of_agent(&tunnel.agent).collect();
        if tunnel.extra {
            let extras = held.iter().filter(|t| t.extra).count();
            if extras >= MAX_EXTRA_TUNNELS {
                return Err(NotRegistered::OverLimit(extras));
            }
            let live: Vec<_> = held.iter().filter(|t| !t.is_draining()).collect();
            let streams = live.iter().map(|t| t.streams()).sum::<usize>();
            if live.is_empty() || streams < live.len() * MAX_STREAMS as usize / 2 {
                return Err(NotRegistered::NotBusy {
                    streams,
                    tunnels: live.len(),
                });
            }
        } else {
            let own = held.iter().filter(|t| !t.extra).count();
            if own >= max {
                return Err(NotRegistered::OverLimit(own));
            }
        }
        let state = current();
        if state.revoked.contains(&tunnel.serial) {
            return Err(NotRegistered::Revoked);
        }
        if !state.live.contains(&tunnel.serial) {
            return Err(NotRegistered::NotOnRecord);
        }
        let hosts = state.served(&tunnel.agent, &tunnel.cert_hosts);
        inner.add(tunnel, hosts.clone());
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

    /// A stream slot on `tunnel`, or when it has none free, on the least loaded tunnel of
    /// its pool that has one ([`Routes`]); when none has, waits for a slot to free or a
    /// tunnel to join until `deadline`. `None` at the deadline, or at once when `tunnel`
    /// was retired and its pool is full: the caller tries its next tunnel.
    pub(super) async fn claim(
        &self,
        tunnel: &Arc<Tunnel>,
        deadline: tokio::time::Instant,
    ) -> Option<(Arc<Tunnel>, Slot)> {
        let mut changes = self.subscribe();
        loop {
            // Listening before looking, so that a slot freed in between is not missed.
            let room = self.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            if let Some(slot) = tunnel.claim() {
                return Some((tunnel.clone(), slot));
            }
            let mut pool = self.pool_of(tunnel);
            pool.sort_by_cached_key(|t| t.streams());
            if let Some(found) = pool.into_iter().find_map(|t| Some((t.clone(), t.claim()?))) {
                return Some(found);
            }
            if tunnel.is_draining() {
                return None;
            }
            tokio::select! {
                () = room => {}
                _ = changes.changed() => {}
                () = tokio::time::sleep_until(deadline) => return None,
            }
        }
    }

    /// The other tunnels streams for `tunnel`'s certificate are spread over.
    fn pool_of(&self, tunnel: &Tunnel) -> Vec<Arc<Tunnel>> {
        let inner = self.inner.read().expect("registry lock");
        (inner.pools.get(&tunnel.serial).into_iter().flatten())
            .filter(|t| t.id != tunnel.id)
            .cloned()
            .collect()
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
        inner.changed(id);
        drop(inner);
        self.changes.send_modify(|n| *n += 1);
    }

    /// Forgets tunnel `id`: it has closed.
    pub(super) fn remove(&self, id: u64) {
        let mut inner = self.inner.write().expect("registry lock");
        if !inner.remove(id) {
            return;
        }
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

    /// Whether tunnel `id` is still on record and serves the public `name` (draining or
    /// not: a retired tunnel's open streams and flows run to their end).
    pub(super) fn serves(&self, id: u64, name: &str) -> bool {
        let inner = self.inner.read().expect("registry lock");
        (inner.tunnels.get(&id)).is_some_and(|(_, served)| served.public.iter().any(|h| h == name))
    }

    /// The granted ports some live tunnel serves now: the proxy listens on those (in its
    /// range).
    pub(super) fn ports(&self) -> std::collections::BTreeSet<revproxy_ca::ports::GrantedPort> {
        self.inner.read().expect("registry lock").ports.clone()
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

    /// The tunnels an agent opened as its own (not extra ones) and has not retired.
    pub(super) fn own_tunnels(&self) -> Vec<Arc<Tunnel>> {
        let inner = self.inner.read().expect("registry lock");
        (inner.tunnels.values())
            .filter(|(t, _)| !t.extra && !t.is_draining())
            .map(|(t, _)| t.clone())
            .collect()
    }

    /// Every live tunnel and the names it serves now, oldest first.
    pub(super) fn snapshot(&self) -> Vec<(Arc<Tunnel>, Vec<String>, bool)> {
        let inner = self.inner.read().expect("registry lock");
        let mut all: Vec<_> = inner
            .tunnels
            .values()
            .map(|(t, served)| (t.clone(), served.all(), t.is_draining()))
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
                for t in (inner.by_private.get(pattern).into_iter()).flat_map(Routes::all) {
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
            .map(|wild| wild.without(|t| exact.contains(t.id)))
            .unwrap_or_default();
        drop(inner);
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        Found {
            exact: exact.ordered(turn),
            wildcard: wildcard.ordered(turn),
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

    /// Whether every tunnel that would serve `name` first (those granted it exactly, else
    /// those holding a wildcard) has a service for it that speaks h2c; the tunnels not yet
    /// asked are asked together, within [`ALPN_TIMEOUT`] in all.
    pub(super) async fn all_speak_h2c(&self, name: &str) -> bool {
        let first = match self.exact.is_empty() {
            true => &self.wildcard,
            false => &self.exact,
        };
        // Most connections find every answer known: no task, no wait.
        let mut asking = tokio::task::JoinSet::new();
        for t in first {
            match t.known_h2c(name) {
                Some(true) => {}
                Some(false) => return false,
                None => {
                    let (t, name) = (t.clone(), name.to_string());
                    asking.spawn(async move { t.speaks_h2c(&name).await });
                }
            }
        }
        if asking.is_empty() {
            return !first.is_empty();
        }
        let all = async {
            while let Some(said) = asking.join_next().await {
                if !matches!(said, Ok(true)) {
                    return false;
                }
            }
            true
        };
        let all = tokio::time::timeout(crate::tunnel::control::ALPN_TIMEOUT, all).await;
        !first.is_empty() && matches!(all, Ok(true))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::admit::Peer;
    use std::time::Duration;

    /// A tunnel of agent `web` (serial `01`, certificate for `app.example.com`) over a
    /// real HTTP/2 connection in memory.
    async fn tunnel(id: u64) -> Arc<Tunnel> {
        tunnel_of(id, false, Arc::default()).await
    }

    /// The same, an extra tunnel or not, notifying `room` as its slots free.
    async fn tunnel_of(id: u64, extra: bool, room: Arc<tokio::sync::Notify>) -> Arc<Tunnel> {
        let who = Peer {
            agent: "web".into(),
            serial: "01".into(),
            cert_hosts: vec!["app.example.com".into()],
            not_after: i64::MAX,
        };
        tunnel_with(id, extra, room, who).await
    }

    /// A tunnel of `who`.
    pub(super) async fn tunnel_with(
        id: u64,
        extra: bool,
        room: Arc<tokio::sync::Notify>,
        who: Peer,
    ) -> Arc<Tunnel> {
        let (client, server) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            if let Ok(mut conn) = h2::server::handshake(server).await {
                while conn.accept().await.is_some() {}
            }
        });
        let (send, conn) = h2::client::handshake(client).await.unwrap();
        tokio::spawn(conn);
        let peer = "127.0.0.1:9".parse().unwrap();
        Arc::new(Tunnel::new(NewTunnel {
            id,
            who,
            link: crate::tunnel::Link::H2(send, crate::tunnel::h2::settled::channel().1),
            peer,
            extra,
            room,
        }))
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

    /// Takes `n` stream slots on `t`.
    fn take(t: &Tunnel, n: usize) -> Vec<Slot> {
        (0..n).map(|_| t.claim().expect("a free slot")).collect()
    }

    /// An agent whose tunnel carries half its streams may add an extra one, which joins
    /// it: streams go to the less loaded of the two. An idle agent may not. When the
    /// agent comes back with a tunnel of its own (a restart), both older ones are only a
    /// fallback, and an extra tunnel then joins the new one.
    #[tokio::test]
    async fn an_extra_tunnel_joins_a_busy_agent_and_takes_the_streams_its_tunnel_has_no_room_for() {
        let registry = Registry::default();
        let ok = || state(false);
        let first = tunnel_of(1, false, registry.room()).await;
        registry.insert(first.clone(), 4, ok).unwrap();
        let idle = registry.insert(tunnel_of(2, true, registry.room()).await, 4, ok);
        let not_busy = NotRegistered::NotBusy {
            streams: 0,
            tunnels: 1,
        };
        assert_eq!(idle.err(), Some(not_busy));

        let mut held = take(&first, MAX_STREAMS as usize / 2);
        let extra = tunnel_of(3, true, registry.room()).await;
        registry.insert(extra.clone(), 4, ok).unwrap();
        let ids = |found: Found| found.all().map(|t| t.id).collect::<Vec<_>>();
        assert_eq!(ids(registry.lookup("app.example.com")), [3, 1]);
        held.extend(take(&extra, MAX_STREAMS as usize));
        assert_eq!(ids(registry.lookup("app.example.com")), [1, 3]);

        // A full tunnel hands its claim to the one beside it; with both full, a claim
        // waits for a slot to free.
        held.extend(take(&first, MAX_STREAMS as usize / 2 + 1));
        assert!(first.claim().is_none());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let waiting = registry.claim(&first, deadline);
        tokio::pin!(waiting);
        assert!(poll_once(waiting.as_mut()).await.is_none());
        held.truncate(held.len() - 1); // the last slot taken was `first`'s
        let (got, _slot) = waiting.await.expect("the slot that freed");
        assert_eq!(got.id, 1);

        // The agent restarted: its new tunnel takes the streams, the old ones are kept
        // as a fallback, and an extra tunnel joins the new one.
        let restarted = tunnel_of(4, false, registry.room()).await;
        registry.insert(restarted.clone(), 4, ok).unwrap();
        assert_eq!(ids(registry.lookup("app.example.com")), [4, 3, 1]);
        held.extend(take(&restarted, MAX_STREAMS as usize / 2));
        registry
            .insert(tunnel_of(5, true, registry.room()).await, 4, ok)
            .unwrap();
        assert_eq!(ids(registry.lookup("app.example.com")), [5, 4, 3, 1]);
        drop(held);
    }

    /// Polls `f` once: `Some` if it completed.
    async fn poll_once<F: std::future::Future + Unpin>(f: F) -> Option<F::Output> {
        let mut f = f;
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut f).poll(cx) {
                std::task::Poll::Ready(out) => Some(out),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }
}
