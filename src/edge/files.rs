//! The operator's own certificates (`tls terminate --cert --key`) followed on disk: a
//! proxy that can read a name's files checks them every [`FILE_CHECK`] and, when they
//! hold a new certificate and its key, puts them in the store, so that every proxy
//! serves them (certbot's renewal hook, or a copy by hand, is enough). A proxy that cannot
//! read them (another host) leaves that to one that can.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use revproxy_ca::state::{TlsRecord, TlsSource};
use revproxy_ca::{Ca, OwnCert};
use tracing::{debug, info, warn};

/// How often the files are looked at (their size and modification time; they are read
/// only when those change).
pub(crate) const FILE_CHECK: Duration = Duration::from_secs(2);
/// Longest a look at one name's files may take (a hung network mount): the others are
/// looked at meanwhile, and it is tried again later.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// What a name's files looked like when last read.
#[derive(Clone, PartialEq, Eq)]
struct Seen {
    cert: (SystemTime, u64),
    key: (SystemTime, u64),
}

/// Follows the files of every terminated name `records` lists, until dropped.
pub(crate) async fn follow_files(
    ca: Arc<Ca>,
    records: impl Fn() -> Vec<Arc<TlsRecord>> + Send + 'static,
) {
    let mut tick = tokio::time::interval(FILE_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen: HashMap<String, Seen> = HashMap::new();
    // A pair that did not go together once: a second look before it counts as an error
    // (the files are often written one after the other).
    let mut mismatched: HashMap<String, String> = HashMap::new();
    loop {
        tick.tick().await;
        let files: Vec<(String, String, String)> = (records().iter())
            .filter_map(|r| match &r.source {
                TlsSource::File { cert, key } => Some((r.name.clone(), cert.clone(), key.clone())),
                TlsSource::Acme => None,
            })
            .collect();
        seen.retain(|name, _| files.iter().any(|(n, _, _)| n == name));
        for (name, cert, key) in files {
            let (c, k) = (cert.clone(), key.clone());
            let looked = tokio::task::spawn_blocking(move || look(&c, &k));
            let Ok(Ok(Some(now))) = tokio::time::timeout(READ_TIMEOUT, looked).await else {
                continue; // not readable from here
            };
            if seen.get(&name) == Some(&now) {
                continue;
            }
            let (on, n, c, k) = (ca.clone(), name.clone(), cert.clone(), key.clone());
            let reloading = tokio::task::spawn_blocking(move || reload(&on, &n, &c, &k));
            let Ok(reloaded) = tokio::time::timeout(READ_TIMEOUT, reloading).await else {
                warn!(host = %name, cert = %cert, "reading the certificate files took more than {READ_TIMEOUT:?}; will try again");
                continue;
            };
            match reloaded {
                Ok(Ok(true)) => {
                    info!(host = %name, cert = %cert, "certificate reloaded from its files")
                }
                Ok(Ok(false)) => debug!(host = %name, "certificate files unchanged"),
                Ok(Err(Refused::Files(e))) => {
                    if mismatched.get(&name) != Some(&e) {
                        mismatched.insert(name.clone(), e);
                        continue; // looked at again next time
                    }
                    warn!(host = %name, cert = %cert, error = %e, "cannot serve the certificate files; keeping the certificate served now");
                    let (ca, n) = (ca.clone(), name.clone());
                    let _ = tokio::task::spawn_blocking(move || {
                        ca.tls_failed(&n, &e, time::OffsetDateTime::now_utc().unix_timestamp())
                    })
                    .await;
                }
                Ok(Err(Refused::Store(e))) => {
                    warn!(host = %name, error = %e, "cannot store the reloaded certificate; will try again");
                    continue;
                }
                Err(_) => continue,
            }
            mismatched.remove(&name);
            seen.insert(name, now);
        }
    }
}

/// The size and modification time of both files, if both can be looked at.
fn look(cert: &str, key: &str) -> Option<Seen> {
    let of = |path: &str| {
        let m = std::fs::metadata(path).ok()?;
        Some((m.modified().ok()?, m.len()))
    };
    Some(Seen {
        cert: of(cert)?,
        key: of(key)?,
    })
}

/// Why the files were not taken.
enum Refused {
    /// They do not hold a certificate for the name and its key (said once).
    Files(String),
    /// The store did not take them (tried again).
    Store(String),
}

/// Reads the files and stores what they hold if it is new: whether it was.
fn reload(ca: &Ca, name: &str, cert: &str, key: &str) -> Result<bool, Refused> {
    let read = |path: &str| crate::tls::read_pem_file(path.as_ref()).map_err(Refused::Files);
    let (chain_pem, key_pem) = (read(cert)?, read(key)?);
    let chain_pem = crate::tls::check_cert_and_key(&chain_pem, &key_pem)
        .map_err(|e| Refused::Files(format!("{cert} and {key} cannot be served together: {e}")))?;
    let own = OwnCert {
        chain_pem,
        key_pem,
        cert_path: cert.to_string(),
        key_path: key.to_string(),
    };
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    ca.tls_reload(name, &own, now).map_err(|e| match e {
        revproxy_ca::CaError::InvalidInput(e) => Refused::Files(e),
        e => Refused::Store(e.to_string()),
    })
}
