//! The TLS configuration of each terminated name, built from its record when a client
//! first asks for it and kept while the record is unchanged: opening the sealed key and
//! checking it against the certificate takes a fraction of a millisecond, a handshake
//! should not pay it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use revproxy_ca::state::TlsRecord;
use revproxy_ca::{tls_key_purpose, Sealer};

use crate::tls::{certs_from_pem, key_from_pem, provider, ALPN_H2, ALPN_HTTP1};

/// A record and what was built from it: its configurations, or why there are none (kept
/// too, so that clients of a name whose record is broken do not each pay for finding out).
type Built = (Arc<TlsRecord>, Result<Arc<Configs>, String>);

/// A terminated name's TLS configurations, one certificate: offering `http/1.1` (the
/// default), or `h2` first as well (for a service that speaks h2c).
pub(crate) struct Configs {
    pub(crate) http1: Arc<rustls::ServerConfig>,
    pub(crate) h2: Arc<rustls::ServerConfig>,
}

/// Terminated names' configurations, by name.
pub(crate) struct Terminator {
    sealer: Sealer,
    built: Mutex<HashMap<String, Built>>,
    /// The certificates answering pending TLS-ALPN-01 challenges.
    challenges: super::acme::ChallengeCerts,
}

impl std::fmt::Debug for Terminator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Terminator").finish_non_exhaustive()
    }
}

impl Terminator {
    pub(crate) fn new(sealer: Sealer) -> Terminator {
        Terminator {
            sealer,
            built: Mutex::default(),
            challenges: Default::default(),
        }
    }

    /// The answer to `record`'s pending ACME challenge, if the connection that sent
    /// `first` (its ClientHello when `tls`, else its HTTP request head) asks for it.
    pub(crate) fn challenge(
        &self,
        record: Option<&Arc<TlsRecord>>,
        tls: bool,
        first: &[u8],
    ) -> Option<super::Answer> {
        self.challenges.answer(record?, tls, first)
    }

    /// The configuration that serves `record`'s certificate, or why there is none (no
    /// certificate yet, a key that does not open or does not match). What is kept for
    /// names `is_terminated` no longer says are terminated goes (their keys with it).
    pub(crate) fn config(
        &self,
        record: &Arc<TlsRecord>,
        is_terminated: impl Fn(&str) -> bool,
    ) -> Result<Arc<Configs>, String> {
        if let Some((seen, built)) =
            (self.built.lock().expect("terminator lock")).get_mut(&record.name)
        {
            if Arc::ptr_eq(seen, record) {
                return built.clone();
            }
            // The same record read again (a whole-state read makes new ones): kept, and
            // the next handshake finds it by pointer.
            if **seen == **record {
                *seen = record.clone();
                return built.clone();
            }
        }
        let built = self.build(record).map(Arc::new);
        let mut all = self.built.lock().expect("terminator lock");
        all.retain(|name, _| is_terminated(name));
        all.insert(record.name.clone(), (record.clone(), built.clone()));
        built
    }

    fn build(&self, record: &TlsRecord) -> Result<Configs, String> {
        let name = &record.name;
        let (Some(chain), Some(sealed)) = (&record.chain_pem, &record.key_sealed) else {
            return Err(format!("{name} has no certificate yet"));
        };
        let key_pem = self
            .sealer
            .open(&tls_key_purpose(name), sealed)
            .map_err(|e| e.to_string())?;
        let key_pem =
            String::from_utf8(key_pem).map_err(|_| format!("the key of {name} is not PEM"))?;
        let what = format!("the certificate of {name}");
        let chain = certs_from_pem(chain, &what).map_err(|e| e.to_string())?;
        let key = key_from_pem(&key_pem, &what).map_err(|e| e.to_string())?;
        let certified = rustls::sign::CertifiedKey::from_der(chain, key, &provider())
            .map_err(|e| format!("{what}: {e}"))?;
        let mut config = rustls::ServerConfig::builder_with_provider(crate::tls::suites_by_speed())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified)));
        config.ignore_client_order = true;
        let mut h2 = config.clone();
        config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
        h2.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()];
        let http1 = Arc::new(config);
        // h2 only with a certificate for this name alone: browsers send an h2 connection's
        // requests for any other name its certificate covers down the same connection,
        // which would reach this name's backend.
        let leaf = revproxy_ca::CertSummary::from_pem(record.chain_pem.as_deref().unwrap_or(""));
        let alone = leaf.is_some_and(|l| l.dns_names == [name.to_string()] && l.ips.is_empty());
        Ok(Configs {
            h2: if alone { Arc::new(h2) } else { http1.clone() },
            http1,
        })
    }
}
