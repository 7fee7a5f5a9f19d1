//! The command-line contract: what a newcomer types, exit statuses and messages.

#[path = "common/cli.rs"]
mod cli_helpers;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use cli_helpers::*;

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
fn ca_init_twice_is_refused_and_keeps_the_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let first = run(
        PROXY,
        &["ca", "init", "--san", "proxy.example.com"],
        tmp.path(),
    );
    assert!(first.status.success(), "{}", stderr(&first));
    let pin = stdout(&first);
    assert!(
        pin.starts_with("sha256:") && pin.trim().len() == 71,
        "{pin}"
    );
    let key = std::fs::read(tmp.path().join("ca.key")).unwrap();

    let second = run(PROXY, &["ca", "init"], tmp.path());
    assert_eq!(second.status.code(), Some(1));
    assert!(
        stderr(&second).contains("already exists"),
        "{}",
        stderr(&second)
    );
    assert_eq!(std::fs::read(tmp.path().join("ca.key")).unwrap(), key);

    // The token names the first SAN as the enrollment address.
    let out = run(
        PROXY,
        &["token", "create", "--name", "a", "--host", "x.example.com"],
        tmp.path(),
    );
    let token = revproxy::ca::Token::parse(&stdout(&out)).unwrap();
    assert_eq!(token.public.server, "proxy.example.com:7443");
    assert_eq!(token.public.pins, [pin.trim()]);
}

#[test]
fn bad_input_exits_2_with_one_sentence_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    assert!(run(PROXY, &["ca", "init"], tmp.path()).status.success());
    let state_before = std::fs::read(tmp.path().join("state.json")).unwrap();
    for args in [
        &["token", "create", "--name", "a", "--host", "bad_host!"][..],
        &[
            "token",
            "create",
            "--name",
            "a b",
            "--host",
            "x.example.com",
        ],
        &[
            "token",
            "create",
            "--name",
            "a",
            "--host",
            "x.example.com",
            "--ttl",
            "forever",
        ],
        &["token", "create", "--name", "a"],
        &[
            "token",
            "create",
            "--name",
            "a",
            "--host",
            "x.example.com",
            "--server",
            "nope",
        ],
    ] {
        let out = run(PROXY, args, tmp.path());
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stdout(&out).is_empty(), "{args:?}");
    }
    assert_eq!(
        std::fs::read(tmp.path().join("state.json")).unwrap(),
        state_before
    );

    let out = run(PROXY, &["token", "revoke", "0000"], tmp.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no token with id"),
        "{}",
        stderr(&out)
    );

    let out = run(
        AGENT,
        &["enroll", "--token", "not-a-token"],
        &tmp.path().join("agent"),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("revproxy enrollment token"),
        "{}",
        stderr(&out)
    );
    assert!(!tmp.path().join("agent").exists());
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

