//! The enrollment endpoint: HTTP/1.1 over TLS on the agent port.
//!
//! One request per connection, a 64 KiB body limit, a deadline on the whole exchange, and a
//! per-source limit on failures. The CA does the deciding (`revproxy_ca::Ca::enroll`); this
//! layer turns HTTP into a call and the outcome into a status with a one-sentence reason.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use revproxy_ca::{EnrollError, EnrollRequest, Secret};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, info, warn};

use super::accept::source_key;
use super::ratelimit;
use super::state::Snapshot;
use super::Shared;
use crate::wire::enroll::{
    EnrollBody, EnrollReply, ErrorReply, ProxiesReply, ProxyAddr, RenewBody, ENROLL_PATH,
    MAX_REQUEST_BODY, PROXIES_PATH, RENEW_PATH,
};

/// Time allowed for the request head to arrive.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for the request body once its head came: an enrollment body is a CSR of
/// a few hundred bytes (at most [`MAX_REQUEST_BODY`]), sent at once; a client that sends a
/// head and then sits gives its place back this soon.
const BODY_TIMEOUT: Duration = Duration::from_secs(5);
/// Time allowed for the whole exchange, body and answer included.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for the enrollment queue before answering 503.
const GATE_TIMEOUT: Duration = Duration::from_secs(10);
/// Least time between two state reloads forced by rate-limited enrollment requests.
const FORCED_RELOAD: Duration = Duration::from_millis(250);
/// Bound on the buffered request head.
const MAX_HEAD: usize = 16 * 1024;

/// Serves one enrollment connection.
pub(super) async fn serve<S>(
    shared: Arc<Shared>,
    io: S,
    peer: SocketAddr,
    client_serial: Option<String>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let shared = shared.clone();
        let client_serial = client_serial.clone();
        async move {
            if req.uri().path() == PROXIES_PATH {
                return Ok::<_, Infallible>(proxies(&shared, client_serial.as_deref(), &req));
            }
            let renewal = req.uri().path() == RENEW_PATH;
            let response = if renewal {
                renew(&shared, peer, client_serial.as_deref(), req).await
            } else {
                handle(&shared, peer, req).await
            };
            let outcome = match response.extensions().get::<Outcome>() {
                Some(Outcome(code)) => code.as_str(),
                None => "ok",
            };
            if renewal {
                shared.metrics.renewal(outcome);
            } else {
                shared.metrics.enrollment(outcome);
            }
            Ok::<_, Infallible>(response)
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .keep_alive(false)
        .max_buf_size(MAX_HEAD)
        .serve_connection(TokioIo::new(io), service);
    match tokio::time::timeout(EXCHANGE_TIMEOUT, conn).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => debug!(error = %e, "enrollment connection ended with an error"),
        Err(_) => debug!("enrollment connection timed out"),
    }
}

/// Seconds a client is asked to wait when the state store cannot be reached.
const STORE_RETRY_AFTER: u64 = 5;

/// The proxies an enrolled agent should keep a tunnel to: answered from memory (the
/// heartbeat's last read), to live certificates only.
fn proxies(
    shared: &Shared,
    client_serial: Option<&str>,
    req: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("use GET {PROXIES_PATH}"),
        );
    }
    let Some(serial) = client_serial.filter(|s| shared.state.get().live.contains(*s)) else {
        return error(
            StatusCode::FORBIDDEN,
            "unknown_cert",
            "present a valid agent certificate to learn the proxies".into(),
        );
    };
    debug!(serial, "proxy list asked for");
    json(StatusCode::OK, &proxy_list(shared))
}

/// The proxies sharing this proxy's store that agents can reach, from memory (the
/// heartbeat's last read): what `GET /v1/proxies` answers, and what a change tells the
/// agents on this proxy's tunnels (`background.rs`).
pub(super) fn proxy_list(shared: &Shared) -> ProxiesReply {
    let mut list: Vec<ProxyAddr> = (shared.peers.read().expect("peers lock").iter())
        .filter_map(|p| {
            Some(ProxyAddr {
                id: p.id.clone(),
                address: p.address.clone()?,
            })
        })
        .collect();
    // This proxy is on the list from its first moment, before its first heartbeat.
    if let (true, Some(address)) = (
        !list.is_empty() && !list.iter().any(|p| p.id == shared.me.id),
        &shared.me.address,
    ) {
        list.push(ProxyAddr {
            id: shared.me.id.clone(),
            address: address.clone(),
        });
    }
    ProxiesReply {
        proxy: shared.me.id.clone(),
        proxies: list,
    }
}

