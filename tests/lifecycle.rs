//! Certificate lifecycle end to end: renewal that never cuts a stream, revocation that
//! cuts an agent off in seconds, expiry that says how to recover, and narrowing without
//! reissuing. Short certificate lifetimes and a test clock instead of hours of sleep.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use revproxy::agent::renew_once;
use revproxy::agent::Identity;
use revproxy::ca::CertState;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(10);

fn now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

async fn renewal_keeps_a_continuous_stream_through_five_generations(t: Transport) {
    // Five generations within seconds: the proxy renews at any age here (by default not
    // before half the lifetime; `renewal_waits_until_the_proxy_says_it_is_due` covers that).
    let proxy = TestProxy::start_with(|b| b.min_renewal_age_percent(0)).await;
    let backend = echo_backend(b"").await;
    let dir = enroll_agent_with_ttl(
        &proxy,
        "web-1",
        &["app.example.com"],
        Duration::from_secs(60),
    )
    .await;
    let clock = Arc::new(TestClock::default());
    let agent_clock = clock.clone();
    let mut agent = start_agent(dir.path(), &[("app.example.com", backend)], move |b| {
        b.transport(t)
            .clock(agent_clock)
            .renew_check(Duration::from_millis(20))
    });
    proxy.wait_for("app.example.com", 1).await;
    let first = Identity::load(dir.path()).unwrap();

    // A stream that keeps flowing the whole time: write a chunk, read it back, repeat.
    let mut stream = TcpStream::connect(proxy.http).await.unwrap();
    let head = http_head("app.example.com");
    stream.write_all(&head).await.unwrap();
    let mut echoed = vec![0; head.len()];
    stream.read_exact(&mut echoed).await.unwrap();
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let pump = tokio::spawn(async move {
        let mut sent = 0u64;
        let mut i = 0u64;
        loop {
            let chunk = pattern(8 * 1024, i);
            stream.write_all(&chunk).await.unwrap();
            let mut back = vec![0; chunk.len()];
            stream.read_exact(&mut back).await.unwrap();
            assert!(back == chunk, "chunk {i} came back intact");
            sent += chunk.len() as u64;
            i += 1;
            if stop_rx.try_recv().is_ok() {
                return sent;
            }
        }
    });

    let mut serials = vec![
        revproxy::ca::CertSummary::from_der(
            &revproxy::ca::pem_to_der(&first.cert_pem, "CERTIFICATE").unwrap(),
        )
        .unwrap()
        .serial,
    ];
    for generation in 2..=6 {
        // The wall clock jumps past two thirds of the lifetime, once.
        clock.jump_once(45);
        tokio::time::timeout(WAIT, agent.renewals.changed())
            .await
            .expect("the agent renewed")
            .unwrap();
        let renewed = agent.renewals.borrow_and_update().clone();
        let serial = revproxy::ca::CertSummary::from_der(
            &revproxy::ca::pem_to_der(&renewed.cert_pem, "CERTIFICATE").unwrap(),
        )
        .unwrap()
        .serial;
        assert!(
            !serials.contains(&serial),
            "generation {generation} is a new certificate"
        );
        serials.push(serial);
        assert_eq!(renewed.identity, first.identity, "same identity");
        assert_eq!(renewed.hosts, first.hosts, "same names");
        assert_ne!(renewed.key_pem, first.key_pem, "a fresh key");
        assert_eq!(
            Identity::load(dir.path()).unwrap().cert_pem,
            renewed.cert_pem,
            "saved before use"
        );
        // New connections work throughout.
        let back = round_trip(proxy.http, &http_head("app.example.com"), b"new")
            .await
            .unwrap();
        assert!(back.ends_with(b"\r\n\r\nnew"));
    }
    stop_tx.send(()).unwrap();
    let sent = tokio::time::timeout(WAIT, pump).await.unwrap().unwrap();
    assert!(sent > 0);
    let certs = proxy.ca.list_certs(now()).unwrap();
    let ours: Vec<_> = certs.iter().filter(|c| c.agent == "web-1").collect();
    assert_eq!(ours.len(), 6, "one enrollment and five renewals");
}

