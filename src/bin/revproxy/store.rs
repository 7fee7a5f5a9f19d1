//! `revproxy store migrate`: a stopped proxy's CA state from its directory into PostgreSQL.

use std::path::PathBuf;

use clap::Subcommand;
use revproxy::ca;

use crate::state::store_failure;
use crate::Failure;

#[derive(Subcommand)]
pub(crate) enum StoreCommand {
    /// Copy the state of a stopped proxy's state directory into an empty PostgreSQL store
    /// (nobody enrolls again), and rename its state.json so that nothing serves from the
    /// old copy.
    Migrate {
        /// The state directory to move from
        #[arg(long, value_name = "DIR")]
        from: PathBuf,
        /// The store to move to: postgres://USER@HOST/DB
        #[arg(
            long,
            value_name = "URL",
            env = "REVPROXY_STORE",
            hide_env_values = true
        )]
        to: String,
    },
}

impl StoreCommand {
    pub(crate) fn run(self) -> Result<(), Failure> {
        match self {
            StoreCommand::Migrate { from, to } => {
                let moved = revproxy::store::migrate(&from, &to).map_err(store_failure)?;
                eprintln!(
                    "moved {} tokens, {} certificates and {} agents from {} to {}; {} is the old copy, kept as a backup\n  Next: revproxy serve --state {} --store URL (or REVPROXY_STORE)",
                    moved.tokens, moved.certs, moved.agents, from.display(), moved.store,
                    from.join(ca::state::MIGRATED_FILE).display(), from.display()
                );
            }
        }
        Ok(())
    }
}
