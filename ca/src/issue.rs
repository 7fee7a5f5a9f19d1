//! Issuing agent certificates: enrollment (a one-time token and a CSR) and renewal (the
//! current certificate and a CSR). Both consume or check state and record the certificate
//! inside one locked state update, so what is answered is on disk. Reading the CSR is
//! `csr.rs`; the certificate's profile is `profile.rs`.

use std::time::Duration;

use rcgen::{ExtendedKeyUsagePurpose, PublicKeyData, SanType};
use time::OffsetDateTime;

use crate::ca::Ca;
use crate::csr::requested_key;
use crate::error::{CaError, EnrollError};
use crate::grants::add_access;
use crate::hex;
use crate::profile::{self, BACKDATE};
use crate::records::Tx;
use crate::state::{AgentGrant, CertRecord, Traded, Unix};
use crate::token::{Secret, SecretHash};

/// Lifetime of agent certificates by default.
pub const DEFAULT_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Bounds of agent certificate lifetimes accepted from operators (`--cert-ttl`).
pub const MIN_CERT_TTL: Duration = Duration::from_secs(3600);
pub const MAX_CERT_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// A retried enrollment (same token, same key) this soon after the first gets the same
/// certificate back instead of "token already used": the first answer may have been lost.
pub const REISSUE_WINDOW: Duration = Duration::from_secs(5 * 60);
/// Part of a certificate's lifetime, in percent, that must pass before it may be renewed.
/// Agents renew at about two thirds; this leaves room for their clocks to run a sixth of
/// the lifetime ahead (four hours of a day-long certificate).
pub const MIN_RENEWAL_AGE_PERCENT: u8 = 50;

/// An enrollment request as received from an agent.
#[derive(Debug)]
pub struct EnrollRequest<'a> {
    pub token_id: &'a str,
    pub secret: &'a Secret,
    pub csr_pem: &'a str,
}

/// The outcome of a successful enrollment.
#[derive(Clone, Debug)]
pub struct Enrolled {
    pub agent: String,
    pub identity: String,
    pub hosts: Vec<String>,
    pub serial: String,
    pub not_after: Unix,
    pub cert_pem: String,
    pub ca_pem: String,
    /// True when this answered a retry with the certificate issued before.
    pub reissued: bool,
}

impl Ca {
    /// Issues a fresh certificate for the holder of certificate `serial` (proven by the mTLS
    /// handshake that carried the request) with the key in `csr_pem`: same agent, same
    /// names, same lifetime.
    ///
    /// Each certificate is renewed at most once, and not before `min_age_percent` of its
    /// lifetime has passed, so an agent cannot mint certificates (or make the proxy rewrite
    /// its state) at will. A retry with the same key gets the same successor back, since the
    /// first answer may have been lost (unless the successor was revoked since); another key
    /// is refused. Refused if the certificate is unknown, revoked or expired.
    pub fn renew(
        &self,
        serial: &str,
        csr_pem: &str,
        now: OffsetDateTime,
        min_age_percent: u8,
    ) -> Result<Enrolled, EnrollError> {
        let (public_key, spki) = requested_key(csr_pem)?;
        let now_s = now.unix_timestamp();
        self.state.update(|tx| {
            let mut old = tx.cert(serial)?.ok_or(EnrollError::UnknownCert)?;
            if old.revoked_at.is_some() {
                return Err(EnrollError::CertRevoked);
            }
            if now_s >= old.not_after {
                return Err(EnrollError::CertExpired);
            }
            if let Some(renewed) = &old.renewed {
                // Renewed once already: only the key it was renewed for may fetch that
                // certificate again. Revoking the successor does not reopen renewal, or a
                // thief holding a copy of the old certificate could renew it again at once.
                if renewed.spki_sha256 != spki {
                    return Err(EnrollError::AlreadyRenewed {
                        successor: renewed.serial.clone(),
                    });
                }
                let successor = tx.cert(&renewed.serial)?;
                return match successor {
                    Some(cert) if cert.revoked_at.is_none() => Ok(Enrolled {
                        reissued: true,
                        ..self.enrolled(&cert)
                    }),
                    Some(_) => Err(EnrollError::CertRevoked),
                    None => Err(EnrollError::AlreadyRenewed {
                        successor: renewed.serial.clone(),
                    }),
                };
            }
            let issued = old.not_before + BACKDATE.as_secs() as i64;
            let lifetime = (old.not_after - issued).max(1);
            let due = issued + lifetime * i64::from(min_age_percent.min(100)) / 100;
            if now_s < due {
                return Err(EnrollError::TooEarly {
                    wait_secs: (due - now_s) as u64,
                    min_age_percent,
                });
            }
            let agent = old.agent.clone();
            let hosts = old.hosts.clone();
            let ttl = Duration::from_secs(lifetime as u64);
            let done = self.issue_and_record(tx, agent, hosts, &public_key, ttl, now)?;
            old.renewed = Some(Traded {
                at: now_s,
                spki_sha256: spki,
                serial: done.serial.clone(),
            });
            tx.put_cert(old)?;
            Ok(done)
        })
    }

