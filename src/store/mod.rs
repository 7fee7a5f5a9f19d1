//! Opening the CA state's [`Store`]: the file store in the state directory (the default),
//! or PostgreSQL (`postgres://...`), which several proxies can share.
//!
//! The [`Store`] trait and the file store are in the `ca` crate; the PostgreSQL store is
//! here because it needs sockets, TLS and an async runtime, which the `ca` crate does
//! without.

mod postgres;
mod tls;

use std::path::Path;
use std::sync::Arc;

use revproxy_ca::state::StateFile;
use revproxy_ca::Store;

pub use postgres::{PgStore, SCHEMA_VERSION};

/// Why a store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid store URL: {0}")]
    Url(String),
    #[error(transparent)]
    Ca(#[from] revproxy_ca::CaError),
}

/// Opens the CA whose key is in `dir` and whose state is in the store `url` names (the
/// file store of `dir` when there is none).
pub fn open_ca(dir: &Path, url: Option<&str>) -> Result<revproxy_ca::Ca, StoreError> {
    Ok(match url {
        None => revproxy_ca::Ca::open(dir)?,
        Some(_) => revproxy_ca::Ca::open_in(dir, open(dir, url)?)?,
    })
}

/// The store `url` names, or the file store of `dir` when there is none.
pub fn open(dir: &Path, url: Option<&str>) -> Result<Arc<dyn Store>, StoreError> {
    match url {
        None => Ok(Arc::new(StateFile::new(dir))),
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            Ok(Arc::new(PgStore::open(url)?))
        }
        Some(_) => Err(StoreError::Url(
            "expected postgres://USER@HOST/DATABASE (the state directory's file store needs no URL)"
                .into(),
        )),
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

/// Copies the state of the file store in `from` into the empty store at `to`, then renames
/// `state.json` to [`MIGRATED_FILE`](revproxy_ca::state::MIGRATED_FILE) under the
/// directory's lock, so that a proxy started later without `--store` refuses to serve from
/// the stale copy. The CA itself (its key) stays in `from`.
pub fn migrate(from: &Path, to: &str) -> Result<Migrated, StoreError> {
    let ca = revproxy_ca::Ca::open(from)?;
    let target = open(from, Some(to))?;
    let file = StateFile::new(from);
    let _lock = file.lock()?;
    let mut state = file.read()?;
    state.ca_pin = Some(ca.pin().to_string());
    target.create(&state)?;
    let (old, new) = (file.path(), from.join(revproxy_ca::state::MIGRATED_FILE));
    std::fs::rename(&old, &new).map_err(|e| revproxy_ca::CaError::Io {
        path: old.clone(),
        source: e,
    })?;
    Ok(Migrated {
        tokens: state.tokens.len(),
        certs: state.certs.len(),
        agents: state.agents.len(),
        store: target.describe(),
    })
}