#[test]
fn certificate_lifetimes_listing_revocation_and_narrowing_from_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("proxy");
    let (_serve, addr, _) = serve(&state);
    for bad in ["30m", "8d", "soon"] {
        let out = run(
            PROXY,
            &[
                "token",
                "create",
                "--name",
                "a",
                "--host",
                "a.example.com",
                "--cert-ttl",
                bad,
            ],
            &state,
        );
        assert_eq!(
            out.status.code(),
            Some(2),
            "--cert-ttl {bad}: {}",
            stderr(&out)
        );
    }
    let out = run(
        PROXY,
        &[
            "token",
            "create",
            "--name",
            "web-1",
            "--host",
            "a.example.com",
            "--host",
            "b.example.com",
            "--cert-ttl",
            "2h",
            "--server",
            &addr,
        ],
        &state,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let token = stdout(&out);
    let out = run(
        AGENT,
        &["enroll", "--token", token.trim()],
        &tmp.path().join("agent"),
    );
    assert!(out.status.success(), "{}", stderr(&out));

    let list = stdout(&run(PROXY, &["cert", "list"], &state));
    let line = list.lines().find(|l| l.contains("web-1")).expect("listed");
    assert!(
        line.contains("valid") && line.contains("a.example.com,b.example.com"),
        "{list}"
    );
    let serial = line.split_whitespace().next().unwrap().to_string();
    let certs = revproxy::ca::Ca::open(&state)
        .unwrap()
        .list_certs(time::OffsetDateTime::now_utc())
        .unwrap();
    let span = certs[0].not_after - certs[0].not_before;
    assert_eq!(span, 2 * 3600 + 60, "2h plus the one-minute backdate");

    let out = run(
        PROXY,
        &["agent", "set-hosts", "web-1", "a.example.com"],
        &state,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let said = stderr(&out);
    assert!(said.contains("web-1 is granted: a.example.com\n"), "{said}");
    assert!(
        said.contains("in effect now") && !said.contains("not served"),
        "{said}"
    );
    // A name the certificate lacks is granted but not served, and the tool says so and
    // how to get there: renewals keep the certificate's names; a new token does it.
    let out = run(
        PROXY,
        &[
            "agent",
            "set-hosts",
            "web-1",
            "a.example.com",
            "new.example.com",
        ],
        &state,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let said = stderr(&out);
    assert!(
        said.contains("in effect now (its certificate carries them; live tunnels follow within seconds): a.example.com\n"),
        "{said}"
    );
    assert!(
        said.contains(&format!(
            "not served: new.example.com (not in web-1's certificate, serial {serial})"
        )),
        "{said}"
    );
    assert!(
        said.contains("Renewals keep a certificate's names"),
        "{said}"
    );
    assert!(
        said.contains("--name web-1 --host a.example.com --host new.example.com\n"),
        "{said}"
    );
    assert!(!said.contains("may now serve"), "{said}");
    let out = run(
        PROXY,
        &["agent", "set-hosts", "nobody", "a.example.com"],
        &state,
    );
    assert_eq!(out.status.code(), Some(1));

    let out = run(PROXY, &["cert", "revoke", &serial], &state);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains(&format!("revoked {serial}")));
    let again = run(PROXY, &["cert", "revoke", "web-1"], &state);
    assert!(
        stderr(&again).contains("already revoked"),
        "{}",
        stderr(&again)
    );
    let list = stdout(&run(PROXY, &["cert", "list"], &state));
    assert!(
        list.lines()
            .any(|l| l.starts_with(&serial) && l.contains("revoked")),
        "{list}"
    );
    let out = run(PROXY, &["cert", "revoke", "ffff"], &state);
    assert_eq!(out.status.code(), Some(1));
    // Its only certificate revoked, nothing it is granted is served.
    let out = run(
        PROXY,
        &["agent", "set-hosts", "web-1", "a.example.com"],
        &state,
    );
    let said = stderr(&out);
    assert!(
        said.contains("not served: a.example.com (web-1 has no valid certificate)"),
        "{said}"
    );
}

/// `revproxy serve` raises its soft open-file limit to the hard one: the connection caps
/// need the descriptors, and a process at 1024 stops accepting long before them.
#[test]
fn serve_raises_its_open_file_limit() {
    let state = tempfile::tempdir().unwrap();
    let mut child = Serve(
        Command::new("sh")
            .args([
                "-c",
                "ulimit -Sn 256 && exec \"$0\" serve --agents 127.0.0.1:0",
                PROXY,
            ])
            .env("REVPROXY_STATE", state.path())
            .env_remove("RUST_LOG")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let lines = BufReader::new(child.0.stderr.take().unwrap()).lines();
    for line in lines {
        if line.unwrap().contains("agent listener ready") {
            break;
        }
    }
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.0.id())).unwrap();
    let files: Vec<&str> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .split_whitespace()
        .collect();
    let (soft, hard) = (files[3], files[4]);
    assert_eq!(soft, hard, "{limits}");
    assert_ne!(soft, "256", "{limits}");
}

