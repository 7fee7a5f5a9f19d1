//! The proxy's budget for bytes held in streams, enforced by flow control.
//!
//! A stream whose reader stalls holds what the agent was allowed to send and the client
//! has not taken: at most its receive window. The budget bounds the sum: every stream the
//! proxy receives on gets the same window, the largest step of [`WINDOWS`] such that all
//! of them full at once need at most half the budget. With few streams that is the full
//! [`STREAM_WINDOW`] (fast streams, WAN round trips); as streams multiply, the windows
//! narrow, down to [`MIN_WINDOW`]. Nothing is ended to keep the budget, and a narrower
//! window slows a stream only when its round trip is long.
//!
//! An h2 tunnel applies the window as `SETTINGS_INITIAL_WINDOW_SIZE`, which moves every
//! open stream's window too. Bytes granted before a window narrowed stay granted until
//! they are read: each halving of the window lets the streams that arrived meanwhile fill
//! another quarter of the budget, so a crowd of stalled readers arriving at once holds up
//! to about twice the budget (the half, and five halvings of a quarter each), not their
//! full windows.
//!
//! quinn fixes a QUIC stream's window when its tunnel starts and cannot narrow it, and a
//! QUIC connection's credit cannot be taken back either: QUIC streams count in the
//! budget's share but keep their full window, and what bounds a stalled one is the
//! minimum-progress rule (`pump.rs`), which cuts it after one send timeout.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use tracing::info;

use super::STREAM_WINDOW;

/// The smallest window the budget narrows streams to: a write's worth (one stream still
/// moves 64 KiB per round trip; the budget is sized so that this floor is rarely met).
pub(crate) const MIN_WINDOW: u32 = 64 * 1024;

/// The windows a budget chooses from, largest first: halving steps, so that a tunnel is
/// told of a change only when the number of streams doubled or halved.
pub(crate) const WINDOWS: [u32; 6] = [
    STREAM_WINDOW,
    STREAM_WINDOW / 2,
    STREAM_WINDOW / 4,
    STREAM_WINDOW / 8,
    STREAM_WINDOW / 16,
    MIN_WINDOW,
];
const _: () = assert!(STREAM_WINDOW / 32 == MIN_WINDOW);

/// The bytes all streams of a process may hold, and the window that keeps them there.
#[derive(Debug)]
pub(crate) struct Budget {
    limit: u64,
    /// Streams receiving from tunnels now.
    streams: AtomicU64,
    /// The window each stream gets now; tunnels read it as they wake (see h2's `drive`).
    window: AtomicU32,
    gauges: Option<Gauges>,
}

/// The budget's metrics: the window it gives, and the streams sharing it.
#[derive(Debug)]
pub(crate) struct Gauges {
    pub(crate) window: prometheus::IntGauge,
    pub(crate) streams: prometheus::IntGauge,
}

impl Budget {
    /// A budget of `limit` bytes, shown in `gauges`.
    pub(crate) fn new(limit: u64, gauges: Option<Gauges>) -> Budget {
        if let Some(g) = &gauges {
            g.window.set(i64::from(STREAM_WINDOW));
        }
        Budget {
            limit,
            streams: AtomicU64::new(0),
            window: AtomicU32::new(STREAM_WINDOW),
            gauges,
        }
    }

    /// No budget: every stream keeps the full window (the agent's).
    pub(crate) fn unlimited() -> Budget {
        Budget::new(u64::MAX, None)
    }

    /// The window each stream gets now: one atomic load, cheap enough for a tunnel to
    /// check each time it wakes.
    pub(crate) fn window(&self) -> u32 {
        self.window.load(Ordering::Relaxed)
    }

    /// Counts a stream that receives from a tunnel until the returned guard drops.
    pub(crate) fn receiving(self: &Arc<Self>) -> Receiving {
        let streams = self.streams.fetch_add(1, Ordering::Relaxed) + 1;
        self.update(streams);
        Receiving(self.clone())
    }

