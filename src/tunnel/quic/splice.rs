//! The QUIC tunnel's byte pump: a TCP socket joined to one QUIC stream, both directions,
//! used alike by the proxy (client socket) and the agent (backend socket).

use std::future::Future;
use std::io;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use quinn::{RecvStream, VarInt};
use tokio::io::AsyncWriteExt;

use super::{code, Unfinished, IDLE_TIMEOUT};
use crate::tunnel::ahead::{deliver, Source};
use crate::tunnel::{read_some, Meter};

/// Bytes read from a TCP socket per step, handed to quinn without another copy.
pub(crate) const READ_CHUNK: usize = 64 * 1024;

/// Joins `tcp` and a QUIC stream until both directions end. `first` (bytes that came with
/// the header or answer) goes to `tcp` before anything else. FIN and TCP EOF are
/// half-closes; after its FIN, a direction waits (bounded) until the peer has acknowledged
/// every byte, so closing the tunnel right after cannot lose the tail. An error on either
/// side aborts both: the stream is reset and stopped (code [`code::ABORTED`]), so the far
/// end never mistakes a broken stream for a complete one. Returns (bytes sent on the
/// stream, bytes written to `tcp`).
pub(crate) async fn splice(
    tcp: tokio::net::TcpStream,
    mut send: Unfinished,
    mut recv: RecvStream,
    first: Bytes,
    send_timeout: Duration,
    meter: &Meter,
) -> io::Result<(u64, u64)> {
    let (rd, mut wr) = tcp.into_split();
    let up = async {
        let mut total = 0u64;
        // Allocated only once the socket is readable, so an idle stream holds no buffer.
        let mut buf = BytesMut::new();
        loop {
            match read_some(&rd, &mut buf, READ_CHUNK).await? {
                0 => {
                    send.finish().map_err(io::Error::other)?;
                    // Bounded: a peer that never acknowledges is dead and the idle
                    // timeout ends the connection anyway.
                    let _ = tokio::time::timeout(IDLE_TIMEOUT, send.stopped()).await;
                    return Ok::<u64, io::Error>(total);
                }
                n => {
                    total += n as u64;
                    meter.read(n);
                }
            }
            send.write_chunk(buf.split().freeze())
                .await
                .map_err(io::Error::other)?;
        }
    };
    let down = async {
        let total = deliver(
            &mut QuicSource(&mut recv),
            &mut wr,
            first,
            send_timeout,
            meter,
        )
        .await?;
        wr.shutdown().await?;
        Ok::<u64, io::Error>(total)
    };
    let pumped = crate::tunnel::both_ways(up, down, meter.idle()).await;
    if pumped.result.is_err() {
        let _ = send.reset(VarInt::from_u32(code::ABORTED));
        let _ = recv.stop(VarInt::from_u32(code::ABORTED));
        // The socket is reset too unless it got its whole stream: the far end never takes
        // a cut stream for a complete one (see the h2 splice).
        if !pumped.delivered {
            crate::tunnel::reset(rd, wr);
        }
    }
    pumped.result
}

/// A QUIC stream's receive side as the pump's source: quinn hands the peer credit for
/// what is read, so the agent may send that much more while the pump holds it for the
/// socket (within the budget, see [`crate::tunnel::ahead`]).
struct QuicSource<'a>(&'a mut RecvStream);

impl Source for QuicSource<'_> {
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Bytes>>> {
        // `read_chunk` is cancel-safe: a future made and dropped on every poll loses no
        // byte, and its wake-up is registered with the stream.
        let read = std::pin::pin!(self.0.read_chunk(usize::MAX, true));
        match read.poll(cx) {
            Poll::Ready(Ok(Some(chunk))) => Poll::Ready(Some(Ok(chunk.bytes))),
            Poll::Ready(Ok(None)) => Poll::Ready(None),
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(io::Error::other(e)))),
            Poll::Pending => Poll::Pending,
        }
    }
}
