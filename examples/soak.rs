//! Soak: a proxy and two agents (one on h2, one on QUIC) serving one name, clients
//! looping through it with bytes of their own, and a fault every so often (one agent
//! killed, then started again with the same certificate). Prints a health line every
//! minute; exits non-zero if any byte was lost (a stream that ended cleanly with other
//! bytes than were sent) or descriptors leaked. Streams cut by a fault (a reset, which the
//! client sees) are counted, not failures.
//!
//! `cargo run --release --example soak -- [--minutes 60] [--clients 16] [--fault-every 20]`

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use revproxy::ca::{Ca, InitOptions, NewToken};
use revproxy::{Proxy, Transport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const NAME: &str = "soak.example.com";

#[derive(Default)]
struct Counts {
    ok: AtomicU64,
    cut: AtomicU64,
    lost: AtomicU64,
    bytes: AtomicU64,
}

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Resident memory (KiB) and open descriptors of this process.
fn footprint() -> (u64, usize) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count());
    (rss, fds)
}

/// A backend that echoes everything it reads, then ends its side.
async fn echo_backend() -> anyhow::Result<SocketAddr> {
    let listener = revproxy::runtime::listen("127.0.0.1:0".parse()?)?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut rd, mut wr) = tcp.split();
                if tokio::io::copy(&mut rd, &mut wr).await.is_ok() {
                    let _ = wr.shutdown().await;
                }
            });
        }
    });
    Ok(addr)
}

