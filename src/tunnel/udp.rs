//! UDP flows through a tunnel (DESIGN.md section 11): the datagrams of one client address
//! on a granted UDP port ride one tunnel stream, opened like any other for the name
//! `udp:PORT`. On the stream they are DATAGRAM capsules (RFC 9297 section 3.2, type 0,
//! each carrying a context id 0 and the UDP payload as in RFC 9298), so an h2 tunnel
//! carries them with its flow control. On a QUIC tunnel they ride QUIC DATAGRAM frames
//! (RFC 9221) instead, each prefixed with the stream's id as a variable-length integer, so
//! a lost or late one holds back none after it; a datagram larger than the path allows
//! still goes as a capsule.
//!
//! Which path a side uses: the proxy sends the flow's first datagram with the stream's
//! open request (a capsule), and QUIC datagrams once the agent answered (it listens for
//! them before it does). The agent answers with capsules until a QUIC datagram of the
//! flow arrived (the proxy listens for them before it sends one). Either side ends the
//! flow by ending the stream; the proxy ends it after its idle timeout, the agent after
//! [`AGENT_IDLE`] as a last bound.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::duplex::Duplex;
use super::StreamCounters;

/// The largest UDP payload carried (IPv6's largest; IPv4's is 65,507).
pub(crate) const MAX_PAYLOAD: usize = 65_527;
/// Datagrams a flow holds waiting for its tunnel or its socket, each way; more are dropped
/// (UDP's own answer to congestion), never queued without bound.
pub(crate) const FLOW_QUEUE: usize = 256;
/// Bytes of client datagrams one flow holds waiting for its tunnel (a [`Queue`]).
const FLOW_QUEUE_BYTES: usize = 256 * 1024;
/// Bytes of client datagrams all flows of a proxy hold waiting for their tunnels.
pub(crate) const QUEUED_BYTES: usize = 64 * 1024 * 1024;
/// A flow that never had an answer ends after this long without a datagram (if its idle
/// timeout is not shorter): a forged source holds its place briefly.
pub(crate) const UNANSWERED_IDLE: Duration = Duration::from_secs(10);
/// An agent ends a flow that moved nothing for this long, whatever the proxy's timeout
/// (which ends it sooner: this bounds only a proxy that never does).
pub(crate) const AGENT_IDLE: Duration = Duration::from_secs(3600);
/// How long writing one capsule to the tunnel may wait for flow control before the flow
/// is given up.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// RFC 9297's DATAGRAM capsule type.
const CAPSULE_DATAGRAM: u64 = 0x00;
/// A capsule longer than this ends the flow (a payload, its context id and slack).
const MAX_CAPSULE: u64 = MAX_PAYLOAD as u64 + 16;

/// Appends `v` as a QUIC variable-length integer (RFC 9000 section 16).
fn put_varint(buf: &mut BytesMut, v: u64) {
    match v {
        0..=0x3f => buf.put_u8(v as u8),
        0x40..=0x3fff => buf.put_u16(0x4000 | v as u16),
        0x4000..=0x3fff_ffff => buf.put_u32(0x8000_0000 | v as u32),
        _ => buf.put_u64(0xc000_0000_0000_0000 | (v & 0x3fff_ffff_ffff_ffff)),
    }
}

/// Reads a variable-length integer from the front of `buf`: its value and length, or
/// `None` when `buf` holds less than all of it.
fn get_varint(buf: &[u8]) -> Option<(u64, usize)> {
    let first = *buf.first()?;
    let len = 1usize << (first >> 6);
    let bytes = buf.get(..len)?;
    let mut v = u64::from(first & 0x3f);
    for b in &bytes[1..] {
        v = (v << 8) | u64::from(*b);
    }
    Some((v, len))
}

/// One datagram as a DATAGRAM capsule with context id 0.
pub(crate) fn capsule(payload: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(payload.len() + 10);
    put_varint(&mut buf, CAPSULE_DATAGRAM);
    put_varint(&mut buf, payload.len() as u64 + 1);
    put_varint(&mut buf, 0);
    buf.put_slice(payload);
    buf.freeze()
}