async fn revoking_an_agent_closes_its_tunnel_within_two_seconds_and_keeps_it_out(t: Transport) {
    let proxy = TestProxy::start().await;
    let backend = echo_backend(b"").await;
    let bad_dir = enroll_agent(&proxy, "bad", &["bad.example.com"]).await;
    let good_dir = enroll_agent(&proxy, "good", &["good.example.com"]).await;
    let _bad = start_agent(bad_dir.path(), &[("bad.example.com", backend)], on(t));
    let _good = start_agent(good_dir.path(), &[("good.example.com", backend)], on(t));
    proxy.wait_for("bad.example.com", 1).await;
    proxy.wait_for("good.example.com", 1).await;

    let mut open = TcpStream::connect(proxy.http).await.unwrap();
    open.write_all(&http_head("bad.example.com")).await.unwrap();
    let mut first = [0u8; 4];
    open.read_exact(&mut first).await.unwrap();

    let revoked_at = Instant::now();
    let serials = proxy.ca.revoke_certs("bad", now()).unwrap();
    assert_eq!(serials.len(), 1);
    assert!(
        proxy
            .status
            .wait_for_tunnels("bad.example.com", 0, Duration::from_secs(2))
            .await,
        "the revoked agent's tunnel is gone within 2 s"
    );
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), open.read_to_end(&mut rest))
        .await
        .expect("its open stream was cut")
        .ok();
    eprintln!("revoked agent cut off after {:?}", revoked_at.elapsed());

    // Its certificate no longer opens a tunnel, nor renews.
    let id = Identity::load(bad_dir.path()).unwrap();
    let refused = match tls_to_agent_port(&proxy, &agent_tls(&proxy, bad_dir.path())).await {
        Err(_) => true,
        Ok(mut tls) => {
            let mut buf = [0u8; 1];
            matches!(
                tokio::time::timeout(WAIT, tls.read(&mut buf)).await,
                Ok(Err(_)) | Ok(Ok(0))
            )
        }
    };
    assert!(refused, "a revoked certificate is refused at the handshake");
    let err = renew_once(&id, bad_dir.path()).await.unwrap_err();
    assert_eq!(err.code(), Some("cert_revoked"), "{err}");

    // The other agent is untouched.
    let back = round_trip(proxy.http, &http_head("good.example.com"), b"ok")
        .await
        .unwrap();
    assert!(back.ends_with(b"ok"));
    assert_eq!(proxy.status.tunnels_for("good.example.com"), 1);
    let list = proxy.ca.list_certs(now()).unwrap();
    assert!(list
        .iter()
        .any(|c| c.agent == "bad" && c.state == CertState::Revoked));
    assert!(list
        .iter()
        .any(|c| c.agent == "good" && c.state == CertState::Valid));
}