/// A 503 for a store that cannot be reached: the request may be repeated as it is.
fn store_unavailable(what: &str) -> Response<Full<Bytes>> {
    refusal(
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
        format!("the proxy cannot reach its state store, so it cannot complete the {what} now; try again shortly"),
        Some(STORE_RETRY_AFTER),
    )
}

async fn handle(
    shared: &Shared,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    if req.uri().path() != ENROLL_PATH {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no such endpoint; enrollment is POST {ENROLL_PATH}"),
        );
    }
    if req.method() != Method::POST {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("use POST {ENROLL_PATH}"),
        );
    }
    // Counted before anything else, so that concurrent attempts cannot all slip past the
    // limit. A source over it is still heard for a token that is open (unused, not
    // expired, not revoked): the limiter slows down guessing, and must never lock a valid
    // token out because its holder shares an address (a NAT) with someone who failed.
    let source = source_key(peer.ip());
    let limited = shared
        .limiter
        .lock()
        .expect("limiter lock")
        .begin(&source, Instant::now())
        .err();
    let too_many = |wait: Duration| {
        warn!(%peer, "enrollment refused: too many failed attempts from this address");
        rate_limited(
            wait,
            "too many failed enrollment attempts from your address",
        )
    };
    // The attempt was counted by `begin`; only a success or our own fault gives it back.
    let forgive = || {
        if limited.is_none() {
            shared
                .limiter
                .lock()
                .expect("limiter lock")
                .forgive(&source)
        }
    };
    let fail = |status, code: &str, message: String| {
        if let Some(wait) = limited {
            return too_many(wait);
        }
        warn!(%peer, code = %code, "enrollment refused");
        error(status, code, message)
    };

    let collected = Limited::new(req.into_body(), MAX_REQUEST_BODY).collect();
    let Ok(collected) = tokio::time::timeout(BODY_TIMEOUT, collected).await else {
        return fail(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!("the request body did not arrive within {BODY_TIMEOUT:?}"),
        );
    };
    let body = match collected {
        Ok(body) => body.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return fail(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!(
                    "the request body is larger than {} KiB",
                    MAX_REQUEST_BODY / 1024
                ),
            );
        }
        Err(e) => {
            return fail(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("could not read the request body: {e}"),
            )
        }
    };
    let body: EnrollBody = match serde_json::from_slice(&body) {
        Ok(body) => body,
        Err(e) => {
            return fail(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("the request is not a valid enrollment request: {e}"),
            )
        }
    };
    if let Some(wait) = limited {
        // A token minted a moment ago by `revproxy token create` may not be in the view
        // yet; read the state again, but at most a few times a second for all sources.
        let open = |snapshot: Arc<Snapshot>| snapshot.open_tokens.contains(&body.token_id);
        if !open(shared.state.get()) && !open(shared.state.refresh_seldom(FORCED_RELOAD).await) {
            return too_many(wait);
        }
        info!(%peer, token_id = %body.token_id, "over the failure limit, but for an open token: processing it");
    }
    // Cheap checks before the queue: a malformed id can name no token, and it must not
    // reach the log as free text.
    if !is_token_id(&body.token_id) {
        let e = EnrollError::UnknownToken;
        return fail(status_of(&e), e.code(), e.to_string());
    }
    let Some(secret) = Secret::from_base64(&body.secret) else {
        let e = EnrollError::WrongSecret;
        return fail(status_of(&e), e.code(), e.to_string());
    };
    // The id and the secret are checked against memory before the queue and the state's
    // lock: an unknown id or a wrong secret costs neither. (A token minted a moment ago
    // may not be in the view yet: read again, at most a few times a second for all.)
    let stored = |snapshot: Arc<Snapshot>| snapshot.token_secrets.get(&body.token_id).copied();
    let stored = match stored(shared.state.get()) {
        Some(hash) => Some(hash),
        None => stored(shared.state.refresh_seldom(FORCED_RELOAD).await),
    };
    let e = match stored {
        None => Some(EnrollError::UnknownToken),
        Some(hash) if !hash.matches(&secret.hash()) => {
            wrong_secret(shared, &body.token_id);
            Some(EnrollError::WrongSecret)
        }
        Some(_) => None,
    };
    if let Some(e) = e {
        return fail(status_of(&e), e.code(), e.to_string());
    }

    let outcome = {
        let Ok(_turn) = tokio::time::timeout(GATE_TIMEOUT, shared.enroll_gate.lock()).await else {
            forgive();
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                "the proxy is busy with other enrollments; try again in a minute".into(),
            );
        };
        let ca = shared.ca.clone();
        let token_id = body.token_id.clone();
        tokio::task::spawn_blocking(move || {
            ca.enroll(
                &EnrollRequest {
                    token_id: &token_id,
                    secret: &secret,
                    csr_pem: &body.csr,
                },
                time::OffsetDateTime::now_utc(),
            )
        })
        .await
    };
    match outcome {
        Ok(Ok(done)) => {
            forgive();
            // Our own change: let routing see the new grant now, not at the next poll.
            shared.state.refresh().await;
            info!(%peer, token_id = %body.token_id, agent = %done.agent, serial = %done.serial,
                  retry = done.reissued, "agent enrolled");
            json(StatusCode::OK, &reply(done, &shared.state.get()))
        }
        Ok(Err(EnrollError::Internal(e))) if e.is_unavailable() => {
            forgive();
            warn!(%peer, token_id = %body.token_id, error = %e, "enrollment deferred: the store is unavailable");
            store_unavailable("enrollment")
        }
        Ok(Err(EnrollError::Internal(e))) => {
            forgive();
            tracing::error!(%peer, token_id = %body.token_id, error = %e, "enrollment failed");
            internal("enrollment")
        }
        Ok(Err(e)) => {
            debug!(token_id = %body.token_id, reason = %e);
            fail(status_of(&e), e.code(), e.to_string())
        }
        Err(join) => {
            forgive();
            tracing::error!(%peer, error = %join, "enrollment task failed");
            internal("enrollment")
        }
    }
}

