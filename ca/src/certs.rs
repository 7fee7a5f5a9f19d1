//! Agent certificates on record: listing and revoking them (revocation is shared with
//! operator certificates). Issuing them is `issue.rs`.

use time::OffsetDateTime;

use crate::ca::Ca;
use crate::error::CaError;
use crate::state::{CertRecord, Unix};

/// A certificate as `revproxy cert list` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    pub serial: String,
    pub agent: String,
    pub hosts: Vec<String>,
    pub not_before: Unix,
    pub not_after: Unix,
    pub state: CertState,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertState {
    Valid,
    /// Within the last third of its lifetime: renewal is due.
    Expiring,
    Expired,
    Revoked,
}

impl CertState {
    pub fn as_str(self) -> &'static str {
        match self {
            CertState::Valid => "valid",
            CertState::Expiring => "expiring",
            CertState::Expired => "expired",
            CertState::Revoked => "revoked",
        }
    }
}

impl Ca {
    /// Every certificate still on record, oldest first.
    pub fn list_certs(&self, now: OffsetDateTime) -> Result<Vec<CertInfo>, CaError> {
        let mut all = Vec::new();
        self.each_cert(now, None, |c| {
            all.push(c);
            Ok::<_, CaError>(())
        })?;
        Ok(all)
    }

    /// Calls `each` with every certificate on record (of `agent` only, when given), oldest
    /// first; stops at the first error `each` returns. All of them are read a batch at a
    /// time ([`Tx::each_cert`](crate::Tx::each_cert)).
    pub fn each_cert<E: From<CaError> + Send>(
        &self,
        now: OffsetDateTime,
        agent: Option<&str>,
        mut each: impl FnMut(CertInfo) -> Result<(), E> + Send,
    ) -> Result<(), E> {
        let now = now.unix_timestamp();
        let mut failed = None;
        let mut one = |c: CertRecord| {
            let third = (c.not_after - c.not_before) / 3;
            let state = if c.revoked_at.is_some() {
                CertState::Revoked
            } else if now >= c.not_after {
                CertState::Expired
            } else if c.not_after - now <= third {
                CertState::Expiring
            } else {
                CertState::Valid
            };
            let info = CertInfo {
                serial: c.serial,
                agent: c.agent,
                hosts: c.hosts,
                not_before: c.not_before,
                not_after: c.not_after,
                state,
            };
            each(info).map_err(|e| failed = Some(e)).is_ok()
        };
        match agent {
            Some(agent) => {
                let certs = self.state.look(|tx| tx.certs_of(agent))?;
                let _ = certs.into_iter().all(&mut one);
            }
            None => self.state.look(|tx| tx.each_cert(&mut one))?,
        }
        failed.map_or(Ok(()), Err)
    }

    /// Revokes the certificate with serial `what`, or every certificate of agent `what`.
    /// Returns the serials revoked now (already revoked ones are not repeated).
    pub fn revoke_certs(&self, what: &str, now: OffsetDateTime) -> Result<Vec<String>, CaError> {
        self.state.update(|tx| {
            let (of_agent, by_serial) = (tx.certs_of(what)?, tx.cert(&what.to_ascii_lowercase())?);
            let (revoked, changed) = revoke_matching(of_agent, by_serial, now.unix_timestamp())
                .ok_or_else(|| CaError::UnknownCert(what.to_string()))?;
            for cert in changed {
                tx.put_cert(cert)?;
            }
            Ok(revoked)
        })
    }
}

/// A certificate on record that can be revoked: an agent's or an operator's.
pub(crate) trait Revocable {
    /// The hex serial number.
    fn serial(&self) -> &str;
    /// When it was revoked, if it was.
    fn revoked_at(&mut self) -> &mut Option<Unix>;
}

impl Revocable for CertRecord {
    fn serial(&self) -> &str {
        &self.serial
    }

    fn revoked_at(&mut self) -> &mut Option<Unix> {
        &mut self.revoked_at
    }
}

/// Revokes at `now` the records of holder `what` (`of_holder`) and the one whose serial is
/// `what` in any case (`by_serial`). Returns the serials revoked now with the records to
/// write back (already revoked ones are not repeated), or `None` when nothing matched.
pub(crate) fn revoke_matching<R: Revocable>(
    of_holder: Vec<R>,
    by_serial: Option<R>,
    now: Unix,
) -> Option<(Vec<String>, Vec<R>)> {
    let mut records = of_holder;
    if let Some(r) = by_serial {
        if !records.iter().any(|o| o.serial() == r.serial()) {
            records.push(r);
        }
    }
    if records.is_empty() {
        return None;
    }
    let changed: Vec<R> = (records.into_iter())
        .filter_map(|mut r| {
            let fresh = r.revoked_at().is_none();
            if fresh {
                *r.revoked_at() = Some(now);
            }
            fresh.then_some(r)
        })
        .collect();
    let serials = changed.iter().map(|r| r.serial().to_string()).collect();
    Some((serials, changed))
}
