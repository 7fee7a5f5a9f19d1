//! `revproxy check`: validates a configuration file as `serve` reads it; binds nothing.

use std::path::PathBuf;

use clap::Args;
use revproxy::ca;
use revproxy::config::ProxyConfig;

use crate::serve::reload_from;
use crate::Failure;

#[derive(Args)]
pub(crate) struct CheckArgs {
    /// The TOML configuration file
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
}

impl CheckArgs {
    /// Exit 0 if `serve --config FILE` would accept the file, 2 with the reason if not.
    pub(crate) fn run(self) -> Result<(), Failure> {
        let file = ProxyConfig::load(&self.config).map_err(Failure::usage)?;
        // What a reload would apply, then what only a start reads.
        let reload = reload_from(&file).map_err(Failure::usage)?;
        if let Some(url) = &file.store {
            revproxy::store::check_url(&url.0).map_err(Failure::usage)?;
        }
        if let Some(addr) = &file.advertise {
            ca::validate_server(addr).map_err(Failure::usage)?;
        }
        eprintln!(
            "{} is valid: {} public listener(s), {} route(s)",
            self.config.display(),
            reload.listeners.len(),
            reload.routes.len()
        );
        Ok(())
    }
}
