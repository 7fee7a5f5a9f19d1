//! What only QUIC has to survive: UDP blocked on the way to the proxy (`--transport auto`
//! falls back to h2 and comes back), a dead path (found by the idle timeout), and a changed
//! client address (migration). A UDP relay in front of the proxy's QUIC socket plays the
//! network: it forwards, drops everything, or moves the agent to a new source port.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::Notify;

const WAIT: Duration = Duration::from_secs(10);
const NAME: &str = "app.example.com";

/// A UDP forwarder for one client (the agent) to `upstream`.
struct Relay {
    blocked: Arc<AtomicBool>,
    rebind: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(front: SocketAddr, upstream: SocketAddr, blocked: bool) -> Relay {
        let front = UdpSocket::bind(front)
            .await
            .expect("the relay binds the agent port (udp)");
        let blocked = Arc::new(AtomicBool::new(blocked));
        let rebind = Arc::new(Notify::new());
        let (b, r) = (blocked.clone(), rebind.clone());
        let task = tokio::spawn(async move {
            let mut up = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let mut client = None;
            let (mut from_client, mut from_proxy) = (vec![0u8; 65536], vec![0u8; 65536]);
            loop {
                tokio::select! {
                    Ok((n, addr)) = front.recv_from(&mut from_client) => {
                        client = Some(addr);
                        if !b.load(Ordering::SeqCst) {
                            let _ = up.send_to(&from_client[..n], upstream).await;
                        }
                    }
                    Ok((n, _)) = up.recv_from(&mut from_proxy) => {
                        if let (false, Some(c)) = (b.load(Ordering::SeqCst), client) {
                            let _ = front.send_to(&from_proxy[..n], c).await;
                        }
                    }
                    () = r.notified() => {
                        // As a NAT rebinding would: the proxy now sees another address.
                        up = UdpSocket::bind("127.0.0.1:0").await.unwrap();
                    }
                }
            }
        });
        Relay {
            blocked,
            rebind,
            task,
        }
    }

