//! The proxy's in-memory view of the CA state that gates tunnels: revoked certificate
//! serials and what each agent is granted. Routing and admission read this snapshot,
//! never the file.
//!
//! `revproxy cert revoke` and friends run as separate processes and change `state.json`;
//! the proxy polls the file's identity (it is replaced by rename on every change) once a
//! second and reloads it when it changed. The TLS verifier and the tunnel handshake read
//! the snapshot, never the file.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use revproxy_ca::state::StateFile;
use tracing::{debug, warn};

/// How often the state file is checked for changes.
pub(super) const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// What the tunnel gate needs to know.
#[derive(Debug, Default)]
pub(super) struct Snapshot {
    /// Hex serials of revoked certificates.
    pub(super) revoked: HashSet<String>,
    /// Hex serials of the certificates on record and not revoked: the only ones admitted
    /// (an allow-list: a certificate the CA signed but never recorded, from a copy of the
    /// CA key, say, is refused).
    pub(super) live: HashSet<String>,
    /// Ids of the tokens that can still be used (unused, not revoked, not expired when
    /// loaded): enrollment hears these even from a source over its failure limit.
    pub(super) open_tokens: HashSet<String>,
    /// Names each agent may currently serve, public and private.
    pub(super) grants: HashMap<String, Vec<String>>,
    /// Of those, the ones each agent serves to public clients.
    pub(super) public: HashMap<String, Vec<String>>,
    /// And the ones it serves only through the mesh.
    pub(super) private_of: HashMap<String, Vec<String>>,
    /// Name patterns granted for private serving: never routed from a public listener.
    pub(super) private: HashSet<String>,
    /// Access rules: the name patterns each agent may reach through its tunnel.
    pub(super) access: HashMap<String, Vec<String>>,
    /// The latest expiry among each agent's valid certificates, Unix seconds.
    pub(super) expiry: HashMap<String, i64>,
    /// Hex serials of the operator certificates on record and not revoked: the only
    /// clients the admin listener admits beyond loopback.
    pub(super) operators: HashSet<String>,
}

impl Snapshot {
    fn load(file: &StateFile) -> Result<Snapshot, revproxy_ca::CaError> {
        let state = file.read()?;
        let mut expiry: HashMap<String, i64> = HashMap::new();
        for cert in state.certs.iter().filter(|c| c.revoked_at.is_none()) {
            let latest = expiry.entry(cert.agent.clone()).or_insert(cert.not_after);
            *latest = (*latest).max(cert.not_after);
        }
        Ok(Snapshot {
            expiry,
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
            private: (state.agents.values())
                .flat_map(|g| g.private.iter().cloned())
                .collect(),
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
            .iter()
            .any(|pattern| pattern == name || crate::route::name_matches(pattern, name))
    }

    /// Whether the pattern `pattern` (a name, or `*.suffix`) is granted privately.
    pub(super) fn is_private(&self, pattern: &str) -> bool {
        self.private.contains(pattern)
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

/// The shared, refreshed snapshot.
#[derive(Clone, Debug)]
pub(super) struct StateView {
    file: StateFile,
    current: Arc<RwLock<Arc<Snapshot>>>,
    /// When a request last forced a reload (see [`StateView::refresh_seldom`]).
    forced: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
}

impl StateView {
    /// Loads the state once.
    pub(super) fn load(file: StateFile) -> Result<StateView, revproxy_ca::CaError> {
        let snapshot = Snapshot::load(&file)?;
        Ok(StateView {
            file,
            current: Arc::new(RwLock::new(Arc::new(snapshot))),
            forced: Arc::default(),
        })
    }

    /// The current snapshot.
    pub(super) fn get(&self) -> Arc<Snapshot> {
        self.current.read().expect("state view lock").clone()
    }

    /// Reloads the state now (falling back to the last snapshot if it cannot be read).
    pub(super) async fn refresh(&self) -> Arc<Snapshot> {
        let file = self.file.clone();
        match tokio::task::spawn_blocking(move || Snapshot::load(&file)).await {
            Ok(Ok(snapshot)) => {
                let snapshot = Arc::new(snapshot);
                *self.current.write().expect("state view lock") = snapshot.clone();
                snapshot
            }
            Ok(Err(e)) => {
                warn!(error = %e, "cannot reload the proxy state; keeping the last good one");
                self.get()
            }
            Err(e) => {
                warn!(error = %e, "state reload task failed");
                self.get()
            }
        }
    }

    /// Reloads now, unless a caller did within `interval` (then the current snapshot): for
    /// requests from outside that need what another process just wrote, without letting a
    /// flood of them read the file more than once per `interval`.
    pub(super) async fn refresh_seldom(&self, interval: Duration) -> Arc<Snapshot> {
        {
            let mut forced = self.forced.lock().expect("state view lock");
            let now = std::time::Instant::now();
            if forced.is_some_and(|at| now.duration_since(at) < interval) {
                return self.get();
            }
            *forced = Some(now);
        }
        self.refresh().await
    }

    /// Reloads whenever `state.json` is replaced, and hands every new snapshot to
    /// `on_change`, until the returned future is dropped.
    pub(super) async fn watch(self, on_change: impl Fn(&Snapshot)) {
        let path = self.file.path();
        let identity = |m: std::fs::Metadata| (m.ino(), m.mtime(), m.mtime_nsec(), m.len());
        let mut seen = std::fs::metadata(&path).ok().map(identity);
        let mut tick = tokio::time::interval(WATCH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = tokio::fs::metadata(&path).await.ok().map(identity);
            if now == seen {
                continue;
            }
            let file = self.file.clone();
            match tokio::task::spawn_blocking(move || Snapshot::load(&file)).await {
                Ok(Ok(snapshot)) => {
                    debug!(revoked = snapshot.revoked.len(), "proxy state reloaded");
                    // Current first: whoever checks the state after `on_change` has cut
                    // what it no longer allows sees the new one.
                    let snapshot = Arc::new(snapshot);
                    *self.current.write().expect("state view lock") = snapshot.clone();
                    on_change(&snapshot);
                    seen = now;
                }
                Ok(Err(e)) => {
                    warn!(error = %e, "cannot reload the proxy state; keeping the last good one")
                }
                Err(e) => warn!(error = %e, "state reload task failed"),
            }
        }
    }
}
