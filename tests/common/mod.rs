//! Test fixtures: a real proxy on 127.0.0.1:0 with its own CA in a temporary directory,
//! and a raw client for sending enrollment requests the real agent would never send.
#![allow(dead_code)] // each test binary uses its own subset

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use revproxy::ca::{Ca, InitOptions, NewToken, Pin, Token};
use revproxy::{Agent, Proxy, ProxyBuilder, ProxyStatus};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

mod acme;
mod admin;
mod apart;
mod deployment;
mod logs;
mod postgres;
mod process;
mod proxy;
mod terminate;
#[allow(unused_imports)] // each test binary uses its own subset
pub use acme::{Pebble, PebbleOptions};
pub use admin::{admin_get, sample};
#[allow(unused_imports)] // each test binary uses its own subset
pub use apart::Apart;
#[allow(unused_imports)] // each test binary uses its own subset
pub use deployment::*;
#[allow(unused_imports)] // each test binary uses its own subset
pub use logs::*;
pub use postgres::Postgres;
pub use process::*;
use proxy::bind;
#[allow(unused_imports)] // each test binary uses its own subset
pub use proxy::shared_udp;
pub use proxy::TestProxy;
#[allow(unused_imports)] // each test binary uses its own subset
pub use terminate::*;

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

/// A fresh agent key and a CSR for it, as PEM.
pub fn new_csr() -> (rcgen::KeyPair, String) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    (key, csr)
}

/// A valid JSON enrollment body for `token` with a CSR for a fresh key.
pub fn enroll_body(token: &Token) -> (rcgen::KeyPair, String) {
    let (key, csr) = new_csr();
    let body = serde_json::json!({
        "token_id": token.public.id,
        "secret": token.secret.to_base64(),
        "csr": csr,
    });
    (key, body.to_string())
}

/// An enrolled agent's state directory.
pub async fn enroll_agent(proxy: &TestProxy, name: &str, hosts: &[&str]) -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    let token = proxy.token_for(
        name,
        hosts,
        time::OffsetDateTime::now_utc(),
        Duration::from_secs(3600),
    );
    revproxy::agent::enroll(&token, dir.path()).await.unwrap();
    dir
}

/// A running agent. Dropping it stops it.
pub struct TestAgent {
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), revproxy::agent::AgentError>>>,
    /// Sees every renewal of the agent's identity.
    pub renewals: tokio::sync::watch::Receiver<Arc<revproxy::agent::Identity>>,
}

impl TestAgent {
    /// Kills the agent at once, as `kill -9` would: its sockets close, nothing drains.
    pub fn kill(mut self) {
        self.task.take().unwrap().abort();
    }

    /// Asks the agent to shut down gracefully and waits until it has.
    pub async fn stop(mut self) {
        self.shutdown.take().unwrap().send(()).ok();
        self.task.take().unwrap().await.unwrap().unwrap();
    }

    /// Waits for the agent to stop by itself and returns why.
    pub async fn finished(mut self) -> Result<(), revproxy::agent::AgentError> {
        self.task.take().unwrap().await.unwrap()
    }

    /// Asks the agent to shut down and returns the task to await.
    pub fn begin_stop(mut self) -> JoinHandle<Result<(), revproxy::agent::AgentError>> {
        self.shutdown.take().unwrap().send(()).ok();
        self.task.take().unwrap()
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

pub use revproxy::agent::Transport;

/// Runs each named `async fn(Transport)` as two tests, `h2::name` and `quic::name`: the
/// shared end-to-end suite, over both tunnel transports.
#[macro_export]
macro_rules! over_both_transports {
    ($($test:ident),* $(,)?) => {
        mod h2 {
            $(#[tokio::test]
            async fn $test() {
                super::$test(revproxy::agent::Transport::H2).await
            })*
        }
        mod quic {
            $(#[tokio::test]
            async fn $test() {
                super::$test(revproxy::agent::Transport::Quic).await
            })*
        }
    };
}

/// Configures a test agent to use `transport` (for [`start_agent`]).
pub fn on(transport: Transport) -> impl FnOnce(revproxy::AgentBuilder) -> revproxy::AgentBuilder {
    move |b| b.transport(transport)
}

/// Starts an agent from `dir` serving `services`, with whatever else `configure` sets on
/// its builder (`|b| b` for the defaults, [`on`] for a transport).
pub fn start_agent(
    dir: &std::path::Path,
    services: &[(&str, SocketAddr)],
    configure: impl FnOnce(revproxy::AgentBuilder) -> revproxy::AgentBuilder,
) -> TestAgent {
    let mut builder = Agent::builder(dir);
    for (name, addr) in services {
        builder = builder.service(name, &addr.to_string());
    }
    let agent = configure(builder).build().unwrap();
    let renewals = agent.subscribe();
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(agent.run(async {
        let _ = rx.await;
    }));
    TestAgent {
        shutdown: Some(tx),
        task: Some(task),
        renewals,
    }
}

/// A backend that writes `tag` (if any), then echoes everything it reads; when the reader
/// is done it shuts down its write side (so half-close is visible end to end).
pub async fn echo_backend(tag: &'static [u8]) -> SocketAddr {
    let listener = bind("127.0.0.1:0").await;
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut rd, mut wr) = tcp.into_split();
                if wr.write_all(tag).await.is_err() {
                    return;
                }
                let _ = tokio::io::copy(&mut rd, &mut wr).await;
                let _ = wr.shutdown().await;
            });
        }
    });
    addr
}

