//! The h2 tunnel's byte pumps: a TCP socket joined to one h2 stream, both directions,
//! used alike by the proxy (client socket) and the agent (backend socket).

use std::future::poll_fn;
use std::io;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use super::h2_io;
use crate::tunnel::ahead::{deliver, Source};
use crate::tunnel::{read_some, Meter};

/// Bytes read from a socket per step. Only allocated once the socket is readable, so an
/// idle stream holds no buffer. Large reads mean fewer wakeups of the connection task per
/// byte, which is what bounds single-stream throughput (see docs/benchmarks.md).
pub(crate) const READ_CHUNK: usize = 256 * 1024;

/// Sends `bytes` (not empty) on `send`, waiting for flow-control capacity as the peer
/// grants it; with `end`, the last frame also ends the stream.
async fn send_all(send: &mut SendStream<Bytes>, mut bytes: Bytes, end: bool) -> io::Result<()> {
    debug_assert!(!bytes.is_empty());
    while !bytes.is_empty() {
        send.reserve_capacity(bytes.len());
        let granted = poll_fn(|cx| send.poll_capacity(cx))
            .await
            .ok_or_else(|| io::Error::new(io::ErrorKind::BrokenPipe, "stream closed by peer"))?
            .map_err(h2_io)?;
        if granted == 0 {
            continue;
        }
        let chunk = bytes.split_to(granted.min(bytes.len()));
        send.send_data(chunk, end && bytes.is_empty())
            .map_err(h2_io)?;
    }
    Ok(())
}

/// Copies a socket into an h2 stream until EOF, then ends the stream (half-close).
pub(crate) async fn socket_to_stream(
    rd: &mut OwnedReadHalf,
    send: &mut SendStream<Bytes>,
    meter: &Meter,
) -> io::Result<u64> {
    let mut total = 0u64;
    // Empty (unallocated) until the first read (see `read_some`).
    let mut buf = BytesMut::new();
    loop {
        match read_some(rd, &mut buf, READ_CHUNK).await? {
            0 => {
                send.send_data(Bytes::new(), true).map_err(h2_io)?;
                return Ok(total);
            }
            mut n => {
                // The end right behind the bytes (an answer and its close, as a
                // connection-per-request backend sends them) goes in the same frame: one
                // write and one wake-up less on each side. This read is the one the next
                // round would make anyway, finding the socket drained, so it costs no
                // system call.
                // An error found by it (a reset right behind the answer) comes after
                // the bytes read before it, as it would have in the next round.
                let (mut end, mut failed) = (false, None);
                if buf.capacity() > buf.len() {
                    match rd.try_read_buf(&mut buf) {
                        Ok(0) => end = true,
                        Ok(more) => n += more,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => failed = Some(e),
                    }
                }
                total += n as u64;
                meter.read(n);
                send_all(send, buf.split().freeze(), end).await?;
                if let Some(e) = failed {
                    return Err(e);
                }
                if end {
                    return Ok(total);
                }
            }
        }
    }
}

/// An h2 stream's receive side as the pump's source: each chunk's capacity is released as
/// it is taken, so the agent may send that much more while the pump holds it for the
/// socket (within the budget, see [`crate::tunnel::ahead`]).
struct H2Source<'a>(&'a mut RecvStream);

impl Source for H2Source<'_> {
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Bytes>>> {
        match self.0.poll_data(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                let released = self.0.flow_control().release_capacity(chunk.len());
                Poll::Ready(Some(released.map(|()| chunk).map_err(h2_io)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(h2_io(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Copies an h2 stream into a socket until the stream ends, then shuts down the socket's
/// write side (half-close). What the pump may hold ahead of the socket is bounded
/// ([`crate::tunnel::ahead`]), which is what makes a slow reader hold back only its own
/// stream.
pub(crate) async fn stream_to_socket(
    recv: &mut RecvStream,
    wr: &mut OwnedWriteHalf,
    send_timeout: Duration,
    meter: &Meter,
) -> io::Result<u64> {
    let total = deliver(&mut H2Source(recv), wr, Bytes::new(), send_timeout, meter).await?;
    wr.shutdown().await?;
    Ok(total)
}

/// Pumps both directions between a socket and an h2 stream until both are finished, or
/// until either fails, the socket accepts nothing for the send timeout, or nothing moves
/// for the idle timeout (then the other is dropped, which resets the stream).
pub(crate) async fn splice(
    tcp: tokio::net::TcpStream,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
    send_timeout: Duration,
    meter: &Meter,
) -> io::Result<(u64, u64)> {
    let (mut rd, mut wr) = tcp.into_split();
    let pumped = crate::tunnel::both_ways(
        socket_to_stream(&mut rd, &mut send, meter),
        stream_to_socket(&mut recv, &mut wr, send_timeout, meter),
        meter.idle(),
    )
    .await;
    // Broken before the socket got its whole stream (a reset on the other side, a
    // timeout): the socket is reset too, so the far end never takes a cut stream for a
    // complete one. A socket that got everything and its end keeps them (a reset would
    // discard what is still in its send buffer). The h2 stream is reset when `send` and
    // `recv` drop unfinished.
    if pumped.result.is_err() && !pumped.delivered {
        crate::tunnel::reset(rd, wr);
    }
    pumped.result
}
