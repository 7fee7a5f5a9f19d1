//! Certificates from ACME for the terminated names (DESIGN.md section 10). A proxy with
//! `[acme]` orders the certificate of each ACME-sourced name that some agent serves: when
//! it has none, at two thirds of its lifetime, or earlier when the CA's renewal
//! information (ARI) says so. One proxy at a time per name (a lease in the store); the
//! challenge's answer goes in the store, so whichever proxy the CA reaches answers it
//! (`answer.rs`, on every proxy, `[acme]` or not). After a failure no proxy orders the
//! name again before a backoff that keeps within the CA's limits (Let's Encrypt: 5
//! failed validations per name and hour).

mod answer;
mod client;
mod order;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use instant_acme::{Account, AccountCredentials, CertificateIdentifier, ExternalAccountKey};
use revproxy_ca::state::{TlsRecord, TlsSource, Unix};
use revproxy_ca::{acme_account_purpose, Ca};
use serde::Deserialize;
use tracing::{info, warn};

use crate::runtime::backoff::Backoff;

pub(crate) use answer::{answer_tls_alpn01, Answer, ChallengeCerts};

/// How often a proxy looks for names due an order.
const CHECK: Duration = Duration::from_secs(5);
/// How long a proxy's hold on ordering a name lasts: past [`ORDER_TIMEOUT`], so that an
/// order never outlives its lease; a proxy that died holding one delays the name by this.
const LEASE: Duration = Duration::from_secs(600);
/// Longest one order may take.
const ORDER_TIMEOUT: Duration = Duration::from_secs(300);
/// Backoff after the first failure, growing fourfold per failure up to [`MAX_RETRY`]
/// (each delay drawn from its upper half): at most 4 tries in the first hour.
const FIRST_RETRY: Duration = Duration::from_secs(120);
const MAX_RETRY: Duration = Duration::from_secs(6 * 3600);
/// How often the CA's renewal information is asked again for one certificate.
const ARI_CHECK: Duration = Duration::from_secs(6 * 3600);
/// Longest wait before trying an ACME server that could not be reached again.
const MAX_ACCOUNT_RETRY: Duration = Duration::from_secs(600);

/// The challenge type the CA is asked to validate with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum ChallengeKind {
    #[serde(rename = "tls-alpn-01")]
    TlsAlpn01,
    #[serde(rename = "http-01")]
    Http01,
}

impl ChallengeKind {
    pub fn name(&self) -> &'static str {
        match self {
            ChallengeKind::TlsAlpn01 => "tls-alpn-01",
            ChallengeKind::Http01 => "http-01",
        }
    }
}

/// `[acme]`, checked (`crate::config`).
#[derive(Clone)]
pub struct AcmeSettings {
    pub directory: String,
    /// `mailto:` URLs.
    pub contact: Vec<String>,
    /// Trusted for the ACME server's HTTPS; `None`: the system's roots.
    pub roots: Option<rustls::RootCertStore>,
    /// External account binding: key id and HMAC key.
    pub eab: Option<(String, Vec<u8>)>,
    pub challenge: ChallengeKind,
}

impl std::fmt::Debug for AcmeSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the EAB key.
        f.debug_struct("AcmeSettings")
            .field("directory", &self.directory)
            .field("challenge", &self.challenge)
            .finish_non_exhaustive()
    }
}

