//! `revproxy access allow|revoke|list`: who may reach which private name (default deny).

use clap::{Args, Subcommand};

use crate::state::StateArg;
use crate::{names_or_nothing, Failure};

#[derive(Subcommand)]
pub(crate) enum AccessCommand {
    /// Let AGENT reach NAME... with `revproxy-agent run --connect`; open streams follow
    /// changes within seconds.
    Allow(Rule),
    /// Take NAME... back from AGENT; its open streams to them are cut within seconds.
    Revoke(Rule),
    /// Show every access rule.
    List(StateArg),
}

/// The arguments of `allow` and `revoke`: an agent and the names it gains or loses.
#[derive(Args)]
pub(crate) struct Rule {
    #[command(flatten)]
    state: StateArg,
    #[arg(value_name = "AGENT")]
    agent: String,
    #[arg(value_name = "NAME", required = true)]
    names: Vec<String>,
}

impl AccessCommand {
    pub(crate) fn run(self) -> Result<(), Failure> {
        match self {
            AccessCommand::Allow(Rule {
                state,
                agent,
                names,
            }) => {
                let now = state.open()?.allow_access(&agent, &names)?;
                eprintln!("{agent} may now reach: {}", now.join(" "));
            }
            AccessCommand::Revoke(Rule {
                state,
                agent,
                names,
            }) => {
                let left = state.open()?.revoke_access(&agent, &names)?;
                eprintln!("{agent} may now reach: {}", names_or_nothing(&left));
            }
            AccessCommand::List(state) => {
                println!("{:<20}  NAMES", "AGENT");
                for (agent, names) in state.open()?.list_access()? {
                    println!("{:<20}  {}", agent, names.join(","));
                }
            }
        }
        Ok(())
    }
}
