//! PROXY protocol with real third-party software: nginx behind an agent (`listen ...
//! proxy_protocol`, answering with `$proxy_protocol_addr`), HAProxy in front of the proxy
//! (`send-proxy-v2`), curl as the client from an address of its own (127.0.0.9), so that the
//! address nginx reports can only have come through the headers.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use revproxy::agent::ProxyProtocol;

/// The address curl connects from.
const CLIENT_IP: &str = "127.0.0.9";
/// The address HAProxy connects to the proxy from: the only trusted source.
const BALANCER_IP: &str = "127.0.0.5";

/// nginx on two ports that both expect a PROXY header (nginx reads v1 and v2 alike) and
/// answer with the client address the header carried.
struct Nginx {
    child: std::process::Child,
    _dir: tempfile::TempDir,
    ports: [u16; 2],
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Nginx {
    fn start() -> Nginx {
        let nginx = tool("nginx");
        let dir = tempfile::tempdir().unwrap();
        let ports = [free_port("127.0.0.1"), free_port("127.0.0.1")];
        let servers: String = ports
            .iter()
            .map(|port| {
                format!(
                    "server {{ listen 127.0.0.1:{port} proxy_protocol; \
                     location / {{ return 200 \"client=$proxy_protocol_addr:$proxy_protocol_port\\n\"; }} }}\n"
                )
            })
            .collect();
        let d = dir.path().display();
        let config = format!(
            "daemon off; master_process off; pid {d}/nginx.pid; error_log stderr;\n\
             events {{}}\n\
             http {{ access_log off; client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n{servers}}}\n"
        );
        let file = dir.path().join("nginx.conf");
        std::fs::write(&file, config).unwrap();
        let mut child = std::process::Command::new(nginx)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&file)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let _lines = stderr_lines(&mut child);
        for port in ports {
            wait_until_listening(("127.0.0.1", port));
        }
        Nginx {
            child,
            _dir: dir,
            ports,
        }
    }

    fn addr(&self, i: usize) -> SocketAddr {
        ([127, 0, 0, 1], self.ports[i]).into()
    }
}

/// Waits (bounded) until something accepts on `addr`: a program started with a port it
/// was handed.
fn wait_until_listening(addr: (&str, u16)) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "nothing listens on {addr:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `curl` from [`CLIENT_IP`]: (exit status, body).
fn curl(url: &str, host: &str, extra: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(tool("curl"))
        .args(["-sS", "--max-time", "10", "--interface", CLIENT_IP, "-H"])
        .arg(format!("Host: {host}"))
        .args(extra)
        .arg(url)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// An agent serving `v1.example.com` and `v2.example.com` from nginx with PROXY v1 and v2.
async fn proxy_with_agent(
    t: Transport,
    configure: impl FnOnce(revproxy::ProxyBuilder) -> revproxy::ProxyBuilder,
) -> (TestProxy, Nginx, TestAgent, tempfile::TempDir) {
    let nginx = Nginx::start();
    let proxy = TestProxy::start_with(configure).await;
    let dir = enroll_agent(&proxy, "web-1", &["v1.example.com", "v2.example.com"]).await;
    let (a1, a2) = (nginx.addr(0).to_string(), nginx.addr(1).to_string());
    let agent = start_agent(dir.path(), &[], move |b| {
        b.transport(t)
            .service_with_proxy_protocol("v1.example.com", &a1, ProxyProtocol::V1)
            .service_with_proxy_protocol("v2.example.com", &a2, ProxyProtocol::V2)
    });
    proxy.wait_for("v2.example.com", 1).await;
    (proxy, nginx, agent, dir)
}

/// The address curl used arrives at nginx, in a v1 and in a v2 header, through the tunnel.
async fn nginx_behind_an_agent_sees_the_client_address(t: Transport) {
    let (proxy, _nginx, _agent, _dir) = proxy_with_agent(t, |b| b).await;
    let url = format!("http://{}/", proxy.http);
    for host in ["v1.example.com", "v2.example.com"] {
        let (status, body) = tokio::task::spawn_blocking({
            let url = url.clone();
            move || curl(&url, host, &[])
        })
        .await
        .unwrap();
        assert_eq!(status, 0, "{host}: {body}");
        assert!(
            body.starts_with(&format!("client={CLIENT_IP}:")),
            "{host}: {body}"
        );
    }
}

/// HAProxy in front sends PROXY v2 from the trusted address; the client it names is the
/// one nginx sees. A client elsewhere that sends its own PROXY header is not believed: it
/// is a plain client whose request does not parse. A trusted source that sends no header
/// is closed.
async fn a_trusted_balancer_is_believed_and_nobody_else(t: Transport) {
    let trusted: revproxy::proxy::Cidr = format!("{BALANCER_IP}/32").parse().unwrap();
    let (proxy, _nginx, _agent, _dir) =
        proxy_with_agent(t, move |b| b.trusted_proxies(vec![trusted])).await;

    let front = free_port("127.0.0.1");
    let config = format!(
        "defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 10s\n    timeout server 10s\n\
         frontend public\n    bind 127.0.0.1:{front}\n    default_backend revproxy\n\
         backend revproxy\n    server p {} send-proxy-v2 source {BALANCER_IP}\n",
        proxy.http
    );
    let files = tempfile::tempdir().unwrap();
    let cfg = files.path().join("haproxy.cfg");
    std::fs::write(&cfg, config).unwrap();
    let _haproxy = Killed(
        std::process::Command::new(tool("haproxy"))
            .args(["-db", "-f"])
            .arg(&cfg)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_until_listening(("127.0.0.1", front));

    let through_balancer = format!("http://127.0.0.1:{front}/");
    let direct = format!("http://{}/", proxy.http);
    let (ok, plain) = tokio::task::spawn_blocking(move || {
        (
            curl(&through_balancer, "v2.example.com", &[]),
            curl(&direct, "v1.example.com", &[]),
        )
    })
    .await
    .unwrap();
    assert_eq!(ok.0, 0, "{}", ok.1);
    assert!(
        ok.1.starts_with(&format!("client={CLIENT_IP}:")),
        "{}",
        ok.1
    );
    // The same client straight to the proxy is served as itself.
    assert!(
        plain.1.starts_with(&format!("client={CLIENT_IP}:")),
        "{}",
        plain.1
    );

    // From an untrusted address, a PROXY header claiming 203.0.113.66: not believed; the
    // connection is a plain client whose request does not parse.
    let mut forged = b"PROXY TCP4 203.0.113.66 127.0.0.1 40000 80\r\n".to_vec();
    forged.extend_from_slice(&http_head("v1.example.com"));
    let answer = exchange_from(CLIENT_IP, proxy.http, &forged).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(
        !answer.contains("203.0.113.66"),
        "a forged header was believed: {answer}"
    );

    // The trusted address without a header: closed, not served.
    let answer = exchange_from(BALANCER_IP, proxy.http, &http_head("v2.example.com")).await;
    assert!(answer.is_empty(), "{answer}");
}

/// Sends `bytes` from the local address `ip` to `to` and reads the whole answer.
async fn exchange_from(ip: &str, to: SocketAddr, bytes: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{ip}:0").parse().unwrap()).unwrap();
    let mut tcp = socket.connect(to).await.unwrap();
    tcp.write_all(bytes).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut answer))
        .await
        .expect("answered or closed, not hanging")
        .ok();
    String::from_utf8_lossy(&answer).into_owned()
}

