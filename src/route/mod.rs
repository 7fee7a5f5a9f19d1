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

impl ListenerKind {
    /// `sni`, `http` or `fixed`, as logs name it.
    pub fn name(&self) -> &'static str {
        match self {
            ListenerKind::Sni => "sni",
            ListenerKind::Http => "http",
            ListenerKind::Fixed(_) => "fixed",
        }
    }

    /// Where a `fixed` listener sends everything.
    pub fn target(&self) -> Option<&Target> {
        match self {
            ListenerKind::Fixed(target) => Some(target),
            _ => None,
        }
    }
}

/// Where a connection goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A name served by agents (or by a static route).
    Name(String),
    /// A fixed TCP backend, `host:port`.
    Tcp(String),
}

/// As the configuration writes it: a name, or `tcp://HOST:PORT`.
impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Name(name) => f.write_str(name),
            Target::Tcp(addr) => write!(f, "tcp://{addr}"),
        }
    }
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

/// An address range, `ADDRESS/PREFIX` (`10.0.0.0/8`, `2001:db8::/32`) or one address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    network: std::net::IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `ip` is in the range (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.network, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let bad = || format!("{s:?} is not an address range like 10.0.0.0/8 or 2001:db8::/32");
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let network: std::net::IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(bad)?,
            None => max,
        };
        // Addresses are compared as IPv4 when they are IPv4-mapped: so is the range.
        if let std::net::IpAddr::V6(v6) = network {
            if let Some(v4) = v6.to_ipv4_mapped() {
                let prefix = prefix.checked_sub(96).ok_or_else(bad)?;
                return Ok(Cidr {
                    network: v4.into(),
                    prefix,
                });
            }
        }
        Ok(Cidr { network, prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// Whether the granted/served `pattern` covers the `name` a client asked for (one rule
/// for the CA's tools and for routing).
pub(crate) use revproxy_ca::names::name_matches;

#[cfg(test)]
mod tests {
    #[test]
    fn address_ranges() {
        let net: super::Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(net.contains("10.1.200.3".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        assert!(
            net.contains("::ffff:10.1.0.9".parse().unwrap()),
            "IPv4-mapped"
        );
        let one: super::Cidr = "2001:db8::7".parse().unwrap();
        assert!(one.contains("2001:db8::7".parse().unwrap()));
        assert!(!one.contains("2001:db8::8".parse().unwrap()));
        let all: super::Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("192.0.2.1".parse().unwrap()));
        assert!(!all.contains("::1".parse().unwrap()));
        let mapped: super::Cidr = "::ffff:10.0.0.0/104".parse().unwrap();
        assert!(mapped.contains("10.3.2.1".parse().unwrap()));
        for bad in [
            "10.0.0.0/33",
            "nonsense",
            "10.0.0.0/",
            "::/129",
            "::ffff:10.0.0.0/90",
        ] {
            assert!(bad.parse::<super::Cidr>().is_err(), "{bad}");
        }
    }

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
