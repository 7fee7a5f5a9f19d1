//! The admin listener of both programs: `/metrics` (Prometheus text format), `/healthz`
//! (the process runs), `/ready`, `/status` (JSON) and `/` (a small status page, one file
//! with no external assets, that draws `/status`).
//!
//! What it shows comes from a `View` (the proxy's or the agent's). On loopback it is
//! plain HTTP; anywhere else the proxy serves it over TLS and admits only clients with an
//! operator certificate from its CA (`AdminTls`, `revproxy operator create`), and the
//! agent refuses to start. On loopback, requests whose `Host` is not a loopback address or
//! `localhost` are refused, so a web page in an operator's browser cannot read it through
//! DNS rebinding.

pub mod client;
mod conn;
pub(crate) mod metrics;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::runtime::shutdown::Trigger;

/// Admin connections served at once. One more is accepted and closed at once (counted),
/// never left waiting in the backlog: a client always learns its fate.
const MAX_CONNECTIONS: usize = 32;
/// Connections one source address may hold at once, so that a stranger opening sockets
/// cannot take every slot from the operators.
const MAX_PER_SOURCE: usize = 8;
/// Longest a TLS handshake on a non-loopback admin listener may take: a slot held by a
/// stranger who never finishes is given back soon.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// A connection's whole life, handshake and every request included: bounds a client that
/// takes an answer one byte at a time, just fast enough to escape the write deadline.
/// Generous beside a scrape (Prometheus gives up after its scrape timeout, 10 s by default,
/// at most its interval), and kept-alive connections close after
/// [`conn::KEEP_ALIVE_FOR`], well before it.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(120);
/// Refused admin clients are logged at warn at most this often (the rest at debug).
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// The status page.
const PAGE: &str = include_str!("page.html");

/// What a program shows on its admin listener.
pub(crate) trait View: Send + Sync + 'static {
    /// The Prometheus text exposition.
    fn metrics(&self) -> String;
    /// The status document.
    fn status(&self) -> serde_json::Value;
    /// `Ok` when ready for traffic, else why not.
    fn ready(&self) -> Result<(), NotReady>;
}

/// Why a program is not ready for traffic (`/ready`).
#[derive(Debug, thiserror::Error)]
pub(crate) enum NotReady {
    #[error("not serving (starting or shutting down)")]
    NotServing,
    #[error("no tunnel to the proxy is up")]
    NoTunnel,
}

/// Why a client certificate on the admin listener admits no operator.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OperatorRefused {
    #[error("no readable certificate")]
    Unreadable,
    #[error("certificate {serial} is not an operator's (identities: {identities})")]
    NotOperator { serial: String, identities: String },
    #[error("operator certificate {serial} is not on record or was revoked")]
    NotOnRecord { serial: String },
}

/// TLS for an admin listener beyond loopback: the configuration (a client certificate
/// from the CA is required), who among those clients may in (`authorize`), and whether an
/// admitted client still may, asked before every request (`still`): a revoked or expired
/// operator certificate loses a kept-alive connection at its next request.
#[derive(Clone)]
pub(crate) struct AdminTls {
    pub(crate) config: Arc<rustls::ServerConfig>,
    pub(crate) authorize: Authorize,
    pub(crate) still: Arc<dyn Fn(&Admitted) -> bool + Send + Sync>,
}

/// An operator admitted to the admin listener.
#[derive(Clone, Debug)]
pub(crate) struct Admitted {
    pub(crate) name: String,
    pub(crate) serial: String,
    /// End of the certificate's validity, Unix seconds.
    pub(crate) not_after: i64,
}

