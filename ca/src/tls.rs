//! Names whose TLS the proxy terminates (DESIGN.md section 10): marked and unmarked by the
//! operator, listed, and the certificates they are served with, their keys sealed
//! ([`Sealer`]). Which names may be terminated: exact names that some agent is granted
//! for public serving (by its grant, or by a token not yet spent), never a private one.

use crate::ca::Ca;
use crate::cert::CertSummary;
use crate::error::CaError;
use crate::names::{name_matches, normalize_hosts};
use crate::seal::Sealer;
use crate::state::{TlsRecord, TlsSource, Unix};
use crate::tokens::{token_state, TokenState};

/// An operator's own certificate and key (`tls terminate --cert --key`), as read from
/// their files. The caller has checked that the key is the certificate's.
pub struct OwnCert {
    /// The chain, the name's certificate first (PEM).
    pub chain_pem: String,
    pub key_pem: String,
    /// Where they were read from (absolute): a proxy that can read them follows changes.
    pub cert_path: String,
    pub key_path: String,
}

/// What the associated data of a terminated name's sealed key says.
pub fn tls_key_purpose(name: &str) -> String {
    format!("tls-key:{name}")
}

/// Why `chain_pem` cannot be served for `names` at `now`, if it cannot; else its expiry.
pub fn check_own_cert(chain_pem: &str, names: &[String], now: Unix) -> Result<Unix, CaError> {
    let leaf = CertSummary::from_pem(chain_pem).ok_or_else(|| {
        CaError::InvalidInput("the certificate file holds no readable certificate".into())
    })?;
    for name in names {
        if !leaf.dns_names.iter().any(|p| name_matches(p, name)) {
            return Err(CaError::InvalidInput(format!(
                "the certificate is not for {name} (it names {})",
                leaf.dns_names.join(", ")
            )));
        }
    }
    if leaf.not_after <= now {
        let at = time::OffsetDateTime::from_unix_timestamp(leaf.not_after)
            .ok()
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_else(|| leaf.not_after.to_string());
        return Err(CaError::InvalidInput(format!(
            "the certificate expired at {at}"
        )));
    }
    Ok(leaf.not_after)
}

impl Ca {
    /// The sealer of this CA's private values in the store.
    pub fn sealer(&self) -> Sealer {
        Sealer::new(&self.key.serialize_der())
    }

    /// Terminates TLS for `names` at the proxies: with `own`, the operator's certificate;
    /// without, one ordered from ACME. `keep_http`: plain HTTP to them is not redirected.
    /// Refuses (changing nothing) a wildcard, a name no agent is granted for public
    /// serving, a private name, and a certificate that does not cover every name.
    pub fn tls_terminate(
        &self,
        names: &[String],
        own: Option<&OwnCert>,
        keep_http: bool,
        now: Unix,
    ) -> Result<Vec<TlsRecord>, CaError> {
        let names = normalize_hosts(names)?;
        if let Some(wild) = names.iter().find(|n| n.starts_with("*.")) {
            return Err(CaError::InvalidInput(format!(
                "{wild} is a wildcard: only exact names are terminated (each gets its own certificate)"
            )));
        }
        let not_after = own
            .map(|own| check_own_cert(&own.chain_pem, &names, now))
            .transpose()?;
        self.check_terminable(&names, now)?;
        let sealer = self.sealer();
        let mut records = Vec::new();
        for name in &names {
            let (source, chain_pem, key_sealed) = match own {
                Some(own) => (
                    TlsSource::File {
                        cert: own.cert_path.clone(),
                        key: own.key_path.clone(),
                    },
                    Some(own.chain_pem.clone()),
                    Some(sealer.seal(&tls_key_purpose(name), own.key_pem.as_bytes())?),
                ),
                None => (TlsSource::Acme, None, None),
            };
            records.push(TlsRecord {
                name: name.clone(),
                source,
                keep_http,
                chain_pem,
                key_sealed,
                not_after,
                last_error: None,
                updated: now,
                acme: Default::default(),
            });
        }
        self.state.update(|tx| {
            let mut out = Vec::new();
            for mut record in records.clone() {
                // Asked again for ACME: the certificate it has is kept.
                if let (TlsSource::Acme, Some(old)) = (&record.source, tx.tls(&record.name)?) {
                    if old.source == TlsSource::Acme {
                        // Asked again: ordered at once, whatever the backoff.
                        let mut acme = old.acme.clone();
                        (acme.failures, acme.retry_at) = (0, None);
                        record = TlsRecord {
                            keep_http: record.keep_http,
                            updated: now,
                            acme,
                            ..old
                        };
                    }
                }
                tx.put_tls(record.clone())?;
                out.push(record);
            }
            Ok(out)
        })
    }

