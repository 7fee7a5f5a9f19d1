//! Public ports an agent may be granted beside names (DESIGN.md section 11). A granted
//! port is written `tcp:PORT` or `udp:PORT` wherever a served name goes: in tokens,
//! grants, certificate records, `--map` and listings. In the certificate it is the URI name
//! `revproxy:tcp:PORT` / `revproxy:udp:PORT` (a DNS name cannot hold it). Which ports may be granted at all is the range the
//! proxies are configured with (`ports = "LOW-HIGH"`), recorded in the store's settings
//! by each proxy as it starts.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::CaError;
use crate::records::Tx;

/// Prefix of a granted port's URI name in a certificate: `revproxy:tcp:2222`.
pub const URI_PREFIX: &str = "revproxy:";

/// Which protocol a granted port carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// The prefix of its served names: `tcp` or `udp`.
    pub fn label(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// A granted public port: `tcp:2222` or `udp:51820` as a served name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GrantedPort {
    pub protocol: Protocol,
    pub port: u16,
}

impl GrantedPort {
    pub fn tcp(port: u16) -> GrantedPort {
        GrantedPort {
            protocol: Protocol::Tcp,
            port,
        }
    }

    pub fn udp(port: u16) -> GrantedPort {
        GrantedPort {
            protocol: Protocol::Udp,
            port,
        }
    }

    /// The granted port a served name stands for (`tcp:PORT` or `udp:PORT`, lower-case,
    /// as normalized); `None` for a host name.
    pub fn of(name: &str) -> Option<GrantedPort> {
        let (protocol, digits) = match name.split_once(':')? {
            ("tcp", digits) => (Protocol::Tcp, digits),
            ("udp", digits) => (Protocol::Udp, digits),
            _ => return None,
        };
        // Only the canonical form: digits, no sign, no leading zero.
        if digits.is_empty()
            || digits.starts_with('0')
            || !digits.bytes().all(|b| b.is_ascii_digit())
        {
            return None;
        }
        let port = digits.parse().ok().filter(|p| *p != 0)?;
        Some(GrantedPort { protocol, port })
    }

    /// The `token create` flag that grants it: `--tcp-port 2222`.
    pub fn flag(&self) -> String {
        format!("--{}-port {}", self.protocol.label(), self.port)
    }
}

impl fmt::Display for GrantedPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.protocol.label(), self.port)
    }
}

/// The served name of TCP port `port`: `tcp:2222`.
pub fn tcp_name(port: u16) -> String {
    GrantedPort::tcp(port).to_string()
}

/// The served name of UDP port `port`: `udp:51820`.
pub fn udp_name(port: u16) -> String {
    GrantedPort::udp(port).to_string()
}

/// The port of a served name `tcp:PORT` (lower-case, as normalized); `None` for a host
/// name or a UDP port.
pub fn tcp_port_of(name: &str) -> Option<u16> {
    GrantedPort::of(name)
        .filter(|g| g.protocol == Protocol::Tcp)
        .map(|g| g.port)
}

/// The port of a served name `udp:PORT`; `None` for anything else.
pub fn udp_port_of(name: &str) -> Option<u16> {
    GrantedPort::of(name)
        .filter(|g| g.protocol == Protocol::Udp)
        .map(|g| g.port)
}

/// Whether `name` is a granted port (TCP or UDP) rather than a host name.
pub fn is_port_name(name: &str) -> bool {
    name.starts_with("tcp:") || name.starts_with("udp:")
}

/// The ports the proxies may grant, inclusive: `20000-20099`, or one port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PortRange {
    pub low: u16,
    pub high: u16,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        (self.low..=self.high).contains(&port)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.low == self.high {
            write!(f, "{}", self.low)
        } else {
            write!(f, "{}-{}", self.low, self.high)
        }
    }
}

impl FromStr for PortRange {
    type Err = String;

    fn from_str(s: &str) -> Result<PortRange, String> {
        let bad = || {
            format!("{s:?} is not a port range: expected LOW-HIGH (like 20000-20099) with ports from 1 to 65535, LOW at most HIGH")
        };
        let (low, high) = s.trim().split_once('-').unwrap_or((s.trim(), s.trim()));
        let port = |p: &str| p.trim().parse::<u16>().ok().filter(|p| *p != 0);
        match (port(low), port(high)) {
            (Some(low), Some(high)) if low <= high => Ok(PortRange { low, high }),
            _ => Err(bad()),
        }
    }
}

impl TryFrom<String> for PortRange {
    type Error = String;

    fn try_from(s: String) -> Result<PortRange, String> {
        s.parse()
    }
}

impl From<PortRange> for String {
    fn from(r: PortRange) -> String {
        r.to_string()
    }
}

/// Refuses any granted port in `names` that the proxies may not grant: outside the range
/// recorded in the store, or any at all when no proxy has recorded one.
pub(crate) fn check_granted(tx: &mut dyn Tx, names: &[String]) -> Result<(), CaError> {
    let ports: Vec<u16> = (names.iter())
        .filter_map(|n| GrantedPort::of(n))
        .map(|g| g.port)
        .collect();
    let Some(first) = ports.first() else {
        return Ok(());
    };
    let Some(range) = tx.settings()?.ports else {
        return Err(CaError::InvalidInput(format!(
            "port {first} cannot be granted: no proxy on this state has a port range; set \
             ports = \"LOW-HIGH\" in the proxy's configuration and start it"
        )));
    };
    match ports.iter().find(|p| !range.contains(**p)) {
        Some(outside) => Err(CaError::InvalidInput(format!(
            "port {outside} is outside the ports the proxy may grant ({range}: ports in its \
             configuration)"
        ))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_names() {
        assert_eq!(tcp_port_of("tcp:2222"), Some(2222));
        assert_eq!(tcp_port_of("tcp:65535"), Some(65535));
        for bad in [
            "tcp:0",
            "tcp:65536",
            "tcp:",
            "tcp:022",
            "tcp:+22",
            "tcp:2a",
            "udp:53",
            "app.example.com",
            "sctp:5",
        ] {
            assert_eq!(tcp_port_of(bad), None, "{bad}");
        }
        assert_eq!(tcp_name(22), "tcp:22");
        assert_eq!(udp_port_of("udp:53"), Some(53));
        assert_eq!(udp_port_of("tcp:53"), None);
        assert_eq!(udp_port_of("udp:053"), None);
        assert_eq!(udp_name(51820), "udp:51820");
        assert_eq!(GrantedPort::of("udp:51820"), Some(GrantedPort::udp(51820)));
        assert!(is_port_name("udp:53") && is_port_name("tcp:22") && !is_port_name("a.b"));
    }

    #[test]
    fn ranges() {
        let r: PortRange = "20000-20099".parse().unwrap();
        assert!(r.contains(20000) && r.contains(20099) && !r.contains(20100) && !r.contains(19999));
        assert_eq!(r.to_string(), "20000-20099");
        assert_eq!("2222".parse::<PortRange>().unwrap().to_string(), "2222");
        for bad in ["", "0-10", "10-5", "1-65536", "a-b", "-5"] {
            let e = bad.parse::<PortRange>().unwrap_err();
            assert!(e.contains("LOW-HIGH"), "{bad}: {e}");
        }
    }
}
