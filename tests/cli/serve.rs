//! `serve` as an operator runs it: open files, the state directory's rules, status, readiness
//! and logs, and what may not run beside it.

use super::*;

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

    let token = web_token(&proxy_state, &agents);
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
    assert!(state.join("state.db").exists());
    // Killed, it leaves its socket file; the migration goes on to the store.
    drop(serving);
    assert!(state.join("upgrade.sock").exists());
    let out = run(PROXY, &migrate, &state);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(!stderr(&out).contains("serving"), "{}", stderr(&out));
    assert!(state.join("state.db").exists());
}

/// The level of a text log line (`2026-12-06T13:06:51.390008Z  INFO target: message`), or
/// `None` for what is no log line (the CA notice `serve` prints on its first start).
fn level(line: &str) -> Option<&str> {
    let mut words = line.split_whitespace();
    let time = words.next()?;
    (time.len() > 20 && time.ends_with('Z') && time.as_bytes()[10] == b'T')
        .then(|| words.next())
        .flatten()
}

/// Logs for people: stopping either side cleanly (SIGTERM) is news at `info`, never a
/// warning on either side, also while the agent knocks at a proxy that is gone; and info
/// lines carry `key=value` fields with readable values, no Rust `Debug` shapes.
#[test]
fn a_clean_stop_warns_nobody_and_info_lines_read_as_key_value() {
    let tmp = tempfile::tempdir().unwrap();
    let proxy_state = tmp.path().join("proxy");
    let config = tmp.path().join("proxy.toml");
    std::fs::write(
        &config,
        "[[listener]]\nlisten = \"127.0.0.1:0\"\nto = \"tcp://127.0.0.1:9\"\n",
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let proxy = Logged::start(
        PROXY,
        &[
            "serve",
            "--config",
            config,
            "--agents",
            "127.0.0.1:0",
            "--sni",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ],
        &proxy_state,
    );
    let (_, ready) = proxy.text_line(0, "agent listener ready");
    let agents = ready
        .split("addr=")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    let token = stdout(&run(
        PROXY,
        &[
            "token",
            "create",
            "--name",
            "web-1",
            "--host",
            "app.example.com",
            "--host",
            "*.example.com",
            "--private-host",
            "db.internal",
            "--server",
            agents,
        ],
        &proxy_state,
    ));
    let agent_state = tmp.path().join("agent");
    let enrolled = run(AGENT, &["enroll", "--token", token.trim()], &agent_state);
    assert!(enrolled.status.success(), "{}", stderr(&enrolled));
    let run_agent = ["run", "--map", "app.example.com=127.0.0.1:9"];
    // The supervisor at debug: its reconnect pauses show that it knocked at the proxy.
    let filter = Some("info,revproxy::agent::supervisor=debug");

    // The agent stops: the proxy says at info that its tunnel went down.
    let first = Logged::start_logging(AGENT, &run_agent, &agent_state, filter);
    first.text_line(0, "tunnel up");
    let (up, _) = proxy.text_line(0, "tunnel up");
    let first = first.terminate();
    let (down, down_line) = proxy.text_line(up, "tunnel down");

    // The proxy stops: the agent says so at info and knocks until it is stopped too.
    let second = Logged::start_logging(AGENT, &run_agent, &agent_state, filter);
    second.text_line(0, "tunnel up");
    proxy.text_line(down, "tunnel up");
    let proxy = proxy.terminate();
    let (closed, reconnecting) = second.text_line(0, "; reconnecting");
    let (pause, _) = second.text_line(closed, "reconnecting after a pause");
    second.text_line(pause + 1, "reconnecting after a pause");
    let second = second.terminate();

    let everyone = [
        ("proxy", &proxy),
        ("first agent", &first),
        ("second agent", &second),
    ];
    for (who, said) in everyone {
        let all = said.join("\n");
        for line in said {
            match level(line) {
                // The host's kernel caps UDP buffers below what QUIC asks for (a tuning
                // hint, documented in docs/configuration.md), not news about a stop.
                Some("WARN") if line.contains("the OS capped the QUIC UDP socket buffers") => {}
                Some("WARN" | "ERROR") => panic!("{who} warned: {line}\n{all}"),
                _ => {}
            }
        }
    }
    for (who, said) in everyone {
        for line in said.iter().filter(|l| level(l) == Some("INFO")) {
            for shape in [
                "{ ", "Some(", "Fixed(", "Served {", "Limits {", "[\"", "=\"",
            ] {
                assert!(!line.contains(shape), "{who}: {shape:?} in {line}");
            }
        }
    }
    let find = |said: &[String], needle: &str| -> String {
        said.iter()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no {needle:?} in {said:#?}"))
            .clone()
    };
    // However the agent's connection ended, the reason says the agent left.
    assert_eq!(level(&down_line), Some("INFO"), "{down_line}");
    assert!(
        down_line.contains("reason=closed by the agent")
            || down_line.contains("reason=the agent went away"),
        "{down_line}"
    );
    assert_eq!(level(&reconnecting), Some("INFO"), "{reconnecting}");
    assert!(
        reconnecting.contains("the proxy closed the tunnel"),
        "{reconnecting}"
    );
    let start = find(&second, "agent starting");
    assert!(start.contains(" valid_until=20"), "{start}");
    assert!(!start.contains("not_after"), "{start}");
    let up = find(&proxy, "tunnel up");
    assert!(
        up.contains(" transport=h2 hosts=app.example.com,*.example.com private=db.internal"),
        "{up}"
    );
    let fixed = find(&proxy, "kind=fixed");
    assert!(fixed.contains(" to=tcp://127.0.0.1:9"), "{fixed}");
    assert!(find(&proxy, "connection caps").contains(" clients="));
    // Nothing secret: not the token's secret, not a key.
    let secret = token.trim().rsplit('.').next().unwrap();
    for line in proxy.iter().chain(&first).chain(&second) {
        assert!(
            !line.contains(secret) && !line.contains("PRIVATE KEY"),
            "{line}"
        );
    }
}
