//! Several proxies on one PostgreSQL, as docs/operations.md sets them up: the shared
//! store and CA (`Deployment`), proxies in this process or as `revproxy serve` processes,
//! and HAProxy in front of them.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use revproxy::ca::{Ca, InitOptions, NewToken, Token};
use tempfile::TempDir;

use super::*;

/// The database password in every store URL here (the test server trusts local
/// connections, so any will do): it must never show.
pub const PASSWORD: &str = "pw-must-not-leak";

/// The shared part of a deployment: PostgreSQL, and the CA made with `ca init --store`
/// in a seed directory whose `ca.key` and `ca.crt` each proxy gets a copy of.
pub struct Deployment {
    pub pg: Postgres,
    pub url: String,
    pub seed: TempDir,
}

impl Deployment {
    pub fn new() -> Deployment {
        let pg = Postgres::start();
        let url = pg
            .url()
            .replace("postgres@", &format!("postgres:{PASSWORD}@"));
        let seed = tempfile::tempdir().unwrap();
        let store = revproxy::store::open(seed.path(), Some(&url)).unwrap();
        Ca::init_in(
            seed.path(),
            store,
            &InitOptions::default(),
            time::OffsetDateTime::now_utc(),
        )
        .unwrap();
        Deployment { pg, url, seed }
    }

    /// An empty state directory with copies of the CA's key and certificate: how an
    /// operator sets up another proxy.
    pub fn member_dir(&self) -> TempDir {
        let dir = tempfile::tempdir().unwrap();
        for file in [revproxy::ca::CA_KEY_FILE, revproxy::ca::CA_CERT_FILE] {
            std::fs::copy(self.seed.path().join(file), dir.path().join(file)).unwrap();
        }
        dir
    }

    /// The CA as an operator's command opens it.
    pub fn ca(&self) -> Ca {
        revproxy::store::open_ca(self.seed.path(), Some(&self.url)).unwrap()
    }

    /// Three proxies, on 127.0.0.1, .2 and .3.
    pub async fn three(
        &self,
        configure: impl Fn(revproxy::ProxyBuilder) -> revproxy::ProxyBuilder,
    ) -> Vec<TestProxy> {
        let mut proxies = Vec::new();
        for ip in ["127.0.0.1", "127.0.0.2", "127.0.0.3"] {
            proxies
                .push(TestProxy::start_member(self.member_dir(), &self.url, ip, &configure).await);
        }
        proxies
    }

    pub fn token(&self, agent: &str, hosts: &[&str], server: SocketAddr) -> Token {
        self.ca()
            .create_token(
                &NewToken {
                    agent: agent.into(),
                    hosts: hosts.iter().map(|h| h.to_string()).collect(),
                    private_hosts: Vec::new(),
                    connect: Vec::new(),
                    ttl: Duration::from_secs(3600),
                    cert_ttl: Duration::from_secs(24 * 3600),
                    server: Some(server.to_string()),
                },
                time::OffsetDateTime::now_utc(),
            )
            .unwrap()
    }

    /// An agent enrolled through `via` serving `name` from `backend`, keeping a tunnel to
    /// every proxy; returns once each of `proxies` has one.
    pub async fn agent(
        &self,
        via: &TestProxy,
        proxies: &[TestProxy],
        agent: &str,
        name: &str,
        backend: SocketAddr,
    ) -> (TempDir, TestAgent) {
        let dir = tempfile::tempdir().unwrap();
        let token = self.token(agent, &[name], via.addr);
        revproxy::agent::enroll(&token, dir.path()).await.unwrap();
        let running = start_agent(dir.path(), &[(name, backend)], |b| {
            b.proxy_refresh(Duration::from_millis(200))
        });
        for p in proxies {
            p.wait_for(name, 1).await;
        }
        (dir, running)
    }
}

/// `revproxy_store_up` on the admin listener at `admin`.
pub async fn store_up(admin: SocketAddr) -> Option<f64> {
    sample(
        &admin_get(admin, "/metrics").await.1,
        "revproxy_store_up",
        "",
    )
}

impl Deployment {
    pub fn ca_pin(&self) -> revproxy::ca::Pin {
        // Read from the seed's certificate: the store is down when this is asked.
        let pem =
            std::fs::read_to_string(self.seed.path().join(revproxy::ca::CA_CERT_FILE)).unwrap();
        revproxy::ca::CertSummary::from_pem(&pem).unwrap().key_pin
    }
}

