//! A proxy that refuses this agent's certificate itself (revoked, or signed by a CA it
//! does not trust): knocking again soon cannot help, only a new enrollment can. The
//! supervisor backs off to its longest delay and says so once, with the commands.
//!
//! The refusal arrives as a TLS alert: on h2 when the HTTP/2 handshake reads it (TLS 1.3
//! lets the client finish first), on QUIC as the connection closed with a crypto error
//! (`error 44` is certificate_revoked). The tunnel layer carries both as text, so they
//! are recognized by the markers below.

use std::path::Path;
use std::sync::Mutex;

use super::identity::Identity;

/// Why the proxy refused the certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Refusal {
    /// Revoked by the operator (`revproxy agent revoke`, `cert revoke`).
    Revoked,
    /// Not issued by a CA the proxy trusts (its CA was made anew, or this identity comes
    /// from another proxy).
    Unknown,
}

/// TLS alerts as the h2 path (rustls' alert names) and the QUIC path (the alert's number
/// in a crypto error) print them.
const MARKERS: &[(&str, Refusal)] = &[
    ("received fatal alert: CertificateRevoked", Refusal::Revoked),
    ("handshake failed: error 44:", Refusal::Revoked),
    ("received fatal alert: UnknownCA", Refusal::Unknown),
    ("received fatal alert: BadCertificate", Refusal::Unknown),
    ("received fatal alert: CertificateUnknown", Refusal::Unknown),
    ("handshake failed: error 48:", Refusal::Unknown),
    ("handshake failed: error 42:", Refusal::Unknown),
    ("handshake failed: error 46:", Refusal::Unknown),
];

/// Whether `error` (a failed tunnel's, as printed) is the proxy refusing our certificate.
pub(super) fn refusal(error: &str) -> Option<Refusal> {
    MARKERS
        .iter()
        .find(|(marker, _)| error.contains(marker))
        .map(|(_, why)| *why)
}

/// What the agent has said about refusals: the serial it last gave the advice for, so
/// that every supervisor (one per proxy) together says it once per certificate.
#[derive(Default)]
pub(super) struct Told(Mutex<Option<String>>);

impl Told {
    /// Whether the advice for certificate `serial` is still to be given (and marks it
    /// given).
    pub(super) fn first_for(&self, serial: &str) -> bool {
        let mut told = self.0.lock().expect("told lock");
        if told.as_deref() == Some(serial) {
            return false;
        }
        *told = Some(serial.to_string());
        true
    }

    /// A tunnel came up: a later refusal is news again.
    pub(super) fn forget(&self) {
        *self.0.lock().expect("told lock") = None;
    }
}

/// The one plain sentence for a refused certificate, with the commands that fix it.
pub(super) fn advice(why: Refusal, identity: &Identity, state_dir: &Path) -> String {
    let what = match why {
        Refusal::Revoked => "the proxy refused this agent's certificate: it was revoked",
        Refusal::Unknown => {
            "the proxy refused this agent's certificate: it does not know it (its CA was made anew, or this identity is another proxy's)"
        }
    };
    format!(
        "{what}; this agent cannot connect until it is enrolled again: {} (the running agent moves to the new identity by itself). It keeps trying, less and less often",
        super::renew::reenroll_commands(identity, state_dir),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_alerts_both_transports_report_are_recognized() {
        assert_eq!(
            refusal("HTTP/2 handshake failed: received fatal alert: CertificateRevoked"),
            Some(Refusal::Revoked)
        );
        assert_eq!(
            refusal("tunnel error: aborted by peer: the cryptographic handshake failed: error 44: invalid peer certificate: Revoked"),
            Some(Refusal::Revoked)
        );
        assert_eq!(
            refusal("TLS handshake failed: received fatal alert: UnknownCA"),
            Some(Refusal::Unknown)
        );
        assert_eq!(
            refusal("cannot connect: Connection refused (os error 111)"),
            None
        );
        assert_eq!(refusal("tunnel error: timed out"), None);
    }

    #[test]
    fn the_advice_is_given_once_per_certificate() {
        let told = Told::default();
        assert!(told.first_for("01"));
        assert!(!told.first_for("01"));
        assert!(told.first_for("02"));
        told.forget();
        assert!(told.first_for("02"));
    }
}
