//! A serving proxy's SIGHUP (reload the configuration) and SIGUSR2 (start its successor).

use crate::serve::{reload_from, ServeArgs};

/// The granted ports' settings: read at start only.
#[derive(Debug, PartialEq)]
pub(crate) struct ReadAtStart {
    ports: Option<revproxy::ca::ports::PortRange>,
    bind: Option<std::net::IpAddr>,
    udp: Option<revproxy::proxy::UdpLimits>,
}

impl ReadAtStart {
    pub(crate) fn of(config: &revproxy::config::ProxyConfig) -> ReadAtStart {
        ReadAtStart {
            ports: config.ports,
            bind: config.ports_bind,
            udp: config.udp_limits().ok(),
        }
    }
}

/// Re-reads the configuration at every SIGHUP and hands it to the running proxy; a file
/// that does not read keeps the running configuration (logged and counted).
pub(crate) async fn reload_on_hangup(
    args: ServeArgs,
    mut hangups: tokio::signal::unix::Signal,
    reloader: revproxy::proxy::Reloader,
    at_start: ReadAtStart,
) {
    while hangups.recv().await.is_some() {
        tracing::info!("SIGHUP: reading the configuration again");
        let read = args.effective_config();
        // Read at start only: a reload that changes them says so.
        if let Ok(config) = &read {
            if ReadAtStart::of(config) != at_start {
                tracing::warn!(
                    "ports, ports_bind and the udp_* keys are read at start: the running ones stay until a restart"
                );
            }
        }
        match read.and_then(|config| reload_from(&config)) {
            Ok(reload) => {
                // The proxy logs and counts the outcome.
                let _ = reloader.reload(reload).await;
            }
            Err(e) => reloader.invalid(crate::sentence::sentence(&e)).await,
        }
    }
}

/// At every SIGUSR2, starts this program again with the same arguments and `--upgrade`:
/// the binary now at that path takes the sockets over (what `systemctl kill -s USR2`
/// does for a service: the new process stays in the service and tells systemd it is the
/// main one).
pub(crate) async fn upgrade_on_usr2(mut signals: tokio::signal::unix::Signal) {
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
