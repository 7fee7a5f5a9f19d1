//! The one backoff: capped exponential delays with jitter, for everything that retries
//! (the agent's reconnects, its renewal attempts).

use std::time::Duration;

use super::random;

/// Capped exponential backoff with jitter: each delay is drawn from [d/2, d], and d doubles
/// from `min` up to `max`. The jitter keeps a fleet that lost its proxy at the same moment
/// from coming back in step.
#[derive(Debug)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            next: min,
        }
    }

    /// Starts over from the shortest delay (after a success).
    pub(crate) fn reset(&mut self) {
        self.next = self.min;
    }

    /// The delay before the next attempt.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (d * 2).min(self.max);
        d / 2 + d.mul_f64((random() % 1000) as f64 / 2000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_with_jitter() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(30));
        let mut b = Backoff::new(min, max);
        let first = b.next_delay();
        assert!(first >= min / 2 && first <= min);
        let mut last = first;
        for _ in 0..20 {
            last = b.next_delay();
        }
        assert!(last >= max / 2 && last <= max);
        b.reset();
        assert!(b.next_delay() <= min);
    }
}
