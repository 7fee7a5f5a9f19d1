//! What the proxy refuses while serving everyone else: malformed clients, tunnels with a
//! certificate from another CA, expired, revoked or missing, and an agent mapping a name
//! its certificate does not grant.

use super::*;

async fn malformed_clients_are_closed_and_everyone_else_is_served(t: Transport) {
    let proxy = TestProxy::start_with(|b| b.peek_timeout(Duration::from_secs(1))).await;
    let backend = echo_backend(b"ok:").await;
    let dir = enroll_agent(&proxy, "web-1", &["app.example.com"]).await;
    let _agent = start_agent(dir.path(), &[("app.example.com", backend)], on(t));
    proxy.wait_for("app.example.com", 1).await;

    // A slowloris client on each public port: one byte a second, forever.
    let slow = |addr: SocketAddr, bytes: &'static [u8]| {
        tokio::spawn(async move {
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            let started = Instant::now();
            for b in bytes {
                if tcp.write_all(&[*b]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            read_all_within(&mut tcp, WAIT).await;
            started.elapsed()
        })
    };
    let slow_sni = slow(
        proxy.sni,
        &[
            0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03, 0, 0, 0, 0, 0, 0, 0,
        ],
    );
    let slow_http = slow(proxy.http, b"GET / HTTP/1.1\r\nHost: app.exa");

    let truncated_hello = [
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ];
    let garbage_lengths = [
        0x16, 0x03, 0x01, 0x00, 0x30, 0x01, 0x00, 0x00, 0x2c, 0x03, 0x03, 0xff, 0xff, 0xff, 0xff,
    ];
    let cases: Vec<(SocketAddr, Vec<u8>)> = vec![
        (proxy.sni, truncated_hello.to_vec()),
        (proxy.sni, garbage_lengths.to_vec()),
        (
            proxy.sni,
            b"GET / HTTP/1.1\r\nHost: app.example.com\r\n\r\n".to_vec(),
        ),
        (
            proxy.http,
            [
                b"GET / HTTP/1.1\r\nHost: app.example.com\r\nX: ".to_vec(),
                vec![b'a'; 20 * 1024],
            ]
            .concat(),
        ),
        (
            proxy.http,
            b"GET / HTTP/1.1\r\nHost: a.example.com\r\nHost: app.example.com\r\n\r\n".to_vec(),
        ),
        (proxy.http, vec![0x16, 0x03, 0x01, 0x00, 0x10]),
    ];
    for (addr, bytes) in cases {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        let _ = tcp.write_all(&bytes).await;
        let _ = tcp.shutdown().await;
        let reply = read_all_within(&mut tcp, WAIT).await;
        assert!(
            !reply.starts_with(b"ok:"),
            "a malformed client never reaches a backend"
        );
        // Meanwhile everyone else is served.
        let back = round_trip(proxy.http, &http_head("app.example.com"), b"!")
            .await
            .unwrap();
        assert!(back.starts_with(b"ok:GET"));
    }
    for s in [slow_sni, slow_http] {
        let held = s.await.unwrap();
        assert!(
            held < Duration::from_secs(5),
            "a slow client is cut off at the peek timeout ({held:?})"
        );
    }
}

async fn certificates_from_another_ca_expired_revoked_or_missing_are_refused(t: Transport) {
    let proxy = TestProxy::start().await;
    let backend = echo_backend(b"").await;

    // Another CA's agent, pointed at this proxy.
    let other = TestProxy::start().await;
    let foreign = enroll_agent(&other, "mallory", &["app.example.com"]).await;
    let _foreign = start_agent(foreign.path(), &[("app.example.com", backend)], |b| {
        b.transport(t).server(&proxy.addr.to_string())
    });

    // An agent whose certificate expired an hour ago.
    let three_hours_ago = time::OffsetDateTime::now_utc() - time::Duration::hours(3);
    let expired_dir = issue_identity(
        &proxy.ca,
        proxy.addr,
        "old",
        &["app.example.com"],
        three_hours_ago,
        Duration::from_secs(3600),
    );
    // Its own clock is three hours slow, so it believes the certificate is still good and
    // tries: the proxy, on the right time, must refuse it.
    let slow_clock = Arc::new(TestClock::default());
    slow_clock.set_offset(-3 * 3600);
    let _expired = start_agent(expired_dir.path(), &[("app.example.com", backend)], |b| {
        b.transport(t).clock(slow_clock)
    });

    // A revoked agent.
    let revoked_dir = enroll_agent(&proxy, "fired", &["app.example.com"]).await;
    proxy
        .ca
        .revoke_certs("fired", time::OffsetDateTime::now_utc())
        .unwrap();
    let _revoked = start_agent(revoked_dir.path(), &[("app.example.com", backend)], on(t));

    // No certificate at all, asking for a tunnel.
    let pins = vec![proxy.pin()];
    match t {
        Transport::H2 => {
            let config =
                revproxy::tls::pinned_client_config(pins, &[revproxy::tls::ALPN_H2]).unwrap();
            let tcp = TcpStream::connect(proxy.addr).await.unwrap();
            let outcome = match tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect("localhost".try_into().unwrap(), tcp)
                .await
            {
                Err(_) => Vec::new(),
                Ok(mut tls) => {
                    let mut buf = Vec::new();
                    let _ = tokio::time::timeout(WAIT, tls.read_to_end(&mut buf))
                        .await
                        .expect("closed, not hanging");
                    buf
                }
            };
            assert!(outcome.is_empty(), "no tunnel without a certificate");
        }
        _ => {
            let config =
                revproxy::tls::pinned_client_config(pins, &[revproxy::tls::ALPN_QUIC]).unwrap();
            let config = revproxy::tls::quic_client_config(config);
            let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
            let attempt = endpoint
                .connect_with(config, proxy.addr, "localhost")
                .unwrap();
            let refused = match tokio::time::timeout(WAIT, attempt)
                .await
                .expect("not hanging")
            {
                Err(e) => e.to_string(),
                // The handshake may complete on the client before the server's check.
                Ok(conn) => tokio::time::timeout(WAIT, conn.closed())
                    .await
                    .expect("closed, not hanging")
                    .to_string(),
            };
            assert!(
                refused.contains("certificate"),
                "refused for the missing certificate: {refused}"
            );
        }
    }

    // A legitimate agent still gets in; none of the others ever did.
    let good = enroll_agent(&proxy, "good", &["app.example.com"]).await;
    let _good = start_agent(good.path(), &[("app.example.com", backend)], on(t));
    proxy.wait_for("app.example.com", 1).await;
    for _ in 0..5 {
        round_trip(proxy.http, &http_head("app.example.com"), b"")
            .await
            .unwrap();
    }
    assert_eq!(
        proxy.status.tunnels_for("app.example.com"),
        1,
        "only the good agent has a tunnel"
    );
}

#[tokio::test]
async fn a_map_name_outside_the_certificate_is_a_startup_error() {
    let proxy = TestProxy::start().await;
    let dir = enroll_agent(&proxy, "web-1", &["app.example.com"]).await;
    let err = revproxy::Agent::builder(dir.path())
        .service("admin.example.com", "127.0.0.1:1")
        .build()
        .err()
        .expect("refused");
    let text = err.to_string();
    assert!(
        text.contains("does not authorize admin.example.com"),
        "{text}"
    );
    assert!(text.contains("app.example.com"), "{text}");
}

over_both_transports!(
    malformed_clients_are_closed_and_everyone_else_is_served,
    certificates_from_another_ca_expired_revoked_or_missing_are_refused,
);
