//! The registry's indexes, kept up to date a tunnel at a time: a tunnel that comes, goes
//! or retires re-derives only the routes of its own names and its certificate's pool.
//! Rebuilding every index on every change cost a pass over all tunnels per change, so a
//! fleet reconnecting after a restart cost the square of its size: at 10,000 agents,
//! seconds of a core under the registry's lock.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use super::{is_open, Routes, Served, Tunnel};
use revproxy_ca::ports::GrantedPort;

#[derive(Debug, Default)]
pub(super) struct Inner {
    /// Every live tunnel and the names it serves now.
    pub(super) tunnels: HashMap<u64, (Arc<Tunnel>, Served)>,
    /// Name pattern (exact or `*.suffix`) → tunnels serving it to public clients.
    pub(super) by_pattern: HashMap<String, Routes>,
    /// The same for names served only through the mesh.
    pub(super) by_private: HashMap<String, Routes>,
    /// Certificate serial → the tunnels its streams are spread over ([`Routes`]).
    pub(super) pools: HashMap<String, Vec<Arc<Tunnel>>>,
    /// The granted ports some live tunnel serves (`tcp:PORT` in `by_pattern`).
    pub(super) ports: BTreeSet<GrantedPort>,
    /// Which tunnels (draining ones too) each of these concern: what a change re-derives.
    ids: Ids,
}

#[derive(Debug, Default)]
struct Ids {
    public: HashMap<String, BTreeSet<u64>>,
    private: HashMap<String, BTreeSet<u64>>,
    serial: HashMap<String, BTreeSet<u64>>,
    agent: HashMap<String, BTreeSet<u64>>,
}

impl Ids {
    fn add(&mut self, tunnel: &Tunnel, served: &Served) {
        let id = tunnel.id;
        for name in &served.public {
            self.public.entry(name.clone()).or_default().insert(id);
        }
        for name in &served.private {
            self.private.entry(name.clone()).or_default().insert(id);
        }
        self.serial
            .entry(tunnel.serial.clone())
            .or_default()
            .insert(id);
        self.agent
            .entry(tunnel.agent.clone())
            .or_default()
            .insert(id);
    }

    fn remove(&mut self, tunnel: &Tunnel, served: &Served) {
        let id = tunnel.id;
        let take = |map: &mut HashMap<String, BTreeSet<u64>>, key: &str| {
            if let Some(ids) = map.get_mut(key) {
                ids.remove(&id);
                if ids.is_empty() {
                    map.remove(key);
                }
            }
        };
        for name in &served.public {
            take(&mut self.public, name);
        }
        for name in &served.private {
            take(&mut self.private, name);
        }
        take(&mut self.serial, &tunnel.serial);
        take(&mut self.agent, &tunnel.agent);
    }
}

impl Inner {
    /// The tunnels `agent` holds (draining ones too).
    pub(super) fn of_agent(&self, agent: &str) -> impl Iterator<Item = &Arc<Tunnel>> {
        (self.ids.agent.get(agent).into_iter().flatten())
            .filter_map(|id| self.tunnels.get(id).map(|(t, _)| t))
    }

    /// Puts `tunnel` on record as serving `served`.
    pub(super) fn add(&mut self, tunnel: Arc<Tunnel>, served: Served) {
        self.ids.add(&tunnel, &served);
        let serial = tunnel.serial.clone();
        let touched = served.clone();
        self.tunnels.insert(tunnel.id, (tunnel, served));
        self.refresh(&serial, &touched);
    }

    /// Takes tunnel `id` off record; whether it was on it.
    pub(super) fn remove(&mut self, id: u64) -> bool {
        let Some((tunnel, served)) = self.tunnels.remove(&id) else {
            return false;
        };
        self.ids.remove(&tunnel, &served);
        self.refresh(&tunnel.serial, &served);
        true
    }

    /// Re-derives what tunnel `id` is in after it changed (it retired).
    pub(super) fn changed(&mut self, id: u64) {
        if let Some((tunnel, served)) = self.tunnels.get(&id) {
            let (serial, served) = (tunnel.serial.clone(), served.clone());
            self.refresh(&serial, &served);
        }
    }

