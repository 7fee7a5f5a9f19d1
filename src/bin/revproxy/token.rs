//! `revproxy token create|list|revoke`: one-time enrollment tokens; shows no secret but a new one.

use std::time::Duration;

use clap::Subcommand;
use revproxy::ca::{self, NewToken};
use revproxy::config::parse_duration;
use time::OffsetDateTime;

use crate::listing::{self, ListArgs, Listing};
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
        /// Public TCP port the agent may serve (repeatable; within the proxy's `ports`
        /// range): listings show it as tcp:PORT
        #[arg(long = "tcp-port", value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
        tcp_ports: Vec<u16>,
        /// Public UDP port the agent may serve (repeatable; within the proxy's `ports`
        /// range): listings show it as udp:PORT
        #[arg(long = "udp-port", value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
        udp_ports: Vec<u16>,
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
    /// List tokens with their state, oldest first; never shows secrets. JSON: {"id",
    /// "agent", "status", "hosts", "private_hosts", "connect", "created", "expires",
    /// "used_at", "serial"} (times RFC 3339; the last two null until the token is used).
    List {
        #[command(flatten)]
        list: ListArgs,
        /// Only the tokens in this state
        #[arg(long, value_enum)]
        status: Option<Status>,
    },
    /// Revoke a token so that it can never be used.
    Revoke {
        #[command(flatten)]
        state: StateArg,
        /// Token id, as `revproxy token list` shows it
        #[arg(value_name = "TOKEN_ID")]
        id: String,
    },
}

/// A token's state, as `--status` names it.
#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum Status {
    /// Can still be traded
    Open,
    Used,
    Expired,
    Revoked,
}

impl From<Status> for ca::TokenState {
    fn from(s: Status) -> Self {
        match s {
            Status::Open => ca::TokenState::Open,
            Status::Used => ca::TokenState::Used,
            Status::Expired => ca::TokenState::Expired,
            Status::Revoked => ca::TokenState::Revoked,
        }
    }
}

impl TokenCommand {
    pub(crate) fn run(self, now: OffsetDateTime) -> Result<(), Failure> {
        match self {
            TokenCommand::Create {
                state,
                name,
                mut hosts,
                private_hosts,
                connect,
                tcp_ports,
                udp_ports,
                ttl,
                server,
                cert_ttl,
            } => {
                hosts.extend(tcp_ports.into_iter().map(ca::ports::tcp_name));
                hosts.extend(udp_ports.into_iter().map(ca::ports::udp_name));
                let ca = state.open()?;
                if server.is_none() {
                    note_wildcard(&ca)?;
                }
                let granted: Vec<String> = (hosts.iter().chain(&private_hosts))
                    .filter_map(|h| ca::names::normalize_host(h).ok())
                    .collect();
                let private = private_hosts.clone();
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
                // Only a private name or a public wildcard can make a new overlap; a token
                // of exact public names is minted without reading every grant.
                if granted.iter().any(|n| n.starts_with("*.")) || !private.is_empty() {
                    crate::note_private_under_public(&ca, now, &granted);
                }
            }
            TokenCommand::List {
                list: ListArgs { state, agent, json },
                status,
            } => {
                let ca = state.open()?;
                let filter = ca::TokenFilter {
                    agent,
                    state: status.map(Into::into),
                };
                let header = format!(
                    "{:<16}  {:<20}  {:<8}  {:<20}  HOSTS",
                    "ID", "AGENT", "STATE", "EXPIRES"
                );
                let mut out = Listing::start(json, &header)?;
                ca.each_token(now, &filter, |t| {
                    let text = || {
                        format!(
                            "{:<16}  {:<20}  {:<8}  {:<20}  {}",
                            t.id,
                            t.agent,
                            t.state.as_str(),
                            listing::time(t.expires),
                            t.hosts.join(",")
                        )
                    };
                    let json = || {
                        serde_json::json!({
                            "id": t.id,
                            "agent": t.agent,
                            "status": t.state.as_str(),
                            "hosts": t.hosts,
                            "private_hosts": t.private_hosts,
                            "connect": t.connect,
                            "created": listing::time(t.created),
                            "expires": listing::time(t.expires),
                            "used_at": t.used.as_ref().map(|(at, _)| listing::time(*at)),
                            "serial": t.used.as_ref().map(|(_, serial)| serial),
                        })
                    };
                    out.row(text, json).map_err(Failure::from)
                })?;
                out.finish()?;
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
