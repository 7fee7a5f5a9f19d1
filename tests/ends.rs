//! How a stream ends reaches the far side, quickly and as it happened, over both
//! transports: a backend that closes mid-stream gives the client the bytes sent and then
//! end-of-file; a backend that resets gives the client a reset (never a clean end, which
//! would make a cut download look complete); a client that resets does the same to the
//! backend; a client that half-closes still gets the whole answer. Each within a second.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use revproxy::Transport;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const NAME: &str = "app.example.com";
const WITHIN: Duration = Duration::from_secs(1);

/// What a backend does once it has read the request head and sent `body`.
#[derive(Clone, Copy)]
enum Then {
    Close,
    Reset,
    /// Reads until the client's side ends; reports how (`Ok(bytes)` at end-of-file).
    Watch,
}

/// A backend for one connection: reads the request head, sends `body`, then does `then`.
/// Returns its address and, for [`Then::Watch`], how the client's side ended.
async fn backend(
    body: Vec<u8>,
    then: Then,
) -> (
    SocketAddr,
    tokio::sync::oneshot::Receiver<(Instant, std::io::Result<usize>)>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut head = vec![0; http_head(NAME).len()];
        tcp.read_exact(&mut head).await.unwrap();
        tcp.write_all(&body).await.unwrap();
        match then {
            Then::Close => drop(tcp),
            Then::Reset => {
                socket2::SockRef::from(&tcp)
                    .set_linger(Some(Duration::ZERO))
                    .unwrap();
                drop(tcp);
            }
            Then::Watch => {
                let mut sink = Vec::new();
                let ended = tcp.read_to_end(&mut sink).await;
                let _ = tx.send((Instant::now(), ended));
            }
        }
    });
    (addr, rx)
}

async fn through(
    t: Transport,
    body: Vec<u8>,
    then: Then,
) -> (
    TestProxy,
    TestAgent,
    TcpStream,
    tokio::sync::oneshot::Receiver<(Instant, std::io::Result<usize>)>,
    tempfile::TempDir,
) {
    let proxy = TestProxy::start().await;
    let (addr, ended) = backend(body, then).await;
    let dir = enroll_agent(&proxy, "web-1", &[NAME]).await;
    let agent = start_agent(dir.path(), &[(NAME, addr)], on(t));
    proxy.wait_for(NAME, 1).await;
    let mut client = TcpStream::connect(proxy.http).await.unwrap();
    client.write_all(&http_head(NAME)).await.unwrap();
    (proxy, agent, client, ended, dir)
}

/// Reads until the stream ends: the bytes, and how it ended.
async fn read_to_end(client: &mut TcpStream) -> (Vec<u8>, std::io::Result<()>) {
    let mut got = Vec::new();
    let mut buf = vec![0; 64 * 1024];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), client.read(&mut buf)).await {
            Err(_) => return (got, Err(std::io::ErrorKind::TimedOut.into())),
            Ok(Ok(0)) => return (got, Ok(())),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => return (got, Err(e)),
        }
    }
}

async fn a_backend_that_closes_gives_the_client_its_bytes_then_the_end(t: Transport) {
    let body = pattern(300_000, 1);
    let (_proxy, _agent, mut client, _, _dir) = through(t, body.clone(), Then::Close).await;
    let started = Instant::now();
    let (got, ended) = read_to_end(&mut client).await;
    ended.expect("a clean end");
    assert!(got == body, "every byte the backend sent, then the end");
    assert!(started.elapsed() < WITHIN, "{:?}", started.elapsed());
}

async fn a_backend_that_resets_gives_the_client_a_reset(t: Transport) {
    let body = pattern(100_000, 2);
    let (_proxy, _agent, mut client, _, _dir) = through(t, body, Then::Reset).await;
    let started = Instant::now();
    let (_, ended) = read_to_end(&mut client).await;
    let err = ended.expect_err("a reset, not a clean end");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    assert!(started.elapsed() < WITHIN, "{:?}", started.elapsed());
}

