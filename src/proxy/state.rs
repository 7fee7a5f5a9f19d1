//! The proxy's in-memory view of the CA state that gates tunnels: revoked certificate
//! serials and what each agent is granted. Routing and admission read this snapshot,
//! never the store.
//!
//! `revproxy cert revoke` and friends (or another proxy sharing the store) change the
//! state; the proxy asks the store for its version once a second, and at once when the
//! store says something changed (PostgreSQL's `NOTIFY`), and when the version moved reads
//! the records that changed and applies them by key (`state/changes.rs`), or the state
//! whole from a store that cannot tell what changed. The TLS verifier and the tunnel
//! handshake read the snapshot, never the store.
//!
//! The view also keeps the store's health, which the proxy reports apart from readiness
//! (`/status`, the `revproxy_store_*` metrics, one log line at each change, `revproxy
//! status`): routing and tunnels go on with the last snapshot while the store is down, so
//! `/ready` does not depend on it, and a database outage never takes every proxy out of a
//! load balancer at once. A store whose state went back to an older version (a restored
//! backup, another database) is not taken as newer: the view keeps the snapshot it has and
//! raises an alarm until this process is restarted (see [`StoreHealth::went_back`]).

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use revproxy_ca::Store;

mod changes;
use tracing::{debug, error, info, warn};

/// How often the store's version is checked for changes.
pub(super) const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// A set of keys in a [`Snapshot`]: persistent, so that a snapshot with one change applied
/// shares everything else with the one before (a clone costs nothing, a change a path).
pub(super) type Set = imbl::HashSet<String>;
/// A map in a [`Snapshot`], persistent as [`Set`] is.
pub(super) type Map<V> = imbl::HashMap<String, V>;

/// What the tunnel gate needs to know.
#[derive(Clone, Debug, Default)]
pub(super) struct Snapshot {
    /// Hex serials of revoked certificates.
    pub(super) revoked: Set,
    /// Hex serials of the certificates on record and not revoked: the only ones admitted
    /// (an allow-list: a certificate the CA signed but never recorded, from a copy of the
    /// CA key, say, is refused).
    pub(super) live: Set,
    /// Ids of the tokens that can still be used (unused, not revoked, not expired when
    /// loaded): enrollment hears these even from a source over its failure limit.
    pub(super) open_tokens: Set,
    /// The stored hash of every token's secret (used ones too: a retry with the same key
    /// gets its certificate again), by token id: enrollment checks a secret here before
    /// it queues for the state's lock.
    pub(super) token_secrets: Map<revproxy_ca::SecretHash>,
    /// Names each agent may currently serve, public and private.
    pub(super) grants: Map<Vec<String>>,
    /// Of those, the ones each agent serves to public clients.
    pub(super) public: Map<Vec<String>>,
    /// And the ones it serves only through the mesh.
    pub(super) private_of: Map<Vec<String>>,
    /// Name patterns granted for private serving: never routed from a public listener;
    /// with how many agents' grants hold each (a change of one grant adjusts the counts).
    pub(super) private: Map<usize>,
    /// Access rules: the name patterns each agent may reach through its tunnel.
    pub(super) access: Map<Vec<String>>,
    /// The latest expiry among each agent's valid certificates, Unix seconds.
    pub(super) expiry: Map<i64>,
    /// Hex serials of the operator certificates on record and not revoked: the only
    /// clients the admin listener admits beyond loopback.
    pub(super) operators: Set,
    /// Names whose TLS this proxy terminates, with their certificates (`crate::edge`).
    pub(super) tls: Map<Arc<revproxy_ca::state::TlsRecord>>,
}

/// A stored secret hash (hex); `None` if malformed (the CA then says so at enrollment).
fn secret_hash(hex: &str) -> Option<revproxy_ca::SecretHash> {
    let bytes = revproxy_ca::hex::decode(hex)?;
    Some(revproxy_ca::SecretHash(bytes.try_into().ok()?))
}