/// Whoever can write to the state directory can swap the CA: `revproxy` refuses a
/// directory that group or others may write to, and says how to fix it.
#[test]
fn a_state_directory_others_can_write_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    assert!(run(PROXY, &["ca", "init"], &state).status.success());
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
    for args in [
        &["serve", "--agents", "127.0.0.1:0", "--admin", "127.0.0.1:0"][..],
        &["token", "list"][..],
    ] {
        let out = run(PROXY, args, &state);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains("chmod 700"), "{}", stderr(&out));
    }
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    assert!(run(PROXY, &["token", "list"], &state).status.success());
}

/// A running program whose stderr is read line by line in the background.
struct Logged {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    /// Events read so far, in order (they may come in any order across tasks).
    seen: std::cell::RefCell<Vec<serde_json::Value>>,
}

impl Drop for Logged {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Logged {
    fn start(bin: &str, args: &[&str], state: &Path) -> Logged {
        let mut child = Command::new(bin)
            .args(args)
            .env("REVPROXY_STATE", state)
            .env_remove("RUST_LOG")
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
        }
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
            if event["message"] == message {
                return event;
            }
        }
    }
}

/// The operator's view from the command line: JSON logs that parse line by line,
/// `revproxy status` and `revproxy-agent status` from the admin listeners, and
/// `revproxy-agent ready` as an exec probe whose exit status follows the tunnel.
#[test]
fn status_ready_and_json_logs_from_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let proxy_state = tmp.path().join("proxy");
    assert!(run(PROXY, &["ca", "init"], &proxy_state).status.success());
    let args = [
        "serve",
        "--agents",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--log-format",
        "json",
    ];
    let proxy = Logged::start(PROXY, &args, &proxy_state);
    let agents = proxy.json_line("agent listener ready")["addr"]
        .as_str()
        .unwrap()
        .to_string();
    let admin = proxy.json_line("admin listener ready")["addr"]
        .as_str()
        .unwrap()
        .to_string();

    let token = stdout(&run(
        PROXY,
        &[
            "token",
            "create",
            "--name",
            "web-1",
            "--host",
            "app.example.com",
            "--server",
            &agents,
        ],
        &proxy_state,
    ));
    let agent_state = tmp.path().join("agent");
    assert!(
        run(AGENT, &["enroll", "--token", token.trim()], &agent_state)
            .status
            .success()
    );
    let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let map = format!("app.example.com={}", backend.local_addr().unwrap());
    let agent = Logged::start(
        AGENT,
        &[
            "run",
            "--map",
            &map,
            "--admin",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ],
        &agent_state,
    );
    let agent_admin = agent.json_line("admin listener ready")["addr"]
        .as_str()
        .unwrap()
        .to_string();
    let up = agent.json_line("tunnel up");
    assert_eq!(up["span"]["transport"], "h2", "{up}");

    let ready = until_exit(AGENT, &["ready", "--admin", &agent_admin], 0);
    assert_eq!(stdout(&ready).trim(), "ready");

    let status = until_exit(PROXY, &["status", "--admin", &admin], 0);
    let text = stdout(&status);
    assert!(
        text.contains("web-1") && text.contains("app.example.com"),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("web-1") && l.contains(" up ")),
        "{text}"
    );
    let json = until_exit(PROXY, &["status", "--admin", &admin, "--json"], 0);
    let doc: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(doc["agents"][0]["agent"], "web-1");
    assert_eq!(doc["agents"][0]["tunnels"][0]["transport"], "h2");
    let agent_status = until_exit(AGENT, &["status", "--admin", &agent_admin], 0);
    assert!(
        stdout(&agent_status).contains("app.example.com"),
        "{}",
        stdout(&agent_status)
    );

    // The proxy goes away: the probe fails, and says why.
    drop(proxy);
    let not_ready = until_exit(AGENT, &["ready", "--admin", &agent_admin], 1);
    assert!(
        stderr(&not_ready).contains("no tunnel"),
        "{}",
        stderr(&not_ready)
    );
    // Nothing listening at all.
    let nobody = Command::new(AGENT)
        .args(["ready", "--admin", "127.0.0.1:1"])
        .output()
        .unwrap();
    assert_eq!(nobody.status.code(), Some(1));
    assert!(
        stderr(&nobody).contains("cannot reach"),
        "{}",
        stderr(&nobody)
    );
    drop(agent);

    // The agent's admin listener has no certificate to offer: loopback only.
    let public = run(
        AGENT,
        &["run", "--map", &map, "--admin", "0.0.0.0:0"],
        &agent_state,
    );
    assert_eq!(public.status.code(), Some(2), "{}", stderr(&public));
    assert!(stderr(&public).contains("loopback"), "{}", stderr(&public));

    // Operator certificates, for a proxy admin listener beyond loopback.
    let op = tmp.path().join("op");
    let out = run(
        PROXY,
        &[
            "operator",
            "create",
            "--name",
            "alice",
            "--out",
            op.to_str().unwrap(),
        ],
        &proxy_state,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out).trim(),
        "spiffe://revproxy.local/operator/alice"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = |f: &str| std::fs::metadata(op.join(f)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("operator.key"), 0o600);
    assert_eq!(
        std::fs::metadata(&op).unwrap().permissions().mode() & 0o077,
        0
    );
    assert!(op.join("operator.crt").exists() && op.join("ca.crt").exists());
    let again = run(
        PROXY,
        &[
            "operator",
            "create",
            "--name",
            "alice",
            "--out",
            op.to_str().unwrap(),
        ],
        &proxy_state,
    );
    assert_eq!(again.status.code(), Some(2), "never overwrites a key");
    let list = stdout(&run(PROXY, &["operator", "list"], &proxy_state));
    assert!(list.contains("alice") && list.contains("valid"), "{list}");
    let revoked = run(PROXY, &["operator", "revoke", "alice"], &proxy_state);
    assert!(stderr(&revoked).contains("revoked"), "{}", stderr(&revoked));
    let list = stdout(&run(PROXY, &["operator", "list"], &proxy_state));
    assert!(list.contains("revoked"), "{list}");
    // An https:// admin address needs the operator's files.
    let missing = run(
        PROXY,
        &["status", "--admin", "https://127.0.0.1:1"],
        &proxy_state,
    );
    assert_eq!(missing.status.code(), Some(2));
    assert!(
        stderr(&missing).contains("--operator"),
        "{}",
        stderr(&missing)
    );
}