    /// Refuses names that no agent is granted for public serving, and private names.
    fn check_terminable(&self, names: &[String], now: Unix) -> Result<(), CaError> {
        let (mut public, mut private) = (vec![false; names.len()], vec![false; names.len()]);
        self.state.look(|tx| {
            let mark = |hosts: &[String], marks: &mut Vec<bool>| {
                for (i, name) in names.iter().enumerate() {
                    marks[i] |= hosts.iter().any(|p| name_matches(p, name));
                }
            };
            tx.each_grant(&mut |_, grant| {
                mark(&grant.hosts, &mut public);
                mark(&grant.private, &mut private);
                true
            })?;
            tx.each_token(&mut |t| {
                if token_state(&t, now) == TokenState::Open {
                    mark(&t.hosts, &mut public);
                    mark(&t.private_hosts, &mut private);
                }
                true
            })
        })?;
        for (i, name) in names.iter().enumerate() {
            if private[i] {
                return Err(CaError::InvalidInput(format!(
                    "{name} is a private name (served only through the mesh): it is never served on a public listener, so there is no TLS to terminate"
                )));
            }
            if !public[i] {
                return Err(CaError::InvalidInput(format!(
                    "no agent is granted {name}: grant it first (`revproxy token create --host {name}`, or `revproxy agent set-hosts AGENT {name}`)"
                )));
            }
        }
        Ok(())
    }

    /// Passes `names` through again (end to end); refuses, changing nothing, if one of
    /// them is not terminated.
    pub fn tls_passthrough(&self, names: &[String]) -> Result<Vec<String>, CaError> {
        let names = normalize_hosts(names)?;
        self.state.update(|tx| {
            for name in &names {
                if tx.tls(name)?.is_none() {
                    return Err(CaError::InvalidInput(format!(
                        "{name} is not terminated (it is passed through already); `revproxy tls list` shows the terminated names"
                    )));
                }
            }
            for name in &names {
                tx.remove_tls(name)?;
            }
            Ok(names.clone())
        })
    }

    /// Calls `each` with every terminated name's record, by name; stops at the first error
    /// `each` returns.
    pub fn each_tls<E: From<CaError> + Send>(
        &self,
        mut each: impl FnMut(TlsRecord) -> Result<(), E> + Send,
    ) -> Result<(), E> {
        let mut failed = None;
        let mut one = |r: TlsRecord| each(r).map_err(|e| failed = Some(e)).is_ok();
        self.state.look(|tx| tx.each_tls(&mut one))?;
        failed.map_or(Ok(()), Err)
    }
}

impl Ca {
    /// Serves `own` for `name` from now on, read again from the operator's files; `false`
    /// (nothing written) when the record already holds that chain or one that expires
    /// later, or `name` is no longer terminated with those files.
    pub fn tls_reload(&self, name: &str, own: &OwnCert, now: Unix) -> Result<bool, CaError> {
        let not_after = check_own_cert(&own.chain_pem, &[name.to_string()], now)?;
        let key_sealed = self
            .sealer()
            .seal(&tls_key_purpose(name), own.key_pem.as_bytes())?;
        self.state.update(|tx| {
            let Some(old) = tx.tls(name)? else {
                return Ok(false);
            };
            let same_files = old.source
                == TlsSource::File {
                    cert: own.cert_path.clone(),
                    key: own.key_path.clone(),
                };
            // Another proxy's older copy of the files does not replace a newer
            // certificate (a renewal reaches the store from whichever proxy saw it).
            let older = old.not_after.is_some_and(|had| not_after < had);
            if !same_files || older || old.chain_pem.as_deref() == Some(own.chain_pem.as_str()) {
                return Ok(false);
            }
            tx.put_tls(TlsRecord {
                chain_pem: Some(own.chain_pem.clone()),
                key_sealed: Some(key_sealed.clone()),
                not_after: Some(not_after),
                last_error: None,
                updated: now,
                ..old
            })?;
            Ok(true)
        })
    }

    /// Notes why `name`'s certificate could not be renewed or reloaded (`tls list` shows
    /// it); the certificate it has is kept.
    pub fn tls_failed(&self, name: &str, error: &str, now: Unix) -> Result<(), CaError> {
        self.state.update(|tx| {
            let Some(old) = tx.tls(name)? else {
                return Ok(());
            };
            if old.last_error.as_deref() == Some(error) {
                return Ok(());
            }
            tx.put_tls(TlsRecord {
                last_error: Some(error.to_string()),
                updated: now,
                ..old
            })
        })
    }
}
