//! Shared by the byte pumps of both transports: the two-way select, reads that allocate
//! only when data is there, writes with a deadline, and closing a broken socket with a
//! reset. The per-transport pumps are `h2/splice.rs` and `quic/splice.rs`.

use std::future::Future;
use std::time::Duration;

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

/// Runs one socket write, failing with `TimedOut` if it makes no progress within
/// `timeout` (the send timeout: the reader accepts nothing).
pub(crate) async fn within<T>(
    timeout: Duration,
    write: impl Future<Output = std::io::Result<T>>,
) -> std::io::Result<T> {
    tokio::time::timeout(timeout, write)
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the reader accepted nothing for {timeout:?}"),
            ))
        })
}

/// Writes all of `buf`, failing if the socket accepts no byte for `timeout`.
pub(crate) async fn write_all_within(
    wr: &mut tokio::net::tcp::OwnedWriteHalf,
    mut buf: &[u8],
    timeout: Duration,
) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    while !buf.is_empty() {
        let n = within(timeout, wr.write(buf)).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        buf = &buf[n..];
    }
    Ok(())
}