/// The access commands and the token flags of private names: an identity may hold
/// `--connect` names and no `--host` at all; rules are listed, granted and taken back.
#[test]
fn private_names_and_access_rules_from_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("proxy");
    assert!(run(PROXY, &["ca", "init"], &state).status.success());
    let none = run(PROXY, &["token", "create", "--name", "x"], &state);
    assert_eq!(none.status.code(), Some(2));
    assert!(
        stderr(&none).contains("--private-host"),
        "{}",
        stderr(&none)
    );
    let both = run(
        PROXY,
        &[
            "token",
            "create",
            "--name",
            "x",
            "--host",
            "a.example.com",
            "--private-host",
            "a.example.com",
        ],
        &state,
    );
    assert_eq!(both.status.code(), Some(2), "{}", stderr(&both));
    let laptop = run(
        PROXY,
        &[
            "token",
            "create",
            "--name",
            "laptop",
            "--connect",
            "db.internal",
        ],
        &state,
    );
    assert!(laptop.status.success(), "{}", stderr(&laptop));
    let db = run(
        PROXY,
        &[
            "token",
            "create",
            "--name",
            "db-1",
            "--private-host",
            "db.internal",
        ],
        &state,
    );
    assert!(db.status.success(), "{}", stderr(&db));
    assert!(!stderr(&db).contains("note:"), "{}", stderr(&db));
    // A public wildcard over a private name: the private grant wins, and the tool says so
    // (the token is still minted: stdout has it and only it).
    let edge = run(
        PROXY,
        &[
            "token",
            "create",
            "--name",
            "edge",
            "--host",
            "*.example.com",
            "--private-host",
            "db.example.com",
        ],
        &state,
    );
    assert!(edge.status.success(), "{}", stderr(&edge));
    assert_eq!(stdout(&edge).trim().lines().count(), 1);
    assert!(
        stderr(&edge).contains("note: db.example.com is granted privately, so no public listener routes it, although the public grant *.example.com covers it"),
        "{}",
        stderr(&edge)
    );

    // Rules apply to enrolled agents; this one has not enrolled yet.
    let early = run(PROXY, &["access", "allow", "laptop", "db.internal"], &state);
    assert_eq!(early.status.code(), Some(1), "{}", stderr(&early));
    assert!(stderr(&early).contains("laptop"), "{}", stderr(&early));
    assert!(
        stdout(&run(PROXY, &["access", "list"], &state))
            .lines()
            .count()
            == 1
    );

    // A name no agent (nor an unused token) is granted is a likely typo: refused, with the
    // granted names closest to it, or the private names when none is close.
    let typo = run(PROXY, &["access", "allow", "laptop", "db.intenral"], &state);
    assert_eq!(typo.status.code(), Some(2), "{}", stderr(&typo));
    assert!(
        stderr(&typo).contains("no agent is granted db.intenral: did you mean db.internal?"),
        "{}",
        stderr(&typo)
    );
    let far = run(
        PROXY,
        &["access", "allow", "laptop", "cache.internal"],
        &state,
    );
    assert_eq!(far.status.code(), Some(2), "{}", stderr(&far));
    assert!(
        stderr(&far).contains("the private names are: db.example.com db.internal"),
        "{}",
        stderr(&far)
    );
    // --force allows it (for an agent that enrolls with it later); a wildcard over a
    // granted name needs no force.
    let (_serve, addr, _) = serve(&state);
    let token = run(
        PROXY,
        &[
            "token",
            "create",
            "--name",
            "laptop-2",
            "--connect",
            "db.internal",
            "--server",
            &addr,
        ],
        &state,
    );
    let agent = tmp.path().join("laptop-2");
    let out = run(AGENT, &["enroll", "--token", stdout(&token).trim()], &agent);
    assert!(out.status.success(), "{}", stderr(&out));
    let forced = run(
        PROXY,
        &["access", "allow", "laptop-2", "later.internal", "--force"],
        &state,
    );
    assert!(forced.status.success(), "{}", stderr(&forced));
    assert!(
        stderr(&forced).contains("note: no agent is granted later.internal yet"),
        "{}",
        stderr(&forced)
    );
    let wild = run(
        PROXY,
        &["access", "allow", "laptop-2", "*.example.com"],
        &state,
    );
    assert!(wild.status.success(), "{}", stderr(&wild));
    assert!(
        stderr(&wild).contains("laptop-2 may now reach: db.internal later.internal *.example.com"),
        "{}",
        stderr(&wild)
    );
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

