//! The QUIC tunnel: one QUIC connection (mutual TLS inside) is one tunnel, on UDP at the
//! agent port's number. The proxy opens one bidirectional stream per routed client and
//! starts it with a stream header (`wire::stream`); the agent answers with a status; then
//! the stream carries raw bytes both ways, FIN is a half-close and a reset aborts. The
//! agent retires a tunnel with [`GOAWAY`] on a unidirectional stream (`docs/protocol.md`).
//!
//! This folder holds both ends: `proxy.rs` (endpoint, accepting and driving tunnels,
//! opening streams), `agent.rs` (dialing, serving streams), `splice.rs` (the byte pump),
//! `steer.rs` (the proxy's socket per lane), `socket.rs` and `takeover.rs` (upgrades).
//! Here: settings, error codes, UDP sockets and the header reader both ends share.

pub(crate) mod agent;
pub(crate) mod peers;
pub(crate) mod proxy;
mod socket;
pub(crate) mod splice;
pub(crate) mod steer;
pub(crate) mod takeover;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use quinn::{RecvStream, VarInt};
use tracing::{debug, warn};

use super::{CONNECTION_WINDOW, MAX_STREAMS, STREAM_WINDOW};
use crate::wire::stream::{FrameError, Parse, MAX_FRAME};

/// Time the agent allows for a stream's header (the proxy bounds the wait for the answer
/// by its stream-open timeout, which is longer than the agent's backend dial timeout).
pub(crate) const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// An idle tunnel's agent sends a keep-alive this often, on the shared beat
/// (`runtime::beat`): an empty unidirectional stream, which keeps NAT mappings open (most
/// forget a silent UDP flow after 30 s or more) and the idle timers running, at a cost to
/// the proxy of a few packets per tunnel per interval, handled many at a wake-up. A proxy
/// restarted after a crash does not wait for it: it resets the last process's tunnels as
/// it starts (`peers.rs`); without that table, it answers the next keep-alive with a
/// stateless reset (it keeps the reset key, `proxy::endpoint_config`).
pub(crate) const KEEPALIVE: Duration = Duration::from_secs(15);
/// quinn's own keep-alive (a PING) on the agent's side, after this long without a packet
/// either way: the backstop of the keep-alive on the beat, which comes first.
const KEEPALIVE_BACKSTOP: Duration = Duration::from_secs(20);
/// ...and a tunnel that heard nothing for this long is dead: a frozen agent or proxy is
/// found within it (a lost keep-alive is sent again within a round trip or two).
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(27);
/// UDP socket buffer asked of the OS on both ends. Small buffers drop bursts and make
/// QUIC throughput collapse, so the log says when the OS gives less.
pub(crate) const UDP_BUFFER: usize = 8 * 1024 * 1024;

/// The largest packets MTU discovery looks for: jumbo frames (9,000 bytes less the IPv6
/// and UDP headers) where the path has them, instead of quinn's 1,452. Discovery also
/// stops at the UDP payload the peer announces (`EndpointConfig::max_udp_payload_size`,
/// left at quinn's 1,472 on both ends), so today packets stay at 1,452 bytes
/// (docs/protocol.md, "packet size").
const MTU_UPPER_BOUND: u16 = 8952;

/// QUIC datagrams (the UDP flows of granted ports, `tunnel/udp.rs`) received and not yet
/// taken by their flows, in bytes; beyond it the oldest are dropped.
const DATAGRAM_BUFFER: usize = 1024 * 1024;

/// Sent by the agent on a unidirectional stream to retire a tunnel: route nothing new.
pub(crate) const GOAWAY: &[u8] = b"goaway";

