//! Shared by the byte pumps of both transports: the two-way select, reads that allocate
//! only when data is there, writes with a deadline, and closing a broken socket with a
//! reset. The per-transport pumps are `h2/splice.rs` and `quic/splice.rs`.

use std::future::Future;
use std::task::Poll;
use std::time::Duration;

/// What a read that had to wait reserves: most such reads are a request or an answer. A
/// whole chunk (256 KiB on h2) allocated and given up for each made the allocator hand
/// pages back and fault them in again, 2 us more CPU per keep-alive request.
const FIRST_READ: usize = 16 * 1024;

/// Waits until `rd` is readable, then reads what is there into `buf`. The buffer is given
/// up whenever the read has to wait with nothing in it, so a stream whose client is quiet
/// holds none (measured with 10,000 held connections: without this the proxy grew by
/// 22 KiB each and kept growing with every new round of them, 10 MiB a thousand; with it,
/// 18 and flat). The read after a wait reserves [`FIRST_READ`]; one that finds the socket
/// readable at once (a transfer under way) grows `buf` by `chunk`, and keeps that
/// allocation while the transfer lasts: once the previous chunk was split off and dropped
/// downstream, `reserve` gets it back. Returns the bytes read, 0 at EOF.
pub(crate) async fn read_some(
    rd: &mut tokio::net::tcp::OwnedReadHalf,
    buf: &mut bytes::BytesMut,
    chunk: usize,
) -> std::io::Result<usize> {
    use tokio::io::AsyncReadExt;
    loop {
        let now = std::future::poll_fn(|cx| Poll::Ready(rd.as_ref().poll_read_ready(cx))).await;
        let want = match now {
            Poll::Ready(ready) => {
                ready?;
                chunk
            }
            Poll::Pending => {
                if buf.is_empty() {
                    *buf = bytes::BytesMut::new();
                }
                std::future::poll_fn(|cx| rd.as_ref().poll_read_ready(cx)).await?;
                FIRST_READ.min(chunk)
            }
        };
        buf.reserve(want);
        // Through `AsyncRead`, not `try_read`: a read that fills less than the buffer
        // clears the socket's readiness (epoll has said all it had), so the next round
        // waits for the next event instead of spending a system call to learn the
        // socket is empty: one `recvfrom` less per answer on a keep-alive connection.
        // Readiness left over from a read that filled the buffer exactly makes this
        // read find nothing: it is dropped (cancel safe, nothing read) and the round
        // starts again, giving the buffer up while it waits.
        let read = rd.read_buf(buf);
        tokio::pin!(read);
        if let Poll::Ready(read) =
            std::future::poll_fn(|cx| Poll::Ready(read.as_mut().poll(cx))).await
        {
            return read;
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

/// What a reader must take per send timeout while bytes wait for it (the
/// minimum-progress rule, [`Progress`]): 64 KiB, about 1 KiB/s at the default 60 s.
pub(crate) const MIN_PROGRESS: u64 = 64 * 1024;

/// The deadlines of a stream's writes toward its socket. A write that takes no byte for
/// the send timeout fails, and so does a reader that takes fewer than [`MIN_PROGRESS`]
/// bytes in any send timeout during which bytes waited for it all along: one that reads a
/// byte a minute would otherwise hold its stream's window for good. The clock runs only
/// while bytes wait ([`Progress::caught_up`] stops it), so an interactive stream that
/// sends a little now and then is never cut.
pub(crate) struct Progress {
    send_timeout: Duration,
    /// When the current span began: bytes have waited for the socket since.
    since: Option<tokio::time::Instant>,
    /// Bytes the socket took in the current span.
    taken: u64,
}

impl Progress {
    pub(crate) fn new(send_timeout: Duration) -> Progress {
        Progress {
            send_timeout,
            since: None,
            taken: 0,
        }
    }

    /// Nothing waits for the socket: the clock stops until the next write.
    pub(crate) fn caught_up(&mut self) {
        self.since = None;
        self.taken = 0;
    }

    /// Awaits `next` (the next bytes for the socket); if they are not there at once, the
    /// socket has caught up.
    pub(crate) async fn next<T>(&mut self, next: impl Future<Output = T>) -> T {
        tokio::pin!(next);
        let first = std::future::poll_fn(|cx| std::task::Poll::Ready(next.as_mut().poll(cx)));
        if let std::task::Poll::Ready(out) = first.await {
            return out;
        }
        self.caught_up();
        next.await
    }

    /// Runs one socket write under both rules; returns the bytes it took.
    pub(crate) async fn write(
        &mut self,
        write: impl Future<Output = std::io::Result<usize>>,
    ) -> std::io::Result<usize> {
        let now = tokio::time::Instant::now();
        let stalled_at = now + self.send_timeout;
        let since = *self.since.get_or_insert(now);
        self.check(since, now)?;
        tokio::pin!(write);
        loop {
            let span_end = self.since.unwrap_or(now) + self.send_timeout;
            // The write first, as `tokio::time::timeout` does: one that completes at once
            // never registers the timer.
            tokio::select! {
                biased;
                written = &mut write => {
                    let n = written?;
                    self.taken += n as u64;
                    return Ok(n);
                }
                () = tokio::time::sleep_until(span_end.min(stalled_at)) => {
                    let now = tokio::time::Instant::now();
                    if now >= stalled_at {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("the reader accepted nothing for {:?}", self.send_timeout),
                        ));
                    }
                    self.check(self.since.unwrap_or(now), now)?;
                }
            }
        }
    }

    /// At the end of a span (`since` + send timeout, by `now`): fails if the reader took
    /// too little in it, else starts the next span.
    fn check(
        &mut self,
        since: tokio::time::Instant,
        now: tokio::time::Instant,
    ) -> std::io::Result<()> {
        if now < since + self.send_timeout {
            return Ok(());
        }
        if self.taken < MIN_PROGRESS {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "the reader took {} bytes in {:?} while more waited (at least {} KiB are due)",
                    self.taken,
                    self.send_timeout,
                    MIN_PROGRESS / 1024
                ),
            ));
        }
        self.since = Some(now);
        self.taken = 0;
        Ok(())
    }

    /// Writes all of `buf` (see [`Progress::write`]).
    pub(crate) async fn write_all(
        &mut self,
        wr: &mut tokio::net::tcp::OwnedWriteHalf,
        mut buf: &[u8],
    ) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        while !buf.is_empty() {
            let n = self.write(wr.write(buf)).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            buf = &buf[n..];
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    /// A write that takes `n` bytes after `after`.
    async fn takes(n: usize, after: Duration) -> io::Result<usize> {
        tokio::time::sleep(after).await;
        Ok(n)
    }

    #[tokio::test(start_paused = true)]
    async fn a_reader_that_takes_a_trickle_is_cut_after_one_send_timeout() {
        let timeout = Duration::from_secs(60);
        let mut progress = Progress::new(timeout);
        let start = tokio::time::Instant::now();
        // A KiB every 10 s: each write makes progress well within the send timeout.
        let cut = loop {
            if let Err(e) = progress.write(takes(1024, Duration::from_secs(10))).await {
                break e;
            }
        };
        assert_eq!(cut.kind(), io::ErrorKind::TimedOut);
        assert!(cut.to_string().contains("took 6144 bytes in 60s"), "{cut}");
        assert_eq!(start.elapsed(), timeout);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reader_that_keeps_up_or_catches_up_is_not() {
        let timeout = Duration::from_secs(60);
        let mut progress = Progress::new(timeout);
        // 16 KiB every 10 s: 96 KiB per send timeout, for ten of them.
        for _ in 0..60 {
            progress
                .write(takes(16 * 1024, Duration::from_secs(10)))
                .await
                .unwrap();
        }
        // A trickle, but the reader catches up in between (nothing waits): never cut.
        for _ in 0..60 {
            progress
                .write(takes(1024, Duration::from_secs(10)))
                .await
                .unwrap();
            progress.caught_up();
        }
        // A write that takes nothing for the send timeout fails as before.
        let stuck = progress.write(std::future::pending()).await.unwrap_err();
        assert!(
            stuck.to_string().contains("accepted nothing for 60s"),
            "{stuck}"
        );
    }
}
