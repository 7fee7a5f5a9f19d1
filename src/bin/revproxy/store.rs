//! `revproxy store migrate`: a stopped proxy's CA state from its directory into PostgreSQL.

use std::path::{Path, PathBuf};

use clap::Subcommand;
use revproxy::ca;

use anyhow::anyhow;
use revproxy::runtime::handover::SOCKET_NAME;

use crate::state::store_failure;
use crate::Failure;

#[derive(Subcommand)]
pub(crate) enum StoreCommand {
    /// Copy the state of a stopped proxy's state directory into an empty PostgreSQL store
    /// (nobody enrolls again), and rename its state.db so that nothing serves from the old
    /// copy. Refused while a proxy serves on that directory.
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
    /// Write a consistent copy of the state directory's store (state.db) to FILE, also
    /// while a proxy serves from it: a backup. To restore it, stop the proxy and copy it
    /// back as state.db.
    Backup {
        #[command(flatten)]
        state: crate::state::StateArg,
        /// Where to write the copy (must not exist; made readable by its owner only)
        #[arg(long, value_name = "FILE")]
        to: PathBuf,
    },
}

impl StoreCommand {
    pub(crate) fn run(self) -> Result<(), Failure> {
        match self {
            StoreCommand::Migrate { from, to } => {
                refuse_while_served(&from)?;
                let moved = revproxy::store::migrate(&from, &to).map_err(store_failure)?;
                eprintln!(
                    "moved {} tokens, {} certificates and {} agents from {} to {}; {} is the old copy, kept as a backup\n  Next: revproxy serve --state {} --store URL (or REVPROXY_STORE)",
                    moved.tokens, moved.certs, moved.agents, from.display(), moved.store,
                    from.join(ca::sqlite::MIGRATED_FILE).display(), from.display()
                );
            }
            StoreCommand::Backup { state, to } => {
                if state.store.is_some() {
                    return Err(Failure::usage(anyhow!(
                        "store backup copies the state directory's own store; back up a PostgreSQL store with the database's tools (pg_dump)"
                    )));
                }
                let dir = state.dir();
                let copied = ca::sqlite::SqliteStore::new(&dir).backup(&to)?;
                eprintln!(
                    "copied the state of {} ({} records) to {}\n  To restore: stop the proxy, then copy it to {}",
                    dir.display(),
                    copied,
                    to.display(),
                    dir.join(ca::sqlite::DB_FILE).display()
                );
            }
        }
        Ok(())
    }
}

/// Refuses while a `revproxy serve` serves on `dir`: it answers on its upgrade socket
/// there for as long as it runs (a socket file left by a process that died answers nothing
/// and does not count). Migrating under it would leave it serving a state nobody changes
/// any more, and ready.
fn refuse_while_served(dir: &Path) -> Result<(), Failure> {
    let socket = dir.join(SOCKET_NAME);
    match std::os::unix::net::UnixStream::connect(&socket) {
        Ok(_) => Err(Failure::from(anyhow!(
            "a proxy is serving on {} (it answers on {}); stop it first (systemctl stop revproxy, or end that `revproxy serve`), migrate, then start it with --store URL",
            dir.display(),
            socket.display()
        ))),
        // No socket, or one nobody listens on any more: nothing serves here.
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(Failure::from(anyhow!(
            "cannot tell whether a proxy serves on {}: cannot connect to {}: {e}; run this as the user the proxy runs as",
            dir.display(),
            socket.display()
        ))),
    }
}