    /// Trades a token and a CSR for an agent certificate.
    ///
    /// The token is consumed and the certificate recorded on disk before this returns, so
    /// of any number of concurrent calls with one token exactly one issues a certificate
    /// (a retry with the same key within [`REISSUE_WINDOW`] gets that same certificate).
    /// The names in the CSR are ignored: the certificate carries what the token granted.
    pub fn enroll(
        &self,
        req: &EnrollRequest<'_>,
        now: OffsetDateTime,
    ) -> Result<Enrolled, EnrollError> {
        let (public_key, spki) = requested_key(req.csr_pem)?;
        let presented = req.secret.hash();
        let now_s = now.unix_timestamp();

        self.state.update(|tx| {
            let mut token = tx.token(req.token_id)?.ok_or(EnrollError::UnknownToken)?;
            let stored = hex::decode(&token.secret_sha256)
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .map(SecretHash)
                .ok_or_else(|| {
                    EnrollError::Internal(CaError::CorruptState {
                        path: self.state.describe().into(),
                        reason: format!("token {} has a malformed secret hash", token.id),
                    })
                })?;
            // The secret is checked before anything about the token's state is revealed.
            if !stored.matches(&presented) {
                return Err(EnrollError::WrongSecret);
            }
            if token.revoked {
                return Err(EnrollError::Revoked);
            }
            if let Some(used) = &token.used {
                let retry =
                    used.spki_sha256 == spki && now_s - used.at <= REISSUE_WINDOW.as_secs() as i64;
                let earlier = match retry {
                    true => tx.cert(&used.serial)?.filter(|c| c.revoked_at.is_none()),
                    false => None,
                };
                return match earlier {
                    Some(cert) => Ok(Enrolled {
                        reissued: true,
                        ..self.enrolled(&cert)
                    }),
                    None => Err(EnrollError::Used),
                };
            }
            if now_s >= token.expires {
                return Err(EnrollError::Expired);
            }
            let agent = token.agent.clone();
            let hosts = token.hosts.clone();
            let private = token.private_hosts.clone();
            let connect = token.connect.clone();
            let ttl = Duration::from_secs(token.cert_ttl_secs.max(0) as u64);
            // The certificate names everything the agent may serve, public or private; the
            // grant says which is which.
            let served: Vec<String> = hosts.iter().chain(&private).cloned().collect();
            let done = self.issue_and_record(tx, agent.clone(), served, &public_key, ttl, now)?;
            token.used = Some(Traded {
                at: now_s,
                spki_sha256: spki,
                serial: done.serial.clone(),
            });
            tx.put_token(token)?;
            if !connect.is_empty() {
                add_access(tx, &agent, connect)?;
            }
            tx.put_grant(&agent, AgentGrant { hosts, private })?;
            Ok(done)
        })
    }

    /// Issues an agent certificate and records it in `tx` (the caller's `update` writes
    /// it out before anyone sees the certificate).
    pub(crate) fn issue_and_record(
        &self,
        tx: &mut dyn Tx,
        agent: String,
        hosts: Vec<String>,
        public_key: &impl PublicKeyData,
        ttl: Duration,
        now: OffsetDateTime,
    ) -> Result<Enrolled, CaError> {
        let (pem, serial, not_after) =
            self.issue_agent_cert(&agent, &hosts, public_key, ttl, now)?;
        tx.prune(now.unix_timestamp())?;
        let record = CertRecord {
            serial,
            agent,
            hosts,
            not_before: (now - BACKDATE).unix_timestamp(),
            not_after,
            revoked_at: None,
            pem,
            renewed: None,
        };
        let done = self.enrolled(&record);
        tx.put_cert(record)?;
        Ok(done)
    }

    /// The answer for a recorded certificate.
    pub(crate) fn enrolled(&self, cert: &CertRecord) -> Enrolled {
        Enrolled {
            agent: cert.agent.clone(),
            identity: self.identity_of(&cert.agent),
            hosts: cert.hosts.clone(),
            serial: cert.serial.clone(),
            not_after: cert.not_after,
            cert_pem: cert.pem.clone(),
            ca_pem: self.cert_pem.clone(),
            reissued: false,
        }
    }

    pub(crate) fn issue_agent_cert(
        &self,
        agent: &str,
        hosts: &[String],
        public_key: &impl PublicKeyData,
        ttl: Duration,
        now: OffsetDateTime,
    ) -> Result<(String, String, Unix), CaError> {
        let identity = self.identity_of(agent);
        self.issue_client_cert(agent, &identity, hosts, public_key, ttl, now)
    }

    /// Signs a client certificate (agent or operator): CN `common_name`, the SPIFFE URI
    /// `identity`, DNS names `hosts` (a granted port as the URI `revproxy:tcp:PORT`), EKU clientAuth, not a CA, valid from [`BACKDATE`]
    /// before `now` for `ttl`. Returns the PEM, the hex serial and the expiry.
    pub(crate) fn issue_client_cert(
        &self,
        common_name: &str,
        identity: &str,
        hosts: &[String],
        public_key: &impl PublicKeyData,
        ttl: Duration,
        now: OffsetDateTime,
    ) -> Result<(String, String, Unix), CaError> {
        let mut sans = vec![SanType::URI(identity.to_string().try_into()?)];
        for host in hosts {
            sans.push(match crate::ports::is_port_name(host) {
                true => SanType::URI(format!("{}{host}", crate::ports::URI_PREFIX).try_into()?),
                false => SanType::DnsName(host.clone().try_into()?),
            });
        }
        let params = profile::leaf(
            common_name,
            sans,
            ExtendedKeyUsagePurpose::ClientAuth,
            now,
            ttl,
        );
        let serial = params.serial_number.as_ref().expect("a leaf has a serial");
        let serial_hex = hex::encode(&serial.to_bytes());
        let cert = params.signed_by(public_key, &self.issuer()?)?;
        Ok((cert.pem(), serial_hex, params.not_after.unix_timestamp()))
    }
}
