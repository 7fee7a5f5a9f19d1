//! The client side of the admin listener, for `revproxy status`, `revproxy-agent status`
//! and `revproxy-agent ready`: one GET, bounded in time and size.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Empty;
use rustls::pki_types::ServerName;

/// Time allowed for the whole request: connect, ask, read the answer.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Largest answer read.
const MAX_ANSWER: usize = 16 * 1024 * 1024;

/// Why an admin request failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminClientError {
    #[error("cannot reach the admin listener at {addr}: {reason} (is the program running with --admin {addr}?)")]
    Unreachable { addr: String, reason: String },
    #[error("the admin listener at {addr} did not answer within {TIMEOUT:?}")]
    Timeout { addr: String },
    #[error("{0}")]
    Operator(String),
}

/// File names in an operator directory (`revproxy operator create --out DIR`).
pub const OPERATOR_CERT_FILE: &str = "operator.crt";
pub const OPERATOR_KEY_FILE: &str = "operator.key";
pub const OPERATOR_CA_FILE: &str = "ca.crt";

/// Where an admin listener is: `HOST:PORT` (plain HTTP, loopback), or `https://HOST:PORT`
/// with the operator certificate in `operator` (a directory from `revproxy operator
/// create`).
pub struct Target {
    addr: String,
    tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
}

impl Target {
    pub fn new(admin: &str, operator: Option<&Path>) -> Result<Target, AdminClientError> {
        let Some(addr) = admin.strip_prefix("https://") else {
            return Ok(Target {
                addr: admin.trim_start_matches("http://").to_string(),
                tls: None,
            });
        };
        let addr = addr.trim_end_matches('/').to_string();
        let dir = operator.ok_or_else(|| {
            AdminClientError::Operator(format!(
                "{admin} needs an operator certificate: add --operator DIR (made by `revproxy operator create --out DIR` on the proxy)"
            ))
        })?;
        let read = |file: &str| {
            std::fs::read_to_string(dir.join(file)).map_err(|e| {
                AdminClientError::Operator(format!("cannot read {}: {e}", dir.join(file).display()))
            })
        };
        let bad = |e: crate::tls::TlsError| AdminClientError::Operator(e.to_string());
        let ca =
            crate::tls::certs_from_pem(&read(OPERATOR_CA_FILE)?, OPERATOR_CA_FILE).map_err(bad)?;
        let chain = crate::tls::certs_from_pem(&read(OPERATOR_CERT_FILE)?, OPERATOR_CERT_FILE)
            .map_err(bad)?;
        let key =
            crate::tls::key_from_pem(&read(OPERATOR_KEY_FILE)?, OPERATOR_KEY_FILE).map_err(bad)?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in ca {
            roots
                .add(cert)
                .map_err(|e| AdminClientError::Operator(format!("{OPERATOR_CA_FILE}: {e}")))?;
        }
        let mut config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| AdminClientError::Operator(e.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| AdminClientError::Operator(format!("the operator certificate: {e}")))?;
        config.alpn_protocols = vec![crate::tls::ALPN_HTTP1.to_vec()];
        let name = crate::tls::server_name(&addr).map_err(bad)?;
        Ok(Target {
            addr,
            tls: Some((Arc::new(config), name)),
        })
    }
}

/// GETs `path` from the admin listener at `addr` (`host:port`, plain HTTP); returns the
/// status and the body.
pub async fn get(addr: &str, path: &str) -> Result<(StatusCode, String), AdminClientError> {
    get_from(&Target::new(addr, None)?, path).await
}

/// GETs `path` from `target`; returns the status and the body.
pub async fn get_from(
    target: &Target,
    path: &str,
) -> Result<(StatusCode, String), AdminClientError> {
    let addr = target.addr.as_str();
    let unreachable = |reason: String| AdminClientError::Unreachable {
        addr: addr.to_string(),
        reason,
    };
    let attempt = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let io: Box<dyn Io> = match &target.tls {
            None => Box::new(tcp),
            Some((config, name)) => Box::new(
                tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| unreachable(format!("TLS handshake failed: {e}")))?,
            ),
        };
        let request = Request::get(path)
            .header(http::header::HOST, addr)
            .body(Empty::<Bytes>::new())
            .expect("valid request");
        let (status, body) = crate::runtime::http1::exchange(io, request, MAX_ANSWER)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(TIMEOUT, attempt)
        .await
        .map_err(|_| AdminClientError::Timeout {
            addr: addr.to_string(),
        })?
}