    /// Moves the window to fit `streams`: narrower at once when they would need more than
    /// half the budget at full windows, wider only when the wider window would need at
    /// most three eighths (a count going up and down by one does not flip it back and
    /// forth).
    fn update(&self, streams: u64) {
        if let Some(g) = &self.gauges {
            g.streams.set(i64::try_from(streams).unwrap_or(i64::MAX));
        }
        let fits = |w: u32, num: u64, den: u64| {
            streams.saturating_mul(u64::from(w)) <= self.limit / den * num
        };
        let next = |now: u32| {
            let next = if !fits(now, 1, 2) {
                WINDOWS
                    .into_iter()
                    .find(|&w| fits(w, 1, 2))
                    .unwrap_or(MIN_WINDOW)
            } else {
                WINDOWS
                    .into_iter()
                    .find(|&w| w <= now || fits(w, 3, 8))
                    .unwrap_or(now)
            };
            (next != now).then_some(next)
        };
        let changed = (self.window)
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, next)
            .ok()
            .map(|was| (was, next(was).unwrap_or(was)));
        if let Some((was, now)) = changed {
            if let Some(g) = &self.gauges {
                g.window.set(i64::from(now));
            }
            info!(
                streams,
                budget = format_args!("{}MiB", self.limit >> 20),
                window = format_args!("{}KiB", now / 1024),
                was = format_args!("{}KiB", was / 1024),
                "stream windows {} to fit the stream buffer budget",
                if now < was { "narrowed" } else { "widened" },
            );
        }
    }
}

/// A stream counted in a [`Budget`] (see [`Budget::receiving`]).
#[derive(Debug)]
pub(crate) struct Receiving(Arc<Budget>);

impl Drop for Receiving {
    fn drop(&mut self) {
        let streams = self.0.streams.fetch_sub(1, Ordering::Relaxed) - 1;
        self.0.update(streams);
    }
}

/// The default budget: a sixteenth of the memory this process may use (the machine's, or
/// its control group's limit when lower), between 64 MiB and 1 GiB; 256 MiB when neither
/// can be read.
pub(crate) fn default_budget() -> u64 {
    const MIB: u64 = 1024 * 1024;
    match crate::runtime::memory::usable_memory() {
        Some(bytes) => (bytes / 16).clamp(64 * MIB, 1024 * MIB),
        None => 256 * MIB,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn windows_narrow_as_streams_multiply_and_widen_with_a_margin() {
        let budget = Arc::new(Budget::new(64 * MIB, None));
        let mut held = Vec::new();
        for _ in 0..16 {
            held.push(budget.receiving());
        }
        assert_eq!(
            budget.window(),
            STREAM_WINDOW,
            "16 x 2 MiB fit half of 64 MiB"
        );
        held.push(budget.receiving());
        assert_eq!(budget.window(), STREAM_WINDOW / 2, "17 x 2 MiB do not");
        for _ in 17..1100 {
            held.push(budget.receiving());
        }
        assert_eq!(
            budget.window(),
            MIN_WINDOW,
            "the floor, even beyond the budget"
        );
        held.truncate(16);
        // 16 x 2 MiB is half the budget: more than three eighths, so one step below.
        assert_eq!(budget.window(), STREAM_WINDOW / 2);
        held.truncate(12);
        assert_eq!(budget.window(), STREAM_WINDOW);
        held.push(budget.receiving());
        assert_eq!(budget.window(), STREAM_WINDOW, "no flip back for one more");
    }

    #[test]
    fn each_stream_moves_the_window_when_it_must() {
        let budget = Arc::new(Budget::new(8 * MIB, None));
        let a = budget.receiving();
        let b = budget.receiving();
        assert_eq!(
            budget.window(),
            STREAM_WINDOW,
            "2 x 2 MiB fit half of 8 MiB"
        );
        let c = budget.receiving();
        assert_eq!(budget.window(), STREAM_WINDOW / 2);
        drop((a, b, c));
        assert_eq!(budget.window(), STREAM_WINDOW);
        let unlimited = Arc::new(Budget::unlimited());
        let many: Vec<_> = (0..5000).map(|_| unlimited.receiving()).collect();
        assert_eq!(unlimited.window(), STREAM_WINDOW);
        drop(many);
    }
}