/// Reads the datagrams of the capsules on a stream, skipping capsules of other types and
/// datagrams of other contexts (RFC 9297 says to).
pub(crate) struct Capsules<R> {
    io: R,
    buf: BytesMut,
}

impl<R: AsyncRead + Unpin> Capsules<R> {
    pub(crate) fn new(io: R) -> Capsules<R> {
        Capsules {
            io,
            buf: BytesMut::with_capacity(4096),
        }
    }

    /// The next datagram; `None` when the stream ended between capsules.
    pub(crate) async fn next(&mut self) -> io::Result<Option<Bytes>> {
        loop {
            match take_capsule(&mut self.buf)? {
                Taken::Datagram(payload) => return Ok(Some(payload)),
                Taken::Skipped => continue,
                Taken::Short(wanted) => self.buf.reserve(wanted.saturating_sub(self.buf.len())),
            }
            if self.io.read_buf(&mut self.buf).await? == 0 {
                return match self.buf.is_empty() {
                    true => Ok(None),
                    false => Err(io::ErrorKind::UnexpectedEof.into()),
                };
            }
        }
    }
}

/// What the front of a capsule buffer holds.
#[derive(Debug, PartialEq)]
enum Taken {
    Datagram(Bytes),
    Skipped,
    /// Not a whole capsule yet: this many bytes would hold it (or its header).
    Short(usize),
}

fn take_capsule(buf: &mut BytesMut) -> io::Result<Taken> {
    let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidData, why.to_string());
    let Some((kind, kind_len)) = get_varint(buf) else {
        return Ok(Taken::Short(8));
    };
    let Some((len, len_len)) = get_varint(&buf[kind_len..]) else {
        return Ok(Taken::Short(kind_len + 8));
    };
    if len > MAX_CAPSULE {
        return Err(bad("a capsule longer than any UDP datagram"));
    }
    let whole = kind_len + len_len + len as usize;
    if buf.len() < whole {
        return Ok(Taken::Short(whole));
    }
    buf.advance(kind_len + len_len);
    let mut value = buf.split_to(len as usize).freeze();
    if kind != CAPSULE_DATAGRAM {
        return Ok(Taken::Skipped);
    }
    let Some((context, context_len)) = get_varint(&value) else {
        return Err(bad("a DATAGRAM capsule without its context id"));
    };
    if context != 0 {
        return Ok(Taken::Skipped);
    }
    value.advance(context_len);
    Ok(Taken::Datagram(value))
}

/// The QUIC datagrams of one tunnel connection, handed to the flows they belong to by the
/// stream id they start with. One per connection, made on first need; it lives while the
/// connection does.
pub(crate) struct Datagrams {
    conn: quinn::Connection,
    flows: Mutex<HashMap<u64, mpsc::Sender<Bytes>>>,
}

/// The [`Datagrams`] of each live connection that carries flows, by quinn's stable id
/// (unique among live connections; an entry goes when its connection has closed).
static CONNECTIONS: LazyLock<Mutex<HashMap<usize, Arc<Datagrams>>>> =
    LazyLock::new(Default::default);

impl Datagrams {
    /// The datagrams of `conn`: starts reading them on first call.
    pub(crate) fn of(conn: &quinn::Connection) -> Arc<Datagrams> {
        let mut all = CONNECTIONS.lock().expect("datagram connections");
        if let Some(found) = all.get(&conn.stable_id()) {
            return found.clone();
        }
        let made = Arc::new(Datagrams {
            conn: conn.clone(),
            flows: Mutex::new(HashMap::new()),
        });
        all.insert(conn.stable_id(), made.clone());
        tokio::spawn(made.clone().read());
        made
    }