/// A failure prints one line that says each reason once: `a: b: b` (an error whose message
/// embeds its cause and also exposes it) or a TOML snippet printed twice says it twice.
fn assert_said_once(what: &str, out: &std::process::Output) {
    let text = stderr(out);
    assert_eq!(text.trim_end().lines().count(), 1, "{what}: {text}");
    let parts: Vec<&str> = text.trim().split(": ").collect();
    for (i, part) in parts.iter().enumerate() {
        assert!(
            !parts[i + 1..].contains(part),
            "{what}: {part:?} is said twice in {text}"
        );
    }
}

#[test]
fn errors_say_each_reason_once_with_file_line_key_and_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.toml");
    let missing = missing.to_str().unwrap();
    for (bin, args) in [
        (PROXY, vec!["serve", "--config", missing]),
        (PROXY, vec!["check", "--config", missing]),
        (AGENT, vec!["run", "--config", missing]),
        (AGENT, vec!["check", "--config", missing]),
    ] {
        let out = run(bin, &args, dir.path());
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains("cannot read"), "{}", stderr(&out));
        assert_said_once(&format!("{args:?}"), &out);
    }
    // One pair of brackets for a table a config may repeat: say which two to use.
    let cases = [
        (PROXY, "[listener]\nlisten = \"127.0.0.1:1\"\nprotocol = \"sni\"\n", ":1: listener: use [[listener]] (two brackets)"),
        (PROXY, "[route]\nhost = \"a.example.com\"\nto = \"tcp://127.0.0.1:1\"\n", ":1: route: use [[route]] (two brackets)"),
        (AGENT, "[service]\nhost = \"a.example.com\"\nto = \"127.0.0.1:1\"\n", ":1: service: use [[service]] (two brackets)"),
        (AGENT, "[connect]\nhost = \"db.internal\"\nlisten = \"127.0.0.1:1\"\n", ":1: connect: use [[connect]] (two brackets)"),
        // Line and dotted key of a bad value, said once and without the parser's snippet.
        (PROXY, "http = \"127.0.0.1:8080\"\n\n[[listener]]\nlisten = \"127.0.0.1\"\nprotocol = \"sni\"\n", ":4: listener.listen: invalid socket address"),
        (PROXY, "agents = \"nope\"\n", ":1: agents: invalid socket address"),
    ];
    for (bin, text, says) in cases {
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, text).unwrap();
        let out = run(
            bin,
            &["check", "--config", file.to_str().unwrap()],
            dir.path(),
        );
        assert_eq!(out.status.code(), Some(2), "{text}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(&format!("bad.toml{says}")),
            "{text}: {}",
            stderr(&out)
        );
        assert!(
            !stderr(&out).contains("expected a sequence"),
            "{}",
            stderr(&out)
        );
        assert_said_once(text, &out);
    }
}

