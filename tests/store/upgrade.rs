//! A PostgreSQL store the previous release wrote (the state as one JSONB document, schema
//! version 1) moving into tables the first time this release uses it.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::common::*;

/// `pg_dump` of the store release 0.1 (commit 9f93b39) made with `revproxy store migrate`
/// from the state in ca/tests/fixtures/release-0.1, beside it.
fn fixture() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("ca/tests/fixtures/release-0.1")
}

/// The previous release's store moves into tables without anyone doing anything, once,
/// however many processes open it at the same moment: every record is there, the
/// document is gone (a proxy of the previous release still running fails to read rather
/// than serving from a copy nothing updates), and the CA goes on from the tables, each
/// change noted in the change feed.
#[test]
fn the_previous_releases_postgres_store_moves_into_tables() {
    let pg = Postgres::start();
    pg.psql_file(&fixture().join("postgres.sql"));
    assert_eq!(
        pg.psql("SELECT version FROM revproxy.schema_version"),
        "1\n"
    );
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state");
    revproxy::ca::fsutil::create_private_dir(&dir).unwrap();
    for (file, mode) in [("ca.key", 0o600), ("ca.crt", 0o644)] {
        std::fs::copy(fixture().join(file), dir.join(file)).unwrap();
        std::fs::set_permissions(dir.join(file), std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let written: revproxy::ca::state::State =
        serde_json::from_slice(&std::fs::read(fixture().join("state.json")).unwrap()).unwrap();

    // Three processes' worth of stores open it at once: each reads the whole state.
    let url = pg.url();
    let read: Vec<_> = std::thread::scope(|s| {
        let opened: Vec<_> = (0..3)
            .map(|_| {
                s.spawn(|| {
                    let ca = revproxy::store::open_ca(&dir, Some(&url)).unwrap();
                    ca.state().read().unwrap()
                })
            })
            .collect();
        opened.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for state in &read {
        assert_eq!(state, &written, "every record moved");
    }
    assert_eq!(
        pg.psql("SELECT version FROM revproxy.schema_version"),
        format!("{}\n", revproxy::store::SCHEMA_VERSION)
    );
    let counts = "SELECT (SELECT count(*) FROM revproxy.tokens), \
                  (SELECT count(*) FROM revproxy.certs), (SELECT count(*) FROM revproxy.grants), \
                  (SELECT count(*) FROM revproxy.access), (SELECT count(*) FROM revproxy.operators)";
    assert_eq!(pg.psql(counts), "4|2|2|2|1\n", "moved once");
    let doc = "SELECT count(*) FROM information_schema.columns \
               WHERE table_schema = 'revproxy' AND table_name = 'state' AND column_name = 'doc'";
    assert_eq!(pg.psql(doc), "0\n", "the document is gone");

    // It goes on: at the time the fixture was written, a revoked certificate stays
    // revoked, the open token enrolls, the used one does not.
    let ca = revproxy::store::open_ca(&dir, Some(&url)).unwrap();
    let then = time::OffsetDateTime::from_unix_timestamp(written.tokens[3].created).unwrap();
    let states: Vec<_> = (ca.list_tokens(then).unwrap().into_iter())
        .map(|t| t.state)
        .collect();
    use revproxy::ca::TokenState::*;
    assert_eq!(states, [Used, Used, Revoked, Open]);
    let revoked = written.certs.iter().find(|c| c.agent == "web-1").unwrap();
    let listed = ca.list_certs(then).unwrap();
    let web = listed.iter().find(|c| c.serial == revoked.serial).unwrap();
    assert_eq!(web.state, revproxy::ca::CertState::Revoked);
    assert_eq!(listed.len(), written.certs.len());
    assert_eq!(
        ca.list_access().unwrap(),
        written.access.clone().into_iter().collect::<Vec<_>>()
    );

    let before = ca.state().version().unwrap();
    let open = &written.tokens[3];
    ca.revoke_token(&open.id).unwrap();
    let after = ca.state().version().unwrap();
    assert_eq!(after, before + 1, "one change, one version");
    let feed = ca
        .state()
        .changes_since(before)
        .unwrap()
        .expect("the feed says");
    assert_eq!(feed.version, after);
    assert!(
        matches!(&feed.records[..], [revproxy::ca::Changed::Token(id, Some(t))] if *id == open.id && t.revoked),
        "{:?}",
        feed.records
    );
    // Several kinds of change at once come back as the records are now, each once.
    let api = written.certs.iter().find(|c| c.agent == "api-1").unwrap();
    ca.revoke_certs("api-1", time::OffsetDateTime::now_utc())
        .unwrap();
    ca.allow_access("api-1", &["db.internal".to_string()])
        .unwrap();
    ca.set_hosts("api-1", &["api2.example.com".to_string()])
        .unwrap();
    let feed = ca
        .state()
        .changes_since(after)
        .unwrap()
        .expect("the feed says");
    assert_eq!(feed.version, after + 3);
    use revproxy::ca::Changed;
    let mut kinds = Vec::new();
    for record in &feed.records {
        match record {
            Changed::Cert {
                serial,
                cert: Some(cert),
                of_agent,
            } => {
                assert_eq!(serial, &api.serial);
                assert!(cert.revoked_at.is_some());
                assert_eq!(of_agent.len(), 1, "{of_agent:?}");
                kinds.push("cert");
            }
            Changed::Access(agent, names) => {
                assert_eq!(agent, "api-1");
                assert!(names.contains(&"db.internal".to_string()), "{names:?}");
                kinds.push("access");
            }
            Changed::Grant(agent, Some(grant)) => {
                assert_eq!(
                    (agent.as_str(), &grant.hosts[..]),
                    ("api-1", &["api2.example.com".to_string()][..])
                );
                kinds.push("grant");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(kinds, ["cert", "access", "grant"]);
    // A proxy that holds a version from before the move into tables reads the state whole.
    assert!(ca.state().changes_since(before - 1).unwrap().is_none());

    let reopened = revproxy::store::open_ca(&dir, Some(&url)).unwrap();
    assert_eq!(reopened.list_tokens(then).unwrap()[3].state, Revoked);
}
