//! Private names (the mesh): names only enrolled identities with access reach, through
//! their own tunnel; never a public listener.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// A private `name` is not served by SNI (a real TLS client gets the alert for an
/// unrecognized name) nor through the listener at `fixed` that is fixed to it (closed at
/// once, without a byte).
async fn refused_by_sni_and_fixed_listener(proxy: &TestProxy, name: &str, fixed: SocketAddr) {
    let config = revproxy::tls::pinned_client_config(vec![proxy.pin()], &[]).unwrap();
    let tcp = TcpStream::connect(proxy.sni).await.unwrap();
    let err = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name.to_string().try_into().unwrap(), tcp)
        .await
        .unwrap_err();
    assert!(
        format!("{err:?}").contains("UnrecognisedName"),
        "{name}: {err:?}"
    );
    let mut fixed = TcpStream::connect(fixed).await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), fixed.read_to_end(&mut got))
        .await
        .expect("closed, not hanging")
        .ok();
    assert!(got.is_empty(), "{name}: {got:?}");
}

/// A privately granted name is not there for public clients: by Host, by SNI and by a
/// fixed listener they get what an unknown name gets, even with its agent connected, and
/// a wildcard granted privately hides every name under it.
async fn a_public_listener_never_reaches_a_private_name(t: Transport) {
    let (fixed, fixed_addr) = local_listener();
    let proxy = TestProxy::start_with(move |b| {
        b.listener(
            fixed,
            revproxy::ListenerKind::Fixed(revproxy::Target::Name("db.internal".into())),
        )
        .route("db.internal", "127.0.0.1:1")
    })
    .await;
    let backend = echo_backend(b"secret:").await;
    let dir = enroll_mesh_agent(
        &proxy,
        "db-1",
        &["public.example.com"],
        &["db.internal", "*.svc.internal"],
        &[],
    )
    .await;
    let _agent = start_agent(
        dir.path(),
        &[
            ("db.internal", backend),
            ("*.svc.internal", backend),
            ("public.example.com", backend),
        ],
        on(t),
    );
    proxy.wait_for("public.example.com", 1).await;

    // The public name works; the private ones answer like a name nobody has.
    let public = round_trip(proxy.http, &http_head("public.example.com"), b"")
        .await
        .unwrap();
    assert!(public.starts_with(b"secret:"));
    for name in ["db.internal", "a.svc.internal", "nobody.example.com"] {
        let back = round_trip(proxy.http, &http_head(name), b"").await.unwrap();
        let text = String::from_utf8_lossy(&back);
        assert!(text.starts_with("HTTP/1.1 502"), "{name}: {text}");
        assert!(
            text.contains(&format!("no route for {name}")),
            "{name}: {text}"
        );
        assert!(!text.contains("secret"), "{name}: {text}");
    }
    refused_by_sni_and_fixed_listener(&proxy, "db.internal", fixed_addr).await;
}

/// A private grant wins over every public one: with `*.example.com` granted publicly (to
/// the same agent and to another) and `db.example.com` privately, public clients reach
/// `www.example.com` but never `db.example.com`: not by Host, not by SNI, not through a
/// listener fixed to it, not through a static route for it.
async fn a_public_wildcard_does_not_open_a_private_name_under_it(t: Transport) {
    let (fixed, fixed_addr) = local_listener();
    let private = echo_backend(b"private:").await;
    let public = echo_backend(b"public:").await;
    let proxy = TestProxy::start_with(move |b| {
        b.listener(
            fixed,
            revproxy::ListenerKind::Fixed(revproxy::Target::Name("db.example.com".into())),
        )
        .route("db.example.com", &private.to_string())
    })
    .await;
    let edge =
        enroll_mesh_agent(&proxy, "edge", &["*.example.com"], &["db.example.com"], &[]).await;
    // The agent learned which of its names are private (it refuses them to public streams).
    let identity = revproxy::agent::Identity::load(edge.path()).unwrap();
    assert_eq!(identity.private, ["db.example.com"]);
    let _edge = start_agent(
        edge.path(),
        &[("*.example.com", public), ("db.example.com", private)],
        on(t),
    );
    let other = enroll_mesh_agent(&proxy, "other", &["*.example.com"], &[], &[]).await;
    let _other = start_agent(other.path(), &[("*.example.com", private)], on(t));
    proxy.wait_for("*.example.com", 2).await;

    let www = round_trip(proxy.http, &http_head("www.example.com"), b"")
        .await
        .unwrap();
    assert!(
        www.starts_with(b"public:") || www.starts_with(b"private:"),
        "{www:?}"
    );
    let back = round_trip(proxy.http, &http_head("db.example.com"), b"")
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&back);
    assert!(text.starts_with("HTTP/1.1 502"), "{text}");
    assert!(text.contains("no route for db.example.com"), "{text}");
    assert!(!text.contains("private:"), "{text}");
    refused_by_sni_and_fixed_listener(&proxy, "db.example.com", fixed_addr).await;
}

