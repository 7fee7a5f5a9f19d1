//! QUIC tunnel plumbing shared by the proxy and the agent: the stream header and answer
//! (pure, bounded parsers), transport settings, UDP sockets with large buffers, and the
//! copy between a TCP socket and a QUIC stream.
//!
//! One QUIC connection is one tunnel. The proxy opens one bidirectional stream per routed
//! client and starts it with a [`StreamHeader`]; the agent answers with an [`Answer`];
//! after a `200` the stream carries raw bytes both ways, FIN is a half-close and a reset
//! aborts (see `docs/protocol.md`).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use quinn::{RecvStream, SendStream, VarInt};
use tokio::io::AsyncWriteExt;
use tracing::{debug, warn};

/// The only header version this build speaks.
pub const VERSION: u8 = 1;
/// Longest header or answer accepted, prefix included.
pub const MAX_FRAME: usize = 2048;
/// Longest reason text in an answer.
pub const MAX_REASON: usize = 1024;
/// Time the agent allows for a stream's header (the proxy bounds the wait for the answer
/// by its stream-open timeout, which is longer than the agent's backend dial timeout).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Per-stream receive window (same bound as h2's; see `tunnel::h2::STREAM_WINDOW`).
pub const STREAM_WINDOW: u32 = 8 * 1024 * 1024;
/// Per-connection receive window and send window.
pub const CONNECTION_WINDOW: u32 = 256 * 1024 * 1024;
/// Most client streams one tunnel carries at once.
pub const MAX_STREAMS: u32 = 16 * 1024;
/// An idle tunnel sends a keep-alive this often...
pub const KEEPALIVE: Duration = Duration::from_secs(3);
/// ...and a tunnel that heard nothing for this long is dead (a few lost keep-alives).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// UDP socket buffer asked of the OS on both ends. Small buffers drop bursts and make
/// QUIC throughput collapse, so the log says when the OS gives less.
pub const UDP_BUFFER: usize = 8 * 1024 * 1024;

/// Sent by the agent on a unidirectional stream to retire a tunnel: route nothing new.
pub const GOAWAY: &[u8] = b"goaway";

/// Application error codes on streams and connections.
pub mod code {
    /// Normal close (also: a retired tunnel, once drained).
    pub const DONE: u32 = 0;
    /// A stream aborted because its TCP side failed.
    pub const ABORTED: u32 = 1;
    /// The proxy closes the tunnel: revoked, or shutting down.
    pub const CLOSED_BY_PROXY: u32 = 2;
    /// A malformed header or answer.
    pub const PROTOCOL: u32 = 3;
}

/// The first bytes of each stream, proxy → agent.
///
/// ```text
/// u8  version (1)
/// u16 length of the rest, big-endian
/// u8  name length, name (ASCII host name the client asked for)
/// u8  address length, address (the public client's `ip:port`, UTF-8; may be empty)
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamHeader {
    pub name: String,
    pub client: String,
}

/// The agent's answer, agent → proxy.
///
/// ```text
/// u16 status, big-endian (the HTTP status codes of the h2 transport: 200, 404, 502, 504)
/// u16 reason length, big-endian, then the reason (UTF-8, at most 1024 bytes; empty on 200)
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub reason: String,
}

/// Why a header or answer was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("unsupported tunnel stream version {0}")]
    Version(u8),
    #[error("stream header too long ({0} bytes)")]
    TooLong(usize),
    #[error("malformed stream header: {0}")]
    Malformed(&'static str),
}

impl StreamHeader {
    /// Encodes the header; `None` if a field does not fit its one-byte length.
    pub fn encode(&self) -> Option<Bytes> {
        let (name, client) = (self.name.as_bytes(), self.client.as_bytes());
        if name.is_empty() || name.len() > 255 || client.len() > 255 {
            return None;
        }
        let rest = 2 + name.len() + client.len();
        let mut out = BytesMut::with_capacity(3 + rest);
        out.put_u8(VERSION);
        out.put_u16(rest as u16);
        out.put_u8(name.len() as u8);
        out.put_slice(name);
        out.put_u8(client.len() as u8);
        out.put_slice(client);
        Some(out.freeze())
    }