    fn block(&self, blocked: bool) {
        self.blocked.store(blocked, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A proxy whose QUIC sockets (an endpoint per lane) sit behind a relay on the agent
/// port number.
async fn proxy_behind_relay(blocked: bool) -> (TestProxy, Relay) {
    let quic = shared_udp("127.0.0.1:0".parse().unwrap()).unwrap();
    let quic_addr = quic.local_addr().unwrap();
    let proxy = TestProxy::start_with(move |b| b.quic_listener(quic)).await;
    let relay = Relay::start(proxy.addr, quic_addr, blocked).await;
    (proxy, relay)
}

/// A client connection through the HTTP listener with its head echoed back.
async fn open_stream(proxy: &TestProxy) -> TcpStream {
    let mut tcp = TcpStream::connect(proxy.http).await.unwrap();
    let head = http_head(NAME);
    tcp.write_all(&head).await.unwrap();
    let mut echoed = vec![0; head.len()];
    tcp.read_exact(&mut echoed).await.unwrap();
    assert_eq!(echoed, head);
    tcp
}

/// Writes `data` and reads the same back.
async fn echo(tcp: &mut TcpStream, data: &[u8]) {
    echo_within(tcp, data, WAIT).await
}

/// Writes `data` and reads the same back within `within`.
async fn echo_within(tcp: &mut TcpStream, data: &[u8], within: Duration) {
    tcp.write_all(data).await.unwrap();
    let mut back = vec![0; data.len()];
    tokio::time::timeout(within, tcp.read_exact(&mut back))
        .await
        .expect("echoed in time")
        .unwrap();
    assert!(back == data, "echoed byte-exact");
}

async fn expect_transports(proxy: &TestProxy, transports: &[&str], within: Duration) {
    let ok = proxy
        .status
        .wait_for_transports(NAME, transports, within)
        .await;
    assert!(
        ok,
        "expected tunnels {transports:?}, have {:?}",
        proxy.status.transports_for(NAME)
    );
}

/// A proxy behind a blocked relay and an `auto` agent (fast fallback and re-probe) that
/// has come up over h2.
/// The agent's state directory is returned to live as long as the agent.
async fn auto_agent_with_udp_blocked() -> (TestProxy, Relay, TestAgent, tempfile::TempDir) {
    let (proxy, relay) = proxy_behind_relay(true).await;
    let backend = echo_backend(b"").await;
    let dir = enroll_agent(&proxy, "web-1", &[NAME]).await;
    let agent = start_agent(dir.path(), &[(NAME, backend)], |b| {
        b.transport(Transport::Auto)
            .quic_fallback(Duration::from_millis(500), Duration::from_millis(200))
    });
    expect_transports(&proxy, &["h2"], WAIT).await;
    (proxy, relay, agent, dir)
}

/// Unblocks UDP: the agent opens a QUIC tunnel beside the h2 one, and being the agent's
/// newest it takes every new stream at once (the h2 one stays as a fallback until the
/// agent, after its overlap, retires it and it drains). Every stream meanwhile is served.
async fn unblock_and_move_to_quic(proxy: &TestProxy, relay: &Relay) {
    relay.block(false);
    assert!(
        proxy.status.wait_for_agent("web-1", 2, WAIT).await,
        "the QUIC tunnel registered beside the h2 one"
    );
    expect_transports(proxy, &["quic"], WAIT).await;
    for i in 0..4 {
        let mut tcp = open_stream(proxy).await;
        echo(&mut tcp, &pattern(50_000, 10 + i)).await;
    }
}

#[tokio::test]
async fn auto_falls_back_to_h2_while_udp_is_blocked_and_returns_to_quic() {
    let (proxy, relay, _agent, _dir) = auto_agent_with_udp_blocked().await;

    // UDP blocked: served over h2.
    let mut on_h2 = open_stream(&proxy).await;
    echo(&mut on_h2, &pattern(100_000, 1)).await;

    // UDP back: new streams go over QUIC...
    unblock_and_move_to_quic(&proxy, &relay).await;
    // ...but the stream opened on it runs to its end.
    echo(&mut on_h2, &pattern(100_000, 2)).await;
    on_h2.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, on_h2.read_to_end(&mut rest))
        .await
        .expect("the old stream ends cleanly")
        .unwrap();
    assert!(rest.is_empty());

    // UDP blocked again: the QUIC idle timeout (27 s) finds the dead path, and the agent
    // is back on h2 without anyone restarting it.
    relay.block(true);
    expect_transports(&proxy, &["h2"], Duration::from_secs(45)).await;
    let mut tcp = open_stream(&proxy).await;
    echo(&mut tcp, b"after the fall back").await;
}

#[tokio::test]
async fn revoking_an_agent_also_closes_its_draining_tunnel() {
    // After QUIC comes back the h2 tunnel drains with a stream still open on it. It takes
    // no new streams, but it is the agent's all the same: revoking the agent ends it.
    let (proxy, relay, _agent, _dir) = auto_agent_with_udp_blocked().await;
    let mut on_h2 = open_stream(&proxy).await;
    unblock_and_move_to_quic(&proxy, &relay).await;
    echo(&mut on_h2, b"draining, still served").await;

    proxy
        .ca
        .revoke_certs("web-1", time::OffsetDateTime::now_utc())
        .unwrap();
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(3), on_h2.read_to_end(&mut rest)).await;
    assert!(
        ended.is_ok(),
        "the draining tunnel's stream was cut by the revocation"
    );
    expect_transports(&proxy, &[], WAIT).await;
}

#[tokio::test]
async fn a_quic_tunnel_survives_a_changed_agent_address() {
    let (proxy, relay) = proxy_behind_relay(false).await;
    let backend = echo_backend(b"").await;
    let dir = enroll_agent(&proxy, "web-1", &[NAME]).await;
    let _agent = start_agent(dir.path(), &[(NAME, backend)], on(Transport::Quic));
    expect_transports(&proxy, &["quic"], WAIT).await;

    let mut open = open_stream(&proxy).await;
    echo(&mut open, &pattern(200_000, 3)).await;
    // The open stream carries on over each new path: the tunnel migrated, not
    // reconnected. Each new address is hashed anew by the kernel; the packets still reach
    // the endpoint of their connection (an endpoint per lane, steered by connection ID):
    // another would answer with a stateless reset, and the stream would end. The proxy
    // learns the new address from the agent's next packet: here, where the proxy sends
    // first, its keep-alive, at most 15 s later (until then the proxy's packets go to the
    // old address, as they would to a NAT's forgotten mapping).
    for round in 0..3 {
        relay.rebind.notify_one();
        echo_within(
            &mut open,
            &pattern(200_000, 4 + round),
            Duration::from_secs(25),
        )
        .await;
    }
    let mut fresh = open_stream(&proxy).await;
    echo(&mut fresh, b"new stream after migration").await;
    assert_eq!(proxy.status.transports_for(NAME), ["quic"]);
}

#[tokio::test]
async fn quic_without_udp_keeps_retrying_and_connects_once_udp_works() {
    // `--transport quic` means QUIC only: no fallback, reconnect with backoff until it works.
    let (proxy, relay) = proxy_behind_relay(true).await;
    let backend = echo_backend(b"").await;
    let dir = enroll_agent(&proxy, "web-1", &[NAME]).await;
    let _agent = start_agent(dir.path(), &[(NAME, backend)], on(Transport::Quic));
    // The first attempt cannot complete while UDP is blocked.
    assert!(
        !proxy
            .status
            .wait_for_tunnels(NAME, 1, Duration::from_millis(500))
            .await
    );
    relay.block(false);
    expect_transports(&proxy, &["quic"], Duration::from_secs(30)).await;
    let mut tcp = open_stream(&proxy).await;
    echo(&mut tcp, b"hello over quic").await;
}
