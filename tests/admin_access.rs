//! Who gets into the admin listener, and how much any one client can hold: beyond
//! loopback only operator certificates; clients that pipeline and never read, or that
//! take every slot, stop neither it nor the probes and scrapers behind them.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Longest any one step here waits.
const WAIT: Duration = Duration::from_secs(10);

/// Writes an operator certificate for `name` from `proxy`'s CA into a new directory, as
/// `revproxy operator create` does.
fn operator_dir(proxy: &TestProxy, name: &str) -> tempfile::TempDir {
    use revproxy::admin::client::{OPERATOR_CA_FILE, OPERATOR_CERT_FILE, OPERATOR_KEY_FILE};
    let issued = proxy
        .ca
        .create_operator(
            name,
            Duration::from_secs(3600),
            time::OffsetDateTime::now_utc(),
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(OPERATOR_CERT_FILE), &issued.cert_pem).unwrap();
    std::fs::write(dir.path().join(OPERATOR_KEY_FILE), &issued.key_pem).unwrap();
    std::fs::write(dir.path().join(OPERATOR_CA_FILE), &issued.ca_pem).unwrap();
    dir
}

/// Beyond loopback the admin listener speaks TLS and lets in operator certificates the
/// CA issued and nobody revoked: not plain HTTP, not a client without a certificate, not
/// an agent's certificate (same CA), not a revoked operator. curl, as an operator's
/// scraper would, gets in with the operator's files.
#[tokio::test]
async fn beyond_loopback_only_operator_certificates_get_in() {
    let public = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    public.set_nonblocking(true).unwrap();
    let port = public.local_addr().unwrap().port();
    let proxy =
        TestProxy::start_with(|b| b.admin_listener(TcpListener::from_std(public).unwrap())).await;
    let url = format!("https://127.0.0.1:{port}");
    let alice = operator_dir(&proxy, "alice");

    let target = revproxy::admin::client::Target::new(&url, Some(alice.path())).unwrap();
    let (status, body) = revproxy::admin::client::get_from(&target, "/status")
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert!(body.contains(r#""role": "proxy""#), "{body}");

    // Off the test's thread: the proxy runs on it.
    let curl = |args: Vec<String>| async move {
        tokio::task::spawn_blocking(move || {
            std::process::Command::new("curl")
                .args(["-sS", "--max-time", "10"])
                .args(args)
                .output()
                .unwrap()
        })
        .await
        .unwrap()
    };
    let file = |dir: &tempfile::TempDir, name: &str| dir.path().join(name).display().to_string();
    let with_cert = |dir: &tempfile::TempDir| {
        vec![
            "--cacert".to_string(),
            file(&alice, "ca.crt"),
            "--cert".into(),
            file(dir, "operator.crt"),
            "--key".into(),
            file(dir, "operator.key"),
            format!("{url}/metrics"),
        ]
    };
    let out = curl(with_cert(&alice)).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("revproxy_build_info"));

    // No client certificate: the handshake fails.
    let out = curl(vec![
        "--cacert".into(),
        file(&alice, "ca.crt"),
        format!("{url}/metrics"),
    ])
    .await;
    assert!(!out.status.success());
    assert!(!String::from_utf8_lossy(&out.stdout).contains("revproxy_"));
    // Plain HTTP to a TLS listener gets nothing useful.
    let plain = revproxy::admin::client::get(&format!("127.0.0.1:{port}"), "/metrics").await;
    assert!(!matches!(plain, Ok((s, _)) if s == 200), "{plain:?}");
    // An agent's certificate chains to the same CA, but is not an operator's.
    let agent = enroll_agent(&proxy, "web-1", &["app.example.com"]).await;
    let agent_files = tempfile::tempdir().unwrap();
    std::fs::copy(
        agent.path().join("agent.crt"),
        agent_files.path().join("operator.crt"),
    )
    .unwrap();
    std::fs::copy(
        agent.path().join("agent.key"),
        agent_files.path().join("operator.key"),
    )
    .unwrap();
    let out = curl(with_cert(&agent_files)).await;
    assert!(!out.status.success(), "an agent certificate got in");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("revproxy_"));

    // A connection kept alive across the revocation, as a scraper keeps one.
    let kept = {
        let issued = std::fs::read_to_string(alice.path().join("operator.crt")).unwrap();
        let key = std::fs::read_to_string(alice.path().join("operator.key")).unwrap();
        let config = revproxy::tls::agent_client_config(
            vec![proxy.pin()],
            &issued,
            &key,
            &[revproxy::tls::ALPN_HTTP1],
        )
        .unwrap();
        let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
            .connect("localhost".try_into().unwrap(), tcp)
            .await
            .unwrap();
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        sender
    };
    let mut kept = kept;
    let ask = |sender: &mut hyper::client::conn::http1::SendRequest<
        http_body_util::Empty<bytes::Bytes>,
    >| {
        let request = http::Request::get("/status")
            .header("host", "localhost")
            .body(http_body_util::Empty::new())
            .unwrap();
        sender.send_request(request)
    };
    assert_eq!(ask(&mut kept).await.unwrap().status(), 200);

    // Revoked: out within the state watch's second.
    proxy
        .ca
        .revoke_operator("alice", time::OffsetDateTime::now_utc())
        .unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if revproxy::admin::client::get_from(&target, "/status")
            .await
            .is_err()
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the revoked operator still gets in"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The connection that was already open is refused at its next request.
    let refused = ask(&mut kept).await.unwrap();
    assert_eq!(refused.status(), 403);
    // Another operator is not affected.
    let bob = operator_dir(&proxy, "bob");
    let out = curl(with_cert(&bob)).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A TCP connection to `to` from the loopback address `source` (all of 127.0.0.0/8 is this
/// machine's: one local user can open connections from many source addresses).
async fn connect_from(source: std::net::Ipv4Addr, to: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind((source, 0).into()).unwrap();
    socket.connect(to).await.unwrap()
}

/// As [`connect_from`], with a receive buffer too small to grow: a client that does not
/// read holds only a few KiB of answers in its own kernel.
async fn stalling_from(source: std::net::Ipv4Addr, to: SocketAddr) -> TcpStream {
    /// The smallest receive buffer worth asking for; the kernel rounds it up.
    const STALLER_WINDOW: u32 = 4 * 1024;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(STALLER_WINDOW).unwrap();
    socket.bind((source, 0).into()).unwrap();
    socket.connect(to).await.unwrap()
}

/// Reads what the listener sends on `tcp` until it closes the connection (an orderly close
/// or a reset), within `within`.
async fn read_until_closed(tcp: &mut TcpStream, within: Duration) -> String {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    tokio::time::timeout(within, async {
        while let Ok(n @ 1..) = tcp.read(&mut buf).await {
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("the admin listener closes the connection");
    String::from_utf8_lossy(&got).into_owned()
}

/// One local user opens more connections than the admin listener holds, from several
/// loopback addresses, each pipelining a thousand requests and reading nothing. A
/// health probe and a scrape that come next are still answered within a few seconds, and
/// each of those connections got at most one answer before the listener closed it: answers
/// never pile up for a client that does not read them.
#[tokio::test]
async fn clients_that_pipeline_and_never_read_do_not_stop_the_admin_listener() {
    /// More than the listener's 32 slots, from addresses holding 8 each.
    const STALLERS: usize = 40;
    /// Requests each sends at once: a few dozen KiB the kernel takes whole, whose answers
    /// (the status page, 6.5 KiB each: megabytes) fill any socket buffer.
    const PIPELINED: usize = 1000;
    /// What "within a few seconds" means for the probe and the scrape.
    const ANSWERED_WITHIN: Duration = Duration::from_secs(5);
    let (admin, admin_addr) = local_listener();
    let _proxy = TestProxy::start_with(|b| b.admin_listener(admin)).await;

    let requests = "GET / HTTP/1.1\r\nhost: localhost\r\n\r\n".repeat(PIPELINED);
    let mut stallers = Vec::new();
    for i in 0..STALLERS {
        let source = std::net::Ipv4Addr::new(127, 0, 0, 2 + (i / 8) as u8);
        let mut tcp = stalling_from(source, admin_addr).await;
        // The kernel takes the requests whole (they fit its buffers); nobody reads answers.
        tokio::time::timeout(WAIT, tcp.write_all(requests.as_bytes()))
            .await
            .unwrap()
            .ok();
        stallers.push(tcp);
    }

    let answered = |path: &'static str| async move {
        let started = tokio::time::Instant::now();
        loop {
            // A refused attempt ends at once; the probe tries again as a scraper would.
            if let Ok((status, body)) =
                revproxy::admin::client::get(&admin_addr.to_string(), path).await
            {
                return (status.as_u16(), body);
            }
            assert!(
                started.elapsed() < ANSWERED_WITHIN,
                "{path} not answered within {ANSWERED_WITHIN:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let ready = tokio::time::timeout(ANSWERED_WITHIN, answered("/ready"))
        .await
        .expect("/ready is answered within a few seconds");
    assert_eq!(ready, (200, "ready\n".into()));
    let (status, metrics) = tokio::time::timeout(ANSWERED_WITHIN, answered("/metrics"))
        .await
        .expect("/metrics is answered within a few seconds");
    assert_eq!(status, 200);
    assert!(metrics.contains("revproxy_build_info"), "{metrics}");

    for (i, staller) in stallers.iter_mut().enumerate() {
        let got = read_until_closed(staller, WAIT).await;
        let answers = got.matches("HTTP/1.1 200").count();
        assert!(
            answers <= 1,
            "staller {i} got {answers} answers queued for it"
        );
    }
}

/// Every slot held by connections that say nothing: a new client is refused at once
/// (closed, counted), never left waiting, and once the holders leave a fresh client is
/// served again. An address holding its share (8) is refused the same way.
#[tokio::test]
async fn a_full_admin_listener_refuses_at_once_and_serves_again() {
    /// The listener's slots, taken 8 per address.
    const SLOTS: usize = 32;
    /// How soon a client learns it is refused (or is served).
    const DECIDED_WITHIN: Duration = Duration::from_secs(2);
    let (admin, admin_addr) = local_listener();
    let _proxy = TestProxy::start_with(|b| b.admin_listener(admin)).await;

    let mut holders = Vec::new();
    for i in 0..SLOTS {
        let source = std::net::Ipv4Addr::new(127, 0, 0, 2 + (i / 8) as u8);
        holders.push(connect_from(source, admin_addr).await);
    }
    let probe = |source: std::net::Ipv4Addr| async move {
        let mut tcp = connect_from(source, admin_addr).await;
        tcp.write_all(b"GET /ready HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
            .await
            .ok();
        read_until_closed(&mut tcp, DECIDED_WITHIN).await
    };
    // The holders are taken in turn, before any later client: this one is refused.
    let refused = probe(std::net::Ipv4Addr::LOCALHOST).await;
    assert_eq!(
        refused, "",
        "a client beyond the slots is closed without an answer"
    );
    // A ninth connection from an address that holds eight: refused too.
    let ninth = probe(std::net::Ipv4Addr::new(127, 0, 0, 2)).await;
    assert_eq!(ninth, "");

    drop(holders);
    eventually("a fresh client is served once the holders left", || async {
        probe(std::net::Ipv4Addr::LOCALHOST)
            .await
            .starts_with("HTTP/1.1 200")
    })
    .await;
    let (_, metrics) = admin_get(admin_addr, "/metrics").await;
    assert!(
        sample(&metrics, "revproxy_admin_refused_total", r#"reason="full""#).unwrap() >= 1.0,
        "{metrics}"
    );
    assert!(
        sample(
            &metrics,
            "revproxy_admin_refused_total",
            r#"reason="source_limit""#
        )
        .unwrap()
            >= 1.0,
        "{metrics}"
    );
}
