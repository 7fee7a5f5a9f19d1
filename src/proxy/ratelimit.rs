//! Limits on attempts per key within a fixed window: failed enrollments per source
//! address, renewal requests per certificate.
//!
//! Token secrets are 256 bits, so the enrollment limit is not what stops guessing; it keeps
//! a noisy or broken client from burning CPU and log lines. Sources are keyed with
//! [`super::accept::source_key`] (IPv6 by /64, the smallest block one subscriber usually
//! gets). The table is bounded.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// Failed enrollment attempts allowed per source in one window.
pub(super) const DEFAULT_MAX_FAILURES: u32 = 10;
/// Length of the enrollment window.
pub(super) const DEFAULT_WINDOW: Duration = Duration::from_secs(60);
/// Renewal requests allowed per certificate in one window. An agent needs one (and one
/// retry if its clock runs ahead or an answer is lost).
pub(super) const RENEWALS_PER_WINDOW: u32 = 10;
/// Length of the renewal window: short next to the third of a one-hour certificate's
/// lifetime that is left when its agent starts renewing.
pub(super) const RENEWAL_WINDOW: Duration = Duration::from_secs(5 * 60);
/// Wrong secrets per token id in one window before the proxy says someone is trying
/// secrets for it (from any number of addresses; the per-source limit does not see that).
pub(super) const WRONG_SECRETS_PER_TOKEN: u32 = 10;
/// Length of that window.
pub(super) const WRONG_SECRET_WINDOW: Duration = Duration::from_secs(60);
/// Most keys tracked at once.
pub(super) const MAX_TRACKED: usize = 10_000;

/// Counts attempts per key within a fixed window.
#[derive(Debug)]
pub(super) struct AttemptLimiter<K> {
    max_attempts: u32,
    window: Duration,
    entries: HashMap<K, (u32, Instant)>,
}

impl<K: Hash + Eq + Clone> AttemptLimiter<K> {
    pub(super) fn new(max_attempts: u32, window: Duration) -> Self {
        AttemptLimiter {
            max_attempts,
            window,
            entries: HashMap::new(),
        }
    }

    /// Counts an attempt for `key` before it is processed, so that concurrent attempts
    /// cannot all slip past the limit; `Err(wait)` if `key` is blocked for `wait` more. An
    /// attempt that should not count is given back with [`AttemptLimiter::forgive`].
    pub(super) fn begin(&mut self, key: &K, now: Instant) -> Result<(), Duration> {
        self.check(key, now)?;
        self.record(key, now);
        Ok(())
    }

    /// Takes back one attempt counted by [`AttemptLimiter::begin`].
    pub(super) fn forgive(&mut self, key: &K) {
        if let Some(entry) = self.entries.get_mut(key) {
            entry.0 = entry.0.saturating_sub(1);
        }
    }

    /// `Err(wait)` if `key` is blocked for `wait` more.
    pub(super) fn check(&mut self, key: &K, now: Instant) -> Result<(), Duration> {
        match self.entries.get(key) {
            Some(&(count, start)) if now < start + self.window => {
                if count >= self.max_attempts {
                    Err(start + self.window - now)
                } else {
                    Ok(())
                }
            }
            Some(_) => {
                self.entries.remove(key);
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Records one attempt for `key`.
    pub(super) fn record(&mut self, key: &K, now: Instant) {
        if !self.entries.contains_key(key) && self.entries.len() >= MAX_TRACKED {
            let window = self.window;
            self.entries.retain(|_, (_, start)| now < *start + window);
            if self.entries.len() >= MAX_TRACKED {
                // Still full of live entries: forget the oldest to stay bounded.
                if let Some(oldest) = self
                    .entries
                    .iter()
                    .min_by_key(|(_, (_, s))| *s)
                    .map(|(k, _)| k.clone())
                {
                    self.entries.remove(&oldest);
                }
            }
        }
        let entry = self.entries.entry(key.clone()).or_insert((0, now));
        if now >= entry.1 + self.window {
            *entry = (0, now);
        }
        entry.0 += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::accept::source_key;
    use std::net::IpAddr;

    fn ip(s: &str) -> IpAddr {
        source_key(s.parse().unwrap())
    }

    #[test]
    fn blocks_after_max_attempts_until_the_window_ends() {
        let mut l = AttemptLimiter::new(3, Duration::from_secs(60));
        let (one, other) = (ip("192.0.2.1"), ip("192.0.2.2"));
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(l.check(&one, t0).is_ok());
            l.record(&one, t0);
        }
        assert_eq!(
            l.check(&one, t0 + Duration::from_secs(10)),
            Err(Duration::from_secs(50))
        );
        assert!(
            l.check(&other, t0).is_ok(),
            "other sources are not affected"
        );
        assert!(l.check(&one, t0 + Duration::from_secs(60)).is_ok());
    }

    #[test]
    fn attempts_count_when_they_begin_and_can_be_given_back() {
        let mut l = AttemptLimiter::new(2, Duration::from_secs(60));
        let one = ip("192.0.2.1");
        let t0 = Instant::now();
        assert!(l.begin(&one, t0).is_ok());
        assert!(l.begin(&one, t0).is_ok());
        assert!(l.begin(&one, t0).is_err(), "two in flight fill the budget");
        l.forgive(&one);
        assert!(l.begin(&one, t0).is_ok());
    }

    #[test]
    fn ipv6_groups_by_64_and_table_is_bounded() {
        let mut l = AttemptLimiter::new(1, Duration::from_secs(60));
        let t0 = Instant::now();
        l.record(&ip("2001:db8::1"), t0);
        assert!(l.check(&ip("2001:db8::ffff"), t0).is_err());
        assert!(l.check(&ip("2001:db8:0:1::1"), t0).is_ok());
        for i in 0..(MAX_TRACKED as u32 + 10) {
            l.record(&IpAddr::V4(i.into()), t0);
        }
        assert!(l.entries.len() <= MAX_TRACKED);
    }
}
