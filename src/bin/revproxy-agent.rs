//! `revproxy-agent`: runs beside a backend and dials out to the proxy. Parses arguments and
//! calls the library; see `revproxy-agent --help`.

use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use revproxy::admin::client::Target;
use revproxy::ca::Token;
use revproxy::config::{self, AgentConfig};
use revproxy::runtime::logging::LogFormat;

#[path = "revproxy/sentence.rs"]
mod sentence;

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
        /// Enroll at this address instead of the token's (the token's CA pin still decides
        /// whom to trust); saved as the proxy's address for `run`
        #[arg(long, value_name = "HOST:PORT")]
        server: Option<String>,
    },
    /// Connect to the proxy and serve the mapped names until stopped.
    Run {
        /// State directory [default: per-user data directory, e.g. ~/.local/share/revproxy-agent]
        #[arg(long, env = "REVPROXY_STATE", value_name = "DIR")]
        state: Option<PathBuf>,
        /// TOML configuration file (flags override it)
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Tunnel transport: h2 (TCP), quic (UDP), or auto (QUIC, falling back to h2) [default: h2]
        #[arg(long, value_enum)]
        transport: Option<TransportArg>,
        /// Serve NAME from the backend at HOST:PORT (repeatable); NAME may be a granted
        /// port, tcp:PORT or udp:PORT (then HOST:PORT is the backend's UDP address)
        #[arg(long = "map", value_name = "NAME=HOST:PORT")]
        maps: Vec<String>,
        /// Reach the private name NAME: connections to LISTEN_ADDR go through the tunnel
        /// to whoever serves NAME, if this agent's access rules allow (repeatable)
        #[arg(long = "connect", value_name = "NAME=LISTEN_ADDR")]
        connects: Vec<String>,
        /// Admin listener: /metrics, /status, /ready, /healthz and a status page (loopback only; off unless set)
        #[arg(long, value_name = "ADDR")]
        admin: Option<std::net::SocketAddr>,
        /// Log line format: text or json [default: text]
        #[arg(long, value_name = "FORMAT")]
        log_format: Option<LogFormat>,
    },
    /// Validate a configuration file: exit 0 if `run --config FILE` would accept it, 2 with
    /// the reason if not. Nothing is bound and nothing connects.
    Check {
        /// The TOML configuration file
        #[arg(long, value_name = "FILE")]
        config: std::path::PathBuf,
    },
    /// Show the tunnels and services of a running agent (from its admin listener).
    Status {
        /// The agent's admin listener (as given to `run --admin`)
        #[arg(long, value_name = "ADDR", default_value = DEFAULT_ADMIN)]
        admin: String,
        /// Print the status document as JSON, for scripts
        #[arg(long)]
        json: bool,
    },
    /// Exit 0 when the agent at ADDR has a tunnel up, 1 when not (an exec probe for
    /// images without curl).
    Ready {
        /// The agent's admin listener (as given to `run --admin`)
        #[arg(long, value_name = "ADDR", default_value = DEFAULT_ADMIN)]
        admin: String,
    },
}

/// The agent's admin address these commands ask unless told otherwise (the agent's own
/// admin listener is off unless `run --admin` sets it; this is the conventional one).
const DEFAULT_ADMIN: &str = "127.0.0.1:7445";

#[derive(Clone, Copy, ValueEnum)]
enum TransportArg {
    H2,
    Quic,
    Auto,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `run` sets up its logging once its configuration is read.
    if !matches!(cli.command, Command::Run { .. }) {
        revproxy::runtime::logging::init("warn", LogFormat::Text);
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err((status, e)) => {
            eprintln!("revproxy-agent: {}", sentence::sentence(&e));
            ExitCode::from(status)
        }
    }
}

type Failure = (u8, anyhow::Error);