/// A local listener of the kernel's choosing for `--connect`.
fn connect_port() -> (std::net::TcpListener, std::net::SocketAddr) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

/// Writes `data` on a fresh connection to `addr` and reads `want` bytes back.
async fn through(addr: std::net::SocketAddr, data: &[u8], want: usize) -> std::io::Result<Vec<u8>> {
    use tokio::io::AsyncWriteExt;
    let mut tcp = TcpStream::connect(addr).await?;
    tcp.write_all(data).await?;
    let mut back = vec![0u8; want];
    tokio::time::timeout(Duration::from_secs(10), tcp.read_exact(&mut back))
        .await
        .map_err(|_| std::io::Error::other("no answer in 10 s"))??;
    Ok(back)
}

/// A laptop with `--connect db.internal` (and nothing to serve) reaches a database agent's
/// private name through its own tunnel; the serving agent learns who calls.
async fn an_agent_reaches_a_private_name_through_its_tunnel(t: Transport) {
    let (_guard, mut logs) = watch_logs(tracing::Level::DEBUG);
    let proxy = TestProxy::start().await;
    let backend = echo_backend(b"db:").await;
    let db = enroll_mesh_agent(&proxy, "db-1", &[], &["db.internal"], &[]).await;
    let _db = start_agent(db.path(), &[("db.internal", backend)], on(t));
    proxy.wait_for("db.internal", 1).await;
    let laptop = enroll_mesh_agent(&proxy, "laptop", &[], &[], &["db.internal"]).await;
    let (listener, local) = connect_port();
    let _laptop = start_agent(laptop.path(), &[], move |b| {
        b.transport(t).connect("db.internal", listener)
    });
    // Its tunnel serves nothing, but over QUIC it is what mesh streams go up.
    assert!(
        proxy
            .status
            .wait_for_agent("laptop", 1, Duration::from_secs(10))
            .await
    );

    for i in 0..3 {
        let data = pattern(100_000, i);
        let back = through(local, &data, 3 + data.len()).await.unwrap();
        assert_eq!(&back[..3], b"db:");
        assert!(back[3..] == data[..], "round {i} came back intact");
    }
    // Every line so far (the streams are done), then the one the serving agent wrote.
    let mut seen = Vec::new();
    while let Ok(line) = logs.try_recv() {
        seen.push(line);
    }
    let opened = seen
        .iter()
        .find(|l| l.contains("mesh stream open") && l.contains("backend="))
        .unwrap_or_else(|| panic!("no mesh stream open line from the serving agent: {seen:?}"));
    assert!(
        opened.contains("caller=spiffe://revproxy.local/agent/laptop"),
        "{opened}"
    );
    // Over QUIC the streams went up the tunnel; over h2, up the mesh channel beside it.
    let channel = seen.iter().any(|l| l.contains("mesh channel up"));
    assert_eq!(channel, t == Transport::H2, "mesh channel used: {channel}");
}

/// Default deny: an identity without an access rule for the name gets nothing, its local
/// connection is closed, and its agent says why.
async fn an_identity_without_access_is_refused(t: Transport) {
    let (_guard, mut logs) = watch_logs(tracing::Level::WARN);
    let proxy = TestProxy::start().await;
    let backend = echo_backend(b"db:").await;
    let db = enroll_mesh_agent(&proxy, "db-1", &[], &["db.internal"], &[]).await;
    let _db = start_agent(db.path(), &[("db.internal", backend)], on(t));
    proxy.wait_for("db.internal", 1).await;
    let stranger = enroll_mesh_agent(&proxy, "stranger", &[], &[], &["other.internal"]).await;
    let (listener, local) = connect_port();
    let (admin, admin_addr) = local_listener();
    let _stranger = start_agent(stranger.path(), &[], move |b| {
        b.transport(t)
            .connect("db.internal", listener)
            .admin_listener(admin)
    });
    let err = through(local, b"hello", 4).await.unwrap_err();
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
        ),
        "{err}"
    );
    let said = log_line(&mut logs, "cannot connect to db.internal").await;
    assert!(said.contains("no access to db.internal"), "{said}");
    // `revproxy-agent status` shows the listener and that last error.
    let (_, status) = admin_get(admin_addr, "/status").await;
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let listener = &status["connect"][0];
    assert_eq!(listener["name"], "db.internal");
    assert_eq!(listener["listen"], local.to_string());
    let error = listener["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("no access to db.internal"), "{status}");
}