/// Application error codes on streams and connections.
pub(crate) mod code {
    /// Normal close (also: a retired tunnel, once drained).
    pub(crate) const DONE: u32 = 0;
    /// A stream aborted because its TCP side failed.
    pub(crate) const ABORTED: u32 = 1;
    /// The proxy closes the tunnel: revoked, or shutting down.
    pub(crate) const CLOSED_BY_PROXY: u32 = 2;
    /// A malformed header or answer.
    pub(crate) const PROTOCOL: u32 = 3;
    /// The proxy closes the tunnel because a new process serves its sockets now
    /// (`serve --upgrade`): reconnect at once.
    pub(crate) const MOVING: u32 = 4;
}

/// A send stream that is reset when dropped unfinished. quinn finishes a stream it drops,
/// so a splice cancelled half way (its task aborted: an agent or proxy stopping, a grace
/// period over) would end the peer's stream cleanly, and a cut transfer would look
/// complete (the soak found it: 4,096 bytes of a 65 KB answer, then a clean end). Held from the
/// moment a stream is accepted or opened until it ends.
pub(crate) struct Unfinished {
    stream: quinn::SendStream,
    /// Set once the stream is finished on purpose.
    finished: bool,
}

impl Unfinished {
    pub(crate) fn new(stream: quinn::SendStream) -> Unfinished {
        Unfinished {
            stream,
            finished: false,
        }
    }

    /// Ends the stream on purpose (a FIN after the last byte).
    pub(crate) fn finish(&mut self) -> Result<(), quinn::ClosedStream> {
        self.stream.finish()?;
        self.finished = true;
        Ok(())
    }
}

impl std::ops::Deref for Unfinished {
    type Target = quinn::SendStream;

    fn deref(&self) -> &quinn::SendStream {
        &self.stream
    }
}

impl std::ops::DerefMut for Unfinished {
    fn deref_mut(&mut self) -> &mut quinn::SendStream {
        &mut self.stream
    }
}

/// Writes go to the stream; shutting it down finishes it on purpose (the mesh's byte pipe,
/// [`crate::tunnel::duplex`]).
impl tokio::io::AsyncWrite for Unfinished {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        tokio::io::AsyncWrite::poll_write(std::pin::Pin::new(&mut self.get_mut().stream), cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::task::Poll::Ready(self.get_mut().finish().map_err(io::Error::from))
    }
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.stream.reset(VarInt::from_u32(code::ABORTED));
        }
    }
}

/// Reads one frame parsed by `parse` from the start of `recv`, within [`HEADER_TIMEOUT`].
/// Returns it with the bytes that followed it in the same reads (the first data bytes).
pub(crate) async fn read_frame<T>(
    recv: &mut RecvStream,
    parse: Parse<T>,
) -> io::Result<(T, Bytes)> {
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

/// Most client streams the proxy keeps open at once on one QUIC tunnel: what the agent
/// allows ([`MAX_STREAMS`]) less an eighth. quinn raises its peer's stream limit only once
/// more than an eighth of it has closed, so after a few streams came and went a tunnel
/// takes fewer than [`MAX_STREAMS`] at once, and an open beyond that would wait (up to the
/// proxy's open deadline) for streams to close. (h2's limit counts open streams exactly.)
pub(crate) const PROXY_STREAMS: u32 = MAX_STREAMS - MAX_STREAMS / 8;

/// How many ack-eliciting packets the peer may take before it must acknowledge (QUIC ACK
/// frequency extension; quinn's default is 1, an ACK for every other packet).
const ACK_ELICITING_THRESHOLD: u32 = 4;

/// Which end of a tunnel a transport configuration is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    /// Opens the client streams; accepts only the agent's control streams.
    Proxy,
    /// Accepts client streams; opens only control streams.
    Agent,
}

