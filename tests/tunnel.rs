//! The main job, end to end: public clients reach backends behind agents through h2 and
//! QUIC tunnels (each test runs over both), routed by SNI, Host, or a fixed port; and every fault the proxy must survive.
//! Real proxy, real agents, real TLS, real backends, all on 127.0.0.1:0.

mod common;
#[path = "tunnel/ports.rs"]
mod ports;
#[path = "tunnel/refusals.rs"]
mod refusals;
#[path = "tunnel/udp.rs"]
mod udp;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use revproxy::proxy::{ListenerKind, Target};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(10);

/// A TLS server for `name` that echoes; and a client config that trusts it.
async fn tls_echo_backend(name: &str) -> (SocketAddr, Arc<rustls::ClientConfig>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec![name.to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let provider = revproxy::tls::provider();
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let (mut rd, mut wr) = tokio::io::split(tls);
                let _ = tokio::io::copy(&mut rd, &mut wr).await;
                let _ = wr.shutdown().await;
            });
        }
    });
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der().clone()).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    (addr, Arc::new(client))
}

async fn read_all_within(tcp: &mut TcpStream, limit: Duration) -> Vec<u8> {
    let mut buf = Vec::new();
    tokio::time::timeout(limit, tcp.read_to_end(&mut buf))
        .await
        .expect("the proxy left the connection hanging")
        .ok();
    buf
}

async fn sni_routes_end_to_end_tls_through_the_tunnel(t: Transport) {
    let proxy = TestProxy::start().await;
    let (backend, client_config) = tls_echo_backend("app.example.com").await;
    let dir = enroll_agent(&proxy, "web-1", &["app.example.com"]).await;
    let _agent = start_agent(dir.path(), &[("app.example.com", backend)], on(t));
    proxy.wait_for("app.example.com", 1).await;

    let tcp = TcpStream::connect(proxy.sni).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(client_config);
    let mut tls = connector
        .connect("app.example.com".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let data = pattern(300_000, 1);
    tls.write_all(&data).await.unwrap();
    let mut back = vec![0; data.len()];
    tls.read_exact(&mut back).await.unwrap();
    assert!(
        back == data,
        "TLS bytes came back intact through SNI routing"
    );
}

async fn host_routing_replays_the_peeked_head_exactly_and_half_closes(t: Transport) {
    let proxy = TestProxy::start().await;
    let backend = echo_backend(b"").await;
    let dir = enroll_agent(&proxy, "web-1", &["app.example.com"]).await;
    let _agent = start_agent(dir.path(), &[("app.example.com", backend)], on(t));
    proxy.wait_for("app.example.com", 1).await;

    let head =
        b"POST /upload HTTP/1.1\r\nHost: App.Example.com:8080\r\nContent-Length: 100000\r\n\r\n";
    let body = pattern(100_000, 2);
    let back = round_trip(proxy.http, head, &body).await.unwrap();
    let mut expected = head.to_vec();
    expected.extend_from_slice(&body);
    assert!(
        back == expected,
        "the backend saw exactly what the client sent, head included"
    );
}

async fn fixed_listeners_and_static_routes(t: Transport) {
    let backend = echo_backend(b"agent:").await;
    let static_backend = echo_backend(b"static:").await;
    let fixed_name = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let fixed_tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (name_addr, tcp_addr) = (
        fixed_name.local_addr().unwrap(),
        fixed_tcp.local_addr().unwrap(),
    );
    let proxy = TestProxy::start_with(move |b| {
        b.listener(
            fixed_name,
            ListenerKind::Fixed(Target::Name("ssh.example.com".into())),
        )
        .listener(
            fixed_tcp,
            ListenerKind::Fixed(Target::Tcp(static_backend.to_string())),
        )
        .route("legacy.example.com", &static_backend.to_string())
    })
    .await;
    let dir = enroll_agent(&proxy, "box", &["ssh.example.com"]).await;
    let _agent = start_agent(dir.path(), &[("ssh.example.com", backend)], on(t));
    proxy.wait_for("ssh.example.com", 1).await;

    assert_eq!(
        round_trip(name_addr, b"", b"hello").await.unwrap(),
        b"agent:hello"
    );
    assert_eq!(
        round_trip(tcp_addr, b"", b"hello").await.unwrap(),
        b"static:hello"
    );
    let head = http_head("legacy.example.com");
    let back = round_trip(proxy.http, &head, b"").await.unwrap();
    assert!(
        back.starts_with(b"static:GET / HTTP/1.1"),
        "{}",
        String::from_utf8_lossy(&back)
    );
}

async fn wildcard_grants_route_one_label(t: Transport) {
    let proxy = TestProxy::start().await;
    let backend = echo_backend(b"wild:").await;
    let dir = enroll_agent(&proxy, "apps", &["*.apps.example.com"]).await;
    let _agent = start_agent(dir.path(), &[("*.apps.example.com", backend)], on(t));
    proxy.wait_for("a.apps.example.com", 1).await;

    let back = round_trip(proxy.http, &http_head("blog.apps.example.com"), b"")
        .await
        .unwrap();
    assert!(
        back.starts_with(b"wild:GET"),
        "{}",
        String::from_utf8_lossy(&back)
    );
    let back = round_trip(proxy.http, &http_head("a.b.apps.example.com"), b"")
        .await
        .unwrap();
    assert!(
        back.starts_with(b"HTTP/1.1 502"),
        "{}",
        String::from_utf8_lossy(&back)
    );
}

#[tokio::test]
async fn no_route_gets_an_alert_or_a_502_and_an_offline_agent_a_503() {
    let proxy = TestProxy::start().await;
    // Granted to an agent that never connects: offline.
    let _dir = enroll_agent(&proxy, "sleepy", &["sleepy.example.com"]).await;

    let back = round_trip(proxy.http, &http_head("nobody.example.com"), b"")
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&back);
    assert!(text.starts_with("HTTP/1.1 502 Bad Gateway"), "{text}");
    assert!(
        text.ends_with("no route for nobody.example.com\n"),
        "{text}"
    );

    let back = round_trip(proxy.http, &http_head("sleepy.example.com"), b"")
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&back);
    assert!(
        text.starts_with("HTTP/1.1 503 Service Unavailable"),
        "{text}"
    );
    assert!(text.contains("offline"), "{text}");

    // A real TLS client asking for an unknown name gets unrecognized_name.
    let (_, client_config) = tls_echo_backend("nobody.example.com").await;
    let tcp = TcpStream::connect(proxy.sni).await.unwrap();
    let err = tokio_rustls::TlsConnector::from(client_config)
        .connect("nobody.example.com".try_into().unwrap(), tcp)
        .await
        .unwrap_err();
    assert!(format!("{err:?}").contains("UnrecognisedName"), "{err:?}");
}

