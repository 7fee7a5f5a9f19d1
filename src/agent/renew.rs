//! Certificate renewal: the agent's renewal loop (one of the two halves of
//! [`super::Agent::run`]) and one renewal exchange. The agent trades its current certificate (presented in an mTLS
//! handshake on the agent port) and a CSR for a fresh key for a new certificate, at about
//! two thirds of the lifetime, long before anything can expire.
//!
//! The schedule is computed from the certificate and the wall clock, and the wall clock is
//! re-read at every check, so a machine that slept past the renewal time renews as soon as
//! it wakes instead of trusting a monotonic timer that stood still.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rcgen::{CertificateParams, DistinguishedName};

use tracing::{error, info, warn};

use super::enroll::{
    check_reply, parse_answer, post, EnrollClientError, Pending, RENEW_PENDING_FILE,
};
use super::identity::{Identity, IdentityError};
use super::AgentError;
use crate::runtime::backoff::Backoff;
use crate::runtime::random;
use crate::runtime::rfc3339;
use crate::tls;
use crate::wire::enroll::{RenewBody, RENEW_PATH};

/// First pause after a failed renewal attempt; it doubles up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_secs(1);
/// Longest pause between renewal attempts.
const RETRY_MAX: Duration = Duration::from_secs(300);
/// Pause before asking again after the proxy said another key already renewed this
/// certificate.
const ALREADY_RENEWED_RETRY: Duration = Duration::from_secs(3600);

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
pub(super) fn renewal_time(not_before: i64, not_after: i64, random: u64) -> i64 {
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
pub(super) fn urgent_time(not_before: i64, not_after: i64) -> i64 {
    not_before + (not_after - not_before) * 9 / 10
}

/// The validity period of the identity's certificate.
pub(super) fn validity(identity: &Identity) -> Option<(i64, i64)> {
    revproxy_ca::validity(&identity.cert_pem)
}

/// The message for an agent whose certificate is past saving.
pub(super) fn reenroll_hint(
    identity: &Identity,
    state_dir: &Path,
    why: &str,
    clock_now: i64,
) -> String {
    format!(
        "{why} (certificate of {} valid until {}, this machine's clock says {}). It cannot be renewed: \
         {} (the agent keeps its identity)",
        identity.identity,
        rfc3339(identity.not_after),
        rfc3339(clock_now),
        reenroll_commands(identity, state_dir),
    )
}

/// How an operator enrolls this agent again, names and all.
pub(super) fn reenroll_commands(identity: &Identity, state_dir: &Path) -> String {
    let hosts: String = (identity.hosts.iter())
        .map(|h| match identity.private.contains(h) {
            true => format!(" --private-host {h}"),
            false => format!(" --host {h}"),
        })
        .collect();
    format!(
        "on the proxy run `revproxy token create --name {}{hosts}`, then here \
         `revproxy-agent enroll --state {} --token TOKEN`",
        identity.agent,
        state_dir.display(),
    )
}

/// Renews at about 2/3 of each certificate's lifetime, forever; returns only when it
/// cannot go on. A new identity published meanwhile (one enrolled into the state
/// directory, `follow.rs`) starts its own schedule; the old one is dropped.
pub(super) async fn renewal_loop(
    identity: &tokio::sync::watch::Sender<Arc<Identity>>,
    state_dir: &Path,
    clock: &dyn Clock,
    renew_check: Duration,
) -> AgentError {
    let mut seen = identity.subscribe();
    'identity: loop {
        let id = seen.borrow_and_update().clone();
        let Some((not_before, not_after)) = validity(&id) else {
            return AgentError::Expired("agent.crt is unreadable; enroll again".into());
        };
        let renew_at = renewal_time(not_before, not_after, random());
        tokio::select! {
            () = wait_until(clock, renew_at, renew_check) => {}
            Ok(()) = seen.changed() => continue 'identity,
        }
        let mut failures = 0;
        let mut backoff = Backoff::new(RETRY_MIN, RETRY_MAX);
        let mut last_error_log: Option<i64> = None;
        loop {
            // Whatever this one's fate, a new identity has arrived.
            if seen.has_changed().unwrap_or(false) {
                continue 'identity;
            }
            let now = clock.now();
            if now >= not_after {
                return AgentError::Expired(reenroll_hint(
                    &id,
                    state_dir,
                    "this agent's certificate expired before it could be renewed",
                    now,
                ));
            }
            let pause = match renew_once(&id, state_dir).await {
                Ok(new) => {
                    info!(
                        valid_until = %rfc3339(new.not_after),
                        "certificate renewed; new tunnels use it"
                    );
                    identity.send_if_modified(|current| {
                        // The state directory's follower may have published it already.
                        let fresh = current.cert_pem != new.cert_pem;
                        if fresh {
                            *current = Arc::new(new);
                        }
                        fresh
                    });
                    continue 'identity;
                }
                Err(_) if seen.has_changed().unwrap_or(false) => continue 'identity,
                Err(e) if e.needs_reenrollment() => {
                    return AgentError::Expired(reenroll_hint(
                        &id,
                        state_dir,
                        &format!("the proxy refused to renew this agent's certificate: {e}"),
                        now,
                    ));
                }
                Err(e) if e.code() == Some("already_renewed") => {
                    // Another key got this certificate's successor: a copy of this
                    // identity runs elsewhere, or this directory was restored from a
                    // backup. Keep serving with the certificate we have until it expires,
                    // and say so loudly every hour.
                    error!(
                        error = %e,
                        valid_until = %rfc3339(not_after),
                        "certificate renewal refused; this agent stops when its certificate expires"
                    );
                    let next = now.saturating_add(ALREADY_RENEWED_RETRY.as_secs() as i64);
                    Pause::Until(next.min(not_after))
                }
                Err(e) if e.retry_after().is_some() => {
                    // Not due yet by the proxy's clock, or asked too often: wait as told.
                    let wait = e.retry_after().unwrap_or(RETRY_MIN).max(RETRY_MIN);
                    warn!(error = %e, retry_in = %crate::runtime::logging::duration(wait), "the proxy asks to renew later");
                    let next = now.saturating_add(wait.as_secs().min(i64::MAX as u64) as i64);
                    Pause::Until(next.min(not_after))
                }
                Err(e) => {
                    failures += 1;
                    if now >= urgent_time(not_before, not_after) {
                        // Past 90% of the lifetime: loud, but at most once an hour.
                        if last_error_log.is_none_or(|t| now - t >= 3600) {
                            error!(
                                error = %e,
                                valid_until = %rfc3339(not_after),
                                "certificate renewal keeps failing and the certificate expires soon"
                            );
                            last_error_log = Some(now);
                        }
                    } else {
                        warn!(error = %e, attempt = failures, "certificate renewal failed; retrying");
                    }
                    Pause::For(backoff.next_delay())
                }
            };
            let wait = async {
                match pause {
                    Pause::Until(at) => wait_until(clock, at, renew_check).await,
                    Pause::For(delay) => tokio::time::sleep(delay).await,
                }
            };
            tokio::select! {
                () = wait => {}
                Ok(()) = seen.changed() => continue 'identity,
            }
        }
    }
}

