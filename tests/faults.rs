//! Crashes, over both transports, with real processes killed by SIGKILL (which sends
//! nothing: over QUIC a dead peer is only noticed by what no longer arrives).
//!
//! - An agent killed and started again with the same certificate takes its names back at
//!   once: its dead tunnel (still registered until it times out, over QUIC) gets no new
//!   streams.
//! - A proxy killed and started again has its agents back within a second of listening:
//!   over h2 they reconnect quickly after losing a tunnel that was up; over QUIC the new
//!   process answers their keep-alive with a stateless reset they accept (the reset key
//!   outlives the process), so they do not wait out the idle timeout.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use revproxy::ca::{Ca, NewToken};
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
    let token = Ca::open(&state)
        .unwrap()
        .create_token(
            &NewToken {
                agent: "web-1".into(),
                hosts: vec![NAME.into()],
                private_hosts: Vec::new(),
                connect: Vec::new(),
                ttl: Duration::from_secs(3600),
                cert_ttl: Duration::from_secs(24 * 3600),
                server: Some(format!("127.0.0.1:{agents}")),
            },
            time::OffsetDateTime::now_utc(),
        )
        .unwrap();
    let agent_dir = tempfile::tempdir().unwrap();
    revproxy::agent::enroll(&token, agent_dir.path())
        .await
        .unwrap();
    let backend = echo_backend(b"B:").await;
    let _agent = start_agent(agent_dir.path(), &[(NAME, backend)], on(t));
    logged(&lines, "tunnel up");
    let http = SocketAddr::from(([127, 0, 0, 1], http));
    served(http, Duration::from_secs(5)).await.unwrap();

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