#[test]
fn mistyped_flags_and_subcommands_get_a_suggestion() {
    let dir = tempfile::tempdir().unwrap();
    for (bin, args, suggested) in [
        (PROXY, &["serve", "--htpp", "127.0.0.1:0"][..], "'--http'"),
        (PROXY, &["ca", "int"][..], "'init'"),
        (AGENT, &["run", "--mapp", "a=b:1"][..], "'--map'"),
        (AGENT, &["enrol"][..], "'enroll'"),
    ] {
        let out = run(bin, args, dir.path());
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(&format!(
                "similar {} exists: {suggested}",
                if suggested.starts_with("'-") {
                    "argument"
                } else {
                    "subcommand"
                }
            )),
            "{args:?}: {}",
            stderr(&out)
        );
    }
}

#[test]
fn enroll_says_when_the_address_is_no_tls_port_or_does_not_resolve() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("proxy");
    let out = run(PROXY, &["ca", "init"], &state);
    assert!(out.status.success(), "{}", stderr(&out));
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
            "nowhere.invalid:7443",
        ],
        &state,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let token = stdout(&out).trim().to_string();
    let agent = tmp.path().join("agent");

    // A plain HTTP server where the agent port should be: it answers the ClientHello
    // with `HTTP/1.1 400`.
    let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let http_addr = http.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for conn in http.incoming() {
            let mut conn = conn.unwrap();
            let _ = std::io::Read::read(&mut conn, &mut [0; 1024]);
            let _ = std::io::Write::write_all(
                &mut conn,
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n",
            );
        }
    });
    let out = run(
        AGENT,
        &["enroll", "--token", &token, "--server", &http_addr],
        &agent,
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!(
            "the server at {http_addr} does not speak TLS: is this the proxy's agent port?"
        )),
        "{}",
        stderr(&out)
    );
    assert!(
        !stderr(&out).contains("InvalidContentType"),
        "{}",
        stderr(&out)
    );

    // The token's own address does not resolve here: say so, and how to give another.
    let out = run(AGENT, &["enroll", "--token", &token], &agent);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let said = stderr(&out);
    assert!(said.contains("cannot resolve nowhere.invalid"), "{said}");
    assert!(said.contains("--server HOST:PORT"), "{said}");
}

