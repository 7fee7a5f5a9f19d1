//! The admin listeners of a real proxy and a real agent: metrics that move while a stream
//! is open, every metric after a scripted scenario (checked by Prometheus' own parser),
//! readiness that follows the tunnel, the status page in headless Chromium, and what the
//! listener refuses.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const WAIT: Duration = Duration::from_secs(10);

/// A backend that, once a client has said anything, sends 64 KiB chunks until the client
/// goes away: a download that lasts as long as the test wants.
async fn endless_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut head = [0u8; 1024];
                if tcp.read(&mut head).await.unwrap_or(0) == 0 {
                    return;
                }
                let chunk = vec![7u8; 64 * 1024];
                while tcp.write_all(&chunk).await.is_ok() {}
            });
        }
    });
    addr
}

/// Reads exactly `n` bytes.
async fn take(tcp: &mut TcpStream, n: usize) {
    let mut buf = vec![0u8; 256 * 1024];
    let mut left = n;
    while left > 0 {
        let want = left.min(buf.len());
        let got = tokio::time::timeout(WAIT, tcp.read(&mut buf[..want]))
            .await
            .expect("the download goes on")
            .unwrap();
        assert!(got > 0, "the download ended early");
        left -= got;
    }
}

async fn byte_counters_move_while_a_long_transfer_is_open(t: Transport) {
    let (admin, admin_addr) = local_listener();
    let proxy = TestProxy::start_with(|b| b.admin_listener(admin)).await;
    let backend = endless_backend().await;
    let dir = enroll_agent(&proxy, "web-1", &["app.example.com"]).await;
    let (agent_admin, agent_admin_addr) = local_listener();
    let _agent = start_agent(dir.path(), &[("app.example.com", backend)], move |b| {
        b.transport(t).admin_listener(agent_admin)
    });
    proxy.wait_for("app.example.com", 1).await;

    let mut client = TcpStream::connect(proxy.http).await.unwrap();
    client
        .write_all(&http_head("app.example.com"))
        .await
        .unwrap();
    const MIB: f64 = 1024.0 * 1024.0;
    let host = r#"host="app.example.com""#;
    let service = r#"service="app.example.com""#;
    let mut last = (0.0, 0.0);
    for round in 1..=3 {
        take(&mut client, 4 << 20).await;
        // The stream is still open: the client has not closed, the backend never stops.
        // The proxy counts a write once its system call returned, which on a busy machine
        // can be a moment after the client already read the bytes; the agent reads on as
        // the window the client's reads freed reaches it. Both catch up.
        let counts = || async {
            let (_, proxy_metrics) = admin_get(admin_addr, "/metrics").await;
            let (_, agent_metrics) = admin_get(agent_admin_addr, "/metrics").await;
            let sent = sample(&proxy_metrics, "revproxy_sent_bytes_total", host).unwrap();
            let from_backend = sample(
                &agent_metrics,
                "revproxy_agent_received_bytes_total",
                service,
            )
            .unwrap();
            (proxy_metrics, agent_metrics, sent, from_backend)
        };
        eventually("both counters moved on", || async {
            let (_, _, sent, from_backend) = counts().await;
            sent >= round as f64 * 4.0 * MIB && sent > last.0 && from_backend > last.1
        })
        .await;
        let (proxy_metrics, agent_metrics, sent, from_backend) = counts().await;
        assert!(
            from_backend >= sent,
            "round {round}: {from_backend} < {sent}"
        );
        last = (sent, from_backend);
        assert_eq!(
            sample(&proxy_metrics, "revproxy_open_streams", host),
            Some(1.0)
        );
        assert_eq!(
            sample(&agent_metrics, "revproxy_agent_open_streams", service),
            Some(1.0)
        );
    }
    drop(client);
    eventually("the stream is counted closed", || async {
        let (_, m) = admin_get(admin_addr, "/metrics").await;
        sample(&m, "revproxy_open_streams", host) == Some(0.0)
    })
    .await;
}

over_both_transports!(byte_counters_move_while_a_long_transfer_is_open);