    async fn read(self: Arc<Self>) {
        while let Ok(datagram) = self.conn.read_datagram().await {
            let Some((id, len)) = get_varint(&datagram) else {
                continue;
            };
            let flows = self.flows.lock().expect("datagram flows");
            if let Some(flow) = flows.get(&id) {
                // A full queue drops it, as a full socket buffer would.
                let _ = flow.try_send(datagram.slice(len..));
            }
        }
        self.flows.lock().expect("datagram flows").clear();
        (CONNECTIONS.lock().expect("datagram connections")).remove(&self.conn.stable_id());
    }

    /// Takes the datagrams of the flow on stream `id` until the returned [`Joined`]
    /// drops.
    pub(crate) fn join(self: &Arc<Self>, id: u64) -> (Joined, mpsc::Receiver<Bytes>) {
        let (tx, rx) = mpsc::channel(FLOW_QUEUE);
        self.flows.lock().expect("datagram flows").insert(id, tx);
        let joined = Joined {
            datagrams: self.clone(),
            id,
        };
        (joined, rx)
    }

    /// Sends `payload` as a QUIC datagram of the flow on stream `id`; `false` when the
    /// path cannot take one that large (or the peer takes none): send a capsule instead.
    fn send(&self, id: u64, payload: &[u8]) -> bool {
        let mut buf = BytesMut::with_capacity(payload.len() + 8);
        put_varint(&mut buf, id);
        buf.put_slice(payload);
        match self.conn.max_datagram_size() {
            Some(max) if buf.len() <= max => {}
            _ => return false,
        }
        // A full send buffer drops the oldest datagram (quinn's way): not an error here.
        !matches!(
            self.conn.send_datagram(buf.freeze()),
            Err(quinn::SendDatagramError::UnsupportedByPeer
                | quinn::SendDatagramError::Disabled
                | quinn::SendDatagramError::TooLarge)
        )
    }
}

/// A queue of a flow's datagrams bounded in count ([`FLOW_QUEUE`]), in bytes
/// ([`FLOW_QUEUE_BYTES`]) and, with every other queue sharing `all`, in bytes in all
/// ([`QUEUED_BYTES`]): what does not fit is dropped.
pub(crate) fn queue(all: Arc<AtomicUsize>) -> (QueueTx, QueueRx) {
    let (tx, rx) = mpsc::channel(FLOW_QUEUE);
    let flow = Arc::new(AtomicUsize::new(0));
    let counts = Counts { flow, all };
    (
        QueueTx {
            tx,
            counts: counts.clone(),
        },
        QueueRx { rx, counts },
    )
}

/// The bytes a queue holds, and all queues together.
#[derive(Clone)]
struct Counts {
    flow: Arc<AtomicUsize>,
    all: Arc<AtomicUsize>,
}

impl Counts {
    fn take(&self, n: usize) -> bool {
        let fits = |max: usize| move |now: usize| (now + n <= max).then_some(now + n);
        if (self.flow)
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, fits(FLOW_QUEUE_BYTES))
            .is_err()
        {
            return false;
        }
        let all = self
            .all
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, fits(QUEUED_BYTES));
        if all.is_err() {
            self.flow.fetch_sub(n, Ordering::AcqRel);
        }
        all.is_ok()
    }

    fn give(&self, n: usize) {
        self.flow.fetch_sub(n, Ordering::AcqRel);
        self.all.fetch_sub(n, Ordering::AcqRel);
    }
}

/// Why a datagram was not queued.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum NotQueued {
    Full,
    Closed,
}

/// The sending end of a [`queue`].
pub(crate) struct QueueTx {
    tx: mpsc::Sender<Bytes>,
    counts: Counts,
}

impl QueueTx {
    pub(crate) fn push(&self, datagram: Bytes) -> Result<(), NotQueued> {
        let n = datagram.len();
        if self.tx.is_closed() {
            return Err(NotQueued::Closed);
        }
        if !self.counts.take(n) {
            return Err(NotQueued::Full);
        }
        match self.tx.try_send(datagram) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.counts.give(n);
                match e {
                    mpsc::error::TrySendError::Full(_) => Err(NotQueued::Full),
                    mpsc::error::TrySendError::Closed(_) => Err(NotQueued::Closed),
                }
            }
        }
    }
}

