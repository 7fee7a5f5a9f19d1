//! `revproxy-agent`: runs beside a backend and dials out to the proxy. Parses arguments and
//! calls the library; see `revproxy-agent --help`.

use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use revproxy::ca::Token;

#[derive(Parser)]
#[command(
    name = "revproxy-agent",
    version,
    about = "The revproxy agent: serves a backend behind NAT through an outbound tunnel"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Trade a one-time token for this agent's certificate.
    Enroll {
        /// The token from `revproxy token create`, or `-` to read it from stdin
        #[arg(
            long,
            env = "REVPROXY_TOKEN",
            value_name = "TOKEN",
            hide_env_values = true
        )]
        token: String,
        /// State directory [default: per-user data directory, e.g. ~/.local/share/revproxy-agent]
        #[arg(long, env = "REVPROXY_STATE", value_name = "DIR")]
        state: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    revproxy::logging::init("warn");
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err((status, e)) => {
            eprintln!("revproxy-agent: {e:#}");
            ExitCode::from(status)
        }
    }
}

fn run(cli: Cli) -> Result<(), (u8, anyhow::Error)> {
    match cli.command {
        Command::Enroll { token, state } => {
            let text = if token == "-" {
                let mut s = String::new();
                std::io::stdin()
                    .take(64 * 1024)
                    .read_to_string(&mut s)
                    .map_err(|e| {
                        (
                            2,
                            anyhow::Error::new(e).context("cannot read the token from stdin"),
                        )
                    })?;
                s
            } else {
                token
            };
            let token = Token::parse(&text).map_err(|e| (2, e.into()))?;
            let dir = state.unwrap_or_else(revproxy::dirs::agent_state_dir);
            let runtime = tokio::runtime::Runtime::new()
                .context("cannot start the async runtime")
                .map_err(|e| (1, e))?;
            let id = runtime
                .block_on(revproxy::agent::enroll(&token, &dir))
                .map_err(|e| (1, e.into()))?;
            println!("enrolled as {}", id.identity);
            println!("names: {}", id.hosts.join(" "));
            println!(
                "certificate valid until {}",
                revproxy::logging::rfc3339(id.not_after)
            );
            println!("state: {}", dir.display());
        }
    }
    Ok(())
}
