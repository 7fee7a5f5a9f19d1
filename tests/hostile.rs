//! Attacks on the proxy, tried as an attacker would, each over a real proxy on
//! 127.0.0.1:0: resumed sessions, certificates the CA signed but never recorded or that
//! expired under a live tunnel, one agent's wildcard taking another agent's exact name,
//! internal details in public answers, and renewal asked for in a loop.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use revproxy::Transport;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

#[path = "hostile/renewal.rs"]
mod renewal;

/// One TLS handshake on the agent port with `config`; returns how it went.
async fn handshake(proxy: &TestProxy, config: &Arc<rustls::ClientConfig>) -> rustls::HandshakeKind {
    let tls = tls_to_agent_port(proxy, config).await.unwrap();
    let kind = tls.get_ref().1.handshake_kind().unwrap();
    // Read the server's session tickets (they follow the handshake) before closing.
    let mut tls = tls;
    let mut buf = [0u8; 1];
    let _ = tokio::time::timeout(Duration::from_millis(200), tls.read(&mut buf)).await;
    kind
}

/// A resumed TLS session skips the certificate verifier, so an agent port that resumes
/// would let a certificate that expired (or was never valid for a tunnel) back in. Every
/// handshake there must be a full one, for tunnels and enrollment alike.
#[tokio::test]
async fn the_agent_port_never_resumes_a_tls_session() {
    let proxy = TestProxy::start().await;
    let dir = enroll_agent(&proxy, "web-1", &["app.example.com"]).await;
    let tunnel = agent_tls(&proxy, dir.path());
    let enroll = Arc::new(
        revproxy::tls::pinned_client_config(vec![proxy.pin()], &[revproxy::tls::ALPN_HTTP1])
            .unwrap(),
    );
    for config in [tunnel, enroll] {
        assert_eq!(
            handshake(&proxy, &config).await,
            rustls::HandshakeKind::Full
        );
        assert_eq!(
            handshake(&proxy, &config).await,
            rustls::HandshakeKind::Full,
            "the second handshake with the same client session store is full too"
        );
    }
}

/// Someone holding a copy of the CA key (an old backup, a second proxy set up by hand) can
/// sign certificates this proxy never issued. Admission is an allow-list: a serial that is
/// not on record opens no tunnel.
async fn a_certificate_signed_by_the_ca_but_never_issued_is_refused(t: Transport) {
    let proxy = TestProxy::start().await;
    // The real web-1 is enrolled (and granted app.example.com), but not running.
    let _real = enroll_agent(&proxy, "web-1", &["app.example.com"]).await;
    let copy = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(proxy.dir.path()).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), copy.path().join(entry.file_name())).unwrap();
        }
    }
    let rogue_ca = revproxy::ca::Ca::open(copy.path()).unwrap();
    let now = time::OffsetDateTime::now_utc();
    let rogue = issue_identity(
        &rogue_ca,
        proxy.addr,
        "web-1",
        &["app.example.com"],
        now,
        Duration::from_secs(3600),
    );
    let backend = echo_backend(b"rogue backend\n").await;
    let agent = start_agent(rogue.path(), &[("app.example.com", backend)], on(t));
    // It keeps trying; give it time to be refused several times.
    assert!(
        !proxy
            .status
            .wait_for_tunnels("app.example.com", 1, Duration::from_secs(3))
            .await,
        "a certificate the proxy never issued must open no tunnel"
    );
    let answer = round_trip(proxy.http, &http_head("app.example.com"), b"")
        .await
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(!answer.contains("rogue backend"), "{answer}");
    drop(agent);
}

/// A certificate's expiry ends its tunnels: a live tunnel does not outlive the check its
/// handshake made. (An agent that renews moves to its new certificate long before.)
async fn a_live_tunnel_closes_when_its_certificate_expires(t: Transport) {
    let proxy = TestProxy::start().await;
    let dir = enroll_agent_with_ttl(
        &proxy,
        "short",
        &["app.example.com"],
        Duration::from_secs(6),
    )
    .await;
    let not_after = revproxy::agent::Identity::load(dir.path())
        .unwrap()
        .not_after;
    // The agent's clock is an hour slow, so it never thinks it is time to renew.
    let clock = Arc::new(TestClock::default());
    clock.set_offset(-3600);
    let backend = echo_backend(b"").await;
    let _agent = start_agent(dir.path(), &[("app.example.com", backend)], |b| {
        b.transport(t).clock(clock)
    });
    proxy.wait_for("app.example.com", 1).await;
    let back = round_trip(proxy.http, &http_head("app.example.com"), b"before")
        .await
        .unwrap();
    assert!(back.ends_with(b"before"));
    proxy.wait_for("app.example.com", 0).await;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    assert!(
        now >= not_after,
        "closed at {now}, before the expiry at {not_after}"
    );
    // And it cannot come back with that certificate.
    assert!(
        !proxy
            .status
            .wait_for_tunnels("app.example.com", 1, Duration::from_secs(2))
            .await
    );
    let answer = round_trip(proxy.http, &http_head("app.example.com"), b"after")
        .await
        .unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 503"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
}

