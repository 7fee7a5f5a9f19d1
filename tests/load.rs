//! Load, over both transports: thousands of client connections at once through one
//! tunnel, each with bytes of its own that must come back exact. A tunnel carries at most
//! 1,023 streams at a time (the agent's limit): the rest wait for a slot, within the
//! proxy's 15 s open deadline, and none may be lost.
//!
//! `REVPROXY_LOAD_STREAMS` sets the number of connections (default 10,000).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use revproxy::Transport;

const NAME: &str = "app.example.com";

/// The connections to make: `REVPROXY_LOAD_STREAMS`, or 10,000, but no more than the
/// open-file limit allows (each takes one descriptor here and one in the proxy process;
/// the agent and its backend hold at most a tunnel's 1,023 streams' worth).
fn streams() -> usize {
    let wanted = std::env::var("REVPROXY_LOAD_STREAMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let limit = revproxy::runtime::raise_fd_limit().unwrap();
    let fits = limit.saturating_sub(3000) as usize;
    if fits < wanted {
        eprintln!("the open-file limit ({limit}) fits {fits} connections, not {wanted}");
    }
    wanted.min(fits)
}

/// `revproxy serve` in a process of its own (so that the clients' descriptors and the
/// proxy's are counted apart), an agent on `t` serving NAME from an echo backend: the
/// proxy's public HTTP listener, and what to keep alive.
async fn deployment(
    t: Transport,
    count: usize,
) -> (
    std::net::SocketAddr,
    (Killed, tempfile::TempDir, tempfile::TempDir, TestAgent),
) {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            "agents = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\nadmin = \"off\"\n\
             log_format = \"json\"\nmax_connections_per_source = {}\n",
            2 * count
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_revproxy"))
        .args(["serve", "--state"])
        .arg(&state)
        .arg("--config")
        .arg(&config)
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let lines = stderr_lines(&mut child);
    let (mut agents, mut http) = (None, None);
    while agents.is_none() || http.is_none() {
        let line = lines
            .recv_timeout(Duration::from_secs(30))
            .expect("the proxy started");
        let doc: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        let addr = doc["addr"].as_str().and_then(|a| a.parse().ok());
        match doc["message"].as_str() {
            Some("agent listener ready") => agents = addr,
            Some("public listener ready") => http = addr,
            _ => {}
        }
    }
    let agents: std::net::SocketAddr = agents.unwrap();
    let token = revproxy::ca::Ca::open(&state)
        .unwrap()
        .create_token(
            &revproxy::ca::NewToken {
                agent: "web-1".into(),
                hosts: vec![NAME.into()],
                private_hosts: Vec::new(),
                connect: Vec::new(),
                ttl: Duration::from_secs(3600),
                cert_ttl: Duration::from_secs(24 * 3600),
                server: Some(agents.to_string()),
            },
            time::OffsetDateTime::now_utc(),
        )
        .unwrap();
    let agent_dir = tempfile::tempdir().unwrap();
    revproxy::agent::enroll(&token, agent_dir.path())
        .await
        .unwrap();
    let backend = echo_backend(b"").await;
    let agent = start_agent(agent_dir.path(), &[(NAME, backend)], on(t));
    // Served once the tunnel is up.
    let http = http.unwrap();
    eventually("the agent's tunnel serves", || async {
        round_trip(http, &http_head(NAME), b"x")
            .await
            .is_ok_and(|back| back.ends_with(b"x"))
    })
    .await;
    (http, (Killed(child), dir, agent_dir, agent))
}

/// Sends `prefix` and `data`, half-closes, and returns everything read back.
async fn exchange(
    tcp: tokio::net::TcpStream,
    prefix: &[u8],
    data: &[u8],
) -> std::io::Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut rd, mut wr) = tcp.into_split();
    let mut out = prefix.to_vec();
    out.extend_from_slice(data);
    let writer = tokio::spawn(async move {
        wr.write_all(&out).await?;
        wr.shutdown().await
    });
    let mut back = Vec::new();
    rd.read_to_end(&mut back).await?;
    writer.await.unwrap()?;
    Ok(back)
}

async fn ten_thousand_connections_through_one_tunnel_arrive_byte_exact(t: Transport) {
    let count = streams();
    let (http, _running) = deployment(t, count).await;

    let started = Instant::now();
    let done = Arc::new(AtomicUsize::new(0));
    // All connections are made at once, but at most 256 are being set up at any moment:
    // the kernel's SYN queue (1,024 deep here) would otherwise drop some and answer
    // their late handshakes with a reset, which is the test machine's limit, not ours.
    let connecting = Arc::new(tokio::sync::Semaphore::new(256));
    let clients: Vec<_> = (0..count as u64)
        .map(|i| {
            let (done, connecting) = (done.clone(), connecting.clone());
            tokio::spawn(async move {
                let data = pattern(4096 + (i as usize % 7) * 1000, i);
                let head = http_head(NAME);
                let back = async {
                    let tcp = {
                        let _turn = connecting.acquire().await.unwrap();
                        tokio::net::TcpStream::connect(http).await?
                    };
                    exchange(tcp, &head, &data).await
                }
                .await;
                done.fetch_add(1, Ordering::Relaxed);
                match back {
                    Ok(back)
                        if back.len() == head.len() + data.len()
                            && back[head.len()..] == data[..] =>
                    {
                        Ok(())
                    }
                    Ok(back) => Err(format!(
                        "connection {i}: {} bytes back, not its {}",
                        back.len(),
                        head.len() + data.len()
                    )),
                    Err(e) => Err(format!("connection {i}: {e}")),
                }
            })
        })
        .collect();
    let mut failures = Vec::new();
    for c in clients {
        match tokio::time::timeout(Duration::from_secs(120), c).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => failures.push(e),
            Ok(Err(e)) => failures.push(e.to_string()),
            Err(_) => failures.push(format!(
                "a connection did not finish within 120 s ({} done)",
                done.load(Ordering::Relaxed)
            )),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {count} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    eprintln!(
        "{t:?}: {count} connections through one tunnel, all byte-exact, in {:?}",
        started.elapsed()
    );
}

/// Both transports in one test, one after the other: side by side they would share this
/// process's open-file limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_connections_through_one_tunnel_arrive_byte_exact_over_both_transports() {
    for t in [Transport::H2, Transport::Quic] {
        ten_thousand_connections_through_one_tunnel_arrive_byte_exact(t).await;
    }
}