impl Snapshot {
    fn load(store: &dyn Store) -> Result<Snapshot, revproxy_ca::CaError> {
        let state = store.read()?;
        let mut expiry: Map<i64> = Map::new();
        for cert in state.certs.iter().filter(|c| c.revoked_at.is_none()) {
            let latest = expiry.entry(cert.agent.clone()).or_insert(cert.not_after);
            *latest = (*latest).max(cert.not_after);
        }
        Ok(Snapshot {
            expiry,
            tls: (state.tls.iter())
                .map(|(name, r)| (name.clone(), Arc::new(r.clone())))
                .collect(),
            revoked: (state.certs.iter().filter(|c| c.revoked_at.is_some()))
                .map(|c| c.serial.clone())
                .chain(
                    (state.operators.iter().filter(|o| o.revoked_at.is_some()))
                        .map(|o| o.serial.clone()),
                )
                .collect(),
            operators: (state.operators.iter().filter(|o| o.revoked_at.is_none()))
                .map(|o| o.serial.clone())
                .collect(),
            live: state
                .certs
                .iter()
                .filter(|c| c.revoked_at.is_none())
                .map(|c| c.serial.clone())
                .collect(),
            open_tokens: {
                let now = time::OffsetDateTime::now_utc().unix_timestamp();
                state
                    .tokens
                    .iter()
                    .filter(|t| t.used.is_none() && !t.revoked && t.expires > now)
                    .map(|t| t.id.clone())
                    .collect()
            },
            token_secrets: (state.tokens.iter())
                .filter_map(|t| Some((t.id.clone(), secret_hash(&t.secret_sha256)?)))
                .collect(),
            private: (state.agents.values()).flat_map(|g| g.private.iter()).fold(
                Map::new(),
                |mut counts, pattern| {
                    *counts.entry(pattern.clone()).or_default() += 1;
                    counts
                },
            ),
            public: (state.agents.iter())
                .map(|(k, v)| (k.clone(), v.hosts.clone()))
                .collect(),
            private_of: (state.agents.iter())
                .map(|(k, v)| (k.clone(), v.private.clone()))
                .collect(),
            grants: state
                .agents
                .into_iter()
                .map(|(k, v)| (k, v.hosts.into_iter().chain(v.private).collect()))
                .collect(),
            access: state.access.into_iter().collect(),
        })
    }

    /// Whether any agent is granted a public pattern that covers `name`.
    pub(super) fn is_granted_anywhere(&self, name: &str) -> bool {
        self.public
            .values()
            .flatten()
            .any(|pattern| pattern == name || crate::route::name_matches(pattern, name))
    }

    /// Whether any private grant covers `name` (exactly or by a wildcard): a static route
    /// for it is not offered to public clients.
    pub(super) fn covers_private(&self, name: &str) -> bool {
        self.private
            .keys()
            .any(|pattern| pattern == name || crate::route::name_matches(pattern, name))
    }

    /// Whether the pattern `pattern` (a name, or `*.suffix`) is granted privately.
    pub(super) fn is_private(&self, pattern: &str) -> bool {
        self.private.contains_key(pattern)
    }

    /// What a tunnel of `agent` with a certificate for `cert_hosts` serves now: to public
    /// clients, the names its public grant covers and none of its private grants does; to
    /// mesh streams, the names its private grant covers. Decided per name by the grant,
    /// so a name an older certificate still holds never goes public once the agent's grant
    /// has made it (or a wildcard over it) private.
    pub(super) fn served(&self, agent: &str, cert_hosts: &[String]) -> super::registry::Served {
        let empty = Vec::new();
        let public = self.public.get(agent).unwrap_or(&empty);
        let private = self.private_of.get(agent).unwrap_or(&empty);
        let covers = |grant: &[String], h: &str| {
            grant
                .iter()
                .any(|g| g == h || crate::route::name_matches(g, h))
        };
        super::registry::Served {
            public: (cert_hosts.iter())
                .filter(|h| covers(public, h) && !covers(private, h))
                .cloned()
                .collect(),
            private: (cert_hosts.iter())
                .filter(|h| covers(private, h))
                .cloned()
                .collect(),
        }
    }

    /// Whether `agent`'s access rules let it reach `name`.
    pub(super) fn may_reach(&self, agent: &str, name: &str) -> bool {
        self.access.get(agent).is_some_and(|rules| {
            rules
                .iter()
                .any(|rule| rule == name || crate::route::name_matches(rule, name))
        })
    }
}

/// Whether the store answers, as the checks of its version found it.
#[derive(Debug, Default)]
struct Health {
    /// Since when every check failed, and the last error.
    failing: Option<(Instant, String)>,
    /// When the last check that succeeded ended, Unix seconds.
    last_ok: i64,
    /// Checks that succeeded and that failed, since the start.
    checks: (u64, u64),
    /// The alarm of a state that went back (what the store said), once raised.
    went_back: Option<String>,
}