/// A hand-made "agent" with a valid certificate that speaks HTTP/2 as the proxy's server
/// but answers every CONNECT with a header list far past any real one and tries to push a
/// stream. Returns whether any push went through.
async fn start_hostile_h2_agent(proxy: &TestProxy, dir: &std::path::Path) -> Arc<AtomicBool> {
    let tls = tls_to_agent_port(proxy, &agent_tls(proxy, dir))
        .await
        .unwrap();
    let pushed = Arc::new(AtomicBool::new(false));
    let flag = pushed.clone();
    tokio::spawn(async move {
        let mut conn = ::h2::server::handshake(tls).await.unwrap();
        while let Some(Ok((_request, mut respond))) = conn.accept().await {
            let push = http::Request::get("https://app.example.com/pushed")
                .body(())
                .unwrap();
            if respond.push_request(push).is_ok() {
                flag.store(true, Ordering::SeqCst);
            }
            let huge = http::Response::builder()
                .status(200)
                .header("x-filler", "a".repeat(64 * 1024))
                .body(())
                .unwrap();
            if let Ok(mut body) = respond.send_response(huge, false) {
                let _ = body.send_data(bytes::Bytes::from_static(b"hostile:"), false);
            }
        }
    });
    pushed
}

/// An agent is a machine the operator does not fully control: its tunnel may not push
/// streams at the proxy, nor answer with a header list that makes it buffer megabytes.
#[tokio::test]
async fn a_hostile_agent_can_neither_push_nor_send_huge_headers() {
    let proxy = TestProxy::start().await;
    let dir = enroll_agent(&proxy, "web-1", &["app.example.com"]).await;
    let pushed = start_hostile_h2_agent(&proxy, dir.path()).await;
    proxy.wait_for("app.example.com", 1).await;
    let answer = tokio::time::timeout(
        Duration::from_secs(20),
        round_trip(proxy.http, &http_head("app.example.com"), b""),
    )
    .await
    .expect("answered")
    .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(!answer.contains("hostile"), "{answer}");
    assert!(
        !pushed.load(Ordering::SeqCst),
        "the proxy accepted a pushed stream"
    );
}

/// One certificate may hold only a few tunnels (draining ones included), not every slot of
/// the agent port.
async fn one_identity_holds_at_most_a_few_tunnels(t: Transport) {
    let proxy = TestProxy::start_with(|b| b.max_tunnels_per_agent(3)).await;
    let backend = echo_backend(b"").await;
    let dir = enroll_agent(&proxy, "web-1", &["app.example.com"]).await;
    let agents: Vec<_> = (0..5)
        .map(|_| start_agent(dir.path(), &[("app.example.com", backend)], on(t)))
        .collect();
    proxy.wait_for("app.example.com", 3).await;
    assert!(
        !proxy
            .status
            .wait_for_tunnels("app.example.com", 4, Duration::from_secs(3))
            .await,
        "a fourth tunnel from one identity was let in"
    );
    drop(agents);
}

/// Opens `count` connections to `addr` that send nothing, and one more; returns how long
/// the proxy took to close that last one (it reads EOF or an error).
async fn one_more_than(addr: std::net::SocketAddr, count: usize) -> (Vec<TcpStream>, Duration) {
    let mut idle = Vec::new();
    for _ in 0..count {
        idle.push(TcpStream::connect(addr).await.unwrap());
    }
    // The accept loop takes connections in the order they arrived, so the extra one is
    // counted after the others.
    let mut extra = TcpStream::connect(addr).await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 1];
    let _ = tokio::time::timeout(Duration::from_secs(30), extra.read(&mut buf)).await;
    (idle, started.elapsed())
}

/// One host that opens connections and says nothing may hold a few of the public
/// listener's slots, not all of them: past its per-source cap it is closed at once.
#[tokio::test]
async fn one_source_holds_at_most_its_share_of_public_connections() {
    let proxy = TestProxy::start_with(|b| b.max_connections_per_source(4)).await;
    let (idle, closed_after) = one_more_than(proxy.http, 4).await;
    assert!(
        closed_after < Duration::from_secs(2),
        "the fifth connection from one source waited {closed_after:?}"
    );
    drop(idle);
}