async fn several_agents_share_a_name_and_a_killed_one_fails_over(t: Transport) {
    let proxy = TestProxy::start().await;
    let backend_a = echo_backend(b"A").await;
    let backend_b = echo_backend(b"B").await;
    let dir_a = enroll_agent(&proxy, "a", &["app.example.com"]).await;
    let dir_b = enroll_agent(&proxy, "b", &["app.example.com"]).await;
    let agent_a = start_agent(dir_a.path(), &[("app.example.com", backend_a)], on(t));
    let _agent_b = start_agent(dir_b.path(), &[("app.example.com", backend_b)], on(t));
    proxy.wait_for("app.example.com", 2).await;

    let mut seen = std::collections::HashSet::new();
    for _ in 0..6 {
        let back = round_trip(proxy.http, &http_head("app.example.com"), b"")
            .await
            .unwrap();
        seen.insert(back[0]);
    }
    assert_eq!(seen.len(), 2, "streams are spread across both agents");

    // A long transfer in flight on agent A (we find one by retrying until A answers).
    let mut on_a = loop {
        let mut tcp = TcpStream::connect(proxy.http).await.unwrap();
        tcp.write_all(&http_head("app.example.com")).await.unwrap();
        let mut tag = [0u8; 1];
        tcp.read_exact(&mut tag).await.unwrap();
        if &tag == b"A" {
            break tcp;
        }
    };
    on_a.write_all(&pattern(100_000, 3)).await.unwrap();
    agent_a.kill();
    // Its client sees the connection end, it does not hang.
    read_all_within(&mut on_a, WAIT).await;

    proxy.wait_for("app.example.com", 1).await;
    for _ in 0..4 {
        let back = round_trip(proxy.http, &http_head("app.example.com"), b"")
            .await
            .unwrap();
        assert_eq!(back[0], b'B', "the name failed over to the live agent");
    }
}