/// The store's health as the proxy reports it.
#[derive(Clone, Debug)]
pub(super) struct StoreHealth {
    /// The last check of the store's version succeeded.
    pub(super) up: bool,
    /// What is wrong, when something is: how long it has failed and the last error, or the
    /// alarm of a state that went back.
    pub(super) problem: Option<String>,
    /// When the store last answered a check, Unix seconds.
    pub(super) last_ok: i64,
    /// Checks of its version so far (polls, notifications, reloads forced by requests):
    /// those that succeeded and those that failed.
    pub(super) checks: (u64, u64),
    /// Whether the store's state went back to an older version while this proxy ran. The
    /// proxy then keeps the newer view it holds rather than taking the older one, which
    /// would bring back revoked certificates and used tokens, and the store refuses
    /// changes; the alarm holds until the proxy is restarted (by then an operator has
    /// decided which state is right).
    pub(super) went_back: bool,
}

/// The installed snapshot. Every store's version only grows (a change adds to it), so of
/// two reads the one that saw the higher version is the newer, whichever finished first.
#[derive(Debug)]
struct Current {
    version: u64,
    snapshot: Arc<Snapshot>,
}

/// The shared, refreshed snapshot.
#[derive(Clone, Debug)]
pub(super) struct StateView {
    store: Arc<dyn Store>,
    /// The snapshot, with the store's version it reflects.
    current: Arc<RwLock<Current>>,
    /// The store's version when it was first read: where [`StateView::watch`] starts.
    loaded_at: u64,
    /// When the last reload a request forced began (see [`StateView::refresh_seldom`]).
    forced: Arc<tokio::sync::Mutex<Option<Instant>>>,
    health: Arc<Mutex<Health>>,
    /// Woken by the store when the state changed elsewhere.
    changed: Arc<tokio::sync::Notify>,
}

impl StateView {
    /// Loads the state once (a blocking call: the proxy is being built).
    pub(super) fn load(store: Arc<dyn Store>) -> Result<StateView, revproxy_ca::CaError> {
        let version = store.version()?;
        let snapshot = Snapshot::load(&*store)?;
        Ok(StateView {
            store,
            current: Arc::new(RwLock::new(Current {
                version,
                snapshot: Arc::new(snapshot),
            })),
            loaded_at: version,
            forced: Arc::default(),
            health: Arc::new(Mutex::new(Health {
                last_ok: time::OffsetDateTime::now_utc().unix_timestamp(),
                ..Health::default()
            })),
            changed: Arc::default(),
        })
    }

    /// The current snapshot.
    pub(super) fn get(&self) -> Arc<Snapshot> {
        self.current
            .read()
            .expect("state view lock")
            .snapshot
            .clone()
    }

    /// The store's health now.
    pub(super) fn store_health(&self) -> StoreHealth {
        let health = self.health.lock().expect("store health lock");
        let problem = match (&health.went_back, &health.failing) {
            (Some(alarm), _) => Some(alarm.clone()),
            (None, Some((since, error))) => Some(format!(
                "the state store has not answered for {} s: {error}",
                since.elapsed().as_secs()
            )),
            (None, None) => None,
        };
        StoreHealth {
            up: health.failing.is_none(),
            problem,
            last_ok: health.last_ok,
            checks: health.checks,
            went_back: health.went_back.is_some(),
        }
    }

    /// Where the state lives, as messages name it.
    pub(super) fn store_name(&self) -> String {
        self.store.describe()
    }

    /// Records a check that succeeded; says once that the store is back.
    fn store_ok(&self) {
        let mut health = self.health.lock().expect("store health lock");
        health.checks.0 += 1;
        health.last_ok = time::OffsetDateTime::now_utc().unix_timestamp();
        if let Some((since, _)) = health.failing.take() {
            info!(store = %self.store.describe(), outage = %crate::runtime::logging::duration(since.elapsed()), "the state store answers again");
        }
    }

    /// Records a failed check that began at `began` (a check may take the store's whole
    /// timeout to fail: the outage is counted from its start); says once that the store is
    /// down, and once, as an error, that its state went back.
    fn store_failed(&self, error: &revproxy_ca::CaError, began: Instant) {
        let text = error.to_string();
        let mut health = self.health.lock().expect("store health lock");
        health.checks.1 += 1;
        if matches!(error, revproxy_ca::CaError::StoreWentBack { .. }) && health.went_back.is_none()
        {
            error!(%error, "the state store went back to an older state; routing goes on from the newer state this proxy holds");
            health.went_back = Some(text.clone());
        }
        match &mut health.failing {
            Some((_, last)) => *last = text,
            None => {
                if health.went_back.is_none() {
                    warn!(error = %text, "cannot read the state store; routing goes on from the last state read (enrollment and renewal answer 503 until it is back)");
                }
                health.failing = Some((began, text));
            }
        }
    }

