//! Issuing agent certificates: enrollment (a one-time token and a CSR) and renewal (the
//! current certificate and a CSR). Both consume or check state and record the certificate
//! inside one locked state update, so what is answered is on disk.

use std::time::Duration;

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose,
    PublicKeyData, SanType, SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
use time::OffsetDateTime;

use crate::ca::{pem_to_der, Ca, EnrollRequest, Enrolled, BACKDATE, MAX_CSR_LEN, REISSUE_WINDOW};
use crate::error::{CaError, EnrollError};
use crate::hex;
use crate::pin::Pin;
use crate::state::{AgentGrant, CertRecord, State, Traded, Unix};
use crate::token::SecretHash;

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
        if csr_pem.len() > MAX_CSR_LEN {
            return Err(EnrollError::BadCsr(format!(
                "it is larger than {MAX_CSR_LEN} bytes"
            )));
        }
        let public_key = csr_public_key(csr_pem)?;
        let spki = hex::encode(Pin::from_spki(&public_key.subject_public_key_info()).as_bytes());
        let now_s = now.unix_timestamp();
        self.state.update(|state: &mut State| {
            let old = state
                .certs
                .iter()
                .find(|c| c.serial == serial)
                .ok_or(EnrollError::UnknownCert)?;
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
                let successor = state.certs.iter().find(|c| c.serial == renewed.serial);
                return match successor {
                    Some(cert) if cert.revoked_at.is_none() => Ok(Enrolled {
                        reissued: true,
                        ..self.enrolled(cert)
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
            let done = self.issue_and_record(state, agent, hosts, &public_key, ttl, now)?;
            let old = state
                .certs
                .iter_mut()
                .find(|c| c.serial == serial)
                .expect("found above, and pruning keeps unexpired certificates");
            old.renewed = Some(Traded {
                at: now_s,
                spki_sha256: spki,
                serial: done.serial.clone(),
            });
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
        if req.csr_pem.len() > MAX_CSR_LEN {
            return Err(EnrollError::BadCsr(format!(
                "it is larger than {MAX_CSR_LEN} bytes"
            )));
        }
        let public_key = csr_public_key(req.csr_pem)?;
        let spki = hex::encode(Pin::from_spki(&public_key.subject_public_key_info()).as_bytes());
        let presented = req.secret.hash();
        let now_s = now.unix_timestamp();

        self.state.update(|state: &mut State| {
            let token = state
                .tokens
                .iter()
                .find(|t| t.id == req.token_id)
                .ok_or(EnrollError::UnknownToken)?;
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
                let earlier = state
                    .certs
                    .iter()
                    .find(|c| retry && c.serial == used.serial && c.revoked_at.is_none());
                return match earlier {
                    Some(cert) => Ok(Enrolled {
                        reissued: true,
                        ..self.enrolled(cert)
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
            let done =
                self.issue_and_record(state, agent.clone(), served, &public_key, ttl, now)?;
            let token = state
                .tokens
                .iter_mut()
                .find(|t| t.id == req.token_id)
                .expect("token found above");
            token.used = Some(Traded {
                at: now_s,
                spki_sha256: spki,
                serial: done.serial.clone(),
            });
            if !connect.is_empty() {
                let rules = state.access.entry(agent.clone()).or_default();
                for name in connect {
                    if !rules.contains(&name) {
                        rules.push(name);
                    }
                }
            }
            state.agents.insert(agent, AgentGrant { hosts, private });
            Ok(done)
        })
    }

    /// Issues an agent certificate and records it in `state` (the caller's `update`
    /// writes it out before anyone sees the certificate).
    pub(crate) fn issue_and_record(
        &self,
        state: &mut State,
        agent: String,
        hosts: Vec<String>,
        public_key: &impl PublicKeyData,
        ttl: Duration,
        now: OffsetDateTime,
    ) -> Result<Enrolled, CaError> {
        let (pem, serial, not_after) =
            self.issue_agent_cert(&agent, &hosts, public_key, ttl, now)?;
        state.prune(now.unix_timestamp());
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
        state.certs.push(record);
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
    /// `identity`, DNS names `hosts`, EKU clientAuth, not a CA, valid from [`BACKDATE`]
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
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        let mut sans = vec![SanType::URI(identity.to_string().try_into()?)];
        for host in hosts {
            sans.push(SanType::DnsName(host.clone().try_into()?));
        }
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = now - BACKDATE;
        params.not_after = now + ttl;
        let serial = random_serial();
        let serial_hex = hex::encode(&serial.to_bytes());
        params.serial_number = Some(serial);
        let cert = params.signed_by(public_key, &self.issuer()?)?;
        Ok((cert.pem(), serial_hex, params.not_after.unix_timestamp()))
    }
}

/// An agent's public key, taken from a CSR.
struct CsrKey(Vec<u8>);

impl PublicKeyData for CsrKey {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

/// Verifies a PEM CSR's signature (the requester holds the key) and returns its public
/// key, which must be ECDSA P-256. Everything else in the CSR is ignored.
fn csr_public_key(pem: &str) -> Result<CsrKey, EnrollError> {
    let der = pem_to_der(pem, "CERTIFICATE REQUEST")
        .ok_or_else(|| EnrollError::BadCsr("it is not a PEM CERTIFICATE REQUEST".to_string()))?;
    csr_der_public_key(&der)
}

/// [`csr_public_key`] once the PEM armour is off.
fn csr_der_public_key(der: &[u8]) -> Result<CsrKey, EnrollError> {
    use x509_parser::prelude::FromDer;
    const EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
    const P256: &str = "1.2.840.10045.3.1.7";
    let bad = |m: &str| EnrollError::BadCsr(m.to_string());
    let (rest, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(der)
        .map_err(|_| bad("it is not a valid PKCS#10 request"))?;
    if !rest.is_empty() {
        return Err(bad("it has trailing bytes"));
    }
    csr.verify_signature()
        .map_err(|_| bad("its signature does not verify"))?;
    let spki = &csr.certification_request_info.subject_pki;
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok())
        .map(|o| o.to_id_string());
    if spki.algorithm.algorithm.to_id_string() != EC_PUBLIC_KEY || curve.as_deref() != Some(P256) {
        return Err(bad("its key is not ECDSA P-256"));
    }
    Ok(CsrKey(spki.subject_public_key.data.to_vec()))
}

/// A positive serial of 159 random bits (RFC 5280 allows up to 20 bytes).
pub(crate) fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 20];
    SystemRandom::new()
        .fill(&mut bytes)
        .expect("the OS random number generator failed");
    bytes[0] = (bytes[0] & 0x7f) | 0x40; // positive, and exactly 20 bytes long
    SerialNumber::from_slice(&bytes)
}

/// For the fuzz targets: whether a CSR, as PEM and as DER, is one enrollment takes.
#[cfg(fuzzing)]
pub fn csr_is_acceptable(pem: &str, der: &[u8]) -> (bool, bool) {
    (csr_public_key(pem).is_ok(), csr_der_public_key(der).is_ok())
}
