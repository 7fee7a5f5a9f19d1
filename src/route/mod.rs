//! Routing: what a public listener does ([`ListenerKind`]), where a connection goes
//! ([`Target`]), what its first bytes say (SNI, `Host`) and which names a pattern covers.
//! Pure functions; the sockets live in `proxy::public`.

pub(crate) mod http;
pub(crate) mod sni;

use revproxy_ca::names::{normalize_host, NameError};

/// What a public listener does with its connections.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenerKind {
    /// Route on the TLS ClientHello's server name; TLS passes through untouched.
    Sni,
    /// Route on the HTTP/1.x `Host` header.
    Http,
    /// Send everything to one target.
    Fixed(Target),
}

/// Where a connection goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A name served by agents (or by a static route).
    Name(String),
    /// A fixed TCP backend, `host:port`.
    Tcp(String),
}

/// A target that does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("{0:?} needs a port: tcp://HOST:PORT")]
    NoPort(String),
    #[error("{0:?} is not tcp://HOST:PORT")]
    BadAddress(String),
    #[error(transparent)]
    Name(#[from] NameError),
}

impl Target {
    /// Parses `tcp://HOST:PORT` or a host name.
    pub fn parse(s: &str) -> Result<Target, TargetError> {
        match s.strip_prefix("tcp://") {
            Some(addr) => {
                let (host, port) = addr
                    .rsplit_once(':')
                    .ok_or_else(|| TargetError::NoPort(s.to_string()))?;
                if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
                    return Err(TargetError::BadAddress(s.to_string()));
                }
                Ok(Target::Tcp(addr.to_string()))
            }
            None => Ok(Target::Name(normalize_host(s)?)),
        }
    }
}

/// Whether the granted/served `pattern` covers the `name` a client asked for.
///
/// Both are lower-case DNS names. `*.example.com` covers exactly one more label
/// (`a.example.com`, not `example.com` nor `a.b.example.com`), as in RFC 6125.
pub(crate) fn name_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => name
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest == suffix),
        None => pattern == name,
    }
}

#[cfg(test)]
mod tests {
    use super::name_matches;

    #[test]
    fn wildcards_cover_one_label() {
        assert!(name_matches("app.example.com", "app.example.com"));
        assert!(!name_matches("app.example.com", "x.app.example.com"));
        assert!(name_matches("*.example.com", "a.example.com"));
        assert!(!name_matches("*.example.com", "example.com"));
        assert!(!name_matches("*.example.com", "a.b.example.com"));
        assert!(!name_matches("*.example.com", ".example.com"));
    }
}