/// How long the renewal loop waits before its next attempt.
enum Pause {
    /// Until the wall clock reads this (Unix seconds).
    Until(i64),
    For(Duration),
}

/// Waits until the wall clock reads `at`, looking at it at least every `step`: a machine
/// that was suspended, or a VM that was paused, goes on as soon as it wakes instead of
/// trusting a monotonic timer that stood still.
async fn wait_until(clock: &dyn Clock, at: i64, step: Duration) {
    loop {
        let now = clock.now();
        if now >= at {
            return;
        }
        tokio::time::sleep(Duration::from_secs((at - now) as u64).min(step)).await;
    }
}

/// One renewal: a fresh key, a CSR, `POST /v1/renew` over mTLS with the current
/// certificate; the new identity is saved crash-safe in `state_dir` before it is returned.
///
/// The key is saved (0600) before the request is sent and reused by every attempt for
/// the same certificate, after a restart too: the proxy renews each certificate once, and
/// answers a retry with the same key with the same certificate, so an answer lost on the
/// way costs nothing.
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
    let serial = identity.serial().ok_or_else(|| {
        EnrollClientError::Identity(IdentityError::Corrupt {
            path: state_dir.join(super::AGENT_CERT_FILE),
            reason: "not a PEM certificate".into(),
        })
    })?;
    let pending = Pending::new(state_dir, RENEW_PENDING_FILE);
    let key = pending.key_for(&serial)?;
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
    let renewed = parse_answer(status, &reply)
        .and_then(|reply| check_reply(&[pin], &identity.server, &key, reply))
        .inspect_err(|e| {
            if e.needs_reenrollment() {
                pending.clear();
            }
        })?;
    // Enrolled again while this exchange ran: the new identity stays (the running agent
    // takes it up), the old one's successor is not stored over it.
    let cert_path = state_dir.join(super::AGENT_CERT_FILE);
    if std::fs::read_to_string(&cert_path).is_ok_and(|pem| pem != identity.cert_pem) {
        return Err(IdentityError::Replaced(cert_path).into());
    }
    renewed.save(state_dir)?;
    pending.clear();
    Ok(renewed)
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
}