/// Taking back the caller's access, or revoking its certificate, cuts its open stream
/// within two seconds.
async fn revoking_access_or_the_caller_cuts_open_streams_within_two_seconds(t: Transport) {
    use tokio::io::AsyncWriteExt;
    let proxy = TestProxy::start().await;
    let backend = echo_backend(b"db:").await;
    let db = enroll_mesh_agent(&proxy, "db-1", &[], &["db.internal"], &[]).await;
    let _db = start_agent(db.path(), &[("db.internal", backend)], on(t));
    proxy.wait_for("db.internal", 1).await;
    for (who, cut) in [("laptop-a", "access"), ("laptop-b", "certificate")] {
        let laptop = enroll_mesh_agent(&proxy, who, &[], &[], &["db.internal"]).await;
        let (listener, local) = connect_port();
        let _laptop = start_agent(laptop.path(), &[], move |b| {
            b.transport(t).connect("db.internal", listener)
        });
        let mut open = TcpStream::connect(local).await.unwrap();
        open.write_all(b"ping").await.unwrap();
        let mut echoed = [0u8; 7];
        open.read_exact(&mut echoed).await.unwrap();
        assert_eq!(&echoed, b"db:ping");

        let started = std::time::Instant::now();
        let now = time::OffsetDateTime::now_utc();
        match cut {
            "access" => {
                proxy
                    .ca
                    .revoke_access(who, &["db.internal".into()])
                    .unwrap();
            }
            _ => {
                proxy.ca.revoke_certs(who, now).unwrap();
            }
        }
        let mut rest = Vec::new();
        let ended = tokio::time::timeout(Duration::from_secs(5), open.read_to_end(&mut rest)).await;
        assert!(ended.is_ok(), "{who}: the stream was not cut");
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(2),
            "{who} ({cut}): cut after {took:?}"
        );
        // And nothing new gets through.
        assert!(
            through(local, b"again", 4).await.is_err(),
            "{who}: a new stream got through"
        );
    }
}

/// Private traffic is counted per name like public traffic: a stream through a private
/// name holds its open-stream gauge up, its bytes (the caller is the client) move its byte
/// counters on the admin listener, and `revproxy status` shows them.
async fn private_traffic_is_counted_per_name(t: Transport) {
    use tokio::io::AsyncWriteExt;
    let (admin, admin_addr) = local_listener();
    let proxy = TestProxy::start_with(|b| b.admin_listener(admin)).await;
    let backend = echo_backend(b"db:").await;
    let db = enroll_mesh_agent(&proxy, "db-1", &[], &["db.internal"], &[]).await;
    let _db = start_agent(db.path(), &[("db.internal", backend)], on(t));
    proxy.wait_for("db.internal", 1).await;
    let laptop = enroll_mesh_agent(&proxy, "laptop", &[], &[], &["db.internal"]).await;
    let (listener, local) = connect_port();
    let _laptop = start_agent(laptop.path(), &[], move |b| {
        b.transport(t).connect("db.internal", listener)
    });
    let host = r#"host="db.internal""#;
    let metric = move |name: &'static str| async move {
        sample(&admin_get(admin_addr, "/metrics").await.1, name, host)
    };

    let mut open = TcpStream::connect(local).await.unwrap();
    open.write_all(b"ping").await.unwrap();
    let mut echoed = [0u8; 7];
    open.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"db:ping");
    assert_eq!(metric("revproxy_open_streams").await, Some(1.0));
    drop(open);
    eventually("the closed stream leaves the gauge", || async {
        metric("revproxy_open_streams").await == Some(0.0)
    })
    .await;

    let data = pattern(100_000, 7);
    let back = through(local, &data, 3 + data.len()).await.unwrap();
    assert!(back[3..] == data[..], "came back intact");
    // Received from the caller: "ping" and the 100 kB; sent to it: both echoes.
    assert_eq!(
        metric("revproxy_received_bytes_total").await,
        Some(100_004.0)
    );
    assert_eq!(metric("revproxy_sent_bytes_total").await, Some(100_010.0));

    let admin = admin_addr.to_string();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_revproxy"))
            .args(["status", "--admin", &admin])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    let row: Vec<&str> = (report.lines())
        .find(|l| l.starts_with("db.internal "))
        .unwrap_or_else(|| panic!("no row for db.internal: {report}"))
        .split_whitespace()
        .collect();
    assert_eq!(row[row.len() - 2..], ["100004", "100010"], "{report}");
}

