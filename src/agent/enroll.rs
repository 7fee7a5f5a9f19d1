//! `revproxy-agent enroll`: trade a one-time token for a certificate.
//!
//! The key is generated here and never leaves the machine; only a CSR does. The proxy is
//! accepted only if its chain ends in a CA matching a pin in the token, so a man in the
//! middle learns nothing and can issue nothing. If the answer is lost in transit the
//! request is retried with the same CSR, which the proxy answers with the same certificate.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, PublicKeyData};
use revproxy_ca::{Pin, Token};
use tokio_rustls::TlsConnector;
use tracing::{info, warn};

use super::identity::{Identity, IdentityError};
use crate::runtime::backoff::Backoff;
use crate::tls::{self, TlsError};
use crate::wire::enroll::{EnrollBody, EnrollReply, ErrorReply, ENROLL_PATH, MAX_RESPONSE_BODY};

/// Time allowed for one whole attempt: TLS, request and answer.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);
/// First pause before retrying an attempt the network broke; it doubles up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_secs(1);
/// Longest pause between attempts.
const RETRY_MAX: Duration = Duration::from_secs(4);
/// Attempts made when the network fails (the proxy's refusals are never retried).
const ATTEMPTS: u32 = 3;

/// Why enrollment failed.
#[derive(Debug, thiserror::Error)]
pub enum EnrollClientError {
    #[error("this is not the proxy that issued your token: the server at {server} presented CA {presented}, but the token pins {expected}; check the address, or ask the operator for a new token")]
    NotOurProxy {
        server: String,
        presented: String,
        expected: String,
    },
    #[error("cannot reach the proxy at {server}: {reason}")]
    Unreachable { server: String, reason: String },
    #[error("the server at {server} does not speak TLS: is this the proxy's agent port? (`revproxy-agent enroll --server HOST:PORT` names another)")]
    NotTls { server: String },
    #[error("the proxy refused: {message}")]
    Refused {
        status: u16,
        code: String,
        message: String,
        /// Seconds the proxy asks us to wait before asking again.
        retry_after: Option<u64>,
    },
    #[error("the proxy's answer is invalid: {0}")]
    BadReply(String),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("could not generate the agent key: {0}")]
    Key(#[from] rcgen::Error),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

impl EnrollClientError {
    /// The proxy's error code for a refusal (`token_used`, `token_expired`, ...).
    pub fn code(&self) -> Option<&str> {
        match self {
            EnrollClientError::Refused { code, .. } => Some(code),
            _ => None,
        }
    }

    /// Whether the proxy refused for good because of the certificate used (revoked,
    /// expired, unknown): only a new enrollment helps.
    pub fn needs_reenrollment(&self) -> bool {
        matches!(
            self.code(),
            Some("cert_revoked" | "cert_expired" | "unknown_cert")
        )
    }

    /// How long the proxy asks us to wait before the same request may succeed (a renewal
    /// that is not due yet, a rate limit).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            EnrollClientError::Refused {
                retry_after: Some(secs),
                ..
            } => Some(Duration::from_secs(*secs)),
            _ => None,
        }
    }

    fn is_transient(&self) -> bool {
        matches!(self, EnrollClientError::Unreachable { .. })
    }
}

