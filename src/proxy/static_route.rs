//! Static `tcp://` routes: connecting to the backend within the connection's deadline,
//! the PROXY header it may want, and the plain two-way copy. Tunnel streams are spliced by
//! `tunnel/`, not here.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::replies::ConnId;
use crate::tunnel::{Counted, StreamCounters};
use crate::wire::proxy_header::{self, Origin};

/// Copy buffer per direction for static `tcp://` routes (tokio's default is 8 KiB, which
/// costs a syscall pair per 8 KiB).
pub(super) const STATIC_COPY_BUFFER: usize = 64 * 1024;

/// The PROXY header the static backend `addr` wants (empty if none).
pub(super) fn header_for(
    settings: &super::reload::Settings,
    addr: &str,
    origin: &Origin,
) -> Vec<u8> {
    match settings.static_proxy_protocol.get(addr) {
        Some(version) => proxy_header::encode(*version, origin),
        None => Vec::new(),
    }
}

/// Connects to a static route's backend within the connection's deadline.
pub(super) async fn connect_static(
    addr: &str,
    peer: SocketAddr,
    id: ConnId,
    deadline: tokio::time::Instant,
) -> Option<TcpStream> {
    match tokio::time::timeout_at(deadline, crate::runtime::connect(addr)).await {
        Ok(Ok(backend)) => Some(backend),
        Ok(Err(e)) => {
            warn!(%peer, conn = %id, backend = %addr, error = %e, "cannot reach static backend");
            None
        }
        Err(_) => {
            warn!(%peer, conn = %id, backend = %addr, "static backend did not accept in time");
            None
        }
    }
}

/// What a static backend gets before the client's bytes flow.
pub(super) struct Prelude {
    /// The PROXY header it wants (empty if none).
    pub(super) header: Vec<u8>,
    /// The client's bytes already read (counted as the client's).
    pub(super) peeked: Bytes,
}

/// Joins a client to a static route's backend, the prelude first.
pub(super) async fn forward_tcp(
    client: TcpStream,
    mut backend: TcpStream,
    addr: &str,
    first: Prelude,
    peer: SocketAddr,
    id: ConnId,
    counters: StreamCounters,
) -> Option<(u64, u64)> {
    let Prelude { header, peeked } = first;
    counters.read(peeked.len());
    if backend.write_all(&header).await.is_err() || backend.write_all(&peeked).await.is_err() {
        return None;
    }
    // Counted as the bytes move, like a tunnel stream; each direction on its own, so that
    // a break resets only the side that did not get its whole stream.
    let mut client = client;
    let (mut from_client, mut to_client) = client.split();
    let (mut from_backend, mut to_backend) = backend.split();
    let mut counted_in = Counted::new(&mut from_client, &counters);
    let mut counted_out = Counted::new(&mut to_client, &counters);
    let up = async {
        let mut from = tokio::io::BufReader::with_capacity(STATIC_COPY_BUFFER, &mut counted_in);
        let n = tokio::io::copy_buf(&mut from, &mut to_backend).await?;
        to_backend.shutdown().await?;
        Ok(n)
    };
    let down = async {
        let mut from = tokio::io::BufReader::with_capacity(STATIC_COPY_BUFFER, &mut from_backend);
        let n = tokio::io::copy_buf(&mut from, &mut counted_out).await?;
        counted_out.shutdown().await?;
        Ok(n)
    };
    // No idle timeout on a static route (as before).
    let pumped = crate::tunnel::both_ways(up, down, std::future::pending()).await;
    let (up, down) = (counted_in.totals.0, counted_out.totals.1);
    if let Err(e) = &pumped.result {
        debug!(%peer, conn = %id, backend = %addr, error = %e, "static route ended with an error");
        // Broken: a side that did not get its whole stream is reset, so it never takes
        // the cut stream for a complete one.
        if !pumped.delivered {
            let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
        }
        if !pumped.sent {
            let _ = socket2::SockRef::from(&backend).set_linger(Some(Duration::ZERO));
        }
    }
    Some((up + peeked.len() as u64, down))
}