over_both_transports!(
    private_traffic_is_counted_per_name,
    a_public_listener_never_reaches_a_private_name,
    a_public_wildcard_does_not_open_a_private_name_under_it,
    an_agent_reaches_a_private_name_through_its_tunnel,
    an_identity_without_access_is_refused,
    revoking_access_or_the_caller_cuts_open_streams_within_two_seconds,
);

/// psql, a real client, talks to a real PostgreSQL server that has no public port at all:
/// through `--connect` on the caller's side and a private name on the server's.
async fn psql_reaches_a_private_database_through_the_mesh(t: Transport) {
    let pg = Postgres::start();
    let proxy = TestProxy::start().await;
    let database: std::net::SocketAddr = ([127, 0, 0, 1], pg.port).into();
    let db = enroll_mesh_agent(&proxy, "db-1", &[], &["pg.internal"], &[]).await;
    let _db = start_agent(db.path(), &[("pg.internal", database)], on(t));
    proxy.wait_for("pg.internal", 1).await;
    let laptop = enroll_mesh_agent(&proxy, "laptop", &[], &[], &["pg.internal"]).await;
    let (listener, local) = connect_port();
    let _laptop = start_agent(laptop.path(), &[], move |b| {
        b.transport(t).connect("pg.internal", listener)
    });

    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("psql")
            .arg(format!(
                "host=127.0.0.1 port={} user=postgres dbname=postgres connect_timeout=10",
                local.port()
            ))
            .args([
                "-tAc",
                "create table t (n int); insert into t select generate_series(1, 5000); \
                 select 'rows ' || count(*) || ' sum ' || sum(n) from t",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "psql: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("rows 5000 sum 12502500"), "{text}");
    // The database has no public route: a public client asking for it gets nothing.
    let public = round_trip(proxy.http, &http_head("pg.internal"), b"")
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&public).starts_with("HTTP/1.1 502"));
}

mod with_psql {
    use super::*;
    over_both_transports!(psql_reaches_a_private_database_through_the_mesh);
}

/// A name is public or private by the grant in force, not by what an older certificate
/// says: an agent whose public name the operator made private (here by enrolling it again
/// with a private wildcard over it) serves it only through the mesh, even on its old
/// certificate.
#[tokio::test]
async fn a_name_made_private_stays_private_on_an_older_certificate() {
    let proxy = TestProxy::start().await;
    let backend = echo_backend(b"secret:").await;
    let old = enroll_mesh_agent(&proxy, "db-1", &["db.example.com"], &[], &[]).await;
    // The operator makes everything under example.com private for db-1.
    let _new = enroll_mesh_agent(&proxy, "db-1", &[], &["*.example.com"], &[]).await;
    let _agent = start_agent(old.path(), &[("db.example.com", backend)], |b| b);
    proxy.wait_for("db.example.com", 1).await;

    let back = round_trip(proxy.http, &http_head("db.example.com"), b"")
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&back);
    assert!(text.starts_with("HTTP/1.1 502"), "{text}");
    assert!(!text.contains("secret"), "{text}");

    // Through the mesh, with access, it is there.
    let laptop = enroll_mesh_agent(&proxy, "laptop", &[], &[], &["db.example.com"]).await;
    let (listener, local) = connect_port();
    let _laptop = start_agent(laptop.path(), &[], move |b| {
        b.connect("db.example.com", listener)
    });
    let back = through(local, b"hi", 9).await.unwrap();
    assert_eq!(&back, b"secret:hi");
}
