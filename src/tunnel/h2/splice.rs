//! The h2 tunnel's byte pumps: a TCP socket joined to one h2 stream, both directions,
//! used alike by the proxy (client socket) and the agent (backend socket).

use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use super::h2_io;
use super::settled::Settled;
use crate::tunnel::{read_some, Meter, Progress};

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

/// Copies an h2 stream into a socket until the stream ends, then shuts down the socket's
/// write side (half-close). Capacity is released only after the bytes were written, which
/// is what makes a slow reader hold back only its own stream.
///
/// DATA frames that have already arrived are gathered (up to [`WRITE_BATCH`] bytes) and
/// written with one vectored write: a syscall per frame was the largest cost per byte.
pub(crate) async fn stream_to_socket(
    recv: &mut RecvStream,
    settled: &mut Settled,
    wr: &mut OwnedWriteHalf,
    send_timeout: Duration,
    meter: &Meter,
) -> io::Result<u64> {
    let mut total = 0u64;
    let mut batch: Vec<Bytes> = Vec::new();
    let mut ended = false;
    let mut progress = Progress::new(send_timeout);
    while !ended {
        let data = poll_fn(|cx| {
            settled.recheck(cx, recv);
            recv.poll_data(cx)
        });
        match progress.next(data).await {
            Some(chunk) => batch.push(chunk.map_err(h2_io)?),
            None => break,
        }
        let mut size = batch[0].len();
        while size < WRITE_BATCH {
            match poll_fn(|cx| Poll::Ready(recv.poll_data(cx))).await {
                Poll::Ready(Some(chunk)) => {
                    let chunk = chunk.map_err(h2_io)?;
                    size += chunk.len();
                    batch.push(chunk);
                }
                Poll::Ready(None) => {
                    ended = true;
                    break;
                }
                Poll::Pending => break,
            }
        }
        write_all_vectored(wr, &batch, &mut progress, meter).await?;
        batch.clear();
        total += size as u64;
        recv.flow_control().release_capacity(size).map_err(h2_io)?;
    }
    wr.shutdown().await?;
    Ok(total)
}

/// Most bytes gathered into one write by [`stream_to_socket`].
pub(crate) const WRITE_BATCH: usize = 256 * 1024;

/// Writes every chunk, counting the bytes into `meter` as each write takes them (a batch
/// is large: the counters must not lag what the client already has by a whole batch).
async fn write_all_vectored(
    wr: &mut OwnedWriteHalf,
    chunks: &[Bytes],
    progress: &mut Progress,
    meter: &Meter,
) -> io::Result<()> {
    // An empty DATA frame (a bare END_STREAM) yields an empty chunk: nothing to write.
    let mut slices: Vec<IoSlice<'_>> = chunks
        .iter()
        .filter(|c| !c.is_empty())
        .map(|c| IoSlice::new(c))
        .collect();
    let mut slices = &mut slices[..];
    while !slices.is_empty() {
        let n = progress.write(wr.write_vectored(slices)).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        meter.written(n);
        IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
}

/// Pumps both directions between a socket and an h2 stream until both are finished, or
/// until either fails, the socket accepts nothing for the send timeout, or nothing moves
/// for the idle timeout (then the other is dropped, which resets the stream).
pub(crate) async fn splice(
    tcp: tokio::net::TcpStream,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
    mut settled: Settled,
    send_timeout: Duration,
    meter: &Meter,
) -> io::Result<(u64, u64)> {
    let (mut rd, mut wr) = tcp.into_split();
    let pumped = crate::tunnel::both_ways(
        socket_to_stream(&mut rd, &mut send, meter),
        stream_to_socket(&mut recv, &mut settled, &mut wr, send_timeout, meter),
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
