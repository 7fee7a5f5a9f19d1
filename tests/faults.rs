//! Crashes, over both transports, with real processes killed by SIGKILL (which sends
//! nothing: over QUIC a dead peer is only noticed by what no longer arrives).
//!
//! - An agent killed and started again with the same certificate takes its names back at
//!   once: its dead tunnel (still registered until it times out, over QUIC) gets no new
//!   streams.
//! - The agent's path to the proxy going dark (packets dropped, no reset) drops the
//!   tunnel within the keep-alive bound, and the agent is back once the path heals.
//! - A proxy killed and started again has its agents back within a second of listening:
//!   over h2 they reconnect quickly after losing a tunnel that was up; over QUIC the new
//!   process sends the last one's agents (its table in the state directory) a stateless
//!   reset they accept (the reset key outlives the process), so they do not wait for
//!   their next keep-alive (15 s apart) or the idle timeout.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use revproxy::ca::Ca;
use revproxy::Transport;

const NAME: &str = "app.example.com";

fn transport_flag(t: Transport) -> &'static str {
    match t {
        Transport::Quic => "quic",
        _ => "h2",
    }
}

/// Waits (bounded, 30 s) for a JSON log line with `message`; when it came, and the line.
fn logged(
    lines: &std::sync::mpsc::Receiver<String>,
    message: &str,
) -> (Instant, serde_json::Value) {
    let deadline = Instant::now() + Duration::from_secs(30);
    tokio::task::block_in_place(|| loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no log line {message:?} within 30 s"));
        if let Ok(doc) = serde_json::from_str::<serde_json::Value>(&line) {
            if doc["message"] == message {
                return (Instant::now(), doc);
            }
        }
    })
}

