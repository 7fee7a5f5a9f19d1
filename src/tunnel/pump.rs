//! Shared by the byte pumps of both transports: the two-way select, reads that allocate
//! only when data is there, writes with a deadline, and closing a broken socket with a
//! reset. The per-transport pumps are `h2/splice.rs` and `quic/splice.rs`.

use std::future::Future;
use std::time::Duration;

use tokio::io::{AsyncWrite, AsyncWriteExt};

/// Waits until `rd` is readable, then reads what is there into `buf`, growing it by
/// `chunk` first. The buffer is only allocated once data is there, so an idle stream holds
/// none; once the previous chunk was split off and dropped downstream, `reserve` gets the
/// same allocation back. Returns the bytes read, 0 at EOF.
pub(crate) async fn read_some(
    rd: &tokio::net::tcp::OwnedReadHalf,
    buf: &mut bytes::BytesMut,
    chunk: usize,
) -> std::io::Result<usize> {
    loop {
        rd.readable().await?;
        buf.reserve(chunk);
        match rd.try_read_buf(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            read => return read,
        }
    }
}

/// How a two-way pump ended: the bytes each way, or the first error; and which
/// directions had finished by then (a side that got its whole stream is not reset, see
/// [`reset`]).
pub(crate) struct Pumped {
    pub(crate) result: std::io::Result<(u64, u64)>,
    /// `up` (from the socket) had finished.
    pub(crate) sent: bool,
    /// `down` (toward the socket) had finished.
    pub(crate) delivered: bool,
}

/// Runs both directions of a splice, `up` (from the socket) and `down` (toward it), until
/// both finish, one fails, or `idle` completes (nothing moved for the idle timeout).
pub(crate) async fn both_ways(
    up: impl Future<Output = std::io::Result<u64>>,
    down: impl Future<Output = std::io::Result<u64>>,
    idle: impl Future<Output = std::io::Error>,
) -> Pumped {
    tokio::pin!(up, down, idle);
    let (mut sent, mut received) = (None, None);
    let result = loop {
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
            e = &mut idle => break Err(e),
        }
    };
    Pumped {
        result,
        sent: sent.is_some(),
        delivered: received.is_some(),
    }
}

/// [`reset`] for a socket not split in halves.
pub(crate) fn reset_whole(tcp: tokio::net::TcpStream) {
    let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
}

/// Closes a socket with a reset (RST) instead of an orderly end (FIN): for a stream that
/// broke (its other side reset, or a timeout cut it), so that the far end sees an error
/// and never takes a cut download for a complete one. (Dropping the write half alone
/// would send a FIN first.) With a zero linger time the close does not block.
pub(crate) fn reset(rd: tokio::net::tcp::OwnedReadHalf, wr: tokio::net::tcp::OwnedWriteHalf) {
    if let Ok(tcp) = rd.reunite(wr) {
        let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
    }
}

/// Least a reader must take per send timeout while bytes wait for it (about 550 bytes a
/// second at the default 60 s): below that a reader holds its stream's window (up to
/// [`super::STREAM_WINDOW`] at either end) without using it, and the stream is reset as
/// if it had taken nothing. A slow link (a few kbit/s) keeps up; a reader of a byte a
/// minute does not.
pub(crate) const MIN_PROGRESS: usize = 32 * 1024;

/// The send timeout of one socket, over a stream's life: how long its writes waited for
/// the reader and what the reader took meanwhile. Only time spent waiting counts, so an
/// idle stream is never at fault; a reader that takes less than [`MIN_PROGRESS`] within a
/// send timeout's worth of waiting fails the next write with `TimedOut`.
pub(crate) struct Progress {
    timeout: Duration,
    waited: Duration,
    taken: usize,
}

impl Progress {
    pub(crate) fn new(timeout: Duration) -> Progress {
        Progress {
            timeout,
            waited: Duration::ZERO,
            taken: 0,
        }
    }

    /// Writes some of `buf` to `wr` (the bytes written, as `write` returns them).
    pub(crate) async fn write<W: AsyncWrite + Unpin>(
        &mut self,
        wr: &mut W,
        buf: &[u8],
    ) -> std::io::Result<usize> {
        loop {
            let started = std::time::Instant::now();
            let left = self.timeout.saturating_sub(self.waited);
            let wrote = tokio::time::timeout(left, wr.write(buf)).await;
            if let Some(n) = self.account(started, wrote)? {
                return Ok(n);
            }
        }
    }

    /// Writes some of `slices` to `wr`, as [`Progress::write`].
    pub(crate) async fn write_vectored<W: AsyncWrite + Unpin>(
        &mut self,
        wr: &mut W,
        slices: &[std::io::IoSlice<'_>],
    ) -> std::io::Result<usize> {
        loop {
            let started = std::time::Instant::now();
            let left = self.timeout.saturating_sub(self.waited);
            let wrote = tokio::time::timeout(left, wr.write_vectored(slices)).await;
            if let Some(n) = self.account(started, wrote)? {
                return Ok(n);
            }
        }
    }

    /// Counts one write that began at `started`: `Some(n)` once it wrote, `None` to write
    /// again (the window ran out with enough taken: a new one begins).
    fn account(
        &mut self,
        started: std::time::Instant,
        wrote: Result<std::io::Result<usize>, tokio::time::error::Elapsed>,
    ) -> std::io::Result<Option<usize>> {
        self.waited += started.elapsed();
        let n = match wrote {
            Ok(Ok(n)) => Some(n),
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                self.waited = self.timeout;
                None
            }
        };
        self.taken += n.unwrap_or(0);
        if self.waited >= self.timeout {
            if self.taken < MIN_PROGRESS {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "the reader took {} bytes in {:?} of waiting (less than {MIN_PROGRESS})",
                        self.taken, self.timeout
                    ),
                ));
            }
            (self.waited, self.taken) = (Duration::ZERO, 0);
        }
        Ok(n)
    }
}

/// Writes all of `buf`, counting against `progress` (the send timeout and the least
/// progress a reader must make).
pub(crate) async fn write_all_within(
    wr: &mut tokio::net::tcp::OwnedWriteHalf,
    mut buf: &[u8],
    progress: &mut Progress,
) -> std::io::Result<()> {
    while !buf.is_empty() {
        let n = progress.write(wr, buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        buf = &buf[n..];
    }
    Ok(())
}