/// The transport settings of a tunnel end. Each side lets its peer open only what the
/// protocol needs: the proxy takes at most [`MAX_UPWARD`] mesh streams from an agent and
/// at most two control streams; the agent takes client streams and two control streams
/// (the proxy list, `control.rs`). Datagrams carry UDP flows ([`DATAGRAM_BUFFER`]).
///
/// [`MAX_UPWARD`]: crate::tunnel::MAX_UPWARD
pub(crate) fn transport_config(role: Role) -> quinn::TransportConfig {
    // The proxy takes at most MAX_UPWARD mesh streams from an agent; the agent takes the
    // proxy's client streams. Both receive on both kinds, so the connection window covers
    // every stream's window at once (stalled streams never hold back the others).
    let (bidi, uni) = match role {
        Role::Proxy => (crate::tunnel::MAX_UPWARD, 2),
        Role::Agent => (MAX_STREAMS, 2),
    };
    let window = u64::from(STREAM_WINDOW) * u64::from(MAX_STREAMS + crate::tunnel::MAX_UPWARD);
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MTU_UPPER_BOUND);
    let mut t = quinn::TransportConfig::default();
    t.mtu_discovery_config(Some(mtu));
    let mut acks = quinn::AckFrequencyConfig::default();
    acks.ack_eliciting_threshold(VarInt::from_u32(ACK_ELICITING_THRESHOLD));
    t.ack_frequency_config(Some(acks));
    t.max_concurrent_bidi_streams(VarInt::from_u32(bidi))
        .max_concurrent_uni_streams(VarInt::from_u32(uni))
        .datagram_receive_buffer_size(Some(DATAGRAM_BUFFER))
        .stream_receive_window(VarInt::from_u32(STREAM_WINDOW))
        .receive_window(VarInt::from_u64(window).expect("fits a VarInt"))
        .send_window(u64::from(CONNECTION_WINDOW))
        // The agent keeps the tunnel alive (and finds a restarted proxy by it); the
        // proxy's idle timer runs on the agent's keep-alives.
        .keep_alive_interval((role == Role::Agent).then_some(KEEPALIVE_BACKSTOP))
        .max_idle_timeout(Some(
            IDLE_TIMEOUT.try_into().expect("idle timeout fits a VarInt"),
        ));
    t
}

/// A UDP socket bound to `addr` with [`UDP_BUFFER`]-sized buffers, or as close as the OS
/// allows.
pub(crate) fn udp_socket(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.bind(&addr.into())?;
    tune_udp_socket(socket.into())
}

