//! The `--state`/`--store` flags of the CA commands, and the exit status of a store failure.

use std::path::PathBuf;

use clap::Args;
use revproxy::ca::Ca;
use revproxy::store::StoreError;

use crate::Failure;

#[derive(Args)]
pub(crate) struct StateArg {
    /// State directory [default: per-user data directory, e.g. ~/.local/share/revproxy]
    #[arg(long, env = "REVPROXY_STATE", value_name = "DIR")]
    pub(crate) state: Option<PathBuf>,
    /// Where the CA state lives when not in the state directory: postgres://USER@HOST/DB
    /// (shared by several proxies; the CA key stays in the state directory)
    #[arg(
        long,
        env = "REVPROXY_STORE",
        value_name = "URL",
        hide_env_values = true
    )]
    pub(crate) store: Option<String>,
}

impl StateArg {
    pub(crate) fn dir(&self) -> PathBuf {
        self.state
            .clone()
            .unwrap_or_else(revproxy::runtime::dirs::proxy_state_dir)
    }

    /// The CA of the state directory, with its state from the store.
    pub(crate) fn open(&self) -> Result<Ca, Failure> {
        revproxy::store::open_ca(&self.dir(), self.store.as_deref()).map_err(store_failure)
    }
}

/// A store that cannot be opened: a bad URL is a usage error (2), the rest runtime (1).
pub(crate) fn store_failure(e: StoreError) -> Failure {
    match e {
        StoreError::Url(_) => Failure::usage(e),
        StoreError::Ca(e) => e.into(),
    }
}
