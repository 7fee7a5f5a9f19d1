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
    #[error("the admin listener answered {status}: {body}")]
    Answered { status: StatusCode, body: String },
    #[error("the admin listener's status is not JSON: {0}")]
    NotJson(#[source] serde_json::Error),
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

/// The `/status` of the program at `target` as the `status` commands print it: the JSON
/// document as it came (`json`), or a readable [`report`].
pub async fn status_text(target: &Target, json: bool) -> Result<String, AdminClientError> {
    let (status, body) = get_from(target, "/status").await?;
    if !status.is_success() {
        let body = body.trim().to_string();
        return Err(AdminClientError::Answered { status, body });
    }
    if json {
        return Ok(body);
    }
    let doc: serde_json::Value = serde_json::from_str(&body).map_err(AdminClientError::NotJson)?;
    Ok(report(&doc))
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
    let state = |t: &serde_json::Value| {
        if t["draining"] == true {
            "draining"
        } else {
            "up"
        }
    };
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
        let table = Table(&[Col::Left(10), Col::Left(9), Col::Last]);
        table.head(&mut out, &["TUNNEL", "TRANSPORT", "SINCE"]);
        let tunnels = items(&status["tunnels"]);
        if tunnels.is_empty() {
            let _ = writeln!(out, "(no tunnel is up)");
        }
        for t in tunnels {
            let row = [state(&t).into(), s(&t["transport"]), time(&t["since"])];
            table.row(&mut out, &row);
        }
        let table = Table(&[
            Col::Left(30),
            Col::Left(22),
            Col::Right(6),
            Col::Right(14),
            Col::Right(14),
        ]);
        table.head(
            &mut out,
            &["SERVICE", "BACKEND", "OPEN", "TO BACKEND", "FROM BACKEND"],
        );
        for v in items(&status["services"]) {
            let row =
                ["name", "to", "open_streams", "sent_bytes", "received_bytes"].map(|k| s(&v[k]));
            table.row(&mut out, &row);
        }
        let connects = items(&status["connect"]);
        if !connects.is_empty() {
            let table = Table(&[
                Col::Left(30),
                Col::Left(22),
                Col::Right(6),
                Col::Right(8),
                Col::Last,
            ]);
            table.head(
                &mut out,
                &["CONNECT", "LISTEN", "OPEN", "STREAMS", "LAST ERROR"],
            );
            for c in connects {
                let error = match (&c["last_error"], c["last_error_at"].as_i64()) {
                    (serde_json::Value::String(e), Some(at)) => {
                        format!("{} ({})", e, crate::runtime::rfc3339(at))
                    }
                    _ => "-".into(),
                };
                let [name, listen, open, streams] =
                    ["name", "listen", "open_streams", "streams"].map(|k| s(&c[k]));
                table.row(&mut out, &[name, listen, open, streams, error]);
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
    let table = Table(&[
        Col::Left(20),
        Col::Left(9),
        Col::Left(5),
        Col::Right(7),
        Col::Left(22),
        Col::Left(20),
        Col::Left(20),
        Col::Last,
    ]);
    table.head(
        &mut out,
        &[
            "AGENT",
            "TUNNEL",
            "VIA",
            "STREAMS",
            "FROM",
            "SINCE",
            "CERT EXPIRES",
            "NAMES",
        ],
    );
    for a in items(&status["agents"]) {
        let agent = s(&a["agent"]);
        let tunnels = items(&a["tunnels"]);
        if tunnels.is_empty() {
            let offline = ["offline", "-", "-", "-", "-"].map(String::from);
            let [state, via, streams, from, since] = offline;
            let row = [
                agent.clone(),
                state,
                via,
                streams,
                from,
                since,
                time(&a["certificate_expires"]),
                list(&a["granted"]),
            ];
            table.row(&mut out, &row);
        }
        for t in tunnels {
            // An extra tunnel: one the agent added while its tunnels were busy.
            let state = match state(&t) {
                "up" if t["extra"] == true => "extra",
                state => state,
            };
            let row = [
                agent.clone(),
                state.into(),
                s(&t["transport"]),
                s(&t["streams"]),
                s(&t["peer"]),
                time(&t["since"]),
                time(&t["not_after"]),
                list(&t["names"]),
            ];
            table.row(&mut out, &row);
        }
    }
    let table = Table(&[
        Col::Left(30),
        Col::Left(24),
        Col::Right(7),
        Col::Right(6),
        Col::Right(14),
        Col::Right(14),
    ]);
    table.head(
        &mut out,
        &["NAME", "SERVED BY", "TUNNELS", "OPEN", "IN", "OUT"],
    );
    for n in items(&status["names"]) {
        let row = [
            "name",
            "served_by",
            "tunnels",
            "open_streams",
            "received_bytes",
            "sent_bytes",
        ]
        .map(|k| s(&n[k]));
        table.row(&mut out, &row);
    }
    out
}

/// A column of a report's table: padded to a width on the left or the right, or the last
/// one, unpadded.
#[derive(Clone, Copy)]
enum Col {
    Left(usize),
    Right(usize),
    Last,
}

/// One table of a report: its columns, two spaces apart.
struct Table(&'static [Col]);

impl Table {
    /// The head line, after an empty line.
    fn head(&self, out: &mut String, names: &[&str]) {
        out.push('\n');
        self.row(out, names);
    }

    fn row(&self, out: &mut String, cells: &[impl AsRef<str>]) {
        use std::fmt::Write as _;
        for (i, (col, cell)) in self.0.iter().zip(cells).enumerate() {
            if i > 0 {
                out.push_str("  ");
            }
            let cell = cell.as_ref();
            let _ = match *col {
                Col::Left(w) => write!(out, "{cell:<w$}"),
                Col::Right(w) => write!(out, "{cell:>w$}"),
                Col::Last => write!(out, "{cell}"),
            };
        }
        out.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::report;

    #[test]
    fn a_proxy_report_has_its_agents_and_names_in_columns() {
        let proxy = serde_json::json!({
            "role": "proxy", "version": "0.1.0", "started": 1700000000, "ready": false,
            "not_ready_because": "not serving (starting or shutting down)",
            "proxy": {"id": "p1", "advertise": "proxy.example.com:7443", "store": "file",
                "peers": [{"id": "p2", "address": "b:7443"}], "store_problem": "down"},
            "agents": [
                {"agent": "web-1", "certificate_expires": 1700086400,
                    "granted": ["app.example.com"], "tunnels": []},
                {"agent": "web-2", "tunnels": [
                    {"draining": true, "transport": "h2", "peer": "127.0.0.1:5000",
                        "since": 1700000100, "not_after": 1700086400, "streams": 3,
                        "names": ["a.example.com", "b.example.com"]},
                    {"draining": false, "transport": "quic", "peer": "[::1]:6000",
                        "since": 1700000200, "not_after": null, "streams": 1023,
                        "names": []},
                    {"draining": false, "extra": true, "transport": "quic",
                        "peer": "[::1]:6001", "since": 1700000300, "not_after": null,
                        "streams": 512, "names": []}]}
            ],
            "names": [{"name": "app.example.com", "served_by": "web-1", "tunnels": 2,
                "open_streams": 3, "received_bytes": 12345678901u64, "sent_bytes": 5}]
        });
        let expected = "\
proxy 0.1.0 running since 2023-11-14T22:13:20Z, not ready: not serving (starting or shutting down)
id p1, advertised at proxy.example.com:7443, state in file, proxies sharing it: p2=b:7443
store: down

AGENT                 TUNNEL     VIA    STREAMS  FROM                    SINCE                 CERT EXPIRES          NAMES
web-1                 offline    -            -  -                       -                     2023-11-15T22:13:20Z  app.example.com
web-2                 draining   h2           3  127.0.0.1:5000          2023-11-14T22:15:00Z  2023-11-15T22:13:20Z  a.example.com,b.example.com
web-2                 up         quic      1023  [::1]:6000              2023-11-14T22:16:40Z  -                     -
web-2                 extra      quic       512  [::1]:6001              2023-11-14T22:18:20Z  -                     -

NAME                            SERVED BY                 TUNNELS    OPEN              IN             OUT
app.example.com                 web-1                           2       3     12345678901               5
";
        assert_eq!(report(&proxy), expected);
    }

    #[test]
    fn an_agent_report_has_its_tunnels_services_and_connect_listeners() {
        let agent = serde_json::json!({
            "role": "agent", "agent": "web-1", "identity": "spiffe://x/agent/web-1",
            "server": "localhost:7443", "transport": "h2",
            "certificate": {"serial": "ab", "not_after": 1700086400},
            "tunnels": [{"draining": false, "transport": "h2", "since": 1700000000},
                {"draining": true, "transport": "quic", "since": 1700000001}],
            "services": [{"name": "app.example.com", "to": "127.0.0.1:9000",
                "open_streams": 1, "sent_bytes": 10, "received_bytes": 20}],
            "connect": [{"name": "db.internal", "listen": "127.0.0.1:5432", "open_streams": 0,
                "streams": 4, "last_error": "refused", "last_error_at": 1700000000},
                {"name": "x", "listen": "y", "open_streams": 0, "streams": 0, "last_error": null}]
        });
        let expected = "\
agent web-1 (spiffe://x/agent/web-1) -> proxy localhost:7443, transport h2, certificate ab valid until 2023-11-15T22:13:20Z

TUNNEL      TRANSPORT  SINCE
up          h2         2023-11-14T22:13:20Z
draining    quic       2023-11-14T22:13:21Z

SERVICE                         BACKEND                   OPEN      TO BACKEND    FROM BACKEND
app.example.com                 127.0.0.1:9000               1              10              20

CONNECT                         LISTEN                    OPEN   STREAMS  LAST ERROR
db.internal                     127.0.0.1:5432               0         4  refused (2023-11-14T22:13:20Z)
x                               y                            0         0  -
";
        assert_eq!(report(&agent), expected);
        let none = report(&serde_json::json!({"role": "agent"}));
        assert!(
            none.contains("TUNNEL      TRANSPORT  SINCE\n(no tunnel is up)\n"),
            "{none}"
        );
    }
}
