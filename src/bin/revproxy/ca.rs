//! `revproxy ca init`, and the notes printed whenever a CA is created (here or by `serve`).

use clap::Subcommand;
use revproxy::ca::{self, Ca, InitOptions};
use time::OffsetDateTime;

use crate::state::{store_failure, StateArg};
use crate::Failure;

#[derive(Subcommand)]
pub(crate) enum CaCommand {
    /// Create the CA and the proxy's server certificate.
    Init {
        #[command(flatten)]
        state: StateArg,
        /// DNS name or IP address agents use to reach the proxy (repeatable) [default: localhost, 127.0.0.1]
        #[arg(long = "san", value_name = "NAME")]
        sans: Vec<String>,
        /// SPIFFE trust domain of agent identities
        #[arg(long, value_name = "NAME", default_value = ca::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
    },
}

impl CaCommand {
    pub(crate) fn run(self, now: OffsetDateTime) -> Result<(), Failure> {
        match self {
            CaCommand::Init {
                state,
                sans,
                trust_domain,
            } => {
                let dir = state.dir();
                let mut opts = InitOptions {
                    trust_domain,
                    ..InitOptions::default()
                };
                if !sans.is_empty() {
                    opts.sans = sans;
                }
                let store =
                    revproxy::store::open(&dir, state.store.as_deref()).map_err(store_failure)?;
                let ca = Ca::init_in(&dir, store, &opts, now)?;
                println!("{}", ca.pin());
                print_init_notes(&ca);
            }
        }
        Ok(())
    }
}

/// Where the new CA is, its pin, what to back up and the next command (on stderr).
pub(crate) fn print_init_notes(ca: &Ca) {
    eprintln!(
        "CA created in {dir}\n  CA pin: {pin}\n  Back up {dir}/ca.key now: if it is lost, every agent must enroll again.\n  Next: revproxy token create --state {dir} --name AGENT --host NAME",
        dir = ca.dir().display(),
        pin = ca.pin()
    );
}
