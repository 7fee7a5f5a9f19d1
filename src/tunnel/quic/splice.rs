//! The QUIC tunnel's byte pump: a TCP socket joined to one QUIC stream, both directions,
//! used alike by the proxy (client socket) and the agent (backend socket).

use std::io;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use quinn::{RecvStream, VarInt};
use tokio::io::AsyncWriteExt;

use super::{code, Unfinished, IDLE_TIMEOUT};
use crate::tunnel::{read_some, Meter, Progress};

/// Bytes read from a TCP socket per step, handed to quinn without another copy.
pub(crate) const READ_CHUNK: usize = 64 * 1024;
/// Received chunks (one per packet's frame) gathered into one socket write: up to about
/// 45 KiB at quinn's largest packets.
const GATHER: usize = 32;

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
    let (mut rd, mut wr) = tcp.into_split();
    let up = async {
        let mut total = 0u64;
        // Allocated only once the socket is readable, so an idle stream holds no buffer.
        let mut buf = BytesMut::new();
        loop {
            match read_some(&mut rd, &mut buf, READ_CHUNK).await? {
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
        let mut total = first.len() as u64;
        let mut progress = Progress::new(send_timeout);
        progress.write_all(&mut wr, &first).await?;
        meter.written(first.len());
        // A chunk is one packet's frame (about 1.2 KiB): what has arrived is gathered into
        // one write, not a write per packet.
        let mut chunks: [Bytes; GATHER] = Default::default();
        let mut gathered = BytesMut::new();
        loop {
            match progress.next(recv.read_chunks(&mut chunks)).await {
                Ok(Some(n)) => {
                    let got = &mut chunks[..n];
                    let bytes = match got {
                        [one] => std::mem::take(one),
                        many => {
                            gathered.reserve(many.iter().map(Bytes::len).sum());
                            for chunk in many.iter_mut() {
                                gathered.extend_from_slice(&std::mem::take(chunk));
                            }
                            gathered.split().freeze()
                        }
                    };
                    total += bytes.len() as u64;
                    progress.write_all(&mut wr, &bytes).await?;
                    meter.written(bytes.len());
                }
                Ok(None) => {
                    wr.shutdown().await?;
                    return Ok::<u64, io::Error>(total);
                }
                Err(e) => return Err(io::Error::other(e)),
            }
        }
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
