//! The admin listeners of a real proxy and a real agent: metrics that move while a stream
//! is open, every metric after a scripted scenario (checked by Prometheus' own parser),
//! readiness that follows the tunnel, the status page in headless Chromium, and what the
//! listener refuses (who may in, and clients that would hold it: `admin_access.rs`).

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
    // Each side counts the refusal when it sees it: the agent a moment after the proxy.
    eventually(
        "the agent's reconnect is refused, as both sides count",
        || async {
            let (_, m) = admin_get(admin_addr, "/metrics").await;
            let (_, a) = admin_get(agent_admin_addr, "/metrics").await;
            let failures = r#"transport="h2""#;
            sample(
                &m,
                "revproxy_tunnel_refusals_total",
                r#"reason="certificate""#,
            )
            .is_some()
                && sample(&a, "revproxy_agent_tunnel_connect_failures_total", failures)
                    .is_some_and(|n| n >= 1.0)
        },
    )
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
