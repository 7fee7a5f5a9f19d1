//! Every example configuration in `examples/` parses and validates, and the README's
//! commands work as written, in order, on one machine.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use revproxy::config::{AgentConfig, ProxyConfig};

const PROXY: &str = env!("CARGO_BIN_EXE_revproxy");
const AGENT: &str = env!("CARGO_BIN_EXE_revproxy-agent");

#[test]
fn every_example_config_is_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if name.starts_with("proxy") {
            ProxyConfig::load(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        } else if name.starts_with("agent") {
            AgentConfig::load(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        } else {
            panic!("{name}: example configs are named proxy*.toml or agent*.toml");
        }
        checked += 1;
    }
    assert!(checked >= 2, "found {checked} example configs");
}

/// The agent's example, its commented lines uncommented, is valid and means what it says.
#[test]
fn the_example_agent_config_means_what_it_says() {
    let text = include_str!("../examples/agent.toml");
    let config = AgentConfig::from_toml(&uncomment(text)).unwrap();
    config.validate().unwrap();
    let app = (config.service.iter()).find(|s| s.host == "app.example.com");
    assert!(app.unwrap().h2c);
    let ssh = (config.service.iter())
        .find(|s| s.tcp_port.is_some())
        .unwrap();
    assert_eq!(ssh.name().unwrap(), "tcp:20022");
    assert_eq!(config.state, Some(PathBuf::from("/var/lib/revproxy-agent")));
}

/// `text` with every commented `key = value` line and table header uncommented.
fn uncomment(text: &str) -> String {
    (text.lines())
        .map(|line| match line.strip_prefix("# ") {
            Some(rest)
                if rest.starts_with('[')
                    || rest.split_once(" = ").is_some_and(|(key, _)| {
                        (key.chars())
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                    }) =>
            {
                rest
            }
            _ => line,
        })
        .map(|line| format!("{line}\n"))
        .collect()
}

/// As installed (the Debian package's /etc/revproxy/proxy.toml), the example opens the agent
/// port, HTTP on 80 and TLS on 443 and nothing else (no fixed port that a local service such
/// as PostgreSQL may hold); its commented-out lines, uncommented, are valid and mean what
/// they say.
#[test]
fn the_example_proxy_config_means_what_it_says() {
    let text = include_str!("../examples/proxy.toml");
    let config = ProxyConfig::from_toml(text).unwrap();
    config.validate().unwrap();
    let ports = |config: &ProxyConfig| -> Vec<u16> {
        let mut ports: Vec<u16> = (config.listeners().unwrap().iter())
            .map(|(addr, _)| addr.port())
            .collect();
        ports.sort();
        ports
    };
    assert_eq!(ports(&config), [80, 443]);
    assert_eq!(config.agents.map(|a| a.port()), Some(7443));
    assert!(config.routes().unwrap().is_empty());

    // Every `# key = value`, `# [table]` and `# [[table]]` line, uncommented.
    let uncommented = uncomment(text);
    let config = ProxyConfig::from_toml(&uncommented).unwrap();
    config.validate().unwrap();
    let acme = config.acme_settings().unwrap().expect("[acme]");
    assert_eq!(acme.challenge, revproxy::ChallengeKind::TlsAlpn01);
    assert_eq!(acme.contact, ["mailto:ops@example.com"]);
    assert_eq!(ports(&config), [80, 443, 2222, 15432]);
    assert_eq!(
        config.routes().unwrap(),
        [("legacy.example.com".to_string(), "10.0.0.7:443".to_string())]
    );
    assert_eq!(config.state, Some(PathBuf::from("/var/lib/revproxy")));
    assert_eq!(
        config.ports.map(|r| r.to_string()).as_deref(),
        Some("20000-20099")
    );
}