/// The receiving end of a [`queue`]; what it still holds is given back as it drops.
pub(crate) struct QueueRx {
    rx: mpsc::Receiver<Bytes>,
    counts: Counts,
}

impl QueueRx {
    async fn recv(&mut self) -> Option<Bytes> {
        let datagram = self.rx.recv().await?;
        self.counts.give(datagram.len());
        Some(datagram)
    }
}

impl Drop for QueueRx {
    fn drop(&mut self) {
        self.rx.close();
        while let Ok(datagram) = self.rx.try_recv() {
            self.counts.give(datagram.len());
        }
    }
}

/// A flow's place in its connection's [`Datagrams`], left as it drops.
pub(crate) struct Joined {
    datagrams: Arc<Datagrams>,
    id: u64,
}

impl Drop for Joined {
    fn drop(&mut self) {
        (self.datagrams.flows.lock().expect("datagram flows")).remove(&self.id);
    }
}

/// A flow's QUIC datagram path: its stream's id, its place among the connection's
/// datagrams, and whether this side may send on it yet.
pub(crate) struct QuicPath {
    pub(crate) id: u64,
    pub(crate) joined: Joined,
    pub(crate) from: mpsc::Receiver<Bytes>,
    pub(crate) may_send: bool,
}

impl QuicPath {
    /// Joins the flow on stream `id` of `conn`.
    pub(crate) fn join(conn: &quinn::Connection, id: u64, may_send: bool) -> QuicPath {
        let (joined, from) = Datagrams::of(conn).join(id);
        QuicPath {
            id,
            joined,
            from,
            may_send,
        }
    }
}

/// The local end of a flow: the public client (the proxy's side) or the backend (the
/// agent's).
pub(crate) enum Local {
    /// The client's datagrams as the port's socket received them; answers go back from
    /// that socket to `addr`.
    Client {
        from: QueueRx,
        socket: Arc<UdpSocket>,
        addr: SocketAddr,
    },
    /// A socket connected to the backend.
    Backend(UdpSocket),
}

/// Where a flow counts what it moves: bytes as a stream does (`read` from the local end),
/// and datagrams each way. Dropped datagrams are counted where they are dropped.
pub(crate) struct FlowCounts {
    pub(crate) bytes: StreamCounters,
    pub(crate) up: Option<IntCounter>,
    pub(crate) down: Option<IntCounter>,
}

/// What ended a flow.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FlowEnd {
    /// Nothing moved for the idle timeout.
    #[error("idle")]
    Idle,
    /// The other side ended the stream, or the local end is gone.
    #[error("closed")]
    Closed,
    #[error("failed: {0}")]
    Failed(io::Error),
}

