//! Operator certificates: client certificates that open the proxy's admin listener when it
//! listens beyond loopback (`revproxy operator create`). They carry the SPIFFE identity
//! `spiffe://<trust-domain>/operator/<name>`, are recorded in the state (so that the proxy
//! admits only the ones it issued and that are not revoked), and never open a tunnel or
//! renew: those look for agent certificates only.

use std::time::Duration;

use rcgen::KeyPair;
use time::OffsetDateTime;

use crate::ca::Ca;
use crate::certs::{revoke_matching, Revocable};
use crate::error::CaError;
use crate::names::validate_agent_name;
use crate::profile::BACKDATE;
use crate::state::{OperatorRecord, Unix};

/// Lifetime of operator certificates unless `--ttl` says otherwise.
pub const DEFAULT_OPERATOR_TTL: Duration = Duration::from_secs(90 * 24 * 3600);
/// Longest operator certificate lifetime accepted.
pub const MAX_OPERATOR_TTL: Duration = Duration::from_secs(366 * 24 * 3600);

/// A freshly issued operator certificate and its key (made here, handed to the caller
/// once, never stored by the CA).
pub struct OperatorCert {
    pub name: String,
    pub identity: String,
    pub serial: String,
    pub not_after: Unix,
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

impl std::fmt::Debug for OperatorCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OperatorCert")
            .field("identity", &self.identity)
            .field("serial", &self.serial)
            .finish_non_exhaustive()
    }
}

/// An operator certificate as `revproxy operator list` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OperatorInfo {
    pub serial: String,
    pub name: String,
    pub not_after: Unix,
    /// `valid`, `expired` or `revoked`.
    pub state: &'static str,
}

impl Ca {
    /// The SPIFFE identity of operator `name`.
    pub fn operator_identity(&self, name: &str) -> String {
        format!("spiffe://{}/operator/{name}", self.trust_domain)
    }

    /// Issues an operator certificate for `name`, valid for `ttl`, and records it.
    pub fn create_operator(
        &self,
        name: &str,
        ttl: Duration,
        now: OffsetDateTime,
    ) -> Result<OperatorCert, CaError> {
        validate_agent_name(name).map_err(|e| {
            CaError::InvalidInput(e.to_string().replace("agent name", "operator name"))
        })?;
        if ttl.is_zero() || ttl > MAX_OPERATOR_TTL {
            return Err(CaError::InvalidInput(format!(
                "operator certificate lifetime must be between 1s and {} days",
                MAX_OPERATOR_TTL.as_secs() / 86400
            )));
        }
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let identity = self.operator_identity(name);
        let (cert_pem, serial_hex, not_after) =
            self.issue_client_cert(name, &identity, &[], &key, ttl, now)?;
        let record = OperatorRecord {
            serial: serial_hex.clone(),
            name: name.to_string(),
            not_before: (now - BACKDATE).unix_timestamp(),
            not_after,
            revoked_at: None,
        };
        self.state.update(|tx| {
            tx.prune(now.unix_timestamp())?;
            tx.put_operator(record)
        })?;
        Ok(OperatorCert {
            name: name.to_string(),
            identity,
            serial: serial_hex,
            not_after,
            cert_pem,
            key_pem: key.serialize_pem(),
            ca_pem: self.cert_pem.clone(),
        })
    }

    /// Every operator certificate on record, oldest first.
    pub fn list_operators(&self, now: OffsetDateTime) -> Result<Vec<OperatorInfo>, CaError> {
        let now = now.unix_timestamp();
        Ok(self
            .state
            .read()?
            .operators
            .into_iter()
            .map(|o| OperatorInfo {
                state: if o.revoked_at.is_some() {
                    "revoked"
                } else if now >= o.not_after {
                    "expired"
                } else {
                    "valid"
                },
                serial: o.serial,
                name: o.name,
                not_after: o.not_after,
            })
            .collect())
    }

    /// Revokes the operator certificate with serial `what`, or every one of operator
    /// `what`. Returns the serials revoked now.
    pub fn revoke_operator(&self, what: &str, now: OffsetDateTime) -> Result<Vec<String>, CaError> {
        self.state.update(|tx| {
            let named = tx.operators_named(what)?;
            let by_serial = tx.operator(&what.to_ascii_lowercase())?;
            let (revoked, changed) = revoke_matching(named, by_serial, now.unix_timestamp())
                .ok_or_else(|| {
                    CaError::InvalidInput(format!(
                        "no operator certificate or operator {what:?}; `revproxy operator list` shows them"
                    ))
                })?;
            for operator in changed {
                tx.put_operator(operator)?;
            }
            Ok(revoked)
        })
    }
}

impl Revocable for OperatorRecord {
    fn serial(&self) -> &str {
        &self.serial
    }

    fn revoked_at(&mut self) -> &mut Option<Unix> {
        &mut self.revoked_at
    }
}