/// Connections that never finish a handshake on the agent port count against their
/// source's cap; once they are gone, a real agent from the same address gets in.
#[tokio::test]
async fn one_source_holds_at_most_a_few_agent_port_handshakes() {
    let proxy = TestProxy::start_with(|b| b.max_handshakes_per_source(4)).await;
    let (idle, closed_after) = one_more_than(proxy.addr, 4).await;
    assert!(
        closed_after < Duration::from_secs(2),
        "the fifth handshake from one source waited {closed_after:?}"
    );
    drop(idle);
    let backend = echo_backend(b"ok:").await;
    let dir = enroll_agent(&proxy, "web-1", &["app.example.com"]).await;
    let _agent = start_agent(dir.path(), &[("app.example.com", backend)], |b| b);
    proxy.wait_for("app.example.com", 1).await;
}

/// A UDP relay to `proxy` that forwards what its client sends but only the proxy's first
/// answer (its address-validation Retry): a QUIC client behind it proves its address,
/// starts the handshake, and never hears the rest. The returned receiver resolves once the
/// client's validated Initial went through.
async fn deaf_relay(
    proxy: std::net::SocketAddr,
) -> (std::net::SocketAddr, tokio::sync::oneshot::Receiver<()>) {
    let front = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let back = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    back.connect(proxy).await.unwrap();
    let addr = front.local_addr().unwrap();
    let (validated, first) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut validated = Some(validated);
        let mut client = None;
        let mut answered = false;
        let (mut up, mut down) = (vec![0u8; 65_536], vec![0u8; 65_536]);
        loop {
            tokio::select! {
                Ok((n, from)) = front.recv_from(&mut up) => {
                    client = Some(from);
                    back.send(&up[..n]).await.unwrap();
                    if answered {
                        if let Some(tx) = validated.take() {
                            let _ = tx.send(());
                        }
                    }
                }
                Ok(n) = back.recv(&mut down) => {
                    if let (false, Some(client)) = (answered, client) {
                        front.send_to(&down[..n], client).await.unwrap();
                        answered = true;
                    }
                }
            }
        }
    });
    (addr, first)
}