#[tokio::test]
async fn an_expired_certificate_cannot_renew_and_the_agent_says_how_to_re_enroll() {
    let proxy = TestProxy::start().await;
    let backend = echo_backend(b"").await;
    let dir = enroll_agent_with_ttl(
        &proxy,
        "sleeper",
        &["app.example.com"],
        Duration::from_secs(60),
    )
    .await;
    let clock = Arc::new(TestClock::default());
    let agent_clock = clock.clone();
    // The machine slept through the whole lifetime: the agent wakes up past expiry.
    clock.set_offset(0);
    let agent = start_agent(dir.path(), &[("app.example.com", backend)], move |b| {
        b.clock(agent_clock).renew_check(Duration::from_millis(20))
    });
    proxy.wait_for("app.example.com", 1).await;
    clock.set_offset(3600);
    let err = tokio::time::timeout(WAIT, agent.finished())
        .await
        .expect("the agent stopped")
        .unwrap_err();
    let hint = err.to_string();
    assert!(hint.contains("expired"), "{hint}");
    assert!(
        hint.contains("revproxy token create --name sleeper --host app.example.com"),
        "{hint}"
    );
    assert!(
        hint.contains(&format!(
            "revproxy-agent enroll --state {}",
            dir.path().display()
        )),
        "{hint}"
    );

    // Starting it again with the expired certificate fails with the same advice.
    let expired_clock = Arc::new(TestClock::default());
    expired_clock.set_offset(3600);
    let err = revproxy::Agent::builder(dir.path())
        .service("app.example.com", &backend.to_string())
        .clock(expired_clock)
        .build()
        .err()
        .expect("refused");
    assert!(
        err.to_string()
            .contains("revproxy token create --name sleeper"),
        "{err}"
    );

    // The proxy refuses to renew an expired certificate even if asked.
    let id = Identity::load(dir.path()).unwrap();
    let later = now() + time::Duration::hours(1);
    let serial = revproxy::ca::CertSummary::from_der(
        &revproxy::ca::pem_to_der(&id.cert_pem, "CERTIFICATE").unwrap(),
    )
    .unwrap()
    .serial;
    let (_, csr) = new_csr();
    let refused = proxy
        .ca
        .renew(&serial, &csr, later, revproxy::ca::MIN_RENEWAL_AGE_PERCENT)
        .unwrap_err();
    assert_eq!(refused.code(), "cert_expired");

    // Re-enrolling under the same name restores service under the same identity.
    let token = proxy.token_for(
        "sleeper",
        &["app.example.com"],
        now(),
        Duration::from_secs(3600),
    );
    let again = revproxy::agent::enroll(&token, dir.path()).await.unwrap();
    assert_eq!(again.identity, id.identity);
    proxy.wait_for("app.example.com", 0).await;
    let _agent = start_agent(dir.path(), &[("app.example.com", backend)], |b| b);
    proxy.wait_for("app.example.com", 1).await;
    let back = round_trip(proxy.http, &http_head("app.example.com"), b"back")
        .await
        .unwrap();
    assert!(back.ends_with(b"back"));
}

/// The serial and issue time (not before, less the backdating) of a PEM certificate.
fn serial_and_issue(pem: &str) -> (String, i64) {
    let cert = revproxy::ca::CertSummary::from_pem(pem).unwrap();
    let (not_before, _) = revproxy::ca::validity(pem).unwrap();
    (
        cert.serial,
        not_before + revproxy::ca::BACKDATE.as_secs() as i64,
    )
}

/// A proxy renews nothing before half its lifetime. An agent that asks early (its clock
/// runs ahead; here the backdating of a six-second certificate makes it due at once) is
/// told how long to wait, waits, and renews then, serving throughout.
#[tokio::test]
async fn renewal_waits_until_the_proxy_says_it_is_due() {
    let proxy = TestProxy::start().await;
    let backend = echo_backend(b"").await;
    let dir = enroll_agent_with_ttl(
        &proxy,
        "web-1",
        &["app.example.com"],
        Duration::from_secs(6),
    )
    .await;
    let (first_serial, first_issued) =
        serial_and_issue(&Identity::load(dir.path()).unwrap().cert_pem);
    let mut agent = start_agent(dir.path(), &[("app.example.com", backend)], |b| {
        b.renew_check(Duration::from_millis(20))
    });
    proxy.wait_for("app.example.com", 1).await;
    tokio::time::timeout(WAIT, agent.renewals.changed())
        .await
        .expect("the agent renewed")
        .unwrap();
    let renewed = agent.renewals.borrow_and_update().clone();
    let (serial, issued) = serial_and_issue(&renewed.cert_pem);
    assert_ne!(serial, first_serial);
    assert!(
        issued >= first_issued + 3,
        "renewed {} s after issue, before half of six seconds",
        issued - first_issued
    );
    let back = round_trip(proxy.http, &http_head("app.example.com"), b"on")
        .await
        .unwrap();
    assert!(back.ends_with(b"\r\n\r\non"));
}

