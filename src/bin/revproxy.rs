//! `revproxy`: the proxy and its certificate authority. Parses arguments and calls the
//! library; see `revproxy --help`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use revproxy::ca::{self, Ca, CaError, InitOptions, NewToken};
use revproxy::duration::parse_duration;
use revproxy::Proxy;

#[derive(Parser)]
#[command(
    name = "revproxy",
    version,
    about = "A TCP proxy that routes by port, HTTP Host and TLS SNI to agents behind NAT"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Manage the certificate authority.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Mint, list and revoke one-time enrollment tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Run the proxy (creating a CA first if the state directory has none).
    Serve(ServeArgs),
}

#[derive(Args)]
struct StateArg {
    /// State directory [default: per-user data directory, e.g. ~/.local/share/revproxy]
    #[arg(long, env = "REVPROXY_STATE", value_name = "DIR")]
    state: Option<PathBuf>,
}

impl StateArg {
    fn dir(&self) -> PathBuf {
        self.state
            .clone()
            .unwrap_or_else(revproxy::dirs::proxy_state_dir)
    }
}

#[derive(Subcommand)]
enum CaCommand {
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

#[derive(Subcommand)]
enum TokenCommand {
    /// Mint a one-time token and print it (only it) on stdout.
    Create {
        #[command(flatten)]
        state: StateArg,
        /// Name of the agent that will enroll with it
        #[arg(long, value_name = "AGENT")]
        name: String,
        /// Host name the agent may serve (repeatable; `*.example.com` allowed)
        #[arg(long = "host", value_name = "NAME", required = true)]
        hosts: Vec<String>,
        /// How long the token stays valid
        #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_duration)]
        ttl: Duration,
        /// Enrollment address to put in the token [default: the one chosen at `ca init`]
        #[arg(long, value_name = "HOST:PORT")]
        server: Option<String>,
    },
    /// List tokens with their state; never shows secrets.
    List {
        #[command(flatten)]
        state: StateArg,
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

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    state: StateArg,
    /// Address of the agent listener (enrollment and tunnels)
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:7443")]
    agents: SocketAddr,
}

/// An error with the exit status it deserves: 1 for runtime failures, 2 for bad input.
struct Failure {
    status: u8,
    error: anyhow::Error,
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        let error = e.into();
        let usage = matches!(
            error.downcast_ref::<CaError>(),
            Some(CaError::InvalidInput(_))
        );
        Failure {
            status: if usage { 2 } else { 1 },
            error,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = if matches!(cli.command, Command::Serve(_)) {
        "info"
    } else {
        "warn"
    };
    revproxy::logging::init(level);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("revproxy: {:#}", f.error);
            ExitCode::from(f.status)
        }
    }
}

fn run(cli: Cli) -> Result<(), Failure> {
    let now = time::OffsetDateTime::now_utc();
    match cli.command {
        Command::Ca(CaCommand::Init {
            state,
            sans,
            trust_domain,
        }) => {
            let dir = state.dir();
            let mut opts = InitOptions {
                trust_domain,
                ..InitOptions::default()
            };
            if !sans.is_empty() {
                opts.sans = sans;
            }
            let ca = Ca::init(&dir, &opts, now)?;
            println!("{}", ca.pin());
            print_init_notes(&ca);
        }
        Command::Token(TokenCommand::Create {
            state,
            name,
            hosts,
            ttl,
            server,
        }) => {
            let ca = Ca::open(&state.dir())?;
            let token = ca.create_token(
                &NewToken {
                    agent: name,
                    hosts,
                    ttl,
                    cert_ttl: ca::DEFAULT_CERT_TTL,
                    server,
                },
                now,
            )?;
            println!("{}", token.encode());
        }
        Command::Token(TokenCommand::List { state }) => {
            let ca = Ca::open(&state.dir())?;
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
                    revproxy::logging::rfc3339(t.expires),
                    t.hosts.join(",")
                );
            }
        }
        Command::Token(TokenCommand::Revoke { state, id }) => {
            Ca::open(&state.dir())?.revoke_token(&id)?;
            eprintln!("token {id} revoked");
        }
        Command::Serve(args) => serve(args)?,
    }
    Ok(())
}

fn print_init_notes(ca: &Ca) {
    eprintln!(
        "CA created in {dir}\n  CA pin: {pin}\n  Back up {dir}/ca.key now: if it is lost, every agent must enroll again.\n  Next: revproxy token create --state {dir} --name AGENT --host NAME",
        dir = ca.dir().display(),
        pin = ca.pin()
    );
}

fn serve(args: ServeArgs) -> Result<(), Failure> {
    let dir = args.state.dir();
    if !Ca::exists(&dir) {
        let ca = Ca::init(
            &dir,
            &InitOptions::default(),
            time::OffsetDateTime::now_utc(),
        )?;
        print_init_notes(&ca);
    }
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async {
        let agents = tokio::net::TcpListener::bind(args.agents)
            .await
            .with_context(|| format!("cannot listen for agents on {}", args.agents))?;
        let proxy = Proxy::builder(&dir).agent_listener(agents).build()?;
        proxy.run(revproxy::logging::shutdown_signal()).await?;
        Ok::<_, Failure>(())
    })
}
