//! SIGHUP reloads `revproxy serve`'s configuration file: a listener added, another removed
//! (its open connection runs on), a long transfer on a third untouched; a bad file changes
//! nothing and is counted.

mod common;

use std::net::SocketAddr;
use std::sync::mpsc::Receiver;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Waits (bounded) for a JSON log line whose message is `message`; returns it.
fn logged(lines: &Receiver<String>, message: &str) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = lines
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no log line {message:?} within 20 s"));
        if let Ok(doc) = serde_json::from_str::<serde_json::Value>(&line) {
            if doc["message"] == message {
                return doc;
            }
        }
    }
}

/// `revproxy-agent run` on `state` with the configuration `file`: its log lines, its pid,
/// and the process (killed when dropped).
fn agent_process(
    state: &std::path::Path,
    file: &std::path::Path,
) -> (Receiver<String>, u32, Killed) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_revproxy-agent"))
        .args(["run", "--state"])
        .arg(state)
        .arg("--config")
        .arg(file)
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let lines = stderr_lines(&mut child);
    let pid = child.id();
    (lines, pid, Killed(child))
}

fn listeners(fixed: &[(u16, SocketAddr)]) -> String {
    fixed
        .iter()
        .map(|(port, to)| {
            format!("[[listener]]\nlisten = \"127.0.0.1:{port}\"\nto = \"tcp://{to}\"\n")
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_adds_and_removes_listeners_without_touching_open_streams() {
    let backend = echo_backend(b"").await;
    let (kept, removed, added) = (
        free_port("127.0.0.1"),
        free_port("127.0.0.1"),
        free_port("127.0.0.1"),
    );
    let admin = free_port("127.0.0.1");
    let state = tempfile::tempdir().unwrap();
    let file = state.path().join("proxy.toml");
    // A short grace period: a removed listener's open connection that outlives it was not
    // cut at its end.
    let head = format!(
        "agents = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:{admin}\"\nlog_format = \"json\"\n\
         shutdown_grace = \"1s\"\n"
    );
    std::fs::write(
        &file,
        format!(
            "{head}{}",
            listeners(&[(kept, backend), (removed, backend)])
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_revproxy"))
        .args(["serve", "--state"])
        .arg(state.path().join("ca"))
        .arg("--config")
        .arg(&file)
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let lines = stderr_lines(&mut child);
    let pid = child.id();
    let _child = Killed(child);
    logged(&lines, "admin listener ready");
    let hangup = || signal(pid, "HUP");

    // A long transfer through the listener that stays, in flight across the reloads.
    let mut transfer = tokio::net::TcpStream::connect(("127.0.0.1", kept))
        .await
        .unwrap();
    let first = pattern(256 * 1024, 1);
    transfer.write_all(&first).await.unwrap();
    let mut back = vec![0; first.len()];
    transfer.read_exact(&mut back).await.unwrap();
    assert!(back == first);

    // And one through the listener about to be removed.
    let mut leaving = tokio::net::TcpStream::connect(("127.0.0.1", removed))
        .await
        .unwrap();
    leaving.write_all(b"before").await.unwrap();
    let mut echoed = [0u8; 6];
    leaving.read_exact(&mut echoed).await.unwrap();

    // Reload: one listener removed, one added.
    std::fs::write(
        &file,
        format!("{head}{}", listeners(&[(kept, backend), (added, backend)])),
    )
    .unwrap();
    hangup();
    let done = logged(&lines, "configuration reloaded");
    assert!(
        done["what"]
            .as_str()
            .unwrap()
            .starts_with("1 listener(s) added, 1 removed, 1 kept"),
        "{done}"
    );
    let data = pattern(4096, 2);
    let through_added = round_trip(([127, 0, 0, 1], added).into(), b"", &data)
        .await
        .unwrap();
    assert!(through_added == data);
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", removed))
            .await
            .is_err(),
        "the removed listener no longer accepts"
    );
    // Its open connection runs on, past the grace period (the time is what is tested:
    // there is no event to wait for).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = pattern(64 * 1024, 5);
    leaving.write_all(&after).await.unwrap();
    let mut back = vec![0; after.len()];
    leaving.read_exact(&mut back).await.unwrap();
    assert!(back == after, "a connection of a removed listener runs on");

    // A bad file: nothing changes, and it is counted.
    std::fs::write(
        &file,
        format!("{head}[[listener]]\nlisten = \"nonsense\"\n"),
    )
    .unwrap();
    hangup();
    let refused = logged(&lines, "configuration not reloaded; the running one stays");
    assert!(
        refused["error"].as_str().unwrap().contains("listen"),
        "{refused}"
    );
    let through_added = round_trip(([127, 0, 0, 1], added).into(), b"", &data)
        .await
        .unwrap();
    assert!(through_added == data);
    let (_, metrics) = admin_get(([127, 0, 0, 1], admin).into(), "/metrics").await;
    assert_eq!(
        sample(&metrics, "revproxy_config_reloads_total", "result=\"ok\""),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &metrics,
            "revproxy_config_reloads_total",
            "result=\"error\""
        ),
        Some(1.0)
    );

    // The transfer went on throughout, byte for byte, and ends cleanly.
    let last = pattern(256 * 1024, 3);
    transfer.write_all(&last).await.unwrap();
    transfer.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), transfer.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert!(
        rest == last,
        "the open stream came through the reloads intact"
    );
}

/// SIGHUP makes `revproxy-agent run` re-read its services: new streams go to the new
/// backend, a stream open on the old one goes on, the tunnel stays; a service the
/// certificate does not grant changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_moves_an_agents_service_without_dropping_its_tunnel() {
    let proxy = TestProxy::start().await;
    let (old, new) = (echo_backend(b"A:").await, echo_backend(b"B:").await);
    let dir = enroll_agent(&proxy, "web-1", &["app.example.com"]).await;
    let file = dir.path().join("agent.toml");
    let service = |to: SocketAddr, host: &str| {
        format!("log_format = \"json\"\n[[service]]\nhost = \"{host}\"\nto = \"{to}\"\n")
    };
    std::fs::write(&file, service(old, "app.example.com")).unwrap();
    let (lines, pid, _child) = agent_process(dir.path(), &file);
    proxy.wait_for("app.example.com", 1).await;
    let hangup = || signal(pid, "HUP");

    let mut open = tokio::net::TcpStream::connect(proxy.http).await.unwrap();
    open.write_all(&http_head("app.example.com")).await.unwrap();
    let mut tag = [0u8; 2];
    open.read_exact(&mut tag).await.unwrap();
    assert_eq!(&tag, b"A:");

    std::fs::write(&file, service(new, "app.example.com")).unwrap();
    hangup();
    logged(&lines, "configuration reloaded");
    let got = round_trip(proxy.http, &http_head("app.example.com"), b"x")
        .await
        .unwrap();
    assert!(got.starts_with(b"B:"), "{}", String::from_utf8_lossy(&got));
    assert_eq!(
        proxy.status.tunnels_for("app.example.com"),
        1,
        "the same tunnel"
    );

    // A name the certificate does not grant: refused, the running services stay.
    std::fs::write(&file, service(old, "other.example.com")).unwrap();
    hangup();
    let refused = logged(&lines, "configuration not reloaded; the running one stays");
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("other.example.com"),
        "{refused}"
    );
    let got = round_trip(proxy.http, &http_head("app.example.com"), b"x")
        .await
        .unwrap();
    assert!(got.starts_with(b"B:"));

    // The stream opened before the reloads still reaches the old backend.
    let data = pattern(64 * 1024, 4);
    open.write_all(&data).await.unwrap();
    let mut back = vec![0; http_head("app.example.com").len() + data.len()];
    open.read_exact(&mut back).await.unwrap();
    assert!(back.ends_with(&data));
}