/// The proxy issued a renewal but the agent never stored it (the answer was lost, or the
/// agent died before saving): the next attempt, with the key saved before the first,
/// gets that same certificate instead of minting another.
#[tokio::test]
async fn a_renewal_the_agent_failed_to_store_is_fetched_again_not_minted_again() {
    let proxy = TestProxy::start().await;
    let dir = issue_identity(
        &proxy.ca,
        proxy.addr,
        "web-1",
        &["app.example.com"],
        now() - time::Duration::hours(13),
        Duration::from_secs(24 * 3600),
    );
    let id = Identity::load(dir.path()).unwrap();
    // A directory where the new key's staging file goes makes saving fail.
    let blocker = dir.path().join("agent.key.new");
    std::fs::create_dir_all(blocker.join("x")).unwrap();
    let err = renew_once(&id, dir.path()).await.unwrap_err();
    assert!(
        matches!(err, revproxy::agent::EnrollClientError::Identity(_)),
        "{err}"
    );
    let ours = || {
        proxy
            .ca
            .list_certs(now())
            .unwrap()
            .into_iter()
            .filter(|c| c.agent == "web-1")
            .map(|c| c.serial)
            .collect::<Vec<_>>()
    };
    let issued = ours();
    assert_eq!(issued.len(), 2, "the proxy renewed it");
    assert_eq!(
        Identity::load(dir.path()).unwrap().cert_pem,
        id.cert_pem,
        "nothing saved"
    );

    std::fs::remove_dir_all(&blocker).unwrap();
    let renewed = renew_once(&id, dir.path()).await.unwrap();
    assert_eq!(ours(), issued, "no second certificate");
    assert_eq!(renewed.serial().as_ref(), Some(&issued[1]));
    assert_eq!(
        Identity::load(dir.path()).unwrap().cert_pem,
        renewed.cert_pem
    );
    assert!(
        !dir.path().join("renew-pending.json").exists(),
        "the pending key is gone"
    );
}

/// A renewal of the old identity that ends after the agent was enrolled again (the
/// operator re-enrolled it while its renewal ran) leaves the new identity in place.
#[tokio::test]
async fn a_renewal_that_ends_after_a_new_enrollment_leaves_the_new_identity() {
    let proxy = TestProxy::start_with(|b| b.min_renewal_age_percent(0)).await;
    let dir = enroll_agent(&proxy, "web-1", &["app.example.com"]).await;
    let old = Identity::load(dir.path()).unwrap();
    let token = proxy.token_for(
        "web-1",
        &["app.example.com"],
        now(),
        Duration::from_secs(3600),
    );
    let new = revproxy::agent::enroll(&token, dir.path()).await.unwrap();
    let err = renew_once(&old, dir.path()).await.unwrap_err();
    assert!(err.to_string().contains("enrolled again"), "{err}");
    assert_eq!(
        Identity::load(dir.path()).unwrap().cert_pem,
        new.cert_pem,
        "the new identity stays"
    );
}

/// A copy of an agent's identity (a stolen key, a restored backup) whose certificate the
/// real agent already renewed: the proxy refuses it another certificate, and it says so
/// loudly but keeps serving with the certificate it has (it stops at that one's expiry).
#[tokio::test]
async fn a_copy_of_a_renewed_identity_is_refused_renewal_and_keeps_serving() {
    let proxy = TestProxy::start().await;
    let backend = echo_backend(b"").await;
    // Issued 17 h ago: past the agent's renewal time (two thirds of 24 h).
    let real = issue_identity(
        &proxy.ca,
        proxy.addr,
        "web-1",
        &["app.example.com"],
        now() - time::Duration::hours(17),
        Duration::from_secs(24 * 3600),
    );
    let copy = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(real.path()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), copy.path().join(entry.file_name())).unwrap();
    }
    let copied = Identity::load(copy.path()).unwrap();
    let renewed = renew_once(&Identity::load(real.path()).unwrap(), real.path())
        .await
        .unwrap();

    let (_guard, mut logs) = watch_logs(tracing::Level::WARN);
    let agent = start_agent(copy.path(), &[("app.example.com", backend)], |b| {
        b.renew_check(Duration::from_millis(20))
    });
    let refusal = log_line(&mut logs, "certificate renewal refused").await;
    assert!(refusal.contains(&renewed.serial().unwrap()), "{refusal}");
    proxy.wait_for("app.example.com", 1).await;
    let back = round_trip(proxy.http, &http_head("app.example.com"), b"still")
        .await
        .unwrap();
    assert!(back.ends_with(b"\r\n\r\nstill"));
    assert!(!agent.renewals.has_changed().unwrap(), "no new certificate");
    assert_eq!(
        Identity::load(copy.path()).unwrap().cert_pem,
        copied.cert_pem,
        "the copy keeps its certificate"
    );
}

