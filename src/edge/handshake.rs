//! A terminated name's TLS handshake, completed at the proxy. The ClientHello was read
//! already (to find the name); the handshake starts from those bytes, then reads on from
//! the socket.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Longest a client may take to finish its handshake once its ClientHello is in.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A client connection whose TLS the proxy terminated.
pub(crate) type Terminated = tokio_rustls::server::TlsStream<Rewound>;

/// A socket with bytes already read from it put back in front.
pub(crate) struct Rewound {
    read: Bytes,
    tcp: TcpStream,
}

impl Rewound {
    /// The socket.
    pub(crate) fn into_tcp(self) -> TcpStream {
        self.tcp
    }
}

impl AsyncRead for Rewound {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.read.has_remaining() {
            let n = self.read.len().min(buf.remaining());
            buf.put_slice(&self.read[..n]);
            self.read.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewound {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }
}

/// Completes the handshake of `tcp`, whose first bytes (`read`) were taken off it
/// already, with `config`, within [`HANDSHAKE_TIMEOUT`].
pub(crate) async fn accept(
    config: Arc<rustls::ServerConfig>,
    tcp: TcpStream,
    read: Bytes,
) -> io::Result<Terminated> {
    let io = Rewound { read, tcp };
    let handshake = tokio_rustls::TlsAcceptor::from(config).accept(io);
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(done) => done,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the TLS handshake took longer than {HANDSHAKE_TIMEOUT:?}"),
        )),
    }
}

/// The client's side of a routed connection: its socket, or, when its TLS ends here, the
/// TLS session on it.
pub(crate) enum Client {
    Plain(TcpStream),
    Tls(Box<Terminated>),
}

impl Client {
    /// What a terminated client agreed with the proxy (for the backend's PROXY header).
    pub(crate) fn tls_facts(&self) -> Option<crate::wire::proxy_header::TlsFacts> {
        let Client::Tls(tls) = self else {
            return None;
        };
        let session = tls.get_ref().1;
        let version = match session.protocol_version()? {
            rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3",
            rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2",
            _ => "TLS",
        };
        Some(crate::wire::proxy_header::TlsFacts {
            version: version.into(),
            alpn: (session.alpn_protocol()).map(|p| String::from_utf8_lossy(p).into_owned()),
        })
    }

    /// Closes the connection with a reset.
    pub(crate) fn reset(self) {
        let tcp = match self {
            Client::Plain(tcp) => tcp,
            Client::Tls(tls) => tls.into_inner().0.into_tcp(),
        };
        crate::tunnel::reset_whole(tcp);
    }
}
