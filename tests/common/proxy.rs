//! A real proxy for a test: its own CA in a temporary directory, an agent listener (TCP
//! and QUIC on one port number), SNI and HTTP listeners, all on loopback ports the kernel
//! picks; and proxies that share a store with others.

use super::*;

/// A running proxy with an agent listener, an SNI listener and an HTTP listener.
/// Dropping it shuts the proxy down.
pub struct TestProxy {
    pub dir: TempDir,
    /// The agent listener.
    pub addr: SocketAddr,
    pub sni: SocketAddr,
    pub http: SocketAddr,
    /// A second handle on the CA, as an operator's `revproxy token create` would have.
    pub ca: Ca,
    pub status: ProxyStatus,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

pub(super) async fn bind(addr: &str) -> tokio::net::TcpListener {
    revproxy::runtime::listen(addr.parse().unwrap()).unwrap()
}

/// The agent port: TCP on a port the kernel picks, and UDP (QUIC) on the same number. An
/// agent's QUIC socket elsewhere in the suite may hold that UDP port, so pick again then.
async fn bind_agent_port() -> (tokio::net::TcpListener, std::net::UdpSocket) {
    bind_agent_port_on("127.0.0.1").await
}

async fn bind_agent_port_on(ip: &str) -> (tokio::net::TcpListener, std::net::UdpSocket) {
    for _ in 0..100 {
        let tcp = bind(&format!("{ip}:0")).await;
        if let Ok(udp) = shared_udp(tcp.local_addr().unwrap()) {
            return (tcp, udp);
        }
    }
    panic!("no port number free on both TCP and UDP");
}

/// A UDP socket that shares its port (`SO_REUSEPORT`): the proxy binds one more per
/// lane beside it, an endpoint on each, as on its default port.
pub fn shared_udp(addr: std::net::SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

fn launch(
    dir: &std::path::Path,
    [agents, sni, http]: [tokio::net::TcpListener; 3],
    quic: std::net::UdpSocket,
    configure: impl FnOnce(ProxyBuilder) -> ProxyBuilder,
) -> (ProxyStatus, oneshot::Sender<()>, JoinHandle<()>) {
    let builder = Proxy::builder(dir)
        .agent_listener(agents)
        .quic_listener(quic)
        .sni_listener(sni)
        .http_listener(http)
        .shutdown_grace(Duration::from_secs(1));
    let proxy = configure(builder).build().unwrap();
    let status = proxy.status();
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(async move {
        proxy
            .run(async {
                let _ = rx.await;
            })
            .await
            .unwrap();
    });
    (status, tx, task)
}

impl TestProxy {
    pub async fn start() -> TestProxy {
        TestProxy::start_with(|b| b).await
    }

    pub async fn start_with(configure: impl FnOnce(ProxyBuilder) -> ProxyBuilder) -> TestProxy {
        let dir = tempfile::tempdir().unwrap();
        let now = time::OffsetDateTime::now_utc();
        Ca::init(dir.path(), &InitOptions::default(), now).unwrap();
        TestProxy::start_on(dir, None, "127.0.0.1", configure).await
    }

    /// A proxy on the loopback address `ip` whose CA state is in the shared store `url`,
    /// from `dir` (which holds the CA's key and certificate, as an operator copies them).
    pub async fn start_member(
        dir: TempDir,
        url: &str,
        ip: &str,
        configure: impl FnOnce(ProxyBuilder) -> ProxyBuilder,
    ) -> TestProxy {
        TestProxy::start_on(dir, Some(url), ip, configure).await
    }

    /// A proxy on `ip` over the CA in `dir`, its state in the store `url` if given.
    async fn start_on(
        dir: TempDir,
        url: Option<&str>,
        ip: &str,
        configure: impl FnOnce(ProxyBuilder) -> ProxyBuilder,
    ) -> TestProxy {
        init_logging();
        let (agents, quic) = bind_agent_port_on(ip).await;
        let any = format!("{ip}:0");
        let listeners = [agents, bind(&any).await, bind(&any).await];
        let addr = listeners[0].local_addr().unwrap();
        let sni = listeners[1].local_addr().unwrap();
        let http = listeners[2].local_addr().unwrap();
        let store = url.map(str::to_string);
        let (status, shutdown, task) = launch(dir.path(), listeners, quic, move |b| {
            configure(match &store {
                Some(url) => b.store(url),
                None => b,
            })
        });
        let ca = revproxy::store::open_ca(dir.path(), url).unwrap();
        TestProxy {
            dir,
            addr,
            sni,
            http,
            ca,
            status,
            shutdown: Some(shutdown),
            task: Some(task),
        }
    }

    /// Stops the proxy and starts a new one on the same ports and state.
    pub async fn restart(&mut self) {
        self.pause().await;
        self.resume().await;
    }

    /// Stops the proxy (its ports close; [`Self::resume`] starts it again).
    pub async fn pause(&mut self) {
        self.shutdown.take().unwrap().send(()).ok();
        self.task.take().unwrap().await.unwrap();
    }

    /// Starts a proxy again on the same ports and state after [`Self::pause`].
    pub async fn resume(&mut self) {
        self.resume_with(|b| b).await
    }

    /// Like [`Self::resume`], with whatever `configure` sets on the builder.
    pub async fn resume_with(&mut self, configure: impl FnOnce(ProxyBuilder) -> ProxyBuilder) {
        let listeners = [
            bind(&self.addr.to_string()).await,
            bind(&self.sni.to_string()).await,
            bind(&self.http.to_string()).await,
        ];
        let quic = std::net::UdpSocket::bind(self.addr).unwrap();
        let (status, shutdown, task) = launch(self.dir.path(), listeners, quic, configure);
        self.status = status;
        self.shutdown = Some(shutdown);
        self.task = Some(task);
    }

    /// Waits (bounded) until `count` tunnels serve `name`.
    pub async fn wait_for(&self, name: &str, count: usize) {
        let ok = self
            .status
            .wait_for_tunnels(name, count, Duration::from_secs(10))
            .await;
        assert!(
            ok,
            "{name} never had {count} tunnel(s); it has {}",
            self.status.tunnels_for(name)
        );
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
                    private_hosts: Vec::new(),
                    connect: Vec::new(),
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
