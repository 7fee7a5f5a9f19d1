//! The agent's end of a QUIC tunnel: it dials the proxy with its client certificate,
//! accepts the streams the proxy opens and serves each one (read the header, dial the
//! backend, answer, splice); it retires the tunnel with a GOAWAY control stream.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::VarInt;
use tracing::{debug, info, warn};

use super::{code, read_frame, splice, transport_config, udp_socket, Role, GOAWAY, HEADER_TIMEOUT};
use crate::tls::Credentials;
use crate::tunnel::control::{
    CONTROL_TIMEOUT, MAX_PROXY_LIST, QUIC_MOVING, QUIC_PROXIES, QUIC_SLOW_KEEPALIVE,
};
use crate::tunnel::duplex::Duplex;
use crate::tunnel::{
    udp, Backend, Backends, ConnectError, DialRequest, Meter, StreamLimits, TunnelError,
};
use crate::wire::stream::{Answer, StreamHeader};

/// One stream the proxy opened, not yet answered, with its connection (a UDP flow's
/// datagrams ride the connection, `tunnel/udp.rs`).
pub(crate) type Incoming = (quinn::SendStream, quinn::RecvStream, quinn::Connection);

/// What the proxy opened: a stream for a client, or a control message (`control.rs`).
pub(crate) enum Accepted {
    Stream(Incoming),
    Control(quinn::RecvStream),
}

/// What a control message said.
pub(crate) enum Told {
    /// The proxies sharing the store.
    Proxies(bytes::Bytes),
    /// The proxy moves to a new process ([`QUIC_MOVING`]).
    Moving,
    /// The proxy holds idle tunnels long enough for the agent's keep-alive alone
    /// ([`QUIC_SLOW_KEEPALIVE`]).
    SlowKeepalive,
}

/// Reads a control message: the proxy list it carries, or the news that the proxy moves,
/// if it is whole within [`CONTROL_TIMEOUT`] and [`MAX_PROXY_LIST`].
pub(crate) async fn read_control(mut recv: quinn::RecvStream) -> Option<Told> {
    let limit = QUIC_PROXIES.len() + MAX_PROXY_LIST;
    let read = tokio::time::timeout(CONTROL_TIMEOUT, recv.read_to_end(limit)).await;
    match read {
        Ok(Ok(msg)) if msg.starts_with(QUIC_PROXIES) => Some(Told::Proxies(
            bytes::Bytes::from(msg).slice(QUIC_PROXIES.len()..),
        )),
        Ok(Ok(msg)) if msg == QUIC_MOVING => Some(Told::Moving),
        Ok(Ok(msg)) if msg == QUIC_SLOW_KEEPALIVE => Some(Told::SlowKeepalive),
        Ok(Ok(_)) => {
            debug!("a control message this agent does not know; ignored");
            None
        }
        Ok(Err(e)) => {
            debug!(error = %e, "a control message could not be read");
            None
        }
        Err(_) => {
            debug!("a control message did not arrive whole in time");
            None
        }
    }
}

/// A QUIC tunnel whose handshake is done. The endpoint is kept so that the close is sent
/// before its socket goes.
pub(crate) struct Conn {
    conn: quinn::Connection,
    endpoint: quinn::Endpoint,
    /// The proxy closed the tunnel with [`code::MOVING`].
    moved: bool,
}

impl Conn {
    /// An agent's tunnel made of `conn` on `endpoint` (tests dial their own).
    #[cfg(test)]
    pub(crate) fn from_parts(conn: quinn::Connection, endpoint: quinn::Endpoint) -> Conn {
        Conn {
            conn,
            endpoint,
            moved: false,
        }
    }

    /// The connection, to open mesh streams on.
    pub(crate) fn connection(&self) -> quinn::Connection {
        self.conn.clone()
    }
}

