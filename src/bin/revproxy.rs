//! `revproxy`: the proxy and its certificate authority. Parses arguments and calls the
//! library; see `revproxy --help`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use revproxy::ca::{self, Ca, CaError, InitOptions, NewToken};
use revproxy::config::parse_duration;
use revproxy::config::ProxyConfig;
use revproxy::runtime::handover;
use revproxy::runtime::logging::LogFormat;
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
    /// List and revoke issued agent certificates.
    #[command(subcommand)]
    Cert(CertCommand),
    /// Change what an enrolled agent may serve.
    #[command(subcommand)]
    Agent(AgentCommand),
    /// Who may reach which name through its tunnel (private names; default deny).
    #[command(subcommand)]
    Access(AccessCommand),
    /// Certificates for operators: they open an admin listener that is not on loopback.
    #[command(subcommand)]
    Operator(OperatorCommand),
    /// Run the proxy (creating a CA first if the state directory has none).
    Serve(ServeArgs),
    /// Validate a configuration file: exit 0 if `serve --config FILE` would accept it, 2
    /// with the reason if not. Nothing is bound and nothing connects.
    Check {
        /// The TOML configuration file
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Move the CA state to a database that several proxies can share.
    #[command(subcommand)]
    Store(StoreCommand),
    /// Show agents, tunnels, names, streams and bytes of a running proxy (from its admin
    /// listener).
    Status {
        /// The proxy's admin listener: HOST:PORT, or https://HOST:PORT with --operator
        #[arg(long, value_name = "ADDR", default_value = DEFAULT_ADMIN)]
        admin: String,
        /// Directory with an operator certificate (from `revproxy operator create`), for
        /// an https:// admin listener
        #[arg(long, value_name = "DIR")]
        operator: Option<PathBuf>,
        /// Print the status document as JSON, for scripts
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Copy the state of a stopped proxy's state directory into an empty PostgreSQL store
    /// (nobody enrolls again), and rename its state.json so that nothing serves from the
    /// old copy.
    Migrate {
        /// The state directory to move from
        #[arg(long, value_name = "DIR")]
        from: PathBuf,
        /// The store to move to: postgres://USER@HOST/DB
        #[arg(
            long,
            value_name = "URL",
            env = "REVPROXY_STORE",
            hide_env_values = true
        )]
        to: String,
    },
}

#[derive(Subcommand)]
enum AccessCommand {
    /// Let AGENT reach NAME... with `revproxy-agent run --connect`; open streams follow
    /// changes within seconds.
    Allow {
        #[command(flatten)]
        state: StateArg,
        #[arg(value_name = "AGENT")]
        agent: String,
        #[arg(value_name = "NAME", required = true)]
        names: Vec<String>,
    },
    /// Take NAME... back from AGENT; its open streams to them are cut within seconds.
    Revoke {
        #[command(flatten)]
        state: StateArg,
        #[arg(value_name = "AGENT")]
        agent: String,
        #[arg(value_name = "NAME", required = true)]
        names: Vec<String>,
    },
    /// Show every access rule.
    List {
        #[command(flatten)]
        state: StateArg,
    },
}

#[derive(Subcommand)]
enum OperatorCommand {
    /// Issue an operator certificate and write it, its key (0600) and the CA certificate
    /// into DIR.
    Create {
        #[command(flatten)]
        state: StateArg,
        /// Operator name (letters, digits, '.', '_', '-')
        #[arg(long, value_name = "NAME")]
        name: String,
        /// Directory to write operator.crt, operator.key and ca.crt into (created 0700)
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Lifetime of the certificate (at most 366d)
        #[arg(long, value_name = "DURATION", default_value = "90d", value_parser = parse_duration)]
        ttl: Duration,
    },
    /// List operator certificates with their state.
    List {
        #[command(flatten)]
        state: StateArg,
    },
    /// Revoke an operator certificate by serial, or every certificate of an operator.
    Revoke {
        #[command(flatten)]
        state: StateArg,
        /// Serial (hex, as `operator list` shows it) or operator name
        #[arg(value_name = "SERIAL_OR_NAME")]
        what: String,
    },
}

/// Where the proxy's admin listener is unless told otherwise.
const DEFAULT_ADMIN: &str = "127.0.0.1:7444";