    /// Reads the store's version and, unless it is `seen`, the state; installs the new
    /// snapshot and returns it with its version, or `None` when nothing changed or the
    /// store failed (then the last snapshot stays). A store that tells what changed since
    /// the installed snapshot's version ([`Store::changes_since`]) has only those records
    /// read and applied; otherwise the state is read whole.
    async fn reload(&self, seen: Option<u64>) -> Option<(u64, Arc<Snapshot>)> {
        let store = self.store.clone();
        let began = Instant::now();
        let (base_version, base) = {
            let current = self.current.read().expect("state view lock");
            (current.version, current.snapshot.clone())
        };
        let read = tokio::task::spawn_blocking(move || {
            let version = store.version()?;
            // Below what was installed before this read began: the store went back (an
            // older backup put in place). Taking it would bring back what was revoked.
            if version < base_version {
                return Err(revproxy_ca::CaError::StoreWentBack {
                    store: store.describe(),
                    from: base_version,
                    to: version,
                });
            }
            if Some(version) == seen {
                return Ok::<_, revproxy_ca::CaError>(None);
            }
            if let Some(changes) = store.changes_since(base_version)? {
                if changes.records.is_empty() {
                    return Ok(Some((changes.version, base)));
                }
                let now = time::OffsetDateTime::now_utc().unix_timestamp();
                let snapshot = Arc::new(base.with_changes(&changes, now));
                return Ok(Some((changes.version, snapshot)));
            }
            Ok(Some((version, Arc::new(Snapshot::load(&*store)?))))
        })
        .await;
        match read {
            Ok(Ok(None)) => {
                self.store_ok();
                None
            }
            Ok(Ok(Some((version, snapshot)))) => {
                self.store_ok();
                // The newest state wins, whichever read finished last (a read that began
                // earlier may have read a newer state); the caller learns what is installed.
                let mut current = self.current.write().expect("state view lock");
                if version > current.version {
                    *current = Current { version, snapshot };
                }
                Some((current.version, current.snapshot.clone()))
            }
            Ok(Err(e)) => {
                self.store_failed(&e, began);
                None
            }
            Err(e) => {
                let e = revproxy_ca::CaError::StoreUnavailable {
                    store: self.store.describe(),
                    reason: format!("the reading task failed: {e}"),
                };
                self.store_failed(&e, began);
                None
            }
        }
    }

    /// Reloads the state now (keeping the last snapshot if it cannot be read).
    pub(super) async fn refresh(&self) -> Arc<Snapshot> {
        match self.reload(None).await {
            Some((_, snapshot)) => snapshot,
            None => self.get(),
        }
    }

    /// A snapshot read after this call began, with at most one store read per `interval`
    /// for all callers together: for requests from outside that need what another process
    /// just wrote (a certificate issued a moment ago), without letting a flood of them read
    /// the store more often. Callers that come while a read is due or under way wait for
    /// it (at most `interval` plus the read) and share it.
    pub(super) async fn refresh_seldom(&self, interval: Duration) -> Arc<Snapshot> {
        let arrived = Instant::now();
        let mut last = self.forced.lock().await;
        if let Some(at) = *last {
            if at >= arrived {
                return self.get(); // a read that began after we came has just finished
            }
            let since = at.elapsed();
            if since < interval {
                tokio::time::sleep(interval - since).await;
            }
        }
        *last = Some(Instant::now());
        self.refresh().await
    }

    /// Reloads whenever the store's version moves, and hands every new snapshot to
    /// `on_change`, until the returned future is dropped.
    pub(super) async fn watch(self, on_change: impl Fn(&Snapshot)) {
        let changed = self.changed.clone();
        self.store.on_change(Arc::new(move || changed.notify_one()));
        let mut tick = tokio::time::interval(WATCH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Changes are counted from what this watch handed on, not from what a forced
        // `refresh` installed in between: those must reach `on_change` too.
        let mut seen = Some(self.loaded_at);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = self.changed.notified() => {}
            }
            if let Some((version, snapshot)) = self.reload(seen).await {
                seen = Some(version);
                debug!(revoked = snapshot.revoked.len(), "proxy state reloaded");
                // Current first (`reload` installed it): whoever checks the state after
                // `on_change` has cut what it no longer allows sees the new one.
                on_change(&snapshot);
            }
        }
    }
}
