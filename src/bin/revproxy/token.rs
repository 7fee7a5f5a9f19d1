//! `revproxy token create|list|revoke`: one-time enrollment tokens; shows no secret but a new one.

use std::time::Duration;

use clap::Subcommand;
use revproxy::ca::{self, NewToken};
use revproxy::config::parse_duration;
use time::OffsetDateTime;

use crate::state::StateArg;
use crate::Failure;

#[derive(Subcommand)]
pub(crate) enum TokenCommand {
    /// Mint a one-time token and print it (only it) on stdout.
    Create {
        #[command(flatten)]
        state: StateArg,
        /// Name of the agent that will enroll with it
        #[arg(long, value_name = "AGENT")]
        name: String,
        /// Host name the agent may serve to public clients (repeatable; `*.example.com` allowed)
        #[arg(long = "host", value_name = "NAME")]
        hosts: Vec<String>,
        /// Name the agent may serve only to enrolled identities with access; never routed
        /// from a public listener (repeatable)
        #[arg(long = "private-host", value_name = "NAME")]
        private_hosts: Vec<String>,
        /// Name the agent may reach with `revproxy-agent run --connect` (repeatable; an
        /// access rule granted at enrollment)
        #[arg(long = "connect", value_name = "NAME")]
        connect: Vec<String>,
        /// How long the token stays valid
        #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_duration)]
        ttl: Duration,
        /// Enrollment address to put in the token [default: where `serve` listens for
        /// agents: its --advertise, else its --agents address unless a wildcard]
        #[arg(long, value_name = "HOST:PORT")]
        server: Option<String>,
        /// Lifetime of the certificate the token buys (1h to 7d); renewals keep it
        #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_cert_ttl)]
        cert_ttl: Duration,
    },
    /// List tokens with their state; never shows secrets.
    List(StateArg),
    /// Revoke a token so that it can never be used.
    Revoke {
        #[command(flatten)]
        state: StateArg,
        /// Token id, as `revproxy token list` shows it
        #[arg(value_name = "TOKEN_ID")]
        id: String,
    },
}

impl TokenCommand {
    pub(crate) fn run(self, now: OffsetDateTime) -> Result<(), Failure> {
        match self {
            TokenCommand::Create {
                state,
                name,
                hosts,
                private_hosts,
                connect,
                ttl,
                server,
                cert_ttl,
            } => {
                let ca = state.open()?;
                if server.is_none() {
                    note_wildcard(&ca)?;
                }
                let granted: Vec<String> = (hosts.iter().chain(&private_hosts))
                    .filter_map(|h| ca::names::normalize_host(h).ok())
                    .collect();
                let token = ca.create_token(
                    &NewToken {
                        agent: name,
                        hosts,
                        private_hosts,
                        connect,
                        ttl,
                        cert_ttl,
                        server,
                    },
                    now,
                )?;
                println!("{}", token.encode());
                crate::note_private_under_public(&ca, now, &granted);
            }
            TokenCommand::List(state) => {
                let ca = state.open()?;
                println!(
                    "{:<16}  {:<20}  {:<8}  {:<20}  HOSTS",
                    "ID", "AGENT", "STATE", "EXPIRES"
                );
                for t in ca.list_tokens(now)? {
                    println!(
                        "{:<16}  {:<20}  {:<8}  {:<20}  {}",
                        t.id,
                        t.agent,
                        t.state.as_str(),
                        revproxy::runtime::rfc3339(t.expires),
                        t.hosts.join(",")
                    );
                }
            }
            TokenCommand::Revoke { state, id } => {
                state.open()?.revoke_token(&id)?;
                eprintln!("token {id} revoked");
            }
        }
        Ok(())
    }
}

/// `--cert-ttl`: a duration between [`ca::MIN_CERT_TTL`] and [`ca::MAX_CERT_TTL`].
fn parse_cert_ttl(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s).map_err(|e| e.to_string())?;
    if d < ca::MIN_CERT_TTL || d > ca::MAX_CERT_TTL {
        return Err(format!("{s} is outside 1h to 7d"));
    }
    Ok(d)
}

/// Says on stderr when the token's address is a guess: the proxy listens on every address,
/// so the host is the one chosen at `ca init` (the port is the listener's).
fn note_wildcard(ca: &ca::Ca) -> Result<(), Failure> {
    if let ca::EnrollmentAddress::Wildcard { address, listen } = ca.default_server()? {
        eprintln!(
            "note: the proxy listens for agents on every address ({listen}), so the token names {address} (the CA's first name); if agents reach the proxy elsewhere, give --server HOST:PORT, or start the proxy with --advertise HOST:PORT (`advertise` in its config)"
        );
    }
    Ok(())
}
