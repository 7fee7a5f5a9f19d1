//! Several proxies on one PostgreSQL store: a real PostgreSQL started by the test, three
//! proxies on three loopback addresses (127.0.0.1, .2, .3) sharing it, real agents and
//! backends, bytes checked at the far end.

#[path = "../common/mod.rs"]
mod common;
mod proxies;
mod upgrade;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use revproxy::ca::{Ca, InitOptions, Token};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A load balancer would send clients anywhere: a client of each proxy reaches the backend.
pub(crate) async fn reaches(proxy: &TestProxy, name: &str, tag: &[u8]) {
    let data = pattern(64 * 1024, proxy.http.port() as u64);
    let got = round_trip(proxy.http, &http_head(name), &data)
        .await
        .unwrap();
    let mut want = tag.to_vec();
    want.extend_from_slice(&http_head(name));
    want.extend_from_slice(&data);
    assert_eq!(got, want, "through {}", proxy.http);
}

/// Of 150 enrollments, each of 50 tokens sent to all three proxies at once (each with a
/// key of its own), exactly 50 win; the store then holds exactly 50 certificates. An
/// answer lost on the way is fetched again from any proxy: the same certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_tokens_sent_to_three_proxies_at_once_yield_fifty_certificates() {
    let d = Deployment::new();
    let proxies = d
        .three(|b| b.enroll_failure_limit(10_000, Duration::from_secs(60)))
        .await;
    let tokens: Vec<Token> = (0..50)
        .map(|i| {
            d.token(
                &format!("a{i}"),
                &[&format!("a{i}.example.com")],
                proxies[0].addr,
            )
        })
        .collect();
    let pin = d.ca().pin();
    let mut all = tokio::task::JoinSet::new();
    for (i, token) in tokens.iter().enumerate() {
        for p in &proxies {
            let (_, body) = enroll_body(token);
            let addr = p.addr;
            all.spawn(async move { (i, post_raw(addr, pin, body.into_bytes()).await) });
        }
    }
    let mut won = vec![0; tokens.len()];
    let mut lost = 0;
    while let Some(done) = all.join_next().await {
        let (i, (status, body)) = done.unwrap();
        match status {
            200 => won[i] += 1,
            409 => {
                assert!(body.contains("token_used"), "{body}");
                lost += 1
            }
            other => panic!("token {i}: unexpected {other}: {body}"),
        }
    }
    assert!(won.iter().all(|&n| n == 1), "wins per token: {won:?}");
    assert_eq!(lost, 100);
    let certs = d.ca().list_certs(time::OffsetDateTime::now_utc()).unwrap();
    assert_eq!(certs.len(), 50);

    // The same request (same key) on each proxy in turn: one certificate, three answers.
    let token = d.token("retry", &["retry.example.com"], proxies[0].addr);
    let (_, body) = enroll_body(&token);
    let mut serials = Vec::new();
    for p in &proxies {
        let (status, answer) = post_raw(p.addr, pin, body.clone().into_bytes()).await;
        assert_eq!(status, 200, "{answer}");
        let reply: serde_json::Value = serde_json::from_str(&answer).unwrap();
        serials.push(reply["serial"].as_str().unwrap().to_string());
    }
    assert!(serials.windows(2).all(|w| w[0] == w[1]), "{serials:?}");
    assert_eq!(
        d.ca()
            .list_certs(time::OffsetDateTime::now_utc())
            .unwrap()
            .len(),
        51
    );
}

/// `store migrate` moves a proxy's state into PostgreSQL: the agent enrolled before goes
/// on without enrolling again, and nothing serves from the old file any more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_migrate_moves_a_deployment_without_anyone_enrolling_again() {
    let pg = Postgres::start();
    let url = pg.url();
    let mut proxy = TestProxy::start().await;
    let backend = echo_backend(b"M:").await;
    let dir = enroll_agent(&proxy, "web-1", &["app.example.com"]).await;
    let _agent = start_agent(dir.path(), &[("app.example.com", backend)], |b| b);
    proxy.wait_for("app.example.com", 1).await;
    proxy.pause().await;

    let revproxy = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_revproxy"))
            .args(args)
            .env_remove("REVPROXY_STORE")
            .output()
            .unwrap()
    };
    let state = proxy.dir.path().to_str().unwrap().to_string();
    let out = revproxy(&["store", "migrate", "--from", &state, "--to", &url]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("1 tokens, 1 certificates and 1 agents"),
        "{said}"
    );
    assert!(!proxy.dir.path().join("state.db").exists());
    assert!(proxy.dir.path().join("state.db.migrated").exists());
    // Without the store, the old copy is not served from.
    let out = revproxy(&["cert", "list", "--state", &state]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--store"));
    // A second migration into the same store is refused.
    let out = revproxy(&["store", "migrate", "--from", &state, "--to", &url]);
    assert!(!out.status.success());
    // With it, the records are all there.
    let out = revproxy(&["cert", "list", "--state", &state, "--store", &url]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("web-1"));

    proxy.resume_with(|b| b.store(&url)).await;
    proxy.wait_for("app.example.com", 1).await;
    reaches(&proxy, "app.example.com", b"M:").await;
}