#[derive(Subcommand)]
enum AgentCommand {
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

#[derive(Subcommand)]
enum CertCommand {
    /// List issued certificates with their state.
    List {
        #[command(flatten)]
        state: StateArg,
    },
    /// Revoke a certificate by serial, or every certificate of an agent.
    Revoke {
        #[command(flatten)]
        state: StateArg,
        /// Serial (hex, as `cert list` shows it) or agent name
        #[arg(value_name = "SERIAL_OR_AGENT")]
        what: String,
    },
}

#[derive(Args)]
struct StateArg {
    /// State directory [default: per-user data directory, e.g. ~/.local/share/revproxy]
    #[arg(long, env = "REVPROXY_STATE", value_name = "DIR")]
    state: Option<PathBuf>,
    /// Where the CA state lives when not in the state directory: postgres://USER@HOST/DB
    /// (shared by several proxies; the CA key stays in the state directory)
    #[arg(
        long,
        env = "REVPROXY_STORE",
        value_name = "URL",
        hide_env_values = true
    )]
    store: Option<String>,
}

impl StateArg {
    fn dir(&self) -> PathBuf {
        self.state
            .clone()
            .unwrap_or_else(revproxy::runtime::dirs::proxy_state_dir)
    }

    /// The CA of the state directory, with its state from the store.
    fn open(&self) -> Result<Ca, Failure> {
        revproxy::store::open_ca(&self.dir(), self.store.as_deref()).map_err(store_failure)
    }
}

