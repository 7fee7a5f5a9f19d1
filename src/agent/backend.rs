//! The agent's service map: which backend serves which name, and dialing it for a stream
//! the proxy opened. The tunnel transports call [`ServiceMap::dial`] through
//! [`Backends`]; a name the map does not hold, or a backend that does not answer, becomes
//! a refusal with an HTTP status the proxy passes on. A service with `proxy_protocol` gets
//! a PROXY header (`wire::proxy_header`) with the public client's address before the
//! stream's first byte.

use std::sync::Arc;

use tokio::io::AsyncWriteExt;

use super::metrics::AgentMetrics;
use super::Identity;
use crate::route::name_matches;
use crate::tunnel::{Backend, Backends, DialRequest, Dialed, Refusal};
use crate::wire::proxy_header::{self, Origin, ProxyProtocol};

/// One service: a name pattern, its backend, and the PROXY header it wants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Service {
    /// Exact name or `*.example.com`.
    pub(crate) pattern: String,
    /// Backend `host:port`.
    pub(crate) addr: String,
    pub(crate) proxy_protocol: Option<ProxyProtocol>,
    /// It speaks HTTP/2 without TLS (h2c): a proxy terminating its name's TLS offers h2.
    pub(crate) h2c: bool,
}

/// How a service is served, beyond its name and backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceOptions {
    /// The backend gets a PROXY header (v1 or v2) before the first byte.
    pub proxy_protocol: Option<ProxyProtocol>,
    /// The backend speaks HTTP/2 without TLS (h2c, prior knowledge): a proxy that
    /// terminates the name's TLS offers `h2` to clients as well as `http/1.1`.
    pub h2c: bool,
}

/// The names this agent serves and where each goes.
pub(crate) struct ServiceMap {
    /// In the order given; replaced whole by a reload (a stream keeps the entry it was
    /// dialed with).
    entries: std::sync::RwLock<Arc<Vec<Arc<Service>>>>,
    /// The identity in use (renewals and re-enrollments replace it): the names it was
    /// granted privately are served only to streams with a caller.
    identity: tokio::sync::watch::Receiver<Arc<Identity>>,
    metrics: Arc<AgentMetrics>,
}

/// A backend address that is not `HOST:PORT`.
#[derive(Debug, thiserror::Error)]
#[error("expected HOST:PORT")]
pub(crate) struct BadBackend;

/// Checks a backend address: a non-empty host and a port from 1 to 65535.
pub(crate) fn check_backend(addr: &str) -> Result<(), BadBackend> {
    let (host, port) = addr.rsplit_once(':').ok_or(BadBackend)?;
    if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(BadBackend);
    }
    Ok(())
}

impl ServiceMap {
    pub(crate) fn new(
        entries: Vec<Service>,
        identity: tokio::sync::watch::Receiver<Arc<Identity>>,
        metrics: Arc<AgentMetrics>,
    ) -> ServiceMap {
        metrics.ensure_services(entries.iter().map(|s| s.pattern.as_str()));
        ServiceMap {
            entries: std::sync::RwLock::new(Arc::new(entries.into_iter().map(Arc::new).collect())),
            identity,
            metrics,
        }
    }

    /// Replaces every entry (a reload): new streams use the new map.
    pub(crate) fn replace(&self, entries: Vec<Service>) {
        self.metrics
            .ensure_services(entries.iter().map(|s| s.pattern.as_str()));
        *self.entries.write().expect("service map lock") =
            Arc::new(entries.into_iter().map(Arc::new).collect());
    }

    /// Whether `name` is granted privately (to the identity in use now): only a mesh
    /// stream, with a caller, may have it.
    fn is_private(&self, name: &str) -> bool {
        let identity = self.identity.borrow();
        identity
            .private
            .iter()
            .any(|p| p == name || name_matches(p, name))
    }

    /// The entry for `name`: an exact entry first, then a wildcard.
    pub(crate) fn lookup(&self, name: &str) -> Option<Arc<Service>> {
        let entries = self.entries();
        let exact = entries.iter().find(|s| s.pattern == name);
        exact
            .or_else(|| entries.iter().find(|s| name_matches(&s.pattern, name)))
            .cloned()
    }

    /// Every entry, in the order given.
    pub(crate) fn entries(&self) -> Arc<Vec<Arc<Service>>> {
        self.entries.read().expect("service map lock").clone()
    }
}

/// Status codes of refusals (HTTP's, on both transports).
const FORBIDDEN: u16 = 403;
const NOT_FOUND: u16 = 404;
const BAD_GATEWAY: u16 = 502;
const GATEWAY_TIMEOUT: u16 = 504;

impl Backends for ServiceMap {
    fn speaks_h2c(&self, name: &str) -> Option<bool> {
        self.lookup(name).map(|s| s.h2c)
    }

