//! A flood of slow enrollments on the agent port, from many addresses at once: it must
//! not keep agents with certificates out, nor flood the log. In a test binary of its own:
//! it sets the process's open-file limit, which sizes the proxy's connection caps.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Addresses the flood comes from (127.1.N.1: each in a /24 of its own, so no prefix cap
/// applies) and connections from each (the per-address cap).
const ADDRESSES: u8 = 48;
const PER_ADDRESS: usize = 64;
/// The open-file limit the proxy is sized from here: its agent port then takes about
/// 2,000 connections, fewer than the flood's 3,072, as on a machine with the common limit.
const FD_LIMIT: u64 = 16_384;

/// Opens one TLS connection from `from` to the agent port, offering enrollment, and sends
/// a request head whose body never comes. `Err` if the proxy turned it away first.
async fn slow_enrollment(
    proxy: SocketAddr,
    from: IpAddr,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    let tcp = socket.connect(proxy).await?;
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect("localhost".try_into().unwrap(), tcp)
        .await?;
    tls.write_all(
        b"POST /v1/enroll HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 4096\r\n\r\n",
    )
    .await?;
    Ok(tls)
}

/// Kills `agent` and waits until the proxy has let go of its tunnel.
async fn kill(proxy: &TestProxy, agent: TestAgent, name: &str) {
    agent.kill();
    assert!(
        proxy
            .status
            .wait_for_tunnels(name, 0, Duration::from_secs(10))
            .await,
        "the killed agent's tunnel is gone"
    );
}

/// Starts the agent in `dir` again and returns it with how long its new tunnel took to
/// serve `name`.
async fn restart(
    proxy: &TestProxy,
    dir: &std::path::Path,
    backend: SocketAddr,
    name: &str,
) -> (TestAgent, Duration) {
    let started = Instant::now();
    let agent = start_agent(dir, &[(name, backend)], |b| b);
    assert!(
        proxy
            .status
            .wait_for_tunnels(name, 1, Duration::from_secs(30))
            .await,
        "the agent came back"
    );
    (agent, started.elapsed())
}

/// 48 addresses x 64 connections that finish TLS, send an enrollment head and sit, while
/// an agent is away: the agent port closes what is beyond its enrollment budget at once,
/// so the agent is back as fast as without the flood (within 1.5 s), and the log says a
/// line or so per source rather than one per connection.
#[tokio::test]
async fn slow_enrollments_from_many_addresses_keep_no_agent_out() {
    let (_, hard) = rlimit::Resource::NOFILE.get().unwrap();
    assert!(
        hard >= 8192,
        "the flood needs about 7,000 descriptors; the hard limit is {hard}"
    );
    rlimit::Resource::NOFILE
        .set(FD_LIMIT.min(hard), hard)
        .unwrap();
    let (_guard, mut logs) = watch_logs(tracing::Level::INFO);
    let proxy = TestProxy::start().await;
    let backend = echo_backend(b"ok:").await;
    let dir = enroll_agent(&proxy, "web-1", &["app.example.com"]).await;
    let agent = start_agent(dir.path(), &[("app.example.com", backend)], |b| b);
    proxy.wait_for("app.example.com", 1).await;
    kill(&proxy, agent, "app.example.com").await;
    let (agent, quiet) = restart(&proxy, dir.path(), backend, "app.example.com").await;
    // Killed again; while it is away, the flood comes.
    kill(&proxy, agent, "app.example.com").await;
    while logs.try_recv().is_ok() {}

    let config = Arc::new(
        revproxy::tls::pinned_client_config(vec![proxy.pin()], &[revproxy::tls::ALPN_HTTP1])
            .unwrap(),
    );
    let settled = Arc::new(AtomicUsize::new(0));
    let holding = Arc::new(AtomicUsize::new(0));
    let all = usize::from(ADDRESSES) * PER_ADDRESS;
    let (done, mut all_settled) = tokio::sync::watch::channel(0usize);
    let done = Arc::new(done);
    let mut flood = tokio::task::JoinSet::new();
    for n in 0..ADDRESSES {
        let from = IpAddr::V4(Ipv4Addr::new(127, 1, n, 1));
        for _ in 0..PER_ADDRESS {
            let (config, settled, done) = (config.clone(), settled.clone(), done.clone());
            let holding = holding.clone();
            let addr = proxy.addr;
            flood.spawn(async move {
                let held = slow_enrollment(addr, from, config).await;
                if held.is_ok() {
                    holding.fetch_add(1, Ordering::SeqCst);
                }
                done.send_replace(settled.fetch_add(1, Ordering::SeqCst) + 1);
                // Held until the proxy closes it (its body deadline) or the test ends.
                if let Ok(mut tls) = held {
                    let mut buf = [0u8; 256];
                    while matches!(tls.read(&mut buf).await, Ok(n) if n > 0) {}
                    holding.fetch_sub(1, Ordering::SeqCst);
                }
            });
        }
    }
    tokio::time::timeout(
        Duration::from_secs(120),
        all_settled.wait_for(|n| *n == all),
    )
    .await
    .expect("every flood connection was handshaken or turned away")
    .unwrap();
    let held = holding.load(Ordering::SeqCst);
    let (agent, flooded) = restart(&proxy, dir.path(), backend, "app.example.com").await;
    let mut lines = 0;
    while logs.try_recv().is_ok() {
        lines += 1;
    }
    println!(
        "back in {flooded:?} under a flood of {all} slow enrollments ({held} still held), {quiet:?} without; {lines} log lines"
    );
    assert!(
        flooded < Duration::from_millis(1500),
        "the agent took {flooded:?} to come back under the flood ({quiet:?} without)"
    );
    assert!(lines <= 300, "the flood wrote {lines} log lines");
    let served = round_trip(proxy.http, &http_head("app.example.com"), b"")
        .await
        .unwrap();
    assert!(served.starts_with(b"ok:"));
    flood.abort_all();
    agent.stop().await;
    proxy.stop().await;
}
