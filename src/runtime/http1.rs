//! One HTTP/1.1 request over an already connected stream, answer read whole within a size
//! bound: what the agent's enrollment and renewal calls and the admin clients
//! (`status`, `ready`) each need. The caller bounds the time and names the errors.

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

/// Why an exchange failed; each says in one line what failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ExchangeError {
    /// The HTTP/1.1 handshake or the request itself failed.
    #[error("{0}")]
    Http(#[from] hyper::Error),
    #[error("reading the answer failed: {0}")]
    Body(Box<dyn std::error::Error + Send + Sync>),
}

/// Sends `request` on `io` and reads the answer (at most `max_body` bytes of body).
pub(crate) async fn exchange<S, B>(
    io: S,
    request: Request<B>,
    max_body: usize,
) -> Result<(StatusCode, Bytes), ExchangeError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    let answer = async move {
        let response = sender.send_request(request).await?;
        let status = response.status();
        let body = Limited::new(response.into_body(), max_body)
            .collect()
            .await
            .map_err(ExchangeError::Body)?
            .to_bytes();
        Ok((status, body))
    };
    // The connection task ends once the exchange drops its sender.
    let (answer, _) = tokio::join!(answer, conn);
    answer
}