/// The systemd units in `examples/systemd/` carry what the operations guide promises (a
/// fixed system user, so that operators run their commands as it on the service's state),
/// and `systemd-analyze verify` (where installed) finds nothing wrong with them, not even a
/// warning, once they point at the binaries this build made.
#[test]
fn systemd_units_verify() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/systemd");
    let out = tempfile::tempdir().unwrap();
    for (unit, bin) in [
        ("revproxy.service", env!("CARGO_BIN_EXE_revproxy")),
        (
            "revproxy-agent.service",
            env!("CARGO_BIN_EXE_revproxy-agent"),
        ),
    ] {
        let text = std::fs::read_to_string(dir.join(unit)).unwrap();
        for key in [
            "StateDirectory=",
            "StateDirectoryMode=0700",
            "ExecReload=/bin/kill -HUP $MAINPID",
            "LimitNOFILE=",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "PrivateTmp=yes",
            "RestrictAddressFamilies=",
        ] {
            assert!(text.contains(key), "{unit} lacks {key}");
        }
        let name = unit.trim_end_matches(".service");
        for key in [format!("\nUser={name}\n"), format!("\nGroup={name}\n")] {
            assert!(text.contains(&key), "{unit} lacks {}", key.trim());
        }
        assert!(!text.contains("DynamicUser="), "{unit} has a dynamic user");
        let users = include_str!("../examples/systemd/revproxy.sysusers");
        assert!(
            users
                .lines()
                .any(|l| l.split_whitespace().take(2).eq(["u", name])),
            "revproxy.sysusers does not create the user {name}"
        );
        let local = text.replace(&format!("/usr/local/bin/{name} "), &format!("{bin} "));
        assert_ne!(local, text, "{unit} starts /usr/local/bin/{name}");
        std::fs::write(out.path().join(unit), local).unwrap();
    }
    assert!(std::fs::read_to_string(dir.join("revproxy.service"))
        .unwrap()
        .contains("AmbientCapabilities=CAP_NET_BIND_SERVICE"));
    let verified = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(out.path().join("revproxy.service"))
        .arg(out.path().join("revproxy-agent.service"))
        .output();
    match verified {
        Ok(o) => {
            let said = String::from_utf8_lossy(&o.stderr);
            assert!(
                o.status.success() && said.trim().is_empty(),
                "systemd-analyze verify: {said}"
            );
        }
        Err(e) => eprintln!("systemd-analyze is not installed ({e}); only the keys were checked"),
    }
}

/// A fresh user on one machine: a new `HOME` with its XDG directories, and a working
/// directory, both under a temporary directory.
struct Shell {
    home: PathBuf,
    work: PathBuf,
}