    /// Parses a header from the start of `buf`: `Ok(None)` if more bytes are needed,
    /// otherwise the header and how many bytes it took. Never reads past [`MAX_FRAME`].
    pub fn parse(buf: &[u8]) -> Result<Option<(StreamHeader, usize)>, FrameError> {
        let Some(&version) = buf.first() else {
            return Ok(None);
        };
        if version != VERSION {
            return Err(FrameError::Version(version));
        }
        if buf.len() < 3 {
            return Ok(None);
        }
        let rest = u16::from_be_bytes([buf[1], buf[2]]) as usize;
        if 3 + rest > MAX_FRAME {
            return Err(FrameError::TooLong(3 + rest));
        }
        let Some(mut body) = buf.get(3..3 + rest) else {
            return Ok(None);
        };
        let name = take_field(&mut body).ok_or(FrameError::Malformed("name"))?;
        let client = take_field(&mut body).ok_or(FrameError::Malformed("client address"))?;
        if !body.is_empty() {
            return Err(FrameError::Malformed("trailing bytes"));
        }
        if name.is_empty() || !name.iter().all(|b| b.is_ascii_graphic()) {
            return Err(FrameError::Malformed("name is not an ASCII host name"));
        }
        let client =
            std::str::from_utf8(client).map_err(|_| FrameError::Malformed("client address"))?;
        let header = StreamHeader {
            name: String::from_utf8_lossy(name).to_ascii_lowercase(),
            client: client.to_string(),
        };
        Ok(Some((header, 3 + rest)))
    }
}

fn take_field<'a>(body: &mut &'a [u8]) -> Option<&'a [u8]> {
    let (&len, rest) = body.split_first()?;
    let field = rest.get(..len as usize)?;
    *body = &rest[len as usize..];
    Some(field)
}

impl Answer {
    pub fn ok() -> Answer {
        Answer {
            status: 200,
            reason: String::new(),
        }
    }

    /// Encodes the answer; a reason longer than [`MAX_REASON`] is cut at a char boundary.
    pub fn encode(&self) -> Bytes {
        let mut end = self.reason.len().min(MAX_REASON);
        while !self.reason.is_char_boundary(end) {
            end -= 1;
        }
        let reason = &self.reason.as_bytes()[..end];
        let mut out = BytesMut::with_capacity(4 + reason.len());
        out.put_u16(self.status);
        out.put_u16(reason.len() as u16);
        out.put_slice(reason);
        out.freeze()
    }

    /// Parses an answer from the start of `buf`, like [`StreamHeader::parse`].
    pub fn parse(buf: &[u8]) -> Result<Option<(Answer, usize)>, FrameError> {
        if buf.len() < 4 {
            return Ok(None);
        }
        let status = u16::from_be_bytes([buf[0], buf[1]]);
        let len = u16::from_be_bytes([buf[2], buf[3]]) as usize;
        if len > MAX_REASON {
            return Err(FrameError::TooLong(4 + len));
        }
        if !(100..600).contains(&status) {
            return Err(FrameError::Malformed("status"));
        }
        let Some(reason) = buf.get(4..4 + len) else {
            return Ok(None);
        };
        let reason = std::str::from_utf8(reason).map_err(|_| FrameError::Malformed("reason"))?;
        Ok(Some((
            Answer {
                status,
                reason: reason.to_string(),
            },
            4 + len,
        )))
    }
}

/// A pure parser of a frame at the start of a buffer (see [`StreamHeader::parse`]).
pub type Parse<T> = fn(&[u8]) -> Result<Option<(T, usize)>, FrameError>;

/// Reads one frame parsed by `parse` from the start of `recv`, within [`HEADER_TIMEOUT`].
/// Returns it with the bytes that followed it in the same reads (the first data bytes).
pub async fn read_frame<T>(recv: &mut RecvStream, parse: Parse<T>) -> io::Result<(T, Bytes)> {
    let mut buf = BytesMut::new();
    loop {
        if let Some((frame, used)) = parse(&buf).map_err(io::Error::other)? {
            buf.advance(used);
            return Ok((frame, buf.freeze()));
        }
        if buf.len() >= MAX_FRAME {
            return Err(io::Error::other(FrameError::TooLong(buf.len())));
        }
        match recv.read_chunk(MAX_FRAME, true).await {
            Ok(Some(chunk)) => buf.extend_from_slice(&chunk.bytes),
            Ok(None) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "stream ended inside its header",
                ))
            }
            Err(e) => return Err(io::Error::other(e)),
        }
    }
}

/// Which end of a tunnel a transport configuration is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Opens the client streams; accepts only the agent's control streams.
    Proxy,
    /// Accepts client streams; opens only control streams.
    Agent,
}

/// The transport settings of a tunnel end. Each side lets its peer open only what the
/// protocol needs: the proxy takes no bidirectional streams from an agent (so an agent
/// cannot make it buffer data nobody reads) and at most two control streams; the agent
/// takes client streams and no control streams. No datagrams either way.
pub fn transport_config(role: Role) -> quinn::TransportConfig {
    let (bidi, uni) = match role {
        Role::Proxy => (0, 2),
        Role::Agent => (MAX_STREAMS, 0),
    };
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(VarInt::from_u32(bidi))
        .max_concurrent_uni_streams(VarInt::from_u32(uni))
        .datagram_receive_buffer_size(None)
        .stream_receive_window(VarInt::from_u32(STREAM_WINDOW))
        .receive_window(VarInt::from_u32(CONNECTION_WINDOW))
        .send_window(u64::from(CONNECTION_WINDOW))
        .keep_alive_interval(Some(KEEPALIVE))
        .max_idle_timeout(Some(
            IDLE_TIMEOUT.try_into().expect("idle timeout fits a VarInt"),
        ));
    t
}