async fn narrowing_an_agent_takes_effect_on_the_next_stream_without_a_reconnect(t: Transport) {
    let proxy = TestProxy::start().await;
    let backend = echo_backend(b"").await;
    let dir = enroll_agent(&proxy, "web-1", &["a.example.com", "b.example.com"]).await;
    let _agent = start_agent(
        dir.path(),
        &[("a.example.com", backend), ("b.example.com", backend)],
        on(t),
    );
    proxy.wait_for("b.example.com", 1).await;

    // A connection through the tunnel that stays open across the change.
    let mut open = TcpStream::connect(proxy.http).await.unwrap();
    let head = http_head("a.example.com");
    open.write_all(&head).await.unwrap();
    let mut echoed = vec![0; head.len()];
    open.read_exact(&mut echoed).await.unwrap();

    proxy
        .ca
        .set_hosts("web-1", &["a.example.com".to_string()])
        .unwrap();
    proxy.wait_for("b.example.com", 0).await;
    let back = round_trip(proxy.http, &http_head("b.example.com"), b"")
        .await
        .unwrap();
    assert!(
        back.starts_with(b"HTTP/1.1 502"),
        "{}",
        String::from_utf8_lossy(&back)
    );
    let back = round_trip(proxy.http, &http_head("a.example.com"), b"x")
        .await
        .unwrap();
    assert!(back.ends_with(b"x"));
    // The open stream lived on: the tunnel was never torn down.
    open.write_all(b"still").await.unwrap();
    let mut still = [0u8; 5];
    open.read_exact(&mut still).await.unwrap();
    assert_eq!(&still, b"still");
}

/// How long the test watches a revoked agent knock.
const KNOCKING: Duration = Duration::from_secs(6);
/// The most reconnect attempts a revoked agent may make in [`KNOCKING`]: its backoff
/// (0.1 s doubling, each delay drawn from its upper half) allows 7; knocking every
/// 0.25-0.5 s, as it did, makes 12 or more.
const KNOCKS_AT_MOST: usize = 9;

