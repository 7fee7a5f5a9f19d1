//! The embedded store (SQLite): the previous release's state moving into it, concurrent
//! writers, and taking it out of use for `store migrate`.

use super::*;

/// The state the previous release wrote (`state.json`; tests/fixtures/release-0.1 says
/// what is in it) moves into `state.db` the first time it is opened, without anyone doing
/// anything: every record is there, the old file is kept (as `state.json.bak`, or beside
/// a backup of that name), the new store is private, and the CA goes on from it.
#[test]
fn the_previous_releases_state_moves_into_the_embedded_store() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/release-0.1");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state");
    revproxy_ca::fsutil::create_private_dir(&dir).unwrap();
    for (file, mode) in [("state.json", 0o600), ("ca.key", 0o600), ("ca.crt", 0o644)] {
        std::fs::copy(fixture.join(file), dir.join(file)).unwrap();
        std::fs::set_permissions(dir.join(file), std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let written: revproxy_ca::state::State =
        serde_json::from_slice(&std::fs::read(fixture.join("state.json")).unwrap()).unwrap();
    assert_eq!((written.tokens.len(), written.certs.len()), (4, 2));
    assert!(!written.operators.is_empty() && !written.access.is_empty());

    // A backup of the operator's own is there already: it is never overwritten.
    std::fs::write(dir.join("state.json.bak"), "an older backup").unwrap();

    let ca = Ca::open(&dir).unwrap();
    assert_eq!(ca.state().read().unwrap(), written, "every record moved");
    assert!(!dir.join("state.json").exists());
    assert_eq!(
        std::fs::read(dir.join("state.json.bak.1")).unwrap(),
        std::fs::read(fixture.join("state.json")).unwrap(),
        "the old file is kept as it was"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("state.json.bak")).unwrap(),
        "an older backup"
    );
    let mode = std::fs::metadata(dir.join("state.db"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // It goes on: at the time the fixture was written, a revoked certificate stays
    // revoked, the open token enrolls, the used one does not.
    let then = OffsetDateTime::from_unix_timestamp(written.tokens[3].created).unwrap();
    let states: Vec<_> = ca
        .list_tokens(then)
        .unwrap()
        .into_iter()
        .map(|t| t.state)
        .collect();
    use revproxy_ca::TokenState::*;
    assert_eq!(states, [Used, Used, Revoked, Open]);
    let revoked = written.certs.iter().find(|c| c.agent == "web-1").unwrap();
    assert!(revoked.revoked_at.is_some());
    let listed = ca.list_certs(then).unwrap();
    let web = listed.iter().find(|c| c.serial == revoked.serial).unwrap();
    assert_eq!(web.state, revproxy_ca::CertState::Revoked);
    assert_eq!(
        ca.list_access().unwrap(),
        written.access.clone().into_iter().collect::<Vec<_>>()
    );
    let before = ca.state().version().unwrap();
    let open = ca.state().read().unwrap().tokens[3].clone();
    ca.revoke_token(&open.id).unwrap();
    assert!(
        ca.state().version().unwrap() > before,
        "a change moves the version"
    );
    let reopened = Ca::open(&dir).unwrap();
    assert_eq!(reopened.list_tokens(then).unwrap()[3].state, Revoked);
    assert_eq!(reopened.pin(), ca.pin());
}

/// Two processes' stores on one directory (two connections) trading one record at once:
/// each change sees the other's, and exactly one wins.
#[test]
fn two_connections_never_lose_a_change() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = new_ca(tmp.path());
    let token = token(&ca, &["app.example.com"]);
    let id = token.public.id.clone();
    let barrier = Arc::new(Barrier::new(8));
    let wins: Vec<bool> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let (dir, id, barrier) = (tmp.path(), id.clone(), barrier.clone());
                s.spawn(move || {
                    let other = Ca::open(dir).unwrap();
                    barrier.wait();
                    other
                        .state()
                        .update(|tx| {
                            let mut t = tx.token(&id)?.unwrap();
                            if t.revoked {
                                return Ok(false);
                            }
                            t.revoked = true;
                            tx.put_token(t)?;
                            Ok::<_, CaError>(true)
                        })
                        .unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(wins.iter().filter(|w| **w).count(), 1, "{wins:?}");
}

/// `store migrate` takes the store out of use under its write lock: a process that opened
/// it before (a `cert revoke` at that moment) cannot commit into the moved copy, which
/// holds everything, and a failed migration puts it back.
#[test]
fn a_retired_store_takes_no_more_changes() {
    use revproxy_ca::sqlite::SqliteStore;
    let tmp = tempfile::tempdir().unwrap();
    let ca = new_ca(tmp.path());
    let t = token(&ca, &["app.example.com"]);
    let before = ca.list_tokens(now()).unwrap();
    let aside = tmp.path().join("state.db.migrating");
    let read = SqliteStore::retire(tmp.path(), &aside).unwrap();
    assert_eq!(read.tokens.len(), 1);
    let late = ca.revoke_token(&t.public.id).unwrap_err();
    assert!(matches!(late, CaError::Migrated(_)), "{late}");
    SqliteStore::restore(tmp.path(), &aside).unwrap();
    let back = Ca::open(tmp.path()).unwrap();
    assert_eq!(
        back.list_tokens(now()).unwrap(),
        before,
        "nothing lost, nothing added"
    );
    back.revoke_token(&t.public.id).unwrap();
}