/// Moves datagrams between `local` and the tunnel stream `io` (and `quic`'s datagrams)
/// until the stream ends, a side fails, or nothing moved for `idle` (or for
/// [`UNANSWERED_IDLE`], if shorter, while nothing came back from the tunnel). Ends the
/// stream.
pub(crate) async fn relay(
    io: Duplex,
    quic: Option<QuicPath>,
    local: Local,
    idle: Duration,
    counts: &FlowCounts,
) -> FlowEnd {
    let (read, mut write) = tokio::io::split(io);
    let mut capsules = Capsules::new(read);
    let heard_quic = AtomicBool::new(false);
    let answered = AtomicBool::new(false);
    let last = Mutex::new(Instant::now());
    let moved = || *last.lock().expect("flow clock") = Instant::now();
    let (mut local_in, local_out, client) = match local {
        Local::Client { from, socket, addr } => (LocalIn::Queue(from), socket, Some(addr)),
        Local::Backend(socket) => {
            let socket = Arc::new(socket);
            (LocalIn::Socket(socket.clone()), socket, None)
        }
    };
    let (quic_send, mut quic_from) = match quic {
        Some(path) => {
            heard_quic.store(path.may_send, Ordering::Relaxed);
            let QuicPath {
                id, joined, from, ..
            } = path;
            (Some((id, joined)), Some(from))
        }
        None => (None, None),
    };
    let up = async {
        // Only a socket is read into it (a queue hands over whole datagrams).
        let mut buf = match &local_in {
            LocalIn::Socket(_) => vec![0; MAX_PAYLOAD],
            LocalIn::Queue(_) => Vec::new(),
        };
        loop {
            let payload = match local_in.recv(&mut buf).await {
                Some(payload) => payload,
                None => return FlowEnd::Closed,
            };
            moved();
            counts.bytes.read(payload.len());
            if let Some(c) = &counts.up {
                c.inc();
            }
            let by_quic = match &quic_send {
                Some((id, joined)) if heard_quic.load(Ordering::Relaxed) => {
                    joined.datagrams.send(*id, &payload)
                }
                _ => false,
            };
            if !by_quic {
                let framed = capsule(&payload);
                match tokio::time::timeout(WRITE_TIMEOUT, write.write_all(&framed)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return FlowEnd::Failed(e),
                    Err(_) => {
                        return FlowEnd::Failed(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "the tunnel took no datagram for 10 s",
                        ))
                    }
                }
            }
        }
    };
    let down = async {
        loop {
            let payload = tokio::select! {
                read = capsules.next() => match read {
                    Ok(Some(payload)) => payload,
                    Ok(None) => return FlowEnd::Closed,
                    Err(e) => return FlowEnd::Failed(e),
                },
                Some(payload) = recv_quic(&mut quic_from) => {
                    heard_quic.store(true, Ordering::Relaxed);
                    payload
                }
            };
            moved();
            answered.store(true, Ordering::Relaxed);
            // A capsule may be a little larger than any UDP payload: not sendable.
            if payload.len() > MAX_PAYLOAD {
                continue;
            }
            if let Some(c) = &counts.down {
                c.inc();
            }
            counts.bytes.written(payload.len());
            let sent = match client {
                Some(addr) => local_out.send_to(&payload, addr).await,
                None => local_out.send(&payload).await,
            };
            // A backend that is not listening answers with ICMP, which a connected socket
            // reports at its next call: the datagram is lost, the flow goes on.
            if let Err(e) = sent {
                if e.kind() != io::ErrorKind::ConnectionRefused {
                    return FlowEnd::Failed(e);
                }
            }
        }
    };
    let quiet = async {
        loop {
            let since = *last.lock().expect("flow clock");
            let limit = match answered.load(Ordering::Relaxed) {
                true => idle,
                false => idle.min(UNANSWERED_IDLE),
            };
            if since.elapsed() >= limit {
                return FlowEnd::Idle;
            }
            tokio::time::sleep_until(since + limit).await;
        }
    };
    let end = {
        tokio::pin!(up, down, quiet);
        tokio::select! {
            end = &mut up => end,
            end = &mut down => end,
            end = &mut quiet => end,
        }
    };
    // Ends the stream: the far side's relay sees it and ends its flow too.
    let _ = tokio::time::timeout(Duration::from_secs(1), write.shutdown()).await;
    end
}

async fn recv_quic(from: &mut Option<mpsc::Receiver<Bytes>>) -> Option<Bytes> {
    match from {
        Some(from) => from.recv().await,
        None => std::future::pending().await,
    }
}

/// Where the local end's datagrams come from.
enum LocalIn {
    Queue(QueueRx),
    Socket(Arc<UdpSocket>),
}