async fn a_revoked_agent_backs_off_and_says_once_that_it_must_enroll_again(t: Transport) {
    let (_logs, mut logs) = watch_logs(tracing::Level::DEBUG);
    let proxy = TestProxy::start().await;
    let backend = echo_backend(b"").await;
    let dir = enroll_agent(&proxy, "web-1", &["app.example.com"]).await;
    let _agent = start_agent(dir.path(), &[("app.example.com", backend)], on(t));
    proxy.wait_for("app.example.com", 1).await;
    let back = round_trip(proxy.http, &http_head("app.example.com"), b"up")
        .await
        .unwrap();
    assert!(back.ends_with(b"up"));
    // A tunnel that served a while (longer than the agent's 1 s overlap), as a real one
    // has: after losing one the agent reconnects fast, which a revoked agent must not.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    while logs.try_recv().is_ok() {}

    proxy.ca.revoke_certs("web-1", now()).unwrap();
    let until = tokio::time::Instant::now() + KNOCKING;
    let (mut advice, mut loud, mut knocks) = (Vec::new(), Vec::new(), 0);
    while let Ok(Some(line)) = tokio::time::timeout_at(until, logs.recv()).await {
        let agent = line.contains("revproxy::agent") || line.contains("revproxy::tunnel::choice");
        if agent && line.contains("enrolled again") {
            advice.push(line);
        } else if agent && (line.contains(" WARN ") || line.contains(" ERROR ")) {
            loud.push(line);
        } else if line.contains("reconnecting after a pause") {
            knocks += 1;
        }
    }
    assert!(
        knocks <= KNOCKS_AT_MOST,
        "{knocks} reconnect attempts in {KNOCKING:?}: the revoked agent backs off"
    );
    eprintln!("{knocks} reconnect attempts in {KNOCKING:?} after the revocation");
    assert!(loud.is_empty(), "later refusals are quiet: {loud:#?}");
    assert_eq!(advice.len(), 1, "the advice is given once: {advice:#?}");
    let state = dir.path().display().to_string();
    assert!(
        advice[0].contains(" ERROR ")
            && advice[0].contains("revoked")
            && advice[0].contains("revproxy token create --name web-1 --host app.example.com")
            && advice[0].contains(&format!("revproxy-agent enroll --state {state} --token")),
        "{}",
        advice[0]
    );
    assert_eq!(proxy.status.tunnels_for("app.example.com"), 0);
}

/// A revoked agent enrolled again into its state directory, while it runs, is back
/// without a restart: it notices the new identity (it looks every
/// `revproxy::agent::IDENTITY_CHECK`) and moves its tunnel to it.
async fn an_agent_enrolled_again_while_running_serves_again_without_a_restart(t: Transport) {
    let proxy = TestProxy::start().await;
    let backend = echo_backend(b"").await;
    let dir = enroll_agent(&proxy, "web-1", &["app.example.com"]).await;
    let mut agent = start_agent(dir.path(), &[("app.example.com", backend)], on(t));
    proxy.wait_for("app.example.com", 1).await;
    proxy.ca.revoke_certs("web-1", now()).unwrap();
    assert!(
        proxy
            .status
            .wait_for_tunnels("app.example.com", 0, WAIT)
            .await,
        "the revoked agent is cut off"
    );

    // A set that does not belong together (another agent's key over this one's) is not
    // taken up: the agent says so and keeps its identity.
    let (_logs, mut logs) = watch_logs(tracing::Level::WARN);
    let other = enroll_agent(&proxy, "other", &["other.example.com"]).await;
    let old = agent.renewals.borrow().clone();
    std::fs::copy(other.path().join("agent.key"), dir.path().join("agent.key")).unwrap();
    log_line(&mut logs, "do not belong together").await;
    assert_eq!(agent.renewals.borrow().cert_pem, old.cert_pem);

    let token = proxy.token_for(
        "web-1",
        &["app.example.com"],
        now(),
        Duration::from_secs(3600),
    );
    let enrolled_at = Instant::now();
    let new = revproxy::agent::enroll(&token, dir.path()).await.unwrap();
    tokio::time::timeout(
        WAIT,
        agent.renewals.wait_for(|id| id.cert_pem == new.cert_pem),
    )
    .await
    .expect("the running agent takes the new identity up")
    .unwrap();
    // Only the new certificate can open a tunnel: the old one is revoked.
    proxy.wait_for("app.example.com", 1).await;
    let back = round_trip(proxy.http, &http_head("app.example.com"), b"again")
        .await
        .unwrap();
    assert!(back.ends_with(b"again"));
    eprintln!(
        "served again {:?} after the enrollment",
        enrolled_at.elapsed()
    );
    agent.stop().await;
}

over_both_transports!(
    an_agent_enrolled_again_while_running_serves_again_without_a_restart,
    a_revoked_agent_backs_off_and_says_once_that_it_must_enroll_again,
    renewal_keeps_a_continuous_stream_through_five_generations,
    revoking_an_agent_closes_its_tunnel_within_two_seconds_and_keeps_it_out,
    narrowing_an_agent_takes_effect_on_the_next_stream_without_a_reconnect,
);
