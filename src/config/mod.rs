//! The TOML configuration files of `revproxy serve` and `revproxy-agent run`, and the
//! duration syntax shared with the command line.
//!
//! Reading a file, parsing text ([`ProxyConfig::from_toml`]) and checking meaning
//! (`validate`) are kept apart, so that every example in `examples/` can be checked by a
//! test and a bad file is refused before any port is bound. Unknown keys are errors.
//! Documented in `docs/configuration.md`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

pub use crate::tunnel::Transport;
pub use duration::{parse_duration, DurationError};
pub use size::{parse_size, SizeError};

use crate::route::{ListenerKind, Target};

mod acme;
mod agent;
mod duration;
mod size;

pub use acme::AcmeConfig;
pub use agent::{parse_connect, parse_map, AgentConfig, ConnectConfig, ServiceConfig};

/// A configuration file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The reason is in the message, not exposed as a source: a chain printer would say
    /// it twice.
    #[error("cannot read {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    /// `FILE:LINE: KEY: what is wrong` (line and key when the parser knows them).
    #[error("{}{}{}: {message}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default(), key.as_ref().map(|k| format!(": {k}")).unwrap_or_default())]
    Parse {
        path: PathBuf,
        line: Option<usize>,
        key: Option<String>,
        message: String,
    },
    #[error("{0}")]
    Invalid(String),
}

/// `revproxy serve --config FILE`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// State directory (the CA and its records).
    pub state: Option<PathBuf>,
    /// Agent listener address (enrollment and tunnels).
    pub agents: Option<SocketAddr>,
    /// Shorthand for a `[[listener]]` with `protocol = "sni"`.
    pub sni: Option<SocketAddr>,
    /// Shorthand for a `[[listener]]` with `protocol = "http"`.
    pub http: Option<SocketAddr>,
    /// Time a client has to send its ClientHello or request head, e.g. "10s".
    #[serde(default, deserialize_with = "duration")]
    pub peek_timeout: Option<Duration>,
    /// Time a client may accept no bytes before its stream is reset, e.g. "60s".
    #[serde(default, deserialize_with = "duration")]
    pub send_timeout: Option<Duration>,
    /// Time a client's stream may move no byte either way before it is closed (off).
    #[serde(default, deserialize_with = "duration")]
    pub idle_timeout: Option<Duration>,
    /// Most tunnels one agent identity may hold at once.
    pub max_tunnels_per_agent: Option<usize>,
    /// Most public connections one source address may hold at once.
    pub max_connections_per_source: Option<usize>,
    /// Most handshakes one source address may have under way on the agent port.
    pub max_handshakes_per_source: Option<usize>,
    /// Most connections on the agent port at once, per protocol (TCP: h2 tunnels and
    /// enrollments; UDP: QUIC tunnels). Default: an eighth of the open-file limit, at most
    /// 131,072.
    pub max_agent_connections: Option<usize>,
    /// What all client streams together may hold of bytes read ahead of slow clients,
    /// e.g. "512MiB" (default: a sixteenth of memory, 64 MiB to 1 GiB).
    #[serde(default, deserialize_with = "size")]
    pub stream_buffer_budget: Option<u64>,
    /// Time open connections get to finish on shutdown, e.g. "10s".
    #[serde(default, deserialize_with = "duration")]
    pub shutdown_grace: Option<Duration>,
    /// Admin listener (metrics, status, readiness): plain HTTP on loopback, TLS for
    /// operator certificates elsewhere; `"off"` for none.
    pub admin: Option<AdminAddr>,
    /// One log line per client connection, at info.
    pub access_log: Option<bool>,
    /// `text` or `json`.
    pub log_format: Option<crate::runtime::logging::LogFormat>,
    /// Where the CA state lives when not in the state directory: `postgres://...`,
    /// shared by several proxies. A password in it is never logged; keeping it out of the
    /// file (`PGPASSWORD`, or the whole URL in `REVPROXY_STORE`) keeps it out of backups.
    pub store: Option<crate::store::StoreUrl>,
    /// The agent listener's address as agents reach it (`host:port`), told to agents of
    /// every proxy sharing the store.
    pub advertise: Option<String>,
    /// Load balancers in front (`"10.0.0.0/8"`, `"192.0.2.7"`): their connections to
    /// public listeners must start with a PROXY header, whose client is the client.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// Public listeners.
    #[serde(default)]
    pub listener: Vec<ListenerConfig>,
    /// Static routes to TCP backends: after agents granted the exact name, before
    /// agents holding a wildcard.
    #[serde(default)]
    pub route: Vec<RouteConfig>,
    /// Where terminated names' certificates are ordered (`revproxy tls terminate`).
    pub acme: Option<AcmeConfig>,
    /// The public ports agents may be granted (`"LOW-HIGH"`): the proxy listens on one
    /// while an agent holding it is connected. Read at start.
    pub ports: Option<revproxy_ca::ports::PortRange>,
    /// The address granted ports listen on (default `0.0.0.0`).
    pub ports_bind: Option<std::net::IpAddr>,
    /// A flow on a granted UDP port that moved no datagram for this long ends (default
    /// "60s", at most "1h").
    #[serde(default, deserialize_with = "duration")]
    pub udp_idle_timeout: Option<Duration>,
    /// Most flows on all granted UDP ports together (default 16384).
    pub max_udp_flows: Option<usize>,
    /// Most flows of one source address on a granted UDP port (default 256).
    pub max_udp_flows_per_source: Option<usize>,
}