/// Counts a wrong secret for `token_id`, and says once per window when a token gets more
/// than [`ratelimit::WRONG_SECRETS_PER_TOKEN`] (someone is trying secrets for it, from
/// however many addresses). Its holder is never locked out: the right secret still works.
fn wrong_secret(shared: &Shared, token_id: &str) {
    let mut limiter = shared.wrong_secrets.lock().expect("limiter lock");
    let now = Instant::now();
    let was_under = limiter.check(&token_id.to_string(), now).is_ok();
    limiter.record(&token_id.to_string(), now);
    if was_under && limiter.check(&token_id.to_string(), now).is_err() {
        warn!(%token_id, "more than {} wrong secrets for this token within {:?}: someone is trying secrets for it; it stays usable by its holder (revoke it with `revproxy token revoke {token_id}` if it leaked)",
              ratelimit::WRONG_SECRETS_PER_TOKEN, ratelimit::WRONG_SECRET_WINDOW);
    }
}

/// Token ids are 16 lower-case hex digits.
fn is_token_id(id: &str) -> bool {
    id.len() == 16
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// `POST /v1/renew`: a fresh certificate for the holder of the presented one.
///
/// Each certificate may ask [`super::ratelimit::RENEWALS_PER_WINDOW`] times per window; the CA
/// renews it once, and not before part of its lifetime has passed.
async fn renew(
    shared: &Shared,
    peer: SocketAddr,
    client_serial: Option<&str>,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    if req.method() != Method::POST {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("use POST {RENEW_PATH}"),
        );
    }
    let Some(serial) = client_serial.map(str::to_string) else {
        return error(
            StatusCode::UNAUTHORIZED,
            "certificate_required",
            "renewal needs the agent's current certificate in the TLS handshake".into(),
        );
    };
    let limited = shared
        .renew_limiter
        .lock()
        .expect("limiter lock")
        .begin(&serial, Instant::now());
    if let Err(wait) = limited {
        warn!(%peer, %serial, "renewal refused: too many requests for this certificate");
        return rate_limited(wait, "too many renewal requests for this certificate");
    }
    let collected = Limited::new(req.into_body(), MAX_REQUEST_BODY).collect();
    let Ok(collected) = tokio::time::timeout(BODY_TIMEOUT, collected).await else {
        return error(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!("the request body did not arrive within {BODY_TIMEOUT:?}"),
        );
    };
    let body = match collected {
        Ok(body) => body.to_bytes(),
        Err(_) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!(
                    "the request body is larger than {} KiB",
                    MAX_REQUEST_BODY / 1024
                ),
            )
        }
    };
    let body: RenewBody = match serde_json::from_slice(&body) {
        Ok(body) => body,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("the request is not a valid renewal request: {e}"),
            )
        }
    };
    let ca = shared.ca.clone();
    let min_age = shared.min_renewal_age_percent;
    let outcome = {
        let Ok(_turn) = tokio::time::timeout(GATE_TIMEOUT, shared.renew_gate.lock()).await else {
            // Our fault, not the agent's: this attempt does not count.
            shared
                .renew_limiter
                .lock()
                .expect("limiter lock")
                .forgive(&serial);
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                "the proxy is busy; try again in a minute".into(),
            );
        };
        let serial = serial.clone();
        tokio::task::spawn_blocking(move || {
            ca.renew(&serial, &body.csr, time::OffsetDateTime::now_utc(), min_age)
        })
        .await
    };
    match outcome {
        Ok(Ok(done)) => {
            // The agent's next tunnel comes with this certificate: let admission know it.
            shared.state.refresh().await;
            info!(%peer, agent = %done.agent, old_serial = %serial, serial = %done.serial,
                  retry = done.reissued, "certificate renewed");
            json(StatusCode::OK, &reply(done, &shared.state.get()))
        }
        Ok(Err(EnrollError::Internal(e))) if e.is_unavailable() => {
            warn!(%peer, error = %e, "renewal deferred: the store is unavailable");
            store_unavailable("renewal")
        }
        Ok(Err(EnrollError::Internal(e))) => {
            tracing::error!(%peer, error = %e, "renewal failed");
            internal("renewal")
        }
        Ok(Err(e)) => {
            warn!(%peer, serial = %serial, code = %e.code(), reason = %e, "renewal refused");
            refusal(status_of(&e), e.code(), e.to_string(), e.retry_after())
        }
        Err(join) => {
            tracing::error!(%peer, error = %join, "renewal task failed");
            internal("renewal")
        }
    }
}

