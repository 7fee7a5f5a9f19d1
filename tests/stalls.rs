//! Clients and backends that stop reading must hold back only their own streams: any
//! number of them (up to the stream limit) leave every other stream of the tunnel moving,
//! in both directions and over both transports; and a stream whose reader accepts nothing
//! for the send timeout is reset and its connection closed. And one agent holds ten
//! thousand clients open at once, stalled readers among them, each still served.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use revproxy::Transport;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// More stalled streams than the old 256 MiB connection window could hold at 8 MiB each.
const STALLED: usize = 40;

/// A backend that writes without end to every connection; counts what it wrote.
async fn firehose() -> (std::net::SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let written = Arc::new(AtomicU64::new(0));
    let counter = written.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let chunk = pattern(64 * 1024, 7);
                while tcp.write_all(&chunk).await.is_ok() {
                    counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                }
            });
        }
    });
    (addr, written)
}

/// A backend that accepts and never reads; counts its connections.
async fn sink() -> (std::net::SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::Relaxed);
            held.push(tcp);
        }
    });
    (addr, accepted)
}

/// Waits until `counter` stops moving (every stalled stream is full), at most 60 s.
async fn until_still(counter: &AtomicU64) {
    let mut last = u64::MAX;
    for _ in 0..120 {
        let now = counter.load(Ordering::Relaxed);
        if now == last {
            return;
        }
        last = now;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("the stalled streams never filled up");
}

/// A proxy and an agent serving `app` (echo), `big` (firehose) and `sink` (never reads).
/// Dropping it stops both and removes the agent's state.
struct Setup {
    proxy: TestProxy,
    /// Bytes the firehose wrote.
    written: Arc<AtomicU64>,
    /// Connections the sink accepted.
    accepted: Arc<AtomicU64>,
    _agent: TestAgent,
    _dir: tempfile::TempDir,
}

async fn setup(
    t: Transport,
    configure: impl FnOnce(revproxy::ProxyBuilder) -> revproxy::ProxyBuilder,
    agent_configure: impl FnOnce(revproxy::AgentBuilder) -> revproxy::AgentBuilder,
) -> Setup {
    let proxy = TestProxy::start_with(configure).await;
    let echo = echo_backend(b"").await;
    let (big, written) = firehose().await;
    let (sink, accepted) = sink().await;
    let names = ["app.example.com", "big.example.com", "sink.example.com"];
    let dir = enroll_agent(&proxy, "web-1", &names).await;
    let agent = start_agent(
        dir.path(),
        &[(names[0], echo), (names[1], big), (names[2], sink)],
        |b| agent_configure(b.transport(t)),
    );
    proxy.wait_for("app.example.com", 1).await;
    Setup {
        proxy,
        written,
        accepted,
        _agent: agent,
        _dir: dir,
    }
}

/// A 4 MiB round trip through the tunnel must finish, and quickly.
async fn a_transfer_still_moves(http: std::net::SocketAddr) {
    let data = pattern(4 * 1024 * 1024, 99);
    let back = tokio::time::timeout(
        Duration::from_secs(15),
        round_trip(http, &http_head("app.example.com"), &data),
    )
    .await
    .expect("a transfer stalled behind the streams that stopped reading")
    .unwrap();
    assert!(back.ends_with(&data));
}

async fn stalled_downloads_leave_the_other_streams_moving(t: Transport) {
    let s = setup(t, |b| b, |b| b).await;
    let (proxy, written) = (&s.proxy, &s.written);
    let mut stalled = Vec::new();
    for _ in 0..STALLED {
        let mut tcp = TcpStream::connect(proxy.http).await.unwrap();
        tcp.write_all(&http_head("big.example.com")).await.unwrap();
        stalled.push(tcp); // never read
    }
    until_still(written).await;
    a_transfer_still_moves(proxy.http).await;
}

async fn stalled_uploads_leave_the_other_streams_moving(t: Transport) {
    let s = setup(t, |b| b, |b| b).await;
    let (proxy, accepted) = (&s.proxy, &s.accepted);
    let sent = Arc::new(AtomicU64::new(0));
    let mut uploads = Vec::new();
    for _ in 0..STALLED {
        let mut tcp = TcpStream::connect(proxy.http).await.unwrap();
        tcp.write_all(&http_head("sink.example.com")).await.unwrap();
        let sent = sent.clone();
        uploads.push(tokio::spawn(async move {
            let chunk = pattern(64 * 1024, 3);
            while tcp.write_all(&chunk).await.is_ok() {
                sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
        }));
    }
    until_still(&sent).await;
    assert_eq!(accepted.load(Ordering::Relaxed), STALLED as u64);
    a_transfer_still_moves(proxy.http).await;
}

/// Stalled downloads pin little at the proxy: as streams multiply, the windows narrow so
/// that all of them together stay near the budget (bytes granted before a narrowing stay
/// granted), and no stream is ended for it. What the proxy holds is measured from both
/// ends: the bytes the agent read from the backend (and sent up the tunnel, less at most a
/// read it still holds) less those the proxy wrote to its clients' sockets.
///
/// h2 only: quinn fixes a QUIC stream's window when its tunnel starts, so a stalled QUIC
/// stream holds its full window until the send timeout or the minimum-progress rule cuts
/// it (`tunnel/pump.rs`).
#[tokio::test]
async fn h2_stalled_downloads_pin_little_beyond_the_budget() {
    let t = Transport::H2;
    const BUDGET: u64 = 8 * 1024 * 1024;
    let (proxy_admin, proxy_admin_addr) = local_listener();
    let (agent_admin, agent_admin_addr) = local_listener();
    // Stalled for as long as the test takes: the minimum-progress rule is tested below.
    let patient = Duration::from_secs(600);
    let s = setup(
        t,
        |b| (b.stream_buffer_budget(BUDGET).admin_listener(proxy_admin)).send_timeout(patient),
        |b| b.admin_listener(agent_admin),
    )
    .await;
    let (proxy, written) = (&s.proxy, &s.written);
    let mut stalled = Vec::new();
    for _ in 0..STALLED {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut tcp = socket.connect(proxy.http).await.unwrap();
        tcp.write_all(&http_head("big.example.com")).await.unwrap();
        stalled.push(tcp); // not read, for now
    }
    until_still(written).await;
    let (_, proxy_metrics) = admin_get(proxy_admin_addr, "/metrics").await;
    let (_, agent_metrics) = admin_get(agent_admin_addr, "/metrics").await;
    let host = r#"host="big.example.com""#;
    let to_clients = sample(&proxy_metrics, "revproxy_sent_bytes_total", host).unwrap();
    let service = r#"service="big.example.com""#;
    let up_tunnel = sample(
        &agent_metrics,
        "revproxy_agent_received_bytes_total",
        service,
    )
    .unwrap();
    let held = (up_tunnel - to_clients) / STALLED as f64;
    let window = sample(&proxy_metrics, "revproxy_stream_window_bytes", "").unwrap();
    eprintln!("{t:?}: {held:.0} bytes held per stalled stream, windows now {window}");
    // 40 streams at full windows would need 80 MiB: the windows narrowed to the floor.
    assert_eq!(window, 64.0 * 1024.0, "the windows did not narrow");
    assert_eq!(
        sample(&proxy_metrics, "revproxy_receiving_streams", "").unwrap(),
        STALLED as f64
    );
    // About twice the budget over 40 streams (0.4 MiB each) and the agent's last read
    // (up to 512 KiB on h2); the full windows of main were more than 2 MiB each.
    assert!(
        held < 1024.0 * 1024.0,
        "{held:.0} bytes held per stalled stream: the budget did not bound them"
    );
    // The budget is spent, and another client still gets its transfer.
    a_transfer_still_moves(proxy.http).await;
    // No stalled stream was ended: each goes on once its client reads again, with the
    // backend's bytes in order.
    let chunk = pattern(64 * 1024, 7);
    for tcp in &mut stalled {
        let mut got = vec![0u8; 3 * 1024 * 1024];
        tokio::time::timeout(Duration::from_secs(20), tcp.read_exact(&mut got))
            .await
            .expect("a stalled stream did not move again")
            .expect("a stalled stream was ended");
        // The firehose writes its chunk over and over from the first byte.
        for (i, part) in got.chunks(chunk.len()).enumerate() {
            assert!(
                part == &chunk[..part.len()],
                "chunk {i} of a resumed stream differs"
            );
        }
    }
}

/// The proxy resets a stream whose client accepted nothing for the send timeout, and
/// closes the client; the agent does the same for a backend that stops reading.
async fn a_stream_nobody_reads_is_reset_after_the_send_timeout(t: Transport) {
    let timeout = Duration::from_secs(1);
    let s = setup(t, |b| b.send_timeout(timeout), |b| b.send_timeout(timeout)).await;
    let proxy = &s.proxy;

    // Download: the client stops reading, then reads again much later: it gets what was
    // buffered, then the end, not an endless stream.
    let mut download = TcpStream::connect(proxy.http).await.unwrap();
    download
        .write_all(&http_head("big.example.com"))
        .await
        .unwrap();
    tokio::time::sleep(timeout * 4).await;
    let mut got = 0usize;
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match download.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got += n,
            }
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "still streaming after {got} bytes: never reset"
    );

    // Upload: the backend never reads; the client's writes fail once the agent gave up.
    let mut upload = TcpStream::connect(proxy.http).await.unwrap();
    upload
        .write_all(&http_head("sink.example.com"))
        .await
        .unwrap();
    let failed = tokio::time::timeout(Duration::from_secs(30), async {
        let chunk = pattern(64 * 1024, 5);
        while upload.write_all(&chunk).await.is_ok() {}
    })
    .await;
    assert!(failed.is_ok(), "an upload nobody reads was never reset");
}

