//! `revproxy serve --upgrade` takes the listening sockets over from the running proxy:
//! clients looping on the HTTP listener all the while see no refused or failed
//! connection, a transfer started before the swap completes byte-exact through the old
//! process, and the agent is on the new process before the old one lets its tunnel go.
//! Over QUIC the tunnel cannot be carried over: the agent is back within a second, and
//! clients arriving meanwhile are held until it is.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use revproxy::ca::Ca;
use revproxy::Transport;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const NAME: &str = "app.example.com";

/// One `revproxy serve` process and the JSON lines it logged, with when each arrived.
struct Serve {
    child: Option<std::process::Child>,
    lines: std::sync::mpsc::Receiver<(Instant, serde_json::Value)>,
    seen: Vec<(Instant, serde_json::Value)>,
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Serve {
    fn start(state: &Path, config: &Path, upgrade: bool) -> Serve {
        Self::start_with(state, config, upgrade, &[])
    }

    fn start_with(state: &Path, config: &Path, upgrade: bool, env: &[(&str, &Path)]) -> Serve {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_revproxy"));
        command.envs(env.iter().copied());
        command
            .args(["serve", "--state"])
            .arg(state)
            .arg("--config")
            .arg(config);
        if upgrade {
            command.arg("--upgrade");
        }
        let mut child = command
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let doc = serde_json::from_str(&line)
                    .unwrap_or_else(|_| serde_json::json!({ "message": line }));
                let _ = tx.send((Instant::now(), doc));
            }
        });
        Serve {
            child: Some(child),
            lines,
            seen: Vec::new(),
        }
    }

    /// The first line logged with `message` (waiting up to 30 s for it), and when it came.
    fn wait(&mut self, message: &str) -> (Instant, serde_json::Value) {
        let found = |seen: &[(Instant, serde_json::Value)]| {
            seen.iter()
                .find(|(_, doc)| doc["message"] == message)
                .cloned()
        };
        if let Some(hit) = found(&self.seen) {
            return hit;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        tokio::task::block_in_place(|| loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.lines.recv_timeout(left).unwrap_or_else(|_| {
                panic!(
                    "no log line {message:?} within 30 s; seen: {:#?}",
                    self.seen.iter().map(|(_, d)| d).collect::<Vec<_>>()
                )
            });
            self.seen.push(line);
            if let Some(hit) = found(&self.seen) {
                return hit;
            }
        })
    }

    fn addr(&mut self, message: &str) -> SocketAddr {
        self.wait(message).1["addr"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    /// Waits (bounded) for the process to exit by itself; its status.
    fn exited(&mut self, within: Duration) -> std::process::ExitStatus {
        let child = self.child.as_mut().unwrap();
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "still running after {within:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A directory with a state directory (not made yet) and a configuration file: port 0
/// everywhere (the new process takes the same sockets whatever they are), JSON logs, and
/// `extra`.
fn deployment(extra: &str) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            "agents = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\
             log_format = \"json\"\n{extra}"
        ),
    )
    .unwrap();
    (dir, state, config)
}

/// The deployment: a state directory, a configuration file, the first process, an agent
/// enrolled and connected.
struct Swap {
    _dir: tempfile::TempDir,
    state: PathBuf,
    config: PathBuf,
    old: Serve,
    http: SocketAddr,
    admin: SocketAddr,
    _agent: (tempfile::TempDir, TestAgent),
}

impl Swap {
    async fn start(transport: Transport, backend: SocketAddr) -> Swap {
        // The grace period outlasts the transfer that drains through the old process.
        let (dir, state, config) = deployment("shutdown_grace = \"60s\"\n");
        let mut old = Serve::start(&state, &config, false);
        let agents = old.addr("agent listener ready");
        let http = old.addr("public listener ready");
        let admin = old.addr("admin listener ready");

        let agent_dir = enrolled(&Ca::open(&state).unwrap(), agents, "web-1", NAME).await;
        let agent = start_agent(agent_dir.path(), &[(NAME, backend)], on(transport));
        let (_, up) = old.wait("tunnel up");
        assert_eq!(up["transport"], transport_name(transport), "{up}");
        Swap {
            _dir: dir,
            state,
            config,
            old,
            http,
            admin,
            _agent: (agent_dir, agent),
        }
    }

    fn upgrade(&self) -> Serve {
        Serve::start(&self.state, &self.config, true)
    }
}

fn transport_name(transport: Transport) -> &'static str {
    match transport {
        Transport::Quic => "quic",
        _ => "h2",
    }
}

