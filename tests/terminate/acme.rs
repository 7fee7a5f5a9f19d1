//! Certificates from a real ACME server (Debian's pebble, validating against the proxy's
//! own listeners): `revproxy tls terminate NAME` with no files, a proxy with `[acme]`
//! orders, answers the challenge, serves the chain pebble issued (verified by curl and a
//! rustls client against pebble's root), and renews it at two thirds of its lifetime.

use std::time::Duration;

use super::common::*;
use super::{http_backend, served_cert, tls, NAME};
use crate::cli_helpers::{run, stdout, PROXY};

/// Pebble's certificates live this long: renewed about 20 s after issue.
const LIFETIME: Duration = Duration::from_secs(30);

/// TLS-ALPN-01 on the SNI listener: ordered once the name is terminated, the challenge
/// answered by the proxy, the chain served, then renewed before it expires; the order
/// counted and listed.
/// A proxy with `[acme]` for a pebble validating against it (TLS-ALPN-01 at `tls_port`
/// when given, else at the proxy's SNI listener), an agent serving NAME from an HTTP
/// backend, and NAME terminated (`tls terminate NAME`, no files).
struct Ordering {
    pebble: Pebble,
    proxy: TestProxy,
    admin: std::net::SocketAddr,
    _agent: TestAgent,
    _agent_dir: tempfile::TempDir,
}

impl Ordering {
    async fn start(
        challenge: revproxy::ChallengeKind,
        validity: Duration,
        tls_port: Option<u16>,
    ) -> Ordering {
        let mut pebble = Pebble::new();
        let settings = pebble.settings(challenge);
        let (admin_listener, admin) = local_listener();
        let proxy =
            TestProxy::start_with(move |b| b.acme(settings).admin_listener(admin_listener)).await;
        pebble.start(PebbleOptions {
            http_port: proxy.http.port(),
            tls_port: tls_port.unwrap_or(proxy.sni.port()),
            validity,
        });
        let agent_dir = enroll_agent(&proxy, "web-1", &[NAME]).await;
        let backend = http_backend().await;
        let agent = start_agent(agent_dir.path(), &[(NAME, backend)], |b| b);
        let said = tls(proxy.dir.path(), &["terminate", NAME]);
        assert!(said.contains("orders its certificate"), "{said}");
        Ordering {
            pebble,
            proxy,
            admin,
            _agent: agent,
            _agent_dir: agent_dir,
        }
    }

    /// Waits (30 s at most) until NAME is served with a certificate from pebble.
    async fn served(&self, client: &tokio_rustls::TlsConnector) -> Vec<u8> {
        eventually_within(
            Duration::from_secs(30),
            "the ordered certificate is served",
            || async { served_cert(self.proxy.sni, client, NAME).await.is_some() },
        )
        .await;
        served_cert(self.proxy.sni, client, NAME).await.unwrap()
    }