/// SIGHUP re-reads the agent's `[[connect]]` entries: a listener added serves at once, a
/// removed one stops accepting while its open connection runs on, the tunnel stays; a
/// listen address that cannot be bound changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_adds_and_removes_an_agents_connect_listeners() {
    let proxy = TestProxy::start().await;
    let (db, cache) = (echo_backend(b"db:").await, echo_backend(b"ca:").await);
    let server =
        enroll_mesh_agent(&proxy, "db-1", &[], &["db.internal", "cache.internal"], &[]).await;
    let _server = start_agent(
        server.path(),
        &[("db.internal", db), ("cache.internal", cache)],
        |b| b,
    );
    proxy.wait_for("db.internal", 1).await;
    let laptop = enroll_mesh_agent(
        &proxy,
        "laptop",
        &[],
        &[],
        &["db.internal", "cache.internal"],
    )
    .await;
    let (first, second) = (free_port("127.0.0.1"), free_port("127.0.0.1"));
    let file = laptop.path().join("agent.toml");
    let connect = |name: &str, port: u16| {
        format!(
            "log_format = \"json\"\n[[connect]]\nhost = \"{name}\"\nlisten = \"127.0.0.1:{port}\"\n"
        )
    };
    std::fs::write(&file, connect("db.internal", first)).unwrap();
    let (lines, pid, _child) = agent_process(laptop.path(), &file);
    logged(&lines, "connect listener ready");
    assert!(
        proxy
            .status
            .wait_for_agent("laptop", 1, Duration::from_secs(10))
            .await
    );

    // A connection through the first listener, open across the reloads.
    let mut open = tokio::net::TcpStream::connect(("127.0.0.1", first))
        .await
        .unwrap();
    open.write_all(b"one").await.unwrap();
    let mut back = [0u8; 6];
    open.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"db:one");

    std::fs::write(&file, connect("cache.internal", second)).unwrap();
    signal(pid, "HUP");
    let reloaded = logged(&lines, "configuration reloaded");
    assert!(
        reloaded["what"]
            .as_str()
            .unwrap()
            .contains("1 connect listener(s) added, 1 removed"),
        "{reloaded}"
    );
    let got = round_trip(SocketAddr::from(([127, 0, 0, 1], second)), b"", b"two")
        .await
        .unwrap();
    assert_eq!(got, b"ca:two");
    let refused = tokio::net::TcpStream::connect(("127.0.0.1", first)).await;
    assert!(refused.is_err(), "the removed listener no longer accepts");

    // A listen address already taken: nothing changes.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    std::fs::write(
        &file,
        format!(
            "{}[[connect]]\nhost = \"db.internal\"\nlisten = \"127.0.0.1:{taken_port}\"\n",
            connect("cache.internal", second)
        ),
    )
    .unwrap();
    signal(pid, "HUP");
    let refused = logged(&lines, "configuration not reloaded; the running one stays");
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains(&format!("127.0.0.1:{taken_port}")),
        "{refused}"
    );
    let got = round_trip(SocketAddr::from(([127, 0, 0, 1], second)), b"", b"three")
        .await
        .unwrap();
    assert_eq!(got, b"ca:three");

    // The connection opened before it all still reaches its backend, over the same
    // tunnel.
    open.write_all(b"four").await.unwrap();
    let mut back = [0u8; 4];
    open.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"four");
    assert_eq!(proxy.status.tunnels_of("laptop"), 1);
}