/// With an idle timeout set (it is off by default), a stream that moves no byte either
/// way for that long is closed: by the proxy for its client, and by the agent for its
/// backend.
async fn an_idle_stream_is_closed_after_the_idle_timeout(t: Transport) {
    let idle = Duration::from_secs(1);
    for (on_proxy, on_agent) in [(Some(idle), None), (None, Some(idle))] {
        let s = setup(
            t,
            |b| match on_proxy {
                Some(d) => b.idle_timeout(d),
                None => b,
            },
            |b| match on_agent {
                Some(d) => b.idle_timeout(d),
                None => b,
            },
        )
        .await;
        let proxy = &s.proxy;
        let mut client = TcpStream::connect(proxy.http).await.unwrap();
        let head = http_head("app.example.com");
        client.write_all(&head).await.unwrap();
        let mut echoed = vec![0u8; head.len()];
        client.read_exact(&mut echoed).await.unwrap();
        assert_eq!(echoed, head);
        // Then nothing either way: the stream must end, not wait forever.
        let started = std::time::Instant::now();
        let mut rest = Vec::new();
        let ended =
            tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut rest)).await;
        assert!(
            ended.is_ok(),
            "an idle stream was never closed (proxy {on_proxy:?}, agent {on_agent:?})"
        );
        assert!(
            started.elapsed() >= idle / 2,
            "closed before it was idle: {:?}",
            started.elapsed()
        );
    }
}

