//! One tunnel session: connect to the proxy (unless a probe already did), retire the
//! tunnels it replaces once it is up, then serve the proxy's streams until the tunnel
//! ends, is retired, or the agent stops.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::info;

use super::backend::ServiceMap;
use super::identity::Identity;
use crate::runtime::rfc3339;
use crate::runtime::shutdown::Trigger;
use crate::tunnel::{
    self, AgentConn, ConnectError, Kind, Load, Serving, StreamLimits, Transport, TunnelError,
};

/// Where a tunnel goes: an address, and which proxy must answer there when the agent
/// knows (one of several proxies sharing a store).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct Target {
    /// `host:port` of a proxy's agent listener.
    pub(super) addr: String,
    /// The proxy id its certificate must name; `None` for the configured server (which
    /// may be a load balancer in front of several).
    pub(super) proxy: Option<String>,
}

/// How long a new tunnel serves beside the ones it replaces before they are retired: the
/// proxy registers it after its admission checks (a store read, milliseconds), so for a
/// moment after the handshake only the old tunnels are routed to.
pub(super) const OVERLAP: Duration = Duration::from_secs(1);

/// What every session of an agent needs, fixed when the agent is built.
pub(super) struct SessionCtx {
    /// The configured proxy address, `host:port`: where the agent learns of the others.
    pub(super) server: String,
    /// How many tunnels are up to each target (the proxy list's handover waits on it).
    pub(super) tunnels_up: tokio::sync::watch::Sender<std::collections::HashMap<Target, usize>>,
    pub(super) services: Arc<ServiceMap>,
    pub(super) metrics: Arc<super::metrics::AgentMetrics>,
    /// Where mesh streams go up (`connect.rs`).
    pub(super) up: Arc<super::connect::UpLinks>,
    pub(super) drain_grace: Duration,
    /// Bounds on each stream's backend socket.
    pub(super) stream_limits: StreamLimits,
    pub(super) transport: Transport,
    pub(super) quic_fallback_after: Duration,
    pub(super) quic_reprobe: Duration,
    /// How long an extra tunnel must have been unneeded before it is retired (`pool.rs`).
    pub(super) extra_tunnel_idle: Duration,
    /// Where tunnels run, each with its streams (`runtime::lanes`).
    pub(super) lanes: crate::runtime::lanes::Lanes,
    /// The agent's state directory, for the advice to enroll again.
    pub(super) state_dir: std::path::PathBuf,
    /// Whether the proxy's refusal of the current certificate was reported already.
    pub(super) told: super::refusal::Told,
    /// The newest proxy list a proxy sent over a tunnel, unchecked (`proxies.rs` checks
    /// it).
    pub(super) proxies_told: tokio::sync::watch::Sender<bytes::Bytes>,
}

