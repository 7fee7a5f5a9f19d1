//! The agent's end of an h2 tunnel: the HTTP/2 server. It dials the proxy (TCP, then TLS
//! with its client certificate), accepts the proxy's `CONNECT`s, and serves each one:
//! dial the backend, answer, splice.

use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use http::{Request, Response, StatusCode};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tracing::{debug, info, warn};

use super::gather::Gathered;
use super::{
    keepalive, splice, KeepaliveError, TunnelIo, ALPN, ALPN_HEADER, CALLER_HEADER, CONTROL_HEADER,
    ERROR_HEADER, MOVING, PROXIES, SERVICE_HEADER,
};
use crate::tls::Credentials;
use crate::tunnel::control::{CONTROL_TIMEOUT, MAX_PROXY_LIST};
use crate::tunnel::duplex::{Duplex, H2Io};
use crate::tunnel::{
    Backend, Backends, ConnectError, DialRequest, Meter, Refusal, StreamLimits, TunnelError,
};

type H2Conn = h2::server::Connection<Gathered<TlsStream<TunnelIo>>, Bytes>;

/// One CONNECT from the proxy, not yet answered.
pub(crate) type Incoming = (Request<RecvStream>, SendResponse<Bytes>);

/// An h2 tunnel whose handshakes are done.
pub(crate) struct Conn {
    conn: H2Conn,
    /// PINGs the proxy; completes when it stops answering.
    keepalive: Pin<Box<dyn std::future::Future<Output = KeepaliveError> + Send>>,
}

/// The h2 server settings of the agent.
fn builder() -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(super::STREAM_WINDOW)
        .initial_connection_window_size(super::CONNECTION_WINDOW)
        .max_frame_size(super::MAX_FRAME_SIZE)
        .max_send_buffer_size(super::STREAM_WINDOW as usize)
        .max_concurrent_streams(super::MAX_STREAMS)
        .max_header_list_size(super::MAX_HEADER_LIST);
    b
}

/// Dials the proxy at `server` and completes TLS, offering `alpn`, and the HTTP/2
/// handshake (the caller bounds the whole).
pub(crate) async fn connect(
    server: &str,
    creds: &Credentials<'_>,
    alpn: &[u8],
) -> Result<Conn, ConnectError> {
    let config = creds.client_config(alpn)?;
    let name = crate::tls::server_name(server)?;
    let tcp = crate::runtime::connect(server)
        .await
        .map_err(ConnectError::Connect)?;
    let mut tls = TlsConnector::from(Arc::new(config))
        .connect(name, super::tunnel_io(tcp))
        .await
        .map_err(|e| ConnectError::Tls(e.to_string()))?;
    tls.get_mut()
        .1
        .set_buffer_limit(Some(super::TLS_SEND_BUFFER));
    // The proxy's certificate was verified against the pinned CA.
    tls.get_mut().0.allow_read_ahead();
    let mut conn = builder()
        .handshake::<_, Bytes>(Gathered::new(tls))
        .await
        .map_err(ConnectError::H2)?;
    let ping = conn.ping_pong().expect("ping_pong is taken once");
    Ok(Conn {
        conn,
        keepalive: Box::pin(keepalive(ping)),
    })
}

impl Conn {
    /// The next CONNECT; `None` once the proxy closed the tunnel or a graceful shutdown
    /// has completed. Also drives the connection and its keep-alive.
    pub(crate) async fn accept(&mut self) -> Result<Option<Incoming>, TunnelError> {
        tokio::select! {
            accepted = self.conn.accept() => match accepted {
                Some(Ok(incoming)) => Ok(Some(incoming)),
                Some(Err(e)) if e.get_io().is_some_and(|io| crate::tunnel::is_gone(io.kind())) => {
                    Err(TunnelError::Closed(e.to_string()))
                }
                Some(Err(e)) => Err(TunnelError::Broken(e.to_string())),
                None => Ok(None),
            },
            e = &mut self.keepalive => Err(TunnelError::Broken(e.to_string())),
        }
    }

    /// Takes no new streams: a GOAWAY, after which the open ones run to their end.
    pub(crate) fn goaway(&mut self) {
        self.conn.graceful_shutdown();
    }
}

/// A message from the proxy rather than a stream (see [`CONTROL_HEADER`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Control {
    /// A new process serves the proxy now; answered already.
    Moving,
    /// The proxy list is in the body: [`read_proxy_list`] reads and answers it.
    Proxies,
    /// Which protocols a service speaks: [`answer_alpn`] answers.
    Alpn,
}

/// Which message a `CONNECT` is, if it is one; a `moving` one is answered here.
pub(crate) fn control((request, respond): &mut Incoming) -> Option<Control> {
    let control = match request.headers().get(CONTROL_HEADER)?.as_bytes() {
        v if v == MOVING.as_bytes() => Control::Moving,
        v if v == PROXIES.as_bytes() => Control::Proxies,
        v if v == ALPN.as_bytes() => Control::Alpn,
        _ => return None,
    };
    if control == Control::Moving {
        let _ = respond.send_response(Response::new(()), true);
    }
    Some(control)
}

