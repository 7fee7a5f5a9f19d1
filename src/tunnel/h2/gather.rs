//! What h2 writes to the tunnel's TLS stream, gathered into fewer TLS records and system
//! calls.
//!
//! h2 copies a DATA frame smaller than its threshold into its own buffer, after the frames
//! before it, and writes the whole buffer at once; a larger one is written on its own, with
//! a system call (and, on the other side, a wake-up) each. The threshold is 256 bytes on a
//! stream that says it writes vectored, as tokio-rustls does, and 1 KiB on one that does
//! not. A small answer (an HTTP response with its head is a few hundred bytes) is above the
//! first and below the second: [`Gathered`] says it does not write vectored, so that the
//! answers of many streams that are ready together go out in one write.
//!
//! Without vectored writes, h2 writes a larger frame's 9-byte head and its payload with
//! two calls. [`Gathered`] keeps the small one (up to [`GATHER`] bytes) and hands it to TLS
//! together with the next: one record and one system call per large frame, as before.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Most bytes held back to go out with the next write (or the flush).
pub(crate) const GATHER: usize = 4 * 1024;

/// A stream whose small writes wait for the next write or the flush (see the module).
#[derive(Debug)]
pub(crate) struct Gathered<T> {
    inner: T,
    held: Vec<u8>,
}

impl<T> Gathered<T> {
    pub(crate) fn new(inner: T) -> Gathered<T> {
        Gathered {
            inner,
            held: Vec::new(),
        }
    }
}

impl<T: AsyncWrite + Unpin> Gathered<T> {
    /// Writes what is held, until nothing is or the stream cannot take more now.
    fn poll_write_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.held.is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.held))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.held.drain(..n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Gathered<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.held.len() + buf.len() <= GATHER {
            this.held.extend_from_slice(buf);
            return Poll::Ready(Ok(buf.len()));
        }
        while !this.held.is_empty() {
            // What is held and `buf` in one call: TLS seals them into one record.
            let both = [IoSlice::new(&this.held), IoSlice::new(buf)];
            let n = ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, &both))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            let held = this.held.len();
            if n >= held {
                this.held.clear();
                if n > held {
                    return Poll::Ready(Ok(n - held));
                }
            } else {
                this.held.drain(..n);
            }
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_write_held(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_write_held(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    /// No: see the module (h2 copies frames up to 1 KiB then, rather than 256 bytes).
    fn is_write_vectored(&self) -> bool {
        false
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Gathered<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// Records each write that reaches it (a vectored one as one write).
    #[derive(Default)]
    struct Writes(Vec<Vec<u8>>);

    impl AsyncWrite for Writes {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.0.push(buf.to_vec());
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let joined: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            let n = joined.len();
            self.0.push(joined);
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn small_writes_wait_for_the_flush_or_go_with_the_next_large_one() {
        let mut io = Gathered::new(Writes::default());
        assert!(!io.is_write_vectored(), "h2 must copy frames up to 1 KiB");

        // Frames a few hundred bytes long: nothing is written until the flush, then once.
        io.write_all(&[1; 300]).await.unwrap();
        io.write_all(&[2; 300]).await.unwrap();
        assert!(io.inner.0.is_empty());
        io.flush().await.unwrap();
        assert_eq!(io.inner.0.len(), 1);
        assert_eq!(io.inner.0[0], [[1u8; 300], [2; 300]].concat());

        // A frame's head, then its large payload: one write with both, in order.
        io.write_all(&[3; 9]).await.unwrap();
        let payload = vec![4u8; 64 * 1024];
        io.write_all(&payload).await.unwrap();
        assert_eq!(io.inner.0.len(), 2);
        assert_eq!(io.inner.0[1], [&[3u8; 9][..], &payload].concat());

        // A large write with nothing held goes straight through; nothing is held after.
        io.write_all(&payload).await.unwrap();
        io.flush().await.unwrap();
        assert_eq!(io.inner.0.len(), 3);
        assert!(io.held.is_empty());

        // Shutting down writes what is held first.
        io.write_all(b"end").await.unwrap();
        io.shutdown().await.unwrap();
        assert_eq!(io.inner.0.last().unwrap(), b"end");
    }

    /// Takes at most 7 bytes per write, vectored or not.
    #[derive(Default)]
    struct Trickle(Vec<u8>);

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = buf.len().min(7);
            self.0.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn short_writes_below_lose_and_reorder_nothing() {
        let mut io = Gathered::new(Trickle::default());
        let mut sent = Vec::new();
        for (i, len) in [5usize, 9, 5000, 3, 700, 9, 20_000, 1]
            .into_iter()
            .enumerate()
        {
            let chunk = vec![i as u8; len];
            io.write_all(&chunk).await.unwrap();
            sent.extend_from_slice(&chunk);
        }
        io.flush().await.unwrap();
        assert_eq!(io.inner.0, sent);
    }
}