impl LocalIn {
    /// The next datagram; `None` when the local end is gone.
    async fn recv(&mut self, buf: &mut [u8]) -> Option<Bytes> {
        match self {
            LocalIn::Queue(from) => from.recv().await,
            LocalIn::Socket(socket) => loop {
                match socket.recv(buf).await {
                    Ok(n) => return Some(Bytes::copy_from_slice(&buf[..n])),
                    // The backend's ICMP for an earlier datagram: it may listen later.
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                    Err(_) => return None,
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_round_trip() {
        for v in [
            0,
            1,
            63,
            64,
            16_383,
            16_384,
            1 << 30,
            (1 << 30) - 1,
            (1 << 62) - 1,
        ] {
            let mut buf = BytesMut::new();
            put_varint(&mut buf, v);
            assert_eq!(get_varint(&buf), Some((v, buf.len())), "{v}");
            assert_eq!(get_varint(&buf[..buf.len() - 1]), None, "{v} short");
        }
        // RFC 9000 appendix A.1's examples.
        assert_eq!(
            get_varint(&[0x9d, 0x7f, 0x3e, 0x7d]),
            Some((494_878_333, 4))
        );
        assert_eq!(get_varint(&[0x7b, 0xbd]), Some((15_293, 2)));
    }

    #[test]
    fn capsules_split_anywhere_read_whole() {
        let mut wire = BytesMut::new();
        wire.put_slice(&capsule(b"first"));
        // An unknown capsule type and a datagram of another context are skipped.
        put_varint(&mut wire, 0x2a);
        put_varint(&mut wire, 3);
        wire.put_slice(b"xyz");
        put_varint(&mut wire, 0);
        put_varint(&mut wire, 3);
        wire.put_slice(&[4, b'n', b'o']);
        wire.put_slice(&capsule(&[7u8; 1000]));
        wire.put_slice(&capsule(b""));
        let wire = wire.freeze();
        for cut in [1, 2, 7, 100, wire.len()] {
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            for chunk in wire.chunks(cut) {
                buf.put_slice(chunk);
                loop {
                    match take_capsule(&mut buf).unwrap() {
                        Taken::Datagram(d) => got.push(d),
                        Taken::Skipped => {}
                        Taken::Short(_) => break,
                    }
                }
            }
            assert_eq!(got.len(), 3, "cut {cut}");
            assert_eq!(&got[0][..], b"first");
            assert_eq!(&got[1][..], &[7u8; 1000][..]);
            assert!(got[2].is_empty());
            assert!(buf.is_empty());
        }
    }

    #[tokio::test]
    async fn queues_drop_what_does_not_fit_and_give_bytes_back() {
        let all = Arc::new(AtomicUsize::new(0));
        let (tx, mut rx) = queue(all.clone());
        let big = Bytes::from(vec![0u8; 60_000]);
        // 256 KiB per flow: four of these fit, a fifth not.
        for _ in 0..4 {
            tx.push(big.clone()).unwrap();
        }
        assert_eq!(tx.push(big.clone()), Err(NotQueued::Full));
        assert_eq!(all.load(Ordering::Relaxed), 240_000);
        assert_eq!(rx.recv().await.unwrap().len(), 60_000);
        tx.push(big.clone()).unwrap();
        // Count-bound too: small datagrams stop at FLOW_QUEUE.
        let (small_tx, small_rx) = queue(all.clone());
        let fitted = (0..FLOW_QUEUE + 10)
            .filter(|_| small_tx.push(Bytes::from_static(b"x")).is_ok())
            .count();
        assert_eq!(fitted, FLOW_QUEUE);
        // Dropped receivers give back what they held; a closed queue says so.
        drop(rx);
        drop(small_rx);
        assert_eq!(all.load(Ordering::Relaxed), 0);
        assert_eq!(tx.push(big), Err(NotQueued::Closed));
        assert_eq!(all.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn an_oversized_capsule_is_refused() {
        let mut buf = BytesMut::new();
        put_varint(&mut buf, 0);
        put_varint(&mut buf, 1 << 20);
        assert_eq!(
            take_capsule(&mut buf).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
    }
}