/// A store that cannot be opened: a bad URL is a usage error (2), the rest runtime (1).
fn store_failure(e: revproxy::store::StoreError) -> Failure {
    match e {
        revproxy::store::StoreError::Url(_) => Failure {
            status: 2,
            error: e.into(),
        },
        revproxy::store::StoreError::Ca(e) => e.into(),
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
        /// Enrollment address to put in the token [default: the one chosen at `ca init`]
        #[arg(long, value_name = "HOST:PORT")]
        server: Option<String>,
        /// Lifetime of the certificate the token buys (1h to 7d); renewals keep it
        #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_cert_ttl)]
        cert_ttl: Duration,
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
    /// TOML configuration file (flags override it)
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address of the agent listener (enrollment and tunnels) [default: 0.0.0.0:7443]
    #[arg(long, value_name = "ADDR")]
    agents: Option<SocketAddr>,
    /// Public listener that routes on TLS SNI
    #[arg(long, value_name = "ADDR")]
    sni: Option<SocketAddr>,
    /// Public listener that routes on the HTTP Host header
    #[arg(long, value_name = "ADDR")]
    http: Option<SocketAddr>,
    /// Admin listener: /metrics, /status, /ready, /healthz and a status page; plain HTTP on loopback, elsewhere TLS for operator certificates only; `off` for none [default: 127.0.0.1:7444]
    #[arg(long, value_name = "ADDR")]
    admin: Option<revproxy::config::AdminAddr>,
    /// Log line format: text or json [default: text]
    #[arg(long, value_name = "FORMAT")]
    log_format: Option<LogFormat>,
    /// The agent listener's address as agents reach it, HOST:PORT, told to the agents of
    /// every proxy sharing the store [default: the agent listener's, unless a wildcard]
    #[arg(long, value_name = "HOST:PORT")]
    advertise: Option<String>,
    /// Take the listening sockets over from the proxy running on the same state directory
    /// (same configuration): it stops accepting, moves its agents here and drains
    #[arg(long)]
    upgrade: bool,
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
    // `serve` sets up its logging once its configuration is read.
    if !matches!(cli.command, Command::Serve(_)) {
        revproxy::runtime::logging::init("warn", LogFormat::Text);
    }
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
            let store =
                revproxy::store::open(&dir, state.store.as_deref()).map_err(store_failure)?;
            let ca = Ca::init_in(&dir, store, &opts, now)?;
            println!("{}", ca.pin());
            print_init_notes(&ca);
        }
        Command::Token(TokenCommand::Create {
            state,
            name,
            hosts,
            private_hosts,
            connect,
            ttl,
            server,
            cert_ttl,
        }) => {
            let ca = state.open()?;
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
        }
        Command::Token(TokenCommand::List { state }) => {
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
        Command::Token(TokenCommand::Revoke { state, id }) => {
            state.open()?.revoke_token(&id)?;
            eprintln!("token {id} revoked");
        }
        Command::Cert(CertCommand::List { state }) => {
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
        Command::Cert(CertCommand::Revoke { state, what }) => {
            let revoked = state.open()?.revoke_certs(&what, now)?;
            if revoked.is_empty() {
                eprintln!("already revoked: {what}");
            }
            for serial in revoked {
                eprintln!("revoked {serial}");
            }
        }
        Command::Agent(AgentCommand::SetHosts {
            state,
            agent,
            hosts,
        }) => {
            let hosts = state.open()?.set_hosts(&agent, &hosts)?;
            let names = if hosts.is_empty() {
                "nothing".to_string()
            } else {
                hosts.join(" ")
            };
            eprintln!("{agent} may now serve: {names}");
        }
        Command::Serve(args) => serve(args)?,
        Command::Check { config } => {
            let usage = |e: anyhow::Error| Failure {
                status: 2,
                error: e,
            };
            let file = ProxyConfig::load(&config).map_err(|e| usage(e.into()))?;
            // What a reload would apply, then what only a start reads.
            let reload = reload_from(&file).map_err(usage)?;
            if let Some(url) = &file.store {
                revproxy::store::check_url(&url.0).map_err(|e| usage(e.into()))?;
            }
            if let Some(addr) = &file.advertise {
                ca::validate_server(addr).map_err(|e| usage(e.into()))?;
            }
            eprintln!(
                "{} is valid: {} public listener(s), {} route(s)",
                config.display(),
                reload.listeners.len(),
                reload.routes.len()
            );
        }
        Command::Store(StoreCommand::Migrate { from, to }) => {
            let moved = revproxy::store::migrate(&from, &to).map_err(store_failure)?;
            eprintln!(
                "moved {} tokens, {} certificates and {} agents from {} to {}; {} is the old copy, kept as a backup\n  Next: revproxy serve --state {} --store URL (or REVPROXY_STORE)",
                moved.tokens, moved.certs, moved.agents, from.display(), moved.store,
                from.join(ca::state::MIGRATED_FILE).display(), from.display()
            );
        }
        Command::Access(AccessCommand::Allow {
            state,
            agent,
            names,
        }) => {
            let now = state.open()?.allow_access(&agent, &names)?;
            eprintln!("{agent} may now reach: {}", now.join(" "));
        }
        Command::Access(AccessCommand::Revoke {
            state,
            agent,
            names,
        }) => {
            let left = state.open()?.revoke_access(&agent, &names)?;
            let left = if left.is_empty() {
                "nothing".to_string()
            } else {
                left.join(" ")
            };
            eprintln!("{agent} may now reach: {left}");
        }
        Command::Access(AccessCommand::List { state }) => {
            println!("{:<20}  NAMES", "AGENT");
            for (agent, names) in state.open()?.list_access()? {
                println!("{:<20}  {}", agent, names.join(","));
            }
        }
        Command::Operator(OperatorCommand::Create {
            state,
            name,
            out,
            ttl,
        }) => {
            use revproxy::admin::client::{
                OPERATOR_CA_FILE, OPERATOR_CERT_FILE, OPERATOR_KEY_FILE,
            };
            use revproxy::ca::fsutil;
            let ca = state.open()?;
            if out.join(OPERATOR_KEY_FILE).exists() {
                return Err(Failure {
                    status: 2,
                    error: anyhow::anyhow!(
                        "{} already holds an operator key; choose another --out directory",
                        out.display()
                    ),
                });
            }
            // The directory first: it must be private before a key goes in, and nothing
            // is recorded for a certificate that could not be written.
            fsutil::create_private_dir(&out)
                .with_context(|| format!("cannot create {}", out.display()))?;
            if let Some(mode) = fsutil::exposed_mode(&out)
                .with_context(|| format!("cannot read {}", out.display()))?
            {
                return Err(Failure {
                    status: 2,
                    error: anyhow::anyhow!(
                        "{} can be read by group or others (mode {mode:03o}); run `chmod 700 {}` or choose another --out",
                        out.display(),
                        out.display()
                    ),
                });
            }
            let issued = ca.create_operator(&name, ttl, now)?;
            let write = |file: &str, text: &str, mode: u32| {
                fsutil::write_atomic(&out.join(file), text.as_bytes(), mode)
                    .with_context(|| format!("cannot write {}", out.display()))
            };
            let written = write(
                OPERATOR_KEY_FILE,
                &issued.key_pem,
                fsutil::PRIVATE_FILE_MODE,
            )
            .and_then(|()| {
                write(
                    OPERATOR_CERT_FILE,
                    &issued.cert_pem,
                    fsutil::PUBLIC_FILE_MODE,
                )
            })
            .and_then(|()| write(OPERATOR_CA_FILE, &issued.ca_pem, fsutil::PUBLIC_FILE_MODE));
            if let Err(e) = written {
                // Its key is lost: the certificate must not stay usable.
                let _ = ca.revoke_operator(&issued.serial, now);
                return Err(e.into());
            }
            println!("{}", issued.identity);
            eprintln!(
                "operator certificate {serial} for {identity}, valid until {until}, in {dir}\n  \
                 revproxy status --admin https://PROXY:7444 --operator {dir}\n  \
                 Prometheus: tls_config {{ ca_file: {dir}/{OPERATOR_CA_FILE}, cert_file: {dir}/{OPERATOR_CERT_FILE}, key_file: {dir}/{OPERATOR_KEY_FILE} }}",
                serial = issued.serial,
                identity = issued.identity,
                until = revproxy::runtime::rfc3339(issued.not_after),
                dir = out.display(),
            );
        }
        Command::Operator(OperatorCommand::List { state }) => {
            let ca = state.open()?;
            println!(
                "{:<40}  {:<20}  {:<8}  NOT AFTER",
                "SERIAL", "OPERATOR", "STATE"
            );
            for o in ca.list_operators(now)? {
                println!(
                    "{:<40}  {:<20}  {:<8}  {}",
                    o.serial,
                    o.name,
                    o.state,
                    revproxy::runtime::rfc3339(o.not_after)
                );
            }
        }
        Command::Operator(OperatorCommand::Revoke { state, what }) => {
            let revoked = state.open()?.revoke_operator(&what, now)?;
            if revoked.is_empty() {
                eprintln!("already revoked: {what}");
            }
            for serial in revoked {
                eprintln!("revoked {serial}");
            }
        }
        Command::Status {
            admin,
            operator,
            json,
        } => {
            let runtime =
                tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
            let target = revproxy::admin::client::Target::new(&admin, operator.as_deref())
                .map_err(|e| Failure {
                    status: 2,
                    error: e.into(),
                })?;
            let (status, body) =
                runtime.block_on(revproxy::admin::client::get_from(&target, "/status"))?;
            if !status.is_success() {
                return Err(anyhow::anyhow!(
                    "the admin listener answered {status}: {}",
                    body.trim()
                )
                .into());
            }
            if json {
                print!("{body}");
            } else {
                let doc: serde_json::Value = serde_json::from_str(&body)
                    .context("the admin listener's status is not JSON")?;
                print!("{}", revproxy::admin::client::report(&doc));
            }
        }
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

/// The configuration `serve` runs with: the file (if any), the flags over it.
fn effective_config(args: &ServeArgs) -> Result<ProxyConfig, anyhow::Error> {
    let mut config = match &args.config {
        Some(path) => ProxyConfig::load(path)?,
        None => ProxyConfig::default(),
    };
    config.agents = args.agents.or(config.agents);
    config.sni = args.sni.or(config.sni);
    config.http = args.http.or(config.http);
    config.admin = args.admin.or(config.admin);
    config.store = (args.state.store.clone())
        .map(revproxy::store::StoreUrl)
        .or(config.store);
    config.advertise = args.advertise.clone().or(config.advertise);
    config.validate()?;
    Ok(config)
}

/// What a reload may change, from a configuration.
fn reload_from(config: &ProxyConfig) -> Result<revproxy::proxy::Reload, anyhow::Error> {
    Ok(revproxy::proxy::Reload {
        listeners: config.listeners()?,
        routes: config.routes()?,
        static_proxy_protocol: config.static_proxy_protocol()?.into_iter().collect(),
        trusted_proxies: config.trusted_proxies()?,
        peek_timeout: config.peek_timeout.unwrap_or(revproxy::proxy::PEEK_TIMEOUT),
        send_timeout: config.send_timeout.unwrap_or(revproxy::SEND_TIMEOUT),
        idle_timeout: config.idle_timeout,
    })
}

/// Re-reads the configuration at every SIGHUP and hands it to the running proxy; a file
/// that does not read keeps the running configuration (logged and counted).
async fn reload_on_hangup(
    args: ServeArgs,
    mut hangups: tokio::signal::unix::Signal,
    reloader: revproxy::proxy::Reloader,
) {
    while hangups.recv().await.is_some() {
        tracing::info!("SIGHUP: reading the configuration again");
        match effective_config(&args).and_then(|config| reload_from(&config)) {
            Ok(reload) => {
                // The proxy logs and counts the outcome.
                let _ = reloader.reload(reload).await;
            }
            Err(e) => reloader.invalid(format!("{e:#}")).await,
        }
    }
}

fn serve(args: ServeArgs) -> Result<(), Failure> {
    let usage = |e: anyhow::Error| Failure {
        status: 2,
        error: e,
    };
    let config = effective_config(&args).map_err(usage)?;
    revproxy::runtime::logging::init(
        "info",
        args.log_format.or(config.log_format).unwrap_or_default(),
    );
    // The same reading of the file as a reload's.
    let initial = reload_from(&config).map_err(usage)?;
    let dir = args
        .state
        .state
        .clone()
        .or(config.state.clone())
        .unwrap_or_else(revproxy::runtime::dirs::proxy_state_dir);
    let agents_addr = config.agents.unwrap_or(DEFAULT_AGENTS);

    // The running proxy's sockets, first (an upgrade creates nothing): it keeps serving
    // until this one says it does.
    let mut inherited = match args.upgrade {
        true => {
            let taken = handover::take_over(&dir)?;
            tracing::info!(sockets = ?taken.described(), "listening sockets taken over from the running proxy");
            Some(taken)
        }
        false => None,
    };
    if !Ca::exists(&dir) {
        // The first proxy on a store creates the CA; later ones are given its key.
        let url = config.store.as_ref().map(|u| u.0.as_str());
        let store = revproxy::store::open(&dir, url).map_err(store_failure)?;
        let ca = Ca::init_in(
            &dir,
            store,
            &InitOptions::default(),
            time::OffsetDateTime::now_utc(),
        )?;
        print_init_notes(&ca);
    }
    raise_fd_limit();
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async {
        // From here on SIGHUP reloads (its default would end the process).
        let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("cannot watch for SIGHUP")?;
        // SIGUSR2 upgrades in place (its default would end the process too).
        let usr2 =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined2())
                .context("cannot watch for SIGUSR2")?;
        // Without --upgrade, a proxy already serving this state directory is refused
        // here, before any port is tried.
        let upgrades = match args.upgrade {
            false => Some(handover::Listener::bind(&dir)?),
            true => None,
        };
        let mut builder = Proxy::builder(&dir).agent_listener(
            listen(&mut inherited, handover::Role::Agents, agents_addr).await?,
        );
        if let Some(inherited) = inherited.as_mut() {
            if let Some(udp) = inherited
                .udp(agents_addr)
                .context("cannot take the QUIC socket over")?
            {
                builder = builder.quic_listener(udp);
            }
        }
        if let Some(url) = &config.store {
            builder = builder.store(&url.0);
        }
        if let Some(addr) = &config.advertise {
            builder = builder.advertise(addr);
        }
        builder = builder.trusted_proxies(initial.trusted_proxies);
        match config.admin {
            Some(revproxy::config::AdminAddr::Off) => {}
            Some(revproxy::config::AdminAddr::At(addr)) => {
                builder = builder
                    .admin_listener(listen(&mut inherited, handover::Role::Admin, addr).await?)
            }
            None => {
                let addr = DEFAULT_ADMIN.parse().expect("valid address");
                builder = builder
                    .admin_listener(listen(&mut inherited, handover::Role::Admin, addr).await?)
            }
        }
        for (addr, kind) in initial.listeners {
            let listener = listen(&mut inherited, handover::Role::Public, addr).await?;
            builder = builder.listener(listener, kind);
        }
        if let Some(inherited) = inherited.take() {
            let (confirmation, unused) = inherited.finish();
            if !unused.is_empty() {
                tracing::info!(?unused, "sockets the configuration no longer has are closed here (the old process stops accepting on them)");
            }
            builder = builder.upgraded(confirmation);
        }
        for (name, addr) in &initial.routes {
            builder = builder.route(name, addr);
        }
        for (addr, version) in &initial.static_proxy_protocol {
            builder = builder.static_proxy_protocol(addr, *version);
        }
        if let Some(t) = config.peek_timeout {
            builder = builder.peek_timeout(t);
        }
        if let Some(t) = config.send_timeout {
            builder = builder.send_timeout(t);
        }
        if let Some(t) = config.idle_timeout {
            builder = builder.idle_timeout(t);
        }
        if let Some(max) = config.max_tunnels_per_agent {
            builder = builder.max_tunnels_per_agent(max);
        }
        if let Some(max) = config.max_connections_per_source {
            builder = builder.max_connections_per_source(max);
        }
        if let Some(max) = config.max_handshakes_per_source {
            builder = builder.max_handshakes_per_source(max);
        }
        if let Some(g) = config.shutdown_grace {
            builder = builder.shutdown_grace(g);
        }
        if config.access_log == Some(true) {
            builder = builder.access_log(true);
        }
        let proxy = builder.build()?;
        // Built: from here this process answers the next upgrade (the running one's
        // socket name becomes ours only now, so a failed start leaves it in place).
        let upgrades = match upgrades {
            Some(listener) => listener,
            None => handover::Listener::pending(&dir)?,
        };
        let proxy = proxy.answer_upgrades(upgrades);
        tokio::spawn(reload_on_hangup(args, hangups, proxy.reloader()));
        tokio::spawn(upgrade_on_usr2(usr2));
        proxy.run(revproxy::runtime::shutdown_signal()).await?;
        Ok::<_, Failure>(())
    })
}

/// At every SIGUSR2, starts this program again with the same arguments and `--upgrade`:
/// the binary now at that path takes the sockets over (what `systemctl kill -s USR2`
/// does for a service: the new process stays in the service and tells systemd it is the
/// main one).
async fn upgrade_on_usr2(mut signals: tokio::signal::unix::Signal) {
    while signals.recv().await.is_some() {
        match start_successor() {
            Ok(pid) => {
                tracing::info!(
                    pid,
                    "SIGUSR2: started the new binary to take the sockets over"
                )
            }
            Err(e) => tracing::warn!(error = %e, "SIGUSR2: cannot start the new binary"),
        }
    }
}

/// Starts `argv[0]` with this process's arguments and `--upgrade` (its output goes where
/// ours does); a successor that fails is reaped and logged.
fn start_successor() -> std::io::Result<u32> {
    let mut args = std::env::args_os();
    let program = args
        .next()
        .ok_or_else(|| std::io::Error::other("no argv[0]"))?;
    let mut args: Vec<std::ffi::OsString> = args.collect();
    if !args.iter().any(|a| a == "--upgrade") {
        args.push("--upgrade".into());
    }
    let mut child = std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .spawn()?;
    let pid = child.id();
    std::thread::spawn(move || match child.wait() {
        Ok(status) if status.success() => {}
        Ok(status) => {
            tracing::warn!(pid, %status, "the new process ended; this one goes on serving")
        }
        Err(e) => tracing::warn!(pid, error = %e, "cannot wait for the new process"),
    });
    Ok(pid)
}

/// A listening socket for `role` at `addr`: the one taken over from the running proxy if
/// it handed one over, else bound here.
async fn listen(
    inherited: &mut Option<handover::Inherited>,
    role: handover::Role,
    addr: SocketAddr,
) -> anyhow::Result<tokio::net::TcpListener> {
    let taken = match inherited.as_mut() {
        Some(inherited) => inherited
            .tcp(role, addr)
            .with_context(|| format!("cannot take {addr} over"))?,
        None => None,
    };
    match taken {
        Some(listener) => Ok(tokio::net::TcpListener::from_std(listener)?),
        None => revproxy::runtime::listen(addr).with_context(|| format!("cannot listen on {addr}")),
    }
}

/// Raises the open-file limit (the caps are sized from it), or says why it could not.
fn raise_fd_limit() {
    match revproxy::runtime::raise_fd_limit() {
        Ok(limit) => tracing::debug!(limit, "open-file limit"),
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the open-file limit; the connection caps are sized to the current one")
        }
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

/// Where agents connect unless told otherwise.
const DEFAULT_AGENTS: SocketAddr = SocketAddr::new(
    std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
    ca::DEFAULT_AGENT_PORT,
);