/// Clients that each connect, send a request and check the echo, over and over until
/// told to stop; every failure is kept with what went wrong.
struct Clients {
    stop: Arc<AtomicBool>,
    served: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<Vec<String>>>,
}

impl Clients {
    fn start(http: SocketAddr, count: usize) -> Clients {
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicUsize::new(0));
        let tasks = (0..count)
            .map(|i| {
                let (stop, served) = (stop.clone(), served.clone());
                tokio::spawn(async move {
                    let mut failures = Vec::new();
                    let mut seed = i as u64 * 1_000_000;
                    while !stop.load(Ordering::Relaxed) {
                        seed += 1;
                        let data = pattern(2048, seed);
                        let mut want = b"B:".to_vec();
                        want.extend_from_slice(&http_head(NAME));
                        want.extend_from_slice(&data);
                        let got = tokio::time::timeout(
                            Duration::from_secs(20),
                            round_trip(http, &http_head(NAME), &data),
                        )
                        .await;
                        match got {
                            Ok(Ok(got)) if got == want => {
                                served.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(Ok(got)) => failures.push(format!(
                                "wrong answer: {:?}",
                                String::from_utf8_lossy(&got[..got.len().min(120)])
                            )),
                            Ok(Err(e)) => failures.push(e.to_string()),
                            Err(_) => failures.push("no answer within 20 s".into()),
                        }
                    }
                    failures
                })
            })
            .collect();
        Clients {
            stop,
            served,
            tasks,
        }
    }

    fn served(&self) -> usize {
        self.served.load(Ordering::Relaxed)
    }

    /// Waits until `more` further requests were served (bounded).
    async fn serve_more(&self, more: usize) {
        let target = self.served() + more;
        eventually("clients served", || async { self.served() >= target }).await;
    }

    /// Stops them, and fails the test if any of them failed.
    async fn stop_without_failures(self) {
        let failures = self.stop().await;
        assert!(
            failures.is_empty(),
            "{} client(s) failed: {:?}",
            failures.len(),
            &failures[..failures.len().min(5)]
        );
    }

    /// Stops them; every failure seen.
    async fn stop(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for task in self.tasks {
            all.extend(task.await.unwrap());
        }
        all
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_refuses_no_client_and_finishes_open_transfers() {
    upgrade_refuses_no_client_and_finishes_open_transfers(Transport::H2).await;
}

/// Over QUIC as over h2: the new process forwards the old tunnel's packets to the old
/// process (`quic/takeover.rs`), so the transfer open on it finishes there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_quic_an_upgrade_refuses_no_client_and_finishes_open_transfers() {
    upgrade_refuses_no_client_and_finishes_open_transfers(Transport::Quic).await;
}

async fn upgrade_refuses_no_client_and_finishes_open_transfers(t: Transport) {
    let backend = echo_backend(b"B:").await;
    let mut swap = Swap::start(t, backend).await;

    // A long transfer, in flight across the swap: it stays on the old process.
    let mut transfer = tokio::net::TcpStream::connect(swap.http).await.unwrap();
    transfer.write_all(&http_head(NAME)).await.unwrap();
    let mut head = vec![0; 2 + http_head(NAME).len()];
    transfer.read_exact(&mut head).await.unwrap();
    let clients = Clients::start(swap.http, 4);
    clients.serve_more(50).await;

    let mut new = swap.upgrade();
    let (serving, _) = new.wait("serving on the sockets taken over; the old process stops accepting and moves its agents here");
    let (told, told_line) = swap.old.wait("agents told to move to the new process");
    assert_eq!(told_line["tunnels"], 1, "{told_line}");
    let (new_up, _) = new.wait("tunnel up");
    // The transfer goes on through the old process after the agent moved.
    for seed in 0..64 {
        let chunk = pattern(256 * 1024, seed);
        transfer.write_all(&chunk).await.unwrap();
        let mut back = vec![0; chunk.len()];
        tokio::time::timeout(Duration::from_secs(10), transfer.read_exact(&mut back))
            .await
            .expect("the transfer goes on")
            .unwrap();
        assert!(back == chunk, "chunk {seed} came back intact");
    }
    clients.serve_more(200).await;
    clients.stop_without_failures().await;
    transfer.shutdown().await.unwrap();
    let mut rest = Vec::new();
    transfer.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty(), "the transfer ends cleanly");
    // The agent retired its old tunnel once the new one had served a moment; it closes
    // when its last stream (the transfer) has ended.
    let (old_down, down_line) = swap.old.wait("tunnel down");
    let status = swap.old.exited(Duration::from_secs(30));
    assert!(status.success(), "the old process exits cleanly: {status}");