/// One public listener: routes on `protocol`, or sends everything `to` one target.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub listen: SocketAddr,
    pub protocol: Option<Protocol>,
    /// A host name served by agents, or `tcp://HOST:PORT`.
    pub to: Option<String>,
    /// With `to = "tcp://..."`: the backend gets a PROXY header (`"v1"`/`"v2"`) first.
    pub proxy_protocol: Option<crate::wire::proxy_header::ProxyProtocol>,
}

/// What a routing listener peeks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Sni,
    Http,
}

/// A static route.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub host: String,
    /// `tcp://HOST:PORT`.
    pub to: String,
    /// The backend gets a PROXY header (`"v1"`/`"v2"`) first.
    pub proxy_protocol: Option<crate::wire::proxy_header::ProxyProtocol>,
}

impl ProxyConfig {
    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<ProxyConfig, ConfigError> {
        let text = read(path)?;
        let config = ProxyConfig::from_toml(&text).map_err(|e| parse_error(path, &text, &e))?;
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML text (no validation).
    pub fn from_toml(text: &str) -> Result<ProxyConfig, toml::de::Error> {
        toml::from_str(text)
    }

    /// Every listener, with the `sni`/`http` shorthands expanded.
    pub fn listeners(&self) -> Result<Vec<(SocketAddr, ListenerKind)>, ConfigError> {
        let mut out = Vec::new();
        out.extend(self.sni.map(|a| (a, ListenerKind::Sni)));
        out.extend(self.http.map(|a| (a, ListenerKind::Http)));
        for l in &self.listener {
            let kind = match (&l.protocol, &l.to) {
                (Some(Protocol::Sni), None) => ListenerKind::Sni,
                (Some(Protocol::Http), None) => ListenerKind::Http,
                (None, Some(to)) => ListenerKind::Fixed(
                    Target::parse(to)
                        .map_err(|e| ConfigError::Invalid(format!("listener {}: {e}", l.listen)))?,
                ),
                _ => {
                    return Err(ConfigError::Invalid(format!(
                        "listener {} needs exactly one of protocol = \"sni\"|\"http\" or to = NAME|\"tcp://HOST:PORT\"",
                        l.listen
                    )))
                }
            };
            out.push((l.listen, kind));
        }
        Ok(out)
    }

    /// Static routes as (name, `host:port`).
    pub fn routes(&self) -> Result<Vec<(String, String)>, ConfigError> {
        self.route
            .iter()
            .map(|r| {
                let host = revproxy_ca::names::normalize_host(&r.host)
                    .map_err(|e| ConfigError::Invalid(format!("route: {e}")))?;
                match Target::parse(&r.to) {
                    Ok(Target::Tcp(addr)) => Ok((host, addr)),
                    _ => Err(ConfigError::Invalid(format!(
                        "route {host}: to must be tcp://HOST:PORT, not {:?}",
                        r.to
                    ))),
                }
            })
            .collect()
    }

    /// The static backends (`host:port`) that get a PROXY header, and which: from
    /// `proxy_protocol` on `[[route]]` and on `[[listener]]` with `to = "tcp://..."`. One
    /// backend expects one kind of header: two entries that disagree are an error.
    pub fn static_proxy_protocol(
        &self,
    ) -> Result<
        std::collections::HashMap<String, crate::wire::proxy_header::ProxyProtocol>,
        ConfigError,
    > {
        let mut wanted = std::collections::HashMap::new();
        let mut entries = Vec::new();
        for r in &self.route {
            entries.push((
                format!("route {}", r.host),
                Some(r.to.as_str()),
                r.proxy_protocol,
            ));
        }
        for l in &self.listener {
            entries.push((
                format!("listener {}", l.listen),
                l.to.as_deref(),
                l.proxy_protocol,
            ));
        }
        for (what, to, version) in entries {
            let Some(version) = version else { continue };
            let Some(Ok(Target::Tcp(addr))) = to.map(Target::parse) else {
                return Err(ConfigError::Invalid(format!(
                    "{what}: proxy_protocol needs to = \"tcp://HOST:PORT\" (an agent's service sets its own)"
                )));
            };
            if wanted
                .insert(addr.clone(), version)
                .is_some_and(|v| v != version)
            {
                return Err(ConfigError::Invalid(format!(
                    "{what}: backend {addr} is given two different proxy_protocol versions"
                )));
            }
        }
        Ok(wanted)
    }

    /// `[acme]`, checked against the listeners (its `ca_roots` read).
    pub fn acme_settings(&self) -> Result<Option<crate::edge::AcmeSettings>, ConfigError> {
        let kinds: Vec<ListenerKind> = self.listeners()?.into_iter().map(|(_, k)| k).collect();
        self.acme.as_ref().map(|a| a.settings(&kinds)).transpose()
    }

    /// The `trusted_proxies` ranges, parsed.
    pub fn trusted_proxies(&self) -> Result<Vec<crate::route::Cidr>, ConfigError> {
        (self.trusted_proxies.iter())
            .map(|s| {
                s.parse()
                    .map_err(|e: String| ConfigError::Invalid(format!("trusted_proxies: {e}")))
            })
            .collect()
    }

    /// Checks meaning: listener targets, routes, duplicate addresses, address ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        positive("send_timeout", self.send_timeout.map(|d| d.as_millis()))?;
        positive("idle_timeout", self.idle_timeout.map(|d| d.as_millis()))?;
        self.trusted_proxies()?;
        self.static_proxy_protocol()?;
        positive(
            "max_tunnels_per_agent",
            self.max_tunnels_per_agent.map(|n| n as u128),
        )?;
        positive(
            "max_connections_per_source",
            self.max_connections_per_source.map(|n| n as u128),
        )?;
        positive(
            "max_handshakes_per_source",
            self.max_handshakes_per_source.map(|n| n as u128),
        )?;
        positive(
            "max_agent_connections",
            self.max_agent_connections.map(|n| n as u128),
        )?;
        let listeners = self.listeners()?;
        self.routes()?;
        self.acme_settings()?;
        // With the addresses `serve` takes when the file names none.
        let admin = match self.admin {
            Some(AdminAddr::At(addr)) => Some(addr),
            Some(AdminAddr::Off) => None,
            None => Some(DEFAULT_ADMIN),
        };
        let agents = self.agents.unwrap_or(DEFAULT_AGENTS);
        let fixed = listeners.iter().map(|(a, _)| *a);
        self.check_ports(fixed.chain([agents]).chain(admin))?;
        self.udp_limits()?;
        // Port 0 asks the kernel for a free port: those never collide.
        let mut addrs: Vec<SocketAddr> = listeners.iter().map(|(a, _)| *a).collect();
        addrs.extend(self.agents);
        addrs.retain(|a| a.port() != 0);
        let mut sorted = addrs.clone();
        sorted.sort();
        sorted.dedup();
        if sorted.len() != addrs.len() {
            return Err(ConfigError::Invalid(
                "two listeners share one address".into(),
            ));
        }
        Ok(())
    }
}

