//! The command-line contract: what a newcomer types, exit statuses and messages.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

const PROXY: &str = env!("CARGO_BIN_EXE_revproxy");
const AGENT: &str = env!("CARGO_BIN_EXE_revproxy-agent");

fn run(bin: &str, args: &[&str], state: &Path) -> Output {
    Command::new(bin)
        .args(args)
        .env("REVPROXY_STATE", state)
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `revproxy serve` on port 0; returns the child and the address it listens on.
struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(state: &Path) -> (Serve, String, Vec<String>) {
    let mut child = Serve(
        Command::new(PROXY)
            .args(["serve", "--agents", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .env("REVPROXY_STATE", state)
            .env_remove("RUST_LOG")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(child.0.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(rest) = line
            .contains("agent listener ready")
            .then(|| line.split("addr=").nth(1))
            .flatten()
        {
            let addr = rest.split_whitespace().next().unwrap().to_string();
            // Keep draining stderr so the proxy never blocks on a full pipe.
            std::thread::spawn(move || for _ in lines {});
            return (child, addr, seen);
        }
        seen.push(line);
    }
    panic!("serve exited without listening: {seen:?}");
}

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
    assert!(
        stderr(&out).contains("web-1 may now serve: a.example.com"),
        "{}",
        stderr(&out)
    );
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
