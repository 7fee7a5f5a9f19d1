//! The HTTP client instant-acme talks to the ACME server with: HTTPS (TLS 1.3 or 1.2,
//! verified against the system's roots or `[acme] ca_roots`), one connection per request
//! (an order makes a dozen), every step within [`REQUEST_TIMEOUT`], answers of at most
//! [`MAX_ANSWER`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use instant_acme::{BodyWrapper, BytesResponse, Error, HttpClient};

/// Longest one request may take, connecting included.
pub(super) const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest answer read (a certificate chain, a directory: a few KiB).
const MAX_ANSWER: usize = 1024 * 1024;

/// HTTPS to the ACME server.
pub(super) struct Client {
    tls: tokio_rustls::TlsConnector,
}

impl Client {
    pub(super) fn new(roots: rustls::RootCertStore) -> Result<Client, rustls::Error> {
        // Through the ACME server's own HTTPS: TLS 1.2 as well (rustls' safe defaults),
        // as many public CAs' front ends still offer it.
        let config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Client {
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
        })
    }
}

impl HttpClient for Client {
    fn request(
        &self,
        req: http::Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, Error>> + Send>> {
        let tls = self.tls.clone();
        Box::pin(async move {
            let uri = req.uri().to_string();
            match tokio::time::timeout(REQUEST_TIMEOUT, send(tls, req)).await {
                Ok(answer) => answer.map_err(|e| Error::Other(format!("{uri}: {e}").into())),
                Err(_) => Err(Error::Other(
                    format!("{uri}: no answer within {REQUEST_TIMEOUT:?}").into(),
                )),
            }
        })
    }
}

/// Sends `req` on a connection of its own and reads the whole answer.
async fn send(
    tls: tokio_rustls::TlsConnector,
    req: http::Request<BodyWrapper<Bytes>>,
) -> Result<BytesResponse, String> {
    let uri = req.uri().clone();
    if uri.scheme_str() != Some("https") {
        return Err("not an https:// URL".into());
    }
    let host = uri.host().ok_or("no host in the URL")?.to_string();
    let port = uri.port_u16().unwrap_or(443);
    // An IPv6 literal comes bracketed in the URL.
    let bare = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let tcp = tokio::net::TcpStream::connect((bare.as_str(), port))
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let name = rustls::pki_types::ServerName::try_from(bare).map_err(|e| e.to_string())?;
    let stream = tls
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    // Ends with this request, however it ends (a timeout drops this future).
    let _driving = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(connection));
    let (mut parts, body) = req.into_parts();
    // On a connection of its own, the request names its host itself (origin form).
    let authority = uri.authority().map(|a| a.as_str().to_string());
    if let Some(authority) = authority {
        parts.headers.insert(
            http::header::HOST,
            http::HeaderValue::from_str(&authority).map_err(|e| e.to_string())?,
        );
    }
    parts.uri = uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .parse()
        .map_err(|e: http::uri::InvalidUri| e.to_string())?;
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    let answer = sender
        .send_request(http::Request::from_parts(parts, Full::new(body)))
        .await
        .map_err(|e| e.to_string())?;
    let (parts, body) = answer.into_parts();
    let body = Limited::new(body, MAX_ANSWER)
        .collect()
        .await
        .map_err(|e| format!("reading the answer: {e}"))?
        .to_bytes();
    Ok(BytesResponse::from(http::Response::from_parts(
        parts,
        Full::new(body),
    )))
}