/// Reads a verified client certificate (DER) and answers who it admits, or why not.
pub(crate) type Authorize = Arc<
    dyn Fn(
            Vec<u8>,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<Admitted, OperatorRefused>> + Send>,
        > + Send
        + Sync,
>;

/// Serves `view` on `listener` until `stop` fires. With `tls`, every connection must
/// complete that TLS handshake and present an operator's certificate first.
pub(crate) async fn serve(
    listener: TcpListener,
    view: Arc<dyn View>,
    tls: Option<AdminTls>,
    stop: Trigger,
) {
    let Ok(local) = listener.local_addr() else {
        return;
    };
    info!(addr = %local, tls = tls.is_some(), "admin listener ready");
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let per_source: Arc<Mutex<HashMap<IpAddr, usize>>> = Arc::default();
    let refusals = Arc::new(Quiet::default());
    let crowded = Quiet::default();
    let counts = Arc::new(Counts::default());
    let mut tasks = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Refusals close at once: waiting for a slot would leave every later client,
        // health probes included, unanswered in the backlog.
        let Some(slot) = SourceSlot::take(&per_source, peer.ip()) else {
            counts.refused_source.fetch_add(1, Ordering::Relaxed);
            crowded.say(
                &peer,
                "this address holds its share of admin connections (8)",
            );
            continue;
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            counts.refused_full.fetch_add(1, Ordering::Relaxed);
            crowded.say(&peer, "every admin connection slot is taken (32)");
            continue;
        };
        let (view, tls, stop, refusals, counts) = (
            view.clone(),
            tls.clone(),
            stop.clone(),
            refusals.clone(),
            counts.clone(),
        );
        tasks.spawn(async move {
            let conn = connection(tcp, peer, view, tls, &refusals, &counts);
            tokio::select! {
                served = tokio::time::timeout(CONNECTION_DEADLINE, conn) => if served.is_err() {
                    counts.deadline.fetch_add(1, Ordering::Relaxed);
                    debug!(%peer, "admin connection reached its deadline ({CONNECTION_DEADLINE:?}); closed");
                },
                () = stop.cancelled() => {}
            }
            drop((permit, slot));
        });
    }
    tasks.abort_all();
}