/// TLS to the database: verified against `sslrootcert`, name included; a database whose
/// certificate another CA signed is refused, and one beyond loopback is never reached in
/// plaintext by accident (see the unit tests of `store::postgres::url`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_certificate_is_verified() {
    let (pg, ca_pem) = Postgres::start_with_tls();
    let files = tempfile::tempdir().unwrap();
    let good = files.path().join("db-ca.pem");
    std::fs::write(&good, ca_pem).unwrap();
    let (_, other_pem) = {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ((), params.self_signed(&key).unwrap().pem())
    };
    let bad = files.path().join("other-ca.pem");
    std::fs::write(&bad, other_pem).unwrap();
    let url = |host: &str, root: &std::path::Path| {
        format!(
            "postgres://postgres@{host}:{}/postgres?sslmode=verify-full&sslrootcert={}",
            pg.port,
            root.display()
        )
    };
    let seed = tempfile::tempdir().unwrap();
    let store = revproxy::store::open(seed.path(), Some(&url("localhost", &good))).unwrap();
    assert!(!store.has_state().unwrap());

    let store = revproxy::store::open(seed.path(), Some(&url("localhost", &bad))).unwrap();
    let e = store.has_state().unwrap_err().to_string();
    assert!(
        e.contains("unavailable") && e.to_lowercase().contains("certificate"),
        "{e}"
    );
    // The name is checked too: the certificate is for localhost and 127.0.0.1 only.
    let alias = url("127.0.0.1", &good);
    assert!(revproxy::store::open(seed.path(), Some(&alias))
        .unwrap()
        .has_state()
        .is_ok());
}

/// A proxy given another CA's key refuses to serve from the store, saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_with_another_cas_key_is_refused() {
    let d = Deployment::new();
    let stranger = tempfile::tempdir().unwrap();
    Ca::init(
        stranger.path(),
        &InitOptions::default(),
        time::OffsetDateTime::now_utc(),
    )
    .unwrap();
    std::fs::remove_file(stranger.path().join("state.db")).unwrap();
    let e = revproxy::store::open_ca(stranger.path(), Some(&d.url))
        .unwrap_err()
        .to_string();
    assert!(e.contains("is not the CA of the store"), "{e}");
}

/// A revocation made with one proxy's state directory cuts the agent's tunnels on all
/// three within two seconds; so does a second one after every listening database
/// connection was terminated (the version poll covers a lost notification).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_cuts_tunnels_on_all_three_proxies_within_two_seconds() {
    let d = Deployment::new();
    let proxies = d.three(|b| b).await;
    let backend = echo_backend(b"").await;
    let (_a, _agent_a) = d
        .agent(&proxies[0], &proxies, "alpha", "alpha.example.com", backend)
        .await;
    let (_b, _agent_b) = d
        .agent(&proxies[0], &proxies, "beta", "beta.example.com", backend)
        .await;

    let revoke = |agent: &str, via: &TestProxy| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_revproxy"))
            .args(["cert", "revoke", "--state"])
            .arg(via.dir.path())
            .args(["--store", &d.url, agent])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let cut_everywhere = |name: &'static str| {
        let proxies = &proxies;
        async move {
            let started = Instant::now();
            while proxies.iter().any(|p| p.status.tunnels_for(name) > 0) {
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "{name} still has tunnels"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            started.elapsed()
        }
    };

    revoke("alpha", &proxies[2]);
    let took = cut_everywhere("alpha.example.com").await;
    eprintln!("revocation reached all three proxies in {took:?}");
    assert!(took < Duration::from_secs(2), "took {took:?}");

    let cut = d.pg.psql(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE query ILIKE 'LISTEN%'",
    );
    assert!(cut.trim().parse::<u32>().unwrap() >= 3, "terminated {cut}");
    revoke("beta", &proxies[1]);
    let took = cut_everywhere("beta.example.com").await;
    eprintln!("with the listening connections cut, it took {took:?}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
}