/// Every metric the proxy and the agent document, after a scenario that exercises each:
/// enroll (and a failed enrollment), serve, refuse for each reason, renew, revoke.
#[tokio::test]
async fn every_metric_appears_after_a_scripted_scenario_and_passes_promtool() {
    let echo = echo_backend(b"").await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let (admin, admin_addr) = local_listener();
    let proxy = TestProxy::start_with(|b| {
        b.admin_listener(admin)
            .route("static.example.com", &echo.to_string())
    })
    .await;

    // Enrollment: one that works (over the network), one with a token nobody minted.
    let dir = enroll_agent(&proxy, "web-1", &["app.example.com", "dead.example.com"]).await;
    let (_, bogus) = enroll_body(&proxy.token_for(
        "ghost",
        &["ghost.example.com"],
        time::OffsetDateTime::now_utc(),
        Duration::from_secs(60),
    ));
    let bogus = bogus.replace(
        &bogus[bogus.find("\"token_id\":\"").unwrap() + 12..][..16],
        "0000000000000000",
    );
    let (status, _) = post_raw(proxy.addr, proxy.pin(), bogus.into_bytes()).await;
    assert_eq!(status, 404);
    // An agent granted a name but never started: its name is offline.
    let _idle = enroll_agent(&proxy, "idle", &["idle.example.com"]).await;

    let (agent_admin, agent_admin_addr) = local_listener();
    let agent = start_agent(
        dir.path(),
        &[("app.example.com", echo), ("dead.example.com", dead)],
        move |b| b.admin_listener(agent_admin),
    );
    proxy.wait_for("app.example.com", 1).await;

    // Served through the agent, and by the static route.
    for _ in 0..3 {
        let back = round_trip(proxy.http, &http_head("app.example.com"), b"hi")
            .await
            .unwrap();
        assert!(back.ends_with(b"hi"));
    }
    let back = round_trip(proxy.http, &http_head("static.example.com"), b"st")
        .await
        .unwrap();
    assert!(back.ends_with(b"st"));
    // Refused: no route, offline, and an agent whose backend is down.
    for (name, status) in [
        ("nowhere.example.com", "502"),
        ("idle.example.com", "503"),
        ("dead.example.com", "503"),
    ] {
        let back = round_trip(proxy.http, &http_head(name), b"").await.unwrap();
        let text = String::from_utf8_lossy(&back);
        assert!(
            text.starts_with(&format!("HTTP/1.1 {status}")),
            "{name}: {text}"
        );
    }
    // A renewal.
    let due = issue_identity(
        &proxy.ca,
        proxy.addr,
        "old-1",
        &["old.example.com"],
        time::OffsetDateTime::now_utc() - time::Duration::hours(17),
        Duration::from_secs(24 * 3600),
    );
    let id = revproxy::agent::Identity::load(due.path()).unwrap();
    revproxy::agent::renew_once(&id, due.path()).await.unwrap();

    let (_, agent_metrics) = admin_get(agent_admin_addr, "/metrics").await;
    let (_, proxy_before) = admin_get(admin_addr, "/metrics").await;
    assert_eq!(
        sample(
            &proxy_before,
            "revproxy_tunnels",
            r#"agent="web-1",transport="h2""#
        ),
        Some(1.0)
    );

    // Revocation: the tunnel closes, the agent's reconnects are refused.
    proxy
        .ca
        .revoke_certs("web-1", time::OffsetDateTime::now_utc())
        .unwrap();
    assert!(
        proxy
            .status
            .wait_for_tunnels("app.example.com", 0, WAIT)
            .await
    );
    eventually("the agent's reconnect is refused", || async {
        let (_, m) = admin_get(admin_addr, "/metrics").await;
        sample(
            &m,
            "revproxy_tunnel_refusals_total",
            r#"reason="certificate""#,
        )
        .is_some()
    })
    .await;
    let (_, agent_after) = admin_get(agent_admin_addr, "/metrics").await;
    drop(agent);
    let (status, proxy_metrics) = admin_get(admin_addr, "/metrics").await;
    assert_eq!(status, 200);

    let p = |name: &str, labels: &str| sample(&proxy_metrics, name, labels);
    let http = format!(r#"listener="{}""#, proxy.http);
    let now = time::OffsetDateTime::now_utc().unix_timestamp() as f64;
    assert_eq!(
        p(
            "revproxy_build_info",
            &format!(r#"version="{}""#, env!("CARGO_PKG_VERSION"))
        ),
        Some(1.0)
    );
    assert!(p("revproxy_start_time_seconds", "").unwrap() <= now);
    assert!(p("revproxy_connections_accepted_total", &http).unwrap() >= 7.0);
    assert_eq!(
        p(
            "revproxy_connections_routed_total",
            r#"host="app.example.com""#
        ),
        Some(3.0)
    );
    assert_eq!(
        p(
            "revproxy_connections_routed_total",
            r#"host="static.example.com""#
        ),
        Some(1.0)
    );
    for reason in ["no_route", "offline", "unavailable"] {
        assert_eq!(
            p(
                "revproxy_connections_refused_total",
                &format!(r#"reason="{reason}""#)
            ),
            Some(1.0),
            "{reason}"
        );
    }
    assert!(p("revproxy_stream_open_seconds_count", r#"transport="h2""#).unwrap() >= 3.0);
    assert!(p("revproxy_stream_open_seconds_sum", r#"transport="h2""#).unwrap() > 0.0);
    assert!(p("revproxy_received_bytes_total", r#"host="app.example.com""#).unwrap() >= 6.0);
    assert!(p("revproxy_sent_bytes_total", r#"host="app.example.com""#).unwrap() >= 6.0);
    assert_eq!(
        p("revproxy_open_streams", r#"host="app.example.com""#),
        Some(0.0)
    );
    assert_eq!(
        p("revproxy_tunnel_connects_total", r#"transport="h2""#),
        Some(1.0)
    );
    assert_eq!(
        p("revproxy_tunnel_disconnects_total", r#"reason="revoked""#),
        Some(1.0)
    );
    assert_eq!(p("revproxy_revocations_total", ""), Some(1.0));
    assert_eq!(
        p("revproxy_enrollments_total", r#"outcome="ok""#),
        Some(2.0)
    );
    assert_eq!(
        p("revproxy_enrollments_total", r#"outcome="unknown_token""#),
        Some(1.0)
    );
    assert_eq!(p("revproxy_renewals_total", r#"outcome="ok""#), Some(1.0));
    let idle_expiry = p(
        "revproxy_agent_certificate_expiry_timestamp_seconds",
        r#"agent="idle""#,
    )
    .unwrap();
    assert!(idle_expiry > now + 23.0 * 3600.0, "{idle_expiry}");
    // web-1 is revoked: no valid certificate, no expiry to watch.
    assert_eq!(
        p(
            "revproxy_agent_certificate_expiry_timestamp_seconds",
            r#"agent="web-1""#
        ),
        None
    );
    // Tunnels up is a gauge of what is up now: none, after the revocation.
    assert_eq!(
        sample(
            &proxy_metrics,
            "revproxy_tunnels",
            r#"agent="web-1",transport="h2""#
        ),
        None
    );

    let a = |name: &str, labels: &str| sample(&agent_metrics, name, labels);
    let app = r#"service="app.example.com""#;
    assert_eq!(a("revproxy_agent_streams_total", app), Some(3.0));
    assert_eq!(a("revproxy_agent_open_streams", app), Some(0.0));
    assert!(a("revproxy_agent_sent_bytes_total", app).unwrap() >= 6.0);
    assert!(a("revproxy_agent_received_bytes_total", app).unwrap() >= 6.0);
    assert_eq!(
        a("revproxy_agent_backend_dial_seconds_count", app),
        Some(3.0)
    );
    assert!(
        a(
            "revproxy_agent_backend_dial_errors_total",
            r#"service="dead.example.com""#
        )
        .unwrap()
            >= 1.0
    );
    assert!(
        a(
            "revproxy_agent_streams_refused_total",
            r#"reason="dial_failed""#
        )
        .unwrap()
            >= 1.0
    );
    assert_eq!(a("revproxy_agent_tunnels", r#"transport="h2""#), Some(1.0));
    assert_eq!(
        a("revproxy_agent_tunnel_connects_total", r#"transport="h2""#),
        Some(1.0)
    );
    assert!(a("revproxy_agent_certificate_expiry_timestamp_seconds", "").unwrap() > now);
    assert!(
        sample(
            &agent_after,
            "revproxy_agent_tunnel_connect_failures_total",
            r#"transport="h2""#
        )
        .unwrap()
            >= 1.0
    );

    // Prometheus' own parser and linter accept both expositions.
    for (who, text) in [
        ("proxy", &proxy_before),
        ("proxy", &proxy_metrics),
        ("agent", &agent_after),
    ] {
        let mut check = std::process::Command::new(tool("promtool"))
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write as _;
        check
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = check.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool on the {who}'s metrics: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The agent is ready while a tunnel is up, and says so on `/ready` as the proxy goes away
/// and comes back; the proxy is ready while it serves.
#[tokio::test]
async fn ready_follows_the_agents_tunnel() {
    let (admin, admin_addr) = local_listener();
    let mut proxy = TestProxy::start_with(|b| b.admin_listener(admin)).await;
    assert_eq!(
        admin_get(admin_addr, "/ready").await,
        (200, "ready\n".into())
    );
    assert_eq!(admin_get(admin_addr, "/healthz").await.0, 200);
    let dir = enroll_agent(&proxy, "web-1", &["app.example.com"]).await;
    let backend = echo_backend(b"").await;
    let (agent_admin, agent_admin_addr) = local_listener();
    let _agent = start_agent(dir.path(), &[("app.example.com", backend)], move |b| {
        b.admin_listener(agent_admin)
    });
    let ready = |want: u16| async move { admin_get(agent_admin_addr, "/ready").await.0 == want };
    eventually("the agent is ready", || ready(200)).await;

    proxy.pause().await;
    eventually("the agent is not ready without a proxy", || ready(503)).await;
    let (_, why) = admin_get(agent_admin_addr, "/ready").await;
    assert!(why.contains("no tunnel"), "{why}");
    assert_eq!(admin_get(agent_admin_addr, "/healthz").await.0, 200);

    proxy.resume().await;
    eventually("the agent is ready again", || ready(200)).await;
}

/// What the admin listener will not do on loopback: answer for another host name (DNS
/// rebinding) or take anything but GET; its page loads nothing from elsewhere.
#[tokio::test]
async fn the_admin_listener_refuses_foreign_hosts_and_other_methods() {
    let (admin, admin_addr) = local_listener();
    let proxy = TestProxy::start_with(|b| b.admin_listener(admin)).await;
    let raw = |request: String| async move {
        let mut tcp = TcpStream::connect(admin_addr).await.unwrap();
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        tokio::time::timeout(WAIT, tcp.read_to_string(&mut answer))
            .await
            .unwrap()
            .unwrap();
        answer
    };
    let foreign =
        raw("GET /status HTTP/1.1\r\nhost: evil.example:7444\r\nconnection: close\r\n\r\n".into())
            .await;
    assert!(foreign.starts_with("HTTP/1.1 421"), "{foreign}");
    assert!(!foreign.contains("agents"), "{foreign}");
    // No Host at all: a load balancer's HTTP/1.0 probe is answered; HTTP/1.1 must name one.
    let probe = raw("GET /ready HTTP/1.0\r\n\r\n".into()).await;
    assert!(probe.starts_with("HTTP/1.0 200"), "{probe}");
    let hostless = raw("GET /status HTTP/1.1\r\nconnection: close\r\n\r\n".into()).await;
    assert!(!hostless.contains("agents"), "{hostless}");
    let post = raw(format!("POST /status HTTP/1.1\r\nhost: {admin_addr}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")).await;
    assert!(post.starts_with("HTTP/1.1 405"), "{post}");
    let page =
        raw("GET / HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n".to_string()).await;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(
        page.to_lowercase()
            .contains("content-security-policy: default-src 'none'"),
        "{page}"
    );
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "no external assets"
    );
    let missing = admin_get(admin_addr, "/nope").await;
    assert_eq!(missing.0, 404);

    // Beyond loopback it is TLS for operators only: see
    // `beyond_loopback_only_operator_certificates_get_in`.
    drop(proxy);
}

/// The status page, drawn by a real browser: the connected agent, its transport and its
/// names appear once the page has fetched `/status`.
#[tokio::test]
async fn the_status_page_shows_the_connected_agents_in_chromium() {
    let (admin, admin_addr) = local_listener();
    let proxy = TestProxy::start_with(|b| b.admin_listener(admin)).await;
    let backend = echo_backend(b"").await;
    let dir = enroll_agent(&proxy, "web-1", &["app.example.com"]).await;
    let _agent = start_agent(dir.path(), &[("app.example.com", backend)], |b| b);
    proxy.wait_for("app.example.com", 1).await;
    round_trip(proxy.http, &http_head("app.example.com"), b"x")
        .await
        .unwrap();

    let profile = tempfile::tempdir().unwrap();
    let shot = profile.path().join("status.png");
    let url = format!("http://{admin_addr}/");
    let chromium = tool("chromium");
    let run = |extra: Vec<String>| {
        let profile = profile.path().to_path_buf();
        let url = url.clone();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(chromium)
                .args([
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--virtual-time-budget=5000",
                ])
                .arg(format!("--user-data-dir={}", profile.display()))
                .args(extra)
                .arg(url)
                .output()
                .unwrap()
        })
    };
    let dom = run(vec!["--dump-dom".into()]).await.unwrap();
    let dom = String::from_utf8_lossy(&dom.stdout);
    assert!(
        dom.contains(r#"data-loaded="yes""#),
        "the page drew /status: {dom}"
    );
    assert!(dom.contains("<td>web-1</td>"), "{dom}");
    assert!(dom.contains("<td>app.example.com</td>"), "{dom}");
    assert!(dom.contains("<td>h2</td>"), "{dom}");

    let out = run(vec![
        format!("--screenshot={}", shot.display()),
        "--window-size=1200,640".into(),
    ])
    .await
    .unwrap();
    let png = std::fs::read(&shot)
        .unwrap_or_else(|_| panic!("no screenshot: {}", String::from_utf8_lossy(&out.stderr)));
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    assert!(
        png.len() > 10_000,
        "a drawn page, not a blank one: {} bytes",
        png.len()
    );
}

/// With access logging on, each client connection is one info line: connection id,
/// peer, name, who served it, the outcome and the bytes each way; without it, none.
#[tokio::test]
async fn the_access_log_has_one_line_per_connection() {
    let (_guard, mut logs) = watch_logs(tracing::Level::INFO);
    let proxy = TestProxy::start_with(|b| b.access_log(true)).await;
    let backend = echo_backend(b"").await;
    let dir = enroll_agent(&proxy, "web-1", &["app.example.com"]).await;
    let _agent = start_agent(dir.path(), &[("app.example.com", backend)], |b| b);
    proxy.wait_for("app.example.com", 1).await;

    let head = http_head("app.example.com");
    round_trip(proxy.http, &head, b"12345").await.unwrap();
    let served = log_line(&mut logs, "revproxy::access").await;
    for field in [
        "conn=",
        "peer=127.0.0.1:",
        "host=app.example.com",
        "agent=web-1",
        "outcome=ok",
        &format!("up={}", head.len() + 5),
        &format!("down={}", head.len() + 5),
        "ms=",
    ] {
        assert!(served.contains(field), "{field} in {served}");
    }
    round_trip(proxy.http, &http_head("nowhere.example.com"), b"")
        .await
        .unwrap();
    let refused = log_line(&mut logs, "revproxy::access").await;
    assert!(refused.contains("host=nowhere.example.com"), "{refused}");
    assert!(refused.contains("outcome=no_route"), "{refused}");
}

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
