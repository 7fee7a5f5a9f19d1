//! Opening the CA state's [`Store`]: the embedded store in the state directory (the
//! default, `state.db`), or PostgreSQL (`postgres://...`), which several proxies can share.
//!
//! The [`Store`] trait and the embedded store are in the `ca` crate; the PostgreSQL store is
//! here because it needs sockets, TLS and an async runtime, which the `ca` crate does
//! without.

mod postgres;

use std::path::Path;
use std::sync::Arc;

use revproxy_ca::sqlite::SqliteStore;
use revproxy_ca::Store;

pub use postgres::{PgStore, RootCertError, UrlError, SCHEMA_VERSION};

/// Why a store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Not a `source`: the CLI prints an error's chain, which would say it twice.
    #[error("invalid store URL: {0}")]
    Url(UrlError),
    #[error(transparent)]
    Ca(#[from] revproxy_ca::CaError),
}

impl From<UrlError> for StoreError {
    fn from(e: UrlError) -> Self {
        StoreError::Url(e)
    }
}

/// Opens the CA whose key is in `dir` and whose state is in the store `url` names (the
/// embedded store of `dir` when there is none). An embedded state (`state.db`, or the
/// `state.json` of an earlier release) beside a shared store is refused: nothing would
/// read it, and a command run without `--store` would change it.
pub fn open_ca(dir: &Path, url: Option<&str>) -> Result<revproxy_ca::Ca, StoreError> {
    Ok(match url {
        None => revproxy_ca::Ca::open(dir)?,
        Some(_) => {
            for file in [revproxy_ca::sqlite::DB_FILE, revproxy_ca::state::STATE_FILE] {
                let stale = dir.join(file);
                if stale.exists() {
                    return Err(revproxy_ca::CaError::StaleStateFile(stale).into());
                }
            }
            revproxy_ca::Ca::open_in(dir, open(dir, url)?)?
        }
    })
}

/// A store URL that keeps its password out of `Debug` output (and so out of logs).
#[derive(Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(transparent)]
pub struct StoreUrl(pub String);

impl std::fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", redact(&self.0))
    }
}

/// `url` without the password between `user:` and `@`.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.split_once('@') {
        Some((user, host)) if user.contains(':') => {
            let name = user.split(':').next().unwrap_or_default();
            format!("{scheme}://{name}:***@{host}")
        }
        _ => url.to_string(),
    }
}

/// Checks a store URL without connecting (syntax, TLS settings, the `sslrootcert` file).
pub fn check_url(url: &str) -> Result<(), StoreError> {
    PgStore::check_url(postgres(url)?)
}

/// `url` if it names PostgreSQL, the only store with a URL.
fn postgres(url: &str) -> Result<&str, StoreError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(url)
    } else {
        Err(UrlError::NotPostgres.into())
    }
}

/// The store `url` names, or the embedded store of `dir` when there is none.
pub fn open(dir: &Path, url: Option<&str>) -> Result<Arc<dyn Store>, StoreError> {
    match url {
        None => Ok(Arc::new(SqliteStore::new(dir))),
        Some(url) => Ok(Arc::new(PgStore::open(postgres(url)?)?)),
    }
}

/// What [`migrate`] moved.
#[derive(Debug)]
pub struct Migrated {
    pub tokens: usize,
    pub certs: usize,
    pub agents: usize,
    /// The store it went to, without a password.
    pub store: String,
}

/// Copies the state of the embedded store in `from` into the empty store at `to`, then
/// renames `state.db` to [`MIGRATED_FILE`](revproxy_ca::sqlite::MIGRATED_FILE) under the
/// directory's lock, so that a proxy started later without `--store` refuses to serve from
/// the stale copy (one still running finds it gone at its next call). The CA itself (its
/// key) stays in `from`. A `state.json` of an earlier release moves into `state.db` first.
pub fn migrate(from: &Path, to: &str) -> Result<Migrated, StoreError> {
    let ca = revproxy_ca::Ca::open(from)?;
    let pin = ca.pin().to_string();
    drop(ca);
    let target = open(from, Some(to))?;
    let _lock = revproxy_ca::state::StateFile::new(from).lock()?;
    let rename = |from: &Path, to: &Path| {
        std::fs::rename(from, to).map_err(|e| revproxy_ca::CaError::Io {
            path: from.to_path_buf(),
            source: e,
        })
    };
    let (aside, done) = (
        from.join(revproxy_ca::sqlite::MIGRATING_FILE),
        from.join(revproxy_ca::sqlite::MIGRATED_FILE),
    );
    // The store steps aside as it is read, under its write lock, so that no moment has
    // two live copies and no change lands in the old one: a proxy or a command that
    // starts now finds neither and refuses, and a failed copy puts it back.
    let mut state = SqliteStore::retire(from, &aside)?;
    state.ca_pin = Some(pin);
    if let Err(e) = target.create(&state) {
        SqliteStore::restore(from, &aside)?;
        return Err(e.into());
    }
    rename(&aside, &done)?;
    for side in ["-wal", "-shm"] {
        let moved = from.join(format!("{}{side}", revproxy_ca::sqlite::MIGRATING_FILE));
        if moved.exists() {
            rename(
                &moved,
                &from.join(format!("{}{side}", revproxy_ca::sqlite::MIGRATED_FILE)),
            )?;
        }
    }
    Ok(Migrated {
        tokens: state.tokens.len(),
        certs: state.certs.len(),
        agents: state.agents.len(),
        store: target.describe(),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_stay_out_of_debug_output() {
        let url = super::StoreUrl("postgres://revproxy:s3cret@db:5432/rp".into());
        let shown = format!("{url:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("revproxy:***@db:5432/rp"), "{shown}");
        assert_eq!(super::redact("postgres://u@h/d"), "postgres://u@h/d");
    }
}