/// `revproxy-agent run` serving NAME from `backend` on transport `t`.
fn agent_process(state: &Path, backend: SocketAddr, t: Transport) -> Killed {
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_revproxy-agent"))
        .args([
            "run",
            "--log-format",
            "json",
            "--transport",
            transport_flag(t),
        ])
        .arg("--state")
        .arg(state)
        .arg("--map")
        .arg(format!("{NAME}={backend}"))
        .stderr(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    Killed(child)
}

/// One request through the proxy, answered by the echo backend within `within`.
async fn served(http: SocketAddr, within: Duration) -> Result<(), String> {
    let data = pattern(1024, 7);
    let got = tokio::time::timeout(within, round_trip(http, &http_head(NAME), &data))
        .await
        .map_err(|_| format!("no answer within {within:?}"))?
        .map_err(|e| e.to_string())?;
    let mut want = b"B:".to_vec();
    want.extend_from_slice(&http_head(NAME));
    want.extend_from_slice(&data);
    if got == want {
        Ok(())
    } else {
        Err(format!(
            "wrong answer: {:?}",
            String::from_utf8_lossy(&got[..got.len().min(100)])
        ))
    }
}

async fn a_crashed_agent_restarted_takes_its_names_back_at_once(t: Transport) {
    let proxy = TestProxy::start().await;
    let backend = echo_backend(b"B:").await;
    let dir = enroll_agent(&proxy, "web-1", &[NAME]).await;
    let mut first = agent_process(dir.path(), backend, t);
    proxy.wait_for(NAME, 1).await;
    served(proxy.http, Duration::from_secs(5)).await.unwrap();
    let before = proxy.status.tunnel_ids_of("web-1");

    signal(first.0.id(), "KILL");
    first.0.wait().unwrap();
    let restarted = Instant::now();
    let _second = agent_process(dir.path(), backend, t);
    eventually("a new tunnel from the restarted agent", || async {
        (proxy.status.tunnel_ids_of("web-1").iter()).any(|id| !before.contains(id))
    })
    .await;
    let registered = restarted.elapsed();
    // Every request from here on is served by the new tunnel; none waits on the dead one.
    for i in 0..20 {
        if let Err(e) = served(proxy.http, Duration::from_secs(2)).await {
            panic!("request {i} after the restart: {e}");
        }
    }
    eprintln!(
        "{}: the restarted agent's tunnel registered {registered:?} after its start; the dead one {}",
        transport_flag(t),
        if proxy.status.tunnel_ids_of("web-1").len() > 1 {
            "is still registered (it has not timed out) and got no stream"
        } else {
            "was gone already"
        }
    );
}

async fn a_crashed_proxy_restarted_has_its_agents_back_within_a_second(t: Transport) {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let config = dir.path().join("proxy.toml");
    // Fixed ports: the restarted proxy listens where the first one did.
    let (agents, http) = (free_port("127.0.0.1"), free_port("127.0.0.1"));
    std::fs::write(
        &config,
        format!(
            "agents = \"127.0.0.1:{agents}\"\nhttp = \"127.0.0.1:{http}\"\nadmin = \"off\"\n\
             log_format = \"json\"\n"
        ),
    )
    .unwrap();
    let serve = || {
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
        (Killed(child), lines)
    };
    let (mut proxy, lines) = serve();
    logged(&lines, "agent listener ready");
    let agents = SocketAddr::from(([127, 0, 0, 1], agents));
    let agent_dir = enrolled(&Ca::open(&state).unwrap(), agents, "web-1", NAME).await;
    let backend = echo_backend(b"B:").await;
    let _agent = start_agent(agent_dir.path(), &[(NAME, backend)], on(t));
    logged(&lines, "tunnel up");
    let http = SocketAddr::from(([127, 0, 0, 1], http));
    served(http, Duration::from_secs(5)).await.unwrap();
    // The tunnel has been up a while, as before a real crash: an agent counts a tunnel as
    // up (and reconnects fast after losing it) once it has served for a second, so that a
    // proxy refusing tunnels right after the handshake does not make it retry fast.
    tokio::time::sleep(Duration::from_secs(1)).await;

    signal(proxy.0.id(), "KILL");
    proxy.0.wait().unwrap();
    // Down for a while, as a crashed proxy is while it restarts: long enough that a plain
    // exponential backoff would have grown past a second (0.1 + 0.2 + 0.4 + 0.8 s).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_proxy, lines) = serve();
    let (listening, _) = logged(&lines, "agent listener ready");
    let (up, _) = logged(&lines, "tunnel up");
    let away = up.saturating_duration_since(listening);
    assert!(
        away < Duration::from_secs(1),
        "the agent came back {away:?} after the proxy listened again"
    );
    served(http, Duration::from_secs(5)).await.unwrap();
    eprintln!(
        "{}: agent back {away:?} after the restarted proxy listened",
        transport_flag(t)
    );
}

mod h2 {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_blackholed_path_drops_the_tunnel_and_the_agent_returns_when_it_heals() {
        super::a_blackholed_path_drops_the_tunnel_and_the_agent_returns_when_it_heals(
            revproxy::Transport::H2,
        )
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_crashed_agent_restarted_takes_its_names_back_at_once() {
        super::a_crashed_agent_restarted_takes_its_names_back_at_once(revproxy::Transport::H2).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_crashed_proxy_restarted_has_its_agents_back_within_a_second() {
        super::a_crashed_proxy_restarted_has_its_agents_back_within_a_second(
            revproxy::Transport::H2,
        )
        .await
    }
}

mod quic {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_blackholed_path_drops_the_tunnel_and_the_agent_returns_when_it_heals() {
        super::a_blackholed_path_drops_the_tunnel_and_the_agent_returns_when_it_heals(
            revproxy::Transport::Quic,
        )
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_crashed_agent_restarted_takes_its_names_back_at_once() {
        super::a_crashed_agent_restarted_takes_its_names_back_at_once(revproxy::Transport::Quic)
            .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_crashed_proxy_restarted_has_its_agents_back_within_a_second() {
        super::a_crashed_proxy_restarted_has_its_agents_back_within_a_second(
            revproxy::Transport::Quic,
        )
        .await
    }
}

/// The network between the agent and the proxy, in the test's hands: TCP connections and
/// UDP datagrams to `front` go on to `upstream` until it is cut. Cut, it is a black hole:
/// TCP bytes wait unforwarded (no reset, no end), UDP datagrams vanish. Healed, TCP bytes
/// flow again and datagrams pass.
struct NetPath {
    cut: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl NetPath {
    async fn start(upstream: SocketAddr) -> (NetPath, SocketAddr) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // TCP and UDP on one port number, as the agent port is.
        let (tcp, udp) = loop {
            let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            if let Ok(udp) = tokio::net::UdpSocket::bind(tcp.local_addr().unwrap()).await {
                break (tcp, udp);
            }
        };
        let front = tcp.local_addr().unwrap();
        let (cut, watching) = tokio::sync::watch::channel(false);
        let pump = |mut rd: tokio::net::tcp::OwnedReadHalf,
                    mut wr: tokio::net::tcp::OwnedWriteHalf,
                    mut cut: tokio::sync::watch::Receiver<bool>| async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let _ = cut.wait_for(|c| !*c).await;
                let n = match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                // What was read when the path went dark waits until it heals.
                let _ = cut.wait_for(|c| !*c).await;
                if wr.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            let _ = wr.shutdown().await;
        };
        let tcp_task = {
            let watching = watching.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((agent, _)) = tcp.accept().await else {
                        return;
                    };
                    let Ok(proxy) = tokio::net::TcpStream::connect(upstream).await else {
                        continue;
                    };
                    let (ar, aw) = agent.into_split();
                    let (pr, pw) = proxy.into_split();
                    tokio::spawn(pump(ar, pw, watching.clone()));
                    tokio::spawn(pump(pr, aw, watching.clone()));
                }
            })
        };
        let udp_task = tokio::spawn(async move {
            let up = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let mut agent = None;
            let (mut a, mut p) = (vec![0u8; 65536], vec![0u8; 65536]);
            loop {
                tokio::select! {
                    Ok((n, from)) = udp.recv_from(&mut a) => {
                        agent = Some(from);
                        let dark = *watching.borrow();
                        if !dark {
                            let _ = up.send_to(&a[..n], upstream).await;
                        }
                    }
                    Ok((n, _)) = up.recv_from(&mut p) => {
                        let dark = *watching.borrow();
                        if let (false, Some(to)) = (dark, agent) {
                            let _ = udp.send_to(&p[..n], to).await;
                        }
                    }
                }
            }
        });
        (
            NetPath {
                cut,
                tasks: vec![tcp_task, udp_task],
            },
            front,
        )
    }

    fn cut(&self, cut: bool) {
        self.cut.send_replace(cut);
    }
}

impl Drop for NetPath {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// The agent's path to the proxy goes dark (no reset, no end: packets just stop): the
/// proxy drops the tunnel within its keep-alive bound, 30 s (h2: 17 s of silence, then a
/// PING answered within 10 s; QUIC: 27 s of silence), and once the path heals the agent is
/// back within the same bound.
async fn a_blackholed_path_drops_the_tunnel_and_the_agent_returns_when_it_heals(t: Transport) {
    let proxy = TestProxy::start().await;
    let (path, front) = NetPath::start(proxy.addr).await;
    let backend = echo_backend(b"B:").await;
    let dir = enroll_agent(&proxy, "web-1", &[NAME]).await;
    let _agent = start_agent(dir.path(), &[(NAME, backend)], move |b| {
        b.transport(t).server(&front.to_string())
    });
    proxy.wait_for(NAME, 1).await;
    served(proxy.http, Duration::from_secs(5)).await.unwrap();

    path.cut(true);
    let dark = Instant::now();
    let bound = Duration::from_secs(30);
    assert!(
        proxy.status.wait_for_agent("web-1", 0, bound).await,
        "the proxy still holds the tunnel {bound:?} after the path went dark"
    );
    let dropped = dark.elapsed();

    path.cut(false);
    let healed = Instant::now();
    assert!(
        proxy.status.wait_for_agent("web-1", 1, bound).await,
        "the agent was not back {bound:?} after the path healed"
    );
    let back = healed.elapsed();
    served(proxy.http, Duration::from_secs(5)).await.unwrap();
    eprintln!(
        "{}: tunnel dropped {dropped:?} after the path went dark; agent back {back:?} after it healed",
        transport_flag(t)
    );
}
