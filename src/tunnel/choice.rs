//! Which transport the agent dials next: what `--transport` says, and with `auto` what
//! worked last. A small state machine with no I/O, so the supervisor that follows it
//! names no transport.

use std::fmt::Display;
use std::time::Duration;

use tracing::{debug, warn};

use super::{Kind, Transport, HANDSHAKE_TIMEOUT};

/// The agent's transport policy and its memory of the last attempts.
#[derive(Debug)]
pub(crate) struct Choice {
    configured: Transport,
    /// With `auto`: how long a QUIC handshake may take before h2 is used instead.
    fallback_after: Duration,
    /// With `auto`: QUIC did not work at the last attempt, so h2 is in use.
    on_fallback: bool,
    /// With `auto`: the fallback was logged and QUIC has not worked since (log it once).
    fallback_logged: bool,
}

impl Choice {
    pub(crate) fn new(configured: Transport, fallback_after: Duration) -> Choice {
        Choice {
            configured,
            fallback_after,
            on_fallback: false,
            fallback_logged: false,
        }
    }

    /// The transport of the next connection attempt.
    pub(crate) fn next(&self) -> Kind {
        match self.configured {
            Transport::H2 => Kind::H2,
            Transport::Quic => Kind::Quic,
            Transport::Auto if self.on_fallback => Kind::H2,
            Transport::Auto => Kind::Quic,
        }
    }

    /// How long a connection attempt on `kind` may take, handshakes included.
    pub(crate) fn connect_limit(&self, kind: Kind) -> Duration {
        match (self.configured, kind) {
            (Transport::Auto, Kind::Quic) => self.fallback_after,
            // Its connection is its handshake: an attempt whose packets were lost starts
            // again rather than waiting out QUIC's idle timeout (27 s) in backed-off
            // retransmissions, as a proxy's restart storm would have it.
            (_, Kind::Quic) => HANDSHAKE_TIMEOUT,
            _ => crate::runtime::CONNECT_TIMEOUT + HANDSHAKE_TIMEOUT,
        }
    }

    /// The better transport to keep trying in the background while a tunnel runs on
    /// `kind`: QUIC, while `auto` is on its h2 fallback.
    pub(crate) fn probe_while_on(&self, kind: Kind) -> Option<Kind> {
        (self.configured == Transport::Auto && kind == Kind::H2).then_some(Kind::Quic)
    }

    /// A background probe connected: the next tunnel uses it.
    pub(crate) fn probe_worked(&mut self) {
        self.on_fallback = false;
        self.fallback_logged = false;
    }

    /// A tunnel on `kind` came up (and has ended since).
    pub(crate) fn was_up(&mut self, kind: Kind) {
        // Auto: a tunnel that was up and failed gets QUIC tried first again.
        self.on_fallback = false;
        if kind == Kind::Quic {
            self.fallback_logged = false;
        }
    }

    /// An attempt on `kind` failed before its tunnel came up. `expected`: the proxy just
    /// stopped or restarts, so the failure is logged at debug. Returns whether to try the
    /// fallback at once, without the usual pause.
    pub(crate) fn failed(&mut self, kind: Kind, error: &dyn Display, expected: bool) -> bool {
        if self.configured != Transport::Auto {
            if expected {
                debug!(%error, "the proxy is not back yet");
            } else {
                warn!(%error, "tunnel failed");
            }
            return false;
        }
        if kind == Kind::Quic {
            if self.fallback_logged || expected {
                debug!(%error, "QUIC still unavailable; using h2");
            } else {
                warn!(%error, "QUIC unavailable; falling back to h2 and trying QUIC again in the background");
                self.fallback_logged = true;
            }
            self.on_fallback = true;
            return true;
        }
        // h2 did not come up either: next time, QUIC first again.
        if expected {
            debug!(%error, "the proxy is not back yet");
        } else {
            warn!(%error, "tunnel failed");
        }
        self.on_fallback = false;
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_transports_never_change() {
        for (configured, kind) in [(Transport::H2, Kind::H2), (Transport::Quic, Kind::Quic)] {
            let mut c = Choice::new(configured, Duration::from_secs(3));
            assert!(!c.failed(kind, &"refused", false));
            assert_eq!(c.next(), kind);
            assert_eq!(c.probe_while_on(kind), None);
        }
        // A QUIC attempt is its handshake, bounded as one; h2's has a TCP connect first.
        let quic = Choice::new(Transport::Quic, Duration::from_secs(3));
        assert_eq!(quic.connect_limit(Kind::Quic), HANDSHAKE_TIMEOUT);
        let h2 = Choice::new(Transport::H2, Duration::from_secs(3));
        assert!(h2.connect_limit(Kind::H2) > HANDSHAKE_TIMEOUT);
    }

    #[test]
    fn auto_falls_back_to_h2_probes_quic_and_returns() {
        let mut c = Choice::new(Transport::Auto, Duration::from_secs(3));
        assert_eq!(c.next(), Kind::Quic);
        assert_eq!(c.connect_limit(Kind::Quic), Duration::from_secs(3));
        assert!(
            c.failed(Kind::Quic, &"timed out", false),
            "falls back at once"
        );
        assert_eq!(c.next(), Kind::H2);
        assert_eq!(c.probe_while_on(Kind::H2), Some(Kind::Quic));
        c.probe_worked();
        assert_eq!(c.next(), Kind::Quic);
        // QUIC fails, then h2 fails too: QUIC first again, after a pause.
        assert!(c.failed(Kind::Quic, &"timed out", false));
        assert!(!c.failed(Kind::H2, &"refused", false));
        assert_eq!(c.next(), Kind::Quic);
        // A tunnel that was up on the fallback and then failed: QUIC first again.
        assert!(c.failed(Kind::Quic, &"timed out", false));
        c.was_up(Kind::H2);
        assert_eq!(c.next(), Kind::Quic);
    }
}