/// A 429 that says how long to wait, in the `Retry-After` header and in the body.
fn rate_limited(wait: Duration, what: &str) -> Response<Full<Bytes>> {
    let secs = wait.as_secs() + 1;
    refusal(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        format!("{what}; wait {secs} seconds"),
        Some(secs),
    )
}

/// The answer to an enrollment or renewal; `state` holds the agent's grant (read after
/// the change), which says which of its names are private.
fn reply(done: revproxy_ca::Enrolled, state: &Snapshot) -> EnrollReply {
    let private = (state.private_of.get(&done.agent).into_iter().flatten())
        .filter(|p| done.hosts.contains(p))
        .cloned()
        .collect();
    EnrollReply {
        private,
        agent: done.agent,
        identity: done.identity,
        hosts: done.hosts,
        serial: done.serial,
        not_after: done.not_after,
        certificate: done.cert_pem,
        ca: done.ca_pem,
    }
}

/// A 500 that points at the log (the details are ours, not the client's).
fn internal(what: &str) -> Response<Full<Bytes>> {
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        format!("the proxy could not complete the {what}; its log has the details"),
    )
}

fn status_of(e: &EnrollError) -> StatusCode {
    match e {
        EnrollError::UnknownCert | EnrollError::CertRevoked | EnrollError::CertExpired => {
            StatusCode::FORBIDDEN
        }
        EnrollError::TooEarly { .. } => StatusCode::TOO_MANY_REQUESTS,
        EnrollError::AlreadyRenewed { .. } => StatusCode::CONFLICT,
        EnrollError::BadCsr(_) => StatusCode::BAD_REQUEST,
        EnrollError::WrongSecret => StatusCode::FORBIDDEN,
        EnrollError::Revoked => StatusCode::FORBIDDEN,
        EnrollError::UnknownToken => StatusCode::NOT_FOUND,
        EnrollError::Used => StatusCode::CONFLICT,
        EnrollError::Expired => StatusCode::GONE,
        EnrollError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn error(status: StatusCode, code: &str, message: String) -> Response<Full<Bytes>> {
    refusal(status, code, message, None)
}

/// An error answer; one that passes with time says when to ask again (`Retry-After`, in
/// the header and the body).
fn refusal(
    status: StatusCode,
    code: &str,
    message: String,
    retry_after: Option<u64>,
) -> Response<Full<Bytes>> {
    let mut resp = json(
        status,
        &ErrorReply {
            error: code.into(),
            message,
            retry_after,
        },
    );
    if let Some(secs) = retry_after {
        resp.headers_mut()
            .insert(http::header::RETRY_AFTER, secs.into());
    }
    resp.extensions_mut().insert(Outcome(code.to_string()));
    resp
}

/// The error code an answer carried, for the metrics (an answer without one is a success).
#[derive(Clone)]
struct Outcome(String);

fn json(status: StatusCode, body: &impl serde::Serialize) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(body).expect("reply serializes");
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(bytes)))
        .expect("valid response")
}