/// Enrolls with `token` and saves the new identity in `state_dir`, replacing any previous
/// identity only once the new one is safely on disk.
pub async fn enroll(token: &Token, state_dir: &Path) -> Result<Identity, EnrollClientError> {
    Identity::check_dir(state_dir)?;
    let pending = Pending::new(state_dir, ENROLL_PENDING_FILE);
    let key = pending.key_for(&token.public.id)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let csr = params.serialize_request(&key)?.pem()?;
    let body = serde_json::to_vec(&EnrollBody {
        token_id: token.public.id.clone(),
        secret: token.secret.to_base64(),
        csr,
    })
    .expect("request serializes");
    let body = Bytes::from(body);

    let mut attempt = 1;
    let mut backoff = Backoff::new(RETRY_MIN, RETRY_MAX);
    let (status, reply) = loop {
        match exchange(token, body.clone()).await {
            Ok(answer) => break answer,
            Err(e) if e.is_transient() && attempt < ATTEMPTS => {
                warn!(error = %e, attempt, "enrollment attempt failed; retrying with the same request");
                tokio::time::sleep(backoff.next_delay()).await;
                attempt += 1;
            }
            // The proxy may have answered into the void: keep the pending key so that
            // running `enroll` again with this token can fetch that certificate.
            Err(e) if e.is_transient() => return Err(e),
            Err(e) => {
                pending.clear();
                return Err(e);
            }
        }
    };
    pending.clear();
    let reply = parse_answer(status, &reply)?;
    let identity = check_reply(&token.pins(), &token.public.server, &key, reply)?;
    identity.save(state_dir)?;
    // A renewal left unfinished by the identity this one replaces has nothing to fetch.
    Pending::new(state_dir, RENEW_PENDING_FILE).clear();
    info!(identity = %identity.identity, hosts = %crate::runtime::logging::list(&identity.hosts), "enrolled");
    Ok(identity)
}

/// Reads the proxy's answer: the reply on 200, its refusal otherwise.
pub(super) fn parse_answer(
    status: StatusCode,
    reply: &[u8],
) -> Result<EnrollReply, EnrollClientError> {
    if status != StatusCode::OK {
        let err: ErrorReply = serde_json::from_slice(reply).map_err(|_| {
            EnrollClientError::BadReply(format!("HTTP {status} without an error description"))
        })?;
        return Err(EnrollClientError::Refused {
            status: status.as_u16(),
            code: err.error,
            message: err.message,
            retry_after: err.retry_after,
        });
    }
    serde_json::from_slice(reply).map_err(|e| EnrollClientError::BadReply(e.to_string()))
}

/// The key of an enrollment or renewal whose answer has not arrived yet, kept (0600) so
/// that a retry (a rerun with the same token; the next renewal attempt of the same
/// certificate, even after a restart) uses the same key and gets the same certificate back.
pub(super) struct Pending {
    path: std::path::PathBuf,
}

/// File name of the pending enrollment key.
const ENROLL_PENDING_FILE: &str = "enroll-pending.json";
/// File name of the pending renewal key.
pub(super) const RENEW_PENDING_FILE: &str = "renew-pending.json";

#[derive(serde::Serialize, serde::Deserialize)]
struct PendingKey {
    /// What the key was made for: a token id, or the serial of the certificate renewed.
    #[serde(alias = "token_id")]
    id: String,
    key: String,
}

impl Pending {
    pub(super) fn new(dir: &Path, file: &str) -> Pending {
        Pending {
            path: dir.join(file),
        }
    }

    /// The key saved for `id`, or a new one, saved before anything is sent.
    pub(super) fn key_for(&self, id: &str) -> Result<KeyPair, EnrollClientError> {
        let path = &self.path;
        if let Ok(text) = std::fs::read_to_string(path) {
            if let Ok(saved) = serde_json::from_str::<PendingKey>(&text) {
                if saved.id == id {
                    if let Ok(key) = KeyPair::from_pem(&saved.key) {
                        info!("reusing the key of an earlier, unfinished request");
                        return Ok(key);
                    }
                }
            }
        }
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let saved = serde_json::to_vec(&PendingKey {
            id: id.to_string(),
            key: key.serialize_pem(),
        })
        .expect("pending key serializes");
        let io = |source| {
            EnrollClientError::Identity(IdentityError::Io {
                path: path.clone(),
                source,
            })
        };
        if let Some(dir) = path.parent() {
            revproxy_ca::fsutil::create_private_dir(dir).map_err(io)?;
        }
        revproxy_ca::fsutil::write_atomic(path, &saved, revproxy_ca::fsutil::PRIVATE_FILE_MODE)
            .map_err(io)?;
        Ok(key)
    }

