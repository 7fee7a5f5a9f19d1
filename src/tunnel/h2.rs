//! HTTP/2 tunnel plumbing shared by the proxy (client side) and the agent (server side):
//! settings, keep-alive, and the two copy directions between a TCP socket and an h2 stream.

use std::future::poll_fn;
use std::io;

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// Per-stream receive window. Bounds what one stream can have in flight (and so the memory
/// a reader that stopped can pin on the far side) while letting one stream fill a fast
/// link; see `docs/benchmarks.md` for the measurement behind the value.
pub const STREAM_WINDOW: u32 = 1024 * 1024;
/// Per-connection receive window: large, so a few stalled streams cannot starve the rest.
pub const CONNECTION_WINDOW: u32 = 64 * 1024 * 1024;
/// Largest DATA frame. Bigger frames mean fewer frame headers and wakeups per byte.
pub const MAX_FRAME_SIZE: u32 = 256 * 1024;
/// Most streams the agent lets one tunnel carry at once.
pub const MAX_STREAMS: u32 = 16 * 1024;
/// Bytes read from a socket per step. Only allocated once the socket is readable, so an
/// idle stream holds no buffer.
pub const READ_CHUNK: usize = 64 * 1024;

/// The h2 client (proxy) settings for a tunnel.
pub fn client_builder() -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_send_buffer_size(STREAM_WINDOW as usize);
    b
}

/// The h2 server (agent) settings for a tunnel.
pub fn server_builder() -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_send_buffer_size(STREAM_WINDOW as usize)
        .max_concurrent_streams(MAX_STREAMS);
    b
}

fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io()
            .unwrap_or_else(|| io::Error::other("h2 I/O error"))
    } else {
        io::Error::other(e)
    }
}

/// Sends `bytes` on `send`, waiting for flow-control capacity as the peer grants it.
pub async fn send_all(send: &mut SendStream<Bytes>, mut bytes: Bytes) -> io::Result<()> {
    while !bytes.is_empty() {
        send.reserve_capacity(bytes.len());
        let granted = poll_fn(|cx| send.poll_capacity(cx))
            .await
            .ok_or_else(|| io::Error::new(io::ErrorKind::BrokenPipe, "stream closed by peer"))?
            .map_err(h2_io)?;
        if granted == 0 {
            continue;
        }
        let chunk = bytes.split_to(granted.min(bytes.len()));
        send.send_data(chunk, false).map_err(h2_io)?;
    }
    Ok(())
}

/// Copies a socket into an h2 stream until EOF, then ends the stream (half-close).
pub async fn socket_to_stream(
    rd: &mut OwnedReadHalf,
    send: &mut SendStream<Bytes>,
) -> io::Result<u64> {
    let mut total = 0u64;
    loop {
        rd.readable().await?;
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        match rd.try_read_buf(&mut buf) {
            Ok(0) => {
                send.send_data(Bytes::new(), true).map_err(h2_io)?;
                return Ok(total);
            }
            Ok(n) => {
                total += n as u64;
                send_all(send, buf.freeze()).await?;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Copies an h2 stream into a socket until the stream ends, then shuts down the socket's
/// write side (half-close). Capacity is released only after the bytes were written, which
/// is what makes a slow reader hold back only its own stream.
pub async fn stream_to_socket(recv: &mut RecvStream, wr: &mut OwnedWriteHalf) -> io::Result<u64> {
    let mut total = 0u64;
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.map_err(h2_io)?;
        wr.write_all(&chunk).await?;
        total += chunk.len() as u64;
        recv.flow_control()
            .release_capacity(chunk.len())
            .map_err(h2_io)?;
    }
    wr.shutdown().await?;
    Ok(total)
}

/// Pumps both directions between a socket and an h2 stream until both are finished, or
/// until either fails (then the other is dropped, which resets the stream).
pub async fn splice(
    tcp: tokio::net::TcpStream,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
) -> io::Result<(u64, u64)> {
    let (mut rd, mut wr) = tcp.into_split();
    let up = socket_to_stream(&mut rd, &mut send);
    let down = stream_to_socket(&mut recv, &mut wr);
    tokio::pin!(up, down);
    let (mut sent, mut received) = (None, None);
    while sent.is_none() || received.is_none() {
        tokio::select! {
            r = &mut up, if sent.is_none() => sent = Some(r?),
            r = &mut down, if received.is_none() => received = Some(r?),
        }
    }
    Ok((sent.unwrap_or(0), received.unwrap_or(0)))
}