/// Pseudo-random bytes of `len` from `seed` (xorshift).
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// One client, looping until `until`: each connection sends a head and bytes of its own
/// and must get exactly them back.
async fn client(http: SocketAddr, id: u64, counts: Arc<Counts>, until: Instant) {
    let head = format!("POST / HTTP/1.1\r\nHost: {NAME}\r\n\r\n").into_bytes();
    let mut round = 0u64;
    while Instant::now() < until {
        round += 1;
        let seed = id << 32 | round;
        let data = pattern(1 + (seed as usize * 7919) % (256 * 1024), seed);
        let mut sent = head.clone();
        sent.extend_from_slice(&data);
        let exchange = async {
            let tcp = tokio::net::TcpStream::connect(http).await?;
            let (mut rd, mut wr) = tcp.into_split();
            let out = sent.clone();
            let writer = tokio::spawn(async move {
                wr.write_all(&out).await?;
                wr.shutdown().await
            });
            let mut back = Vec::new();
            rd.read_to_end(&mut back).await?;
            writer.await.map_err(std::io::Error::other)??;
            Ok::<_, std::io::Error>(back)
        };
        match tokio::time::timeout(Duration::from_secs(60), exchange).await {
            Ok(Ok(back)) if back == sent => {
                counts.ok.fetch_add(1, Ordering::Relaxed);
                counts
                    .bytes
                    .fetch_add(2 * sent.len() as u64, Ordering::Relaxed);
            }
            Ok(Ok(back)) => {
                counts.lost.fetch_add(1, Ordering::Relaxed);
                eprintln!(
                    "LOST: client {id} round {round}: sent {} bytes, a clean end after {} (of which the first {} matched)",
                    sent.len(),
                    back.len(),
                    back.iter().zip(&sent).take_while(|(a, b)| a == b).count()
                );
            }
            // Cut by a fault: the client was told (a reset or a refusal).
            Ok(Err(_)) | Err(_) => {
                counts.cut.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// An agent running until its task is aborted (a kill) or `stop` fires.
fn start_agent(
    dir: &std::path::Path,
    backend: SocketAddr,
    transport: Transport,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let agent = revproxy::Agent::builder(dir)
        .service(NAME, &backend.to_string())
        .transport(transport)
        .build()?;
    Ok(tokio::spawn(async move {
        let _ = agent.run(std::future::pending()).await;
    }))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let minutes = arg("--minutes", 60);
    let clients = arg("--clients", 16);
    let fault_every = Duration::from_secs(arg("--fault-every", 20));
    let dir = tempfile::tempdir()?;
    let state = dir.path().join("proxy");
    let ca = Ca::init(
        &state,
        &InitOptions::default(),
        time::OffsetDateTime::now_utc(),
    )?;
    let agents_listener = revproxy::runtime::listen("127.0.0.1:0".parse()?)?;
    let agents = agents_listener.local_addr()?;
    let http_listener = revproxy::runtime::listen("127.0.0.1:0".parse()?)?;
    let http = http_listener.local_addr()?;
    let proxy = Proxy::builder(&state)
        .agent_listener(agents_listener)
        .http_listener(http_listener)
        .max_connections_per_source(4096)
        .build()?;
    let status = proxy.status();
    let (stop_proxy, stopped) = tokio::sync::oneshot::channel::<()>();
    let proxy_task = tokio::spawn(proxy.run(async {
        let _ = stopped.await;
    }));

    // Two agents for the name: one over h2, one over QUIC, each with its own backend.
    let mut running = Vec::new();
    for (name, transport) in [("soak-h2", Transport::H2), ("soak-quic", Transport::Quic)] {
        let token = ca.create_token(
            &NewToken {
                agent: name.into(),
                hosts: vec![NAME.into()],
                private_hosts: Vec::new(),
                connect: Vec::new(),
                ttl: Duration::from_secs(3600),
                cert_ttl: Duration::from_secs(7 * 24 * 3600),
                server: Some(agents.to_string()),
            },
            time::OffsetDateTime::now_utc(),
        )?;
        let agent_dir = dir.path().join(name);
        revproxy::agent::enroll(&token, &agent_dir).await?;
        let backend = echo_backend().await?;
        let task = start_agent(&agent_dir, backend, transport)?;
        running.push((agent_dir, backend, transport, task));
    }
    while status.tunnels_for(NAME) < 2 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let counts = Arc::new(Counts::default());
    let started = Instant::now();
    let until = started + Duration::from_secs(minutes * 60);
    let traffic: Vec<_> = (0..clients)
        .map(|id| tokio::spawn(client(http, id, counts.clone(), until)))
        .collect();

    println!("soak: {minutes} min, {clients} clients, a fault every {fault_every:?}");
    let mut baseline = None;
    let mut next_fault = Instant::now() + fault_every;
    let mut next_report = Instant::now() + Duration::from_secs(60);
    let mut faults = 0u64;
    let mut leaked = false;
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if Instant::now() >= next_report {
            next_report += Duration::from_secs(60);
            let (rss, fds) = footprint();
            let base = *baseline.get_or_insert((rss, fds));
            println!(
                "soak: {:>3} min  ok {:>8}  cut {:>5}  lost {}  moved {:>7} MiB  faults {:>3}  tunnels {}  rss {} KiB (first {})  fds {} (first {})",
                started.elapsed().as_secs() / 60,
                counts.ok.load(Ordering::Relaxed),
                counts.cut.load(Ordering::Relaxed),
                counts.lost.load(Ordering::Relaxed),
                counts.bytes.load(Ordering::Relaxed) >> 20,
                faults,
                status.tunnels_for(NAME),
                rss,
                base.0,
                fds,
                base.1,
            );
        }
        if Instant::now() >= next_fault {
            // Kill one agent (as SIGKILL would: its sockets close, nothing drains), then
            // start it again with the same certificate.
            let which = (faults % 2) as usize;
            faults += 1;
            let (agent_dir, backend, transport, task) = &mut running[which];
            task.abort();
            tokio::time::sleep(Duration::from_secs(1)).await;
            *task = start_agent(agent_dir, *backend, *transport)?;
            next_fault += fault_every;
        }
    }
    for t in traffic {
        let _ = t.await;
    }
    // Everything the clients opened is closed: the descriptors are back where the first
    // minute had them (give the agents a moment to finish restarting).
    let mut settled = footprint();
    for _ in 0..50 {
        if baseline.is_none_or(|(_, fds)| settled.1 <= fds + 16) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        settled = footprint();
    }
    if let Some((rss0, fds0)) = baseline {
        if settled.1 > fds0 + 16 {
            leaked = true;
            eprintln!(
                "LEAK: {} descriptors open at the end, {fds0} after the first minute",
                settled.1
            );
        }
        println!(
            "soak: end: rss {} KiB (after the first minute {rss0}), fds {} (then {fds0})",
            settled.0, settled.1
        );
    }
    let lost = counts.lost.load(Ordering::Relaxed);
    println!(
        "soak: {} streams ok, {} cut by the {faults} faults, {lost} lost",
        counts.ok.load(Ordering::Relaxed),
        counts.cut.load(Ordering::Relaxed)
    );
    for (_, _, _, task) in running {
        task.abort();
    }
    let _ = stop_proxy.send(());
    let _ = proxy_task.await;
    if lost > 0 || leaked {
        std::process::exit(1);
    }
    Ok(())
}