/// Answers a [`Control::Alpn`] message: `200` with [`ALPN_HEADER`] `h2` when the service
/// for the name in [`SERVICE_HEADER`] speaks h2c, `http/1.1` when it does not, `404` when
/// there is none.
pub(crate) fn answer_alpn<B: Backends>((request, mut respond): Incoming, backends: &B) {
    let name = (request.headers().get(SERVICE_HEADER))
        .and_then(|v| v.to_str().ok())
        .map(str::to_ascii_lowercase);
    let response = match name.and_then(|n| backends.speaks_h2c(&n)) {
        Some(h2c) => {
            Response::builder().header(ALPN_HEADER, crate::tunnel::control::alpn_answer(h2c))
        }
        None => Response::builder().status(StatusCode::NOT_FOUND),
    };
    let _ = respond.send_response(response.body(()).expect("valid response"), true);
}

/// Reads the proxy list a [`Control::Proxies`] message carries, if it is whole within
/// [`CONTROL_TIMEOUT`] and [`MAX_PROXY_LIST`], and answers the message (400 otherwise).
pub(crate) async fn read_proxy_list((request, mut respond): Incoming) -> Option<Bytes> {
    let mut body = request.into_body();
    let read = async {
        let mut list = bytes::BytesMut::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.ok()?;
            let _ = body.flow_control().release_capacity(chunk.len());
            if list.len() + chunk.len() > MAX_PROXY_LIST {
                return None;
            }
            list.extend_from_slice(&chunk);
        }
        Some(list.freeze())
    };
    let list = tokio::time::timeout(CONTROL_TIMEOUT, read)
        .await
        .ok()
        .flatten();
    let status = match list {
        Some(_) => StatusCode::OK,
        None => StatusCode::BAD_REQUEST,
    };
    let mut answer = Response::new(());
    *answer.status_mut() = status;
    let _ = respond.send_response(answer, true);
    list
}

/// Serves one `CONNECT`: find the backend, dial it, answer, splice.
pub(crate) async fn serve_stream<B: Backends>(
    backends: Arc<B>,
    (request, mut respond): Incoming,
    limits: StreamLimits,
) {
    let (name, client) = super::connect_target(&request);
    let field = client
        .map(crate::tunnel::parse_client_field)
        .unwrap_or_default();
    let (client, server) = (field.client, field.server);
    // On a mesh stream, who calls (set by the proxy from the caller's certificate).
    let caller = request
        .headers()
        .get(CALLER_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let refuse = |respond: &mut SendResponse<Bytes>, refusal: Refusal| {
        warn!(host = %name, client = client.map(tracing::field::display), status = refusal.status, reason = %refusal.reason, "stream refused");
        let response = Response::builder()
            .status(refusal.status)
            .header(ERROR_HEADER, refusal.reason)
            .body(())
            .expect("valid response");
        let _ = respond.send_response(response, true);
    };
    if request.method() != http::Method::CONNECT {
        return refuse(
            &mut respond,
            Refusal {
                status: StatusCode::METHOD_NOT_ALLOWED.as_u16(),
                reason: "only CONNECT is served".into(),
            },
        );
    }
    let dial = DialRequest {
        name: &name,
        caller: caller.as_deref(),
        client,
        server,
        tls: field.tls.as_ref(),
    };
    let dialed = match backends.dial(dial).await {
        Ok(dialed) => dialed,
        Err(refusal) => return refuse(&mut respond, refusal),
    };
    let send = match respond.send_response(Response::new(()), false) {
        Ok(send) => send,
        Err(e) => return debug!(error = %e, "stream gone before the answer"),
    };
    match &dialed.caller {
        Some(caller) => {
            info!(host = %name, client = client.map(tracing::field::display), caller = %caller, backend = %dialed.addr, "mesh stream open")
        }
        None => {
            debug!(host = %name, client = client.map(tracing::field::display), backend = %dialed.addr, "stream open")
        }
    }
    let backend = match dialed.stream {
        Backend::Tcp(tcp) => tcp,
        Backend::Udp(socket) => {
            let io = H2Io::new(send, request.into_body(), super::settled::Settled::never());
            return crate::tunnel::agent_end::relay_udp(
                &name,
                Duplex::H2(io),
                None,
                socket,
                dialed.counters,
            )
            .await;
        }
    };
    let meter = Meter::new(&limits, dialed.counters);
    match splice::splice(
        backend,
        send,
        request.into_body(),
        // The agent's windows never narrow: it has no budget.
        super::settled::Settled::never(),
        limits.send_timeout,
        &meter,
    )
    .await
    {
        Ok((up, down)) => debug!(host = %name, to_backend = down, from_backend = up, "stream done"),
        Err(e) => debug!(host = %name, error = %e, "stream ended with an error"),
    }
}
