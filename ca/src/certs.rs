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
    /// first; stops at the first error `each` returns.
    pub fn each_cert<E: From<CaError>>(
        &self,
        now: OffsetDateTime,
        agent: Option<&str>,
        mut each: impl FnMut(CertInfo) -> Result<(), E>,
    ) -> Result<(), E> {
        let now = now.unix_timestamp();
        for c in self.state.read()?.certs {
            if agent.is_some_and(|a| a != c.agent) {
                continue;
            }
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
            each(CertInfo {
                serial: c.serial,
                agent: c.agent,
                hosts: c.hosts,
                not_before: c.not_before,
                not_after: c.not_after,
                state,
            })?;
        }
        Ok(())
    }

    /// Revokes the certificate with serial `what`, or every certificate of agent `what`.
    /// Returns the serials revoked now (already revoked ones are not repeated).
    pub fn revoke_certs(&self, what: &str, now: OffsetDateTime) -> Result<Vec<String>, CaError> {
        self.state.update(|tx| {
            let mut certs = tx.certs_of(what)?;
            if let Some(cert) = tx.cert(&what.to_ascii_lowercase())? {
                if !certs.iter().any(|c| c.serial == cert.serial) {
                    certs.push(cert);
                }
            }
            let revoked = revoke_matching(&mut certs, what, now.unix_timestamp())
                .ok_or_else(|| CaError::UnknownCert(what.to_string()))?;
            for cert in certs.into_iter().filter(|c| revoked.contains(&c.serial)) {
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
    /// Whose it is: the agent's or the operator's name.
    fn holder(&self) -> &str;
    /// When it was revoked, if it was.
    fn revoked_at(&mut self) -> &mut Option<Unix>;
}

impl Revocable for CertRecord {
    fn serial(&self) -> &str {
        &self.serial
    }

    fn holder(&self) -> &str {
        &self.agent
    }

    fn revoked_at(&mut self) -> &mut Option<Unix> {
        &mut self.revoked_at
    }
}

/// Revokes at `now` each of `records` whose serial is `what` (in any case) or whose holder
/// is `what`. Returns the serials revoked now (already revoked ones are not repeated), or
/// `None` when nothing matched.
pub(crate) fn revoke_matching<R: Revocable>(
    records: &mut [R],
    what: &str,
    now: Unix,
) -> Option<Vec<String>> {
    let serial = what.to_ascii_lowercase();
    let mut matched = false;
    let mut revoked = Vec::new();
    for record in records
        .iter_mut()
        .filter(|r| r.serial() == serial || r.holder() == what)
    {
        matched = true;
        if record.revoked_at().is_none() {
            *record.revoked_at() = Some(now);
            revoked.push(record.serial().to_string());
        }
    }
    matched.then_some(revoked)
}
