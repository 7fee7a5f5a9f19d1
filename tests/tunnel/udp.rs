//! Granted UDP ports (DESIGN.md section 11): each client address on the port is a flow to
//! the agent's backend, its datagrams on QUIC datagrams or capsules on a stream, answers
//! back to the address that sent. Real DNS (`dnsmasq`, `dig`) and real UDP load
//! (`iperf3 -u`, whose control connection needs the same port granted for TCP) go through
//! it as well as the test's own sockets.

use super::*;
use revproxy::proxy::UdpLimits;
use tokio::net::UdpSocket;

/// A port free for both UDP and TCP on 127.0.0.1 a moment ago (granted ports cannot be
/// ones the kernel picks: the grant names them).
fn free_udp_port() -> u16 {
    loop {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

use super::ports::{proxy_granting_with as proxy_granting, LOOPBACK};

/// A client socket of its own (its own source port) talking to the granted port.
async fn client(port: u16) -> UdpSocket {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.connect((LOOPBACK, port)).await.unwrap();
    socket
}

/// Sends `payload` and waits up to `wait` for one answer.
async fn ask(socket: &UdpSocket, payload: &[u8], wait: Duration) -> Option<Vec<u8>> {
    socket.send(payload).await.ok()?;
    let mut buf = vec![0u8; 65_536];
    match tokio::time::timeout(wait, socket.recv(&mut buf)).await {
        Ok(Ok(n)) => Some(buf[..n].to_vec()),
        _ => None,
    }
}

/// Whether a new client on the port gets an answer now.
async fn answered(port: u16) -> bool {
    let socket = client(port).await;
    ask(&socket, b"probe", Duration::from_millis(500))
        .await
        .is_some()
}

/// A port, a proxy granting it with `limits`, agent `dns` enrolled with `udp:PORT` and
/// started on `t` against an echo backend tagged `re:`; returns once the port answers.
async fn serving(
    t: Transport,
    limits: UdpLimits,
) -> (u16, TestProxy, TestAgent, tempfile::TempDir) {
    let port = free_udp_port();
    let proxy = proxy_granting(port, limits).await;
    let name = format!("udp:{port}");
    let dir = enroll_agent(&proxy, "dns", &[&name]).await;
    let backend = udp_echo(b"re:").await;
    let agent = start_agent(dir.path(), &[(name.as_str(), backend)], on(t));
    eventually("the granted UDP port answers", || answered(port)).await;
    (port, proxy, agent, dir)
}

async fn each_client_address_is_a_flow_with_its_own_answers(t: Transport) {
    let (port, _proxy, _agent, _dir) = serving(t, UdpLimits::default()).await;
    // Twenty clients at once, fifty exchanges each: every answer is to its own question
    // (the first of a flow rides with its stream's open; the rest QUIC datagrams on QUIC).
    let mut clients = tokio::task::JoinSet::new();
    for c in 0..20 {
        clients.spawn(async move {
            let socket = client(port).await;
            let mut lost = 0;
            for i in 0..50 {
                let question = format!("client {c} question {i}");
                match ask(&socket, question.as_bytes(), Duration::from_secs(2)).await {
                    Some(answer) => assert_eq!(answer, format!("re:{question}").into_bytes()),
                    None => lost += 1,
                }
            }
            lost
        });
    }
    let lost: usize = clients.join_all().await.iter().sum();
    assert!(lost <= 2, "{lost} of 1000 exchanges lost on loopback");

    // Datagrams larger than a QUIC datagram can hold go as capsules, whole.
    let socket = client(port).await;
    for len in [1, 1400, 9000, 60_000] {
        let big = pattern(len, len as u64);
        let answer = ask(&socket, &big, WAIT).await.expect("answered");
        assert!(
            answer.len() == len + 3 && answer[3..] == big[..],
            "{len} bytes"
        );
    }
}

async fn revocation_silences_a_granted_udp_port_within_three_seconds(t: Transport) {
    let (port, proxy, _agent, _dir) = serving(t, UdpLimits::default()).await;
    let open = client(port).await;
    assert!(ask(&open, b"before", WAIT).await.is_some());
    proxy
        .ca
        .revoke_certs("dns", time::OffsetDateTime::now_utc())
        .unwrap();
    let revoked = std::time::Instant::now();
    eventually_within(
        Duration::from_secs(3),
        "the port is silent after the revocation",
        || async {
            let quiet = ask(&open, b"after", Duration::from_millis(200))
                .await
                .is_none();
            quiet && !answered(port).await
        },
    )
    .await;
    assert!(revoked.elapsed() < Duration::from_secs(3));
}

async fn flows_are_bounded_per_source_and_idle_out(t: Transport) {
    let limits = UdpLimits {
        idle: Duration::from_secs(1),
        flows: 100,
        per_source: 2,
    };
    let (port, _proxy, _agent, _dir) = serving(t, limits).await;
    // From 127.0.0.2, a source apart from the readiness probes' 127.0.0.1: two flows fit,
    // a third not.
    let from_other_source = || async {
        let socket = UdpSocket::bind("127.0.0.2:0").await.unwrap();
        socket.connect((LOOPBACK, port)).await.unwrap();
        socket
    };
    let (a, b, c) = (
        from_other_source().await,
        from_other_source().await,
        from_other_source().await,
    );
    assert!(ask(&a, b"a", WAIT).await.is_some());
    assert!(ask(&b, b"b", WAIT).await.is_some());
    assert_eq!(
        ask(&c, b"c", Duration::from_millis(500)).await,
        None,
        "a third flow from the same source is dropped"
    );
    // Once the two idle out, the third client is a flow like any.
    eventually("a new flow fits once the others idled out", || async {
        ask(&c, b"c", Duration::from_millis(300)).await.is_some()
    })
    .await;
}

async fn dig_asks_dnsmasq_through_a_granted_udp_port(t: Transport) {
    let dns_port = free_udp_port();
    let _dnsmasq = Killed(
        std::process::Command::new(tool("dnsmasq"))
            .args([
                "--keep-in-foreground",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--listen-address=127.0.0.1",
                "--user=root",
                "--pid-file=",
                &format!("--port={dns_port}"),
                "--address=/game.revproxy.test/192.0.2.77",
            ])
            .spawn()
            .expect("dnsmasq runs"),
    );
    let port = free_udp_port();
    let proxy = proxy_granting(port, UdpLimits::default()).await;
    let name = format!("udp:{port}");
    let dir = enroll_agent(&proxy, "dns", &[&name]).await;
    let backend: SocketAddr = format!("127.0.0.1:{dns_port}").parse().unwrap();
    let _agent = start_agent(dir.path(), &[(name.as_str(), backend)], on(t));
    let dig = move |tries: &str| {
        let output = std::process::Command::new(tool("dig"))
            .args([
                "@127.0.0.1",
                "-p",
                &port.to_string(),
                "game.revproxy.test",
                "A",
                "+short",
                tries,
                "+time=2",
            ])
            .output()
            .expect("dig runs");
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    };
    // dig blocks: it runs beside the runtime the proxy and agent run on.
    let ask = move || async move {
        tokio::task::spawn_blocking(move || dig("+tries=1"))
            .await
            .unwrap()
    };
    eventually("dnsmasq answers through the port", || async {
        ask().await == "192.0.2.77"
    })
    .await;
    // Two hundred queries, each dig from a source port of its own: each a new flow.
    let mut lost = 0;
    for _ in 0..200 {
        if ask().await != "192.0.2.77" {
            lost += 1;
        }
    }
    assert!(lost <= 1, "{lost} of 200 queries unanswered");
}

async fn iperf3_pushes_100_mbit_through_with_at_most_one_percent_lost(t: Transport) {
    let server_port = free_udp_port();
    let _server = Killed(
        std::process::Command::new(tool("iperf3"))
            .args(["-s", "-B", "127.0.0.1", "-p", &server_port.to_string()])
            .stdout(std::process::Stdio::null())
            // It says so when the readiness probe connects and sends nothing.
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("iperf3 runs"),
    );
    // Listening is checked without connecting: iperf3 takes any connection for a test's
    // control connection, and a probe's would race the real one.
    let bound = |port: u16| async move { std::net::TcpListener::bind((LOOPBACK, port)).is_err() };
    eventually("the iperf3 server listens", || bound(server_port)).await;
    // iperf3 speaks TCP (control) and UDP (data) on one port number: both granted.
    let port = free_udp_port();
    let proxy = proxy_granting(port, UdpLimits::default()).await;
    let (tcp, udp) = (format!("tcp:{port}"), format!("udp:{port}"));
    let dir = enroll_agent(&proxy, "perf", &[&tcp, &udp]).await;
    let backend: SocketAddr = format!("127.0.0.1:{server_port}").parse().unwrap();
    let _agent = start_agent(
        dir.path(),
        &[(tcp.as_str(), backend), (udp.as_str(), backend)],
        on(t),
    );
    eventually("the granted TCP port is listened on", || bound(port)).await;
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(tool("iperf3"))
            .args(["-c", "127.0.0.1", "-p", &port.to_string()])
            .args(["-u", "-b", "100M", "-l", "1200", "-t", "3", "--json"])
            .output()
            .expect("iperf3 runs")
    })
    .await
    .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "iperf3's report ({e}): {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    let sum = &report["end"]["sum"];
    let (lost, packets) = (sum["lost_packets"].as_f64(), sum["packets"].as_f64());
    let (Some(lost), Some(packets)) = (lost, packets) else {
        panic!("no loss figures in iperf3's report: {report}");
    };
    assert!(
        packets > 20_000.0,
        "{packets} datagrams sent in 3 s at 100 Mbit/s"
    );
    let percent = 100.0 * lost / packets;
    eprintln!("iperf3 -u -b 100M over {t:?}: {lost} of {packets} datagrams lost ({percent:.3}%)");
    assert!(
        percent <= 1.0,
        "{lost} of {packets} datagrams lost ({percent:.2}%)"
    );
}

