//! Many agents in one process, for `bench/idle.py` (issue 33): each with its own identity
//! (its own key, certificate and name) and its own connection to the proxy, as that many
//! `revproxy-agent` processes would have, without a process each.
//!
//! ```text
//! idle_agents enroll --state PROXY_STATE --server ADDR --dir DIR --count N [--first I]
//! idle_agents run --dir DIR --count N [--first I] [--transport h2|quic]
//! ```
//!
//! `enroll` creates a token per agent in the proxy's state (as `revproxy token create`
//! does) and enrolls it with the running proxy at ADDR into `DIR/I` (agent `idle-I`,
//! serving `idleI.bench.test`). `run` starts the agents `DIR/first..first+count`, prints
//! `running N` and runs until SIGTERM or SIGINT. Their service points at a closed port:
//! the tunnels stay idle.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use revproxy::ca::{Ca, NewToken};
use revproxy::{Agent, Transport};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

/// Enrollments under way at once.
const ENROLLING: usize = 16;

/// The value after `--name`, if any.
fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn number(args: &[String], name: &str, default: usize) -> anyhow::Result<usize> {
    arg(args, name).map_or(Ok(default), |v| {
        v.parse().with_context(|| format!("{name} {v}"))
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir = PathBuf::from(arg(&args, "--dir").context("--dir DIR is required")?);
    let first = number(&args, "--first", 0)?;
    let count = number(&args, "--count", 1)?;
    match args.get(1).map(String::as_str) {
        Some("enroll") => {
            let state = arg(&args, "--state").context("--state DIR is required")?;
            let server = arg(&args, "--server").context("--server ADDR is required")?;
            enroll(Path::new(&state), &server, &dir, first..first + count).await
        }
        Some("run") => {
            let transport = match arg(&args, "--transport").as_deref() {
                None | Some("h2") => Transport::H2,
                Some("quic") => Transport::Quic,
                Some(other) => anyhow::bail!("--transport {other}: h2 or quic"),
            };
            run(&dir, first..first + count, transport).await
        }
        _ => anyhow::bail!("usage: idle_agents enroll|run --dir DIR --count N ..."),
    }
}

async fn enroll(
    state: &Path,
    server: &str,
    dir: &Path,
    which: std::ops::Range<usize>,
) -> anyhow::Result<()> {
    let ca = Ca::open(state).context("opening the proxy's state")?;
    let now = time::OffsetDateTime::now_utc();
    let slots = Arc::new(Semaphore::new(ENROLLING));
    let mut enrolling = JoinSet::new();
    for i in which.clone() {
        let token = ca.create_token(
            &NewToken {
                agent: format!("idle-{i}"),
                hosts: vec![format!("idle{i}.bench.test")],
                private_hosts: Vec::new(),
                connect: Vec::new(),
                ttl: Duration::from_secs(3600),
                cert_ttl: Duration::from_secs(7 * 86400),
                server: Some(server.to_string()),
            },
            now,
        )?;
        let slot = slots.clone().acquire_owned().await?;
        let into = dir.join(i.to_string());
        enrolling.spawn(async move {
            let _slot = slot;
            revproxy::agent::enroll(&token, &into)
                .await
                .with_context(|| format!("enrolling agent {i}"))
        });
        while let Some(done) = enrolling.try_join_next() {
            done??;
        }
    }
    while let Some(done) = enrolling.join_next().await {
        done??;
    }
    println!("enrolled {}", which.len());
    Ok(())
}

async fn run(
    dir: &Path,
    which: std::ops::Range<usize>,
    transport: Transport,
) -> anyhow::Result<()> {
    let (stop, stopped) = watch::channel(false);
    let mut running = JoinSet::new();
    for i in which.clone() {
        let agent = Agent::builder(dir.join(i.to_string()))
            // Nothing listens there; no client ever comes.
            .service(&format!("idle{i}.bench.test"), "127.0.0.1:9")
            .transport(transport)
            .build()
            .with_context(|| format!("agent {i}"))?;
        let mut stopped = stopped.clone();
        running.spawn(agent.run(async move {
            let _ = stopped.wait_for(|s| *s).await;
        }));
    }
    println!("running {}", which.len());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
        Some(ended) = running.join_next() => {
            anyhow::bail!("an agent stopped by itself: {:?}", ended?);
        }
    }
    stop.send_replace(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while running.join_next().await.is_some() {}
    })
    .await;
    Ok(())
}