async fn a_client_that_resets_gives_the_backend_a_reset(t: Transport) {
    let (_proxy, _agent, client, ended, _dir) = through(t, b"hello".to_vec(), Then::Watch).await;
    let mut client = client;
    let mut hello = [0u8; 5];
    client.read_exact(&mut hello).await.unwrap();
    socket2::SockRef::from(&client)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(client);
    let reset = Instant::now();
    let (at, how) = tokio::time::timeout(Duration::from_secs(10), ended)
        .await
        .expect("the backend saw the end within 10 s")
        .unwrap();
    let err = how.expect_err("a reset, not a clean end");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    assert!(
        at.duration_since(reset) < WITHIN,
        "{:?}",
        at.duration_since(reset)
    );
}

async fn a_client_that_half_closes_still_gets_the_whole_answer(t: Transport) {
    let body = pattern(500_000, 3);
    let (_proxy, _agent, mut client, ended, _dir) = through(t, body.clone(), Then::Watch).await;
    client.shutdown().await.unwrap();
    let closed = Instant::now();
    let (at, how) = tokio::time::timeout(Duration::from_secs(10), ended)
        .await
        .expect("the backend saw the end")
        .unwrap();
    assert_eq!(how.expect("a clean end-of-file"), 0);
    assert!(at.duration_since(closed) < WITHIN);
    // The backend's answer still arrives whole after the client's half-close.
    let mut got = vec![0; body.len()];
    client.read_exact(&mut got).await.unwrap();
    assert!(got == body);
}

over_both_transports!(
    a_backend_that_closes_gives_the_client_its_bytes_then_the_end,
    a_backend_that_resets_gives_the_client_a_reset,
    a_client_that_resets_gives_the_backend_a_reset,
    a_client_that_half_closes_still_gets_the_whole_answer,
    an_agent_gone_mid_download_gives_the_client_a_reset_not_a_clean_end,
);

/// The same through a static `tcp://` route, where no tunnel is involved.
#[tokio::test]
async fn a_static_route_passes_a_backend_reset_on() {
    let (addr, _) = backend(pattern(50_000, 4), Then::Reset).await;
    let proxy = TestProxy::start_with(|b| b.route(NAME, &addr.to_string())).await;
    let mut client = TcpStream::connect(proxy.http).await.unwrap();
    client.write_all(&http_head(NAME)).await.unwrap();
    let started = Instant::now();
    let (_, ended) = read_to_end(&mut client).await;
    let err = ended.expect_err("a reset, not a clean end");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    assert!(started.elapsed() < WITHIN, "{:?}", started.elapsed());
}

/// An agent that stops in the middle of a download (its task aborted, as a crash of an
/// embedding program or the end of its drain grace would) gives the client a reset: the
/// stream it was sending must not end cleanly (quinn finishes a send stream it drops; the
/// soak caught clients getting 4,096 bytes of a larger answer and a clean end).
async fn an_agent_gone_mid_download_gives_the_client_a_reset_not_a_clean_end(t: Transport) {
    let proxy = TestProxy::start().await;
    // A backend that sends the first part of its answer and then waits.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        tcp.write_all(&pattern(64 * 1024, 5)).await.unwrap();
        let mut sink = Vec::new();
        let _ = tcp.read_to_end(&mut sink).await;
    });
    let dir = enroll_agent(&proxy, "web-1", &[NAME]).await;
    let agent = start_agent(dir.path(), &[(NAME, addr)], on(t));
    proxy.wait_for(NAME, 1).await;
    let mut client = TcpStream::connect(proxy.http).await.unwrap();
    client.write_all(&http_head(NAME)).await.unwrap();
    let mut first = vec![0u8; 64 * 1024];
    client.read_exact(&mut first).await.unwrap();
    agent.kill();
    let (_, ended) = read_to_end(&mut client).await;
    let err = ended.expect_err("an error, not a clean end");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
}
