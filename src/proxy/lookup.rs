//! Which live tunnels and static route may serve the name a public client asked for
//! (DESIGN.md section 5), waiting a moment for an agent that is on its way: just after an
//! upgrade, or a granted port's agent coming back.

use std::net::SocketAddr;

use tracing::debug;

use super::registry::Found;
use super::reload::Settings;
use super::replies::ConnId;
use super::Shared;

/// The live tunnels and the static route that may serve `name`; if there are none,
/// whether some agent is granted it (offline) or nothing is (no route).
///
/// The most specific match first (DESIGN.md section 5): agents granted the exact name,
/// then a static route for it, then agents holding a wildcard. A name any agent's private
/// grant covers is never routed from here, whatever public grant (an exact name or a
/// wildcard, of any agent) or static route covers it too: it looks like any unknown name.
pub(super) async fn lookup(
    shared: &Shared,
    name: &str,
    settings: &Settings,
    peer: SocketAddr,
    id: ConnId,
) -> Result<(Found, Option<String>), bool> {
    let state = shared.state.get();
    if state.covers_private(name) {
        debug!(%peer, conn = %id, host = %name, "a private name asked for on a public listener");
        return Err(false);
    }
    let mut found = shared.registry.lookup(name);
    let route = settings.routes.get(name).cloned();
    // Just after an upgrade the agents are still moving here: a client of a name they
    // serve waits for its tunnel rather than hearing that the name is offline.
    if let Some(until) = shared.hold_until {
        if found.is_empty()
            && route.is_none()
            && tokio::time::Instant::now() < until
            && state.is_granted_anywhere(name)
        {
            debug!(%peer, conn = %id, host = %name, "just upgraded: waiting for the agent to move here");
            found = shared.registry.wait_for(name, until).await;
        }
    }
    // A granted port's listener stays a moment after its last tunnel left (an agent
    // restarting, `ports.rs`): a client that came then waits for the agent to be back.
    if found.is_empty() && revproxy_ca::ports::is_port_name(name) && state.is_granted_anywhere(name)
    {
        let until = tokio::time::Instant::now() + super::ports::CLIENT_WAIT;
        debug!(%peer, conn = %id, host = %name, "no tunnel serves this granted port now: waiting for its agent");
        found = shared.registry.wait_for(name, until).await;
    }
    if found.is_empty() && route.is_none() {
        return Err(state.is_granted_anywhere(name));
    }
    Ok((found, route))
}