impl ProxyConfig {
    /// How flows on granted UDP ports are bounded: the defaults, or what the file says.
    pub fn udp_limits(&self) -> Result<crate::proxy::UdpLimits, ConfigError> {
        let mut limits = crate::proxy::UdpLimits::default();
        if let Some(idle) = self.udp_idle_timeout {
            if idle < Duration::from_secs(1) || idle > Duration::from_secs(3600) {
                return Err(ConfigError::Invalid(format!(
                    "udp_idle_timeout = {idle:?} is out of bounds: from 1s to 1h"
                )));
            }
            limits.idle = idle;
        }
        for (key, value, field) in [
            ("max_udp_flows", self.max_udp_flows, &mut limits.flows),
            (
                "max_udp_flows_per_source",
                self.max_udp_flows_per_source,
                &mut limits.per_source,
            ),
        ] {
            match value {
                Some(0) => {
                    return Err(ConfigError::Invalid(format!(
                        "{key} = 0 would refuse every UDP flow: give at least 1"
                    )))
                }
                Some(n) => *field = n,
                None => {}
            }
        }
        Ok(limits)
    }

    /// `ports_bind` needs `ports`; no configured listener (nor the agent or admin port)
    /// may sit where a granted port would listen.
    fn check_ports(&self, addrs: impl Iterator<Item = SocketAddr>) -> Result<(), ConfigError> {
        let Some(range) = self.ports else {
            return match self.ports_bind {
                Some(_) => Err(ConfigError::Invalid(
                    "ports_bind is set but ports is not: give the range agents may be granted, ports = \"LOW-HIGH\"".into(),
                )),
                None => Ok(()),
            };
        };
        let bind = self.ports_bind.unwrap_or(DEFAULT_PORTS_BIND);
        let overlaps = |a: &SocketAddr| {
            range.contains(a.port())
                && (a.ip() == bind || a.ip().is_unspecified() || bind.is_unspecified())
        };
        match addrs.filter(|a| a.port() != 0).find(overlaps) {
            Some(a) => Err(ConfigError::Invalid(format!(
                "listener {a} is inside ports = \"{range}\" (granted ports listen on {bind}): move it or narrow the range"
            ))),
            None => Ok(()),
        }
    }
}

