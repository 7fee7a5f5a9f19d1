//! Granted public ports (DESIGN.md section 11): a port in the agent's certificate and
//! grant is listened on while the agent is connected, and every connection there is a
//! stream to it. The port is the grant, so it cannot be one the kernel picks: each test
//! takes a port that was free a moment ago (`free_port`) as the proxy's whole range.

use super::*;
use revproxy::ca::ports::PortRange;
use std::net::IpAddr;

pub(super) const LOOPBACK: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

/// A proxy that may grant exactly `port`, listening for it on 127.0.0.1.
async fn proxy_granting(port: u16) -> TestProxy {
    proxy_granting_with(port, revproxy::proxy::UdpLimits::default()).await
}

/// [`proxy_granting`], with UDP flows bounded by `limits`.
pub(super) async fn proxy_granting_with(
    port: u16,
    limits: revproxy::proxy::UdpLimits,
) -> TestProxy {
    TestProxy::start_with(move |b| {
        b.granted_ports(
            PortRange {
                low: port,
                high: port,
            },
            LOOPBACK,
        )
        .udp_limits(limits)
    })
    .await
}

/// A port free a moment ago, a proxy that may grant it, its served name `tcp:PORT`, and
/// agent `game` enrolled with it (not started).
async fn game_granted_a_port() -> (u16, TestProxy, String, tempfile::TempDir) {
    let port = free_port("127.0.0.1");
    let proxy = proxy_granting(port).await;
    let name = format!("tcp:{port}");
    let dir = enroll_agent(&proxy, "game", &[&name]).await;
    (port, proxy, name, dir)
}

/// Whether something listens on 127.0.0.1:`port` now.
async fn listening(port: u16) -> bool {
    TcpStream::connect((LOOPBACK, port)).await.is_ok()
}

async fn a_granted_port_carries_a_mebibyte_and_follows_its_grant_and_agent(t: Transport) {
    let (port, proxy, name, dir) = game_granted_a_port().await;
    let backend = echo_backend(b"").await;
    assert!(
        !listening(port).await,
        "no listener before an agent holding the port is connected"
    );

    let agent = start_agent(dir.path(), &[(name.as_str(), backend)], on(t));
    eventually("the granted port is listened on", || listening(port)).await;
    let data = pattern(1 << 20, 31);
    let back = round_trip(SocketAddr::new(LOOPBACK, port), b"", &data)
        .await
        .unwrap();
    assert!(
        back == data,
        "1 MiB echoed byte-exact ({} bytes back)",
        back.len()
    );
    assert_eq!(proxy.status.tunnels_for(&name), 1);

    // Narrowed away (`agent set-hosts game`): the port closes; granted again, it opens.
    proxy.ca.set_hosts("game", &[]).unwrap();
    eventually_within(
        Duration::from_secs(3),
        "the port closes once narrowed away",
        || async { !listening(port).await },
    )
    .await;
    proxy
        .ca
        .set_hosts("game", std::slice::from_ref(&name))
        .unwrap();
    eventually("the port opens again once granted again", || {
        listening(port)
    })
    .await;
    let back = round_trip(SocketAddr::new(LOOPBACK, port), b"", b"again")
        .await
        .unwrap();
    assert_eq!(back, b"again");

    agent.stop().await;
    eventually_within(
        Duration::from_secs(3),
        "the port closes once its agent left",
        || async { !listening(port).await },
    )
    .await;
}

async fn revocation_closes_a_granted_port_within_three_seconds(t: Transport) {
    let (port, proxy, name, dir) = game_granted_a_port().await;
    let backend = echo_backend(b"up:").await;
    let _agent = start_agent(dir.path(), &[(name.as_str(), backend)], on(t));
    eventually("the granted port is listened on", || listening(port)).await;
    let mut open = TcpStream::connect((LOOPBACK, port)).await.unwrap();
    open.write_all(b"x").await.unwrap();
    let mut echoed = [0u8; 4];
    open.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"up:x");

    proxy
        .ca
        .revoke_certs("game", time::OffsetDateTime::now_utc())
        .unwrap();
    eventually_within(
        Duration::from_secs(3),
        "the port closes after the revocation",
        || async { !listening(port).await },
    )
    .await;
    // The open connection went with the tunnel.
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(WAIT, open.read_to_end(&mut rest)).await;
    assert!(
        ended.is_ok(),
        "the open connection ended with the revoked tunnel"
    );
}

over_both_transports!(
    a_granted_port_carries_a_mebibyte_and_follows_its_grant_and_agent,
    revocation_closes_a_granted_port_within_three_seconds,
);

#[tokio::test]
async fn a_port_outside_the_range_or_without_one_is_refused_at_token_create() {
    let without = TestProxy::start().await;
    let err = without
        .ca
        .create_token(&port_token(2222), time::OffsetDateTime::now_utc())
        .expect_err("refused: no proxy grants ports");
    assert!(err.to_string().contains("ports = \"LOW-HIGH\""), "{err}");

    let proxy = TestProxy::start_with(|b| {
        b.granted_ports(
            PortRange {
                low: 20000,
                high: 20099,
            },
            LOOPBACK,
        )
    })
    .await;
    let err = proxy
        .ca
        .create_token(&port_token(80), time::OffsetDateTime::now_utc())
        .expect_err("refused: outside the range");
    let text = err.to_string();
    assert!(
        text.contains("port 80") && text.contains("20000-20099"),
        "{text}"
    );
    let mut udp = port_token(20042);
    udp.hosts = vec!["udp:53".into()];
    let err = proxy
        .ca
        .create_token(&udp, time::OffsetDateTime::now_utc())
        .expect_err("refused: a UDP port outside the range");
    assert!(err.to_string().contains("port 53"), "{err}");
    let before = proxy
        .ca
        .list_tokens(time::OffsetDateTime::now_utc())
        .unwrap();
    assert!(before.is_empty(), "a refused token is not recorded");
    proxy
        .ca
        .create_token(&port_token(20042), time::OffsetDateTime::now_utc())
        .expect("inside the range");
    // Narrowing keeps to the range too.
    let err = proxy
        .ca
        .set_hosts("nobody", &["tcp:80".into()])
        .unwrap_err();
    assert!(err.to_string().contains("20000-20099"), "{err}");
}

fn port_token(port: u16) -> revproxy::ca::NewToken {
    revproxy::ca::NewToken {
        agent: "game".into(),
        hosts: vec![format!("tcp:{port}")],
        private_hosts: Vec::new(),
        connect: Vec::new(),
        ttl: Duration::from_secs(3600),
        cert_ttl: Duration::from_secs(24 * 3600),
        server: Some("127.0.0.1:1".into()),
    }
}

#[tokio::test]
async fn mapping_a_port_the_certificate_does_not_grant_is_a_startup_error() {
    let (port, _proxy, _, dir) = game_granted_a_port().await;
    let other = if port == u16::MAX { port - 1 } else { port + 1 };
    // Another TCP port, and the granted port's number for UDP (granted for TCP only).
    for (name, flag) in [
        (format!("tcp:{other}"), format!("--tcp-port {other}")),
        (format!("udp:{port}"), format!("--udp-port {port}")),
    ] {
        let err = revproxy::Agent::builder(dir.path())
            .service(&name, "127.0.0.1:1")
            .build()
            .err()
            .expect("refused");
        let text = err.to_string();
        assert!(
            text.contains(&format!("does not authorize {name}")) && text.contains(&flag),
            "{text}"
        );
    }
}
