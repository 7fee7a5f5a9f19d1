//! The CA from the command line: `ca init` (and adding names to a CA), certificates, tokens and
//! where they point, `enroll --server`.

use super::*;
use std::os::unix::fs::PermissionsExt;

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
    let token = |state: &Path| web_token(state, "nowhere.invalid:7443");

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

/// `token list`, `cert list` and `access list` take `--agent` (and `token list`
/// `--status`) and print one JSON array with `--json`; a status that does not exist is a
/// usage error.
#[test]
fn lists_filter_by_agent_and_status_and_print_json() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("proxy");
    let (_serve, addr, _) = serve(&state);
    let token = |agent: &str| {
        let args = ["token", "create", "--name", agent, "--host"];
        let host = format!("{agent}.example.com");
        let out = run(
            PROXY,
            &[&args[..], &[&host, "--server", &addr]].concat(),
            &state,
        );
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out).trim().to_string()
    };
    let (used, _open, revoked) = (token("web-1"), token("web-1"), token("web-1"));
    token("db-1");
    let out = run(
        AGENT,
        &["enroll", "--token", &used],
        &tmp.path().join("agent"),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let listed = |args: &[&str]| -> Vec<serde_json::Value> {
        let out = run(PROXY, args, &state);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        serde_json::from_str::<serde_json::Value>(&stdout(&out))
            .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", stdout(&out)))
            .as_array()
            .unwrap()
            .clone()
    };
    let all = listed(&["token", "list", "--json"]);
    assert_eq!(all.len(), 4, "{all:?}");
    let web = listed(&["token", "list", "--agent", "web-1", "--json"]);
    assert_eq!(web.len(), 3, "{web:?}");
    assert!(web.iter().all(|t| t["agent"] == "web-1"));
    let victim = revproxy::ca::Token::parse(&revoked).unwrap().public.id;
    assert!(web.iter().any(|t| t["id"] == victim.as_str()), "{web:?}");
    assert!(run(PROXY, &["token", "revoke", &victim], &state)
        .status
        .success());
    for (status, want) in [("open", 1), ("used", 1), ("revoked", 1), ("expired", 0)] {
        let got = listed(&[
            "token", "list", "--agent", "web-1", "--status", status, "--json",
        ]);
        assert_eq!(got.len(), want, "{status}: {got:?}");
        assert!(got.iter().all(|t| t["status"] == status), "{got:?}");
    }
    let spent = &listed(&["token", "list", "--status", "used", "--json"])[0];
    assert!(
        spent["used_at"].is_string() && spent["serial"].is_string(),
        "{spent}"
    );
    assert_eq!(spent["hosts"], serde_json::json!(["web-1.example.com"]));
    // The table filters too.
    let table = stdout(&run(PROXY, &["token", "list", "--agent", "db-1"], &state));
    assert_eq!(table.lines().count(), 2, "{table}");
    assert!(table.lines().nth(1).unwrap().contains("db-1"), "{table}");
    let bad = run(PROXY, &["token", "list", "--status", "unused"], &state);
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
    assert!(stderr(&bad).contains("open"), "{}", stderr(&bad));

    let certs = listed(&["cert", "list", "--agent", "web-1", "--json"]);
    assert_eq!(certs.len(), 1, "{certs:?}");
    assert_eq!(certs[0]["status"], "valid");
    assert_eq!(certs[0]["serial"], spent["serial"]);
    assert!(listed(&["cert", "list", "--agent", "db-1", "--json"]).is_empty());

    let out = run(
        PROXY,
        &["access", "allow", "web-1", "db-1.example.com"],
        &state,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let rules = listed(&["access", "list", "--agent", "web-1", "--json"]);
    assert_eq!(
        rules,
        vec![serde_json::json!({"agent": "web-1", "names": ["db-1.example.com"]})]
    );
    assert!(listed(&["access", "list", "--agent", "db-1", "--json"]).is_empty());

    // A backup taken while the proxy serves is the whole state: restored into another
    // directory (with the CA's key and certificate) it lists the same records.
    let backup = tmp.path().join("backup.db");
    let out = run(
        PROXY,
        &["store", "backup", "--to", backup.to_str().unwrap()],
        &state,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let mode = std::fs::metadata(&backup).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let again = run(
        PROXY,
        &["store", "backup", "--to", backup.to_str().unwrap()],
        &state,
    );
    assert_eq!(
        again.status.code(),
        Some(1),
        "an existing file is not overwritten"
    );
    let restored = tmp.path().join("restored");
    std::fs::create_dir(&restored).unwrap();
    std::fs::set_permissions(&restored, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::copy(&backup, restored.join("state.db")).unwrap();
    for file in ["ca.key", "ca.crt"] {
        std::fs::copy(state.join(file), restored.join(file)).unwrap();
    }
    for list in [
        &["token", "list", "--json"][..],
        &["cert", "list", "--json"],
    ] {
        let here = stdout(&run(PROXY, list, &state));
        let there = stdout(&run(PROXY, list, &restored));
        assert_eq!(here, there, "{list:?}");
    }
}