/// With the database down, clients are still routed by every proxy (the snapshot),
/// enrollment answers 503 with Retry-After, and each proxy goes on reporting ready (it can
/// route) while it reports the store down, saying why, in `/status`, `revproxy_store_up` and
/// `revproxy status`; the store is reported up again once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_database_stopped_routing_goes_on_and_enrollment_answers_503() {
    let mut d = Deployment::new();
    let mut admins = Vec::new();
    let mut proxies = Vec::new();
    for ip in ["127.0.0.1", "127.0.0.2", "127.0.0.3"] {
        let admin = tokio::net::TcpListener::bind(format!("{ip}:0"))
            .await
            .unwrap();
        admins.push(admin.local_addr().unwrap());
        proxies.push(
            TestProxy::start_member(d.member_dir(), &d.url, ip, move |b| b.admin_listener(admin))
                .await,
        );
    }
    let backend = echo_backend(b"B:").await;
    let (_dir, _agent) = d
        .agent(&proxies[0], &proxies, "web-1", "app.example.com", backend)
        .await;
    let waiting = d.token("later", &["later.example.com"], proxies[0].addr);
    for admin in &admins {
        assert_eq!(admin_get(*admin, "/ready").await.0, 200);
        assert_eq!(store_up(*admin).await, Some(1.0));
        // Every proxy has read the state since the token was made (two checks begun
        // after it), so each knows the token when the database goes.
        let checks = || async {
            let (_, m) = admin_get(*admin, "/metrics").await;
            sample(&m, "revproxy_store_checks_total", r#"result="ok""#).unwrap_or(0.0)
        };
        let before = checks().await;
        eventually("two checks of the store after the token", || async {
            checks().await >= before + 2.0
        })
        .await;
    }

    d.pg.stop();
    for p in &proxies {
        reaches(p, "app.example.com", b"B:").await;
    }
    let pin = d.ca_pin();
    let (_, body) = enroll_body(&waiting);
    let (status, answer) = post_raw(proxies[1].addr, pin, body.clone().into_bytes()).await;
    assert_eq!(status, 503, "{answer}");
    assert!(answer.contains("store_unavailable"), "{answer}");

    for admin in &admins {
        eventually("the store reported down", || async {
            store_up(*admin).await == Some(0.0)
        })
        .await;
        let (ready, why) = admin_get(*admin, "/ready").await;
        assert_eq!(ready, 200, "{admin} unready with the store down: {why}");
        let status: serde_json::Value =
            serde_json::from_str(&admin_get(*admin, "/status").await.1).unwrap();
        assert_eq!(status["ready"], true, "{status}");
        assert_eq!(status["proxy"]["store_up"], false, "{status}");
        let problem = status["proxy"]["store_problem"]
            .as_str()
            .unwrap_or_default();
        assert!(problem.contains("state store"), "{status}");
    }
    // `revproxy status` says so, and which proxies share the store.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_revproxy"))
        .args(["status", "--admin", &admins[0].to_string()])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.lines().next().unwrap().ends_with(", ready"),
        "{report}"
    );
    assert!(
        report.contains("store: the state store has not answered"),
        "{report}"
    );
    assert!(report.contains("proxies sharing it:"), "{report}");
    assert!(!report.contains(PASSWORD), "{report}");
    // Routing still goes on.
    for p in &proxies {
        reaches(p, "app.example.com", b"B:").await;
    }

    d.pg.restart();
    for admin in &admins {
        eventually("the store reported up again", || async {
            store_up(*admin).await == Some(1.0)
        })
        .await;
        let status: serde_json::Value =
            serde_json::from_str(&admin_get(*admin, "/status").await.1).unwrap();
        assert!(status["proxy"]["store_problem"].is_null(), "{status}");
    }
    let (status, answer) = post_raw(proxies[2].addr, pin, body.into_bytes()).await;
    assert_eq!(status, 200, "{answer}");
}