    // The new process serves on the same addresses, the admin listener included.
    let got = round_trip(swap.http, &http_head(NAME), b"after")
        .await
        .unwrap();
    assert!(got.ends_with(b"after"));
    let (code, _) = admin_get(swap.admin, "/ready").await;
    assert_eq!(code, 200);
    assert!(
        new_up <= old_down + Duration::from_secs(1),
        "the agent was on the new process {:?} after the old one let its tunnel go ({down_line})",
        new_up.saturating_duration_since(old_down)
    );
    eprintln!(
        "new process serving -> old told its agents: {:?}; -> agent's tunnel up on the new process: {:?}; old tunnel down {:?} after the new one was up",
        told.saturating_duration_since(serving),
        new_up.saturating_duration_since(serving),
        old_down.saturating_duration_since(new_up),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_quic_the_agent_is_back_within_a_second_and_clients_meanwhile_are_held() {
    let backend = echo_backend(b"B:").await;
    let mut swap = Swap::start(Transport::Quic, backend).await;
    let mut new = swap.upgrade();
    let (told, _) = swap.old.wait("agents told to move to the new process");
    // Clients from the moment the old process let go: the new process holds them until
    // the agent has reconnected.
    let clients = Clients::start(swap.http, 4);
    let (up, line) = new.wait("tunnel up");
    assert_eq!(line["transport"], "quic", "{line}");
    let away = up.saturating_duration_since(told);
    assert!(
        away < Duration::from_secs(1),
        "the agent took {away:?} to reach the new process"
    );
    clients.serve_more(100).await;
    let failures = clients.stop().await;
    assert!(failures.is_empty(), "clients failed: {failures:?}");
    let status = swap.old.exited(Duration::from_secs(30));
    assert!(status.success(), "{status}");
    eprintln!("QUIC agent away for {away:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_proxy_on_the_same_state_is_refused_and_an_upgrade_needs_a_running_one() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        "agents = \"127.0.0.1:0\"\nadmin = \"off\"\nlog_format = \"json\"\n",
    )
    .unwrap();
    // Nothing runs: --upgrade says so and what to do.
    let alone = std::process::Command::new(env!("CARGO_BIN_EXE_revproxy"))
        .args(["serve", "--upgrade", "--state"])
        .arg(&state)
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&alone.stderr);
    assert_eq!(alone.status.code(), Some(1), "{said}");
    assert!(said.contains("no running proxy to take over"), "{said}");
    assert!(said.contains("without --upgrade"), "{said}");
    assert!(!state.exists(), "an upgrade creates nothing");

    let mut first = Serve::start(&state, &config, false);
    first.wait("agent listener ready");
    let mode = std::fs::metadata(state.join(revproxy::runtime::handover::SOCKET_NAME))
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()))
        .unwrap();
    assert_eq!(mode & 0o777, 0o600);
    let second = std::process::Command::new(env!("CARGO_BIN_EXE_revproxy"))
        .args(["serve", "--state"])
        .arg(&state)
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{said}");
    assert!(
        said.contains("another `revproxy serve` is running"),
        "{said}"
    );
    assert!(said.contains("--upgrade"), "{said}");
}

/// Under systemd (`Type=notify`), `systemctl kill -s USR2` upgrades in place: the process
/// starts the binary at its own path with `--upgrade`, which takes the sockets over and
/// tells systemd it is the main process now; the old one exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_starts_the_new_binary_which_tells_systemd_it_is_the_main_process() {
    let (dir, state, config) = deployment("");
    // What systemd listens on.
    let notify_path = dir.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let said = || {
        let mut buf = [0u8; 256];
        let n = notify.recv(&mut buf).expect("a notification within 30 s");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let mut old = Serve::start_with(&state, &config, false, &[("NOTIFY_SOCKET", &notify_path)]);
    let http = old.addr("public listener ready");
    let admin = old.addr("admin listener ready");
    assert_eq!(said(), "READY=1\n");

    signal(old.child.as_ref().unwrap().id(), "USR2");
    let (_, started) = old.wait("SIGUSR2: started the new binary to take the sockets over");
    let new_pid = started["pid"].as_u64().unwrap();
    // The successor logs to the same stderr.
    old.wait("serving on the sockets taken over; the old process stops accepting and moves its agents here");
    assert_eq!(said(), format!("MAINPID={new_pid}\nREADY=1\n"));
    let status = old.exited(Duration::from_secs(30));
    assert!(status.success(), "{status}");

    // The new process answers on the same listeners.
    let got = round_trip(http, &http_head(NAME), b"").await.unwrap();
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 502"), "{got}");
    let (code, _) = admin_get(admin, "/ready").await;
    assert_eq!(code, 200);
    signal(new_pid as u32, "KILL");
}

