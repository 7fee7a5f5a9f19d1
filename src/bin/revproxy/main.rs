//! `revproxy`: the subcommand enum, its dispatch, logging set-up and exit statuses (0, 1, 2).

mod access;
mod agent;
mod ca;
mod cert;
mod check;
mod listing;
mod operator;
mod sentence;
mod serve;
mod signals;
mod state;
mod status;
mod store;
mod tls;
mod token;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use revproxy::ca::CaError;
use revproxy::runtime::logging::LogFormat;

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
    Ca(ca::CaCommand),
    /// Mint, list and revoke one-time enrollment tokens.
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// List and revoke issued agent certificates.
    #[command(subcommand)]
    Cert(cert::CertCommand),
    /// Change what an enrolled agent may serve.
    #[command(subcommand)]
    Agent(agent::AgentCommand),
    /// Who may reach which name through its tunnel (private names; default deny).
    #[command(subcommand)]
    Access(access::AccessCommand),
    /// Certificates for operators: they open an admin listener that is not on loopback.
    #[command(subcommand)]
    Operator(operator::OperatorCommand),
    /// Run the proxy (creating a CA first if the state directory has none).
    Serve(serve::ServeArgs),
    /// Validate a configuration file: exit 0 if `serve --config FILE` would accept it, 2
    /// with the reason if not. Nothing is bound and nothing connects.
    Check(check::CheckArgs),
    /// Move the CA state to a database that several proxies can share.
    #[command(subcommand)]
    Store(store::StoreCommand),
    /// Terminate TLS at the proxies for names you choose, or pass it through (the default).
    #[command(subcommand)]
    Tls(tls::TlsCommand),
    /// Show agents, tunnels, names, streams and bytes of a running proxy (from its admin
    /// listener).
    Status(status::StatusArgs),
}

/// An error with the exit status it deserves: 1 for runtime failures, 2 for bad input.
struct Failure {
    status: u8,
    error: anyhow::Error,
}

impl Failure {
    /// Bad input, whatever the error: exit status 2.
    fn usage(error: impl Into<anyhow::Error>) -> Self {
        Failure {
            status: 2,
            error: error.into(),
        }
    }
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
    // `serve` sets up its logging once its configuration is read.
    if !matches!(cli.command, Command::Serve(_)) {
        revproxy::runtime::logging::init("warn", LogFormat::Text);
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("revproxy: {}", sentence::sentence(&f.error));
            ExitCode::from(f.status)
        }
    }
}

fn run(cli: Cli) -> Result<(), Failure> {
    let now = time::OffsetDateTime::now_utc();
    match cli.command {
        Command::Ca(command) => command.run(now),
        Command::Token(command) => command.run(now),
        Command::Cert(command) => command.run(now),
        Command::Agent(command) => command.run(now),
        Command::Access(command) => command.run(),
        Command::Operator(command) => command.run(now),
        Command::Serve(args) => args.run(),
        Command::Check(args) => args.run(),
        Command::Store(command) => command.run(),
        Command::Tls(command) => command.run(now),
        Command::Status(args) => args.run(),
    }
}

/// NAMES joined with spaces, or `nothing` when there are none.
fn names_or_nothing(names: &[String]) -> String {
    if names.is_empty() {
        "nothing".to_string()
    } else {
        names.join(" ")
    }
}

/// Says on stderr which private names a public wildcard also covers, among those that
/// involve `granted` (names just granted, publicly or privately): the private grant wins,
/// so such a name is never routed from a public listener.
fn note_private_under_public(ca: &revproxy::ca::Ca, now: time::OffsetDateTime, granted: &[String]) {
    let Ok(pairs) = ca.private_under_public(now.unix_timestamp()) else {
        return;
    };
    for (name, pattern) in pairs {
        if granted.contains(&name) || granted.contains(&pattern) {
            eprintln!(
                "note: {name} is granted privately, so no public listener routes it, although the public grant {pattern} covers it"
            );
        }
    }
}

/// Tells which serials a revocation by serial or name revoked (none: all were already).
fn report_revoked(what: &str, revoked: &[String]) {
    if revoked.is_empty() {
        eprintln!("already revoked: {what}");
    }
    for serial in revoked {
        eprintln!("revoked {serial}");
    }
}