/// Writes chunks and reads each echo back until told to stop (after the echo of the chunk
/// in flight); says `flowing` after the first echo. Returns the bytes echoed intact, or
/// the error that ended it.
async fn stream_until(
    addr: SocketAddr,
    name: &str,
    flowing: tokio::sync::mpsc::Sender<()>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<usize, String> {
    let mut tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    tcp.write_all(&http_head(name))
        .await
        .map_err(|e| e.to_string())?;
    let mut head = vec![0; http_head(name).len()];
    tcp.read_exact(&mut head).await.map_err(|e| e.to_string())?;
    let mut echoed = 0;
    for seed in 0.. {
        let chunk = pattern(16 * 1024, seed);
        tcp.write_all(&chunk).await.map_err(|e| e.to_string())?;
        let mut back = vec![0; chunk.len()];
        tokio::time::timeout(Duration::from_secs(10), tcp.read_exact(&mut back))
            .await
            .map_err(|_| "no echo within 10 s".to_string())?
            .map_err(|e| e.to_string())?;
        if back != chunk {
            return Err(format!("corrupted after {echoed} bytes"));
        }
        echoed += chunk.len();
        if seed == 0 {
            let _ = flowing.send(()).await;
        }
        if *stop.borrow_and_update() {
            break;
        }
    }
    Ok(echoed)
}

/// Three `revproxy serve` processes; streams run through all three; one proxy is killed
/// with SIGKILL: only the streams through it fail, the others run on intact after it
/// died, and new clients of the survivors are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_proxy_under_load_fails_only_the_streams_through_it() {
    let d = Deployment::new();
    let (procs, _agent) = d.processes_and_an_agent(&THREE).await;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (flowing_tx, mut flowing) = tokio::sync::mpsc::channel(12);
    let (mut victims, mut survivors) = (tokio::task::JoinSet::new(), tokio::task::JoinSet::new());
    for (i, p) in procs.iter().enumerate() {
        for _ in 0..4 {
            let (addr, stop, tx) = (p.http, stop_rx.clone(), flowing_tx.clone());
            let stream = stream_until(addr, "app.example.com", tx, stop);
            if i == 1 {
                victims.spawn(stream);
            } else {
                survivors.spawn(stream);
            }
        }
    }
    for _ in 0..12 {
        flowing.recv().await.unwrap();
    }
    signal(procs[1].child.id(), "KILL");
    while let Some(done) = victims.join_next().await {
        let outcome = done.unwrap();
        assert!(
            outcome.is_err(),
            "a stream through the killed proxy went on: {outcome:?}"
        );
    }
    // Every stream elsewhere echoes (at least) one more chunk after the victims died.
    stop_tx.send(true).unwrap();
    while let Some(done) = survivors.join_next().await {
        let bytes = done
            .unwrap()
            .expect("a stream through a surviving proxy failed");
        assert!(bytes > 16 * 1024);
    }
    // Nothing the survivors logged shows the database password.
    for i in [0, 2] {
        let lines: Vec<String> = procs[i].logs.try_iter().collect();
        assert!(lines
            .iter()
            .any(|l| l.contains("proxies sharing the store")));
        assert!(!lines.iter().any(|l| l.contains(PASSWORD)));
    }
    for i in [0, 2] {
        let data = pattern(64 * 1024, 7);
        let got = round_trip(procs[i].http, &http_head("app.example.com"), &data)
            .await
            .unwrap();
        assert!(got.ends_with(&data), "through {}", procs[i].http);
    }
}

/// HAProxy in front of three `revproxy serve` processes, checking each one's `/ready`: when
/// one proxy is killed, clients of the load balancer go on being served (HAProxy retries a
/// refused connection on another proxy, and its health check takes the dead one out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_haproxy_clients_do_not_notice_a_proxy_dying() {
    let d = Deployment::new();
    let (mut procs, _agent) = d.processes_and_an_agent(&THREE).await;
    let (front, _lb, _files) = haproxy_in_front(&procs);
    serves(front).await;

    for i in 0..30 {
        assert!(through(front, i).await, "request {i} before the kill");
    }
    signal(procs[1].child.id(), "KILL");
    // Dead, not dying: a connection the kernel accepted for it an instant before is lost
    // like any stream through it (`killing_a_proxy_under_load_fails_only_the_streams_through_it`).
    procs[1].child.wait().unwrap();
    let killed = Instant::now();
    let mut failed = 0;
    for i in 30..230 {
        if !through(front, i).await {
            failed += 1;
        }
    }
    eprintln!(
        "200 requests through HAProxy after one proxy was killed: {failed} failed, in {:?}",
        killed.elapsed()
    );
    assert_eq!(
        failed, 0,
        "clients of the load balancer noticed the dead proxy"
    );
}

