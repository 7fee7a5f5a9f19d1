//! The command-line contract: what a newcomer types, exit statuses and messages.

#[path = "../common/cli.rs"]
mod cli_helpers;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use cli_helpers::*;

mod ca;
mod errors;
mod private;
mod serve;

#[test]
fn newcomer_walk_through_from_serve_to_an_enrolled_agent() {
    let tmp = tempfile::tempdir().unwrap();
    let proxy_state = tmp.path().join("proxy");
    let (_serve, addr, startup) = serve(&proxy_state);
    let startup = startup.join("\n");
    assert!(
        startup.contains("CA pin: sha256:"),
        "serve created a CA and said so: {startup}"
    );
    assert!(
        startup.contains("revproxy token create"),
        "and named the next step: {startup}"
    );

    let out = run(
        PROXY,
        &[
            "token",
            "create",
            "--name",
            "web-1",
            "--host",
            "app.example.com",
            "--server",
            &addr,
        ],
        &proxy_state,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let token = stdout(&out);
    assert_eq!(token.lines().count(), 1, "only the token is printed");
    assert!(token.starts_with("rvp1."));

    let agent_state = tmp.path().join("agent");
    let out = run(AGENT, &["enroll", "--token", token.trim()], &agent_state);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("enrolled as spiffe://revproxy.local/agent/web-1"),
        "{}",
        stdout(&out)
    );
    assert!(stdout(&out).contains("app.example.com"));
    assert!(agent_state.join("agent.key").exists());

    let list = stdout(&run(PROXY, &["token", "list"], &proxy_state));
    assert!(list.contains("web-1") && list.contains("used"), "{list}");
    let secret = token.trim().rsplit('.').next().unwrap();
    assert!(!list.contains(secret), "token list never shows the secret");

    let again = run(
        AGENT,
        &["enroll", "--token", token.trim()],
        &tmp.path().join("agent2"),
    );
    assert_eq!(again.status.code(), Some(1));
    assert!(
        stderr(&again).contains("token already used"),
        "{}",
        stderr(&again)
    );
}

#[test]
fn commands_without_a_ca_say_how_to_make_one() {
    let tmp = tempfile::tempdir().unwrap();
    let out = run(PROXY, &["token", "list"], &tmp.path().join("none"));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("revproxy ca init"),
        "{}",
        stderr(&out)
    );
}

/// A running program whose stderr is read line by line in the background.
struct Logged {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    /// Events read so far, in order (they may come in any order across tasks).
    seen: std::cell::RefCell<Vec<serde_json::Value>>,
    /// Every line read so far, as written.
    said: std::cell::RefCell<Vec<String>>,
}

impl Drop for Logged {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Logged {
    fn start(bin: &str, args: &[&str], state: &Path) -> Logged {
        Logged::start_logging(bin, args, state, None)
    }

    /// Starts `bin` with `RUST_LOG` set to `filter` (none: the program's default).
    fn start_logging(bin: &str, args: &[&str], state: &Path, filter: Option<&str>) -> Logged {
        let mut command = Command::new(bin);
        match filter {
            Some(filter) => command.env("RUST_LOG", filter),
            None => command.env_remove("RUST_LOG"),
        };
        let mut child = command
            .args(args)
            .env("REVPROXY_STATE", state)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Logged {
            child,
            lines,
            seen: Default::default(),
            said: Default::default(),
        }
    }

    /// Waits (bounded) for a line containing `needle` among those after the first `from`
    /// lines; returns its index and the line.
    fn text_line(&self, from: usize, needle: &str) -> (usize, String) {
        let found = |said: &[String]| {
            (said.iter().enumerate())
                .skip(from)
                .find(|(_, l)| l.contains(needle))
                .map(|(i, l)| (i, l.clone()))
        };
        if let Some(found) = found(&self.said.borrow()) {
            return found;
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = self.lines.recv_timeout(left).unwrap_or_else(|_| {
                panic!(
                    "no log line with {needle:?} within 10 s: {:#?}",
                    self.said.borrow()
                )
            });
            self.said.borrow_mut().push(line);
            if let Some(found) = found(&self.said.borrow()) {
                return found;
            }
        }
    }

    /// SIGTERM, then every line the program wrote, up to its exit (which must be clean).
    fn terminate(mut self) -> Vec<String> {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        let status = self.child.wait().unwrap();
        // The reader sees the end of stderr once the program has exited.
        while let Ok(line) = self.lines.recv_timeout(std::time::Duration::from_secs(10)) {
            self.said.borrow_mut().push(line);
        }
        let said = self.said.take();
        assert!(status.success(), "{status}: {said:#?}");
        said
    }

    /// Waits (bounded) for a JSON log line whose message is `message`, seen now or
    /// before; every line must be JSON.
    fn json_line(&self, message: &str) -> serde_json::Value {
        if let Some(event) = self.seen.borrow().iter().find(|e| e["message"] == message) {
            return event.clone();
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no log line {message:?} within 10 s"));
            let event: serde_json::Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("a log line that is not JSON ({e}): {line}"));
            for field in ["timestamp", "level", "message", "target"] {
                assert!(event.get(field).is_some(), "no {field} in {line}");
            }
            self.seen.borrow_mut().push(event.clone());
            self.said.borrow_mut().push(line);
            if event["message"] == message {
                return event;
            }
        }
    }
}

/// `check` validates a configuration without binding or connecting anything: the example
/// files pass even with their ports taken; a bad file exits 2 with the reason.
#[test]
fn check_validates_configs_without_binding_anything() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let dir = tempfile::tempdir().unwrap();
    // Something holds a port the file names: check does not care.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = dir.path().join("busy.toml");
    std::fs::write(
        &busy,
        format!(
            "agents = \"{}\"\ntrusted_proxies = [\"10.0.0.0/8\"]\nstore = \"postgres://revproxy:pw@127.0.0.1/revproxy\"\n",
            held.local_addr().unwrap()
        ),
    )
    .unwrap();
    for (bin, file) in [
        (PROXY, examples.join("proxy.toml")),
        (PROXY, busy.clone()),
        (AGENT, examples.join("agent.toml")),
    ] {
        let out = run(
            bin,
            &["check", "--config", file.to_str().unwrap()],
            dir.path(),
        );
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        assert!(stderr(&out).contains("is valid"), "{}", stderr(&out));
        assert!(!stderr(&out).contains("pw@"), "{}", stderr(&out));
    }
    let bad = [
        (PROXY, "trusted_proxies = [\"10.0.0.0/33\"]\n", "trusted_proxies"),
        (PROXY, "store = \"mysql://x\"\n", "postgres://"),
        (PROXY, "store = \"postgres://u@db.example.com/x\"\n", "sslmode"),
        (PROXY, "listen_on = 1\n", "listen_on"),
        (
            AGENT,
            "[[service]]\nhost = \"a.example.com\"\nto = \"127.0.0.1:1\"\nproxy_protocol = \"v9\"\n",
            "proxy_protocol",
        ),
    ];
    for (bin, text, says) in bad {
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, text).unwrap();
        let out = run(
            bin,
            &["check", "--config", file.to_str().unwrap()],
            dir.path(),
        );
        assert_eq!(out.status.code(), Some(2), "{text}: {}", stderr(&out));
        assert!(stderr(&out).contains(says), "{text}: {}", stderr(&out));
    }
}
