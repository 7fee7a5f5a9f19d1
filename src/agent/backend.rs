//! The agent's service map: which backend serves which name, and dialing it for a stream
//! the proxy opened. The tunnel transports call [`ServiceMap::dial`] through
//! [`Backends`]; a name the map does not hold, or a backend that does not answer, becomes
//! a refusal with an HTTP status the proxy passes on.

use std::sync::Arc;

use super::metrics::AgentMetrics;
use crate::route::name_matches;
use crate::tunnel::{Backends, Dialed, Refusal};

/// The names this agent serves and where each goes.
#[derive(Clone)]
pub(crate) struct ServiceMap {
    /// (name pattern, backend `host:port`), in the order given.
    entries: Vec<(String, String)>,
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
    pub(crate) fn new(entries: Vec<(String, String)>, metrics: Arc<AgentMetrics>) -> ServiceMap {
        metrics.ensure_services(entries.iter().map(|(name, _)| name.as_str()));
        ServiceMap { entries, metrics }
    }

    /// The entry for `name`, (pattern, backend): an exact entry first, then a wildcard.
    pub(crate) fn lookup(&self, name: &str) -> Option<(&str, &str)> {
        let exact = self.entries.iter().find(|(pattern, _)| pattern == name);
        exact
            .or_else(|| {
                self.entries
                    .iter()
                    .find(|(pattern, _)| name_matches(pattern, name))
            })
            .map(|(pattern, addr)| (pattern.as_str(), addr.as_str()))
    }

    /// Every entry, (pattern, backend), in the order given.
    pub(crate) fn entries(&self) -> &[(String, String)] {
        &self.entries
    }
}

/// Status codes of refusals (HTTP's, on both transports).
const NOT_FOUND: u16 = 404;
const BAD_GATEWAY: u16 = 502;
const GATEWAY_TIMEOUT: u16 = 504;

impl Backends for ServiceMap {
    /// Finds the backend for `name` and connects to it.
    async fn dial(&self, name: &str, caller: Option<&str>) -> Result<Dialed, Refusal> {
        let Some((service, addr)) = self.lookup(name) else {
            self.metrics.unknown_name();
            return Err(Refusal {
                status: NOT_FOUND,
                reason: format!("this agent serves no {name}"),
            });
        };
        let started = std::time::Instant::now();
        let dialed = crate::runtime::connect(addr).await;
        if dialed.is_err() {
            self.metrics.dial_failed(service);
        }
        match dialed {
            Ok(stream) => Ok(Dialed {
                stream,
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
        let map = ServiceMap::new(
            vec![
                ("*.example.com".into(), "127.0.0.1:1".into()),
                ("app.example.com".into(), "127.0.0.1:2".into()),
            ],
            Arc::new(AgentMetrics::new()),
        );
        assert_eq!(
            map.lookup("app.example.com"),
            Some(("app.example.com", "127.0.0.1:2"))
        );
        assert_eq!(
            map.lookup("x.example.com"),
            Some(("*.example.com", "127.0.0.1:1"))
        );
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