async fn early_bytes_refused_by_one_agent_reach_the_next_intact(t: Transport) {
    // The proxy sends the peeked head with the CONNECT, before the agent answers. Agent
    // A's backend refuses connections, so A refuses every stream after receiving those
    // bytes; each client must still reach B with its head and body exact, once.
    let proxy = TestProxy::start().await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let backend_b = echo_backend(b"B").await;
    let dir_a = enroll_agent(&proxy, "a", &["app.example.com"]).await;
    let dir_b = enroll_agent(&proxy, "b", &["app.example.com"]).await;
    let _agent_a = start_agent(dir_a.path(), &[("app.example.com", dead)], on(t));
    let _agent_b = start_agent(dir_b.path(), &[("app.example.com", backend_b)], on(t));
    proxy.wait_for("app.example.com", 2).await;

    for i in 0..6 {
        let head =
            format!("POST /{i} HTTP/1.1\r\nHost: app.example.com\r\nContent-Length: 70000\r\n\r\n");
        let body = pattern(70_000, 10 + i);
        let back = round_trip(proxy.http, head.as_bytes(), &body)
            .await
            .unwrap();
        let mut expected = b"B".to_vec();
        expected.extend_from_slice(head.as_bytes());
        expected.extend_from_slice(&body);
        assert!(back == expected, "connection {i} reached B byte-exact");
    }
}

async fn the_agent_reconnects_after_a_proxy_restart(t: Transport) {
    let mut proxy = TestProxy::start().await;
    let backend = echo_backend(b"").await;
    let dir = enroll_agent(&proxy, "web-1", &["app.example.com"]).await;
    let _agent = start_agent(dir.path(), &[("app.example.com", backend)], on(t));
    proxy.wait_for("app.example.com", 1).await;

    proxy.restart().await;
    let back_at = Instant::now();
    proxy.wait_for("app.example.com", 1).await;
    let back = round_trip(proxy.http, &http_head("app.example.com"), b"x")
        .await
        .unwrap();
    assert!(back.ends_with(b"\r\n\r\nx"));
    eprintln!(
        "serving again {:?} after the proxy came back",
        back_at.elapsed()
    );
}

async fn a_client_that_never_reads_does_not_stall_the_others(t: Transport) {
    let proxy = TestProxy::start().await;
    let backend = echo_backend(b"").await;
    let dir = enroll_agent(&proxy, "web-1", &["app.example.com"]).await;
    let _agent = start_agent(dir.path(), &[("app.example.com", backend)], on(t));
    proxy.wait_for("app.example.com", 1).await;

    // The stalled client keeps sending and never reads: its echo piles up until its own
    // stream's window is full.
    let mut stalled = TcpStream::connect(proxy.http).await.unwrap();
    stalled
        .write_all(&http_head("app.example.com"))
        .await
        .unwrap();
    let flood = tokio::spawn(async move {
        let chunk = pattern(64 * 1024, 4);
        let mut sent = 0usize;
        while sent < 256 * 1024 * 1024 {
            match tokio::time::timeout(Duration::from_secs(2), stalled.write_all(&chunk)).await {
                Ok(Ok(())) => sent += chunk.len(),
                _ => break, // blocked by back pressure: as intended
            }
        }
        (stalled, sent)
    });

    let http = proxy.http;
    let transfers: Vec<_> = (0..8)
        .map(|i| {
            tokio::spawn(async move {
                let data = pattern(4 * 1024 * 1024, 10 + i);
                let back = round_trip(http, &http_head("app.example.com"), &data)
                    .await
                    .unwrap();
                back.ends_with(&data)
            })
        })
        .collect();
    for t in transfers {
        let ok = tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("a transfer stalled behind the client that never reads")
            .unwrap();
        assert!(ok, "bytes arrived intact");
    }
    let (_stalled, sent) = flood.await.unwrap();
    assert!(
        sent < 256 * 1024 * 1024,
        "the stalled client was held back by flow control"
    );
}