/// Asks for [`UDP_BUFFER`]-sized buffers on an already bound socket (the log says when
/// the OS allowed less) and makes it non-blocking, as quinn needs.
pub(crate) fn tune_udp_socket(socket: std::net::UdpSocket) -> io::Result<std::net::UdpSocket> {
    let socket = socket2::Socket::from(socket);
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

/// A QUIC endpoint's crypto from a rustls configuration (TLS 1.3 and an AES-GCM suite, as
/// every configuration from [`crate::tls`] has).
pub(crate) fn server_crypto(
    config: rustls::ServerConfig,
) -> Arc<quinn::crypto::rustls::QuicServerConfig> {
    Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(config)
            .expect("the ring provider has the QUIC initial cipher suite"),
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A QUIC connection over loopback between two endpoints of this process (a
    /// self-signed certificate the client trusts), returned with both endpoints: the
    /// client with the agent's transport settings, the server with the proxy's.
    async fn pair() -> (
        quinn::Endpoint,
        quinn::Endpoint,
        quinn::Connection,
        quinn::Connection,
    ) {
        pair_with(transport_config(Role::Proxy)).await
    }

    /// [`pair`] with the server's transport settings `server_transport`.
    pub(crate) async fn pair_with(
        server_transport: quinn::TransportConfig,
    ) -> (
        quinn::Endpoint,
        quinn::Endpoint,
        quinn::Connection,
        quinn::Connection,
    ) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let provider = crate::tls::provider();
        let server_tls = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.der().clone()).unwrap();
        let client_tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut server_config = quinn::ServerConfig::with_crypto(server_crypto(server_tls));
        server_config.transport_config(Arc::new(server_transport));
        let server =
            quinn::Endpoint::server(server_config, "127.0.0.1:0".parse().unwrap()).unwrap();
        let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let mut config = quinn::ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(client_tls).unwrap(),
        ));
        config.transport_config(Arc::new(transport_config(Role::Agent)));
        client.set_default_client_config(config);
        let connecting = client
            .connect(server.local_addr().unwrap(), "localhost")
            .unwrap();
        let accepted = async { server.accept().await.unwrap().await.unwrap() };
        let (near, far) = tokio::join!(async { connecting.await.unwrap() }, accepted);
        (client, server, near, far)
    }

    /// What the far end of a stream reads: its bytes, and whether it ended cleanly.
    async fn read_to_end(mut recv: RecvStream) -> (Vec<u8>, Result<(), quinn::ReadError>) {
        let mut got = Vec::new();
        loop {
            match recv.read_chunk(usize::MAX, true).await {
                Ok(Some(chunk)) => got.extend_from_slice(&chunk.bytes),
                Ok(None) => return (got, Ok(())),
                Err(e) => return (got, Err(e)),
            }
        }
    }

    /// The proxy gives a QUIC tunnel [`PROXY_STREAMS`] slots: after an eighth of the
    /// agent's limit came and went (quinn announces more only past that), that many still
    /// open at once, and not one more.
    #[tokio::test]
    async fn every_slot_the_proxy_gives_a_quic_tunnel_opens_at_once() {
        let (_client, _server, agent, proxy) = pair().await;
        let serving = tokio::spawn(async move {
            while let Ok((mut send, mut recv)) = agent.accept_bi().await {
                tokio::spawn(async move {
                    let _ = recv.read_to_end(64).await;
                    let _ = send.finish();
                });
            }
        });
        for _ in 0..MAX_STREAMS / 8 {
            let (mut send, mut recv) = proxy.open_bi().await.unwrap();
            send.write_all(b"came").await.unwrap();
            send.finish().unwrap();
            recv.read_to_end(64).await.unwrap();
        }
        let mut held = Vec::new();
        for i in 0..PROXY_STREAMS {
            let open = proxy.open_bi();
            let (mut send, recv) = tokio::time::timeout(Duration::from_secs(5), open)
                .await
                .unwrap_or_else(|_| panic!("stream {i} of {PROXY_STREAMS} found no credit"))
                .unwrap();
            send.write_all(b"held").await.unwrap();
            held.push((send, recv));
        }
        let one_more = proxy.open_bi();
        tokio::pin!(one_more);
        let waits = std::future::poll_fn(|cx| {
            std::task::Poll::Ready(std::future::Future::poll(one_more.as_mut(), cx).is_pending())
        });
        assert!(waits.await, "quinn's limit is what PROXY_STREAMS says");
        serving.abort();
    }

    #[tokio::test]
    async fn a_stream_dropped_before_it_was_finished_is_reset_not_ended_cleanly() {
        let (_client, _server, near, far) = pair().await;
        // Part of an answer, then the task holding the stream is dropped (aborted) while
        // the connection lives on: the far end must see a reset, never a clean end.
        let mut send = Unfinished::new(near.open_uni().await.unwrap());
        send.write_all(b"part of an answer").await.unwrap();
        drop(send);
        // (A reset may overtake the bytes before them: the far end then reads none.)
        let (got, end) = read_to_end(far.accept_uni().await.unwrap()).await;
        assert!(b"part of an answer".starts_with(&got), "{got:?}");
        assert!(
            matches!(end, Err(quinn::ReadError::Reset(c)) if c == VarInt::from_u32(code::ABORTED)),
            "the far end saw {end:?}"
        );

        // Finished on purpose, through the byte pipe's shutdown: a clean end after every byte.
        let mut send = Unfinished::new(near.open_uni().await.unwrap());
        tokio::io::AsyncWriteExt::write_all(&mut send, b"a whole answer")
            .await
            .unwrap();
        tokio::io::AsyncWriteExt::shutdown(&mut send).await.unwrap();
        drop(send);
        let (got, end) = read_to_end(far.accept_uni().await.unwrap()).await;
        assert_eq!(got, b"a whole answer");
        assert!(end.is_ok(), "the far end saw {end:?}");
    }
}