/// Dials the proxy at `server` over QUIC, offering `alpn` (the caller bounds the whole).
pub(crate) async fn connect(
    server: &str,
    creds: &Credentials<'_>,
    alpn: &[u8],
) -> Result<Conn, ConnectError> {
    let addr = tokio::net::lookup_host(server)
        .await
        .map_err(ConnectError::Resolve)?
        .next()
        .ok_or(ConnectError::NoAddress)?;
    let crypto = creds.client_config(alpn)?;
    let mut config = crate::tls::quic_client_config(crypto);
    config.transport_config(Arc::new(transport_config(Role::Agent)));
    let local: SocketAddr = if addr.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let socket = udp_socket(local).map_err(ConnectError::Udp)?;
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(ConnectError::Udp)?;
    // The verifier checks the pinned CA, not the name; quinn still wants a valid one.
    let host = server
        .rsplit_once(':')
        .map_or(server, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    let conn = endpoint
        .connect_with(config, addr, host)
        .map_err(|e| ConnectError::Tls(e.to_string()))?
        .await
        .map_err(|e| ConnectError::Tls(e.to_string()))?;
    Ok(Conn {
        conn,
        endpoint,
        moved: false,
    })
}

impl Conn {
    /// The next stream or control message; `None` once the proxy closed the tunnel.
    pub(crate) async fn accept(&mut self) -> Result<Option<Accepted>, TunnelError> {
        let accepted = tokio::select! {
            bi = self.conn.accept_bi() => bi.map(|(send, recv)| Accepted::Stream((send, recv, self.conn.clone()))),
            uni = self.conn.accept_uni() => uni.map(Accepted::Control),
        };
        match accepted {
            Ok(accepted) => Ok(Some(accepted)),
            Err(quinn::ConnectionError::ApplicationClosed(close)) => {
                debug!(reason = %String::from_utf8_lossy(&close.reason), "tunnel closed by the proxy");
                self.moved = close.error_code == VarInt::from_u32(code::MOVING);
                Ok(None)
            }
            Err(e @ quinn::ConnectionError::Reset) => Err(TunnelError::Closed(e.to_string())),
            Err(e) => Err(TunnelError::Broken(e.to_string())),
        }
    }

    /// Whether the proxy closed the tunnel because it moved to a new process.
    pub(crate) fn moved(&self) -> bool {
        self.moved
    }

    /// Tells the proxy to route nothing new here (see [`GOAWAY`]).
    pub(crate) async fn goaway(&mut self) {
        let send = async {
            if let Ok(mut control) = self.conn.open_uni().await {
                let _ = control.write_all(GOAWAY).await;
                let _ = control.finish();
            }
        };
        // Bounded: a tunnel too broken to take this is closing anyway.
        let _ = tokio::time::timeout(Duration::from_secs(1), send).await;
    }

    /// Closes the tunnel (its streams are done, or out of time).
    pub(crate) fn close(&self, reason: &'static str) {
        self.conn
            .close(VarInt::from_u32(code::DONE), reason.as_bytes());
    }

    /// Lets the close reach the proxy before the socket goes (bounded).
    pub(crate) async fn finish(self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

/// Serves one stream: read its header, dial the backend, answer, splice.
pub(crate) async fn serve_stream<B: Backends>(
    backends: Arc<B>,
    stream: Incoming,
    limits: StreamLimits,
) {
    let (send, mut recv, conn) = stream;
    // Reset, not finished, if this task ends before the stream does.
    let mut send = super::Unfinished::new(send);
    let header = tokio::time::timeout(HEADER_TIMEOUT, read_frame(&mut recv, StreamHeader::parse))
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no stream header in time",
            ))
        });
    let (header, first) = match header {
        Ok(read) => read,
        Err(e) => {
            warn!(error = %e, "bad stream header; resetting the stream");
            let _ = send.reset(VarInt::from_u32(code::PROTOCOL));
            return;
        }
    };
    let (name, client, caller) = (header.name, header.client, header.caller);
    if name == crate::tunnel::h2::CONTROL_AUTHORITY {
        if let Some(service) = client.strip_prefix(crate::tunnel::control::QUIC_ALPN) {
            let answer = match backends.speaks_h2c(&service.to_ascii_lowercase()) {
                Some(h2c) => Answer {
                    status: 200,
                    reason: crate::tunnel::control::alpn_answer(h2c).into(),
                },
                None => Answer {
                    status: 404,
                    reason: format!("this agent serves no {service}"),
                },
            };
            let _ = send.write_all(&answer.encode()).await;
            let _ = send.finish();
            return;
        }
    }
    let caller = (!caller.is_empty()).then_some(caller);
    let field = crate::tunnel::parse_client_field(&client);
    let client_addr = field.client;
    let dial = DialRequest {
        name: &name,
        caller: caller.as_deref(),
        client: client_addr,
        server: field.server,
        tls: field.tls.as_ref(),
    };
    let dialed = match backends.dial(dial).await {
        Ok(dialed) => dialed,
        Err(refusal) => {
            warn!(host = %name, client = client_addr.map(tracing::field::display), status = refusal.status, reason = %refusal.reason, "stream refused");
            let answer = Answer {
                status: refusal.status,
                reason: refusal.reason,
            };
            let _ = send.write_all(&answer.encode()).await;
            let _ = send.finish();
            return;
        }
    };
    // The proxy sends a UDP flow's QUIC datagrams once it has the answer: listen first.
    let path = (matches!(dialed.stream, Backend::Udp(_)))
        .then(|| udp::QuicPath::join(&conn, u64::from(recv.id()), false));
    if let Err(e) = send.write_all(&Answer::ok().encode()).await {
        return debug!(error = %e, "stream gone before the answer");
    }
    match &dialed.caller {
        Some(caller) => {
            info!(host = %name, client = client_addr.map(tracing::field::display), caller = %caller, backend = %dialed.addr, "mesh stream open")
        }
        None => {
            debug!(host = %name, client = client_addr.map(tracing::field::display), backend = %dialed.addr, "stream open")
        }
    }
    let backend = match dialed.stream {
        Backend::Tcp(tcp) => tcp,
        Backend::Udp(socket) => {
            let io = tokio::io::join(
                tokio::io::AsyncReadExt::chain(std::io::Cursor::new(first), recv),
                send,
            );
            return crate::tunnel::agent_end::relay_udp(
                &name,
                Duplex::Quic(io),
                path,
                socket,
                dialed.counters,
            )
            .await;
        }
    };
    let meter = Meter::new(&limits, dialed.counters);
    match splice::splice(backend, send, recv, first, limits.send_timeout, &meter).await {
        Ok((up, down)) => debug!(host = %name, to_backend = down, from_backend = up, "stream done"),
        Err(e) => debug!(host = %name, error = %e, "stream ended with an error"),
    }
}
