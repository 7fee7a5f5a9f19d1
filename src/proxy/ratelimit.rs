//! Per-source limit on failed enrollment attempts.
//!
//! Token secrets are 256 bits, so this is not what stops guessing; it keeps a noisy or
//! broken client from burning CPU and log lines. IPv6 sources are grouped by /64, the
//! smallest block one subscriber usually gets. The table is bounded.

use std::collections::HashMap;
use std::net::IpAddr;

use super::accept::source_key;
use std::time::{Duration, Instant};

/// Failed attempts allowed per source in one window.
pub(super) const DEFAULT_MAX_FAILURES: u32 = 10;
/// Length of the window.
pub(super) const DEFAULT_WINDOW: Duration = Duration::from_secs(60);
/// Most sources tracked at once.
pub(super) const MAX_TRACKED: usize = 10_000;

/// Counts failures per source within a fixed window.
#[derive(Debug)]
pub(super) struct FailureLimiter {
    max_failures: u32,
    window: Duration,
    entries: HashMap<IpAddr, (u32, Instant)>,
}

impl FailureLimiter {
    pub(super) fn new(max_failures: u32, window: Duration) -> Self {
        FailureLimiter {
            max_failures,
            window,
            entries: HashMap::new(),
        }
    }

    /// Counts an attempt from `ip` before it is processed, so that concurrent attempts
    /// cannot all slip past the limit; `Err(wait)` if `ip` is blocked for `wait` more. A
    /// successful attempt is given back with [`FailureLimiter::forgive`].
    pub(super) fn begin(&mut self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        self.check(ip, now)?;
        self.record_failure(ip, now);
        Ok(())
    }

    /// Takes back one attempt counted by [`FailureLimiter::begin`] that did not fail.
    pub(super) fn forgive(&mut self, ip: IpAddr) {
        if let Some(entry) = self.entries.get_mut(&source_key(ip)) {
            entry.0 = entry.0.saturating_sub(1);
        }
    }

    /// `Err(wait)` if `ip` is blocked for `wait` more.
    pub(super) fn check(&mut self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        let key = source_key(ip);
        match self.entries.get(&key) {
            Some(&(count, start)) if now < start + self.window => {
                if count >= self.max_failures {
                    Err(start + self.window - now)
                } else {
                    Ok(())
                }
            }
            Some(_) => {
                self.entries.remove(&key);
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Records one failed attempt from `ip`.
    pub(super) fn record_failure(&mut self, ip: IpAddr, now: Instant) {
        let key = source_key(ip);
        if !self.entries.contains_key(&key) && self.entries.len() >= MAX_TRACKED {
            let window = self.window;
            self.entries.retain(|_, (_, start)| now < *start + window);
            if self.entries.len() >= MAX_TRACKED {
                // Still full of live entries: forget the oldest to stay bounded.
                if let Some(oldest) = self
                    .entries
                    .iter()
                    .min_by_key(|(_, (_, s))| *s)
                    .map(|(k, _)| *k)
                {
                    self.entries.remove(&oldest);
                }
            }
        }
        let entry = self.entries.entry(key).or_insert((0, now));
        if now >= entry.1 + self.window {
            *entry = (0, now);
        }
        entry.0 += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_after_max_failures_until_the_window_ends() {
        let mut l = FailureLimiter::new(3, Duration::from_secs(60));
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(l.check(ip, t0).is_ok());
            l.record_failure(ip, t0);
        }
        assert_eq!(
            l.check(ip, t0 + Duration::from_secs(10)),
            Err(Duration::from_secs(50))
        );
        assert!(l.check(other, t0).is_ok(), "other sources are not affected");
        assert!(l.check(ip, t0 + Duration::from_secs(60)).is_ok());
    }

    #[test]
    fn attempts_count_when_they_begin_and_successes_are_forgiven() {
        let mut l = FailureLimiter::new(2, Duration::from_secs(60));
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let t0 = Instant::now();
        assert!(l.begin(ip, t0).is_ok());
        assert!(l.begin(ip, t0).is_ok());
        assert!(l.begin(ip, t0).is_err(), "two in flight fill the budget");
        l.forgive(ip);
        assert!(l.begin(ip, t0).is_ok());
    }

    #[test]
    fn ipv6_groups_by_64_and_table_is_bounded() {
        let mut l = FailureLimiter::new(1, Duration::from_secs(60));
        let t0 = Instant::now();
        l.record_failure("2001:db8::1".parse().unwrap(), t0);
        assert!(l.check("2001:db8::ffff".parse().unwrap(), t0).is_err());
        assert!(l.check("2001:db8:0:1::1".parse().unwrap(), t0).is_ok());
        for i in 0..(MAX_TRACKED as u32 + 10) {
            l.record_failure(IpAddr::V4(i.into()), t0);
        }
        assert!(l.entries.len() <= MAX_TRACKED);
    }
}