/// The services of a configuration, `--map` entries replacing the file's for the same name
/// (the file's `proxy_protocol` and `h2c` for that name stay: `--map` moves the backend).
fn services_of(
    file: &AgentConfig,
    maps: &[String],
) -> Result<Vec<(String, String, revproxy::agent::ServiceOptions)>, anyhow::Error> {
    let mut services = Vec::new();
    for s in &file.service {
        let (name, to) = config::parse_map(&format!("{}={}", s.name()?, s.to))?;
        let options = revproxy::agent::ServiceOptions {
            proxy_protocol: s.proxy_protocol,
            h2c: s.h2c,
        };
        services.push((name, to, options));
    }
    for m in maps {
        let (name, to) = config::parse_map(m)?;
        let options = (services.iter())
            .find(|(n, _, _)| *n == name)
            .map(|(_, _, o)| *o)
            .unwrap_or_default();
        services.retain(|(n, _, _)| *n != name);
        services.push((name, to, options));
    }
    Ok(services)
}

/// SIGHUP: reads the configuration file again and applies its services and connect
/// listeners; a file that does not read, names a service the certificate does not grant,
/// or a listen address that cannot be bound, changes nothing.
async fn reload(
    path: Option<&std::path::Path>,
    maps: &[String],
    connects: &[String],
    reloader: &revproxy::agent::AgentReloader,
) {
    let read = (|| -> Result<_, anyhow::Error> {
        let file = path.map(AgentConfig::load).transpose()?.unwrap_or_default();
        Ok((services_of(&file, maps)?, reach_of(&file, connects)?))
    })();
    let applied = match read {
        Ok((services, reach)) => reloader
            .apply(services, reach)
            .await
            .map_err(anyhow::Error::from),
        Err(e) => Err(e),
    };
    match applied {
        Ok(what) => tracing::info!(%what, "configuration reloaded"),
        Err(e) => {
            tracing::warn!(error = %sentence::sentence(&e), "configuration not reloaded; the running one stays")
        }
    }
}

/// The private names to reach: `[[connect]]` entries, with `--connect` over them.
fn reach_of(
    file: &AgentConfig,
    connects: &[String],
) -> Result<Vec<(String, std::net::SocketAddr)>, anyhow::Error> {
    let mut reach: Vec<(String, std::net::SocketAddr)> = Vec::new();
    for c in &file.connect {
        reach.push(config::parse_connect(&format!("{}={}", c.host, c.listen))?);
    }
    for c in connects {
        let (name, listen) = config::parse_connect(c)?;
        reach.retain(|(n, _)| *n != name);
        reach.push((name, listen));
    }
    Ok(reach)
}

fn usage(e: impl Into<anyhow::Error>) -> Failure {
    (2, e.into())
}

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Runtime::new()
        .context("cannot start the async runtime")
        .map_err(|e| (1, e))
}

fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Enroll {
            token,
            state,
            server,
        } => {
            let text = if token == "-" {
                let mut s = String::new();
                std::io::stdin()
                    .take(64 * 1024)
                    .read_to_string(&mut s)
                    .map_err(|e| {
                        usage(anyhow::Error::new(e).context("cannot read the token from stdin"))
                    })?;
                s
            } else {
                token
            };
            let mut token = Token::parse(&text).map_err(usage)?;
            if let Some(server) = server {
                token.public.server = revproxy::ca::validate_server(&server).map_err(usage)?;
            }
            let dir = state.unwrap_or_else(revproxy::runtime::dirs::agent_state_dir);
            let id = runtime()?
                .block_on(revproxy::agent::enroll(&token, &dir))
                .map_err(|e| (1, e.into()))?;
            println!("enrolled as {}", id.identity);
            println!("names: {}", id.hosts.join(" "));
            println!(
                "certificate valid until {}",
                revproxy::runtime::rfc3339(id.not_after)
            );
            println!("state: {}", dir.display());
            if let Some(host) = id.hosts.first() {
                println!(
                    "next: revproxy-agent run --state {} --map {host}=HOST:PORT",
                    dir.display()
                );
            }
        }
        Command::Run {
            state,
            config: file,
            transport,
            maps,
            connects,
            admin,
            log_format,
        } => {
            let file_path = file;
            let file = match &file_path {
                Some(path) => AgentConfig::load(path).map_err(usage)?,
                None => AgentConfig::default(),
            };
            revproxy::runtime::logging::init(
                "info",
                log_format.or(file.log_format).unwrap_or_default(),
            );
            let transport = match transport {
                Some(TransportArg::H2) => Some(config::Transport::H2),
                Some(TransportArg::Quic) => Some(config::Transport::Quic),
                Some(TransportArg::Auto) => Some(config::Transport::Auto),
                None => file.transport,
            };
            let dir = state
                .or(file.state.clone())
                .unwrap_or_else(revproxy::runtime::dirs::agent_state_dir);
            let services = services_of(&file, &maps).map_err(usage)?;
            // --connect entries override [[connect]] entries for the same name.
            let reach = reach_of(&file, &connects).map_err(usage)?;
            let mut builder = revproxy::Agent::builder(&dir);
            for (name, to, options) in &services {
                builder = builder.service_with(name, to, *options);
            }
            for (name, listen) in &reach {
                let listener = std::net::TcpListener::bind(listen)
                    .with_context(|| format!("cannot listen on {listen} for --connect {name}"))
                    .map_err(|e| (1, e))?;
                builder = builder.connect(name, listener);
            }
            if let Some(transport) = transport {
                builder = builder.transport(transport);
            }
            if let Some(server) = &file.server {
                builder = builder.server(server);
            }
            if let Some(timeout) = file.send_timeout {
                builder = builder.send_timeout(timeout);
            }
            if let Some(timeout) = file.idle_timeout {
                builder = builder.idle_timeout(timeout);
            }
            if let Some(grace) = file.drain_grace {
                builder = builder.drain_grace(grace);
            }
            let runtime = runtime()?;
            if let Some(addr) = admin.or(file.admin) {
                if !addr.ip().is_loopback() {
                    return Err(usage(revproxy::agent::AgentError::AdminNotLocal(addr)));
                }
                let listener = runtime
                    .block_on(tokio::net::TcpListener::bind(addr))
                    .with_context(|| format!("cannot listen on {addr}"))
                    .map_err(|e| (1, e))?;
                builder = builder.admin_listener(listener);
            }
            let agent = builder.build().map_err(|e| match e {
                revproxy::agent::AgentError::Identity(_)
                | revproxy::agent::AgentError::Tls(_)
                | revproxy::agent::AgentError::Expired(_) => (1, e.into()),
                _ => usage(e),
            })?;
            if let Err(e) = revproxy::runtime::raise_fd_limit() {
                tracing::warn!(error = %e, "cannot raise the open-file limit");
            }
            let reloader = agent.reloader();
            runtime
                .block_on(async move {
                    // SIGHUP re-reads the services (its default would end the process).
                    use tokio::signal::unix::{signal, SignalKind};
                    if let Ok(mut hangups) = signal(SignalKind::hangup()) {
                        tokio::spawn(async move {
                            while hangups.recv().await.is_some() {
                                reload(file_path.as_deref(), &maps, &connects, &reloader).await;
                            }
                        });
                    }
                    agent.run(revproxy::runtime::shutdown_signal()).await
                })
                .map_err(|e| (1, e.into()))?;
        }
        Command::Check { config } => {
            let file = AgentConfig::load(&config).map_err(usage)?;
            eprintln!(
                "{} is valid: {} service(s), {} connect(s)",
                config.display(),
                file.service.len(),
                file.connect.len()
            );
        }
        Command::Status { admin, json } => {
            let target = Target::new(&admin, None).map_err(|e| (1, e.into()))?;
            let text = runtime()?
                .block_on(revproxy::admin::client::status_text(&target, json))
                .map_err(|e| (1, e.into()))?;
            print!("{text}");
        }
        Command::Ready { admin } => {
            let (status, body) = runtime()?
                .block_on(revproxy::admin::client::get(&admin, "/ready"))
                .map_err(|e| (1, e.into()))?;
            if !status.is_success() {
                return Err((1, anyhow::anyhow!("{}", body.trim())));
            }
            println!("{}", body.trim());
        }
    }
    Ok(())
}
