//! Private names (the mesh): a stream an agent opened to reach a name, up its own tunnel
//! (QUIC) or its mesh channel (h2), is checked against the access rules and joined to a
//! stream down a tunnel of an agent serving the name, which learns who calls.
//!
//! Access is default deny: the caller's agent must hold an access rule for the name
//! (`revproxy access allow`, or `token create --connect`). Every open mesh stream is
//! registered, and each state change (revocation, access taken back) cuts the streams it
//! no longer allows, within the state watch's second.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tracing::{debug, info, warn};

use super::public::OPEN_TIMEOUT;
use super::state::Snapshot;
use super::Shared;
use crate::runtime::shutdown::Trigger;
use crate::tunnel::{Counted, OpenRequest, Upward};

/// Copy buffer per direction when joining two tunnel streams.
const JOIN_BUFFER: usize = 64 * 1024;

/// Who opened a mesh stream: the agent on the other end of the tunnel or channel it came
/// up, from its verified certificate.
#[derive(Debug)]
pub(super) struct Caller {
    pub(super) agent: String,
    pub(super) identity: String,
    pub(super) serial: String,
    /// Where its tunnel connects from.
    pub(super) peer: SocketAddr,
}

/// The open mesh streams, so that a state change can cut those it no longer allows, and
/// the h2 mesh channels each agent holds.
#[derive(Default)]
pub(super) struct Streams {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Entry>>,
    channels: Mutex<HashMap<String, usize>>,
    /// Each live h2 mesh channel's certificate serial and how to close it.
    channel_cuts: Mutex<HashMap<u64, (String, Trigger)>>,
    /// Mesh streams each agent may have in hand at once, across its tunnels and channels.
    permits: Mutex<HashMap<String, Arc<tokio::sync::Semaphore>>>,
}

/// Mesh streams one agent may have in hand at once (being routed or open), across all
/// its tunnels and channels: an agent that resets streams as fast as it opens them cannot
/// make the proxy route more.
const MAX_PER_AGENT: usize = crate::tunnel::MAX_UPWARD as usize;

/// A mesh channel's entry among those a revocation closes; removed when dropped.
pub(super) struct ChannelCut {
    streams: Arc<Streams>,
    id: u64,
}

impl Drop for ChannelCut {
    fn drop(&mut self) {
        self.streams
            .channel_cuts
            .lock()
            .expect("mesh channels")
            .remove(&self.id);
    }
}

/// One agent's h2 mesh channel's place in its count; given back when dropped.
pub(super) struct ChannelSlot {
    streams: Arc<Streams>,
    agent: String,
}

impl Drop for ChannelSlot {
    fn drop(&mut self) {
        let mut channels = self.streams.channels.lock().expect("mesh channels");
        if let Some(n) = channels.get_mut(&self.agent) {
            *n -= 1;
            if *n == 0 {
                channels.remove(&self.agent);
            }
        }
    }
}

struct Entry {
    agent: String,
    serial: String,
    name: String,
    cut: Trigger,
}

/// An open stream's place in [`Streams`]; removed when dropped.
struct Registered<'a> {
    streams: &'a Streams,
    id: u64,
    cut: Trigger,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.streams
            .open
            .lock()
            .expect("mesh streams")
            .remove(&self.id);
    }
}

impl Streams {
    /// A permit for one more mesh stream of `agent`, unless it has its most in hand.
    pub(super) fn permit(&self, agent: &str) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let semaphore = self
            .permits
            .lock()
            .expect("mesh permits")
            .entry(agent.to_string())
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(MAX_PER_AGENT)))
            .clone();
        semaphore.try_acquire_owned().ok()
    }

    /// Registers a live mesh channel of the certificate `serial`; the trigger fires when
    /// that certificate is revoked. Forgotten when the guard is dropped.
    pub(super) fn channel_cut(self: &Arc<Self>, serial: &str) -> (Trigger, ChannelCut) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let cut = Trigger::default();
        self.channel_cuts
            .lock()
            .expect("mesh channels")
            .insert(id, (serial.to_string(), cut.clone()));
        (
            cut,
            ChannelCut {
                streams: self.clone(),
                id,
            },
        )
    }

    /// A slot for one more h2 mesh channel of `agent`, unless it holds `max` already (an
    /// agent needs one; a few allow for a reconnect overlapping the old channel).
    pub(super) fn channel(self: &Arc<Self>, agent: &str, max: usize) -> Option<ChannelSlot> {
        let mut channels = self.channels.lock().expect("mesh channels");
        let n = channels.entry(agent.to_string()).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(ChannelSlot {
            streams: self.clone(),
            agent: agent.to_string(),
        })
    }

    fn register(&self, caller: &Caller, name: &str) -> Registered<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let cut = Trigger::default();
        self.open.lock().expect("mesh streams").insert(
            id,
            Entry {
                agent: caller.agent.clone(),
                serial: caller.serial.clone(),
                name: name.to_string(),
                cut: cut.clone(),
            },
        );
        Registered {
            streams: self,
            id,
            cut,
        }
    }

    /// Cuts the open streams `state` no longer allows: the caller's certificate revoked,
    /// or its access to the name taken back; closes the mesh channels of revoked
    /// certificates.
    pub(super) fn apply(&self, state: &Snapshot) {
        for (serial, cut) in self.channel_cuts.lock().expect("mesh channels").values() {
            if state.revoked.contains(serial) {
                cut.fire();
            }
        }
        for entry in self.open.lock().expect("mesh streams").values() {
            let revoked = state.revoked.contains(&entry.serial);
            if revoked || !state.may_reach(&entry.agent, &entry.name) {
                let why = if revoked {
                    "caller revoked"
                } else {
                    "access taken back"
                };
                info!(agent = %entry.agent, host = %entry.name, reason = %why, "cutting a mesh stream");
                entry.cut.fire();
            }
        }
    }
}

