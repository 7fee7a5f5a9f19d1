//! The agent's service map: which backend serves which name, and dialing it for a stream
//! the proxy opened. The tunnel transports call [`ServiceMap::dial`] through
//! [`Backends`]; a name the map does not hold, or a backend that does not answer, becomes
//! a refusal with an HTTP status the proxy passes on.

use tokio::net::TcpStream;

use crate::route::name_matches;
use crate::tunnel::{Backends, Refusal};

/// The names this agent serves and where each goes.
#[derive(Clone, Debug, Default)]
pub(crate) struct ServiceMap {
    /// (name pattern, backend `host:port`), in the order given.
    entries: Vec<(String, String)>,
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
    pub(crate) fn new(entries: Vec<(String, String)>) -> ServiceMap {
        ServiceMap { entries }
    }

    /// The backend for `name`: an exact entry first, then a wildcard entry.
    pub(crate) fn lookup(&self, name: &str) -> Option<&str> {
        let exact = self.entries.iter().find(|(pattern, _)| pattern == name);
        exact
            .or_else(|| {
                self.entries
                    .iter()
                    .find(|(pattern, _)| name_matches(pattern, name))
            })
            .map(|(_, addr)| addr.as_str())
    }
}

/// Status codes of refusals (HTTP's, on both transports).
const NOT_FOUND: u16 = 404;
const BAD_GATEWAY: u16 = 502;
const GATEWAY_TIMEOUT: u16 = 504;

impl Backends for ServiceMap {
    /// Finds the backend for `name` and connects to it.
    async fn dial(&self, name: &str) -> Result<(TcpStream, String), Refusal> {
        let Some(addr) = self.lookup(name) else {
            return Err(Refusal {
                status: NOT_FOUND,
                reason: format!("this agent serves no {name}"),
            });
        };
        match crate::runtime::connect(addr).await {
            Ok(backend) => Ok((backend, addr.to_string())),
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
        let map = ServiceMap::new(vec![
            ("*.example.com".into(), "127.0.0.1:1".into()),
            ("app.example.com".into(), "127.0.0.1:2".into()),
        ]);
        assert_eq!(map.lookup("app.example.com"), Some("127.0.0.1:2"));
        assert_eq!(map.lookup("x.example.com"), Some("127.0.0.1:1"));
        assert_eq!(map.lookup("example.com"), None);
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