/// What the ordering task needs from the proxy.
pub(crate) struct Orders {
    pub(crate) ca: Arc<Ca>,
    pub(crate) me: String,
    pub(crate) settings: AcmeSettings,
    /// The terminated names as this proxy sees them now.
    pub(crate) records: Box<dyn Fn() -> Vec<Arc<TlsRecord>> + Send + Sync>,
    /// Whether some agent is granted a name for public serving now.
    pub(crate) served: Box<dyn Fn(&str) -> bool + Send + Sync>,
    /// Counts an order's result (`valid`, `invalid`, `error`).
    pub(crate) counted: Box<dyn Fn(&'static str) + Send + Sync>,
}

/// Orders the certificates due, until dropped.
pub(crate) async fn order_certificates(orders: Orders) {
    let mut tick = tokio::time::interval(CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut account: Option<Account> = None;
    // After the CA could not be reached: not before then.
    let mut unreachable = Backoff::new(CHECK, MAX_ACCOUNT_RETRY);
    let mut reach_at = tokio::time::Instant::now();
    // When each certificate's renewal information says to renew (ARI), and when to ask
    // again; `None` once the CA said it has none.
    let mut ari: Option<HashMap<String, (Unix, Option<Unix>)>> = Some(HashMap::new());
    loop {
        tick.tick().await;
        for record in (orders.records)() {
            if record.source != TlsSource::Acme || !(orders.served)(&record.name) {
                continue;
            }
            let now = unix_now();
            if record.acme.retry_at.is_some_and(|at| at > now)
                || (record.acme.lease.as_ref())
                    .is_some_and(|l| l.holder != orders.me && l.until > now)
            {
                continue;
            }
            let mut due = due_by_lifetime(&record, now);
            let ask_ari = !due && ari.is_some();
            if (due || ask_ari) && account.is_none() {
                if tokio::time::Instant::now() < reach_at {
                    break;
                }
                match tokio::time::timeout(ORDER_TIMEOUT, open_account(&orders)).await {
                    Ok(Ok(a)) => {
                        account = Some(a);
                        unreachable.reset();
                    }
                    failed => {
                        let error = match failed {
                            Ok(Err(e)) => e,
                            _ => format!("no answer within {ORDER_TIMEOUT:?}"),
                        };
                        let wait = unreachable.next_delay();
                        warn!(directory = %orders.settings.directory, %error, retry_in = ?wait, "cannot use the ACME account");
                        (orders.counted)("error");
                        reach_at = tokio::time::Instant::now() + wait;
                        break;
                    }
                }
            }
            if ask_ari {
                if let (Some(known), Some(acct)) = (ari.as_mut(), account.as_ref()) {
                    match ari_says(known, acct, &record, now).await {
                        Ok(says) => due = says,
                        Err(()) => ari = None,
                    }
                }
            }
            if let (true, Some(account)) = (due, account.as_ref()) {
                ordered(&orders, account, &record).await;
            }
        }
    }
}

/// Takes the lease of `seen`'s name (if the store still holds the certificate seen),
/// orders its certificate and stores the outcome.
async fn ordered(orders: &Orders, account: &Account, seen: &TlsRecord) {
    let name = seen.name.as_str();
    let (ca, n, me, had) = (
        orders.ca.clone(),
        name.to_string(),
        orders.me.clone(),
        seen.not_after,
    );
    let now = unix_now();
    let until = now + LEASE.as_secs() as i64;
    let leased =
        tokio::task::spawn_blocking(move || ca.acme_lease(&n, &me, had, (now, until))).await;
    let Ok(Ok(Some(record))) = leased else {
        return; // another proxy orders it, or the store is away (tried again next time)
    };
    let renewal = record.chain_pem.is_some();
    info!(host = %name, directory = %orders.settings.directory, challenge = orders.settings.challenge.name(), renewal, "ordering a certificate");
    let ctx = order::OrderCtx {
        ca: &orders.ca,
        me: &orders.me,
        challenge: orders.settings.challenge,
        records: &*orders.records,
    };
    let result = match tokio::time::timeout(ORDER_TIMEOUT, order::order(&ctx, account, name)).await
    {
        Ok(result) => result,
        Err(_) => Err(order::Failed {
            result: "error",
            reason: format!("the order took longer than {ORDER_TIMEOUT:?}"),
        }),
    };
    let (ca, n, me) = (orders.ca.clone(), name.to_string(), orders.me.clone());
    match result {
        Ok((chain, key)) => {
            let stored = tokio::task::spawn_blocking(move || {
                ca.acme_issued(&n, &me, &chain, &key, unix_now())
            })
            .await;
            match stored {
                Ok(Ok(true)) => {
                    (orders.counted)("valid");
                    info!(host = %name, "certificate issued; every proxy serves it now");
                }
                Ok(Ok(false)) => {
                    (orders.counted)("valid");
                    info!(host = %name, "certificate issued, but the name is no longer ordered here (passed through meanwhile); dropped");
                }
                Ok(Err(e)) => {
                    (orders.counted)("error");
                    warn!(host = %name, error = %e, "cannot store the issued certificate");
                }
                Err(e) => warn!(host = %name, error = %e, "storing the certificate failed"),
            }
        }
        Err(failed) => {
            (orders.counted)(failed.result);
            let reason = failed.reason.clone();
            let stored = tokio::task::spawn_blocking(move || {
                ca.acme_failed(
                    &n,
                    &me,
                    &reason,
                    |f| unix_now() + retry_delay(f),
                    unix_now(),
                )
            })
            .await;
            let failures = match stored {
                Ok(Ok(f)) => f,
                _ => 0,
            };
            warn!(host = %name, result = failed.result, error = %failed.reason, failures, "certificate order failed; backing off");
        }
    }
}

/// The account at the directory every proxy on the store uses: made by the first proxy
/// that needs it, its credentials sealed in the store.
async fn open_account(orders: &Orders) -> Result<Account, String> {
    let settings = &orders.settings;
    let client = || -> Result<Box<dyn instant_acme::HttpClient>, String> {
        let roots = match &settings.roots {
            Some(roots) => roots.clone(),
            None => crate::tls::read_roots(crate::tls::SYSTEM_ROOTS.as_ref()).map_err(|e| {
                format!("{e} (install ca-certificates, or name the roots in [acme] ca_roots)")
            })?,
        };
        Ok(Box::new(
            client::Client::new(roots).map_err(|e| e.to_string())?,
        ))
    };
    let purpose = acme_account_purpose(&settings.directory);
    let sealer = orders.ca.sealer();
    let (ca, dir) = (orders.ca.clone(), settings.directory.clone());
    let kept = tokio::task::spawn_blocking(move || ca.acme_account(&dir))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let restore = |sealed: &str| -> Result<AccountCredentials, String> {
        let json = sealer.open(&purpose, sealed).map_err(|e| e.to_string())?;
        serde_json::from_slice(&json).map_err(|e| format!("the stored ACME account: {e}"))
    };
    if let Some(sealed) = kept {
        let account = instant_acme::Account::builder_with_http(client()?)
            .from_credentials(restore(&sealed)?)
            .await
            .map_err(|e| order::describe(&e))?;
        return Ok(account);
    }
    let contact: Vec<&str> = settings.contact.iter().map(String::as_str).collect();
    let eab = (settings.eab.as_ref()).map(|(kid, key)| ExternalAccountKey::new(kid.clone(), key));
    let new = instant_acme::NewAccount {
        contact: &contact,
        terms_of_service_agreed: true,
        only_return_existing: false,
    };
    let (account, credentials) = instant_acme::Account::builder_with_http(client()?)
        .create(&new, settings.directory.clone(), eab.as_ref())
        .await
        .map_err(|e| order::describe(&e))?;
    let json = serde_json::to_vec(&credentials).map_err(|e| e.to_string())?;
    let sealed = (orders.ca.sealer())
        .seal(&acme_account_purpose(&settings.directory), &json)
        .map_err(|e| e.to_string())?;
    let (ca, dir, ours) = (
        orders.ca.clone(),
        settings.directory.clone(),
        sealed.clone(),
    );
    let first = tokio::task::spawn_blocking(move || ca.put_acme_account(&dir, &ours))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cannot store the ACME account: {e}"))?;
    if first == sealed {
        info!(directory = %settings.directory, account = %account.id(), "ACME account made and stored for every proxy");
        return Ok(account);
    }
    // Another proxy stored one first: every proxy uses that one.
    instant_acme::Account::builder_with_http(client()?)
        .from_credentials(restore(&first)?)
        .await
        .map_err(|e| order::describe(&e))
}

/// Whether `record`'s certificate is missing or past two thirds of its lifetime.
fn due_by_lifetime(record: &TlsRecord, now: Unix) -> bool {
    let (Some(chain), Some(not_after)) = (&record.chain_pem, record.not_after) else {
        return true;
    };
    let not_before = revproxy_ca::validity(chain).map_or(not_after, |(from, _)| from);
    now >= not_before + (not_after - not_before) * 2 / 3
}

/// Whether the CA's renewal information says to renew `record`'s certificate now (a time
/// drawn once within its suggested window); `Err` when the CA has none.
async fn ari_says(
    known: &mut HashMap<String, (Unix, Option<Unix>)>,
    account: &Account,
    record: &TlsRecord,
    now: Unix,
) -> Result<bool, ()> {
    let Some(chain) = &record.chain_pem else {
        return Ok(true);
    };
    if let Some((ask_at, renew_at)) = known.get(&record.name) {
        if *ask_at > now {
            return Ok(renew_at.is_some_and(|at| at <= now));
        }
    }
    let Some(leaf) = revproxy_ca::pem_to_der(chain, "CERTIFICATE") else {
        return Ok(false);
    };
    let der = rustls::pki_types::CertificateDer::from(leaf);
    let Ok(id) = CertificateIdentifier::try_from(&der) else {
        return Ok(false);
    };
    let asked = tokio::time::timeout(client::REQUEST_TIMEOUT, account.renewal_info(&id)).await;
    let renew_at = match asked {
        Ok(Ok((info, _))) => {
            let start = info.suggested_window.start.unix_timestamp();
            let end = info.suggested_window.end.unix_timestamp().max(start);
            let span = (end - start).max(1) as u64;
            Some(start + (crate::runtime::random() % span) as i64)
        }
        Ok(Err(instant_acme::Error::Unsupported(_))) => return Err(()),
        _ => None, // asked again later
    };
    known.insert(
        record.name.clone(),
        (now + ARI_CHECK.as_secs() as i64, renew_at),
    );
    Ok(renew_at.is_some_and(|at| at <= now))
}

/// How long no proxy orders a name after its `failures`-th failure in a row.
fn retry_delay(failures: u32) -> i64 {
    let grown = FIRST_RETRY.saturating_mul(4u32.saturating_pow(failures.saturating_sub(1)));
    let d = grown.min(MAX_RETRY).as_secs();
    (d / 2 + crate::runtime::random() % (d / 2 + 1)) as i64
}

fn unix_now() -> Unix {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_to_the_cap_within_the_limits() {
        for _ in 0..50 {
            let first = retry_delay(1);
            assert!((60..=120).contains(&first), "{first}");
            let second = retry_delay(2);
            assert!((240..=480).contains(&second), "{second}");
            // Within an hour of the first failure: at most 4 tries in all.
            assert!(first + second + retry_delay(3) + retry_delay(4) > 3600);
            let late = retry_delay(40);
            assert!((3 * 3600..=6 * 3600).contains(&late), "{late}");
        }
    }
}
