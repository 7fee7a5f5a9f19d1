//! Test fixtures: a real proxy on 127.0.0.1:0 with its own CA in a temporary directory,
//! and a raw client for sending enrollment requests the real agent would never send.
#![allow(dead_code)] // each test binary uses its own subset

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use revproxy::ca::{Ca, InitOptions, NewToken, Pin, Token};
use revproxy::{Proxy, ProxyBuilder};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A running proxy. Dropping it shuts the proxy down.
pub struct TestProxy {
    pub dir: TempDir,
    pub addr: SocketAddr,
    /// A second handle on the CA, as an operator's `revproxy token create` would have.
    pub ca: Ca,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestProxy {
    pub async fn start() -> TestProxy {
        TestProxy::start_with(|b| b).await
    }

    pub async fn start_with(configure: impl FnOnce(ProxyBuilder) -> ProxyBuilder) -> TestProxy {
        let dir = tempfile::tempdir().unwrap();
        Ca::init(
            dir.path(),
            &InitOptions::default(),
            time::OffsetDateTime::now_utc(),
        )
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let proxy = configure(Proxy::builder(dir.path()).agent_listener(listener))
            .build()
            .unwrap();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(async move {
            proxy
                .run(async {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
        let ca = Ca::open(dir.path()).unwrap();
        TestProxy {
            dir,
            addr,
            ca,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// A token for agent `web-1` that grants `hosts`.
    pub fn token(&self, hosts: &[&str]) -> Token {
        self.token_for(
            "web-1",
            hosts,
            time::OffsetDateTime::now_utc(),
            Duration::from_secs(3600),
        )
    }

    /// A token minted at `at` (which may be in the past) and valid for `ttl`.
    pub fn token_for(
        &self,
        agent: &str,
        hosts: &[&str],
        at: time::OffsetDateTime,
        ttl: Duration,
    ) -> Token {
        self.ca
            .create_token(
                &NewToken {
                    agent: agent.into(),
                    hosts: hosts.iter().map(|h| h.to_string()).collect(),
                    ttl,
                    cert_ttl: Duration::from_secs(24 * 3600),
                    server: Some(self.addr.to_string()),
                },
                at,
            )
            .unwrap()
    }

    pub fn pin(&self) -> Pin {
        self.ca.pin()
    }

    /// Stops the proxy and waits until it has stopped.
    pub async fn stop(mut self) {
        self.shutdown.take().unwrap().send(()).ok();
        self.task.take().unwrap().await.unwrap();
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Sends `body` as an enrollment request over pinned TLS and returns the status and body.
pub async fn post_raw(addr: SocketAddr, pin: Pin, body: Vec<u8>) -> (u16, String) {
    let config =
        revproxy::tls::pinned_client_config(vec![pin], &[revproxy::tls::ALPN_HTTP1]).unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let (mut rd, mut wr) = tokio::io::split(tls);
    let head = format!(
        "POST /v1/enroll HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    // The proxy may answer before the body is through (413); keep writing and reading apart.
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(head.as_bytes()).await;
        let _ = wr.write_all(&body).await;
        let _ = wr.flush().await;
        wr
    });
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), rd.read_to_end(&mut raw)).await;
    drop(writer);
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A valid JSON enrollment body for `token` with a CSR for a fresh key.
pub fn enroll_body(token: &Token) -> (rcgen::KeyPair, String) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    let body = serde_json::json!({
        "token_id": token.public.id,
        "secret": token.secret.to_base64(),
        "csr": csr,
    });
    (key, body.to_string())
}