/// A command left running in the background (`&`), killed when dropped.
struct Running {
    child: Child,
    /// What it wrote to stderr so far (as far as it was waited for).
    said: Vec<String>,
    /// The lines it writes to stderr, read by a thread so that it never blocks on a
    /// full pipe.
    lines: std::sync::mpsc::Receiver<String>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Running {
    /// Ctrl-C: SIGINT, then the exit status.
    fn interrupt(mut self) -> std::process::ExitStatus {
        let sent = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        self.child.wait().unwrap()
    }

    /// Reads stderr until it has said every one of `markers` (each line counted once).
    fn wait_for(&mut self, markers: &[&str]) {
        let mut waiting: Vec<&str> = markers.to_vec();
        while !waiting.is_empty() {
            let line = (self.lines.recv_timeout(WAIT))
                .unwrap_or_else(|e| panic!("{e}: still waiting for {waiting:?}: {:#?}", self.said));
            if let Some(i) = waiting.iter().position(|m| line.contains(m)) {
                waiting.remove(i);
            }
            self.said.push(line);
        }
    }

    /// The `addr=` of the first line it said that contains `marker`.
    fn addr(&self, marker: &str) -> String {
        (self.said.iter())
            .filter(|l| l.contains(marker))
            .find_map(|l| l.split("addr=").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no {marker:?} in {:?}", self.said))
            .to_string()
    }
}

impl Shell {
    fn new(root: &Path) -> Shell {
        let (home, work) = (root.join("home"), root.join("work"));
        std::fs::create_dir_all(&home).unwrap();
        std::fs::create_dir_all(&work).unwrap();
        Shell { home, work }
    }

    fn command(&self, bin: &str, args: &[&str]) -> Command {
        let mut c = Command::new(bin);
        c.args(args).current_dir(&self.work).env("HOME", &self.home);
        for (var, dir) in [
            ("XDG_DATA_HOME", ".local/share"),
            ("XDG_CONFIG_HOME", ".config"),
            ("XDG_STATE_HOME", ".local/state"),
            ("XDG_CACHE_HOME", ".cache"),
        ] {
            c.env(var, self.home.join(dir));
        }
        for var in [
            "REVPROXY_STATE",
            "REVPROXY_STORE",
            "REVPROXY_TOKEN",
            "RUST_LOG",
        ] {
            c.env_remove(var);
        }
        c
    }

    /// Runs a command to its end; it must succeed.
    fn ok(&self, bin: &str, args: &[&str]) -> Output {
        let out = self.command(bin, args).output().unwrap();
        assert!(
            out.status.success(),
            "{bin} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Starts a command in the background and reads its stderr until it has said every
    /// one of `ready` (each line counted once).
    fn start(&self, bin: &str, args: &[&str], ready: &[&str]) -> Running {
        let mut child = self
            .command(bin, args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let (tx, lines) = std::sync::mpsc::channel();
        // Ends with the child's stderr; lines nobody waits for are dropped.
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut running = Running {
            child,
            said: Vec::new(),
            lines,
        };
        running.wait_for(ready);
        running
    }
}

/// How long a process may take to say what it is waited for.
const WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// An HTTP backend on a port the kernel chose: answers every request with `body`.
fn http_backend(body: &'static str) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut request = Vec::new();
            let mut buf = [0; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    addr
}

/// `curl -H 'Host: HOST' http://ADDR/`: the whole answer.
fn get(addr: &str, host: &str) -> String {
    let mut conn = TcpStream::connect(addr).unwrap();
    write!(
        conn,
        "GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).unwrap();
    answer
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The README's Quick start, "Enrolling an agent" and "Serving a backend" (its HTTP part),
/// in order, by a new user with a fresh `HOME`, with the built binaries. The README's fixed
/// ports are replaced by ports the kernel chooses (`:7443` by the agent listener's, the
/// admin listener's default `127.0.0.1:7444` by `127.0.0.1:0`); every other word of each
/// command is as written. `curl` is a request written here, the backend an HTTP server in
/// this test; the TLS backend behind `openssl s_server` is left out.
#[test]
fn the_readme_works_top_to_bottom_on_one_machine() {
    let tmp = tempfile::tempdir().unwrap();
    let sh = Shell::new(tmp.path());
    let proxy_dir = sh.home.join(".local/share/revproxy");
    let agent_dir = sh.home.join(".local/share/revproxy-agent");
    let readme = include_str!("../README.md");
    let said_in_readme = |command: &str| {
        assert!(
            readme.contains(command),
            "the README no longer says {command:?}"
        );
    };

    // Quick start: `revproxy serve`, which creates a CA, then Ctrl-C.
    said_in_readme("cargo run --release --bin revproxy -- serve ");
    let admin = ["--admin", "127.0.0.1:0"];
    let first = sh.start(
        PROXY,
        &["serve", "--agents", "0.0.0.0:0", admin[0], admin[1]],
        &["agent listener ready"],
    );
    let startup = first.said.join("\n");
    assert!(
        startup.contains(&format!("CA created in {}", proxy_dir.display()))
            && startup.contains("CA pin: sha256:")
            && startup.contains("Next: revproxy token create"),
        "{startup}"
    );
    assert!(first.interrupt().success());

    // Enrolling an agent, 1: name the CA (the Quick start's `serve` made one).
    said_in_readme("revproxy ca init --san proxy.example.com --san 203.0.113.7\n");
    let out = sh.ok(
        PROXY,
        &[
            "ca",
            "init",
            "--san",
            "proxy.example.com",
            "--san",
            "203.0.113.7",
        ],
    );
    assert!(
        text(&out.stdout).starts_with("sha256:"),
        "{}",
        text(&out.stdout)
    );
    assert!(proxy_dir.join("ca.key").exists());

    // 2: run the proxy.
    said_in_readme("   revproxy serve\n");
    let proxy = sh.start(
        PROXY,
        &["serve", "--agents", "0.0.0.0:0", admin[0], admin[1]],
        &["agent listener ready"],
    );
    let port = proxy.addr("agent listener ready");
    let port = port.rsplit(':').next().unwrap();

    // 3: a token, which names the first --san with the agent listener's port.
    said_in_readme("revproxy token create --name web-1 --host app.example.com --ttl 1h\n");
    let out = sh.ok(
        PROXY,
        &[
            "token",
            "create",
            "--name",
            "web-1",
            "--host",
            "app.example.com",
            "--ttl",
            "1h",
        ],
    );
    let token = text(&out.stdout).trim().to_string();
    assert_eq!(text(&out.stdout).lines().count(), 1, "only the token");
    let parsed = revproxy::ca::Token::parse(&token).unwrap();
    assert_eq!(parsed.public.server, format!("proxy.example.com:{port}"));
    assert!(text(&out.stderr).contains("note:"), "{}", text(&out.stderr));

    // 4: enroll, at the proxy's address on this machine.
    said_in_readme("revproxy-agent enroll --token \"$TOKEN\" --server 127.0.0.1:7443\n");
    let server = format!("127.0.0.1:{port}");
    let out = sh.ok(AGENT, &["enroll", "--token", &token, "--server", &server]);
    let said = text(&out.stdout);
    for line in [
        "enrolled as spiffe://revproxy.local/agent/web-1\n".to_string(),
        "names: app.example.com\n".to_string(),
        "certificate valid until ".to_string(),
        format!("state: {}\n", agent_dir.display()),
    ] {
        assert!(said.contains(&line), "{line:?} in {said}");
    }
    for file in ["agent.key", "agent.crt", "ca.crt"] {
        assert!(agent_dir.join(file).exists(), "{file}");
    }
    let again = (sh.command(AGENT, &["enroll", "--token", &token, "--server", &server]))
        .output()
        .unwrap();
    assert!(
        text(&again.stderr).contains("token already used"),
        "{}",
        text(&again.stderr)
    );
    assert!(proxy.interrupt().success());

    // Serving a backend: a proxy for agents on loopback, with public listeners.
    said_in_readme(
        "revproxy serve --agents 127.0.0.1:7443 --http 127.0.0.1:8080 --sni 127.0.0.1:8443 &\n",
    );
    let mut proxy = sh.start(
        PROXY,
        &[
            "serve",
            "--agents",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--sni",
            "127.0.0.1:0",
            admin[0],
            admin[1],
        ],
        &[
            "agent listener ready",
            "public listener ready",
            "public listener ready",
        ],
    );
    let agents = proxy.addr("agent listener ready");
    let http = (proxy.said.iter())
        .filter(|l| l.contains("public listener ready") && l.to_lowercase().contains("http"))
        .find_map(|l| l.split("addr=").nth(1)?.split_whitespace().next())
        .unwrap()
        .to_string();
    said_in_readme(
        "TOKEN=$(revproxy token create --name web-1 --host app.example.com --host secure.example.com)\n",
    );
    let out = sh.ok(
        PROXY,
        &[
            "token",
            "create",
            "--name",
            "web-1",
            "--host",
            "app.example.com",
            "--host",
            "secure.example.com",
        ],
    );
    let token = text(&out.stdout).trim().to_string();
    assert_eq!(
        revproxy::ca::Token::parse(&token).unwrap().public.server,
        agents,
        "the token names where the proxy listens for agents"
    );
    said_in_readme("revproxy-agent enroll --state ./agent --token \"$TOKEN\"\n");
    sh.ok(AGENT, &["enroll", "--state", "./agent", "--token", &token]);
    assert!(sh.work.join("agent/agent.key").exists());

    let app = http_backend("hello from the app backend");
    let secure = http_backend("not the TLS server of the README");
    said_in_readme("revproxy-agent run --state ./agent \\\n  --map app.example.com=127.0.0.1:9000 --map secure.example.com=127.0.0.1:9443 &");
    let _agent = sh.start(
        AGENT,
        &[
            "run",
            "--state",
            "./agent",
            "--map",
            &format!("app.example.com={app}"),
            "--map",
            &format!("secure.example.com={secure}"),
        ],
        &["tunnel up"],
    );
    // Routed once the proxy has the tunnel too.
    proxy.wait_for(&["tunnel up"]);

    said_in_readme("curl -H 'Host: app.example.com' http://127.0.0.1:8080/ ");
    let answer = get(&http, "app.example.com");
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("hello from the app backend"),
        "{answer}"
    );
    said_in_readme("curl -H 'Host: nobody.example.com' http://127.0.0.1:8080/ ");
    let answer = get(&http, "nobody.example.com");
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
    drop(proxy);
}