/// The server certificate in a proxy state directory.
fn server_cert(state: &Path) -> revproxy::ca::CertSummary {
    let pem = std::fs::read_to_string(state.join("server.crt")).unwrap();
    revproxy::ca::CertSummary::from_pem(&pem).unwrap()
}

/// `serve` created a CA for localhost; `ca init --san` then adds the names to its server
/// certificate (same CA key, same pin, same proxy id) instead of refusing, says so, and
/// still refuses what only a new CA could do.
#[test]
fn ca_init_san_adds_names_to_the_ca_serve_created() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("proxy");
    let (serving, _, startup) = serve(&state);
    drop(serving);
    let startup = startup.join("\n");
    let pin = startup
        .split("CA pin: ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("serve printed the pin: {startup}"))
        .to_string();
    let key = std::fs::read(state.join("ca.key")).unwrap();
    let before = server_cert(&state);
    let id = revproxy::ca::proxy_id_of(&before.uris).unwrap().to_string();

    let out = run(
        PROXY,
        &[
            "ca",
            "init",
            "--san",
            "proxy.example.com",
            "--san",
            "203.0.113.7",
        ],
        &state,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), pin, "the pin is printed and unchanged");
    assert!(
        stderr(&out).contains("Added proxy.example.com, 203.0.113.7")
            && stderr(&out).contains("same pin")
            && stderr(&out).contains("hourly"),
        "{}",
        stderr(&out)
    );
    assert_eq!(std::fs::read(state.join("ca.key")).unwrap(), key);
    let after = server_cert(&state);
    assert_ne!(after.serial, before.serial, "server.crt was reissued");
    assert_eq!(revproxy::ca::proxy_id_of(&after.uris), Some(id.as_str()));
    for dns in ["localhost", "proxy.example.com"] {
        assert!(after.dns_names.iter().any(|d| d == dns), "{dns}: {after:?}");
    }
    for ip in ["127.0.0.1", "203.0.113.7"] {
        assert!(after.ips.contains(&ip.parse().unwrap()), "{ip}: {after:?}");
    }

    // The same names again: nothing to do, nothing reissued.
    let again = run(PROXY, &["ca", "init", "--san", "proxy.example.com"], &state);
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(
        stderr(&again).contains("nothing changed"),
        "{}",
        stderr(&again)
    );
    assert_eq!(server_cert(&state).serial, after.serial);

    // A trust domain is the CA's: another one is a new CA, refused with what to do.
    let other = run(
        PROXY,
        &[
            "ca",
            "init",
            "--san",
            "more.example.com",
            "--trust-domain",
            "other.example.org",
        ],
        &state,
    );
    assert_eq!(other.status.code(), Some(1));
    assert!(
        stderr(&other).contains("trust domain cannot change") && stderr(&other).contains("move "),
        "{}",
        stderr(&other)
    );
    let bare = run(PROXY, &["ca", "init"], &state);
    assert_eq!(bare.status.code(), Some(1));
    assert!(
        stderr(&bare).contains("already exists") && stderr(&bare).contains("--san"),
        "{}",
        stderr(&bare)
    );
    assert_eq!(std::fs::read(state.join("ca.key")).unwrap(), key);
    assert_eq!(server_cert(&state).serial, after.serial);

    // A proxy started on it keeps that certificate.
    let (_serving, _, _) = serve(&state);
    assert_eq!(server_cert(&state).serial, after.serial);
}