/// A UDP backend that answers each datagram with `tag` and the datagram, to its sender.
pub async fn udp_echo(tag: &'static [u8]) -> SocketAddr {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        loop {
            let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                return;
            };
            let mut answer = tag.to_vec();
            answer.extend_from_slice(&buf[..n]);
            let _ = socket.send_to(&answer, from).await;
        }
    });
    addr
}

/// Deterministic pseudo-random bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Sends `data` to `addr` after `prefix`, half-closes, and returns everything read back.
pub async fn round_trip(addr: SocketAddr, prefix: &[u8], data: &[u8]) -> std::io::Result<Vec<u8>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let (mut rd, mut wr) = tcp.into_split();
    let mut out = prefix.to_vec();
    out.extend_from_slice(data);
    let writer = tokio::spawn(async move {
        wr.write_all(&out).await?;
        wr.shutdown().await
    });
    let mut back = Vec::new();
    rd.read_to_end(&mut back).await?;
    writer.await.unwrap()?;
    Ok(back)
}

/// An HTTP/1.1 request head for `host`.
pub fn http_head(host: &str) -> Vec<u8> {
    format!("GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: test\r\n\r\n").into_bytes()
}

/// A wall clock the test moves: real time plus an adjustable offset in seconds, plus a
/// one-shot jump seen by the next reading only.
#[derive(Debug, Default)]
pub struct TestClock {
    offset: std::sync::atomic::AtomicI64,
    jump: std::sync::atomic::AtomicI64,
}

impl TestClock {
    pub fn set_offset(&self, seconds: i64) {
        self.offset
            .store(seconds, std::sync::atomic::Ordering::SeqCst);
    }

    /// The next reading (only) is `seconds` ahead, as after a suspend.
    pub fn jump_once(&self, seconds: i64) {
        self.jump
            .store(seconds, std::sync::atomic::Ordering::SeqCst);
    }
}

impl revproxy::agent::Clock for TestClock {
    fn now(&self) -> i64 {
        use std::sync::atomic::Ordering::SeqCst;
        time::OffsetDateTime::now_utc().unix_timestamp()
            + self.offset.load(SeqCst)
            + self.jump.swap(0, SeqCst)
    }
}

/// An enrolled agent whose certificate lives `cert_ttl` (the library allows short ones).
pub async fn enroll_agent_with_ttl(
    proxy: &TestProxy,
    name: &str,
    hosts: &[&str],
    cert_ttl: Duration,
) -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    let token = proxy
        .ca
        .create_token(
            &NewToken {
                agent: name.into(),
                hosts: hosts.iter().map(|h| h.to_string()).collect(),
                private_hosts: Vec::new(),
                connect: Vec::new(),
                ttl: Duration::from_secs(3600),
                cert_ttl,
                server: Some(proxy.addr.to_string()),
            },
            time::OffsetDateTime::now_utc(),
        )
        .unwrap();
    revproxy::agent::enroll(&token, dir.path()).await.unwrap();
    dir
}

