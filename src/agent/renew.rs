//! Certificate renewal: the agent trades its current certificate (presented in an mTLS
//! handshake on the agent port) and a CSR for a fresh key for a new certificate, at about
//! two thirds of the lifetime, long before anything can expire.
//!
//! The schedule is computed from the certificate and the wall clock, and the wall clock is
//! re-read at every check, so a machine that slept past the renewal time renews as soon as
//! it wakes instead of trusting a monotonic timer that stood still.

use std::hash::{BuildHasher, Hasher};
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use rcgen::{CertificateParams, DistinguishedName, KeyPair};

use super::enroll::{check_reply, parse_answer, post, EnrollClientError};
use super::identity::{Identity, IdentityError};
use crate::enroll_wire::{RenewBody, RENEW_PATH};
use crate::tls;

/// Seconds since the Unix epoch, as the agent's clock sees it.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> i64;
}

/// The system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> i64 {
        time::OffsetDateTime::now_utc().unix_timestamp()
    }
}

/// When to renew a certificate valid from `not_before` to `not_after`: at 2/3 of its
/// lifetime, moved by up to ±3% of it at random so that a fleet does not renew in step.
pub fn renewal_time(not_before: i64, not_after: i64, random: u64) -> i64 {
    let lifetime = (not_after - not_before).max(1);
    let jitter_span = lifetime * 6 / 100; // the full ±3% range
    let jitter = if jitter_span > 0 {
        (random % (jitter_span as u64 + 1)) as i64 - jitter_span / 2
    } else {
        0
    };
    not_before + lifetime * 2 / 3 + jitter
}

/// When failing renewals turn from warnings into errors: 90% of the lifetime.
pub fn urgent_time(not_before: i64, not_after: i64) -> i64 {
    not_before + (not_after - not_before) * 9 / 10
}

/// A random number for jitter.
pub(crate) fn random() -> u64 {
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

/// The validity period of the identity's certificate.
pub fn validity(identity: &Identity) -> Option<(i64, i64)> {
    revproxy_ca::validity(&identity.cert_pem)
}

/// The message for an agent whose certificate is past saving.
pub fn reenroll_hint(identity: &Identity, state_dir: &Path, why: &str, clock_now: i64) -> String {
    let hosts: String = identity
        .hosts
        .iter()
        .map(|h| format!(" --host {h}"))
        .collect();
    format!(
        "{why} (certificate of {} valid until {}, this machine's clock says {}). It cannot be renewed: \
         on the proxy run `revproxy token create --name {}{hosts}`, then here \
         `revproxy-agent enroll --state {} --token TOKEN` (the agent keeps its identity)",
        identity.identity,
        crate::logging::rfc3339(identity.not_after),
        crate::logging::rfc3339(clock_now),
        identity.agent,
        state_dir.display(),
    )
}

/// One renewal: a fresh key, a CSR, `POST /v1/renew` over mTLS with the current
/// certificate; the new identity is saved crash-safe in `state_dir` before it is returned.
pub async fn renew_once(
    identity: &Identity,
    state_dir: &Path,
) -> Result<Identity, EnrollClientError> {
    let pin = identity.ca_pin().ok_or_else(|| {
        EnrollClientError::Identity(IdentityError::Corrupt {
            path: state_dir.join(super::CA_CERT_FILE),
            reason: "not a PEM certificate".into(),
        })
    })?;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let csr = params.serialize_request(&key)?.pem()?;
    let body = Bytes::from(serde_json::to_vec(&RenewBody { csr }).expect("request serializes"));
    let config = tls::agent_client_config(
        vec![pin],
        &identity.cert_pem,
        &identity.key_pem,
        &[tls::ALPN_HTTP1],
    )?;
    let (status, reply) =
        post(&identity.server, &pin.to_string(), config, RENEW_PATH, body).await?;
    let reply = parse_answer(status, &reply)?;
    let renewed = check_reply(&[pin], &identity.server, &key, reply)?;
    renewed.save(state_dir)?;
    Ok(renewed)
}

/// Backoff between failed renewal attempts: 1 s doubling up to 5 minutes.
pub fn retry_delay(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.min(8)).min(Duration::from_secs(300))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renews_at_two_thirds_with_bounded_jitter() {
        let (nb, na) = (1_000_000, 1_000_000 + 86_400);
        for r in [0, 1, 77, u64::MAX] {
            let t = renewal_time(nb, na, r);
            let ideal = nb + 57_600;
            assert!((t - ideal).abs() <= 86_400 * 3 / 100 + 1, "{t} vs {ideal}");
        }
        assert_eq!(urgent_time(0, 100), 90);
        assert!(renewal_time(0, 100, 5) < urgent_time(0, 100));
    }

    #[test]
    fn retry_delays_are_capped() {
        assert_eq!(retry_delay(0), Duration::from_secs(1));
        assert_eq!(retry_delay(3), Duration::from_secs(8));
        assert_eq!(retry_delay(30), Duration::from_secs(256));
    }
}
