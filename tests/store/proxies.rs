//! Agents and the proxies sharing a store: each agent keeps a tunnel to every proxy, and
//! follows them joining and leaving.

use std::time::{Duration, Instant};

use super::common::*;
use super::reaches;

/// Waits until the agent whose state is in `dir` no longer lists `addr` among its
/// proxies (the file it remembers them in), within `limit`.
async fn until_unlisted(dir: &std::path::Path, addr: &str, limit: Duration) {
    let list = dir.join(revproxy::agent::PROXIES_FILE);
    let deadline = Instant::now() + limit;
    while std::fs::read_to_string(&list).unwrap().contains(addr) {
        assert!(Instant::now() < deadline, "the agent still lists {addr}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An agent given one proxy's address learns the other two and keeps a tunnel to each:
/// clients arriving at any of the three reach its backend. A proxy added later is
/// followed too, and so is one that stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_enrolled_through_one_proxy_serves_clients_arriving_at_all_three() {
    let d = Deployment::new();
    let mut proxies = d.three(|b| b).await;
    let backend = echo_backend(b"A:").await;
    let (dir, _agent) = d
        .agent(&proxies[1], &proxies, "web-1", "app.example.com", backend)
        .await;
    let fourth = TestProxy::start_member(d.member_dir(), &d.url, "127.0.0.4", |b| b).await;
    // Listed at the next heartbeat of the proxy the agent asks (5 s at most).
    fourth.wait_for("app.example.com", 1).await;
    proxies.push(fourth);
    for p in &proxies {
        reaches(p, "app.example.com", b"A:").await;
    }
    // It remembers them for its next start.
    let remembered =
        std::fs::read_to_string(dir.path().join(revproxy::agent::PROXIES_FILE)).unwrap();
    for p in &proxies {
        assert!(remembered.contains(&p.addr.to_string()), "{remembered}");
    }
    // A proxy that stops takes itself off the list; the agent follows.
    let gone = proxies.pop().unwrap();
    let gone_addr = gone.addr.to_string();
    gone.stop().await;
    until_unlisted(dir.path(), &gone_addr, Duration::from_secs(20)).await;
    for p in &proxies {
        reaches(p, "app.example.com", b"A:").await;
    }
}

/// When a proxy joins or leaves, the proxies tell the agents on their tunnels: an agent
/// that asked for the list at its start (and would ask again only in a minute) serves
/// through each of two proxies started after it within 10 s (`wait_for`'s limit), and
/// drops one that stopped from its list within as long.
async fn agents_hear_of_proxies_joining_and_leaving(t: revproxy::agent::Transport) {
    let d = Deployment::new();
    let first = TestProxy::start_member(d.member_dir(), &d.url, "127.0.0.1", |b| b).await;
    let backend = echo_backend(b"A:").await;
    let dir = tempfile::tempdir().unwrap();
    let token = d.token("web-1", &["app.example.com"], first.addr);
    revproxy::agent::enroll(&token, dir.path()).await.unwrap();
    // The default poll, every 9-10 minutes: longer than anything here waits.
    let _agent = start_agent(dir.path(), &[("app.example.com", backend)], |b| {
        b.transport(t)
    });
    first.wait_for("app.example.com", 1).await;
    let mut proxies = vec![first];
    for ip in ["127.0.0.2", "127.0.0.3"] {
        let joined = TestProxy::start_member(d.member_dir(), &d.url, ip, |b| b).await;
        // The others see it at their next heartbeat (5 s at most) and tell their agents.
        joined.wait_for("app.example.com", 1).await;
        proxies.push(joined);
    }
    for p in &proxies {
        reaches(p, "app.example.com", b"A:").await;
    }
    let gone = proxies.pop().unwrap();
    let gone_addr = gone.addr.to_string();
    gone.stop().await;
    until_unlisted(dir.path(), &gone_addr, Duration::from_secs(10)).await;
    for p in &proxies {
        reaches(p, "app.example.com", b"A:").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_agents_hear_of_proxies_joining_and_leaving() {
    agents_hear_of_proxies_joining_and_leaving(revproxy::agent::Transport::H2).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_agents_hear_of_proxies_joining_and_leaving() {
    agents_hear_of_proxies_joining_and_leaving(revproxy::agent::Transport::Quic).await
}

/// A name terminated through one proxy's CA handle is terminated by all three (its record
/// reaches the others by the change feed): each serves the operator's certificate, its
/// key unsealed with the CA key every proxy holds, and the backend gets plaintext; passed
/// through again, it is passed through by all three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_terminated_once_is_terminated_by_every_proxy_on_the_store() {
    let d = Deployment::new();
    let proxies = d.three(|b| b).await;
    let backend = echo_backend(b"plain:").await;
    let (_dir, _agent) = d
        .agent(&proxies[1], &proxies, "web-1", "app.example.com", backend)
        .await;
    let pki = OperatorCert::new(&["app.example.com"]);
    let client = pki.client(&[b"http/1.1"]);
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    (proxies[0].ca)
        .tls_terminate(&["app.example.com".into()], Some(&pki.own()), false, now)
        .unwrap();
    for p in &proxies {
        eventually("every proxy terminates the name", || async {
            tls_round_trip(p.sni, &client, "app.example.com", b"hello")
                .await
                .is_ok_and(|back| back == b"plain:hello")
        })
        .await;
    }
    (proxies[2].ca)
        .tls_passthrough(&["app.example.com".into()])
        .unwrap();
    // The backend gets the ClientHello itself again.
    let hello = client_hello("app.example.com");
    for p in &proxies {
        eventually("every proxy passes it through again", || async {
            round_trip(p.sni, &hello, b"")
                .await
                .is_ok_and(|b| b.starts_with(b"plain:") && b[6..] == hello[..])
        })
        .await;
    }
}

/// A proxy without `[acme]` answers the challenge of an order another proxy on the store
/// made: pebble validates HTTP-01 against the first proxy only (every name resolves to
/// 127.0.0.1), the one on 127.0.0.2 orders; the certificate issued is then served by both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_that_did_not_order_answers_the_acme_challenge() {
    let d = Deployment::new();
    let mut pebble = Pebble::new();
    let settings = pebble.settings(revproxy::ChallengeKind::Http01);
    let answering = TestProxy::start_member(d.member_dir(), &d.url, "127.0.0.1", |b| b).await;
    let ordering = TestProxy::start_member(d.member_dir(), &d.url, "127.0.0.2", move |b| {
        b.acme(settings)
    })
    .await;
    pebble.start(PebbleOptions {
        http_port: answering.http.port(),
        tls_port: answering.sni.port(),
        validity: Duration::from_secs(3600),
    });
    let proxies = [answering, ordering];
    let backend = echo_backend(b"plain:").await;
    let (_dir, _agent) = d
        .agent(&proxies[0], &proxies, "web-1", "app.example.com", backend)
        .await;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    (proxies[1].ca)
        .tls_terminate(&["app.example.com".into()], None, false, now)
        .unwrap();
    let client = pebble.client(&[b"http/1.1"]);
    for p in &proxies {
        eventually_within(
            Duration::from_secs(30),
            "each proxy serves the certificate",
            || async {
                tls_round_trip(p.sni, &client, "app.example.com", b"hello")
                    .await
                    .is_ok_and(|back| back == b"plain:hello")
            },
        )
        .await;
    }
    let mut listed = Vec::new();
    (proxies[0].ca)
        .each_tls(|r| {
            listed.push(r);
            Ok::<_, revproxy::ca::CaError>(())
        })
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert!(
        listed[0].acme.is_idle(),
        "no lease or challenge left: {:?}",
        listed[0].acme
    );
    assert!(listed[0].last_error.is_none());
}
