//! The socket under a tunnel's TLS, with a read buffer only while the tunnel is busy.
//!
//! rustls reads about one record per system call; under load a large buffer below it cuts
//! a busy tunnel's receive calls several-fold. But most tunnels are idle most of the time,
//! and a buffer each would cost 256 KiB of memory per agent (zeroed, so touched). So a
//! tunnel reads straight into rustls' buffer until a read fills it (more is likely
//! waiting), then reads ahead into a buffer of its own, and gives that back at the first
//! read after it was drained with no large read for a second (an idle tunnel's next
//! keep-alive). Only a connection whose TLS handshake authenticated the other end may
//! read ahead ([`TunnelIo::allow_read_ahead`]): a stranger that sends a few KiB and falls
//! silent must not hold 256 KiB of the proxy's memory each until its handshake times out.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::silence::Heard;

/// The read-ahead buffer of a busy tunnel.
const READ_AHEAD: usize = 256 * 1024;
/// A read of at least this much counts as busy: what rustls asks for at once, so a read
/// that fills its buffer and a fill of ours are judged alike.
const LARGE_FILL: usize = 4096;
/// A drained buffer with no large fill for this long is given back.
const QUIET: Duration = Duration::from_secs(1);

/// A tunnel's TCP connection, read ahead of TLS while busy.
#[derive(Debug)]
pub(crate) struct TunnelIo {
    tcp: TcpStream,
    /// Read ahead and not yet taken: `ahead[pos..filled]`; empty while the tunnel is quiet.
    ahead: Box<[u8]>,
    pos: usize,
    filled: usize,
    /// When a read last filled the reader's buffer or a large part of ours.
    last_large: Instant,
    heard: Arc<Heard>,
    /// The other end was authenticated: reading ahead is allowed.
    allowed: bool,
}

impl TunnelIo {
    pub(crate) fn new(tcp: TcpStream) -> TunnelIo {
        // Its silence counts from now.
        let heard = Arc::new(Heard::new());
        TunnelIo {
            tcp,
            ahead: Box::default(),
            pos: 0,
            filled: 0,
            last_large: Instant::now(),
            heard,
            allowed: false,
        }
    }

    /// Lets this connection read ahead while busy: called once the TLS handshake has
    /// authenticated the other end (the agent's certificate, or the proxy's pinned one).
    pub(crate) fn allow_read_ahead(&mut self) {
        self.allowed = true;
    }

    /// When this connection last received anything.
    pub(crate) fn heard(&self) -> Arc<Heard> {
        self.heard.clone()
    }

    /// Whether a read-ahead buffer is held (for tests).
    #[cfg(test)]
    fn reading_ahead(&self) -> bool {
        !self.ahead.is_empty()
    }

    /// Gives the buffer back if it is drained and the tunnel has been quiet.
    fn release_if_quiet(&mut self) {
        if self.pos == self.filled && !self.ahead.is_empty() && self.last_large.elapsed() >= QUIET {
            self.ahead = Box::default();
            (self.pos, self.filled) = (0, 0);
        }
    }
}

impl AsyncRead for TunnelIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos == this.filled {
            this.release_if_quiet();
            if this.ahead.is_empty() || out.remaining() >= this.ahead.len() {
                // Straight into the reader's buffer.
                let before = out.filled().len();
                ready!(Pin::new(&mut this.tcp).poll_read(cx, out))?;
                let read = out.filled().len() - before;
                if read > 0 {
                    this.heard.mark();
                }
                if read >= LARGE_FILL.min(out.capacity()) && out.remaining() == 0 && this.allowed {
                    this.last_large = Instant::now();
                    if this.ahead.is_empty() {
                        this.ahead = vec![0; READ_AHEAD].into_boxed_slice();
                    }
                }
                return Poll::Ready(Ok(()));
            }
            let mut into = ReadBuf::new(&mut this.ahead);
            ready!(Pin::new(&mut this.tcp).poll_read(cx, &mut into))?;
            let n = into.filled().len();
            (this.pos, this.filled) = (0, n);
            if n > 0 {
                this.heard.mark();
            }
            if n >= LARGE_FILL {
                this.last_large = Instant::now();
            }
            if n == 0 {
                return Poll::Ready(Ok(())); // the end of the stream
            }
        }
        let n = out.remaining().min(this.filled - this.pos);
        out.put_slice(&this.ahead[this.pos..this.pos + n]);
        this.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for TunnelIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair() -> (TunnelIo, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let mut io = TunnelIo::new(accepted.unwrap().0);
        io.allow_read_ahead();
        (io, client.unwrap())
    }

    #[tokio::test]
    async fn a_connection_not_yet_authenticated_never_reads_ahead() {
        let (mut io, mut peer) = pair().await;
        io.allowed = false;
        let burst = vec![7u8; 1_000_000];
        let writer = tokio::spawn(async move { peer.write_all(&burst).await });
        let mut got = 0;
        let mut chunk = [0u8; 4096];
        while got < 1_000_000 {
            let n = io.read(&mut chunk).await.unwrap();
            assert!(n > 0);
            got += n;
            assert!(!io.reading_ahead(), "read ahead before authentication");
        }
        writer.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn small_reads_hold_no_buffer_and_a_burst_arrives_whole() {
        let (mut io, mut peer) = pair().await;
        peer.write_all(b"ping").await.unwrap();
        let mut small = [0u8; 4096];
        let n = io.read(&mut small).await.unwrap();
        assert_eq!(&small[..n], b"ping");
        assert!(!io.reading_ahead(), "a small read took a buffer");

        // A burst larger than the reader's buffer: read ahead, every byte in order.
        let burst: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let writer = tokio::spawn({
            let burst = burst.clone();
            async move {
                peer.write_all(&burst).await.unwrap();
                peer
            }
        });
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        let mut ahead = false;
        while got.len() < burst.len() {
            let n = io.read(&mut chunk).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&chunk[..n]);
            ahead |= io.reading_ahead();
        }
        assert_eq!(got, burst);
        assert!(ahead, "a burst was read without reading ahead");
        let mut peer = writer.await.unwrap();

        // Quiet for a second, then a small read: the buffer is given back.
        tokio::time::pause();
        tokio::time::advance(QUIET).await;
        peer.write_all(b"pong").await.unwrap();
        let n = io.read(&mut small).await.unwrap();
        assert_eq!(&small[..n], b"pong");
        assert!(!io.reading_ahead(), "a quiet tunnel kept its buffer");

        // The end of the stream reads as zero bytes.
        drop(peer);
        assert_eq!(io.read(&mut small).await.unwrap(), 0);
    }
}
