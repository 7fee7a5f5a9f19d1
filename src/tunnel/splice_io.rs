//! A tunnel stream spliced to a client that is not a bare socket: a connection whose TLS
//! the proxy terminated (`crate::edge`). The same counts, idle timeout and endings as the
//! socket splices (`h2/splice.rs`, `quic/splice.rs`), through the byte-pipe form of the
//! stream (`duplex.rs`) and a buffer a direction.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::link::{Moved, TunnelStream};
use super::{Meter, StreamCounters, StreamLimits};

/// Each direction's buffer: a TLS record's worth of plaintext.
const BUFFER: usize = 16 * 1024;

/// How one direction ends and waits.
struct Direction {
    /// The longest a write (and the final end) may wait for the reader; `None`: as long as
    /// flow control says (toward the tunnel, as the socket splices do).
    write_timeout: Option<Duration>,
    /// Whether a read that ends without the TLS close_notify is an end: from a client,
    /// yes (most HTTPS clients close without it once they have their answer); from the
    /// tunnel, it means the tunnel broke, and must not become a clean end.
    eof_is_end: bool,
}

/// Copies `rd` into `wr` until `rd` ends (then ends `wr`), calling `moved` with every
/// chunk's size.
async fn copy(
    rd: &mut (impl AsyncRead + Unpin),
    wr: &mut (impl AsyncWrite + Unpin),
    how: Direction,
    moved: impl Fn(usize),
) -> std::io::Result<u64> {
    let mut buf = vec![0u8; BUFFER];
    let mut total = 0;
    loop {
        let n = match rd.read(&mut buf).await {
            Err(e) if how.eof_is_end && e.kind() == std::io::ErrorKind::UnexpectedEof => 0,
            read => read?,
        };
        let write = async {
            if n == 0 {
                wr.shutdown().await
            } else {
                wr.write_all(&buf[..n]).await?;
                wr.flush().await
            }
        };
        match how.write_timeout {
            None => write.await?,
            Some(limit) => tokio::time::timeout(limit, write).await.map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("the reader took nothing for {limit:?}"),
                )
            })??,
        }
        if n == 0 {
            return Ok(total);
        }
        moved(n);
        total += n as u64;
    }
}

impl TunnelStream {
    /// [`TunnelStream::splice`] for a client that is not a bare socket: copies both ways
    /// until both directions end or `limits` end the stream. Broken before the client got
    /// its whole stream, the tunnel stream is reset and `reset` is given the client (to
    /// reset its socket: a cut download must not look complete).
    pub(crate) async fn splice_io<S: AsyncRead + AsyncWrite + Unpin>(
        self,
        io: S,
        limits: StreamLimits,
        counters: StreamCounters,
        reset: impl FnOnce(S),
    ) -> Moved {
        let meter = Meter::new(&limits, counters);
        let mut down = self.into_duplex();
        let (mut client_rd, mut client_wr) = tokio::io::split(io);
        let pumped = {
            let (mut tunnel_rd, mut tunnel_wr) = tokio::io::split(&mut down);
            let up = Direction {
                write_timeout: None,
                eof_is_end: true,
            };
            let to_client = Direction {
                write_timeout: Some(limits.send_timeout),
                eof_is_end: false,
            };
            crate::tunnel::both_ways(
                copy(&mut client_rd, &mut tunnel_wr, up, |n| meter.read(n)),
                copy(&mut tunnel_rd, &mut client_wr, to_client, |n| {
                    meter.written(n)
                }),
                meter.idle(),
            )
            .await
        };
        if pumped.result.is_err() {
            down.reset();
            if !pumped.delivered {
                reset(client_rd.unsplit(client_wr));
            }
        }
        let (up, down) = meter.totals();
        Moved {
            up,
            down,
            error: pumped.result.err(),
        }
    }
}
