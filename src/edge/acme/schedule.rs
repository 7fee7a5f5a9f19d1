//! The ordering task: every [`CHECK`], the ACME-sourced names some agent serves whose
//! certificate is missing or due are ordered, one at a time, within what the CA allows:
//! per name, the backoff in the store (set before the order begins, so that a proxy that
//! dies or loses the store mid-order does not order again at once) and a quiet time after
//! each issue (a clock running ahead does not renew in a loop); per account, at most
//! [`MAX_ORDERS_PER_HOUR`] and a pause when the CA says it is rate limited.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use instant_acme::{Account, CertificateIdentifier};
use revproxy_ca::state::{TlsRecord, TlsSource, Unix};
use tokio::time::Instant;
use tracing::{info, warn};

use super::order::{self, Failed};
use super::{
    client, open_account, retry_delay, unix_now, Orders, ARI_CHECK, CHECK, LEASE,
    MAX_ACCOUNT_RETRY, ORDER_TIMEOUT,
};
use crate::runtime::backoff::Backoff;

/// Most orders one proxy begins in an hour (Let's Encrypt allows an account 300 new
/// orders in 3 hours).
const MAX_ORDERS_PER_HOUR: usize = 100;
/// No order at all for this long after the CA answered `rateLimited`.
const RATE_LIMIT_PAUSE: Duration = Duration::from_secs(1800);
const HOUR: Duration = Duration::from_secs(3600);
/// After a certificate is issued, this proxy orders its name again only after this
/// fraction of its lifetime (9 days of Let's Encrypt's 90), whatever its clock or the
/// CA's renewal information say.
const QUIET_FRACTION: u32 = 10;