/// The address in a token created without --server is where `serve` listens for agents:
/// its --advertise, else its --agents address; for a wildcard listener, the CA's name with
/// the listener's port, and a note that says how to be sure.
#[test]
fn tokens_name_where_serve_listens_for_agents() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("proxy");
    let token_server = |state: &Path| {
        let out = run(
            PROXY,
            &[
                "token",
                "create",
                "--name",
                "web-1",
                "--host",
                "app.example.com",
            ],
            state,
        );
        assert!(out.status.success(), "{}", stderr(&out));
        let token = revproxy::ca::Token::parse(&stdout(&out)).unwrap();
        (token.public.server, stderr(&out))
    };

    let (serving, addr, _) = serve_with(&state, &["--agents", "127.0.0.1:0", "--admin", "off"]);
    let (server, said) = token_server(&state);
    assert_eq!(server, addr);
    assert!(!said.contains("note"), "{said}");
    drop(serving);

    let (serving, _, _) = serve_with(
        &state,
        &[
            "--agents",
            "127.0.0.1:0",
            "--admin",
            "off",
            "--advertise",
            "proxy.internal.example:9443",
        ],
    );
    assert_eq!(token_server(&state).0, "proxy.internal.example:9443");
    drop(serving);

    let (_serving, addr, _) = serve_with(&state, &["--agents", "0.0.0.0:0", "--admin", "off"]);
    let port = addr.rsplit(':').next().unwrap();
    let (server, said) = token_server(&state);
    assert_eq!(server, format!("localhost:{port}"));
    assert!(
        said.contains("note: the proxy listens for agents on every address")
            && said.contains("--server HOST:PORT")
            && said.contains("--advertise"),
        "{said}"
    );
}

/// `enroll --server` reaches the proxy at another address than the token's and keeps it
/// for `run`; the token's pin still decides: another CA's proxy there is refused.
#[test]
fn enroll_server_overrides_the_token_address() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("proxy");
    let (_serving, addr, _) = serve(&state);
    let token = |state: &Path| {
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
                "nowhere.invalid:7443",
            ],
            state,
        );
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out).trim().to_string()
    };

    let agent = tmp.path().join("agent");
    let bad = run(
        AGENT,
        &["enroll", "--token", &token(&state), "--server", "no-port"],
        &agent,
    );
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
    assert!(stderr(&bad).contains("HOST:PORT"), "{}", stderr(&bad));

    let other_state = tmp.path().join("other");
    let (_other, other_addr, _) = serve(&other_state);
    let refused = run(
        AGENT,
        &["enroll", "--token", &token(&state), "--server", &other_addr],
        &agent,
    );
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        stderr(&refused).contains("not the proxy that issued your token"),
        "{}",
        stderr(&refused)
    );

    let out = run(
        AGENT,
        &["enroll", "--token", &token(&state), "--server", &addr],
        &agent,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(agent.join("agent.json")).unwrap()).unwrap();
    assert_eq!(saved["server"], addr.as_str());
}

/// `store migrate` refuses while a `revproxy serve` serves on the state directory (it
/// would go on serving a stale state, and ready), and says how to proceed; the socket file
/// a killed proxy leaves behind does not hold it back.
#[test]
fn store_migrate_refuses_while_a_proxy_serves_on_the_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("proxy");
    let dir = state.to_str().unwrap();
    // Nothing listens on port 1: a migration that got as far as the store fails there.
    let url = "postgres://revproxy@127.0.0.1:1/revproxy";
    let migrate = ["store", "migrate", "--from", dir, "--to", url];
    let (serving, _, _) = serve(&state);
    let out = run(PROXY, &migrate, &state);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("a proxy is serving on {dir}")),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("stop it first"), "{}", stderr(&out));
    assert!(state.join("state.json").exists());
    // Killed, it leaves its socket file; the migration goes on to the store.
    drop(serving);
    assert!(state.join("upgrade.sock").exists());
    let out = run(PROXY, &migrate, &state);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(!stderr(&out).contains("serving"), "{}", stderr(&out));
    assert!(state.join("state.json").exists());
}
