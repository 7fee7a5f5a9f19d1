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
mod schedule;

use std::sync::Arc;
use std::time::Duration;

use instant_acme::{Account, AccountCredentials, ExternalAccountKey};
use revproxy_ca::state::{TlsRecord, Unix};
use revproxy_ca::{acme_account_purpose, Ca};
use serde::Deserialize;
use tracing::info;

pub(crate) use answer::{answer_tls_alpn01, Answer, ChallengeCerts};
pub(crate) use schedule::order_certificates;

/// How often a proxy looks for names due an order.
pub(super) const CHECK: Duration = Duration::from_secs(5);
/// How long a proxy's hold on ordering a name lasts: past [`ORDER_TIMEOUT`], so that an
/// order never outlives its lease; a proxy that died holding one delays the name by this.
pub(super) const LEASE: Duration = Duration::from_secs(600);
/// Longest one order may take.
pub(super) const ORDER_TIMEOUT: Duration = Duration::from_secs(300);
/// Backoff after the first failure, growing fourfold per failure up to [`MAX_RETRY`]
/// (each delay drawn from its upper half): at most 4 tries in the first hour.
const FIRST_RETRY: Duration = Duration::from_secs(120);
const MAX_RETRY: Duration = Duration::from_secs(6 * 3600);
/// How often the CA's renewal information is asked again for one certificate.
pub(super) const ARI_CHECK: Duration = Duration::from_secs(6 * 3600);
/// Longest wait before trying an ACME server that could not be reached again.
pub(super) const MAX_ACCOUNT_RETRY: Duration = Duration::from_secs(600);

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

/// The account at the directory every proxy on the store uses: made by the first proxy
/// that needs it, its credentials sealed in the store.
pub(super) async fn open_account(orders: &Orders) -> Result<Account, String> {
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

/// How long no proxy orders a name after its `failures`-th failure in a row.
pub(super) fn retry_delay(failures: u32) -> i64 {
    let grown = FIRST_RETRY.saturating_mul(4u32.saturating_pow(failures.saturating_sub(1)));
    let d = grown.min(MAX_RETRY).as_secs();
    (d / 2 + crate::runtime::random() % (d / 2 + 1)) as i64
}

pub(super) fn unix_now() -> Unix {
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
