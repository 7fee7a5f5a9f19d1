//! A tunnel stream as a plain byte pipe (`AsyncRead` + `AsyncWrite`), for the proxy to
//! join two tunnel streams end to end: a mesh stream that came up one agent's tunnel and
//! went down another's.
//!
//! Flow control is kept: an h2 stream releases receive credit only once its bytes were
//! taken by the reader, and writes wait for send credit, so a slow end holds back only
//! its own stream, as in the socket pumps.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::h2::h2_io;
use super::h2::settled::Settled;
use super::quic::Unfinished;

/// An h2 stream (either role: the types are the same) as a byte pipe.
pub(crate) struct H2Io {
    send: h2::SendStream<Bytes>,
    recv: h2::RecvStream,
    settled: Settled,
    /// Received, not yet read.
    pending: Bytes,
    finished: bool,
}

impl H2Io {
    pub(crate) fn new(send: h2::SendStream<Bytes>, recv: h2::RecvStream, settled: Settled) -> H2Io {
        H2Io {
            send,
            recv,
            settled,
            pending: Bytes::new(),
            finished: false,
        }
    }
}

impl AsyncRead for H2Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // An empty DATA frame is not the end: wait for bytes or the end of the stream.
        while this.pending.is_empty() {
            this.settled.recheck(cx, &mut this.recv);
            match ready!(this.recv.poll_data(cx)) {
                None => return Poll::Ready(Ok(())),
                Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                Some(Ok(data)) => {
                    // Credit goes back as the bytes leave the stream's window for our
                    // one-frame buffer; the next frame is asked for only once it is empty.
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    this.pending = data;
                }
            }
        }
        let n = this.pending.len().min(buf.remaining());
        buf.put_slice(&this.pending[..n]);
        this.pending.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        this.send.reserve_capacity(buf.len());
        loop {
            match ready!(this.send.poll_capacity(cx)) {
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
                Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                Some(Ok(0)) => continue,
                Some(Ok(n)) => {
                    let n = n.min(buf.len());
                    this.send
                        .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                        .map_err(h2_io)?;
                    return Poll::Ready(Ok(n));
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.finished {
            this.finished = true;
            this.send.send_data(Bytes::new(), true).map_err(h2_io)?;
        }
        Poll::Ready(Ok(()))
    }
}

/// A QUIC stream as a byte pipe; the bytes that came with its answer are read first. Its
/// send half is reset, not finished, if the pipe is dropped before it was shut down.
pub(crate) type QuicIo =
    tokio::io::Join<tokio::io::Chain<std::io::Cursor<Bytes>, quinn::RecvStream>, Unfinished>;

/// Makes a QUIC stream a byte pipe, `first` read before the rest.
pub(crate) fn quic_io(send: quinn::SendStream, recv: quinn::RecvStream, first: Bytes) -> QuicIo {
    let first = std::io::Cursor::new(first);
    tokio::io::join(
        tokio::io::AsyncReadExt::chain(first, recv),
        Unfinished::new(send),
    )
}

/// Either transport's stream as a byte pipe.
pub(crate) enum Duplex {
    H2(H2Io),
    Quic(QuicIo),
}

impl Duplex {
    /// Resets the stream both ways, so its far end sees an error, not a clean end.
    pub(crate) fn reset(self) {
        match self {
            Duplex::H2(mut io) => io.send.send_reset(h2::Reason::CANCEL),
            Duplex::Quic(io) => {
                let (recv, mut send) = io.into_inner();
                let (_, mut recv) = recv.into_inner();
                let _ = send.reset(quinn::VarInt::from_u32(super::quic::code::ABORTED));
                let _ = recv.stop(quinn::VarInt::from_u32(super::quic::code::ABORTED));
            }
        }
    }
}

impl AsyncRead for Duplex {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Duplex::H2(io) => Pin::new(io).poll_read(cx, buf),
            Duplex::Quic(io) => Pin::new(io).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Duplex {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Duplex::H2(io) => Pin::new(io).poll_write(cx, buf),
            Duplex::Quic(io) => Pin::new(io).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Duplex::H2(io) => Pin::new(io).poll_flush(cx),
            Duplex::Quic(io) => Pin::new(io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Duplex::H2(io) => Pin::new(io).poll_shutdown(cx),
            Duplex::Quic(io) => Pin::new(io).poll_shutdown(cx),
        }
    }
}