/// Where agents connect unless told otherwise (`agents`, `--agents`).
pub const DEFAULT_AGENTS: SocketAddr = SocketAddr::new(
    std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
    revproxy_ca::DEFAULT_AGENT_PORT,
);

/// Where the proxy's admin listener is unless told otherwise (`admin`, `--admin`).
pub const DEFAULT_ADMIN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 7444);

/// Where granted ports listen unless `ports_bind` says otherwise.
pub const DEFAULT_PORTS_BIND: std::net::IpAddr =
    std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED);

/// Where the proxy's admin listener is: an address, or `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum AdminAddr {
    Off,
    At(SocketAddr),
}

impl std::str::FromStr for AdminAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<AdminAddr, String> {
        if s == "off" {
            return Ok(AdminAddr::Off);
        }
        s.parse()
            .map(AdminAddr::At)
            .map_err(|_| format!("{s:?} is not an address (HOST:PORT with an IP address) or off"))
    }
}

impl TryFrom<String> for AdminAddr {
    type Error = String;

    fn try_from(s: String) -> Result<AdminAddr, String> {
        s.parse()
    }
}

/// A zero here would refuse everything (a cap) or reset every stream at its first pause
/// (a timeout): refuse the file instead.
fn positive(key: &str, value: Option<u128>) -> Result<(), ConfigError> {
    match value {
        Some(0) => Err(ConfigError::Invalid(format!("{key} must be more than 0"))),
        _ => Ok(()),
    }
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
        path: path.to_path_buf(),
        error,
    })
}

/// The tables a config may repeat: written with one pair of brackets they are a table,
/// and serde says "invalid type: map, expected a sequence".
const LISTS: [&str; 4] = ["listener", "route", "service", "connect"];

/// A TOML error as one line, `FILE:LINE: KEY: message`, instead of the parser's snippet
/// (which anyhow's chain would print twice), with a hint for `[listener]` written for
/// `[[listener]]`.
fn parse_error(path: &Path, text: &str, error: &toml::de::Error) -> ConfigError {
    let line =
        (error.span()).map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1);
    let key = error_key(error);
    let mut message = error.message().trim().replace('\n', "; ");
    if let Some(table) = key.as_deref().filter(|k| LISTS.contains(k)) {
        if message.starts_with("invalid type: map, expected a sequence") {
            message =
                format!("use [[{table}]] (two brackets), not [{table}]: a config may have several");
        }
    }
    ConfigError::Parse {
        path: path.to_path_buf(),
        line,
        key,
        message,
    }
}

/// The dotted key an error is about, e.g. `listener.listen`. The parser keeps it private
/// and prints it only when it has no input to quote, so ask it for that form.
fn error_key(error: &toml::de::Error) -> Option<String> {
    let mut bare = error.clone();
    bare.set_input(None);
    let shown = bare.to_string();
    let key = shown
        .lines()
        .last()?
        .strip_prefix("in `")?
        .strip_suffix('`')?;
    (!key.is_empty()).then(|| key.to_string())
}