/// Why a session ended badly.
#[derive(Debug, thiserror::Error)]
pub(super) enum SessionError {
    #[error("{source}{}", clock_note(.source, *.not_after))]
    Connect {
        source: ConnectError,
        /// Expiry of the certificate the attempt used.
        not_after: i64,
    },
    #[error(transparent)]
    Tunnel(#[from] TunnelError),
}

impl SessionError {
    /// Whether the tunnel was up and the proxy's end went away (it stopped or restarts).
    pub(super) fn went_away(&self) -> bool {
        matches!(self, SessionError::Tunnel(e) if e.went_away())
    }
}

/// Both clocks' view, which helps with "expired" or "not yet valid" refusals.
fn clock_note(e: &ConnectError, not_after: i64) -> String {
    if !e.is_handshake() {
        return String::new();
    }
    format!(
        " (our certificate is valid until {}; this machine's clock says {})",
        rfc3339(not_after),
        rfc3339(time::OffsetDateTime::now_utc().unix_timestamp()),
    )
}

/// Connects to `target` as `id` on `kind` within `limit`; an `extra` tunnel is one added
/// beside the agent's tunnel while it is crowded (`pool.rs`).
pub(super) async fn connect(
    target: &Target,
    kind: Kind,
    id: &Identity,
    limit: Duration,
    extra: bool,
) -> Result<AgentConn, SessionError> {
    let failed = |source| SessionError::Connect {
        source,
        not_after: id.not_after,
    };
    let mut creds = id
        .credentials()
        .map_err(|e| failed(ConnectError::Config(e)))?;
    creds.proxy = target.proxy.as_deref();
    tunnel::connect(kind, &target.addr, &creds, limit, extra)
        .await
        .map_err(failed)
}

/// One tunnel, from connecting to its end.
pub(super) struct Session {
    pub(super) ctx: Arc<SessionCtx>,
    pub(super) target: Arc<Target>,
    pub(super) kind: Kind,
    /// Longest a connection attempt may take.
    pub(super) limit: Duration,
    /// A connection a background probe already made.
    pub(super) preconnected: Option<AgentConn>,
    pub(super) identity: Arc<Identity>,
    /// Shutdown: drain within the grace period.
    pub(super) stop: Trigger,
    /// A newer tunnel is up: take no new streams, let open ones finish.
    pub(super) retire: Trigger,
    /// Fired when the proxy says a new process serves it now.
    pub(super) moving: Trigger,
    /// When this session's tunnel came up (its handshakes done).
    pub(super) established: Arc<std::sync::OnceLock<tokio::time::Instant>>,
    /// The retire triggers of older tunnels, fired once this one is up (not before: a
    /// client must always find a tunnel).
    pub(super) to_retire: Arc<Mutex<Vec<Trigger>>>,
    /// Where the streams of this tunnel and of the extra ones beside it are counted.
    pub(super) load: Arc<Load>,
    /// An extra tunnel (`pool.rs`): it only adds streams; the tunnel it joined does the
    /// rest (mesh streams, taking over from older tunnels).
    pub(super) extra: bool,
}

impl Session {
    pub(super) async fn run(self) -> Result<(), SessionError> {
        let metrics = &self.ctx.metrics;
        let conn = match self.preconnected {
            Some(conn) => conn,
            None => tokio::select! {
                r = connect(&self.target, self.kind, &self.identity, self.limit, self.extra) => {
                    r.inspect_err(|_| metrics.connect_failed(self.kind.name()))?
                }
                () = self.stop.cancelled() => return Ok(()),
                () = self.retire.cancelled() => return Ok(()),
            },
        };
        let _ = self.established.set(tokio::time::Instant::now());
        let listed = metrics.tunnel_up(self.kind.name());
        // A QUIC tunnel carries this agent's mesh streams too.
        let up = (conn.up_link())
            .filter(|_| !self.extra)
            .map(|link| self.ctx.up.tunnel_up(link));
        info!(extra = self.extra.then_some(true), "tunnel up");
        let _counted = (!self.extra).then(|| Counted::new(&self.ctx.tunnels_up, &self.target));
        // The tunnels this one replaces are retired once it has lived `OVERLAP`: the proxy
        // registers a tunnel only after its own checks, a moment after the handshake, and
        // may refuse it (then this one ends first and they stay).
        let mut olds: Vec<Trigger> = if self.extra {
            Vec::new()
        } else {
            (self.to_retire.lock().expect("retire list").drain(..)).collect()
        };
        let overlap = tokio::time::sleep(OVERLAP);
        tokio::pin!(overlap);
        let services = self.ctx.services.clone();
        let serve = conn.serve(Serving {
            backends: services,
            stop: self.stop,
            retire: self.retire.clone(),
            moving: self.moving,
            grace: self.ctx.drain_grace,
            limits: self.ctx.stream_limits.clone(),
            load: self.load.clone(),
            proxies: self.ctx.proxies_told.clone(),
        });
        tokio::pin!(serve);
        let mut retiring = false;
        let served = loop {
            tokio::select! {
                r = &mut serve => break r,
                () = &mut overlap, if !olds.is_empty() => {
                    for old in olds.drain(..) {
                        old.fire();
                    }
                }
                () = self.retire.cancelled(), if !retiring => {
                    retiring = true;
                    listed.draining();
                    if let Some(id) = up {
                        self.ctx.up.tunnel_down(id);
                    }
                }
            }
        };
        // Ended before it took over: the next tunnel retires the old ones.
        self.to_retire.lock().expect("retire list").extend(olds);
        if let Some(id) = up {
            self.ctx.up.tunnel_down(id);
        }
        served?;
        Ok(())
    }
}

/// Counts a tunnel as up to its target for as long as it lives.
struct Counted<'a> {
    counts: &'a tokio::sync::watch::Sender<std::collections::HashMap<Target, usize>>,
    target: &'a Target,
}

impl<'a> Counted<'a> {
    fn new(
        counts: &'a tokio::sync::watch::Sender<std::collections::HashMap<Target, usize>>,
        target: &'a Target,
    ) -> Counted<'a> {
        counts.send_modify(|c| *c.entry(target.clone()).or_default() += 1);
        Counted { counts, target }
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.counts.send_modify(|c| {
            if let Some(n) = c.get_mut(self.target) {
                *n -= 1;
                if *n == 0 {
                    c.remove(self.target);
                }
            }
        });
    }
}
