//! `revproxy-agent run --config FILE`: the agent's services (names and granted ports) and
//! the private names it reaches, and the `--map` / `--connect` arguments that add to them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{duration, parse_error, positive, read, ConfigError, Transport};
use crate::route::Target;

/// `revproxy-agent run --config FILE`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// State directory (the enrolled identity).
    pub state: Option<PathBuf>,
    /// Proxy address, instead of the one saved at enrollment.
    pub server: Option<String>,
    /// Tunnel transport.
    pub transport: Option<Transport>,
    /// Time a backend may accept no bytes before its stream is reset, e.g. "60s".
    #[serde(default, deserialize_with = "duration")]
    pub send_timeout: Option<Duration>,
    /// Time a stream may move no byte either way before it is closed (off).
    #[serde(default, deserialize_with = "duration")]
    pub idle_timeout: Option<Duration>,
    /// Time open streams get to finish on shutdown, e.g. "30s".
    #[serde(default, deserialize_with = "duration")]
    pub drain_grace: Option<Duration>,
    /// Admin listener (metrics, status, readiness), loopback only.
    pub admin: Option<std::net::SocketAddr>,
    /// `text` or `json`.
    pub log_format: Option<crate::runtime::logging::LogFormat>,
    /// Names served and their backends.
    #[serde(default)]
    pub service: Vec<ServiceConfig>,
    /// Names reached through the tunnel (private names), each on a local listener.
    #[serde(default)]
    pub connect: Vec<ConnectConfig>,
}

/// One name reached through the tunnel: connections to `listen` go to `host`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectConfig {
    /// The name to reach (exact).
    pub host: String,
    /// Local address to listen on, `IP:PORT` (loopback unless others should use it too).
    pub listen: SocketAddr,
}

/// Parses `NAME=LISTEN_ADDR` (a `--connect` argument).
pub fn parse_connect(s: &str) -> Result<(String, SocketAddr), ConfigError> {
    let bad = |why: String| ConfigError::Invalid(format!("invalid --connect {s:?}: {why}"));
    let (name, listen) = s
        .split_once('=')
        .ok_or_else(|| bad("expected NAME=LISTEN_ADDR".into()))?;
    let name = revproxy_ca::names::normalize_host(name).map_err(|e| bad(e.to_string()))?;
    if name.starts_with('*') {
        return Err(bad("a connect name is exact, not a wildcard".into()));
    }
    let listen = listen
        .parse()
        .map_err(|_| bad(format!("{listen:?} is not IP:PORT")))?;
    Ok((name, listen))
}

/// One served name.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Exact name or `*.example.com`; or instead `tcp_port` or `udp_port`.
    #[serde(default)]
    pub host: String,
    /// A granted public TCP port (`token create --tcp-port`) instead of a name.
    pub tcp_port: Option<u16>,
    /// A granted public UDP port (`token create --udp-port`) instead of a name; `to` is
    /// then the backend's UDP `HOST:PORT`.
    pub udp_port: Option<u16>,
    /// Backend `HOST:PORT`.
    pub to: String,
    /// `"v1"` or `"v2"`: a PROXY header with the public client's address before the
    /// first byte.
    pub proxy_protocol: Option<crate::wire::proxy_header::ProxyProtocol>,
    /// The backend speaks HTTP/2 without TLS (h2c): a proxy terminating the name's TLS
    /// offers `h2` to its clients.
    #[serde(default)]
    pub h2c: bool,
}

impl ServiceConfig {
    /// The served name: `host`, `tcp:PORT` for `tcp_port` or `udp:PORT` for `udp_port`
    /// (exactly one of them).
    pub fn name(&self) -> Result<String, ConfigError> {
        let mut given = Vec::new();
        if !self.host.is_empty() {
            given.push(self.host.clone());
        }
        given.extend(self.tcp_port.map(revproxy_ca::ports::tcp_name));
        given.extend(self.udp_port.map(revproxy_ca::ports::udp_name));
        match given.len() {
            1 => Ok(given.remove(0)),
            0 => Err(ConfigError::Invalid(format!(
                "[[service]] to = {:?} needs host = NAME, tcp_port = PORT or udp_port = PORT",
                self.to
            ))),
            _ => Err(ConfigError::Invalid(format!(
                "[[service]] to = {:?} has {}: one service is one name or one port",
                self.to,
                given.join(" and ")
            ))),
        }
    }
}

impl AgentConfig {
    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let text = read(path)?;
        let config = AgentConfig::from_toml(&text).map_err(|e| parse_error(path, &text, &e))?;
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML text (no validation).
    pub fn from_toml(text: &str) -> Result<AgentConfig, toml::de::Error> {
        toml::from_str(text)
    }

    /// Checks meaning.
    pub fn validate(&self) -> Result<(), ConfigError> {
        positive("send_timeout", self.send_timeout.map(|d| d.as_millis()))?;
        positive("idle_timeout", self.idle_timeout.map(|d| d.as_millis()))?;
        loopback_admin(self.admin)?;
        for s in &self.service {
            parse_map(&format!("{}={}", s.name()?, s.to))?;
        }
        let mut names = std::collections::HashSet::new();
        for c in &self.connect {
            let (name, _) = parse_connect(&format!("{}={}", c.host, c.listen))?;
            if !names.insert(name.clone()) {
                return Err(ConfigError::Invalid(format!(
                    "[[connect]] {name} appears twice; one listener per name"
                )));
            }
        }
        Ok(())
    }
}

/// The agent's admin listener has no authentication: loopback only.
fn loopback_admin(admin: Option<SocketAddr>) -> Result<(), ConfigError> {
    match admin {
        Some(addr) if !addr.ip().is_loopback() => Err(ConfigError::Invalid(format!(
            "admin = {addr}: the admin listener must be on a loopback address (127.0.0.1 or ::1); \
             it has no authentication"
        ))),
        _ => Ok(()),
    }
}

/// Parses `NAME=HOST:PORT`, `tcp:PORT=HOST:PORT` or `udp:PORT=HOST:PORT` (a `--map`
/// argument).
pub fn parse_map(s: &str) -> Result<(String, String), ConfigError> {
    let bad = |why: String| ConfigError::Invalid(format!("invalid service {s:?}: {why}"));
    let (name, to) = s.split_once('=').ok_or_else(|| {
        bad("expected NAME=HOST:PORT, tcp:PORT=HOST:PORT or udp:PORT=HOST:PORT".into())
    })?;
    let name = revproxy_ca::names::normalize_served(name).map_err(|e| bad(e.to_string()))?;
    match Target::parse(&format!("tcp://{to}")) {
        Ok(_) => Ok((name, to.to_string())),
        Err(_) => Err(bad(format!("backend {to:?} is not HOST:PORT"))),
    }
}
