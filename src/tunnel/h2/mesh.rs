//! The h2 mesh channel: how an agent's streams travel *up* to the proxy.
//!
//! On an h2 tunnel the agent is the HTTP/2 server, and an HTTP/2 server cannot open
//! streams. So an agent that reaches private names opens a second connection to the agent
//! port in the other role: TLS with the same client certificate, ALPN
//! [`crate::tls::ALPN_CONNECT`], the agent as HTTP/2 client and the proxy as server. Each
//! upward stream is a `CONNECT` to the name, answered like the proxy's own `CONNECT`s
//! (200, or a status with a one-line reason), then raw bytes. The proxy lets an agent open
//! at most [`crate::tunnel::MAX_UPWARD`] at once.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use h2::client::SendRequest;
use h2::server::SendResponse;
use h2::RecvStream;
use http::{Request, Response};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsConnector;

use super::gather::Gathered;
use super::{keepalive, KeepaliveError, TunnelIo, ERROR_HEADER};
use crate::tls::Credentials;
use crate::tunnel::{ConnectError, MAX_UPWARD, STREAM_WINDOW};

/// Why a mesh channel ended badly, at either end.
#[derive(Debug, thiserror::Error)]
pub(crate) enum MeshError {
    #[error("HTTP/2 handshake timed out")]
    HandshakeTimeout,
    #[error(transparent)]
    H2(#[from] h2::Error),
    #[error(transparent)]
    Keepalive(#[from] KeepaliveError),
}

/// The task that drives a mesh channel at the agent's end (it ends when the connection
/// does).
pub(crate) type Drive = Pin<Box<dyn Future<Output = Result<(), MeshError>> + Send>>;

/// The agent's end: a channel to open upward streams on, and the task that drives it.
pub(crate) type Channel = (SendRequest<Bytes>, Drive);

/// Dials the proxy's agent port for a mesh channel (the caller bounds the whole).
pub(crate) async fn connect(
    server: &str,
    creds: &Credentials<'_>,
) -> Result<Channel, ConnectError> {
    let config = creds.client_config(crate::tls::ALPN_CONNECT)?;
    let name = crate::tls::server_name(server)?;
    let tcp = crate::runtime::connect(server)
        .await
        .map_err(ConnectError::Connect)?;
    let _ = tcp.set_nodelay(true);
    let mut tls = TlsConnector::from(Arc::new(config))
        .connect(name, super::tunnel_io(tcp))
        .await
        .map_err(|e| ConnectError::Tls(e.to_string()))?;
    // The proxy's certificate was verified against the pinned CA.
    tls.get_mut().0.allow_read_ahead();
    let (sender, mut conn) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(STREAM_WINDOW * MAX_UPWARD)
        .max_frame_size(super::MAX_FRAME_SIZE)
        .enable_push(false)
        .max_concurrent_streams(0)
        .max_header_list_size(super::MAX_HEADER_LIST)
        .handshake::<_, Bytes>(Gathered::new(tls))
        .await
        .map_err(ConnectError::H2)?;
    let ping = conn.ping_pong().expect("ping_pong is taken once");
    let drive = Box::pin(async move {
        tokio::select! {
            r = conn => r.map_err(MeshError::from),
            e = keepalive(ping) => Err(MeshError::from(e)),
        }
    });
    Ok((sender, drive))
}

/// One upward `CONNECT`, not yet answered: the name, the caller's local client address,
/// and the stream.
pub(crate) struct Incoming {
    pub(crate) name: String,
    pub(crate) client: String,
    pub(crate) respond: SendResponse<Bytes>,
    pub(crate) recv: RecvStream,
}

/// The proxy's end: serves a mesh channel whose TLS is done, handing every upward stream
/// to `on_stream`, until the agent closes it, it dies, or `close` completes. When `retire`
/// completes the channel takes no new streams (GOAWAY; the agent dials a new channel) and
/// ends once the open ones have.
pub(crate) async fn serve(
    mut tls: TlsStream<TunnelIo>,
    on_stream: impl Fn(Incoming),
    retire: impl Future<Output = ()>,
    close: impl Future<Output = ()>,
) -> Result<(), MeshError> {
    // The agent's certificate was verified in the TLS handshake.
    tls.get_mut().0.allow_read_ahead();
    let handshake = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(STREAM_WINDOW * MAX_UPWARD)
        .max_frame_size(super::MAX_FRAME_SIZE)
        .max_concurrent_streams(MAX_UPWARD)
        .max_header_list_size(super::MAX_HEADER_LIST)
        .handshake::<_, Bytes>(Gathered::new(tls));
    let mut conn = tokio::time::timeout(crate::tunnel::HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| MeshError::HandshakeTimeout)??;
    let ping = conn.ping_pong().expect("ping_pong is taken once");
    let alive = keepalive(ping);
    tokio::pin!(alive, close, retire);
    let mut retired = false;
    loop {
        tokio::select! {
            () = &mut retire, if !retired => {
                retired = true;
                conn.graceful_shutdown();
            }
            accepted = conn.accept() => match accepted {
                Some(Ok((request, respond))) => on_stream(incoming(request, respond)),
                Some(Err(e)) => return Err(e.into()),
                None => return Ok(()),
            },
            e = &mut alive => return Err(e.into()),
            () = &mut close => return Ok(()),
        }
    }
}

fn incoming(request: Request<RecvStream>, respond: SendResponse<Bytes>) -> Incoming {
    let (name, client) = super::connect_target(&request);
    let client = client.unwrap_or_default().to_string();
    Incoming {
        name,
        client,
        respond,
        recv: request.into_body(),
    }
}

impl Incoming {
    /// Refuses the stream with `status` and a one-line reason.
    pub(crate) fn refuse(mut self, status: u16, reason: &str) {
        let response = Response::builder()
            .status(status)
            .header(ERROR_HEADER, reason)
            .body(())
            .expect("valid response");
        let _ = self.respond.send_response(response, true);
    }

    /// Accepts the stream: answers 200 and returns it as a byte pipe.
    pub(crate) fn accept(mut self) -> Option<crate::tunnel::duplex::H2Io> {
        let send = self.respond.send_response(Response::new(()), false).ok()?;
        // The mesh channel's windows never narrow (the budget applies to tunnels).
        let settled = super::settled::Settled::never();
        Some(crate::tunnel::duplex::H2Io::new(send, self.recv, settled))
    }
}