/// A byte stream the client speaks HTTP over: TCP, or TLS over TCP.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// A readable report of a `/status` document, the proxy's or the agent's.
pub fn report(status: &serde_json::Value) -> String {
    use std::fmt::Write as _;
    let s = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    };
    let time = |v: &serde_json::Value| v.as_i64().map_or("-".into(), crate::runtime::rfc3339);
    let list = |v: &serde_json::Value| {
        v.as_array()
            .map(|a| a.iter().map(s).collect::<Vec<_>>().join(","))
            .filter(|t| !t.is_empty())
            .unwrap_or_else(|| "-".into())
    };
    let empty = Vec::new();
    let items = |v: &serde_json::Value| v.as_array().unwrap_or(&empty).clone();
    let mut out = String::new();
    if status["role"] == "agent" {
        let _ = writeln!(
            out,
            "agent {} ({}) -> proxy {}, transport {}, certificate {} valid until {}",
            s(&status["agent"]),
            s(&status["identity"]),
            s(&status["server"]),
            s(&status["transport"]),
            s(&status["certificate"]["serial"]),
            time(&status["certificate"]["not_after"]),
        );
        let _ = writeln!(out, "\n{:<10}  {:<9}  SINCE", "TUNNEL", "TRANSPORT");
        let tunnels = items(&status["tunnels"]);
        if tunnels.is_empty() {
            let _ = writeln!(out, "(no tunnel is up)");
        }
        for t in tunnels {
            let state = if t["draining"] == true {
                "draining"
            } else {
                "up"
            };
            let _ = writeln!(
                out,
                "{:<10}  {:<9}  {}",
                state,
                s(&t["transport"]),
                time(&t["since"])
            );
        }
        let _ = writeln!(
            out,
            "\n{:<30}  {:<22}  {:>6}  {:>14}  {:>14}",
            "SERVICE", "BACKEND", "OPEN", "TO BACKEND", "FROM BACKEND"
        );
        for v in items(&status["services"]) {
            let _ = writeln!(
                out,
                "{:<30}  {:<22}  {:>6}  {:>14}  {:>14}",
                s(&v["name"]),
                s(&v["to"]),
                s(&v["open_streams"]),
                s(&v["sent_bytes"]),
                s(&v["received_bytes"]),
            );
        }
        let connects = items(&status["connect"]);
        if !connects.is_empty() {
            let _ = writeln!(
                out,
                "\n{:<30}  {:<22}  {:>6}  {:>8}  LAST ERROR",
                "CONNECT", "LISTEN", "OPEN", "STREAMS"
            );
            for c in connects {
                let error = match (&c["last_error"], c["last_error_at"].as_i64()) {
                    (serde_json::Value::String(e), Some(at)) => {
                        format!("{} ({})", e, crate::runtime::rfc3339(at))
                    }
                    _ => "-".into(),
                };
                let _ = writeln!(
                    out,
                    "{:<30}  {:<22}  {:>6}  {:>8}  {}",
                    s(&c["name"]),
                    s(&c["listen"]),
                    s(&c["open_streams"]),
                    s(&c["streams"]),
                    error,
                );
            }
        }
        return out;
    }
    let _ = writeln!(
        out,
        "proxy {} running since {}, {}",
        s(&status["version"]),
        time(&status["started"]),
        if status["ready"] == true {
            "ready".to_string()
        } else {
            format!("not ready: {}", s(&status["not_ready_because"]))
        }
    );
    let me = &status["proxy"];
    if !me.is_null() {
        let peers: Vec<String> = items(&me["peers"])
            .iter()
            .map(|p| format!("{}={}", s(&p["id"]), s(&p["address"])))
            .collect();
        let _ = writeln!(
            out,
            "id {}, advertised at {}, state in {}{}",
            s(&me["id"]),
            s(&me["advertise"]),
            s(&me["store"]),
            if peers.is_empty() {
                String::new()
            } else {
                format!(", proxies sharing it: {}", peers.join(" "))
            }
        );
        if let Some(problem) = me["store_problem"].as_str() {
            let _ = writeln!(out, "store: {problem}");
        }
    }
    let _ = writeln!(
        out,
        "\n{:<20}  {:<9}  {:<5}  {:<22}  {:<20}  {:<20}  NAMES",
        "AGENT", "TUNNEL", "VIA", "FROM", "SINCE", "CERT EXPIRES"
    );
    for a in items(&status["agents"]) {
        let tunnels = items(&a["tunnels"]);
        if tunnels.is_empty() {
            let _ = writeln!(
                out,
                "{:<20}  {:<9}  {:<5}  {:<22}  {:<20}  {:<20}  {}",
                s(&a["agent"]),
                "offline",
                "-",
                "-",
                "-",
                time(&a["certificate_expires"]),
                list(&a["granted"]),
            );
        }
        for t in tunnels {
            let state = if t["draining"] == true {
                "draining"
            } else {
                "up"
            };
            let _ = writeln!(
                out,
                "{:<20}  {:<9}  {:<5}  {:<22}  {:<20}  {:<20}  {}",
                s(&a["agent"]),
                state,
                s(&t["transport"]),
                s(&t["peer"]),
                time(&t["since"]),
                time(&t["not_after"]),
                list(&t["names"]),
            );
        }
    }
    let _ = writeln!(
        out,
        "\n{:<30}  {:<24}  {:>7}  {:>6}  {:>14}  {:>14}",
        "NAME", "SERVED BY", "TUNNELS", "OPEN", "IN", "OUT"
    );
    for n in items(&status["names"]) {
        let _ = writeln!(
            out,
            "{:<30}  {:<24}  {:>7}  {:>6}  {:>14}  {:>14}",
            s(&n["name"]),
            s(&n["served_by"]),
            s(&n["tunnels"]),
            s(&n["open_streams"]),
            s(&n["received_bytes"]),
            s(&n["sent_bytes"]),
        );
    }
    out
}
