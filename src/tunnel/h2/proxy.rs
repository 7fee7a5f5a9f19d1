//! The proxy's end of an h2 tunnel: the HTTP/2 client. The agent port has done TCP and
//! mutual TLS; this completes the HTTP/2 handshake, drives the connection (and its PINGs)
//! until it ends, and opens one `CONNECT` stream per routed client.

use std::future::Future;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use http::{Method, Request, StatusCode};
use tokio_rustls::server::TlsStream;

use super::gather::Gathered;
use super::settled::Narrowed;
use super::{
    silence::Heard, watch_silence, TunnelIo, CALLER_HEADER, CLIENT_ADDR_HEADER, CONTROL_AUTHORITY,
    CONTROL_HEADER, ERROR_HEADER, MOVING, PROXIES, TLS_SEND_BUFFER,
};
use crate::tunnel::{Budget, OpenError, OpenRequest, HANDSHAKE_TIMEOUT};

/// The HTTP/2 connection of a tunnel, driven by [`drive`].
pub(crate) type Conn = h2::client::Connection<Gathered<TlsStream<TunnelIo>>, Bytes>;

/// Why the HTTP/2 handshake failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    #[error("HTTP/2 handshake failed: {0}")]
    H2(#[from] h2::Error),
    #[error("HTTP/2 handshake timed out after {HANDSHAKE_TIMEOUT:?}")]
    Timeout,
}

/// The h2 client settings of the proxy. The agent on the other end may be hostile, so it
/// gets nothing the protocol does not need: no server push and no streams of its own, and
/// answers with at most [`MAX_HEADER_LIST`] of headers.
fn builder() -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.initial_window_size(super::STREAM_WINDOW)
        .initial_connection_window_size(super::CONNECTION_WINDOW)
        .max_frame_size(super::MAX_FRAME_SIZE)
        .max_send_buffer_size(super::STREAM_WINDOW as usize)
        .enable_push(false)
        .max_concurrent_streams(0)
        .max_header_list_size(super::MAX_HEADER_LIST);
    b
}

/// Completes the HTTP/2 handshake on an agent's TLS connection, within
/// [`HANDSHAKE_TIMEOUT`].
pub(crate) async fn handshake(mut tls: TlsStream<TunnelIo>) -> Result<Handshaken, HandshakeError> {
    tls.get_mut().1.set_buffer_limit(Some(TLS_SEND_BUFFER));
    // The agent's certificate was verified in the TLS handshake.
    tls.get_mut().0.allow_read_ahead();
    let heard = tls.get_ref().0.heard();
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, builder().handshake(Gathered::new(tls))).await {
        Ok(done) => {
            let (sender, conn) = done?;
            Ok(Handshaken {
                sender,
                conn,
                heard,
            })
        }
        Err(_) => Err(HandshakeError::Timeout),
    }
}

/// A tunnel whose HTTP/2 handshake is done.
pub(crate) struct Handshaken {
    pub(crate) sender: SendRequest<Bytes>,
    pub(crate) conn: Conn,
    /// When the agent was last heard from ([`drive`]'s keep-alive).
    pub(crate) heard: Arc<Heard>,
}

/// How soon a window change is tried again while the agent has not acknowledged the
/// previous one (HTTP/2 allows one unacknowledged SETTINGS at a time here).
const SETTINGS_RETRY: Duration = Duration::from_millis(50);

/// Drives the connection until the agent closes it, falls silent ([`watch_silence`]), or `close`
/// completes (then the connection is dropped, which closes it). Returns why it ended.
///
/// Its streams' receive window follows `budget` ([`Budget`]): each change is sent as
/// `SETTINGS_INITIAL_WINDOW_SIZE`, which moves the window of every open stream too. The
/// budget wakes nobody: the connection reads its window (one atomic load) each time it
/// wakes anyway, for a frame or at the latest the keep-alive PING. Once the agent has
/// acknowledged a narrower window, `narrowed` tells the streams (`settled.rs`).
///
/// The connection stays in its box: a few KiB that the future would otherwise hold inline,
/// for as long as the tunnel lives.
pub(crate) async fn drive(
    mut conn: Box<Conn>,
    heard: Arc<Heard>,
    close: impl Future<Output = &'static str>,
    budget: &Budget,
    narrowed: Narrowed,
) -> String {
    let ping = conn.ping_pong().expect("ping_pong is taken once");
    let keepalive = watch_silence(ping, heard);
    tokio::pin!(close, keepalive);
    let mut applied = super::STREAM_WINDOW;
    // The agent has not acknowledged the previous change yet.
    let mut unacknowledged = false;
    // A narrower window was sent, and the streams have not been told it took effect.
    let mut narrowing = false;
    loop {
        let changed = std::future::poll_fn(|_| match budget.window() {
            want if want == applied => Poll::Pending,
            want => Poll::Ready(want),
        });
        tokio::select! {
            r = &mut conn => return match r {
                Ok(()) => "closed by the agent".to_string(),
                // An agent that stops drops its connection as soon as it has drained.
                Err(e) if e.get_io().is_some_and(|io| crate::tunnel::is_gone(io.kind())) => {
                    format!("the agent went away ({e})")
                }
                Err(e) => format!("connection failed: {e}"),
            },
            e = &mut keepalive => return e.to_string(),
            reason = &mut close => return reason.to_string(),
            want = changed, if !unacknowledged => {
                // Refused only while the previous change is unacknowledged.
                match conn.set_initial_window_size(want) {
                    Ok(()) => {
                        narrowing |= want < applied;
                        applied = want;
                    }
                    Err(_) => unacknowledged = true,
                }
            }
            () = tokio::time::sleep(SETTINGS_RETRY), if unacknowledged || narrowing => {
                unacknowledged = false;
                // h2 tells nobody when the agent acknowledges SETTINGS; it refuses new
                // ones until then. Accepted, the same window again changes nothing, and
                // the narrower one before it is in effect on every open stream.
                if narrowing && conn.set_initial_window_size(applied).is_ok() {
                    narrowing = false;
                    narrowed.send_replace(());
                }
            }
        }
    }
}

