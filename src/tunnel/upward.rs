//! Mesh streams, agent → proxy: a stream an agent opens to reach a private name, and the
//! h2 mesh channel that carries them (a QUIC agent opens them on its tunnel). The
//! proxy's checks and the join are in `proxy/mesh.rs`.

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;

use super::{duplex, h2, ConnectError, Link};
use crate::tls::Credentials;

/// A stream an agent opened to reach a name (the mesh), not yet answered.
pub(crate) enum Upward {
    H2(h2::mesh::Incoming),
    Quic {
        header: crate::wire::stream::StreamHeader,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        /// Bytes that came after the header.
        first: Bytes,
    },
}

impl Upward {
    /// The name asked for.
    pub(crate) fn name(&self) -> &str {
        match self {
            Upward::H2(incoming) => &incoming.name,
            Upward::Quic { header, .. } => &header.name,
        }
    }

    /// The caller's local client address, as its agent reported it (for logs).
    pub(crate) fn client(&self) -> &str {
        match self {
            Upward::H2(incoming) => &incoming.client,
            Upward::Quic { header, .. } => &header.client,
        }
    }

    /// Refuses the stream with an HTTP status and a one-line reason.
    pub(crate) async fn refuse(self, status: u16, reason: &str) {
        match self {
            Upward::H2(incoming) => incoming.refuse(status, reason),
            Upward::Quic { mut send, .. } => {
                let answer = crate::wire::stream::Answer {
                    status,
                    reason: reason.to_string(),
                };
                let _ = send.write_all(&answer.encode()).await;
                let _ = send.finish();
            }
        }
    }

    /// Accepts the stream (answers 200) and returns it as a byte pipe; `None` if it is
    /// gone already.
    pub(crate) async fn accept(self) -> Option<duplex::Duplex> {
        match self {
            Upward::H2(incoming) => incoming.accept().map(duplex::Duplex::H2),
            Upward::Quic {
                mut send,
                recv,
                first,
                ..
            } => {
                send.write_all(&crate::wire::stream::Answer::ok().encode())
                    .await
                    .ok()?;
                Some(duplex::Duplex::Quic(duplex::quic_io(send, recv, first)))
            }
        }
    }
}

/// Serves an h2 agent's mesh channel (TLS done, ALPN [`crate::tls::ALPN_CONNECT`]) until
/// it ends or `close` completes, handing each stream to `upward`.
pub(crate) async fn serve_mesh_channel(
    tls: tokio_rustls::server::TlsStream<h2::TunnelIo>,
    upward: Arc<dyn Fn(Upward) + Send + Sync>,
    retire: impl Future<Output = ()>,
    close: impl Future<Output = ()>,
) -> Result<(), h2::mesh::MeshError> {
    h2::mesh::serve(
        tls,
        move |incoming| upward(Upward::H2(incoming)),
        retire,
        close,
    )
    .await
}

/// The agent's way up to the proxy for mesh streams: on QUIC its tunnel connection, on h2
/// a mesh channel (see `h2/mesh.rs`). Opening a stream is what the proxy does on a tunnel,
/// so it is a [`Link`].
pub(crate) async fn connect_mesh_channel(
    server: &str,
    creds: &Credentials<'_>,
) -> Result<(Link, h2::mesh::Drive), ConnectError> {
    let (sender, drive) = h2::mesh::connect(server, creds).await?;
    // The agent has no budget: its windows never narrow (the sender is dropped).
    let (_, settled) = h2::settled::channel();
    Ok((Link::H2(sender, settled), drive))
}
