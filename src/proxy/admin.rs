//! What the proxy shows on its admin listener (`crate::admin` serves it): metrics, the
//! status document, readiness.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde_json::json;

use super::state::{Snapshot, StateView};
use super::Shared;
use crate::admin::{Admitted, NotReady, OperatorRefused};

/// Who may use the admin listener beyond loopback: a certificate (already verified against
/// the CA, validity and revocation by TLS) whose identity starts with `prefix`
/// (`spiffe://<trust-domain>/operator/`) and whose serial is on record as an operator's.
/// Agent certificates chain to the same CA; this keeps them out. A serial not in the
/// current view (an operator certificate issued a moment ago) makes the state be read
/// again, at most a few times a second.
pub(super) fn authorize_operator(state: StateView, prefix: String) -> crate::admin::Authorize {
    Arc::new(move |der| {
        let (state, prefix) = (state.clone(), prefix.clone());
        Box::pin(async move {
            let cert =
                revproxy_ca::CertSummary::from_der(&der).ok_or(OperatorRefused::Unreadable)?;
            let Some(name) = cert.uris.iter().find_map(|u| u.strip_prefix(&prefix)) else {
                return Err(OperatorRefused::NotOperator {
                    serial: cert.serial,
                    identities: cert.uris.join(", "),
                });
            };
            let known = |s: Arc<Snapshot>| s.operators.contains(&cert.serial);
            if !known(state.get()) && !known(state.refresh_seldom(RELOAD_AT_MOST).await) {
                return Err(OperatorRefused::NotOnRecord {
                    serial: cert.serial,
                });
            }
            Ok(Admitted {
                name: name.to_string(),
                serial: cert.serial,
                not_after: cert.not_after,
            })
        })
    })
}

/// Whether an admitted operator still may use the admin listener, asked before each
/// request on its connection: not revoked since, not expired.
pub(super) fn operator_still_admitted(
    state: StateView,
) -> Arc<dyn Fn(&Admitted) -> bool + Send + Sync> {
    Arc::new(move |admitted| {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        now < admitted.not_after && state.get().operators.contains(&admitted.serial)
    })
}

/// Least time between state reloads forced by unknown operator certificates.
const RELOAD_AT_MOST: std::time::Duration = std::time::Duration::from_millis(250);

/// The proxy's [`crate::admin::View`].
pub(super) struct ProxyView(pub(super) Arc<Shared>);

impl crate::admin::View for ProxyView {
    fn metrics(&self) -> String {
        let shared = &self.0;
        let store = shared.state.store_health();
        (shared.metrics).render(&shared.registry, &shared.state.get(), &store)
    }

    /// Ready means "can route clients": listeners up, state loaded, not shutting down.
    /// The store's health is not part of it: routing goes on from the last snapshot while
    /// the store is down, and a load balancer that took out every proxy whose database
    /// stopped would turn a database outage into a public one. The store is reported
    /// apart (`/status`, `revproxy_store_up`, the log).
    fn ready(&self) -> Result<(), NotReady> {
        if !self.0.ready.load(Ordering::Relaxed) {
            return Err(NotReady::NotServing);
        }
        Ok(())
    }

    fn status(&self) -> serde_json::Value {
        let shared = &self.0;
        let state = shared.state.get();
        let store = shared.state.store_health();
        let tunnels = shared.registry.snapshot();

        // Every agent on record with a grant or a tunnel, and its tunnels.
        let mut agents: BTreeMap<String, Vec<serde_json::Value>> = state
            .grants
            .keys()
            .map(|agent| (agent.clone(), Vec::new()))
            .collect();
        for (t, hosts, draining) in &tunnels {
            agents.entry(t.agent.clone()).or_default().push(json!({
                "id": t.id,
                "transport": t.transport(),
                "peer": t.peer.to_string(),
                "since": t.since,
                "serial": t.serial,
                "not_after": t.not_after,
                "draining": draining,
                "extra": t.extra,
                "streams": t.streams(),
                "names": hosts,
            }));
        }
        let agents: Vec<_> = agents
            .into_iter()
            .map(|(agent, tunnels)| {
                json!({
                    "agent": agent,
                    "certificate_expires": state.expiry.get(&agent),
                    "granted": state.grants.get(&agent).cloned().unwrap_or_default(),
                    "may_reach": state.access.get(&agent).cloned().unwrap_or_default(),
                    "tunnels": tunnels,
                })
            })
            .collect();

        // Every name that can be served: granted to an agent, or a static route.
        let mut names: BTreeMap<String, &str> = BTreeMap::new();
        for pattern in state.grants.values().flatten() {
            let by = if state.is_private(pattern) {
                "private"
            } else {
                "agent"
            };
            names.insert(pattern.clone(), by);
        }
        let settings = shared.settings();
        for name in settings.routes.keys() {
            names.entry(name.clone()).or_insert("route");
        }
        shared.metrics.ensure_names(names.keys());
        let names: Vec<_> = names
            .into_iter()
            .map(|(name, by)| {
                let live = tunnels
                    .iter()
                    .filter(|(_, hosts, draining)| !draining && hosts.contains(&name))
                    .count();
                let (open, received, sent) = shared.metrics.name_counts(&name);
                json!({
                    "name": name,
                    "served_by": match by {
                        "route" => format!("route to {}", settings.routes[&name]),
                        "private" => "agent (private)".to_string(),
                        _ => "agent".to_string(),
                    },
                    "tunnels": live,
                    "open_streams": open,
                    "received_bytes": received,
                    "sent_bytes": sent,
                })
            })
            .collect();

        // Names whose TLS ends here.
        let tls: Vec<_> = (state.tls.values())
            .map(|r| {
                json!({
                    "name": r.name,
                    "source": r.source.label(),
                    "not_after": r.not_after,
                    "keep_http": r.keep_http,
                    "last_error": r.last_error,
                })
            })
            .collect();

        let listeners: Vec<_> = (shared.listeners.read().expect("listeners lock"))
            .iter()
            .map(|(address, protocol)| json!({ "address": address, "protocol": protocol }))
            .collect();
        json!({
            "role": "proxy",
            "version": env!("CARGO_PKG_VERSION"),
            "started": shared.started,
            "now": time::OffsetDateTime::now_utc().unix_timestamp(),
            "ready": self.ready().is_ok(),
            "not_ready_because": self.ready().err().map(|e| e.to_string()),
            "proxy": {
                "id": shared.me.id,
                "advertise": shared.me.address,
                "store": shared.state.store_name(),
                "store_up": store.up,
                "store_problem": store.problem,
                "store_last_ok": store.last_ok,
                "peers": shared.peers.read().expect("peers lock").iter().map(|p| json!({"id": p.id, "address": p.address})).collect::<Vec<_>>(),
            },
            "agents": agents,
            "names": names,
            "tls": tls,
            "listeners": listeners,
        })
    }
}