/// A UDP socket bound to `addr` with [`UDP_BUFFER`]-sized buffers, or as close as the OS
/// allows; the log says when it allowed less.
pub fn udp_socket(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    let recv = grow_buffer(&socket, Buffer::Recv);
    let send = grow_buffer(&socket, Buffer::Send);
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let capped = recv < UDP_BUFFER || send < UDP_BUFFER;
    if capped && !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        warn!(
            receive_kib = recv / 1024,
            send_kib = send / 1024,
            wanted_kib = UDP_BUFFER / 1024,
            "the OS capped the QUIC UDP socket buffers; throughput may suffer under load \
             (raise net.core.rmem_max and net.core.wmem_max, e.g. sysctl -w net.core.rmem_max={UDP_BUFFER})"
        );
    } else if !capped {
        debug!(
            receive_kib = recv / 1024,
            send_kib = send / 1024,
            "QUIC UDP socket buffers"
        );
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

#[derive(Clone, Copy)]
enum Buffer {
    Recv,
    Send,
}

/// Asks for [`UDP_BUFFER`] and returns what the kernel grants (Linux reports twice the
/// usable size, and caps the request at `net.core.rmem_max` / `wmem_max`).
fn grow_buffer(socket: &socket2::Socket, which: Buffer) -> usize {
    let granted = match which {
        Buffer::Recv => socket
            .set_recv_buffer_size(UDP_BUFFER)
            .and_then(|()| socket.recv_buffer_size()),
        Buffer::Send => socket
            .set_send_buffer_size(UDP_BUFFER)
            .and_then(|()| socket.send_buffer_size()),
    };
    granted.unwrap_or(0) / if cfg!(target_os = "linux") { 2 } else { 1 }
}

/// Bytes read from a TCP socket per step, handed to quinn without another copy.
pub const READ_CHUNK: usize = 64 * 1024;

/// Joins `tcp` and a QUIC stream until both directions end. `first` (bytes that came with
/// the header or answer) goes to `tcp` before anything else. FIN and TCP EOF are
/// half-closes; after its FIN, a direction waits (bounded) until the peer has acknowledged
/// every byte, so closing the tunnel right after cannot lose the tail. An error on either
/// side aborts both: the stream is reset and stopped (code [`code::ABORTED`]), so the far
/// end never mistakes a broken stream for a complete one. Returns (bytes sent on the
/// stream, bytes written to `tcp`).
pub async fn splice(
    tcp: tokio::net::TcpStream,
    mut send: SendStream,
    mut recv: RecvStream,
    first: Bytes,
) -> io::Result<(u64, u64)> {
    let (rd, mut wr) = tcp.into_split();
    let up = async {
        let mut total = 0u64;
        // Allocated only once the socket is readable, so an idle stream holds no buffer
        // (as in `tunnel::h2::socket_to_stream`).
        let mut buf = BytesMut::new();
        loop {
            rd.readable().await?;
            buf.reserve(READ_CHUNK);
            match rd.try_read_buf(&mut buf) {
                Ok(0) => {
                    send.finish().map_err(io::Error::other)?;
                    // Bounded: a peer that never acknowledges is dead and the idle
                    // timeout ends the connection anyway.
                    let _ = tokio::time::timeout(IDLE_TIMEOUT, send.stopped()).await;
                    return Ok::<u64, io::Error>(total);
                }
                Ok(n) => total += n as u64,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
            send.write_chunk(buf.split().freeze())
                .await
                .map_err(io::Error::other)?;
        }
    };
    let down = async {
        let mut total = first.len() as u64;
        wr.write_all(&first).await?;
        loop {
            match recv.read_chunk(usize::MAX, true).await {
                Ok(Some(chunk)) => {
                    total += chunk.bytes.len() as u64;
                    wr.write_all(&chunk.bytes).await?;
                }
                Ok(None) => {
                    wr.shutdown().await?;
                    return Ok::<u64, io::Error>(total);
                }
                Err(e) => return Err(io::Error::other(e)),
            }
        }
    };
    let result = {
        tokio::pin!(up, down);
        let (mut sent, mut received) = (None, None);
        loop {
            if let (Some(s), Some(r)) = (sent, received) {
                break Ok((s, r));
            }
            tokio::select! {
                r = &mut up, if sent.is_none() => match r {
                    Ok(n) => sent = Some(n),
                    Err(e) => break Err(e),
                },
                r = &mut down, if received.is_none() => match r {
                    Ok(n) => received = Some(n),
                    Err(e) => break Err(e),
                },
            }
        }
    };
    if result.is_err() {
        let _ = send.reset(VarInt::from_u32(code::ABORTED));
        let _ = recv.stop(VarInt::from_u32(code::ABORTED));
    }
    result
}

/// A QUIC endpoint's crypto from a rustls configuration (TLS 1.3 and an AES-GCM suite, as
/// every configuration from [`crate::tls`] has).
pub fn server_crypto(config: rustls::ServerConfig) -> Arc<quinn::crypto::rustls::QuicServerConfig> {
    Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(config)
            .expect("the ring provider has the QUIC initial cipher suite"),
    )
}

/// See [`server_crypto`].
pub fn client_crypto(config: rustls::ClientConfig) -> Arc<quinn::crypto::rustls::QuicClientConfig> {
    Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(config)
            .expect("the ring provider has the QUIC initial cipher suite"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(name: &str, client: &str) -> StreamHeader {
        StreamHeader {
            name: name.into(),
            client: client.into(),
        }
    }

    #[test]
    fn header_round_trips_and_reports_its_length() {
        let h = header("app.example.com", "203.0.113.9:51234");
        let mut bytes = h.encode().unwrap().to_vec();
        let len = bytes.len();
        bytes.extend_from_slice(b"GET / HTTP/1.1\r\n");
        assert_eq!(StreamHeader::parse(&bytes), Ok(Some((h, len))));
    }

    #[test]
    fn every_prefix_of_a_header_asks_for_more() {
        let bytes = header("a.example", "[::1]:9").encode().unwrap();
        for cut in 0..bytes.len() {
            assert_eq!(StreamHeader::parse(&bytes[..cut]), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn bad_headers_are_refused() {
        assert_eq!(StreamHeader::parse(&[2, 0, 0]), Err(FrameError::Version(2)));
        assert_eq!(
            StreamHeader::parse(&[1, 0xff, 0xff]),
            Err(FrameError::TooLong(3 + 0xffff))
        );
        // A name running past the declared length.
        assert!(StreamHeader::parse(&[1, 0, 2, 5, b'a']).is_err());
        // Trailing bytes inside the declared length.
        assert!(StreamHeader::parse(&[1, 0, 4, 1, b'a', 0, 9]).is_err());
        // Empty name, non-ASCII name, non-UTF-8 address.
        assert!(StreamHeader::parse(&[1, 0, 2, 0, 0]).is_err());
        assert!(StreamHeader::parse(&[1, 0, 3, 1, 0xc3, 0]).is_err());
        assert!(StreamHeader::parse(&[1, 0, 4, 1, b'a', 1, 0xff]).is_err());
        assert_eq!(header("", "x").encode(), None);
        assert_eq!(header(&"a".repeat(256), "").encode(), None);
    }

    #[test]
    fn names_are_lowercased() {
        let bytes = header("App.Example.COM", "").encode().unwrap();
        let (h, _) = StreamHeader::parse(&bytes).unwrap().unwrap();
        assert_eq!(h.name, "app.example.com");
    }

    #[test]
    fn answers_round_trip_and_long_reasons_are_cut() {
        let a = Answer {
            status: 502,
            reason: "backend 127.0.0.1:1: Connection refused".into(),
        };
        let bytes = a.encode();
        assert_eq!(Answer::parse(&bytes), Ok(Some((a, bytes.len()))));
        for cut in 0..bytes.len() {
            assert_eq!(Answer::parse(&bytes[..cut]), Ok(None));
        }
        let long = Answer {
            status: 502,
            reason: "é".repeat(MAX_REASON),
        };
        let (parsed, _) = Answer::parse(&long.encode()).unwrap().unwrap();
        assert!(parsed.reason.len() <= MAX_REASON && parsed.reason.chars().all(|c| c == 'é'));
        assert!(Answer::parse(&[0, 200, 0xff, 0xff]).is_err());
        assert!(Answer::parse(&[0, 7, 0, 0]).is_err());
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_never_claim_more_than_given() {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 64) as usize;
            let mut bytes: Vec<u8> = (0..len)
                .map(|i| (x.rotate_left(i as u32 * 7) & 0xff) as u8)
                .collect();
            if let Some(b) = bytes.first_mut() {
                *b = if x & 1 == 0 { VERSION } else { *b };
            }
            if let Ok(Some((_, used))) = StreamHeader::parse(&bytes) {
                assert!(used <= bytes.len());
            }
            if let Ok(Some((_, used))) = Answer::parse(&bytes) {
                assert!(used <= bytes.len());
            }
        }
    }
}