/// The proxy's own static backends get the header too: a `[[route]]` (v1, with the name in
/// its Host) and a fixed `tcp://` listener (v2).
#[tokio::test]
async fn static_routes_and_fixed_listeners_send_the_header_too() {
    let nginx = Nginx::start();
    let (a1, a2) = (nginx.addr(0).to_string(), nginx.addr(1).to_string());
    let fixed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let fixed_addr = fixed.local_addr().unwrap();
    let proxy = TestProxy::start_with(move |b| {
        b.route("static.example.com", &a1)
            .static_proxy_protocol(&a1, ProxyProtocol::V1)
            .listener(
                fixed,
                revproxy::ListenerKind::Fixed(revproxy::Target::Tcp(a2.clone())),
            )
            .static_proxy_protocol(&a2, ProxyProtocol::V2)
    })
    .await;
    let (routed, listened) = tokio::task::spawn_blocking(move || {
        (
            curl(
                &format!("http://{}/", proxy.http),
                "static.example.com",
                &[],
            ),
            curl(&format!("http://{fixed_addr}/"), "anything", &[]),
        )
    })
    .await
    .unwrap();
    for (what, (status, body)) in [("route", routed), ("fixed listener", listened)] {
        assert_eq!(status, 0, "{what}: {body}");
        assert!(
            body.starts_with(&format!("client={CLIENT_IP}:")),
            "{what}: {body}"
        );
    }
}

/// A granted port (`token create --tcp-port`) carries the client's address to its
/// backend as a name does: nginx behind `--map tcp:PORT=...` with PROXY v2 answers with
/// curl's address.
async fn a_granted_port_gives_its_backend_the_client_address(t: Transport) {
    let nginx = Nginx::start();
    let port = free_port("127.0.0.1");
    let loopback = std::net::IpAddr::from([127, 0, 0, 1]);
    let range = revproxy::ca::ports::PortRange {
        low: port,
        high: port,
    };
    let proxy = TestProxy::start_with(move |b| b.granted_ports(range, loopback)).await;
    let name = format!("tcp:{port}");
    let dir = enroll_agent(&proxy, "web-1", &[&name]).await;
    let backend = nginx.addr(1).to_string();
    let service = name.clone();
    let _agent = start_agent(dir.path(), &[], move |b| {
        b.transport(t)
            .service_with_proxy_protocol(&service, &backend, ProxyProtocol::V2)
    });
    proxy.wait_for(&name, 1).await;
    let url = format!("http://127.0.0.1:{port}/");
    let (status, body) = tokio::task::spawn_blocking(move || {
        // The listener follows the tunnel's registration by a moment.
        wait_until_listening(("127.0.0.1", port));
        curl(&url, "anything", &[])
    })
    .await
    .unwrap();
    assert_eq!(status, 0, "{body}");
    assert!(body.starts_with(&format!("client={CLIENT_IP}:")), "{body}");
}

over_both_transports!(
    nginx_behind_an_agent_sees_the_client_address,
    a_trusted_balancer_is_believed_and_nobody_else,
    a_granted_port_gives_its_backend_the_client_address,
);
