//! Renewal asked for in a loop by a hostile agent: one certificate per certificate held,
//! none early, answers from the record, and a rate limit.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;

use crate::common::*;

/// What the proxy answered to a raw `POST /v1/renew`.
#[derive(Debug)]
struct Answer {
    status: u16,
    retry_after: Option<u64>,
    body: serde_json::Value,
}

/// One renewal request as a hostile agent sends it: its certificate in the handshake, any
/// CSR it likes, as often as it likes.
async fn renew_raw(proxy: &TestProxy, dir: &std::path::Path, csr: &str) -> Answer {
    use tokio::io::AsyncWriteExt;
    let id = revproxy::agent::Identity::load(dir).unwrap();
    let config = Arc::new(
        revproxy::tls::agent_client_config(
            vec![proxy.pin()],
            &id.cert_pem,
            &id.key_pem,
            &[revproxy::tls::ALPN_HTTP1],
        )
        .unwrap(),
    );
    let mut tls = tls_to_agent_port(proxy, &config).await.unwrap();
    let body = serde_json::json!({ "csr": csr }).to_string();
    let head = format!(
        "POST /v1/renew HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.write_all(body.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut answer))
        .await
        .expect("an answer in time")
        .unwrap();
    let text = String::from_utf8(answer).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head[9..12].parse().unwrap();
    let retry_after = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("retry-after: ")
                .map(str::to_string)
        })
        .map(|v| v.trim().parse().unwrap());
    Answer {
        status,
        retry_after,
        body: serde_json::from_str(body).unwrap(),
    }
}

/// An agent that asks for renewal in a loop, with a new key each time, gets one
/// certificate per certificate it holds, none before half its lifetime, and a 429 once it
/// asks too often; a lost answer asked for again with the same key is answered from the
/// record. The state is written once.
#[tokio::test]
async fn renewing_in_a_loop_mints_one_certificate_and_is_rate_limited() {
    let proxy = TestProxy::start().await;
    let now = time::OffsetDateTime::now_utc();

    // A certificate issued just now (24 h) is not due for another 12 h, and is told so.
    let fresh = enroll_agent(&proxy, "fresh", &["fresh.example.com"]).await;
    let early = renew_raw(&proxy, fresh.path(), &new_csr().1).await;
    assert_eq!(
        (early.status, early.body["error"].as_str()),
        (429, Some("too_early")),
        "{early:?}"
    );
    let wait = early.retry_after.expect("a Retry-After header");
    assert!((43_000..=43_200).contains(&wait), "{wait}");
    assert_eq!(early.body["retry_after"].as_u64(), Some(wait));

    // One issued 13 h ago is due.
    let old = issue_identity(
        &proxy.ca,
        proxy.addr,
        "web-1",
        &["app.example.com"],
        now - time::Duration::hours(13),
        Duration::from_secs(24 * 3600),
    );
    let (_, csr) = new_csr();
    let first = renew_raw(&proxy, old.path(), &csr).await;
    assert_eq!(first.status, 200, "{first:?}");
    let written = stored(proxy.ca.dir());

    // The same key again (the answer was lost): the same certificate.
    let again = renew_raw(&proxy, old.path(), &csr).await;
    assert_eq!(again.status, 200, "{again:?}");
    assert_eq!(again.body["serial"], first.body["serial"]);
    assert_eq!(again.body["certificate"], first.body["certificate"]);

    // Other keys: refused, as long as that certificate stands.
    for _ in 0..3 {
        let other = renew_raw(&proxy, old.path(), &new_csr().1).await;
        assert_eq!(
            (other.status, other.body["error"].as_str()),
            (409, Some("already_renewed")),
            "{other:?}"
        );
    }
    let certs = proxy.ca.list_certs(now).unwrap();
    assert_eq!(certs.iter().filter(|c| c.agent == "web-1").count(), 2);
    assert_eq!(
        stored(proxy.ca.dir()),
        written,
        "the state was written once"
    );

    // Two copies of one identity asking at the same moment: one certificate between them.
    let twin = issue_identity(
        &proxy.ca,
        proxy.addr,
        "web-2",
        &["two.example.com"],
        now - time::Duration::hours(13),
        Duration::from_secs(24 * 3600),
    );
    let (csr_a, csr_b) = (new_csr().1, new_csr().1);
    let (a, b) = tokio::join!(
        renew_raw(&proxy, twin.path(), &csr_a),
        renew_raw(&proxy, twin.path(), &csr_b)
    );
    let mut statuses = [a.status, b.status];
    statuses.sort();
    assert_eq!(statuses, [200, 409], "{a:?} {b:?}");

    // Five requests so far; the window allows ten, then says how long to wait.
    for _ in 5..10 {
        assert_eq!(renew_raw(&proxy, old.path(), &csr).await.status, 200);
    }
    let limited = renew_raw(&proxy, old.path(), &csr).await;
    assert_eq!(
        (limited.status, limited.body["error"].as_str()),
        (429, Some("rate_limited")),
        "{limited:?}"
    );
    let wait = limited.retry_after.expect("a Retry-After header");
    assert!((1..=301).contains(&wait), "{wait}");
    // Counted per certificate: the other agent is not held back.
    let other = renew_raw(&proxy, fresh.path(), &new_csr().1).await;
    assert_eq!(other.body["error"].as_str(), Some("too_early"), "{other:?}");
}
