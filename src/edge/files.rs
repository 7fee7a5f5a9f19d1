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
/// Largest certificate or key file read.
const MAX_PEM_FILE: u64 = 1024 * 1024;

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
            let Some(now) = look(&cert, &key) else {
                continue; // not readable from here
            };
            if seen.get(&name) == Some(&now) {
                continue;
            }
            let (on, n, c, k) = (ca.clone(), name.clone(), cert.clone(), key.clone());
            let reloaded = tokio::task::spawn_blocking(move || reload(&on, &n, &c, &k)).await;
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
    let read = |path: &str| -> Result<String, Refused> {
        let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        if size > MAX_PEM_FILE {
            return Err(Refused::Files(format!("{path} is {size} bytes, too large")));
        }
        std::fs::read_to_string(path)
            .map_err(|e| Refused::Files(format!("cannot read {path}: {e}")))
    };
    let own = OwnCert {
        chain_pem: read(cert)?,
        key_pem: read(key)?,
        cert_path: cert.to_string(),
        key_path: key.to_string(),
    };
    crate::tls::check_cert_and_key(&own.chain_pem, &own.key_pem)
        .map_err(|e| Refused::Files(format!("{cert} and {key} cannot be served together: {e}")))?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    ca.tls_reload(name, &own, now).map_err(|e| match e {
        revproxy_ca::CaError::InvalidInput(e) => Refused::Files(e),
        e => Refused::Store(e.to_string()),
    })
}