/// Clients held open at once through one agent: about ten tunnels' worth of streams.
const HELD: usize = 10_000;
/// Clients being connected and answered at once while the held ones pile up: quick, yet
/// few enough that the listener's SYN queue never overflows.
const OPENING: usize = 256;
/// How long one client may wait for its echo: longer than the proxy's 15 s open deadline,
/// so that a client who got no stream sees the proxy's answer, not this timeout.
const ECHO_TIMEOUT: Duration = Duration::from_secs(30);

/// Raises this process's open-file limit to its hard limit, which must allow one
/// descriptor per held client and some to spare (the proxy, the agent and the backend
/// are processes of their own, each with its own limit).
fn raise_open_files() {
    let (_, hard) = rlimit::Resource::NOFILE.get().unwrap();
    let needed = (HELD + 4 * STALLED + 1024) as u64;
    assert!(
        hard >= needed,
        "holding {HELD} clients takes {needed} open files in this process; the hard limit is {hard}"
    );
    rlimit::Resource::NOFILE.set(hard, hard).unwrap();
}

/// Sends `message` on `tcp` and reads back exactly as many bytes, which must be the same.
async fn echoed(tcp: &mut TcpStream, message: &[u8]) -> Result<(), String> {
    tcp.write_all(message)
        .await
        .map_err(|e| format!("could not send: {e}"))?;
    let mut back = vec![0u8; message.len()];
    let mut got = 0;
    let read = tokio::time::timeout(ECHO_TIMEOUT, async {
        while got < back.len() {
            match tcp.read(&mut back[got..]).await {
                Ok(0) => return Err("closed".to_string()),
                Ok(n) => got += n,
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(())
    })
    .await;
    let said = || String::from_utf8_lossy(&back[..got.min(120)]).into_owned();
    match read {
        Err(_) => Err(format!("no echo within {ECHO_TIMEOUT:?}; got {:?}", said())),
        Ok(Err(e)) => Err(format!("{e} after {got} bytes: {:?}", said())),
        Ok(Ok(())) if back != message => Err(format!("a different echo: {:?}", said())),
        Ok(Ok(())) => Ok(()),
    }
}

/// A unique line for client `i` in round `round`.
fn line(i: usize, round: u8) -> Vec<u8> {
    format!("client {i} says hello in round {round}\n").into_bytes()
}

/// Ten thousand clients of one agent, all held open at once, are each served byte-exact:
/// each is answered as it comes while every one before it stays open, and once all are
/// open each is answered again. Forty clients that stopped reading a firehose, there
/// from the start, hold back none of them, nor a transfer of some MiB after them. The
/// clients outnumber what one tunnel carries (1,023 streams): the agent adds tunnels.
///
/// The proxy, the agent and the backend run as processes of their own, as in a
/// deployment: each holds one side of every connection ([`Apart`]).
async fn ten_thousand_clients_held_open_through_one_agent_are_all_served_beside_stalled_readers(
    t: Transport,
) {
    raise_open_files();
    let started = std::time::Instant::now();
    // All clients come from 127.0.0.1, as from one large NAT: its operator lifts the
    // per-source cap. The stalled readers stay stalled for the whole test.
    let (big, written) = firehose().await;
    let config = "max_connections_per_source = 20000\nsend_timeout = \"600s\"";
    let apart = Apart::start(t, config, &[("big.example.com", big)]).await;
    let http = apart.http;

    let mut stalled = Vec::new();
    for _ in 0..STALLED {
        let mut tcp = TcpStream::connect(http).await.unwrap();
        tcp.write_all(&http_head("big.example.com")).await.unwrap();
        stalled.push(tcp); // never read
    }
    until_still(&written).await;
    let stalled_at = started.elapsed();

    // Round 1: each client is answered as it comes; none is let go.
    let mut held = Vec::with_capacity(HELD);
    let mut opening = tokio::task::JoinSet::new();
    let mut next = 0;
    while held.len() < HELD {
        while next < HELD && opening.len() < OPENING {
            let i = next;
            next += 1;
            opening.spawn(async move {
                let mut tcp = TcpStream::connect(http)
                    .await
                    .map_err(|e| format!("client {i} could not connect: {e}"))?;
                let mut hello = http_head("app.example.com");
                hello.extend_from_slice(&line(i, 1));
                echoed(&mut tcp, &hello)
                    .await
                    .map_err(|e| format!("client {i}: {e}"))?;
                Ok::<_, String>((i, tcp))
            });
        }
        match opening.join_next().await.unwrap().unwrap() {
            Ok(client) => held.push(client),
            Err(e) => panic!(
                "{} of {HELD} clients were served while every one before them stayed open \
                 ({STALLED} stalled readers beside them, {t:?}); then {e}",
                held.len()
            ),
        }
    }
    let opened = started.elapsed();

    // Round 2: with all of them open, each is answered again, all at once.
    let mut again = tokio::task::JoinSet::new();
    for (i, mut tcp) in held {
        again.spawn(async move {
            echoed(&mut tcp, &line(i, 2))
                .await
                .map_err(|e| format!("client {i}: {e}"))?;
            Ok::<_, String>((i, tcp))
        });
    }
    let mut held = Vec::with_capacity(HELD);
    while let Some(done) = again.join_next().await {
        match done.unwrap() {
            Ok(client) => held.push(client),
            Err(e) => panic!(
                "with all {HELD} clients open, {} were answered again ({t:?}); then {e}",
                held.len()
            ),
        }
    }
    let answered = started.elapsed();
    a_transfer_still_moves(http).await;
    eprintln!(
        "{t:?}: {HELD} clients held open and served twice beside {STALLED} stalled readers \
         in {:?} (stalled at {stalled_at:?}, all open at {opened:?}, all answered again at \
         {answered:?})",
        started.elapsed()
    );
    drop((held, stalled));
}

over_both_transports!(
    stalled_downloads_leave_the_other_streams_moving,
    stalled_uploads_leave_the_other_streams_moving,
    a_stream_nobody_reads_is_reset_after_the_send_timeout,
    an_idle_stream_is_closed_after_the_idle_timeout,
    ten_thousand_clients_held_open_through_one_agent_are_all_served_beside_stalled_readers,
);