async fn a_flow_moves_to_another_agent_when_its_own_is_narrowed_away(t: Transport) {
    let port = free_udp_port();
    let proxy = proxy_granting(port, UdpLimits::default()).await;
    let name = format!("udp:{port}");
    let (dir_a, dir_b) = (
        enroll_agent(&proxy, "left", &[&name]).await,
        enroll_agent(&proxy, "right", &[&name]).await,
    );
    let (left, right) = (udp_echo(b"left:").await, udp_echo(b"right:").await);
    let _a = start_agent(dir_a.path(), &[(name.as_str(), left)], on(t));
    let _b = start_agent(dir_b.path(), &[(name.as_str(), right)], on(t));
    assert!(proxy.status.wait_for_tunnels(&name, 2, WAIT).await);
    // The port opens once the registry says a tunnel serves it: a datagram before that
    // finds it closed (and the connected client socket an ICMP error).
    eventually("the granted UDP port answers", || answered(port)).await;
    let socket = client(port).await;
    let first = ask(&socket, b"x", WAIT).await.expect("answered");
    let (from, other) = match first.starts_with(b"left:") {
        true => ("left", "right:"),
        false => ("right", "left:"),
    };
    // Narrowed away from the agent that has the flow: the same client address goes on,
    // now to the other agent.
    proxy.ca.set_hosts(from, &[]).unwrap();
    eventually(
        "the flow moved to the agent still holding the port",
        || async {
            let answer = ask(&socket, b"x", Duration::from_millis(300)).await;
            answer.is_some_and(|a| a.starts_with(other.as_bytes()))
        },
    )
    .await;
}

over_both_transports!(
    a_flow_moves_to_another_agent_when_its_own_is_narrowed_away,
    each_client_address_is_a_flow_with_its_own_answers,
    revocation_silences_a_granted_udp_port_within_three_seconds,
    flows_are_bounded_per_source_and_idle_out,
    dig_asks_dnsmasq_through_a_granted_udp_port,
    iperf3_pushes_100_mbit_through_with_at_most_one_percent_lost,
);