/// The same cap holds for QUIC: handshakes that never finish hold their source's slots
/// (once the source proved its address: a client that reads nothing holds none), the next
/// one from that address is refused at once, and another address gets in.
#[tokio::test]
async fn one_source_holds_at_most_a_few_quic_handshakes() {
    let proxy = TestProxy::start_with(|b| b.max_handshakes_per_source(3)).await;
    let dir = enroll_agent(&proxy, "web-1", &["app.example.com"]).await;
    let id = revproxy::agent::Identity::load(dir.path()).unwrap();
    let config = revproxy::tls::quic_client_config(
        revproxy::tls::agent_client_config(
            vec![proxy.pin()],
            &id.cert_pem,
            &id.key_pem,
            &[revproxy::tls::ALPN_QUIC],
        )
        .unwrap(),
    );
    let client = |bind: &str| quinn::Endpoint::client(bind.parse().unwrap()).unwrap();
    let mut stalled = Vec::new();
    for _ in 0..3 {
        let (relay, first) = deaf_relay(proxy.addr).await;
        let endpoint = client("127.0.0.1:0");
        let connecting = endpoint
            .connect_with(config.clone(), relay, "localhost")
            .unwrap();
        first.await.unwrap();
        stalled.push((endpoint, connecting));
    }

    let started = std::time::Instant::now();
    let refused = client("127.0.0.1:0")
        .connect_with(config.clone(), proxy.addr, "localhost")
        .unwrap()
        .await
        .expect_err("a fourth handshake from the same address is refused");
    assert!(
        matches!(
            &refused,
            quinn::ConnectionError::ConnectionClosed(c)
                if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED
        ),
        "{refused}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    // Another address (all of 127/8 is loopback) has its own share.
    let other = client("127.0.0.2:0")
        .connect_with(config, proxy.addr, "localhost")
        .unwrap();
    let conn = tokio::time::timeout(Duration::from_secs(10), other)
        .await
        .expect("not hanging")
        .expect("another source completes its handshake");
    conn.close(0u32.into(), b"done");
    drop(stalled);
}

/// Enrollment needs no certificate, so finishing TLS proves nothing: connections that
/// completed TLS and then sit still count against their source until their exchange ends.
#[tokio::test]
async fn enrollment_connections_that_sit_after_tls_count_against_their_source() {
    let proxy = TestProxy::start_with(|b| b.max_handshakes_per_source(4)).await;
    let config = Arc::new(
        revproxy::tls::pinned_client_config(vec![proxy.pin()], &[revproxy::tls::ALPN_HTTP1])
            .unwrap(),
    );
    let mut sitting = Vec::new();
    for _ in 0..4 {
        let tls = tls_to_agent_port(&proxy, &config).await.unwrap();
        sitting.push(tls); // TLS done; no request ever follows
    }
    let (_idle, closed_after) = one_more_than(proxy.addr, 0).await;
    assert!(
        closed_after < Duration::from_secs(2),
        "a fifth connection from one source waited {closed_after:?}"
    );
    drop(sitting);
}

/// Sends `count` requests for `host` and returns what each answered first (its tag).
async fn tags(proxy: &TestProxy, host: &str, count: usize) -> Vec<String> {
    let mut seen = Vec::new();
    for _ in 0..count {
        let back = round_trip(proxy.http, &http_head(host), b"").await.unwrap();
        let text = String::from_utf8_lossy(&back).to_string();
        seen.push(text.split(':').next().unwrap_or_default().to_string());
    }
    seen
}

/// An agent granted `*.example.com` must not take a share of the traffic of another
/// agent's exact `app.example.com` (DESIGN.md section 5: the most specific match wins);
/// it still serves the names only it covers.
async fn an_exact_agent_wins_over_a_wildcard_agent(t: Transport) {
    let proxy = TestProxy::start().await;
    let exact = echo_backend(b"exact:").await;
    let wild = echo_backend(b"wild:").await;
    let exact_dir = enroll_agent(&proxy, "app", &["app.example.com"]).await;
    let wild_dir = enroll_agent(&proxy, "catchall", &["*.example.com"]).await;
    let _exact = start_agent(exact_dir.path(), &[("app.example.com", exact)], on(t));
    let _wild = start_agent(wild_dir.path(), &[("*.example.com", wild)], on(t));
    proxy.wait_for("app.example.com", 2).await;
    proxy.wait_for("other.example.com", 1).await;

    let seen = tags(&proxy, "app.example.com", 12).await;
    assert!(seen.iter().all(|tag| tag == "exact"), "{seen:?}");
    let seen = tags(&proxy, "other.example.com", 3).await;
    assert!(seen.iter().all(|tag| tag == "wild"), "{seen:?}");
}

/// A static route for the exact name comes before a wildcard agent.
async fn a_static_route_wins_over_a_wildcard_agent(t: Transport) {
    let fixed = echo_backend(b"static:").await;
    let proxy =
        TestProxy::start_with(move |b| b.route("app.example.com", &fixed.to_string())).await;
    let wild = echo_backend(b"wild:").await;
    let wild_dir = enroll_agent(&proxy, "catchall", &["*.example.com"]).await;
    let _wild = start_agent(wild_dir.path(), &[("*.example.com", wild)], on(t));
    proxy.wait_for("app.example.com", 1).await;

    let seen = tags(&proxy, "app.example.com", 6).await;
    assert!(seen.iter().all(|tag| tag == "static"), "{seen:?}");
}

/// When no agent can serve a name, the client is told that and a connection id, and none
/// of what the log knows: agent names, backend addresses, errors from inside.
async fn a_refused_client_learns_nothing_internal(t: Transport) {
    let proxy = TestProxy::start().await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let dir = enroll_agent(&proxy, "secret-agent-name", &["app.example.com"]).await;
    let _agent = start_agent(dir.path(), &[("app.example.com", dead)], on(t));
    proxy.wait_for("app.example.com", 1).await;

    let back = round_trip(proxy.http, &http_head("app.example.com"), b"")
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&back);
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(!text.contains("secret-agent-name"), "{text}");
    assert!(!text.contains(&dead.port().to_string()), "{text}");
    assert!(!text.to_lowercase().contains("refused"), "{text}");
    let id = text
        .lines()
        .find_map(|l| l.strip_prefix("revproxy-connection-id: "))
        .unwrap_or_else(|| panic!("no connection id in {text}"));
    assert_eq!(id.len(), 16, "{id}");
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
}

over_both_transports!(
    a_certificate_signed_by_the_ca_but_never_issued_is_refused,
    a_live_tunnel_closes_when_its_certificate_expires,
    an_exact_agent_wins_over_a_wildcard_agent,
    a_static_route_wins_over_a_wildcard_agent,
    a_refused_client_learns_nothing_internal,
    one_identity_holds_at_most_a_few_tunnels,
);
