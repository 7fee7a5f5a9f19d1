//! The shared store's hygiene on PostgreSQL: what other roles of the same database can
//! and cannot do to it (notifications, objects in `public`, owners), and a state that goes
//! back (a restored backup) taken as an alarm, not as news.

mod common;

use std::time::{Duration, Instant};

use common::*;
use revproxy::ca::{Ca, InitOptions};

/// How long `a_flood_of_notifications_costs_a_few_checks_not_one_each` floods the channel.
const FLOOD: Duration = Duration::from_secs(2);

/// Any role that can connect may `NOTIFY` the store's channel. A role with no other right
/// floods it for two seconds: the proxy checks the store's version a few times a second
/// (the first notification at once, then at most one per 200 ms, plus its poll), not once
/// per notification.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_notifications_costs_a_few_checks_not_one_each() {
    let d = Deployment::new();
    d.pg.psql("CREATE ROLE stranger LOGIN");
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_addr = admin.local_addr().unwrap();
    let _proxy = TestProxy::start_member(d.member_dir(), &d.url, "127.0.0.1", move |b| {
        b.admin_listener(admin)
    })
    .await;
    let checks = || async {
        let m = admin_get(admin_addr, "/metrics").await.1;
        let count = |result: &str| {
            sample(
                &m,
                "revproxy_store_checks_total",
                &format!(r#"result="{result}""#),
            )
            .unwrap_or(0.0)
        };
        count("ok") + count("error")
    };
    let stranger = format!(
        "host=127.0.0.1 port={} user=stranger dbname=postgres",
        d.pg.port
    );
    let (client, connection) = tokio_postgres::connect(&stranger, tokio_postgres::NoTls)
        .await
        .unwrap();
    let driver = tokio::spawn(connection);

    let before = checks().await;
    let started = Instant::now();
    let mut sent = 0u32;
    while started.elapsed() < FLOOD {
        // One statement, one transaction, one notification delivered.
        (client
            .batch_execute("NOTIFY revproxy_state, '999999'")
            .await)
            .unwrap();
        sent += 1;
    }
    let flooded = started.elapsed();
    let after = checks().await;
    drop(client);
    let _ = driver.await;
    let checked = after - before;
    eprintln!("{sent} notifications in {flooded:?}: {checked} version checks");
    assert!(sent > 500, "only {sent} notifications: not a flood");
    // Five wakes a second and the one-second poll, with one of each to spare.
    let most = 5.0 * flooded.as_secs_f64().ceil() + flooded.as_secs_f64().ceil() + 2.0;
    assert!(checked <= most, "{checked} checks for {sent} notifications");
}

/// A role allowed to create in `public` (every role, before PostgreSQL 15) adds functions
/// that match the store's untyped parameters better than the built-in ones do
/// (CVE-2018-1058): the store never resolves a name there, so it works as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn functions_another_role_adds_to_public_never_stand_in_for_the_builtins() {
    let pg = Postgres::start();
    pg.psql(
        "CREATE ROLE intruder; GRANT CREATE ON SCHEMA public TO intruder; SET ROLE intruder; \
         CREATE FUNCTION public.pg_advisory_xact_lock(text) RETURNS void LANGUAGE sql \
             AS 'SELECT NULL'; \
         CREATE FUNCTION public.make_interval(secs text) RETURNS interval LANGUAGE sql \
             AS 'SELECT interval ''100 years''';",
    );
    let seed = tempfile::tempdir().unwrap();
    let store = revproxy::store::open(seed.path(), Some(&pg.url())).unwrap();
    Ca::init_in(
        seed.path(),
        store.clone(),
        &InitOptions::default(),
        time::OffsetDateTime::now_utc(),
    )
    .unwrap();
    let me = revproxy::ca::ProxyEntry {
        id: "p1".into(),
        address: Some("127.0.0.1:7443".into()),
    };
    store.announce(&me).unwrap();
    assert_eq!(store.proxies().unwrap(), vec![me]);
}

/// Whoever owns the store's schema or a table in it can rewrite the CA state. A schema
/// another role made before revproxy first ran, or a table handed to another role later:
/// revproxy refuses the store, naming the owner and what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_or_table_another_role_owns_is_refused_naming_the_owner() {
    let pg = Postgres::start();
    pg.psql("CREATE ROLE intruder; CREATE SCHEMA revproxy AUTHORIZATION intruder");
    let seed = tempfile::tempdir().unwrap();
    let e = revproxy::store::open(seed.path(), Some(&pg.url()))
        .unwrap()
        .has_state()
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(r#"SCHEMA revproxy belongs to role "intruder""#)
            && e.contains("ALTER SCHEMA revproxy OWNER TO postgres"),
        "{e}"
    );
    assert_eq!(
        pg.psql("SELECT count(*) FROM pg_tables WHERE schemaname = 'revproxy'"),
        "0\n"
    );

    let d = Deployment::new();
    d.pg.psql("CREATE ROLE intruder; ALTER TABLE revproxy.state OWNER TO intruder");
    let e = revproxy::store::open_ca(d.seed.path(), Some(&d.url))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(r#"TABLE revproxy.state belongs to role "intruder""#),
        "{e}"
    );
}

