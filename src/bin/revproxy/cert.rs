//! `revproxy cert list|revoke`: agents' certificates (operators' are in `operator.rs`).

use clap::Subcommand;
use time::OffsetDateTime;

use crate::listing::{self, ListArgs, Listing};
use crate::state::StateArg;
use crate::{report_revoked, Failure};

#[derive(Subcommand)]
pub(crate) enum CertCommand {
    /// List issued certificates with their state, oldest first. JSON: {"serial",
    /// "agent", "status", "hosts", "not_before", "not_after"} (times RFC 3339).
    List(ListArgs),
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
            CertCommand::List(ListArgs { state, agent, json }) => {
                let ca = state.open()?;
                let header = format!(
                    "{:<40}  {:<20}  {:<8}  {:<20}  {:<20}  HOSTS",
                    "SERIAL", "AGENT", "STATE", "NOT BEFORE", "NOT AFTER"
                );
                let mut out = Listing::start(json, &header)?;
                ca.each_cert(now, agent.as_deref(), |c| {
                    let text = || {
                        format!(
                            "{:<40}  {:<20}  {:<8}  {:<20}  {:<20}  {}",
                            c.serial,
                            c.agent,
                            c.state.as_str(),
                            listing::time(c.not_before),
                            listing::time(c.not_after),
                            c.hosts.join(",")
                        )
                    };
                    let json = || {
                        serde_json::json!({
                            "serial": c.serial,
                            "agent": c.agent,
                            "status": c.state.as_str(),
                            "hosts": c.hosts,
                            "not_before": listing::time(c.not_before),
                            "not_after": listing::time(c.not_after),
                        })
                    };
                    out.row(text, json).map_err(Failure::from)
                })?;
                out.finish()?;
            }
            CertCommand::Revoke { state, what } => {
                report_revoked(&what, &state.open()?.revoke_certs(&what, now)?);
            }
        }
        Ok(())
    }
}