/// One `revproxy serve` process of a deployment, on its own loopback address.
pub struct ProxyProcess {
    pub child: std::process::Child,
    /// Its log lines not yet read.
    pub logs: std::sync::mpsc::Receiver<String>,
    _dir: TempDir,
    pub http: SocketAddr,
    pub admin: SocketAddr,
    /// Its agent listener (enrollment and tunnels).
    pub agents: SocketAddr,
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ProxyProcess {
    /// Starts `revproxy serve --store` on `ip` and waits for its listeners (from its JSON
    /// log lines): (process, agent listener).
    pub fn start(d: &Deployment, ip: &str) -> (ProxyProcess, SocketAddr) {
        let dir = d.member_dir();
        let any = format!("{ip}:0");
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_revproxy"))
            .args(["serve", "--log-format", "json", "--state"])
            .arg(dir.path())
            .args([
                "--store", &d.url, "--agents", &any, "--http", &any, "--admin", &any,
            ])
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let rx = stderr_lines(&mut child);
        let (mut agents, mut http, mut admin) = (None, None, None);
        while agents.is_none() || http.is_none() || admin.is_none() {
            let line = rx
                .recv_timeout(Duration::from_secs(30))
                .expect("the proxy started within 30 s");
            let Ok(doc) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            let message = doc["message"].as_str().unwrap_or_default();
            let addr = doc["addr"].as_str().and_then(|a| a.parse().ok());
            match message {
                "agent listener ready" => agents = addr,
                "public listener ready" => http = addr,
                "admin listener ready" => admin = addr,
                _ => {}
            }
        }
        (
            ProxyProcess {
                child,
                logs: rx,
                _dir: dir,
                http: http.unwrap(),
                admin: admin.unwrap(),
                agents: agents.unwrap(),
            },
            agents.unwrap(),
        )
    }
}

/// Three loopback addresses, a proxy on each.
pub const THREE: [&str; 3] = ["127.0.0.1", "127.0.0.2", "127.0.0.3"];

impl Deployment {
    /// A `revproxy serve` process on each of `ips` and an agent enrolled through the
    /// first; returns once each proxy routes clients to it.
    pub async fn processes_and_an_agent(
        &self,
        ips: &[&str],
    ) -> (Vec<ProxyProcess>, (TempDir, TestAgent)) {
        let mut procs = Vec::new();
        let mut agent_addrs = Vec::new();
        for ip in ips {
            let (p, agents) = ProxyProcess::start(self, ip);
            procs.push(p);
            agent_addrs.push(agents);
        }
        let backend = echo_backend(b"").await;
        let dir = tempfile::tempdir().unwrap();
        let token = self.token("web-1", &["app.example.com"], agent_addrs[0]);
        revproxy::agent::enroll(&token, dir.path()).await.unwrap();
        let agent = start_agent(dir.path(), &[("app.example.com", backend)], |b| {
            b.proxy_refresh(Duration::from_millis(200))
        });
        // Each one routes to it once the heartbeats have listed them all.
        for p in &procs {
            serves(p.http).await;
        }
        (procs, (dir, agent))
    }
}

/// Waits (bounded) until a client of `http` reaches the agent's echo backend.
pub async fn serves(http: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !round_trip(http, &http_head("app.example.com"), b"ping")
        .await
        .is_ok_and(|got| got.ends_with(b"ping"))
    {
        assert!(Instant::now() < deadline, "{http} never served the agent");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// HAProxy in front of `procs`, configured as docs/operations.md's example (TCP, `/ready`
/// checked on each proxy's admin listener every 200 ms); returns its front address and the
/// running HAProxy with its configuration's directory.
pub fn haproxy_in_front(procs: &[ProxyProcess]) -> (SocketAddr, Killed, TempDir) {
    let haproxy = tool("haproxy");
    // HAProxy takes no port 0 either: a free one from the kernel, handed over.
    let front = SocketAddr::from(([127, 0, 0, 1], free_port("127.0.0.1")));
    let servers: String = (procs.iter().enumerate())
        .map(|(i, p)| {
            format!(
                "    server p{i} {} check port {} inter 200ms fall 2 rise 1\n",
                p.http,
                p.admin.port()
            )
        })
        .collect();
    let config = format!(
        "global\n    maxconn 1000\n\
         defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 10s\n    \
         timeout server 10s\n    retries 3\n    option redispatch\n\
         frontend public\n    bind {front}\n    default_backend proxies\n\
         backend proxies\n    balance roundrobin\n    option httpchk GET /ready\n    \
         http-check expect status 200\n{servers}"
    );
    let files = tempfile::tempdir().unwrap();
    let cfg = files.path().join("haproxy.cfg");
    std::fs::write(&cfg, config).unwrap();
    let lb = Killed(
        std::process::Command::new(haproxy)
            .arg("-db")
            .arg("-f")
            .arg(&cfg)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    (front, lb, files)
}

/// One request through `front` to the agent's echo backend: whether the bytes came back.
pub async fn through(front: SocketAddr, i: u64) -> bool {
    let data = pattern(4096, i);
    round_trip(front, &http_head("app.example.com"), &data)
        .await
        .is_ok_and(|got| got.ends_with(&data))
}
