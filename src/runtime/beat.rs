//! Keep-alives on a shared beat. An idle tunnel costs its proxy little for the keep-alive
//! itself (a TLS record read and one written) and much for the thread that wakes to handle
//! it: on a virtual machine a sleep and a wake-up cost tens of microseconds. Keep-alives
//! sent at random moments wake the proxy once each; sent on a beat all agents keep (the
//! wall clock's multiples of the interval, which synchronised clocks share), they reach
//! the proxy together and one wake-up handles many.
//!
//! Each keep-alive is placed at a random point of a short [`SPREAD`] after the beat, so a
//! proxy's agents do not arrive within the same millisecond: its lanes stay free for
//! clients' traffic between them. An agent whose clock is off keeps the same interval,
//! off the beat, and costs what it did before.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Keep-alives of one beat are spread over this much after it.
pub(crate) const SPREAD: Duration = Duration::from_millis(250);

/// The shortest wait to a keep-alive: a beat closer than this is skipped.
const MIN_WAIT: Duration = Duration::from_secs(1);

/// A keep-alive's place on the beat: its offset after each beat.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Beat {
    every: Duration,
    offset: Duration,
}

impl Beat {
    /// A beat every `every`, at a random point of [`SPREAD`] after it.
    pub(crate) fn new(every: Duration) -> Beat {
        let spread = u64::try_from(SPREAD.as_micros()).unwrap_or(u64::MAX);
        let offset = Duration::from_micros(super::random() % spread.max(1));
        Beat { every, offset }
    }

    /// How long from `now` (wall clock) to this keep-alive's next moment at least
    /// [`MIN_WAIT`] away: at most `every + MIN_WAIT`.
    fn wait_from(&self, now: SystemTime) -> Duration {
        let every = self.every.as_nanos().max(1);
        let since_epoch = now
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let into = (since_epoch + every - self.offset.as_nanos() % every) % every;
        let mut wait = every - into;
        if wait < MIN_WAIT.as_nanos() {
            wait += every;
        }
        Duration::from_nanos(u64::try_from(wait).unwrap_or(u64::MAX))
    }

    /// How long to wait for this keep-alive's next moment.
    pub(crate) fn wait(&self) -> Duration {
        self.wait_from(SystemTime::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_alives_fall_on_the_beat_after_their_offset_never_sooner_than_a_second() {
        let every = Duration::from_secs(15);
        let beat = Beat {
            every,
            offset: Duration::from_millis(100),
        };
        let at = |secs: u64, millis: u64| {
            UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(millis)
        };
        // Just after a beat's keep-alive: the next beat's.
        assert_eq!(beat.wait_from(at(1_500_000_000, 100)), every);
        assert_eq!(
            beat.wait_from(at(1_500_000_000, 101)),
            every - Duration::from_millis(1)
        );
        // Mid-way: the next beat.
        assert_eq!(
            beat.wait_from(at(1_500_000_007, 600)),
            Duration::from_millis(7_500)
        );
        // Under a second before it: the one after.
        assert_eq!(
            beat.wait_from(at(1_500_000_014, 500)),
            Duration::from_millis(15_600)
        );
        // Every wait lands on the beat plus the offset.
        for millis in (0..40_000).step_by(333) {
            let now = at(1_700_000_000, millis);
            let wait = beat.wait_from(now);
            assert!(wait >= MIN_WAIT && wait <= every + MIN_WAIT, "{wait:?}");
            let lands = (now + wait).duration_since(UNIX_EPOCH).unwrap();
            assert_eq!(lands.as_millis() % 15_000, 100, "{millis}");
        }
        // A clock before 1970 still gives a bounded wait.
        assert!(beat.wait_from(UNIX_EPOCH - Duration::from_secs(5)) <= every + MIN_WAIT);
    }

    #[test]
    fn offsets_are_spread_within_the_spread() {
        let offsets: std::collections::HashSet<_> = (0..64)
            .map(|_| Beat::new(Duration::from_secs(15)).offset)
            .collect();
        assert!(offsets.len() > 32, "{offsets:?}");
        assert!(offsets.iter().all(|o| *o < SPREAD));
    }
}