/// How long the database stays stopped in
/// `behind_haproxy_clients_do_not_notice_the_database_stopping`: longer than the 10 s
/// after which proxies used to report unready, and than HAProxy's checks need to act
/// (2 failed checks 200 ms apart).
const DATABASE_OUTAGE: Duration = Duration::from_secs(15);
/// Longest a client of that test waits for one request's answer (HAProxy's own timeouts
/// are 2 s to connect and 10 s of silence).
const REQUEST_DEADLINE: Duration = Duration::from_secs(12);

/// The several-proxies setup of docs/operations.md: HAProxy health-checking `/ready` in
/// front of two proxies on one PostgreSQL. Clients keep sending requests through HAProxy
/// while the database is stopped for longer than the old readiness bound: none fails,
/// because `/ready` stays 200 (each proxy routes from memory) while each reports the store
/// down in `/status` and `revproxy_store_up`, and up again once the database is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_haproxy_clients_do_not_notice_the_database_stopping() {
    let mut d = Deployment::new();
    let (procs, _agent) = d.processes_and_an_agent(&THREE[..2]).await;
    let (front, _lb, _files) = haproxy_in_front(&procs);
    serves(front).await;

    // Clients, one request after another, until told to stop: (requests, failures).
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let clients: Vec<_> = (0..2u64)
        .map(|c| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let (mut sent, mut failed) = (0u64, 0u64);
                while !*stop.borrow() {
                    let answer =
                        tokio::time::timeout(REQUEST_DEADLINE, through(front, c << 32 | sent));
                    if !answer.await.unwrap_or(false) {
                        failed += 1;
                    }
                    sent += 1;
                }
                (sent, failed)
            })
        })
        .collect();

    d.pg.stop();
    let stopped = Instant::now();
    for p in &procs {
        eventually("the store reported down", || async {
            store_up(p.admin).await == Some(0.0)
        })
        .await;
    }
    eprintln!(
        "both proxies reported the store down {:?} after it stopped",
        stopped.elapsed()
    );
    tokio::time::sleep_until((stopped + DATABASE_OUTAGE).into()).await;
    for p in &procs {
        let (ready, why) = admin_get(p.admin, "/ready").await;
        assert_eq!(ready, 200, "unready with the store down: {why}");
        let status: serde_json::Value =
            serde_json::from_str(&admin_get(p.admin, "/status").await.1).unwrap();
        assert_eq!(status["proxy"]["store_up"], false, "{status}");
        let problem = status["proxy"]["store_problem"]
            .as_str()
            .unwrap_or_default();
        let down: u64 = (problem.strip_prefix("the state store has not answered for "))
            .and_then(|rest| rest.split(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("{status}"));
        assert!(down + 2 >= DATABASE_OUTAGE.as_secs(), "{status}");
        assert_eq!(store_up(p.admin).await, Some(0.0));
    }

    d.pg.restart();
    for p in &procs {
        eventually("the store reported up again", || async {
            store_up(p.admin).await == Some(1.0)
        })
        .await;
        let status: serde_json::Value =
            serde_json::from_str(&admin_get(p.admin, "/status").await.1).unwrap();
        assert!(status["proxy"]["store_problem"].is_null(), "{status}");
    }
    stop_tx.send(true).unwrap();
    let (mut sent, mut failed) = (0, 0);
    for client in clients {
        let (s, f) = client.await.unwrap();
        (sent, failed) = (sent + s, failed + f);
    }
    eprintln!(
        "{sent} requests through HAProxy over a {:?} database outage: {failed} failed",
        stopped.elapsed()
    );
    assert!(sent > 100, "only {sent} requests were sent");
    assert_eq!(
        failed, 0,
        "clients of the load balancer noticed the database stop"
    );
    // Each proxy said once that the store was down, and once that it was back.
    for p in &procs {
        let lines: Vec<String> = p.logs.try_iter().collect();
        let said = |what: &str| lines.iter().filter(|l| l.contains(what)).count();
        assert_eq!(said("cannot read the state store"), 1, "{lines:#?}");
        assert_eq!(said("the state store answers again"), 1, "{lines:#?}");
    }
}
