//! Reading a public connection's first bytes for a name: a trusted balancer's PROXY
//! header, then the TLS ClientHello's server name or the HTTP request's `Host`. Bounded in
//! bytes ([`MAX_PEEK`]) and in time; the bytes read are kept to be replayed exactly.
//! Routing on the name is in `public.rs`.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use super::metrics::Refused;
use crate::route::{http, sni};
use crate::wire::proxy_header::{self, Parsed};

/// Most bytes read while looking for a name: a 16 KiB ClientHello may come in many small
/// records, each with a 5-byte header.
pub(super) const MAX_PEEK: usize = 32 * 1024;

/// Reads a PROXY header (v1 or v2) from the start of `tcp`, within `timeout` and
/// [`proxy_header::MAX_HEADER`] bytes: the client and the address it reached, if the
/// header names them, and the bytes that came after it. `Err(None)`: closed before any
/// byte.
pub(super) async fn read_proxy_header(
    tcp: &mut TcpStream,
    timeout: Duration,
) -> Result<(Option<SocketAddr>, Option<SocketAddr>, BytesMut), Option<String>> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = BytesMut::with_capacity(512);
    loop {
        match proxy_header::parse(&buf) {
            Parsed::Header {
                client,
                server,
                len,
            } => {
                let rest = buf.split_off(len);
                return Ok((client, server, rest));
            }
            Parsed::Invalid(reason) => return Err(Some(reason)),
            Parsed::Incomplete => {}
        }
        buf.reserve(512);
        match tokio::time::timeout_at(deadline, tcp.read_buf(&mut buf)).await {
            Ok(Ok(0)) if buf.is_empty() => return Err(None),
            Ok(Ok(0)) => return Err(Some("closed before its PROXY header was complete".into())),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(Some(e.to_string())),
            Err(_) => return Err(Some(format!("no complete PROXY header within {timeout:?}"))),
        }
    }
}

/// Why a peek gave up.
#[derive(Debug)]
pub(super) struct PeekError {
    pub(super) reason: String,
    /// Whether the client spoke the protocol well enough to be told.
    pub(super) answerable: bool,
    /// What it counts as.
    pub(super) why: Refused,
}

impl std::fmt::Display for PeekError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

/// What a peek parser says about the bytes so far.
pub(super) enum Peeked<T> {
    NeedMore,
    Done(T),
}

pub(super) fn sni_name(buf: &[u8]) -> Result<Peeked<Option<String>>, PeekError> {
    match sni::peek_sni(buf) {
        Ok(sni::SniPeek::NeedMore) => Ok(Peeked::NeedMore),
        Ok(sni::SniPeek::Found(name)) => Ok(Peeked::Done(name)),
        Err(e) => Err(PeekError {
            reason: e.to_string(),
            answerable: false,
            why: Refused::BadHead,
        }),
    }
}

pub(super) fn http_host(buf: &[u8]) -> Result<Peeked<String>, PeekError> {
    match http::peek_host(buf) {
        Ok(http::HostPeek::NeedMore) => Ok(Peeked::NeedMore),
        Ok(http::HostPeek::Found(host)) => Ok(Peeked::Done(host)),
        Err(e) => Err(PeekError {
            answerable: !matches!(e, http::HostError::NotHttp),
            reason: e.to_string(),
            why: Refused::BadHead,
        }),
    }
}

/// Reads (after the bytes already in `buf`) until `parse` decides, within `timeout`
/// overall and [`MAX_PEEK`] bytes.
pub(super) async fn peek<T>(
    tcp: &mut TcpStream,
    mut buf: BytesMut,
    timeout: Duration,
    parse: impl Fn(&[u8]) -> Result<Peeked<T>, PeekError>,
) -> Result<(T, Bytes), PeekError> {
    let deadline = tokio::time::Instant::now() + timeout;
    buf.reserve(2048);
    loop {
        if let Peeked::Done(v) = parse(&buf)? {
            return Ok((v, buf.freeze()));
        }
        if buf.len() >= MAX_PEEK {
            return Err(PeekError {
                reason: format!("nothing to route on in the first {MAX_PEEK} bytes"),
                answerable: true,
                why: Refused::BadHead,
            });
        }
        buf.reserve(4096.min(MAX_PEEK - buf.len()));
        let read = tokio::time::timeout_at(deadline, tcp.read_buf(&mut buf)).await;
        match read {
            Ok(Ok(0)) => {
                return Err(PeekError {
                    reason: "client closed before saying where to go".into(),
                    answerable: false,
                    why: Refused::ClientClosed,
                })
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                return Err(PeekError {
                    reason: e.to_string(),
                    answerable: false,
                    why: Refused::ClientClosed,
                })
            }
            Err(_) => {
                return Err(PeekError {
                    reason: format!("client did not say where to go within {timeout:?}"),
                    answerable: true,
                    why: Refused::PeekTimeout,
                })
            }
        }
    }
}
