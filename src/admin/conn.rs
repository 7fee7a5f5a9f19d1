//! One admin connection's HTTP/1.1, one request at a time: read a head (only a head: the
//! admin listener takes no bodies), send its answer in full, then read the next.
//!
//! Answers never pile up unread: a client that sends its next request before it has read
//! the answer to the previous one (pipelining) gets that one answer and the connection
//! closes, and a client that takes no bytes of an answer for [`WRITE_STALL`] is dropped.
//! A kept-alive connection (Prometheus keeps one between scrapes) is answered as long as
//! it asks one request at a time; after [`KEEP_ALIVE_FOR`] its next answer closes it.

use std::time::Instant;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode, Version};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{timeout, timeout_at, Duration};

/// Time allowed for a request head, counted from the connection's start or its previous
/// answer: also how long a kept-alive connection may sit idle holding a slot.
pub(super) const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on a request head (and on what is read ahead of one).
pub(super) const MAX_HEAD: usize = 16 * 1024;
/// Headers one request may carry: the admin clients send a handful.
const MAX_HEADERS: usize = 64;
/// Longest a client may accept no bytes of its answer (or of a flush) before it is
/// dropped: a scraper reading a big `/metrics` takes bytes continuously, one that stopped
/// reading only holds a slot.
pub(super) const WRITE_STALL: Duration = Duration::from_secs(5);
/// Age after which a connection's next answer closes it, so that a kept-alive connection
/// ends well before the hard per-connection deadline (`CONNECTION_DEADLINE`) could cut an
/// answer short.
pub(super) const KEEP_ALIVE_FOR: Duration = Duration::from_secs(60);
/// Bytes read at once while waiting for a head.
const READ_CHUNK: usize = 4 * 1024;

/// Why a connection ended other than by the client closing it between requests.
#[derive(Debug, thiserror::Error)]
pub(super) enum Ended {
    #[error("no complete request head within {HEAD_TIMEOUT:?}")]
    HeadTimeout,
    #[error("the client accepted no bytes of its answer for {WRITE_STALL:?}")]
    WriteStalled,
    #[error("request head over {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("unreadable request head: {0}")]
    BadHead(String),
    #[error("closed in the middle of a request head")]
    CutShort,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Serves requests on `io` with `answer` until the client closes, a request asks to
/// close, or a rule above ends the connection. `opened` is when the connection was
/// accepted.
pub(super) async fn serve<S, F>(io: &mut S, opened: Instant, mut answer: F) -> Result<(), Ended>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: FnMut(&Request<()>) -> Response<Bytes>,
{
    let mut buf = Vec::with_capacity(READ_CHUNK);
    loop {
        let (request, used) = match read_head(io, &mut buf).await {
            Ok(Some(head)) => head,
            Ok(None) => return Ok(()),
            Err(why @ (Ended::HeadTooLarge | Ended::BadHead(_))) => {
                let status = match why {
                    Ended::HeadTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    _ => StatusCode::BAD_REQUEST,
                };
                let refusal = plain(status, format!("{why}\n"));
                // Best effort: the connection ends either way.
                let _ = write_all(io, &encode(refusal, Version::HTTP_11, false, true)).await;
                return Err(why);
            }
            Err(why) => return Err(why),
        };
        buf.drain(..used);
        let response = answer(&request);
        // Whatever is already buffered is a pipelined request: answered by nobody.
        let close = !buf.is_empty()
            || request.version() != Version::HTTP_11
            || has_body(&request)
            || asks_close(request.headers())
            || asks_close(response.headers())
            || opened.elapsed() >= KEEP_ALIVE_FOR;
        let head_only = request.method() == Method::HEAD;
        write_all(io, &encode(response, request.version(), head_only, close)).await?;
        if close {
            let _ = timeout(WRITE_STALL, io.shutdown()).await;
            return Ok(());
        }
    }
}

/// Reads until `buf` holds a complete head: the request and the bytes it took, or `None`
/// when the client closed before sending anything.
async fn read_head<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut Vec<u8>,
) -> Result<Option<(Request<()>, usize)>, Ended> {
    let deadline = tokio::time::Instant::now() + HEAD_TIMEOUT;
    let mut chunk = [0u8; READ_CHUNK];
    loop {
        if !buf.is_empty() {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut parsed = httparse::Request::new(&mut headers);
            match parsed.parse(buf) {
                Ok(httparse::Status::Complete(used)) => {
                    return Ok(Some((to_request(&parsed)?, used)))
                }
                Ok(httparse::Status::Partial) => {}
                Err(e) => return Err(Ended::BadHead(e.to_string())),
            }
        }
        if buf.len() >= MAX_HEAD {
            return Err(Ended::HeadTooLarge);
        }
        let want = READ_CHUNK.min(MAX_HEAD - buf.len());
        let n = timeout_at(deadline, io.read(&mut chunk[..want]))
            .await
            .map_err(|_| Ended::HeadTimeout)??;
        if n == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(Ended::CutShort)
            };
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn to_request(parsed: &httparse::Request<'_, '_>) -> Result<Request<()>, Ended> {
    let bad = |what: &str| Ended::BadHead(what.to_string());
    let version = match parsed.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let mut request = Request::builder()
        .method(
            Method::from_bytes(parsed.method.unwrap_or_default().as_bytes())
                .map_err(|_| bad("method"))?,
        )
        .uri(parsed.path.unwrap_or_default())
        .version(version)
        .body(())
        .map_err(|_| bad("request target"))?;
    for h in parsed.headers.iter() {
        let name = header::HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| bad("header"))?;
        let value = HeaderValue::from_bytes(h.value).map_err(|_| bad("header value"))?;
        request.headers_mut().append(name, value);
    }
    Ok(request)
}