async fn two_hundred_concurrent_connections_of_mixed_sizes_arrive_byte_exact(t: Transport) {
    let proxy = TestProxy::start().await;
    let backend = echo_backend(b"").await;
    let dir = enroll_agent(&proxy, "web-1", &["app.example.com"]).await;
    let _agent = start_agent(dir.path(), &[("app.example.com", backend)], on(t));
    proxy.wait_for("app.example.com", 1).await;

    let sizes = [1usize, 100, 4 * 1024, 64 * 1024, 1024 * 1024];
    let http = proxy.http;
    let clients: Vec<_> = (0..200u64)
        .map(|i| {
            // Two connections carry 64 MiB each; the rest cycle through smaller sizes.
            let size = if i < 2 {
                64 * 1024 * 1024
            } else {
                sizes[i as usize % sizes.len()]
            };
            tokio::spawn(async move {
                let data = pattern(size, i);
                let head = http_head("app.example.com");
                let back = round_trip(http, &head, &data).await.unwrap();
                (
                    checksum(&back[head.len()..]),
                    checksum(&data),
                    back.len() - head.len(),
                    size,
                )
            })
        })
        .collect();
    for c in clients {
        let (got, want, len, size) = tokio::time::timeout(Duration::from_secs(120), c)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((len, got), (size, want));
    }
}

fn checksum(bytes: &[u8]) -> u64 {
    // FNV-1a: enough to catch a lost, duplicated or reordered byte.
    bytes.iter().fold(0xcbf29ce484222325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100000001b3)
    })
}

async fn a_stopping_agent_drains_open_streams_and_takes_no_new_ones(t: Transport) {
    let proxy = TestProxy::start().await;
    let backend = echo_backend(b"").await;
    let dir = enroll_agent(&proxy, "web-1", &["app.example.com"]).await;
    let agent = start_agent(dir.path(), &[("app.example.com", backend)], on(t));
    proxy.wait_for("app.example.com", 1).await;

    let mut open = TcpStream::connect(proxy.http).await.unwrap();
    let head = http_head("app.example.com");
    open.write_all(&head).await.unwrap();
    let mut echoed = vec![0; head.len()];
    open.read_exact(&mut echoed).await.unwrap();

    let stopping = agent.begin_stop();
    // New clients are told the agent is gone (the first may race the agent's GOAWAY and
    // be turned away by the agent itself; either way it gets a 503)...
    let (mut refused, mut tries) = (false, 0);
    while !refused || proxy.status.tunnels_for("app.example.com") > 0 {
        tries += 1;
        assert!(tries < 500, "the draining tunnel kept taking streams");
        let back = round_trip(proxy.http, &http_head("app.example.com"), b"")
            .await
            .unwrap();
        if back.starts_with(b"HTTP/1.1 503") {
            refused = true;
        } else {
            // Served: the stop has not reached the agent yet. Never after a refusal.
            assert!(
                !refused,
                "served after being refused: {}",
                String::from_utf8_lossy(&back)
            );
        }
    }
    // ...while the open stream still works to its end, its last bytes included: the
    // tunnel closes once the stream is done, and that must not cut the tail.
    let tail = pattern(4 << 20, 7);
    let (mut rd, mut wr) = open.into_split();
    let writer = {
        let tail = tail.clone();
        tokio::spawn(async move {
            wr.write_all(&tail).await.unwrap();
            wr.shutdown().await.unwrap();
        })
    };
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, rd.read_to_end(&mut rest))
        .await
        .expect("the drained stream ends")
        .unwrap();
    assert!(
        rest == tail,
        "all {} bytes echoed, got {}",
        tail.len(),
        rest.len()
    );
    writer.await.unwrap();
    tokio::time::timeout(WAIT, stopping)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

over_both_transports!(
    sni_routes_end_to_end_tls_through_the_tunnel,
    host_routing_replays_the_peeked_head_exactly_and_half_closes,
    fixed_listeners_and_static_routes,
    wildcard_grants_route_one_label,
    several_agents_share_a_name_and_a_killed_one_fails_over,
    early_bytes_refused_by_one_agent_reach_the_next_intact,
    the_agent_reconnects_after_a_proxy_restart,
    a_client_that_never_reads_does_not_stall_the_others,
    two_hundred_concurrent_connections_of_mixed_sizes_arrive_byte_exact,
    a_stopping_agent_drains_open_streams_and_takes_no_new_ones,
);
