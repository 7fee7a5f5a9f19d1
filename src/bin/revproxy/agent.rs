//! `revproxy agent set-hosts`: the names an enrolled agent may serve, without a new certificate.

use clap::Subcommand;
use time::OffsetDateTime;

use crate::state::StateArg;
use crate::{names_or_nothing, note_private_under_public, Failure};

#[derive(Subcommand)]
pub(crate) enum AgentCommand {
    /// Set the names AGENT may serve (only names in its certificate take effect); live
    /// tunnels follow within seconds, without reconnecting.
    SetHosts {
        #[command(flatten)]
        state: StateArg,
        /// Agent name
        #[arg(value_name = "AGENT")]
        agent: String,
        /// Names it may serve from now on (none: it serves nothing)
        #[arg(value_name = "NAME")]
        hosts: Vec<String>,
    },
}

impl AgentCommand {
    pub(crate) fn run(self, now: OffsetDateTime) -> Result<(), Failure> {
        match self {
            AgentCommand::SetHosts {
                state,
                agent,
                hosts,
            } => {
                let ca = state.open()?;
                let hosts = ca.set_hosts(&agent, &hosts)?;
                eprintln!("{agent} may now serve: {}", names_or_nothing(&hosts));
                note_private_under_public(&ca, now, &hosts);
            }
        }
        Ok(())
    }
}