    /// Finds the backend for the name and connects to it (and sends it the PROXY header
    /// it wants).
    async fn dial(&self, request: DialRequest<'_>) -> Result<Dialed, Refusal> {
        let (name, caller) = (request.name, request.caller);
        // A proxy routes a private name only to mesh streams; one that asks without a
        // caller is wrong (or not ours to trust), and the backend never sees it.
        if caller.is_none() && self.is_private(name) {
            self.metrics.unknown_name();
            return Err(Refusal {
                status: FORBIDDEN,
                reason: format!(
                    "{name} is private: this agent serves it only to callers through the mesh"
                ),
            });
        }
        let Some(found) = self.lookup(name) else {
            self.metrics.unknown_name();
            return Err(Refusal {
                status: NOT_FOUND,
                reason: format!("this agent serves no {name}"),
            });
        };
        let (service, addr, proxy_protocol) = (&found.pattern, &found.addr, &found.proxy_protocol);
        let started = std::time::Instant::now();
        if revproxy_ca::ports::udp_port_of(name).is_some() {
            return match crate::runtime::connect_udp(addr).await {
                Ok(socket) => Ok(Dialed {
                    stream: Backend::Udp(socket),
                    caller: caller.map(str::to_string),
                    addr: addr.to_string(),
                    counters: (self.metrics).stream(service, started.elapsed().as_secs_f64()),
                }),
                Err(e) => {
                    self.metrics.dial_failed(service);
                    Err(Refusal {
                        status: BAD_GATEWAY,
                        reason: format!("backend {addr} (UDP): {e}"),
                    })
                }
            };
        }
        let mut dialed = crate::runtime::connect(addr).await;
        if let (Ok(stream), Some(version)) = (&mut dialed, proxy_protocol) {
            let header = proxy_header::encode(
                *version,
                &Origin {
                    client: request.client,
                    // Without the listener's address (a mesh stream, an older proxy), the
                    // backend's own: a header with addresses carries its TLVs too.
                    server: request.server.or_else(|| stream.peer_addr().ok()),
                    // A granted port is no host name: no PP2_TYPE_AUTHORITY for it.
                    name: (!revproxy_ca::ports::is_port_name(name)).then(|| name.to_string()),
                    caller: caller.map(str::to_string),
                    tls: request.tls.cloned(),
                },
            );
            // A fresh connection takes a few hundred bytes at once; bounded all the same.
            let sent =
                tokio::time::timeout(crate::runtime::CONNECT_TIMEOUT, stream.write_all(&header))
                    .await;
            if !matches!(sent, Ok(Ok(()))) {
                dialed = Err(std::io::Error::other("could not send it the PROXY header"));
            }
        }
        if dialed.is_err() {
            self.metrics.dial_failed(service);
        }
        match dialed {
            Ok(stream) => Ok(Dialed {
                stream: Backend::Tcp(stream),
                caller: caller.map(str::to_string),
                addr: addr.to_string(),
                counters: self
                    .metrics
                    .stream(service, started.elapsed().as_secs_f64()),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => Err(Refusal {
                status: GATEWAY_TIMEOUT,
                reason: format!(
                    "backend {addr} did not accept within {:?}",
                    crate::runtime::CONNECT_TIMEOUT
                ),
            }),
            Err(e) => Err(Refusal {
                status: BAD_GATEWAY,
                reason: format!("backend {addr}: {e}"),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_lookup_prefers_exact_names() {
        let service = |pattern: &str, addr: &str| Service {
            pattern: pattern.into(),
            addr: addr.into(),
            proxy_protocol: None,
            h2c: false,
        };
        let map = ServiceMap::new(
            vec![
                service("*.example.com", "127.0.0.1:1"),
                service("app.example.com", "127.0.0.1:2"),
            ],
            tokio::sync::watch::channel(Arc::new(identity())).1,
            Arc::new(AgentMetrics::new()),
        );
        let found = |name| {
            map.lookup(name)
                .map(|s| (s.pattern.clone(), s.addr.clone()))
        };
        let pair = |a: &str, b: &str| Some((a.to_string(), b.to_string()));
        assert_eq!(
            found("app.example.com"),
            pair("app.example.com", "127.0.0.1:2")
        );
        assert_eq!(found("x.example.com"), pair("*.example.com", "127.0.0.1:1"));
        assert_eq!(found("example.com"), None);
    }

    /// An identity with nothing private and no files behind it.
    fn identity() -> Identity {
        Identity {
            server: "localhost:7443".into(),
            agent: "web-1".into(),
            identity: "spiffe://revproxy.local/agent/web-1".into(),
            hosts: vec!["*.example.com".into()],
            private: Vec::new(),
            not_after: i64::MAX,
            cert_pem: String::new(),
            key_pem: String::new(),
            ca_pem: String::new(),
        }
    }

    #[tokio::test]
    async fn a_private_name_is_refused_to_a_stream_without_a_caller() {
        let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = backend.local_addr().unwrap().to_string();
        let service = |pattern: &str| Service {
            pattern: pattern.into(),
            addr: addr.clone(),
            proxy_protocol: None,
            h2c: false,
        };
        let identity = Identity {
            private: vec!["db.example.com".into()],
            ..identity()
        };
        let (_tx, identity) = tokio::sync::watch::channel(Arc::new(identity));
        let map = ServiceMap::new(
            vec![service("*.example.com")],
            identity,
            Arc::new(AgentMetrics::new()),
        );
        let request = |name, caller| DialRequest {
            name,
            caller,
            client: None,
            server: None,
            tls: None,
        };
        let refused = map
            .dial(request("db.example.com", None))
            .await
            .err()
            .unwrap();
        assert_eq!(refused.status, 403, "{refused:?}");
        assert!(refused.reason.contains("private"), "{refused:?}");
        // A mesh stream (it names its caller) and a public name are dialed.
        let caller = Some("spiffe://revproxy.local/agent/laptop");
        assert!(map.dial(request("db.example.com", caller)).await.is_ok());
        assert!(map.dial(request("www.example.com", None)).await.is_ok());
    }

    #[test]
    fn backend_addresses() {
        assert!(check_backend("127.0.0.1:8080").is_ok());
        assert!(check_backend("[::1]:1").is_ok());
        for bad in ["127.0.0.1", ":80", "host:0", "host:x"] {
            assert!(check_backend(bad).is_err(), "{bad}");
        }
    }
}
