//! Measures how long one enrollment takes end to end: TCP connect, TLS 1.3 with the pinned
//! CA check, the CSR, the proxy's durable token consumption (fsync + rename) and signing,
//! and the agent's crash-safe write of its identity.
//!
//! `cargo run --release --example enroll_latency -- [COUNT]` (default 200). Runs an
//! in-process proxy on 127.0.0.1:0 with a fresh CA in a temporary directory, enrolls COUNT
//! agents one after the other, and prints the median and spread.

use std::time::{Duration, Instant};

use revproxy::ca::{Ca, InitOptions, NewToken};
use revproxy::Proxy;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let count: usize = std::env::args().nth(1).map_or(Ok(200), |s| s.parse())?;
    let dir = tempfile::tempdir()?;
    let now = time::OffsetDateTime::now_utc();
    let ca = Ca::init(dir.path(), &InitOptions::default(), now)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let proxy = Proxy::builder(dir.path())
        .agent_listener(listener)
        .build()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(proxy.run(async {
        let _ = stopped.await;
    }));

    let agents = tempfile::tempdir()?;
    let mut samples = Vec::with_capacity(count);
    for i in 0..count {
        let token = ca.create_token(
            &NewToken {
                agent: format!("bench-{i}"),
                hosts: vec![format!("app{i}.example.com")],
                private_hosts: Vec::new(),
                connect: Vec::new(),
                ttl: Duration::from_secs(600),
                cert_ttl: Duration::from_secs(86400),
                server: Some(addr.to_string()),
            },
            time::OffsetDateTime::now_utc(),
        )?;
        let start = Instant::now();
        revproxy::agent::enroll(&token, &agents.path().join(i.to_string())).await?;
        samples.push(start.elapsed());
    }
    samples.sort();
    let pick = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    println!(
        "enrollments: {count}  min {:.2?}  median {:.2?}  p90 {:.2?}  p99 {:.2?}  max {:.2?}",
        samples[0],
        pick(0.5),
        pick(0.9),
        pick(0.99),
        samples[samples.len() - 1]
    );
    let _ = stop.send(());
    server.await??;
    Ok(())
}