/// Sends a `CONNECT` for `req.name` carrying the client's first bytes, and waits for the
/// agent's answer (the caller bounds the wait).
pub(crate) async fn open(
    sender: &SendRequest<Bytes>,
    req: &OpenRequest<'_>,
) -> Result<(SendStream<Bytes>, RecvStream), OpenError> {
    let tunnel_err = |source: h2::Error| OpenError::Tunnel {
        gone: source.is_go_away()
            || source.is_io()
            || source.reason() == Some(h2::Reason::REFUSED_STREAM),
        reason: source.to_string(),
    };
    let mut sender = sender.clone().ready().await.map_err(tunnel_err)?;
    let mut request = Request::builder()
        .method(Method::CONNECT)
        .uri(super::authority_of(req.name).as_ref())
        .header(
            CLIENT_ADDR_HEADER,
            crate::tunnel::client_field(req.client, req.server, req.tls.as_ref()),
        );
    if let Some(caller) = req.caller {
        request = request.header(CALLER_HEADER, caller);
    }
    let request = request
        .body(())
        .expect("a validated name is a valid authority");
    let (response, mut send) = sender.send_request(request, false).map_err(tunnel_err)?;
    // Queued at once, without waiting for the stream's window (the first bytes are
    // bounded by the peek, far below it): the request and the first bytes go out in one
    // write. A failure here is the stream being refused or reset: the answer says why.
    if !req.early.is_empty() {
        let _ = send.send_data(req.early.clone(), false);
    }
    let response = response.await.map_err(tunnel_err)?;
    if response.status() != StatusCode::OK {
        let reason = response
            .headers()
            .get(ERROR_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("no reason given")
            .to_string();
        return Err(OpenError::Refused {
            status: response.status().as_u16(),
            reason,
        });
    }
    Ok((send, response.into_body()))
}

/// Tells the agent that a new process serves this proxy now ([`MOVING`]); returns once
/// the agent answered (the caller bounds the wait). An agent from before upgrades answers
/// with a refusal, and stays until its tunnel closes.
pub(crate) async fn tell_moving(sender: &SendRequest<Bytes>) -> Result<(), h2::Error> {
    let mut sender = sender.clone().ready().await?;
    let request = Request::builder()
        .method(Method::CONNECT)
        .uri(CONTROL_AUTHORITY)
        .header(CONTROL_HEADER, MOVING)
        .body(())
        .expect("a valid control request");
    let (response, _send) = sender.send_request(request, true)?;
    response.await?;
    Ok(())
}

/// Asks the agent which protocols the service for `name` speaks ([`super::ALPN`]; the
/// caller bounds the wait): `Some(true)` when it speaks h2c, `None` when the agent gave
/// no answer (it serves no such name, or predates the question).
pub(crate) async fn ask_alpn(
    sender: &SendRequest<Bytes>,
    name: &str,
) -> Result<Option<bool>, h2::Error> {
    let mut sender = sender.clone().ready().await?;
    let request = Request::builder()
        .method(Method::CONNECT)
        .uri(CONTROL_AUTHORITY)
        .header(CONTROL_HEADER, super::ALPN)
        .header(super::SERVICE_HEADER, name)
        .body(())
        .expect("a valid control request");
    let (response, _send) = sender.send_request(request, true)?;
    let response = response.await?;
    let said = (response.headers().get(super::ALPN_HEADER)).map(|v| v.as_bytes() == b"h2");
    Ok(said.filter(|_| response.status() == StatusCode::OK))
}

/// Tells the agent which proxies share the store now ([`PROXIES`]: `list` is the body);
/// returns once the agent answered (the caller bounds the wait). An agent from before
/// this answers with a refusal and learns the list at its next poll.
pub(crate) async fn tell_proxies(
    sender: &SendRequest<Bytes>,
    list: Bytes,
) -> Result<(), h2::Error> {
    let mut sender = sender.clone().ready().await?;
    let request = Request::builder()
        .method(Method::CONNECT)
        .uri(CONTROL_AUTHORITY)
        .header(CONTROL_HEADER, PROXIES)
        .body(())
        .expect("a valid control request");
    let (response, mut send) = sender.send_request(request, false)?;
    send.send_data(list, true)?;
    response.await?;
    Ok(())
}
