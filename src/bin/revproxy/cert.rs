//! `revproxy cert list|revoke`: agents' certificates (operators' are in `operator.rs`).

use clap::Subcommand;
use time::OffsetDateTime;

use crate::state::StateArg;
use crate::{report_revoked, Failure};

#[derive(Subcommand)]
pub(crate) enum CertCommand {
    /// List issued certificates with their state.
    List(StateArg),
    /// Revoke a certificate by serial, or every certificate of an agent.
    Revoke {
        #[command(flatten)]
        state: StateArg,
        /// Serial (hex, as `cert list` shows it) or agent name
        #[arg(value_name = "SERIAL_OR_AGENT")]
        what: String,
    },
}

impl CertCommand {
    pub(crate) fn run(self, now: OffsetDateTime) -> Result<(), Failure> {
        match self {
            CertCommand::List(state) => {
                let ca = state.open()?;
                println!(
                    "{:<40}  {:<20}  {:<8}  {:<20}  {:<20}  HOSTS",
                    "SERIAL", "AGENT", "STATE", "NOT BEFORE", "NOT AFTER"
                );
                for c in ca.list_certs(now)? {
                    println!(
                        "{:<40}  {:<20}  {:<8}  {:<20}  {:<20}  {}",
                        c.serial,
                        c.agent,
                        c.state.as_str(),
                        revproxy::runtime::rfc3339(c.not_before),
                        revproxy::runtime::rfc3339(c.not_after),
                        c.hosts.join(",")
                    );
                }
            }
            CertCommand::Revoke { state, what } => {
                report_revoked(&what, &state.open()?.revoke_certs(&what, now)?);
            }
        }
        Ok(())
    }
}
