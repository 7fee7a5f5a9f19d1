//! Private names and access rules from the command line.

use super::*;

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
