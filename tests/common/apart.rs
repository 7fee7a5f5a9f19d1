//! One agent's deployment in separate processes, as an operator runs it: `revproxy serve`,
//! `revproxy-agent run` and an echo backend (Python's asyncio), the clients in the test.
//! Each process holds one side of each client connection, so that ten thousand clients
//! need ten thousand descriptors a process, not forty thousand in one (a limit a test
//! cannot always raise: it takes CAP_SYS_RESOURCE).
#![allow(dead_code)] // each test binary uses its own subset

use std::io::BufRead;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use super::*;

/// A child process, killed as it drops, whose stderr is drained in the background.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The proxy, the agent and the echo backend, each in its own process.
pub struct Apart {
    _proxy: Running,
    _agent: Running,
    _echo: Running,
    _dir: TempDir,
    /// The proxy's public HTTP listener.
    pub http: SocketAddr,
}

/// An echo server on 127.0.0.1: prints its port, then echoes every connection until its
/// stdin closes.
const ECHO: &str = r#"
import asyncio, sys
async def echo(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    writer.close()
async def main():
    server = await asyncio.start_server(echo, "127.0.0.1", 0, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
asyncio.run(main())
"#;

impl Apart {
    /// A proxy with `config` (TOML lines beside the listeners), an agent of it on
    /// transport `t` serving `app.example.com` from the echo backend and each of
    /// `more` (name, backend) from there; returns once a client reaches the echo backend.
    pub async fn start(t: Transport, config: &str, more: &[(&str, SocketAddr)]) -> Apart {
        let dir = tempfile::tempdir().unwrap();
        let (proxy_state, agent_state) = (dir.path().join("proxy"), dir.path().join("agent"));
        let ok = |out: std::process::Output| {
            let said = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(out.status.success(), "{said}");
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        };
        let cli = |bin: &str, args: &[&str], state: &std::path::Path| {
            let mut command = Command::new(bin);
            command.args(args).env("REVPROXY_STATE", state);
            ok(command.env_remove("RUST_LOG").output().unwrap())
        };
        cli(PROXY_BIN, &["ca", "init"], &proxy_state);
        let file = dir.path().join("proxy.toml");
        let listeners =
            "agents = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n";
        std::fs::write(
            &file,
            format!("{listeners}log_format = \"json\"\n{config}\n"),
        )
        .unwrap();
        let (proxy, agents, http) = serve(&file, &proxy_state);

        let mut token = vec!["token", "create", "--name", "web-1", "--server", &agents];
        for name in std::iter::once("app.example.com").chain(more.iter().map(|(n, _)| *n)) {
            token.extend(["--host", name]);
        }
        let token = cli(PROXY_BIN, &token, &proxy_state);
        cli(AGENT_BIN, &["enroll", "--token", &token], &agent_state);

        let (echo, echo_port) = echo_backend_process();
        let transport = match t {
            Transport::Quic => "quic",
            _ => "h2",
        };
        let mut maps = vec![format!("app.example.com=127.0.0.1:{echo_port}")];
        maps.extend(more.iter().map(|(name, to)| format!("{name}={to}")));
        let mut agent = Command::new(AGENT_BIN);
        agent.args(["run", "--transport", transport]);
        for map in &maps {
            agent.args(["--map", map]);
        }
        let agent = Running(drained(agent.env("REVPROXY_STATE", &agent_state)));

        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !round_trip(http, &http_head("app.example.com"), b"ping")
            .await
            .is_ok_and(|got| got.ends_with(b"ping"))
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the agent process never served through the proxy process"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Apart {
            _proxy: proxy,
            _agent: agent,
            _echo: echo,
            _dir: dir,
            http,
        }
    }
}

const PROXY_BIN: &str = env!("CARGO_BIN_EXE_revproxy");
const AGENT_BIN: &str = env!("CARGO_BIN_EXE_revproxy-agent");

/// Starts `command` with its stderr drained (warnings go to the test's output).
fn drained(command: &mut Command) -> Child {
    let mut child = command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = stderr_lines(&mut child);
    std::thread::spawn(move || {
        for line in lines {
            if line.contains("WARN") || line.contains("ERROR") {
                eprintln!("{line}");
            }
        }
    });
    child
}

/// `revproxy serve --config file`: the process, its agent listener and public HTTP
/// listener (from its JSON log lines).
fn serve(file: &std::path::Path, state: &std::path::Path) -> (Running, String, SocketAddr) {
    let mut child = Command::new(PROXY_BIN)
        .arg("serve")
        .arg("--config")
        .arg(file)
        .env("REVPROXY_STATE", state)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = stderr_lines(&mut child);
    let child = Running(child);
    let (mut agents, mut http) = (None, None);
    while agents.is_none() || http.is_none() {
        let line = lines
            .recv_timeout(Duration::from_secs(30))
            .expect("the proxy started within 30 s");
        let Ok(doc) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        let addr = doc["addr"].as_str().map(str::to_string);
        match doc["message"].as_str().unwrap_or_default() {
            "agent listener ready" => agents = addr,
            "public listener ready" => http = addr.and_then(|a| a.parse().ok()),
            _ => {}
        }
    }
    std::thread::spawn(move || {
        for line in lines {
            if line.contains("\"WARN\"") || line.contains("\"ERROR\"") {
                eprintln!("{line}");
            }
        }
    });
    (child, agents.unwrap(), http.unwrap())
}

/// The echo server in a `python3` process, and its port.
fn echo_backend_process() -> (Running, u16) {
    let mut child = Command::new(tool("python3"))
        .args(["-c", ECHO])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python3 runs the echo backend");
    let mut port = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut port)
        .unwrap();
    let port = port
        .trim()
        .parse()
        .expect("the echo backend printed its port");
    (Running(child), port)
}
