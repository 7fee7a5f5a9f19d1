//! `revproxy serve`: config from file and flags, listeners bound or taken over, the proxy built.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use revproxy::ca::{Ca, InitOptions};
use revproxy::config::{AdminAddr, ProxyConfig};
use revproxy::runtime::handover;
use revproxy::runtime::logging::LogFormat;
use revproxy::Proxy;

use crate::ca::print_init_notes;
use crate::signals::{reload_on_hangup, upgrade_on_usr2, ReadAtStart};
use crate::state::{store_failure, StateArg};
use crate::Failure;

use revproxy::config::{DEFAULT_ADMIN, DEFAULT_AGENTS};

#[derive(Args)]
pub(crate) struct ServeArgs {
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
    admin: Option<AdminAddr>,
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

impl ServeArgs {
    /// The configuration `serve` runs with: the file (if any), the flags over it.
    pub(crate) fn effective_config(&self) -> Result<ProxyConfig, anyhow::Error> {
        let mut config = match &self.config {
            Some(path) => ProxyConfig::load(path)?,
            None => ProxyConfig::default(),
        };
        config.agents = self.agents.or(config.agents);
        config.sni = self.sni.or(config.sni);
        config.http = self.http.or(config.http);
        config.admin = self.admin.or(config.admin);
        config.store = (self.state.store.clone())
            .map(revproxy::store::StoreUrl)
            .or(config.store);
        config.advertise = self.advertise.clone().or(config.advertise);
        config.validate()?;
        Ok(config)
    }

    /// Runs the proxy until SIGINT or SIGTERM (or until a successor took over).
    pub(crate) fn run(self) -> Result<(), Failure> {
        let config = self.effective_config().map_err(Failure::usage)?;
        revproxy::runtime::logging::init(
            "info",
            self.log_format.or(config.log_format).unwrap_or_default(),
        );
        // The same reading of the file as a reload's.
        let initial = reload_from(&config).map_err(Failure::usage)?;
        let dir = (self.state.state.clone())
            .or(config.state.clone())
            .unwrap_or_else(revproxy::runtime::dirs::proxy_state_dir);
        let agents_addr = config.agents.unwrap_or(DEFAULT_AGENTS);

        // The running proxy's sockets, first (an upgrade creates nothing): it keeps serving
        // until this one says it does.
        let mut inherited = match self.upgrade {
            true => {
                let taken = handover::take_over(&dir)?;
                tracing::info!(sockets = %revproxy::runtime::logging::list(taken.described()), "listening sockets taken over from the running proxy");
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
            // SIGINT and SIGTERM stop the proxy cleanly from here on, not only once it runs:
            // a Ctrl-C right after "agent listener ready" would otherwise kill it outright.
            let shutdown = stop_signals()?;
            // SIGUSR2 upgrades in place (its default would end the process too).
            let usr2 =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined2())
                    .context("cannot watch for SIGUSR2")?;
            // Without --upgrade, a proxy already serving this state directory is refused
            // here, before any port is tried.
            let upgrades = match self.upgrade {
                false => Some(handover::Listener::bind(&dir)?),
                true => None,
            };
            let mut builder = Proxy::builder(&dir).agent_listener(
                listen(&mut inherited, handover::Role::Agents, agents_addr).await?,
            );
            if let Some(inherited) = inherited.as_mut() {
                let mut group = Vec::new();
                while let Some(udp) = inherited
                    .udp(agents_addr)
                    .context("cannot take the QUIC sockets over")?
                {
                    group.push(udp);
                }
                builder = builder.quic_listeners(group);
            }
            if let Some(url) = &config.store {
                builder = builder.store(&url.0);
            }
            if let Some(addr) = &config.advertise {
                builder = builder.advertise(addr);
            }
            builder = builder.trusted_proxies(initial.trusted_proxies);
            if let Some(range) = config.ports {
                let bind = config.ports_bind.unwrap_or(revproxy::config::DEFAULT_PORTS_BIND);
                builder = builder.granted_ports(range, bind);
                builder = builder.udp_limits(config.udp_limits().map_err(Failure::usage)?);
            }
            if let Some(acme) = config.acme_settings().map_err(Failure::usage)? {
                builder = builder.acme(acme);
            }
            let admin = match config.admin {
                Some(AdminAddr::Off) => None,
                Some(AdminAddr::At(addr)) => Some(addr),
                None => Some(DEFAULT_ADMIN),
            };
            if let Some(addr) = admin {
                builder = builder
                    .admin_listener(listen(&mut inherited, handover::Role::Admin, addr).await?);
            }
            for (addr, kind) in initial.listeners {
                let listener = listen(&mut inherited, handover::Role::Public, addr).await?;
                builder = builder.listener(listener, kind);
            }
            // Granted ports the running process listens on: kept while its agents move here.
            if let (Some(taken), Some(range)) = (inherited.as_mut(), config.ports) {
                let bind = config.ports_bind.unwrap_or(revproxy::config::DEFAULT_PORTS_BIND);
                for d in taken.described() {
                    let granted = d.role == handover::Role::Public
                        && d.addr.ip() == bind
                        && range.contains(d.addr.port());
                    if !granted {
                        continue;
                    }
                    let socket = (taken.tcp(handover::Role::Public, d.addr))
                        .with_context(|| format!("cannot take {} over", d.addr))?;
                    if let Some(socket) = socket {
                        builder = builder.granted_listener(tokio::net::TcpListener::from_std(socket)?);
                    }
                }
            }
            if let Some(inherited) = inherited.take() {
                let (confirmation, unused) = inherited.finish();
                if !unused.is_empty() {
                    tracing::info!(sockets = %revproxy::runtime::logging::list(&unused), "sockets the configuration no longer has are closed here (the old process stops accepting on them)");
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
            if let Some(max) = config.max_agent_connections {
                builder = builder.max_agent_connections(max);
            }
            if let Some(bytes) = config.stream_buffer_budget {
                builder = builder.stream_buffer_budget(bytes);
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
            let ports = ReadAtStart::of(&config);
            tokio::spawn(reload_on_hangup(self, hangups, proxy.reloader(), ports));
            tokio::spawn(upgrade_on_usr2(usr2));
            proxy.run(shutdown).await?;
            Ok::<_, Failure>(())
        })
    }
}

/// Resolves on SIGINT or SIGTERM; both are caught from the moment this returns.
fn stop_signals() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot watch for SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot watch for SIGTERM")?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        tracing::info!("shutdown signal received");
    })
}

/// What a reload may change, from a configuration.
pub(crate) fn reload_from(config: &ProxyConfig) -> Result<revproxy::proxy::Reload, anyhow::Error> {
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