/// Whether the request announces a body, which the admin listener never reads: the
/// connection closes after the answer.
fn has_body(request: &Request<()>) -> bool {
    let headers = request.headers();
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get_all(header::CONTENT_LENGTH)
            .iter()
            .any(|v| v.as_bytes() != b"0")
}

fn asks_close(headers: &http::HeaderMap) -> bool {
    headers.get_all(header::CONNECTION).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|token| token.trim().eq_ignore_ascii_case("close"))
        })
    })
}

/// The answer's bytes, head and body in one buffer (one write, no small segment waiting
/// for an acknowledgement).
fn encode(response: Response<Bytes>, version: Version, head_only: bool, close: bool) -> Vec<u8> {
    let (parts, body) = response.into_parts();
    let mut out = Vec::with_capacity(512 + if head_only { 0 } else { body.len() });
    let line = format!(
        "{} {} {}\r\n",
        if version == Version::HTTP_10 {
            "HTTP/1.0"
        } else {
            "HTTP/1.1"
        },
        parts.status.as_str(),
        parts.status.canonical_reason().unwrap_or(""),
    );
    out.extend_from_slice(line.as_bytes());
    for (name, value) in &parts.headers {
        if name == header::CONNECTION || name == header::CONTENT_LENGTH {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if !head_only {
        out.extend_from_slice(&body);
    }
    out
}

fn plain(status: StatusCode, body: String) -> Response<Bytes> {
    let mut response = Response::new(Bytes::from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Writes all of `bytes`, giving up when the client accepts none for [`WRITE_STALL`].
async fn write_all<S: AsyncWrite + Unpin>(io: &mut S, mut bytes: &[u8]) -> Result<(), Ended> {
    while !bytes.is_empty() {
        let n = timeout(WRITE_STALL, io.write(bytes))
            .await
            .map_err(|_| Ended::WriteStalled)??;
        if n == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into());
        }
        bytes = &bytes[n..];
    }
    timeout(WRITE_STALL, io.flush())
        .await
        .map_err(|_| Ended::WriteStalled)??;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    /// Room in the in-memory pipe between client and server: far less than an answer.
    const PIPE: usize = 1024;

    fn big(_: &Request<()>) -> Response<Bytes> {
        plain(StatusCode::OK, "m".repeat(1 << 20))
    }

    fn small(request: &Request<()>) -> Response<Bytes> {
        plain(StatusCode::OK, format!("{}\n", request.uri().path()))
    }

    async fn read_to_end(client: &mut tokio::io::DuplexStream) -> String {
        let mut got = String::new();
        timeout(Duration::from_secs(10), client.read_to_string(&mut got))
            .await
            .expect("the server ends the connection")
            .unwrap();
        got
    }

    #[tokio::test]
    async fn a_client_that_takes_no_bytes_is_dropped_after_the_write_stall() {
        let (mut client, mut server) = duplex(PIPE);
        client
            .write_all(b"GET /metrics HTTP/1.1\r\nhost: localhost\r\n\r\n")
            .await
            .unwrap();
        let started = Instant::now();
        let ended = timeout(
            WRITE_STALL + Duration::from_secs(5),
            serve(&mut server, Instant::now(), big),
        )
        .await
        .expect("the stalled client is dropped");
        assert!(matches!(ended, Err(Ended::WriteStalled)), "{ended:?}");
        assert!(started.elapsed() >= WRITE_STALL);
        drop(client);
    }

    #[tokio::test]
    async fn pipelined_requests_get_one_answer_and_the_connection_closes() {
        let (mut client, mut server) = duplex(64 * 1024);
        client
            .write_all(&b"GET /a HTTP/1.1\r\nhost: localhost\r\n\r\n".repeat(3))
            .await
            .unwrap();
        let server = tokio::spawn(async move { serve(&mut server, Instant::now(), small).await });
        let got = read_to_end(&mut client).await;
        assert_eq!(got.matches("HTTP/1.1 200 OK").count(), 1, "{got}");
        assert!(got.contains("connection: close\r\n"), "{got}");
        assert!(got.ends_with("\r\n\r\n/a\n"), "{got}");
        server.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn one_request_at_a_time_keeps_the_connection_alive() {
        let (mut client, mut server) = duplex(64 * 1024);
        let server = tokio::spawn(async move { serve(&mut server, Instant::now(), small).await });
        for path in ["/a", "/b"] {
            client
                .write_all(format!("GET {path} HTTP/1.1\r\nhost: localhost\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 1024];
            while !got.ends_with(format!("{path}\n").as_bytes()) {
                let n = timeout(Duration::from_secs(10), client.read(&mut buf))
                    .await
                    .unwrap()
                    .unwrap();
                assert!(n > 0, "closed after {}", String::from_utf8_lossy(&got));
                got.extend_from_slice(&buf[..n]);
            }
            assert!(!String::from_utf8_lossy(&got).contains("connection: close"));
        }
        drop(client);
        server.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn heads_that_break_the_rules_are_refused() {
        let (mut client, mut server) = duplex(64 * 1024);
        client.write_all(b"NOT HTTP AT ALL\r\n\r\n").await.unwrap();
        let server_end = serve(&mut server, Instant::now(), small).await;
        assert!(
            matches!(server_end, Err(Ended::BadHead(_))),
            "{server_end:?}"
        );
        drop(server);
        assert!(read_to_end(&mut client).await.starts_with("HTTP/1.1 400"));

        let (mut client, mut server) = duplex(64 * 1024);
        let long = format!("GET / HTTP/1.1\r\nx: {}\r\n", "y".repeat(MAX_HEAD));
        client.write_all(long.as_bytes()).await.unwrap();
        let server_end = serve(&mut server, Instant::now(), small).await;
        assert!(
            matches!(server_end, Err(Ended::HeadTooLarge)),
            "{server_end:?}"
        );
        drop(server);
        assert!(read_to_end(&mut client).await.starts_with("HTTP/1.1 431"));
    }
}