/// Routes one mesh stream of `caller` to an agent serving its name, or refuses it with a
/// status and a sentence the caller's agent logs. `permit` counts it against the caller's
/// agent while it lives.
pub(super) async fn serve_upward(
    shared: Arc<Shared>,
    caller: Arc<Caller>,
    up: Upward,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let _permit = permit;
    let name = match revproxy_ca::names::normalize_host(up.name()) {
        Ok(name) if !name.starts_with('*') => name,
        _ => {
            shared.metrics.mesh("bad_name");
            return up.refuse(400, "not a host name").await;
        }
    };
    // Only an address, never free text from the agent, goes into the logs.
    let client = up
        .client()
        .parse::<SocketAddr>()
        .map_or_else(|_| "-".to_string(), |a| a.to_string());
    // Registered before the state is read: a change from here on cuts it.
    let registered = shared.mesh.register(&caller, &name);
    let allowed = |state: &Snapshot| -> Result<(), (&'static str, String)> {
        if state.revoked.contains(&caller.serial) {
            return Err(("revoked", "this agent's certificate was revoked".into()));
        }
        if !state.may_reach(&caller.agent, &name) {
            return Err((
                "no_access",
                format!(
                    "{agent} has no access to {name}; ask the operator for `revproxy access allow {agent} {name}`",
                    agent = caller.agent
                ),
            ));
        }
        Ok(())
    };
    let state = shared.state.get();
    if let Err((outcome, reason)) = allowed(&state) {
        if outcome == "no_access" {
            warn!(agent = %caller.agent, host = %name, "mesh stream refused: no access");
        }
        shared.metrics.mesh(outcome);
        return up.refuse(403, &reason).await;
    }
    let found = shared.registry.lookup_mesh(&name);
    if found.is_empty() {
        let granted = state
            .grants
            .values()
            .flatten()
            .any(|p| p == &name || crate::route::name_matches(p, &name));
        let (status, outcome, reason) = if granted {
            (
                503,
                "offline",
                format!("no agent serving {name} is connected"),
            )
        } else {
            (404, "unknown", format!("no agent may serve {name}"))
        };
        shared.metrics.mesh(outcome);
        return up.refuse(status, &reason).await;
    }
    drop(state);

    // The same selection and deadline as a public client's.
    let deadline = tokio::time::Instant::now() + OPEN_TIMEOUT;
    let early = Bytes::new();
    let request = OpenRequest {
        name: &name,
        client: caller.peer,
        server: None,
        early: &early,
        caller: Some(&caller.identity),
        tls: None,
    };
    let mut down = None;
    let mut refused = None;
    // Counted under the pattern that found the tunnel, as a public client's stream is.
    let wildcard = name
        .split_once('.')
        .map_or_else(String::new, |(_, parent)| format!("*.{parent}"));
    let candidates = (found.exact.iter().map(|t| (t, &name)))
        .chain(found.wildcard.iter().map(|t| (t, &wildcard)));
    for (t, pattern) in candidates {
        let Some((t, slot)) = shared.registry.claim(t, deadline).await else {
            if tokio::time::Instant::now() < deadline {
                continue; // retired meanwhile, and its pool full
            }
            break;
        };
        match tokio::time::timeout_at(deadline, t.open(&request, &slot)).await {
            Ok(Ok(stream)) => {
                down = Some((stream, t.agent.clone(), pattern.clone(), slot));
                break;
            }
            Ok(Err(e)) => {
                if e.tunnel_is_gone() {
                    shared.registry.retire(t.id);
                }
                if let crate::tunnel::OpenError::Refused { status, .. } = &e {
                    refused = Some(*status);
                }
                debug!(agent = %t.agent, host = %name, error = %e, "mesh stream: agent could not open; trying the next");
            }
            Err(_) => break,
        }
    }
    let Some((down, serving, pattern, _slot)) = down else {
        shared.metrics.mesh("unavailable");
        // The serving agent's own status (its backend did not answer, say), without the
        // details, which are that agent's business.
        let (status, reason) = match refused {
            Some(status) => (
                status,
                format!("the agent serving {name} refused ({status})"),
            ),
            None => (503, format!("no agent serving {name} answered")),
        };
        return up.refuse(status, &reason).await;
    };
    let mut down = down.into_duplex();
    let Some(mut up) = up.accept().await else {
        return down.reset();
    };
    // The state may have changed while the stream was being opened.
    if allowed(&shared.state.get()).is_err() || registered.cut.is_fired() {
        up.reset();
        return down.reset();
    }
    shared.metrics.mesh("ok");
    // Both streams receive here (from the caller and from the serving agent).
    let budget = shared.settings().stream_limits.budget.clone();
    let _receiving = (budget.receiving(), budget.receiving());
    info!(caller = %caller.identity, agent = %serving, host = %name, %client, "mesh stream open");
    // The caller is the client: what it sends is received, what it gets is sent.
    let counters = shared.metrics.mesh_stream(&pattern);
    let mut counted = Counted::new(&mut up, &counters);
    let joined =
        tokio::io::copy_bidirectional_with_sizes(&mut counted, &mut down, JOIN_BUFFER, JOIN_BUFFER);
    let cut = tokio::select! {
        r = joined => {
            match r {
                Ok((from_caller, to_caller)) => {
                    debug!(caller = %caller.identity, host = %name, up = from_caller, down = to_caller, "mesh stream done")
                }
                Err(e) => debug!(caller = %caller.identity, host = %name, error = %e, "mesh stream ended with an error"),
            }
            false
        }
        () = registered.cut.cancelled() => true,
    };
    if cut {
        // Both ends see an error, not a clean end of stream.
        up.reset();
        down.reset();
    }
}
