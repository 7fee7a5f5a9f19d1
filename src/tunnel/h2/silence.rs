//! The proxy's watch over its h2 tunnels' silence: one thread looks at every tunnel's
//! last word ([`Heard`]) every [`SWEEP_EVERY`] and wakes only a tunnel silent for
//! [`SILENCE`], which then PINGs its agent (`super::watch_silence`).
//!
//! A timer per tunnel woke the tunnel's lane at every agent PING's anniversary, only to
//! find it had heard the agent meanwhile and sleep again: as many wake-ups as PINGs, each
//! costing a thread's sleep and wake (tens of microseconds here), which was half of what
//! an idle tunnel cost the proxy. A healthy tunnel's lane now wakes only for its agent's
//! PING.
//!
//! The sweep must cost nanoseconds per tunnel, so what it reads lies side by side: every
//! tunnel's clock is a slot in one table ([`Clocks`]), and the watched list holds each
//! tunnel's clock, silence and alarm inline. A list of pointers to clocks scattered over
//! the heap cost a cache and TLB miss or two per tunnel: about 3 µs each on this virtual
//! machine, 10 ms a sweep at 3,000 tunnels, more than all their PINGs together.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::SILENCE;

/// How often the silence of every tunnel is looked at: a silent tunnel PINGs within this
/// much of [`SILENCE`].
pub(crate) const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Clocks per chunk of the table: a chunk is 8 KiB, and is never given back (a process
/// holds at most as many as the most tunnels it ever had at once, over 1,024).
const CHUNK: usize = 1024;

/// Every tunnel's clock: milliseconds since [`epoch_ms`]'s start at its last word.
#[derive(Default)]
struct Clocks {
    chunks: Vec<&'static [AtomicU64; CHUNK]>,
    /// Slots not in use.
    free: Vec<usize>,
}

impl Clocks {
    /// A free slot, and its clock.
    fn take(&mut self) -> (&'static AtomicU64, usize) {
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                let chunk: &'static [AtomicU64; CHUNK] =
                    Box::leak(Box::new(std::array::from_fn(|_| AtomicU64::new(0))));
                let first = self.chunks.len() * CHUNK;
                self.chunks.push(chunk);
                self.free.extend((first + 1..first + CHUNK).rev());
                first
            }
        };
        (&self.chunks[slot / CHUNK][slot % CHUNK], slot)
    }

    fn give_back(&mut self, slot: usize) {
        self.free.push(slot);
    }
}

fn clocks() -> &'static Mutex<Clocks> {
    static CLOCKS: OnceLock<Mutex<Clocks>> = OnceLock::new();
    CLOCKS.get_or_init(Mutex::default)
}

/// Milliseconds since the first clock of this process: the time every clock keeps.
fn epoch_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// When a tunnel last received anything (for the proxy's keep-alive, which PINGs only a
/// silent tunnel: `h2::watch_silence`): a slot in the process's table of clocks, given
/// back when dropped.
pub(crate) struct Heard {
    at: &'static AtomicU64,
    slot: usize,
}

impl std::fmt::Debug for Heard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Heard")
            .field("silent_for", &self.silent_for())
            .finish()
    }
}

impl Heard {
    /// A clock that heard something just now.
    pub(crate) fn new() -> Heard {
        let (at, slot) = (clocks().lock().expect("clocks lock")).take();
        let heard = Heard { at, slot };
        heard.mark();
        heard
    }

    /// Something was received now.
    pub(crate) fn mark(&self) {
        self.at.store(epoch_ms(), Ordering::Relaxed);
    }

    /// How long nothing was received.
    pub(crate) fn silent_for(&self) -> Duration {
        silent_for(self.at, epoch_ms())
    }
}

impl Drop for Heard {
    fn drop(&mut self) {
        (clocks().lock().expect("clocks lock")).give_back(self.slot);
    }
}

fn silent_for(at: &AtomicU64, now_ms: u64) -> Duration {
    Duration::from_millis(now_ms.saturating_sub(at.load(Ordering::Relaxed)))
}

/// A tunnel being watched, as the sweep reads it (inline in the list, not behind a
/// pointer).
struct Watched {
    /// The tunnel's clock (its [`Heard`] is kept by the [`Watch`]).
    at: &'static AtomicU64,
    /// How long a silence counts ([`SILENCE`]).
    silence: Duration,
    /// Notified (a permit kept) while the tunnel is silent.
    alarm: Arc<Notify>,
}

#[derive(Default)]
struct Watchers {
    tunnels: Mutex<HashMap<u64, Watched>>,
    next: AtomicU64,
}