/// An identity issued by `ca` directly (no enrollment over the network) at time `at`, with
/// a certificate valid for `cert_ttl`, saved in a new agent state directory that points at
/// `server`. For certificates a real agent could not get: already expired, or signed by a
/// copy of the CA that the proxy never heard of.
pub fn issue_identity(
    ca: &Ca,
    server: SocketAddr,
    agent: &str,
    hosts: &[&str],
    at: time::OffsetDateTime,
    cert_ttl: Duration,
) -> TempDir {
    let token = ca
        .create_token(
            &NewToken {
                agent: agent.into(),
                hosts: hosts.iter().map(|h| h.to_string()).collect(),
                private_hosts: Vec::new(),
                connect: Vec::new(),
                ttl: Duration::from_secs(7200),
                cert_ttl,
                server: None,
            },
            at,
        )
        .unwrap();
    let (key, csr) = new_csr();
    let issued = ca
        .enroll(
            &revproxy::ca::EnrollRequest {
                token_id: &token.public.id,
                secret: &token.secret,
                csr_pem: &csr,
            },
            at + time::Duration::minutes(1),
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    revproxy::agent::Identity {
        server: server.to_string(),
        agent: issued.agent.clone(),
        identity: issued.identity.clone(),
        hosts: issued.hosts.clone(),
        private: Vec::new(),
        not_after: issued.not_after,
        cert_pem: issued.cert_pem.clone(),
        key_pem: key.serialize_pem(),
        ca_pem: issued.ca_pem.clone(),
    }
    .save(dir.path())
    .unwrap();
    dir
}

/// The TLS client configuration of the agent enrolled in `dir`, offering ALPN h2: what a
/// real agent presents when it opens a tunnel.
pub fn agent_tls(proxy: &TestProxy, dir: &std::path::Path) -> Arc<rustls::ClientConfig> {
    let id = revproxy::agent::Identity::load(dir).unwrap();
    Arc::new(
        revproxy::tls::agent_client_config(
            vec![proxy.pin()],
            &id.cert_pem,
            &id.key_pem,
            &[revproxy::tls::ALPN_H2],
        )
        .unwrap(),
    )
}

/// A TLS handshake with the proxy's agent port under `config`.
pub async fn tls_to_agent_port(
    proxy: &TestProxy,
    config: &Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(proxy.addr).await?;
    tokio_rustls::TlsConnector::from(config.clone())
        .connect("localhost".try_into().unwrap(), tcp)
        .await
}

/// A listener on a loopback port the kernel picks, for an admin listener.
pub fn local_listener() -> (tokio::net::TcpListener, SocketAddr) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    (tokio::net::TcpListener::from_std(listener).unwrap(), addr)
}

/// Waits (bounded, looking every 20 ms) until `check` holds; panics with `what` if not.
pub async fn eventually<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    eventually_within(Duration::from_secs(10), what, check).await
}

/// As [`eventually`], for up to `limit`.
pub async fn eventually_within<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An agent enrolled over the network with public `hosts`, `private` names and `connect`
/// access.
pub async fn enroll_mesh_agent(
    proxy: &TestProxy,
    name: &str,
    hosts: &[&str],
    private: &[&str],
    connect: &[&str],
) -> TempDir {
    let owned = |names: &[&str]| names.iter().map(|h| h.to_string()).collect();
    let token = proxy
        .ca
        .create_token(
            &NewToken {
                agent: name.into(),
                hosts: owned(hosts),
                private_hosts: owned(private),
                connect: owned(connect),
                ttl: Duration::from_secs(3600),
                cert_ttl: Duration::from_secs(24 * 3600),
                server: Some(proxy.addr.to_string()),
            },
            time::OffsetDateTime::now_utc(),
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    revproxy::agent::enroll(&token, dir.path()).await.unwrap();
    dir
}

/// Enrolls agent `name` for `host` with the CA `ca`, its proxy's agent listener at
/// `agents` (for proxies run as processes, which [`enroll_agent`] does not reach).
pub async fn enrolled(
    ca: &revproxy::ca::Ca,
    agents: std::net::SocketAddr,
    name: &str,
    host: &str,
) -> tempfile::TempDir {
    enrolled_for(ca, agents, name, &[host]).await
}

/// [`enrolled`] for several names.
pub async fn enrolled_for(
    ca: &revproxy::ca::Ca,
    agents: std::net::SocketAddr,
    name: &str,
    hosts: &[&str],
) -> tempfile::TempDir {
    let token = ca
        .create_token(
            &revproxy::ca::NewToken {
                agent: name.into(),
                hosts: hosts.iter().map(|h| h.to_string()).collect(),
                private_hosts: Vec::new(),
                connect: Vec::new(),
                ttl: Duration::from_secs(3600),
                cert_ttl: Duration::from_secs(24 * 3600),
                server: Some(agents.to_string()),
            },
            time::OffsetDateTime::now_utc(),
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    revproxy::agent::enroll(&token, dir.path()).await.unwrap();
    dir
}

/// What the embedded store in `dir` holds: its version (every write moves it) and every
/// record. Equal before and after: nothing was written.
pub fn stored(dir: &std::path::Path) -> (u64, revproxy::ca::state::State) {
    use revproxy::ca::Store;
    let store = revproxy::ca::sqlite::SqliteStore::new(dir);
    (store.version().unwrap(), store.read().unwrap())
}