/// The database's state goes back (a backup from before a revocation and an enrollment is
/// restored): the running proxy does not take it for a newer one. The revoked agent stays
/// out, the token used since cannot enroll again, `/ready` stays 200, and the proxy raises
/// the alarm: one ERROR saying what to do, `revproxy_store_went_back_total`, the store shown
/// down in `/status` and `revproxy_store_up`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_whose_state_goes_back_is_an_alarm_not_a_newer_state() {
    let d = Deployment::new();
    let (procs, _agent) = d.processes_and_an_agent(&THREE[..1]).await;
    let p = &procs[0];
    let status = || async {
        serde_json::from_str::<serde_json::Value>(&admin_get(p.admin, "/status").await.1).unwrap()
    };
    let web1 = |status: &serde_json::Value| {
        (status["agents"].as_array().unwrap().iter())
            .find(|a| a["agent"] == "web-1")
            .cloned()
            .unwrap()
    };
    let later = d.token("later", &["later.example.com"], p.agents);
    // Every table of the state, as a backup of the database would have it.
    let tables = [
        "state",
        "tokens",
        "certs",
        "grants",
        "access",
        "operators",
        "changes",
    ];
    let backup: String = (tables.iter())
        .map(|t| format!("CREATE TABLE backup.{t} AS SELECT * FROM revproxy.{t};"))
        .collect();
    d.pg.psql(&format!("CREATE SCHEMA backup; {backup}"));

    // After the backup: web-1 is revoked, and the token is used.
    d.ca()
        .revoke_certs("web-1", time::OffsetDateTime::now_utc())
        .unwrap();
    eventually("web-1 revoked and cut", || async {
        let agent = web1(&status().await);
        agent["certificate_expires"].is_null() && agent["tunnels"] == serde_json::json!([])
    })
    .await;
    let pin = d.ca_pin();
    let (_, body) = enroll_body(&later);
    let (code, answer) = post_raw(p.agents, pin, body.into_bytes()).await;
    assert_eq!(code, 200, "{answer}");

    // The backup is restored.
    let restore: String = (tables.iter().skip(1))
        .map(|t| format!("INSERT INTO revproxy.{t} SELECT * FROM backup.{t};"))
        .collect();
    d.pg.psql(&format!(
        "BEGIN; TRUNCATE {}; {restore} UPDATE revproxy.state s SET version = b.version, \
         settings = b.settings FROM backup.state b; COMMIT;",
        (tables.iter().skip(1))
            .map(|t| format!("revproxy.{t}"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let metric = |name: &'static str, labels: &'static str| async move {
        sample(&admin_get(p.admin, "/metrics").await.1, name, labels)
    };
    // Either the alarm, or (wrongly) the older state taken: web-1 valid again.
    eventually("the alarm, or the older state taken", || async {
        metric("revproxy_store_went_back_total", "").await == Some(1.0)
            || !web1(&status().await)["certificate_expires"].is_null()
    })
    .await;
    let now = status().await;
    assert!(
        web1(&now)["certificate_expires"].is_null(),
        "the older state was taken: web-1 is valid again: {now}"
    );
    assert_eq!(
        metric("revproxy_store_went_back_total", "").await,
        Some(1.0)
    );
    assert_eq!(now["ready"], true, "{now}");
    assert_eq!(now["proxy"]["store_up"], false, "{now}");
    let problem = now["proxy"]["store_problem"].as_str().unwrap_or_default();
    assert!(
        problem.contains("went back from version") && problem.contains("restart every proxy"),
        "{now}"
    );
    assert_eq!(metric("revproxy_store_up", "").await, Some(0.0));
    // The token used after the backup does not enroll again.
    let (_, again) = enroll_body(&later);
    let (code, answer) = post_raw(p.agents, pin, again.into_bytes()).await;
    assert_eq!(code, 503, "{answer}");
    assert!(answer.contains("store_unavailable"), "{answer}");

    // Said once, as an error, however many checks see it again.
    let failed = metric("revproxy_store_checks_total", r#"result="error""#).await;
    eventually("two more checks", || async {
        metric("revproxy_store_checks_total", r#"result="error""#).await >= failed.map(|f| f + 2.0)
    })
    .await;
    let lines: Vec<String> = p.logs.try_iter().collect();
    let errors: Vec<_> = (lines.iter())
        .filter(|l| l.contains("went back") && l.contains("\"ERROR\""))
        .collect();
    assert_eq!(errors.len(), 1, "{lines:#?}");
    assert!(errors[0].contains("restart every proxy"), "{}", errors[0]);
}
