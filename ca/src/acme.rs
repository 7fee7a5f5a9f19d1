//! Ordering terminated names' certificates from ACME (DESIGN.md section 10), as far as the
//! store is concerned: one proxy at a time per name (a lease), the pending challenge's
//! answer where every proxy finds it, the certificate once issued (its key sealed), the
//! backoff after failures, and the account shared by every proxy on the store.

use crate::ca::Ca;
use crate::error::CaError;
use crate::state::{Challenge, Lease, TlsRecord, TlsSource, Unix};
use crate::tls::{check_own_cert, tls_key_purpose};

/// What the associated data of an ACME account's sealed credentials says.
pub fn acme_account_purpose(directory: &str) -> String {
    format!("acme-account:{directory}")
}

impl Ca {
    /// Takes the lease on ordering `name`'s certificate for `holder` until `until`, if it
    /// is ACME-sourced, not leased to another proxy, not backing off, and its certificate
    /// still the one `seen` (its expiry: the caller decided from that record that an order
    /// is due, and another proxy may have renewed it since): its record, or `None`
    /// (nothing written). No proxy orders it again before `retry_at(failures so far)`
    /// unless the order reports back ([`Ca::acme_issued`], [`Ca::acme_failed`]): a proxy
    /// that dies or loses the store mid-order backs off as after a failure.
    pub fn acme_lease(
        &self,
        name: &str,
        holder: &str,
        seen: Option<Unix>,
        (now, until): (Unix, Unix),
        retry_at: impl Fn(u32) -> Unix + Sync,
    ) -> Result<Option<TlsRecord>, CaError> {
        self.state.update(|tx| {
            let Some(mut record) = tx.tls(name)? else {
                return Ok(None);
            };
            let progress = &record.acme;
            let leased_elsewhere =
                (progress.lease.as_ref()).is_some_and(|l| l.holder != holder && l.until > now);
            if record.source != TlsSource::Acme
                || record.not_after != seen
                || leased_elsewhere
                || progress.retry_at.is_some_and(|at| at > now)
            {
                return Ok(None);
            }
            record.acme.lease = Some(Lease {
                holder: holder.to_string(),
                until,
            });
            record.acme.challenge = None;
            record.acme.retry_at = Some(retry_at(record.acme.failures));
            tx.put_tls(record.clone())?;
            Ok(Some(record))
        })
    }

    /// Publishes (or, with `None`, withdraws) the answer to `name`'s pending challenge, if
    /// `holder` still holds its lease: whether it did.
    pub fn acme_challenge(
        &self,
        name: &str,
        holder: &str,
        challenge: Option<Challenge>,
    ) -> Result<bool, CaError> {
        self.state.update(|tx| {
            let Some(mut record) = leased(tx.tls(name)?, holder) else {
                return Ok(false);
            };
            record.acme.challenge = challenge.clone();
            tx.put_tls(record)?;
            Ok(true)
        })
    }

    /// Serves the certificate `holder` was issued for `name` from now on (any proxy):
    /// `false` (nothing written) if `name` is no longer ordered by `holder`.
    pub fn acme_issued(
        &self,
        name: &str,
        holder: &str,
        chain_pem: &str,
        key_pem: &str,
        now: Unix,
    ) -> Result<bool, CaError> {
        let not_after = check_own_cert(chain_pem, &[name.to_string()], now)?;
        let key_sealed = self
            .sealer()
            .seal(&tls_key_purpose(name), key_pem.as_bytes())?;
        self.state.update(|tx| {
            let Some(old) = leased(tx.tls(name)?, holder) else {
                return Ok(false);
            };
            tx.put_tls(TlsRecord {
                chain_pem: Some(chain_pem.to_string()),
                key_sealed: Some(key_sealed.clone()),
                not_after: Some(not_after),
                last_error: None,
                updated: now,
                acme: Default::default(),
                ..old
            })?;
            Ok(true)
        })
    }

    /// Notes that `holder`'s order for `name` failed with `error`: the lease ends, the
    /// challenge goes, and no proxy orders again before `retry_at`. Returns the failures
    /// in a row so far.
    pub fn acme_failed(
        &self,
        name: &str,
        holder: &str,
        error: &str,
        retry_at: impl Fn(u32) -> Unix + Sync,
        now: Unix,
    ) -> Result<u32, CaError> {
        self.state.update(|tx| {
            let Some(mut record) = leased(tx.tls(name)?, holder) else {
                return Ok(0);
            };
            let failures = record.acme.failures.saturating_add(1);
            record.acme.lease = None;
            record.acme.challenge = None;
            record.acme.failures = failures;
            record.acme.retry_at = Some(retry_at(failures));
            record.last_error = Some(error.to_string());
            record.updated = now;
            tx.put_tls(record)?;
            Ok(failures)
        })
    }

    /// The sealed credentials of the proxies' account at the ACME `directory`, if one was
    /// made.
    pub fn acme_account(&self, directory: &str) -> Result<Option<String>, CaError> {
        let settings = self.state.look(|tx| tx.settings())?;
        Ok(settings.acme_accounts.get(directory).cloned())
    }

    /// Keeps the account just made at `directory` for every proxy, unless another proxy
    /// kept one first: the sealed credentials to use from now on.
    pub fn put_acme_account(&self, directory: &str, sealed: &str) -> Result<String, CaError> {
        self.state.update(|tx| {
            let mut settings = tx.settings()?;
            if let Some(first) = settings.acme_accounts.get(directory) {
                return Ok(first.clone());
            }
            settings
                .acme_accounts
                .insert(directory.to_string(), sealed.to_string());
            tx.put_settings(settings)?;
            Ok(sealed.to_string())
        })
    }
}

/// `record`, if `holder` holds its lease.
fn leased(record: Option<TlsRecord>, holder: &str) -> Option<TlsRecord> {
    record.filter(|r| r.acme.lease.as_ref().is_some_and(|l| l.holder == holder))
}