/// Orders the certificates due, until dropped.
pub(crate) async fn order_certificates(orders: Orders) {
    let mut tick = tokio::time::interval(CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut scheduler = Scheduler {
        orders,
        account: None,
        unreachable: Backoff::new(CHECK, MAX_ACCOUNT_RETRY),
        reach_at: Instant::now(),
        ari: Some(HashMap::new()),
        quiet: HashMap::new(),
        recent: VecDeque::new(),
        paused_until: None,
        over_budget: false,
    };
    loop {
        tick.tick().await;
        scheduler.pass().await;
    }
}

/// What the CA's renewal information (ARI) said of one certificate.
struct Ari {
    /// When to ask again (Unix seconds).
    ask_at: Unix,
    /// When to renew: a time drawn once within the CA's suggested window.
    renew_at: Option<Unix>,
}

/// The ordering task's memory.
struct Scheduler {
    orders: Orders,
    account: Option<Account>,
    /// After the CA could not be reached: not again before `reach_at`.
    unreachable: Backoff,
    reach_at: Instant,
    /// ARI answers by certificate (name and expiry); `None` once the CA said it has none.
    ari: Option<HashMap<(String, Unix), Ari>>,
    /// Names this proxy got a certificate for, and when it may order them again.
    quiet: HashMap<String, Instant>,
    /// When the orders of the last hour began.
    recent: VecDeque<Instant>,
    paused_until: Option<Instant>,
    /// Said once that the hour's orders are used up.
    over_budget: bool,
}

/// How an order went, for what comes after it.
enum Outcome {
    /// Issued and stored, for a certificate living this long.
    Issued(Duration),
    /// The CA refused for its rate limits.
    RateLimited,
    /// Anything else: failed (and backed off in the store), or not ordered here.
    Other,
}

impl Scheduler {
    /// One look at every terminated name.
    async fn pass(&mut self) {
        let now = Instant::now();
        if self.paused_until.is_some_and(|until| until > now) {
            return;
        }
        self.recent
            .retain(|began| now.duration_since(*began) < HOUR);
        self.quiet.retain(|_, until| *until > now);
        for record in (self.orders.records)() {
            if !self.wanted(&record) {
                continue;
            }
            let now = unix_now();
            let by_lifetime = due_by_lifetime(&record, now);
            if !by_lifetime && self.ari.is_none() {
                continue;
            }
            if !self.open_account().await {
                return;
            }
            if !(by_lifetime || self.ari_says(&record, now).await) {
                continue;
            }
            if self.recent.len() >= MAX_ORDERS_PER_HOUR {
                if !self.over_budget {
                    warn!(
                        limit = MAX_ORDERS_PER_HOUR,
                        "this proxy began its hour's ACME orders already; the rest wait"
                    );
                    self.over_budget = true;
                }
                return;
            }
            self.over_budget = false;
            self.recent.push_back(Instant::now());
            let account = self.account.as_ref().expect("opened above");
            // Named as the certificate replaced, unless the CA said it has no ARI.
            let replaces = (self.ari.is_some())
                .then(|| record.chain_pem.as_deref().and_then(certificate_id))
                .flatten();
            match ordered(&self.orders, account, &record, replaces).await {
                Outcome::Issued(lifetime) => {
                    let quiet = Instant::now() + lifetime / QUIET_FRACTION;
                    self.quiet.insert(record.name.clone(), quiet);
                }
                Outcome::RateLimited => {
                    warn!(pause = ?RATE_LIMIT_PAUSE, "the ACME CA says this account is rate limited: no orders meanwhile");
                    self.paused_until = Some(Instant::now() + RATE_LIMIT_PAUSE);
                    return;
                }
                Outcome::Other => {}
            }
            if let Some(ari) = self.ari.as_mut() {
                ari.retain(|(name, _), _| *name != record.name);
            }
        }
    }

    /// Whether `record` may be ordered by this proxy now, should it be due.
    fn wanted(&self, record: &TlsRecord) -> bool {
        let now = unix_now();
        record.source == TlsSource::Acme
            && !self.quiet.contains_key(&record.name)
            && record.acme.retry_at.is_none_or(|at| at <= now)
            && !(record.acme.lease.as_ref())
                .is_some_and(|l| l.holder != self.orders.me && l.until > now)
            && (self.orders.served)(&record.name)
    }

    /// Opens the account unless it is, or the CA could not be reached lately: whether it
    /// is open.
    async fn open_account(&mut self) -> bool {
        if self.account.is_some() {
            return true;
        }
        if Instant::now() < self.reach_at {
            return false;
        }
        let error = match tokio::time::timeout(ORDER_TIMEOUT, open_account(&self.orders)).await {
            Ok(Ok(account)) => {
                self.account = Some(account);
                self.unreachable.reset();
                return true;
            }
            Ok(Err(e)) => e,
            Err(_) => format!("no answer within {ORDER_TIMEOUT:?}"),
        };
        let wait = self.unreachable.next_delay();
        warn!(directory = %self.orders.settings.directory, %error, retry_in = ?wait, "cannot use the ACME account");
        self.reach_at = Instant::now() + wait;
        false
    }

    /// Whether the CA's renewal information says to renew `record`'s certificate now;
    /// after the CA says it has none, never asked again.
    async fn ari_says(&mut self, record: &TlsRecord, now: Unix) -> bool {
        let (Some(chain), Some(not_after), Some(known), Some(account)) = (
            &record.chain_pem,
            record.not_after,
            self.ari.as_mut(),
            self.account.as_ref(),
        ) else {
            return false;
        };
        let key = (record.name.clone(), not_after);
        if let Some(ari) = known.get(&key) {
            if ari.ask_at > now {
                return ari.renew_at.is_some_and(|at| at <= now);
            }
        }
        let Some(id) = certificate_id(chain) else {
            return false;
        };
        let asked = tokio::time::timeout(client::REQUEST_TIMEOUT, account.renewal_info(&id)).await;
        let renew_at = match asked {
            Ok(Ok((info, _))) => {
                let start = info.suggested_window.start.unix_timestamp();
                let end = info.suggested_window.end.unix_timestamp().max(start);
                let span = (end - start).max(1) as u64;
                Some(start + (crate::runtime::random() % span) as i64)
            }
            Ok(Err(instant_acme::Error::Unsupported(_))) => {
                info!(directory = %self.orders.settings.directory, "the ACME CA gives no renewal information (ARI): certificates are renewed at two thirds of their lifetime");
                self.ari = None;
                return false;
            }
            _ => None, // asked again later
        };
        known.retain(|(name, _), _| *name != record.name);
        let ask_at = now + ARI_CHECK.as_secs() as i64;
        known.insert(key, Ari { ask_at, renew_at });
        renew_at.is_some_and(|at| at <= now)
    }
}

/// Takes the lease of `seen`'s name (if the store still holds the certificate seen, and
/// notes the backoff the order would need should it never report back), orders its
/// certificate and stores the outcome.
async fn ordered(
    orders: &Orders,
    account: &Account,
    seen: &TlsRecord,
    replaces: Option<CertificateIdentifier<'static>>,
) -> Outcome {
    let name = seen.name.as_str();
    let (ca, n, me, had) = (
        orders.ca.clone(),
        name.to_string(),
        orders.me.clone(),
        seen.not_after,
    );
    let now = unix_now();
    let until = now + LEASE.as_secs() as i64;
    let leased = tokio::task::spawn_blocking(move || {
        ca.acme_lease(&n, &me, had, (now, until), |f| now + retry_delay(f + 1))
    })
    .await;
    let Ok(Ok(Some(record))) = leased else {
        return Outcome::Other; // another proxy orders it, or the store is away
    };
    let renewal = record.chain_pem.is_some();
    info!(host = %name, directory = %orders.settings.directory, challenge = orders.settings.challenge.name(), renewal, "ordering a certificate");
    let ctx = order::OrderCtx {
        ca: &orders.ca,
        me: &orders.me,
        challenge: orders.settings.challenge,
        records: &*orders.records,
    };
    let ordering = order::order(&ctx, account, name, replaces);
    let result = match tokio::time::timeout(ORDER_TIMEOUT, ordering).await {
        Ok(result) => result,
        Err(_) => Err(Failed::error(format!(
            "the order took longer than {ORDER_TIMEOUT:?}"
        ))),
    };
    // What the CA sent must be servable: a chain for the name, and the key its own.
    let result = result.and_then(|(chain, key)| {
        crate::tls::check_cert_and_key(&chain, &key)
            .map(|chain| (chain, key))
            .map_err(|e| Failed::error(format!("the CA's certificate cannot be served: {e}")))
    });
    let (ca, n, me) = (orders.ca.clone(), name.to_string(), orders.me.clone());
    let failed = match result {
        Ok((chain, key)) => {
            let lifetime =
                revproxy_ca::validity(&chain).map_or(0, |(from, to)| (to - from).max(0) as u64);
            let stored = tokio::task::spawn_blocking(move || {
                ca.acme_issued(&n, &me, &chain, &key, unix_now())
            })
            .await;
            (orders.counted)("valid");
            match stored {
                Ok(Ok(true)) => {
                    info!(host = %name, "certificate issued; every proxy serves it now");
                    return Outcome::Issued(Duration::from_secs(lifetime));
                }
                Ok(Ok(false)) => {
                    info!(host = %name, "certificate issued, but the name is no longer ordered here (passed through meanwhile); dropped")
                }
                Ok(Err(e)) => {
                    warn!(host = %name, error = %e, "cannot store the issued certificate; the name is ordered again after its backoff")
                }
                Err(e) => {
                    warn!(host = %name, error = %e, "storing the certificate failed; the name is ordered again after its backoff")
                }
            }
            return Outcome::Other;
        }
        Err(failed) => failed,
    };
    (orders.counted)(failed.result);
    let reason = failed.reason.clone();
    let stored = tokio::task::spawn_blocking(move || {
        let retry_at = |f| unix_now() + retry_delay(f);
        ca.acme_failed(&n, &me, &reason, retry_at, unix_now())
    })
    .await;
    let failures = match stored {
        Ok(Ok(f)) => f,
        _ => 0,
    };
    warn!(host = %name, result = failed.result, error = %failed.reason, failures, "certificate order failed; backing off");
    match failed.rate_limited {
        true => Outcome::RateLimited,
        false => Outcome::Other,
    }
}

/// The ARI identifier of the first certificate in `chain`.
fn certificate_id(chain: &str) -> Option<CertificateIdentifier<'static>> {
    let leaf = revproxy_ca::pem_to_der(chain, "CERTIFICATE")?;
    let der = rustls::pki_types::CertificateDer::from(leaf);
    let id = CertificateIdentifier::try_from(&der).ok()?;
    Some(id.into_owned())
}

/// Whether `record`'s certificate is missing or past two thirds of its lifetime.
fn due_by_lifetime(record: &TlsRecord, now: Unix) -> bool {
    let (Some(chain), Some(not_after)) = (&record.chain_pem, record.not_after) else {
        return true;
    };
    let not_before = revproxy_ca::validity(chain).map_or(not_after, |(from, _)| from);
    now >= not_before + (not_after - not_before) * 2 / 3
}
