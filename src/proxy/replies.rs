//! What a public client is told when it cannot be served, in its own protocol: a TLS alert
//! for an SNI client, an HTTP status with a one-line reason for an HTTP client, and
//! silence on a fixed-target listener (whose protocol we do not know); and the redirect
//! to https that a plain-HTTP client of a name whose TLS ends at the proxy gets.

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// How a connection's protocol lets us say "no".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Reply {
    Tls,
    Http,
    Silent,
}

/// A TLS fatal alert record: unrecognized_name (112).
pub(super) const ALERT_UNRECOGNIZED_NAME: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 112];
/// A TLS fatal alert record: internal_error (80).
pub(super) const ALERT_INTERNAL_ERROR: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 80];

/// Names one public connection in the log and in the answer it gets: random, so it says
/// nothing about how many connections the proxy serves.
#[derive(Clone, Copy, Debug)]
pub(super) struct ConnId(u64);

impl ConnId {
    pub(super) fn new() -> ConnId {
        ConnId(crate::runtime::random())
    }
}

impl std::fmt::Display for ConnId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// The response header that carries the connection id.
pub(super) const CONN_ID_HEADER: &str = "revproxy-connection-id";

/// Answers an HTTP client with `status` and a one-line `reason` (never an agent's name, a
/// backend's address or an error from inside: those go to the log under `id`), then
/// closes.
pub(super) async fn http_error(
    tcp: &mut (impl tokio::io::AsyncWrite + Unpin),
    status: u16,
    text: &str,
    reason: &str,
    id: ConnId,
) {
    let body = format!("{reason}\n");
    let response = format!(
        "HTTP/1.1 {status} {text}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n{CONN_ID_HEADER}: {id}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tcp.write_all(response.as_bytes()).await;
    let _ = tcp.shutdown().await;
}

/// Sends a plain-HTTP client of a terminated name to https, the same path (`308`: the
/// method and body are kept), then closes.
pub(super) async fn redirect_to_https(tcp: TcpStream, name: &str, head: &[u8], id: ConnId) {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut request = httparse::Request::new(&mut headers);
    let target = match request.parse(head) {
        Ok(_) => request.path.unwrap_or("/"),
        Err(_) => "/",
    };
    // Origin form (`/a?b`) as it is; absolute form (`http://host/a?b`) from its path.
    let path = match target.strip_prefix("http://") {
        Some(rest) => rest.find('/').map_or("/", |i| &rest[i..]),
        None if target.starts_with('/') => target,
        None => "/",
    };
    let response = format!(
        "HTTP/1.1 308 Permanent Redirect\r\nlocation: https://{name}{path}\r\ncontent-length: 0\r\n{CONN_ID_HEADER}: {id}\r\nconnection: close\r\n\r\n"
    );
    answer_and_close(tcp, response.as_bytes()).await;
}

/// Answers an ACME server's HTTP-01 validation with the key authorization it asked for.
pub(super) async fn acme_challenge_answer(tcp: TcpStream, key_authorization: &str, id: ConnId) {
    let response = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: {}\r\n{CONN_ID_HEADER}: {id}\r\nconnection: close\r\n\r\n{key_authorization}",
        key_authorization.len()
    );
    answer_and_close(tcp, response.as_bytes()).await;
}

/// Sends `response`, then closes once the client has sent what it was sending (closing
/// with its request body unread would reset the connection, and the client could lose
/// the answer), within [`REDIRECT_DRAIN`].
async fn answer_and_close(mut tcp: TcpStream, response: &[u8]) {
    if tcp.write_all(response).await.is_err() || tcp.shutdown().await.is_err() {
        return;
    }
    let drain = async {
        let mut sink = [0u8; 4096];
        let mut left = MAX_REDIRECT_DRAIN;
        while left > 0 {
            match tokio::io::AsyncReadExt::read(&mut tcp, &mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(REDIRECT_DRAIN, drain).await;
}

/// Longest a redirected client's remaining bytes are read (and dropped) before closing.
const REDIRECT_DRAIN: Duration = Duration::from_secs(2);
/// Most bytes read from it meanwhile.
const MAX_REDIRECT_DRAIN: usize = 256 * 1024;

/// Tells a client that nothing serves `name` (`offline`: some agent is granted it), where
/// its protocol allows.
pub(super) async fn tell_unrouted(
    tcp: &mut TcpStream,
    name: &str,
    reply: Reply,
    offline: bool,
    id: ConnId,
) {
    match (reply, offline) {
        (Reply::Tls, _) => {
            let _ = tcp.write_all(&ALERT_UNRECOGNIZED_NAME).await;
        }
        (Reply::Http, true) => {
            let reason = format!("{name} is offline");
            http_error(tcp, 503, "Service Unavailable", &reason, id).await;
        }
        (Reply::Http, false) => {
            let reason = format!("no route for {name}");
            http_error(tcp, 502, "Bad Gateway", &reason, id).await;
        }
        (Reply::Silent, _) => {}
    }
}