fn size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let text = Option::<String>::deserialize(d)?;
    text.map(|t| parse_size(&t).map_err(serde::de::Error::custom))
        .transpose()
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let text = Option::<String>::deserialize(d)?;
    text.map(|t| parse_duration(&t).map_err(serde::de::Error::custom))
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        assert!(ProxyConfig::from_toml("agent = \"0.0.0.0:1\"").is_err());
        assert!(ProxyConfig::from_toml("agents = \"nope\"").is_err());
        assert!(ProxyConfig::from_toml("peek_timeout = \"soon\"").is_err());
        let both = ProxyConfig::from_toml(
            "[[listener]]\nlisten = \"127.0.0.1:1\"\nprotocol = \"sni\"\nto = \"a.example.com\"",
        )
        .unwrap();
        assert!(both.validate().is_err());
        let route =
            ProxyConfig::from_toml("[[route]]\nhost = \"a.example.com\"\nto = \"b.example.com\"")
                .unwrap();
        assert!(route.validate().is_err());
        assert!(ProxyConfig::from_toml("stream_buffer_budget = \"lots\"").is_err());
        assert_eq!(
            (ProxyConfig::from_toml("stream_buffer_budget = \"64MiB\"").unwrap())
                .stream_buffer_budget,
            Some(64 << 20)
        );
        for zero in ["send_timeout = \"0s\"", "max_tunnels_per_agent = 0"] {
            assert!(
                ProxyConfig::from_toml(zero).unwrap().validate().is_err(),
                "{zero}"
            );
        }
        let dup = ProxyConfig::from_toml("sni = \"127.0.0.1:1\"\nhttp = \"127.0.0.1:1\"").unwrap();
        assert!(dup.validate().is_err());
        assert!(
            AgentConfig::from_toml("[[service]]\nhost = \"a\"\nto = \"b:1\"\nport = 1").is_err()
        );
    }

    #[test]
    fn proxy_protocol_and_trusted_proxies() {
        let ok = ProxyConfig::from_toml(
            "trusted_proxies = [\"10.0.0.0/8\", \"192.0.2.7\"]\n\
             [[route]]\nhost = \"a.example.com\"\nto = \"tcp://10.1.1.1:80\"\nproxy_protocol = \"v2\"\n\
             [[listener]]\nlisten = \"127.0.0.1:9\"\nto = \"tcp://10.1.1.1:80\"\nproxy_protocol = \"v2\"",
        )
        .unwrap();
        ok.validate().unwrap();
        assert_eq!(ok.trusted_proxies().unwrap().len(), 2);
        assert_eq!(ok.static_proxy_protocol().unwrap().len(), 1);
        for bad in [
            "trusted_proxies = [\"10.0.0.0/40\"]",
            // Only a tcp:// backend takes it on the proxy (an agent's service sets its own).
            "[[listener]]\nlisten = \"127.0.0.1:9\"\nto = \"ssh.example.com\"\nproxy_protocol = \"v1\"",
            // One backend, two kinds of header.
            "[[route]]\nhost = \"a.example.com\"\nto = \"tcp://10.1.1.1:80\"\nproxy_protocol = \"v1\"\n\
             [[route]]\nhost = \"b.example.com\"\nto = \"tcp://10.1.1.1:80\"\nproxy_protocol = \"v2\"",
        ] {
            assert!(ProxyConfig::from_toml(bad).unwrap().validate().is_err(), "{bad}");
        }
        assert!(AgentConfig::from_toml(
            "[[service]]\nhost = \"a\"\nto = \"b:1\"\nproxy_protocol = \"v3\""
        )
        .is_err());
        // One listener per private name: a reload could not tell two apart.
        let twice = AgentConfig::from_toml(
            "[[connect]]\nhost = \"db.internal\"\nlisten = \"127.0.0.1:1\"\n\
             [[connect]]\nhost = \"DB.internal\"\nlisten = \"127.0.0.1:2\"",
        )
        .unwrap();
        let err = twice.validate().unwrap_err().to_string();
        assert!(err.contains("appears twice"), "{err}");
    }

    #[test]
    fn granted_ports_and_their_services() {
        let ok = ProxyConfig::from_toml(
            "ports = \"20000-20099\"\nports_bind = \"127.0.0.1\"\nsni = \"0.0.0.0:443\"",
        )
        .unwrap();
        ok.validate().unwrap();
        assert_eq!(ok.ports.unwrap().to_string(), "20000-20099");
        for (bad, says) in [
            ("ports = \"99-1\"", "LOW-HIGH"),
            ("ports = \"0-10\"", "LOW-HIGH"),
        ] {
            let err = ProxyConfig::from_toml(bad).unwrap_err().to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
        for (bad, says) in [
            ("ports_bind = \"0.0.0.0\"", "ports is not"),
            // A listener where a granted port would listen.
            ("ports = \"2000-2100\"\n[[listener]]\nlisten = \"127.0.0.1:2022\"\nto = \"a.example.com\"", "inside ports"),
            ("ports = \"7000-7999\"\nagents = \"0.0.0.0:7443\"", "inside ports"),
            ("udp_idle_timeout = \"0s\"", "from 1s to 1h"),
            ("udp_idle_timeout = \"2h\"", "from 1s to 1h"),
            ("max_udp_flows = 0", "at least 1"),
            ("max_udp_flows_per_source = 0", "at least 1"),
        ] {
            let err = ProxyConfig::from_toml(bad).unwrap().validate().unwrap_err().to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
        // Elsewhere than where granted ports listen, a listener in the range is fine.
        let apart = ProxyConfig::from_toml(
            "ports = \"2000-2100\"\nports_bind = \"127.0.0.2\"\n\
             [[listener]]\nlisten = \"127.0.0.1:2022\"\nto = \"a.example.com\"",
        )
        .unwrap();
        apart.validate().unwrap();
        let udp = ProxyConfig::from_toml(
            "udp_idle_timeout = \"15s\"\nmax_udp_flows = 100\nmax_udp_flows_per_source = 10",
        )
        .unwrap();
        let limits = udp.udp_limits().unwrap();
        assert_eq!(
            (limits.idle, limits.flows, limits.per_source),
            (Duration::from_secs(15), 100, 10)
        );
        let defaults = ProxyConfig::from_toml("").unwrap().udp_limits().unwrap();
        assert_eq!(defaults, crate::proxy::UdpLimits::default());

        let agent =
            AgentConfig::from_toml("[[service]]\ntcp_port = 2222\nto = \"127.0.0.1:22\"").unwrap();
        agent.validate().unwrap();
        assert_eq!(agent.service[0].name().unwrap(), "tcp:2222");
        let agent =
            AgentConfig::from_toml("[[service]]\nudp_port = 53\nto = \"127.0.0.1:5353\"").unwrap();
        agent.validate().unwrap();
        assert_eq!(agent.service[0].name().unwrap(), "udp:53");
        for bad in [
            "[[service]]\nto = \"127.0.0.1:22\"",
            "[[service]]\nhost = \"a.example.com\"\ntcp_port = 2222\nto = \"127.0.0.1:22\"",
            "[[service]]\ntcp_port = 53\nudp_port = 53\nto = \"127.0.0.1:53\"",
        ] {
            assert!(
                AgentConfig::from_toml(bad).unwrap().validate().is_err(),
                "{bad}"
            );
        }
        assert_eq!(
            parse_map("TCP:2222=127.0.0.1:22").unwrap(),
            ("tcp:2222".to_string(), "127.0.0.1:22".to_string())
        );
        assert_eq!(
            parse_map("udp:53=127.0.0.1:5353").unwrap(),
            ("udp:53".to_string(), "127.0.0.1:5353".to_string())
        );
        for bad in [
            "tcp:0=127.0.0.1:22",
            "udp:0=127.0.0.1:53",
            "tcp:70000=127.0.0.1:22",
            "tcp:ssh=127.0.0.1:22",
        ] {
            let err = parse_map(bad).unwrap_err().to_string();
            assert!(err.contains("tcp:PORT"), "{bad}: {err}");
        }
    }

    #[test]
    fn map_arguments() {
        assert_eq!(
            parse_map("App.Example.com=127.0.0.1:8080").unwrap(),
            ("app.example.com".to_string(), "127.0.0.1:8080".to_string())
        );
        assert!(parse_map("app.example.com").is_err());
        assert!(parse_map("app.example.com=127.0.0.1").is_err());
        assert!(parse_map("bad_name!=127.0.0.1:1").is_err());
    }
}