    pub(super) fn clear(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Checks that the certificate is for our key and chains to a pinned CA.
pub(super) fn check_reply(
    pins: &[Pin],
    server: &str,
    key: &KeyPair,
    reply: EnrollReply,
) -> Result<Identity, EnrollClientError> {
    let cert = revproxy_ca::cert::check_issued(
        &reply.certificate,
        &reply.ca,
        pins,
        &key.subject_public_key_info(),
    )
    .map_err(|m| EnrollClientError::BadReply(m.to_string()))?;
    let (hosts, not_after) = (cert.served(), cert.not_after);
    // Only names the certificate holds: the rest would mean nothing here.
    let private = (reply.private.into_iter())
        .filter(|p| hosts.contains(p))
        .collect();
    Ok(Identity {
        server: server.to_string(),
        agent: reply.agent,
        identity: reply.identity,
        private,
        hosts,
        not_after,
        cert_pem: reply.certificate,
        key_pem: key.serialize_pem(),
        ca_pem: reply.ca,
    })
}

/// One enrollment attempt.
async fn exchange(token: &Token, body: Bytes) -> Result<(StatusCode, Bytes), EnrollClientError> {
    let config = tls::pinned_client_config(token.pins(), &[tls::ALPN_HTTP1])?;
    let pins = token.public.pins.join(", ");
    post(&token.public.server, &pins, config, ENROLL_PATH, body).await
}

/// One attempt at an agent API call: connect, verify the proxy with `config`, POST `body`
/// to `path`, read the answer.
pub(super) async fn post(
    server: &str,
    expected_pins: &str,
    config: rustls::ClientConfig,
    path: &str,
    body: Bytes,
) -> Result<(StatusCode, Bytes), EnrollClientError> {
    let request = Request::post(path)
        .header(http::header::HOST, server)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(body))
        .expect("valid request");
    call(server, expected_pins, config, request).await
}

/// Whether a handshake failed because the first bytes back were not TLS records (an HTTP
/// server answers `HTTP/1.1 400`, which rustls reads as a record of an invalid type).
fn speaks_no_tls(e: &std::io::Error) -> bool {
    matches!(
        e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()),
        Some(rustls::Error::InvalidMessage(
            rustls::InvalidMessage::InvalidContentType
                | rustls::InvalidMessage::UnknownProtocolVersion
        ))
    )
}

/// The host part of `host:port` (`[v6]:port` too).
fn host_of(server: &str) -> &str {
    server
        .rsplit_once(':')
        .map_or(server, |(host, _)| host)
        .trim_start_matches('[')
        .trim_end_matches(']')
}

/// One attempt at `request`: connect, verify the proxy with `config`, send it, read the
/// answer.
pub(super) async fn call(
    server: &str,
    expected_pins: &str,
    config: rustls::ClientConfig,
    request: Request<Full<Bytes>>,
) -> Result<(StatusCode, Bytes), EnrollClientError> {
    let unreachable = |reason: String| EnrollClientError::Unreachable {
        server: server.to_string(),
        reason,
    };
    let name = tls::server_name(server).map_err(|e| unreachable(e.to_string()))?;
    let attempt = async {
        // Resolved apart from connecting, so that a name that does not resolve here can
        // be told apart (and another address suggested).
        if let Err(e) = tokio::net::lookup_host(server).await {
            return Err(unreachable(format!(
                "cannot resolve {} ({e}); give the proxy's address as this machine reaches it with `revproxy-agent enroll --server HOST:PORT`",
                host_of(server)
            )));
        }
        let tcp = crate::runtime::connect(server)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let stream = TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| match tls::find_pin_mismatch(&e) {
                Some(m) => EnrollClientError::NotOurProxy {
                    server: server.to_string(),
                    presented: m
                        .presented
                        .first()
                        .map_or_else(|| "none".into(), |p| p.to_string()),
                    expected: expected_pins.to_string(),
                },
                None if speaks_no_tls(&e) => EnrollClientError::NotTls {
                    server: server.to_string(),
                },
                None => unreachable(format!("TLS handshake failed: {e}")),
            })?;
        crate::runtime::http1::exchange(stream, request, MAX_RESPONSE_BODY)
            .await
            .map_err(|e| unreachable(e.to_string()))
    };
    tokio::time::timeout(ATTEMPT_TIMEOUT, attempt)
        .await
        .map_err(|_| unreachable("no answer in time".into()))?
}