/// One connection's place in its source address's count.
struct SourceSlot {
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl SourceSlot {
    fn take(counts: &Arc<Mutex<HashMap<IpAddr, usize>>>, ip: IpAddr) -> Option<SourceSlot> {
        let mut map = counts.lock().expect("admin per-source counts");
        let count = map.entry(ip).or_insert(0);
        if *count >= MAX_PER_SOURCE {
            return None;
        }
        *count += 1;
        Some(SourceSlot {
            counts: counts.clone(),
            ip,
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut map = self.counts.lock().expect("admin per-source counts");
        if let Some(count) = map.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// Says something at warn at most once per [`REFUSAL_LOG_EVERY`], so that a stream of
/// refused clients cannot flood the log.
#[derive(Default)]
struct Quiet {
    last: Mutex<Option<std::time::Instant>>,
}

impl Quiet {
    /// Logs that `peer` was refused for `why`: at warn when the gate is open, else at debug.
    fn say(&self, peer: &SocketAddr, why: &str) {
        if self.loud_now() {
            warn!(%peer, reason = %why, "admin connection refused and closed (further refusals for 10 s at debug)");
        } else {
            debug!(%peer, reason = %why, "admin connection refused and closed");
        }
    }

    fn loud_now(&self) -> bool {
        let mut last = self.last.lock().expect("log gate");
        let now = std::time::Instant::now();
        if last.is_some_and(|at| now.duration_since(at) < REFUSAL_LOG_EVERY) {
            return false;
        }
        *last = Some(now);
        true
    }
}

/// Counts of what the admin listener refused or cut short, appended to its `/metrics`.
#[derive(Default)]
struct Counts {
    refused_full: AtomicU64,
    refused_source: AtomicU64,
    write_stalled: AtomicU64,
    deadline: AtomicU64,
}

impl Counts {
    /// The admin listener's own families, in the Prometheus text format.
    fn exposition(&self) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "# HELP revproxy_admin_refused_total Admin connections closed as soon as accepted.\n\
             # TYPE revproxy_admin_refused_total counter\n\
             revproxy_admin_refused_total{{reason=\"full\"}} {}\n\
             revproxy_admin_refused_total{{reason=\"source_limit\"}} {}\n\
             # HELP revproxy_admin_dropped_total Admin connections ended by a deadline.\n\
             # TYPE revproxy_admin_dropped_total counter\n\
             revproxy_admin_dropped_total{{reason=\"write_stalled\"}} {}\n\
             revproxy_admin_dropped_total{{reason=\"deadline\"}} {}\n",
            get(&self.refused_full),
            get(&self.refused_source),
            get(&self.write_stalled),
            get(&self.deadline),
        )
    }
}

async fn connection(
    mut tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    view: Arc<dyn View>,
    tls: Option<AdminTls>,
    refusals: &Quiet,
    counts: &Counts,
) {
    let opened = std::time::Instant::now();
    let served = match tls {
        // Plain HTTP is for loopback, where the Host check keeps DNS rebinding out.
        None => {
            conn::serve(&mut tcp, opened, |req| {
                answer(view.as_ref(), counts, true, req)
            })
            .await
        }
        Some(tls) => {
            let accept = tokio_rustls::TlsAcceptor::from(tls.config.clone()).accept(tcp);
            let mut stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => return debug!(%peer, error = %e, "admin TLS handshake failed"),
                Err(_) => return debug!(%peer, "admin TLS handshake timed out"),
            };
            let der = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.to_vec())
                .unwrap_or_default();
            let admitted = match (tls.authorize)(der).await {
                Ok(admitted) => admitted,
                Err(why) if refusals.loud_now() => {
                    return warn!(%peer, reason = %why, "admin client refused (further refusals for 10 s at debug)")
                }
                Err(why) => return debug!(%peer, reason = %why, "admin client refused"),
            };
            debug!(%peer, operator = %admitted.name, "admin client admitted");
            // Behind TLS only operators get this far, and a browser tricked by DNS
            // rebinding would not get past the certificate's names: no Host check.
            conn::serve(&mut stream, opened, |req| {
                if !(tls.still)(&admitted) {
                    let mut gone = text(
                        StatusCode::FORBIDDEN,
                        "this operator certificate was revoked or has expired\n".into(),
                    );
                    gone.headers_mut()
                        .insert(header::CONNECTION, http::HeaderValue::from_static("close"));
                    return gone;
                }
                answer(view.as_ref(), counts, false, req)
            })
            .await
        }
    };
    match served {
        Ok(()) => {}
        Err(conn::Ended::WriteStalled) => {
            counts.write_stalled.fetch_add(1, Ordering::Relaxed);
            debug!(%peer, "admin client stopped reading its answer; closed");
        }
        Err(e) => debug!(%peer, error = %e, "admin connection ended"),
    }
}

/// The answer to one request.
fn answer(
    view: &dyn View,
    counts: &Counts,
    check_host: bool,
    req: &Request<()>,
) -> Response<Bytes> {
    if check_host && !host_is_ours(req) {
        return text(
            StatusCode::MISDIRECTED_REQUEST,
            "this admin listener answers only to its own address or localhost\n".into(),
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n".into());
    }
    match req.uri().path() {
        "/metrics" => respond(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            view.metrics() + &counts.exposition(),
        ),
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/ready" => match view.ready() {
            Ok(()) => text(StatusCode::OK, "ready\n".into()),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        "/status" => respond(
            StatusCode::OK,
            "application/json",
            serde_json::to_string_pretty(&view.status()).expect("status serializes") + "\n",
        ),
        "/" => {
            let mut page = respond(StatusCode::OK, "text/html; charset=utf-8", PAGE.into());
            page.headers_mut().insert(
                header::CONTENT_SECURITY_POLICY,
                http::HeaderValue::from_static(page_policy()),
            );
            page
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "no such page; try /, /status, /metrics, /ready or /healthz\n".into(),
        ),
    }
}

/// The status page's Content-Security-Policy: nothing but its own inline script and style
/// (by hash) and `fetch` of this listener.
fn page_policy() -> &'static str {
    static POLICY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    POLICY.get_or_init(|| {
        let hash = |open: &str, close: &str| {
            let start = PAGE.find(open).expect("the page has it") + open.len();
            let end = start + PAGE[start..].find(close).expect("closed");
            let digest = ring::digest::digest(&ring::digest::SHA256, &PAGE.as_bytes()[start..end]);
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, digest.as_ref())
        };
        format!(
            "default-src 'none'; script-src 'sha256-{}'; style-src 'sha256-{}'; \
             connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
            hash("<script>", "</script>"),
            hash("<style>", "</style>"),
        )
    })
}

/// Whether the request names a loopback listener: a loopback address or `localhost`.
fn host_is_ours(req: &Request<()>) -> bool {
    // No Host at all is an HTTP/1.0 probe (a load balancer's health check), never a
    // browser: DNS rebinding needs a browser, and browsers always send one.
    let Some(host) = req.headers().get(header::HOST) else {
        return req.version() == http::Version::HTTP_10;
    };
    let Ok(host) = host.to_str() else {
        return false;
    };
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn text(status: StatusCode, body: String) -> Response<Bytes> {
    respond(status, "text/plain; charset=utf-8", body)
}

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<Bytes> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CACHE_CONTROL, "no-store")
        .header("x-content-type-options", "nosniff")
        .body(Bytes::from(body))
        .expect("valid response")
}

/// Whether an admin listener on `addr` may serve plain HTTP: loopback only.
pub(crate) fn is_local(addr: SocketAddr) -> bool {
    addr.ip().is_loopback()
}
