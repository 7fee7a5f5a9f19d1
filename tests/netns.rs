//! The mesh across networks that cannot see each other: a database agent and a caller
//! each in a network namespace of its own, with no route between them, reach each other
//! only through the proxy in a third. Real binaries, real kernels' network stacks.
//!
//! Needs root (network namespaces and veth pairs); without it the test says so and
//! passes without running.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

const PROXY: &str = env!("CARGO_BIN_EXE_revproxy");
const AGENT: &str = env!("CARGO_BIN_EXE_revproxy-agent");

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two namespaces, each joined to this one by a veth pair on its own /24: A and B each
/// reach the host side of their own link and nothing else.
struct Networks {
    a: String,
    b: String,
    /// The proxy's address as A sees it, and as B sees it.
    proxy_a: &'static str,
    proxy_b: &'static str,
}

impl Networks {
    fn new() -> Networks {
        let tag = std::process::id() % 10_000;
        let (a, b) = (format!("rpa{tag}"), format!("rpb{tag}"));
        for (ns, net) in [(&a, "10.231.1"), (&b, "10.231.2")] {
            ip(&["netns", "add", ns]);
            let host = format!("{ns}h");
            let inner = format!("{ns}n");
            ip(&["link", "add", &host, "type", "veth", "peer", "name", &inner]);
            ip(&["link", "set", &inner, "netns", ns]);
            ip(&["addr", "add", &format!("{net}.1/24"), "dev", &host]);
            ip(&["link", "set", &host, "up"]);
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{net}.2/24"),
                "dev",
                &inner,
            ]);
            ip(&["-n", ns, "link", "set", &inner, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        Networks {
            a,
            b,
            proxy_a: "10.231.1.1",
            proxy_b: "10.231.2.1",
        }
    }

    /// A command run inside namespace `ns`.
    fn inside(&self, ns: &str, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, program]);
        cmd
    }
}

impl Drop for Networks {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip")
                .args(["link", "del", &format!("{ns}h")])
                .output();
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// A child whose stderr (or stdout) lines are read in the background; killed on drop.
struct Running {
    child: Child,
    lines: Receiver<String>,
}

impl Running {
    fn start(mut cmd: Command, from_stdout: bool) -> Running {
        cmd.env_remove("RUST_LOG");
        if from_stdout {
            cmd.stdout(Stdio::piped()).stderr(Stdio::null());
        } else {
            cmd.stderr(Stdio::piped()).stdout(Stdio::null());
        }
        let mut child = cmd.spawn().unwrap();
        let out: Box<dyn Read + Send> = if from_stdout {
            Box::new(child.stdout.take().unwrap())
        } else {
            Box::new(child.stderr.take().unwrap())
        };
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Running { child, lines }
    }

    /// Waits (bounded) for a line containing `text`.
    fn line(&self, text: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no line with {text:?} within 15 s"));
            if line.contains(text) {
                return line;
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn field(line: &str, name: &str) -> String {
    line.split(&format!("{name}="))
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no {name}= in {line}"))
        .to_string()
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.env_remove("RUST_LOG").output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A TCP echo server inside the namespace that prints its port first.
const ECHO: &str = r#"
import socket, threading
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(8)
print(s.getsockname()[1], flush=True)
def serve(c):
    c.sendall(b"db:")
    while True:
        d = c.recv(65536)
        if not d:
            break
        c.sendall(d)
    c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,)).start()
"#;

/// The caller's client inside its namespace: connect, send, read it all back.
const CLIENT: &str = r#"
import socket, sys
c = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
c.sendall(b"across"); c.shutdown(socket.SHUT_WR)
got = b""
while True:
    d = c.recv(65536)
    if not d:
        break
    got += d
print(got.decode())
"#;

#[test]
fn two_networks_with_no_route_between_them_meet_through_the_proxy() {
    if !is_root() {
        eprintln!("skipped: network namespaces need root");
        return;
    }
    let _ = Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/test-tools.sh"
        ))
        .status();
    let nets = Networks::new();
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("proxy");
    let state_arg = state.to_str().unwrap();
    run(Command::new(PROXY).args(["ca", "init", "--state", state_arg]));
    let proxy = Running::start(
        {
            let mut c = Command::new(PROXY);
            c.args([
                "serve",
                "--state",
                state_arg,
                "--agents",
                "0.0.0.0:0",
                "--admin",
                "off",
            ]);
            c
        },
        false,
    );
    let port = field(&proxy.line("agent listener ready"), "addr")
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();

    let token = |name: &str, flag: &str, proxy_ip: &str| {
        let out = run(Command::new(PROXY).args([
            "token",
            "create",
            "--state",
            state_arg,
            "--name",
            name,
            flag,
            "db.internal",
            "--server",
            &format!("{proxy_ip}:{port}"),
        ]));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let enroll = |ns: &str, dir: &Path, token: &str| {
        run(nets.inside(ns, AGENT).args([
            "enroll",
            "--state",
            dir.to_str().unwrap(),
            "--token",
            token,
        ]));
    };
    let (db_dir, laptop_dir) = (tmp.path().join("db"), tmp.path().join("laptop"));
    enroll(
        &nets.a,
        &db_dir,
        &token("db-1", "--private-host", nets.proxy_a),
    );
    enroll(
        &nets.b,
        &laptop_dir,
        &token("laptop", "--connect", nets.proxy_b),
    );

    // The database (an echo server) lives in A, on A's loopback.
    let echo = Running::start(
        {
            let mut c = nets.inside(&nets.a, "python3");
            c.args(["-c", ECHO]);
            c
        },
        true,
    );
    let echo_port = echo
        .lines
        .recv_timeout(Duration::from_secs(10))
        .expect("the echo server started");
    let db = Running::start(
        {
            let mut c = nets.inside(&nets.a, AGENT);
            c.args([
                "run",
                "--state",
                db_dir.to_str().unwrap(),
                "--map",
                &format!("db.internal=127.0.0.1:{echo_port}"),
            ]);
            c
        },
        false,
    );
    let laptop = Running::start(
        {
            let mut c = nets.inside(&nets.b, AGENT);
            c.args([
                "run",
                "--state",
                laptop_dir.to_str().unwrap(),
                "--connect",
                "db.internal=127.0.0.1:0",
            ]);
            c
        },
        false,
    );
    let local = field(&laptop.line("connect listener ready"), "addr");
    let local_port = local.rsplit(':').next().unwrap();

    // No route from B to A: the database's network is out of reach directly.
    let direct = nets
        .inside(&nets.b, "python3")
        .args([
            "-c",
            "import socket; socket.create_connection(('10.231.1.2', 9), timeout=3)",
        ])
        .output()
        .unwrap();
    assert!(!direct.status.success(), "B reached A directly");
    assert!(
        String::from_utf8_lossy(&direct.stderr).contains("unreachable"),
        "{}",
        String::from_utf8_lossy(&direct.stderr)
    );

    // Through the proxy it works once both tunnels are up (the proxy has registered the
    // database agent's).
    db.line("tunnel up");
    laptop.line("tunnel up");
    proxy.line("tunnel up agent=db-1");
    let out = nets
        .inside(&nets.b, "python3")
        .args(["-c", CLIENT, local_port])
        .output()
        .unwrap();
    let got = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(got, "db:across", "{}", String::from_utf8_lossy(&out.stderr));
    drop(proxy);
    let _ = std::io::stderr().flush();
}

fn is_root() -> bool {
    // Our effective uid, from /proc.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}
