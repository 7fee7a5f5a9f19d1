//! Extra tunnels: how an agent carries more clients at once than one tunnel does.
//!
//! A tunnel carries at most [`MAX_STREAMS`] streams (more would give up the stall isolation
//! an h2 connection window gives, `docs/protocol.md`). When the streams on an agent's
//! tunnels to a proxy reach [`CROWDED`](crate::tunnel::agent_end::CROWDED) of what those carry, the supervisor adds one more
//! beside them, an extra tunnel: the proxy spreads streams over it and the tunnel it
//! joined, least loaded first. Up to [`MAX_EXTRA_TUNNELS`], one at a time. Once the
//! streams have fitted in one tunnel fewer at a quarter each for [`EXTRA_TUNNEL_IDLE`] (or as set), the newest
//! extra tunnel is retired (its open streams run to their end).
//!
//! Extra tunnels belong to the tunnel they joined: when that one is replaced (a renewal,
//! a move, a better transport) or lost, they are retired with it, once the next one is up.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::task::Id;
use tokio::time::Instant;
use tracing::{debug, info};

use super::session::OVERLAP;
use crate::runtime::backoff::Backoff;
use crate::runtime::shutdown::Trigger;
use crate::tunnel::{Load, MAX_EXTRA_TUNNELS, MAX_STREAMS};

/// How long the streams must fit in one tunnel fewer before an extra one is retired: long
/// enough that a load going up and down does not open and close tunnels each time.
pub const EXTRA_TUNNEL_IDLE: Duration = Duration::from_secs(30);
/// How often the streams are compared with the tunnels while there are extra ones, at
/// most (and a fifth of the idle time when that is shorter).
const CHECK_EVERY: Duration = Duration::from_secs(5);
/// First pause after an extra tunnel failed or was refused (the proxy admits one only
/// while the agent's tunnels are busy by its own count), doubling up to the cap.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// One extra tunnel's session.
struct Extra {
    task: Id,
    retire: Trigger,
    /// When its tunnel came up.
    established: Arc<OnceLock<Instant>>,
}

/// The extra tunnels beside an agent's current tunnel to one proxy.
pub(super) struct Pool {
    load: Arc<Load>,
    /// Oldest first.
    extras: Vec<Extra>,
    /// No extra tunnel is added before this (one failed).
    not_before: Option<Instant>,
    retry: Backoff,
    /// Since when the streams have fitted in one tunnel fewer.
    quiet_since: Option<Instant>,
    /// When the streams are next compared with the tunnels.
    next_check: Instant,
    /// How long the streams must fit in one tunnel fewer before an extra one is retired.
    idle: Duration,
}

impl Pool {
    /// An empty pool whose extra tunnels are retired after `idle` unneeded.
    pub(super) fn new(idle: Duration) -> Pool {
        let load = Arc::new(Load::default());
        load.set_tunnels(1);
        Pool {
            load,
            extras: Vec::new(),
            not_before: None,
            retry: Backoff::new(RETRY_MIN, RETRY_MAX),
            quiet_since: None,
            next_check: Instant::now() + Self::check_every(idle),
            idle,
        }
    }

    fn check_every(idle: Duration) -> Duration {
        CHECK_EVERY.min(idle / 5)
    }

    /// Where the current tunnel and its extra ones count their streams.
    pub(super) fn load(&self) -> Arc<Load> {
        self.load.clone()
    }

    /// A fresh pool for the next tunnel; this one's extra tunnels are retired with the
    /// tunnel they joined (`to_retire`: once the next one is up).
    pub(super) fn start_over(&mut self, to_retire: &Mutex<Vec<Trigger>>) {
        let old = std::mem::replace(self, Pool::new(self.idle));
        (to_retire.lock().expect("retire list")).extend(old.extras.into_iter().map(|e| e.retire));
    }

    /// Whether another tunnel may be added now.
    pub(super) fn may_grow(&self) -> bool {
        self.extras.len() < MAX_EXTRA_TUNNELS && self.not_before.is_none()
    }

    /// Completes when the tunnels are crowded and another may be added.
    pub(super) async fn crowded(&self) {
        if !self.may_grow() {
            return std::future::pending().await;
        }
        self.load.crowded().await
    }

    /// Completes when it is time to look at the streams again: the pause after a failure
    /// is over, or a check of whether an extra tunnel is still needed is due.
    pub(super) async fn next_check(&self) {
        match (self.not_before, self.extras.is_empty()) {
            (Some(at), _) => tokio::time::sleep_until(at).await,
            (None, false) => tokio::time::sleep_until(self.next_check).await,
            (None, true) => std::future::pending().await,
        }
    }

    /// Counts an extra tunnel's session, spawned as `task`.
    pub(super) fn added(&mut self, task: Id, retire: Trigger, established: Arc<OnceLock<Instant>>) {
        self.extras.push(Extra {
            task,
            retire,
            established,
        });
        self.load.set_tunnels(1 + self.extras.len());
        info!(
            streams = self.load.open(),
            tunnels = self.load.tunnels(),
            "the tunnels are crowded: adding one"
        );
    }

    /// A session ended: if it was one of the extra tunnels, it is counted out, and one
    /// that was not up for long pauses the next.
    pub(super) fn ended(&mut self, task: Id) {
        let Some(at) = self.extras.iter().position(|e| e.task == task) else {
            return;
        };
        let extra = self.extras.remove(at);
        self.load.set_tunnels(1 + self.extras.len());
        let was_up = (extra.established.get()).is_some_and(|at| at.elapsed() >= OVERLAP);
        if was_up {
            self.retry.reset();
        } else {
            let pause = self.retry.next_delay();
            debug!(pause = %crate::runtime::logging::duration(pause), "an extra tunnel failed or was refused; pausing before the next");
            self.not_before = Some(Instant::now() + pause);
        }
    }

    /// Ends a pause that is over, and retires the newest extra tunnel once the streams
    /// have fitted in one tunnel fewer, at a quarter of each, for [`EXTRA_TUNNEL_IDLE`] (or as set).
    pub(super) fn check(&mut self) {
        let now = Instant::now();
        self.next_check = now + Self::check_every(self.idle);
        if self.not_before.is_some_and(|at| at <= now) {
            self.not_before = None;
        }
        let fewer = self.extras.len(); // tunnels with one fewer: the current one + extras - 1
        let fits = self.load.open() <= fewer * MAX_STREAMS as usize / 4;
        if self.extras.is_empty() || !fits {
            self.quiet_since = None;
            return;
        }
        let since = *self.quiet_since.get_or_insert(now);
        if now.duration_since(since) < self.idle {
            return;
        }
        self.quiet_since = None;
        if let Some(newest) = self.extras.pop() {
            newest.retire.fire();
            self.load.set_tunnels(1 + self.extras.len());
            info!(
                streams = self.load.open(),
                tunnels = self.load.tunnels(),
                "the tunnels are quiet: retiring an extra one"
            );
        }
    }
}
