//! The proxy's watch over its h2 tunnels' silence: one thread looks at every tunnel's
//! last word ([`Heard`]) every [`SWEEP_EVERY`] and wakes only a tunnel silent for
//! [`SILENCE`], which then PINGs its agent (`super::watch_silence`).
//!
//! A timer per tunnel woke the tunnel's lane at every agent PING's anniversary, only to
//! find it had heard the agent meanwhile and sleep again: as many wake-ups as PINGs, each
//! costing a thread's sleep and wake (tens of microseconds here), which was half of what
//! an idle tunnel cost the proxy. A look at an atomic per tunnel a second costs
//! nanoseconds, and a healthy tunnel's lane now wakes only for its agent's PING.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::Notify;

use super::read_ahead::Heard;
use super::SILENCE;

/// How often the silence of every tunnel is looked at: a silent tunnel PINGs within this
/// much of [`SILENCE`].
pub(crate) const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// A tunnel being watched.
struct Watched {
    heard: Arc<Heard>,
    /// How long a silence counts ([`SILENCE`]).
    silence: Duration,
    /// Notified (a permit kept) while the tunnel is silent.
    alarm: Notify,
}

#[derive(Default)]
struct Watchers {
    tunnels: Mutex<HashMap<u64, Arc<Watched>>>,
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
        let tunnels = self.tunnels.lock().expect("silence lock");
        for watched in tunnels.values() {
            if watched.heard.silent_for() >= watched.silence {
                watched.alarm.notify_one();
            }
        }
    }
}

/// A tunnel's place among the watched: [`Self::silent`] completes once it has been
/// silent for [`SILENCE`]. Dropping it stops the watch.
pub(crate) struct Watch {
    key: u64,
    watched: Arc<Watched>,
}

impl Watch {
    /// Watches the tunnel whose last word `heard` records.
    pub(crate) fn new(heard: Arc<Heard>) -> Watch {
        Watch::with_silence(heard, SILENCE)
    }

    fn with_silence(heard: Arc<Heard>, silence: Duration) -> Watch {
        let all = watchers();
        let key = all.next.fetch_add(1, Ordering::Relaxed);
        let watched = Arc::new(Watched {
            heard,
            silence,
            alarm: Notify::new(),
        });
        (all.tunnels.lock().expect("silence lock")).insert(key, watched.clone());
        Watch { key, watched }
    }

    /// Completes when the tunnel has been silent for [`SILENCE`] (at most [`SWEEP_EVERY`]
    /// later).
    pub(crate) async fn silent(&self) {
        loop {
            self.watched.alarm.notified().await;
            // A permit from before the tunnel was heard again is stale.
            if self.watched.heard.silent_for() >= self.watched.silence {
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

    #[tokio::test]
    async fn only_a_silent_tunnel_is_woken_and_a_dropped_watch_is_forgotten() {
        let silence = Duration::from_millis(1500);
        let (quiet, talking) = (Arc::new(Heard::default()), Arc::new(Heard::default()));
        quiet.mark();
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