/// The process's watchers, and their sweeping thread, started on first use.
fn watchers() -> &'static Watchers {
    static WATCHERS: OnceLock<&'static Watchers> = OnceLock::new();
    WATCHERS.get_or_init(|| {
        let watchers: &'static Watchers = Box::leak(Box::default());
        // If the thread cannot start, a watched tunnel is never PINGed by the proxy: its
        // agent's own keep-alive still finds a dead path, and TCP a dead peer.
        let _ = std::thread::Builder::new()
            .name("revproxy-silence".into())
            .spawn(move || loop {
                std::thread::sleep(SWEEP_EVERY);
                watchers.sweep();
            });
        watchers
    })
}

impl Watchers {
    fn sweep(&self) {
        let now = epoch_ms();
        let tunnels = self.tunnels.lock().expect("silence lock");
        for watched in tunnels.values() {
            if silent_for(watched.at, now) >= watched.silence {
                watched.alarm.notify_one();
            }
        }
    }
}

/// A tunnel's place among the watched: [`Self::silent`] completes once it has been
/// silent for [`SILENCE`]. Dropping it stops the watch.
pub(crate) struct Watch {
    key: u64,
    heard: Arc<Heard>,
    silence: Duration,
    alarm: Arc<Notify>,
}

impl Watch {
    /// Watches the tunnel whose last word `heard` records.
    pub(crate) fn new(heard: Arc<Heard>) -> Watch {
        Watch::with_silence(heard, SILENCE)
    }

    fn with_silence(heard: Arc<Heard>, silence: Duration) -> Watch {
        let all = watchers();
        let key = all.next.fetch_add(1, Ordering::Relaxed);
        let alarm = Arc::new(Notify::new());
        let watched = Watched {
            at: heard.at,
            silence,
            alarm: alarm.clone(),
        };
        (all.tunnels.lock().expect("silence lock")).insert(key, watched);
        Watch {
            key,
            heard,
            silence,
            alarm,
        }
    }

    /// Completes when the tunnel has been silent for [`SILENCE`] (at most [`SWEEP_EVERY`]
    /// later).
    pub(crate) async fn silent(&self) {
        loop {
            self.alarm.notified().await;
            // A permit from before the tunnel was heard again is stale.
            if self.heard.silent_for() >= self.silence {
                return;
            }
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        (watchers().tunnels.lock().expect("silence lock")).remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clocks_lie_side_by_side_and_a_slot_given_back_is_taken_again() {
        let mut clocks = Clocks::default();
        let taken: Vec<_> = (0..CHUNK + 1).map(|_| clocks.take()).collect();
        assert_eq!(clocks.chunks.len(), 2);
        // In order, adjacent within a chunk.
        for (i, (at, slot)) in taken.iter().enumerate() {
            assert_eq!(*slot, i);
            assert!(std::ptr::eq(*at, &clocks.chunks[i / CHUNK][i % CHUNK]));
        }
        let second = std::ptr::from_ref(taken[1].0) as usize;
        assert_eq!(second - std::ptr::from_ref(taken[0].0) as usize, 8);
        clocks.give_back(5);
        let (at, slot) = clocks.take();
        assert_eq!(slot, 5);
        assert!(std::ptr::eq(at, taken[5].0));
        // No slot is handed out twice.
        let more: std::collections::HashSet<_> = (0..CHUNK).map(|_| clocks.take().1).collect();
        assert_eq!(more.len(), CHUNK);
        assert!(more.iter().all(|s| *s > CHUNK));
    }

    #[tokio::test]
    async fn only_a_silent_tunnel_is_woken_and_a_dropped_watch_is_forgotten() {
        let silence = Duration::from_millis(1500);
        let (quiet, talking) = (Arc::new(Heard::new()), Arc::new(Heard::new()));
        let quiet_watch = Watch::with_silence(quiet.clone(), silence);
        let talking_watch = Watch::with_silence(talking.clone(), silence);
        let talk = async {
            loop {
                talking.mark();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        let started = std::time::Instant::now();
        tokio::select! {
            () = quiet_watch.silent() => {}
            () = talking_watch.silent() => panic!("a tunnel heard all along was called silent"),
            () = talk => unreachable!(),
            () = tokio::time::sleep(silence * 4) => panic!("the silent tunnel was never woken"),
        }
        assert!(quiet.silent_for() >= silence);
        assert!(
            started.elapsed() <= silence + SWEEP_EVERY * 2,
            "{:?}",
            started.elapsed()
        );

        // Heard again: not silent until it falls silent again.
        quiet.mark();
        let again = tokio::time::timeout(silence / 2, quiet_watch.silent()).await;
        assert!(again.is_err(), "a tunnel just heard was called silent");

        let key = quiet_watch.key;
        drop(quiet_watch);
        assert!(!watchers().tunnels.lock().unwrap().contains_key(&key));
    }
}
