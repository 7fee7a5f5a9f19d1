//! What bad input gets: exit statuses, one sentence said once, hints and suggestions.

use super::*;

#[test]
fn bad_input_exits_2_with_one_sentence_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    assert!(run(PROXY, &["ca", "init"], tmp.path()).status.success());
    let state_before = stored(tmp.path());
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
        // No proxy recorded a `ports` range; port 0 is no port.
        &["token", "create", "--name", "a", "--tcp-port", "2222"],
        &["token", "create", "--name", "a", "--tcp-port", "0"],
        &["token", "create", "--name", "a", "--udp-port", "51820"],
        &["token", "create", "--name", "a", "--udp-port", "0"],
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
    assert_eq!(stored(tmp.path()), state_before);

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
    let token = web_token(&state, "nowhere.invalid:7443");
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