    /// The tunnels of `ids`, newest first, not draining.
    fn routable<'a>(
        tunnels: &'a HashMap<u64, (Arc<Tunnel>, Served)>,
        ids: Option<&'a BTreeSet<u64>>,
    ) -> impl Iterator<Item = &'a Arc<Tunnel>> {
        (ids.into_iter().flatten().rev())
            .filter_map(|id| tunnels.get(id).map(|(t, _)| t))
            .filter(|t| !t.is_draining())
    }

    /// Re-derives the routes of the names in `served`, the pool of certificate `serial`,
    /// and the granted ports among the public names. (A name `k` tunnels share costs `k²`
    /// here, as it did in a full rebuild.)
    fn refresh(&mut self, serial: &str, served: &Served) {
        for name in &served.public {
            self.refresh_public(name);
        }
        for name in &served.private {
            self.refresh_private(name);
        }
        self.refresh_pool(serial);
    }

    fn routes(&self, ids: Option<&BTreeSet<u64>>) -> Routes {
        let mut routes = Routes::default();
        for tunnel in Self::routable(&self.tunnels, ids) {
            routes.push(tunnel);
        }
        routes
    }

    fn refresh_public(&mut self, name: &str) {
        let routes = self.routes(self.ids.public.get(name));
        let live = !routes.pools.is_empty();
        match live {
            true => self.by_pattern.insert(name.to_string(), routes),
            false => self.by_pattern.remove(name),
        };
        if let Some(port) = GrantedPort::of(name) {
            match live {
                true => self.ports.insert(port),
                false => self.ports.remove(&port),
            };
        }
    }

    fn refresh_private(&mut self, name: &str) {
        let routes = self.routes(self.ids.private.get(name));
        match routes.pools.is_empty() {
            false => self.by_private.insert(name.to_string(), routes),
            true => self.by_private.remove(name),
        };
    }

    fn refresh_pool(&mut self, serial: &str) {
        let mut pool: Vec<Arc<Tunnel>> = Vec::new();
        for tunnel in Self::routable(&self.tunnels, self.ids.serial.get(serial)) {
            if is_open(&pool) {
                pool.push(tunnel.clone());
            }
        }
        match pool.is_empty() {
            false => self.pools.insert(serial.to_string(), pool),
            true => self.pools.remove(serial),
        };
    }

    /// Rebuilds every index from the tunnels on record (after the state changed what
    /// they serve), each name and pool once.
    pub(super) fn reindex(&mut self) {
        self.by_pattern.clear();
        self.by_private.clear();
        self.pools.clear();
        self.ports.clear();
        self.ids = Ids::default();
        for (tunnel, served) in self.tunnels.values() {
            self.ids.add(tunnel, served);
        }
        let public: Vec<String> = self.ids.public.keys().cloned().collect();
        let private: Vec<String> = self.ids.private.keys().cloned().collect();
        let serials: Vec<String> = self.ids.serial.keys().cloned().collect();
        for name in &public {
            self.refresh_public(name);
        }
        for name in &private {
            self.refresh_private(name);
        }
        for serial in &serials {
            self.refresh_pool(serial);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::admit::Peer;
    use std::collections::BTreeMap;
    use std::sync::atomic::Ordering;

    type RouteIds = BTreeMap<String, (Vec<Vec<u64>>, Vec<u64>)>;

    /// Every index as ids, to compare.
    fn view(
        inner: &Inner,
    ) -> (
        RouteIds,
        RouteIds,
        BTreeMap<String, Vec<u64>>,
        Vec<GrantedPort>,
    ) {
        let ids = |tunnels: &[Arc<Tunnel>]| tunnels.iter().map(|t| t.id).collect::<Vec<_>>();
        let routes = |map: &HashMap<String, Routes>| {
            (map.iter())
                .map(|(name, r)| {
                    let pools = r.pools.iter().map(|p| ids(p)).collect();
                    (name.clone(), (pools, ids(&r.later)))
                })
                .collect()
        };
        let pools = (inner.pools.iter())
            .map(|(s, p)| (s.clone(), ids(p)))
            .collect();
        let ports = inner.ports.iter().copied().collect();
        (
            routes(&inner.by_pattern),
            routes(&inner.by_private),
            pools,
            ports,
        )
    }

    /// The same tunnels indexed from scratch, the way the registry did before it kept its
    /// indexes a change at a time (one pass over every tunnel, newest first): the
    /// yardstick.
    fn rebuilt(inner: &Inner) -> Inner {
        let mut fresh = Inner {
            tunnels: inner.tunnels.clone(),
            ..Inner::default()
        };
        let mut ids: Vec<&u64> = fresh.tunnels.keys().collect();
        ids.sort_by(|a, b| b.cmp(a));
        for id in ids {
            let (tunnel, served) = &fresh.tunnels[id];
            if tunnel.is_draining() {
                continue;
            }
            let pool = fresh.pools.entry(tunnel.serial.clone()).or_default();
            if is_open(pool) {
                pool.push(tunnel.clone());
            }
            let ports = served.public.iter().filter_map(|h| GrantedPort::of(h));
            fresh.ports.extend(ports);
            for host in &served.public {
                fresh
                    .by_pattern
                    .entry(host.clone())
                    .or_default()
                    .push(tunnel);
            }
            for host in &served.private {
                fresh
                    .by_private
                    .entry(host.clone())
                    .or_default()
                    .push(tunnel);
            }
        }
        fresh
    }

    #[tokio::test]
    async fn indexes_kept_a_tunnel_at_a_time_match_indexes_built_from_scratch() {
        // Agents sharing names, a wildcard, a private name and a granted port; agent a1
        // with an extra tunnel and a second certificate; tunnels come newest last.
        type Planned<'a> = (&'a str, &'a str, bool, &'a [&'a str], &'a [&'a str]);
        let plan: [Planned; 9] = [
            (
                "a0",
                "s0",
                false,
                &["shop.example.com", "*.example.com"],
                &[],
            ),
            (
                "a1",
                "s1",
                false,
                &["shop.example.com", "tcp:2222"],
                &["db.internal"],
            ),
            (
                "a1",
                "s1",
                true,
                &["shop.example.com", "tcp:2222"],
                &["db.internal"],
            ),
            ("a2", "s2", false, &["blog.example.com"], &["db.internal"]),
            (
                "a0",
                "s0",
                false,
                &["shop.example.com", "*.example.com"],
                &[],
            ),
            ("a1", "s1b", false, &["shop.example.com", "tcp:2222"], &[]),
            ("a3", "s3", false, &["tcp:2222"], &[]),
            (
                "a1",
                "s1",
                false,
                &["shop.example.com", "tcp:2222"],
                &["db.internal"],
            ),
            ("a2", "s2", true, &["blog.example.com"], &["db.internal"]),
        ];
        let mut inner = Inner::default();
        let mut made = Vec::new();
        for (i, (agent, serial, extra, public, private)) in plan.iter().enumerate() {
            let who = Peer {
                agent: agent.to_string(),
                serial: serial.to_string(),
                cert_hosts: public.iter().map(|h| h.to_string()).collect(),
                not_after: i64::MAX,
            };
            let tunnel =
                super::super::tests::tunnel_with(i as u64 + 1, *extra, Arc::default(), who).await;
            let served = Served {
                public: public.iter().map(|h| h.to_string()).collect(),
                private: private.iter().map(|h| h.to_string()).collect(),
            };
            inner.add(tunnel.clone(), served);
            made.push(tunnel);
            assert_eq!(
                view(&inner),
                view(&rebuilt(&inner)),
                "after adding tunnel {}",
                i + 1
            );
        }
        assert_eq!(inner.of_agent("a1").count(), 4);
        assert!(inner.ports.contains(&GrantedPort::of("tcp:2222").unwrap()));

        // Retired, then removed, in an order that empties names, pools and the port.
        for (step, id) in [
            (0, 8),
            (1, 2),
            (0, 4),
            (1, 8),
            (1, 7),
            (0, 2),
            (1, 6),
            (1, 3),
            (1, 9),
            (1, 2),
        ] {
            match step {
                0 => {
                    made[id as usize - 1]
                        .draining
                        .store(true, Ordering::Relaxed);
                    inner.changed(id);
                }
                _ => {
                    inner.remove(id);
                }
            }
            assert_eq!(
                view(&inner),
                view(&rebuilt(&inner)),
                "after step {step} on {id}"
            );
        }
        assert!(!inner.ports.contains(&GrantedPort::of("tcp:2222").unwrap()));
        assert_eq!(inner.of_agent("a1").count(), 0);
        // What is left: a0's two tunnels and a2's draining one.
        let (public, private, pools, _) = view(&inner);
        assert!(private.is_empty(), "{private:?}");
        assert_eq!(pools, BTreeMap::from([("s0".to_string(), vec![5])]));
        assert_eq!(public["shop.example.com"], (vec![vec![5]], vec![1]));
        assert!(!public.contains_key("blog.example.com"));
        assert_eq!(inner.ids.public.len(), 3);
        // Names of tunnels gone leave nothing behind.
        inner.remove(4);
        assert_eq!(view(&inner), view(&rebuilt(&inner)));
        assert_eq!(inner.ids.public.len(), 2);
        assert!(inner.ids.private.is_empty());
        assert_eq!(inner.ids.serial.len(), 1);
        assert_eq!(inner.ids.agent.len(), 1);
    }
}