    /// `revproxy_acme_orders_total{result}`.
    async fn orders(&self, result: &str) -> Option<f64> {
        let (status, metrics) = admin_get(self.admin, "/metrics").await;
        assert_eq!(status, 200);
        let labels = format!("result=\"{result}\"");
        sample(&metrics, "revproxy_acme_orders_total", &labels)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_is_ordered_with_tls_alpn_01_served_and_renewed() {
    let curl = tool("curl");
    let o = Ordering::start(revproxy::ChallengeKind::TlsAlpn01, LIFETIME, None).await;
    let (proxy, state) = (&o.proxy, o.proxy.dir.path());
    let client = o.pebble.client(&[b"http/1.1"]);
    let first = o.served(&client).await;
    // curl, verifying against pebble's root, gets the backend's plaintext answer.
    let root = proxy.dir.path().join("pebble-root.pem");
    std::fs::write(&root, o.pebble.root_pem()).unwrap();
    let url = format!("https://{NAME}:{}/hello", proxy.sni.port());
    let resolve = format!("{NAME}:{}:127.0.0.1", proxy.sni.port());
    // TLS 1.3, and 1.2 for older clients (as nginx serves them).
    for tls_max in ["1.3", "1.2"] {
        let mut command = std::process::Command::new(curl);
        command.args(["-sS", "--max-time", "10", "--tls-max", tls_max, "--cacert"]);
        command.arg(&root).args(["--resolve", &resolve, &url]);
        let out = tokio::task::spawn_blocking(move || command.output().unwrap())
            .await
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "backend got: GET /hello HTTP/1.1\n",
            "TLS {tls_max}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = run(PROXY, &["tls", "list", "--json"], state);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = &list.as_array().unwrap()[0];
    assert_eq!(row["source"], "acme", "{list}");
    assert!(row["last_error"].is_null(), "{list}");
    assert!(row["not_after"].is_string(), "{list}");

    // Renewed at two thirds of its 30 s: a new certificate, from the same CA.
    eventually_within(
        Duration::from_secs(40),
        "the certificate is renewed",
        || async {
            served_cert(proxy.sni, &client, NAME)
                .await
                .is_some_and(|now| now != first)
        },
    )
    .await;
    assert_eq!(
        o.orders("valid").await,
        Some(2.0),
        "issued, then renewed once"
    );
    assert_eq!(o.orders("invalid").await, Some(0.0));
    let listed = stdout(&run(PROXY, &["tls", "list"], state));
    assert!(listed.contains(" acme "), "{listed}");
}

/// HTTP-01 on the HTTP listener, with plain HTTP to the name still redirected to https:
/// pebble's validation request gets the key authorization, everything else the 308.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_is_ordered_with_http_01_before_the_redirect() {
    let hour = Duration::from_secs(3600);
    let o = Ordering::start(revproxy::ChallengeKind::Http01, hour, None).await;
    let proxy = &o.proxy;
    o.served(&o.pebble.client(&[b"http/1.1"])).await;
    let answer = round_trip(proxy.http, &http_head(NAME), b"").await.unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 308 "),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    // A challenge path with no pending challenge is routed as any path (to the 308 here).
    let head = format!("GET /.well-known/acme-challenge/nothing HTTP/1.1\r\nHost: {NAME}\r\n\r\n");
    let answer = round_trip(proxy.http, head.as_bytes(), b"").await.unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 308 "),
        "{}",
        String::from_utf8_lossy(&answer)
    );
}

/// A validation that fails (pebble checks TLS-ALPN-01 on a port where nothing listens):
/// counted `invalid`, its reason listed by `tls list`, and no proxy orders the name again
/// for at least a minute (Let's Encrypt allows 5 failed validations per name and hour).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_validation_is_listed_and_backed_off() {
    let nobody = Some(free_port("127.0.0.1"));
    let hour = Duration::from_secs(3600);
    let o = Ordering::start(revproxy::ChallengeKind::TlsAlpn01, hour, nobody).await;
    let (proxy, state) = (&o.proxy, o.proxy.dir.path());
    let listed = || {
        let out = run(PROXY, &["tls", "list", "--json"], state);
        let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        list[0].clone()
    };
    eventually_within(Duration::from_secs(30), "the failure is listed", || async {
        listed()["last_error"].is_string()
    })
    .await;
    let row = listed();
    assert!(row["not_after"].is_null(), "{row}");
    let error = row["last_error"].as_str().unwrap();
    // The CA's own words: which check failed, and where.
    assert!(
        error.contains("tls-alpn-01") && error.contains("unauthorized"),
        "{error}"
    );
    let record = proxy.ca.state().read().unwrap().tls[NAME].clone();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    assert_eq!(record.acme.failures, 1);
    assert!(
        record.acme.retry_at.unwrap() >= now + 55,
        "{:?}",
        record.acme
    );
    assert!(record.acme.lease.is_none() && record.acme.challenge.is_none());
    assert_eq!(o.orders("invalid").await, Some(1.0));
    assert_eq!(o.orders("valid").await, Some(0.0));
    // The operator fixed the cause: `tls terminate` again orders at once.
    tls(state, &["terminate", NAME]);
    let record = proxy.ca.state().read().unwrap().tls[NAME].clone();
    assert_eq!((record.acme.failures, record.acme.retry_at), (0, None));
    assert_eq!(
        record.last_error.as_deref(),
        Some(error),
        "the last error stays until then"
    );
}