/// A successor that the running process does not let go of (it gave up waiting, or
/// died after handing the sockets over) stops instead of serving beside it, and leaves
/// the upgrade socket's name alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_that_is_not_let_go_stops_and_leaves_the_running_proxy_alone() {
    use revproxy::runtime::handover::{self, Described, Role};
    use std::os::fd::AsFd;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    revproxy::ca::Ca::init(
        &state,
        &revproxy::ca::InitOptions::default(),
        time::OffsetDateTime::now_utc(),
    )
    .unwrap();
    // A stand-in for the running proxy: its agent listener, and its upgrade socket.
    let agents = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let agents_addr = agents.local_addr().unwrap();
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        format!("agents = \"{agents_addr}\"\nadmin = \"off\"\nlog_format = \"json\"\n"),
    )
    .unwrap();
    let upgrades = handover::Listener::bind(&state).unwrap();
    let mut new = Serve::start(&state, &config, true);
    let mut successor = upgrades.accept().await.unwrap();
    let sockets = vec![(
        Described {
            role: Role::Agents,
            addr: agents_addr,
        },
        agents.as_fd().try_clone_to_owned().unwrap(),
    )];
    // Sockets handed over, then the stand-in ends without ever saying "go".
    tokio::task::spawn_blocking(move || successor.hand_over(&sockets).unwrap())
        .await
        .unwrap();
    let status = new.exited(Duration::from_secs(30));
    assert_eq!(status.code(), Some(1), "{status}");
    new.wait("the old process did not step aside; stopping, it goes on serving");
    assert!(
        state.join(handover::SOCKET_NAME).exists(),
        "the running process keeps its upgrade socket"
    );
    let leftovers: Vec<_> = std::fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("upgrade.sock."))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // The stand-in's listener still accepts.
    std::net::TcpStream::connect(agents_addr).unwrap();
}

/// A granted port (`ports` in the configuration, `token create --tcp-port`) is handed over
/// with the other listeners: clients looping on it while the new process takes over and
/// the agent moves there see no refused or failed connection. (Over h2: a QUIC agent's
/// streams under way when it moves are cut, issue 32.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_granted_port_is_handed_over_and_refuses_no_client() {
    let backend = echo_backend(b"B:").await;
    let port = free_port("127.0.0.1");
    let (_dir, state, config) = deployment(&format!(
        "ports = \"{port}-{port}\"\nports_bind = \"127.0.0.1\"\n"
    ));
    let mut old = Serve::start(&state, &config, false);
    let agents = old.addr("agent listener ready");
    let (name, udp) = (format!("tcp:{port}"), format!("udp:{port}"));
    let ca = Ca::open(&state).unwrap();
    let agent_dir = enrolled_for(&ca, agents, "game", &[&name, &udp]).await;
    let udp_backend = udp_echo(b"U:").await;
    let _agent = start_agent(
        agent_dir.path(),
        &[(name.as_str(), backend), (udp.as_str(), udp_backend)],
        on(Transport::H2),
    );
    let granted = SocketAddr::from(([127, 0, 0, 1], port));
    eventually("the granted port is listened on", || async {
        tokio::net::TcpStream::connect(granted).await.is_ok()
    })
    .await;
    // The same port number granted for UDP: answered before the upgrade and after it
    // (the new process binds it once the old one let it go).
    let answered = || async {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        socket.connect(granted).await.unwrap();
        let _ = socket.send(b"dgram").await;
        let mut buf = [0u8; 64];
        let got = tokio::time::timeout(Duration::from_millis(300), socket.recv(&mut buf)).await;
        matches!(got, Ok(Ok(7))) && &buf[..7] == b"U:dgram"
    };
    eventually("the granted UDP port answers", answered).await;
    // The clients send an HTTP head first, which the echo backend returns like any bytes.
    let clients = Clients::start(granted, 4);
    clients.serve_more(50).await;

    let mut new = Serve::start(&state, &config, true);
    new.wait("serving on the sockets taken over; the old process stops accepting and moves its agents here");
    old.wait("agents told to move to the new process");
    new.wait("tunnel up");
    clients.serve_more(200).await;
    clients.stop_without_failures().await;
    let status = old.exited(Duration::from_secs(30));
    assert!(status.success(), "{status}");
    let got = round_trip(granted, b"", b"after").await.unwrap();
    assert_eq!(got, b"B:after");
    eventually(
        "the granted UDP port answers from the new process",
        answered,
    )
    .await;
}
