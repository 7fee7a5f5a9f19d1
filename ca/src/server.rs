//! The proxy as agents see it: its server certificate (issued and reissued here), its proxy
//! id, its names and the enrollment address tokens carry. Agent certificates are `issue.rs`.

use std::net::IpAddr;
use std::time::Duration;

use rcgen::{ExtendedKeyUsagePurpose, KeyPair, SanType};
use time::OffsetDateTime;

use crate::ca::{read_private, Ca, DEFAULT_SANS, SERVER_CERT_FILE, SERVER_KEY_FILE};
use crate::cert::{signed_by, CertSummary};
use crate::error::CaError;
use crate::names::normalize_host;
use crate::records::Settings;
use crate::state::{AgentListener, StateFile};
use crate::{fsutil, hex, profile};

/// Port of the agent listener unless configured otherwise.
pub const DEFAULT_AGENT_PORT: u16 = 7443;
/// Lifetime of the proxy's server certificate; it is reissued when a third is left.
pub const SERVER_CERT_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// The agent listener's TLS identity, as [`Ca::server_identity`] hands it out.
#[derive(Clone, Debug)]
pub struct ServerIdentity {
    /// The certificate chain (server, then CA), PEM.
    pub chain_pem: String,
    /// The server certificate's key, PEM.
    pub key_pem: String,
    /// This proxy's identity: its certificate names `spiffe://TRUST_DOMAIN/proxy/ID`.
    pub proxy_id: String,
}

/// The URI a proxy's server certificate carries: agents tell proxies apart by it.
pub fn proxy_uri(trust_domain: &str, id: &str) -> String {
    format!("spiffe://{trust_domain}/proxy/{id}")
}

/// The proxy id in a certificate's URIs, if it names one.
pub fn proxy_id_of(uris: &[String]) -> Option<&str> {
    uris.iter().find_map(|u| {
        let rest = u.strip_prefix("spiffe://")?;
        let (_, id) = rest.split_once("/proxy/")?;
        (!id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')).then_some(id)
    })
}

impl Ca {
    /// The agent listener's certificate chain and key, and this proxy's id. (Re)issues the
    /// server certificate first when there is none (a proxy just added to a shared store),
    /// when a third or less of its lifetime is left, when it names no proxy id (written by
    /// an older revproxy), when it lacks a name of the state's (added by `ca init --san`),
    /// or when it lacks `extra_san` (the host of the address this proxy advertises to
    /// agents). The id stays the same across reissues.
    pub fn server_identity(
        &self,
        now: OffsetDateTime,
        extra_san: Option<&str>,
    ) -> Result<ServerIdentity, CaError> {
        // Under the directory's lock: the key and the certificate are two files, and
        // another process reissuing them at the same moment must not interleave its pair
        // with ours.
        let _lock = StateFile::new(&self.dir).lock()?;
        let cert_path = self.dir.join(SERVER_CERT_FILE);
        let current = match std::fs::read_to_string(&cert_path) {
            Ok(pem) => {
                let summary = CertSummary::from_pem(&pem).ok_or_else(|| CaError::CorruptState {
                    path: cert_path.clone(),
                    reason: "not a PEM certificate".into(),
                })?;
                Some((pem, summary))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(CaError::io(&cert_path, e)),
        };
        let extra_san = extra_san.and_then(|h| normalize_sans(&[h.to_string()]).ok());
        // Names `ca init --san` added since (perhaps from another proxy on a shared store).
        let recorded = self.state.look(|tx| tx.settings())?.server_sans;
        let (cert_pem, proxy_id) = match current {
            Some((pem, summary))
                if signed_by(&pem, &self.cert_der)
                    && summary.not_after - now.unix_timestamp()
                        >= (SERVER_CERT_TTL.as_secs() / 3) as i64
                    && proxy_id_of(&summary.uris).is_some()
                    && extra_san
                        .as_ref()
                        .is_none_or(|extra| has_san(&summary, &extra[0]))
                    && recorded.iter().all(|san| has_san(&summary, san)) =>
            {
                let id = proxy_id_of(&summary.uris).unwrap_or_default().to_string();
                (pem, id)
            }
            current => {
                let id = current
                    .as_ref()
                    .and_then(|(_, summary)| proxy_id_of(&summary.uris))
                    .map_or_else(|| hex::random(8), str::to_string);
                let mut sans = recorded;
                for extra in extra_san.into_iter().flatten() {
                    if !sans.contains(&extra) {
                        sans.push(extra);
                    }
                }
                (self.write_server_cert(&sans, &id, now)?, id)
            }
        };
        let key_pem = read_private(&self.dir.join(SERVER_KEY_FILE))?;
        Ok(ServerIdentity {
            chain_pem: format!("{cert_pem}{}", self.cert_pem),
            key_pem,
            proxy_id,
        })
    }

    /// The enrollment address tokens name by default, and where it comes from.
    pub fn default_server(&self) -> Result<EnrollmentAddress, CaError> {
        Ok(enrollment_address(&self.state.look(|tx| tx.settings())?))
    }

    /// Records where this proxy listens for agents (`listen`, its bound address) and the
    /// address agents reach it at (`advertised`), for tokens to name. Writes only when
    /// they changed.
    pub fn record_agent_listener(
        &self,
        listen: &str,
        advertised: Option<&str>,
    ) -> Result<(), CaError> {
        let record = AgentListener {
            listen: listen.to_string(),
            advertised: advertised.map(str::to_string),
        };
        self.state.update(|tx| {
            let settings = tx.settings()?;
            if settings.agent_listener.as_ref() != Some(&record) {
                tx.put_settings(Settings {
                    agent_listener: Some(record),
                    ..settings
                })?;
            }
            Ok::<_, CaError>(())
        })
    }

    /// Records the ports agents may be granted (`ports` in the proxy's configuration):
    /// `token create --tcp-port` checks against it. Proxies sharing a store should agree;
    /// the last to start wins. A proxy without a range records nothing.
    pub fn record_ports(&self, range: crate::ports::PortRange) -> Result<(), CaError> {
        self.state.update(|tx| {
            let settings = tx.settings()?;
            if settings.ports != Some(range) {
                tx.put_settings(Settings {
                    ports: Some(range),
                    ..settings
                })?;
            }
            Ok::<_, CaError>(())
        })
    }

    /// Adds `names` to the proxy's server certificate on an existing CA (`ca init --san`
    /// after `serve` created the CA): records them in the state, so that every later
    /// reissue keeps them, and reissues `server.crt` with the same CA key and proxy id,
    /// keeping the names it had. A CA created with the default names (as `serve` does)
    /// takes the first of `names` as its enrollment host.
    pub fn add_server_names(
        &self,
        names: &[String],
        now: OffsetDateTime,
    ) -> Result<NamesAdded, CaError> {
        let names = normalize_sans(names)?;
        let (added, sans) = self.state.update(|tx| {
            let mut state = tx.settings()?;
            let added: Vec<String> = (names.iter())
                .filter(|n| !state.server_sans.contains(n))
                .fold(Vec::new(), |mut added, n| {
                    if !added.contains(n) {
                        added.push(n.clone());
                    }
                    added
                });
            let defaults = state
                .server_sans
                .iter()
                .map(String::as_str)
                .eq(DEFAULT_SANS);
            if !added.is_empty() && defaults && state.server == default_server(DEFAULT_SANS[0]) {
                state.server = default_server(&names[0]);
            }
            state.server_sans.extend(added.iter().cloned());
            let sans = state.server_sans.clone();
            if !added.is_empty() {
                tx.put_settings(state)?;
            }
            Ok::<_, CaError>((added, sans))
        })?;
        let _lock = StateFile::new(&self.dir).lock()?;
        let cert_path = self.dir.join(SERVER_CERT_FILE);
        let current = match std::fs::read_to_string(&cert_path) {
            Ok(pem) => CertSummary::from_pem(&pem).filter(|_| signed_by(&pem, &self.cert_der)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(CaError::io(&cert_path, e)),
        };
        let covered = current
            .as_ref()
            .is_some_and(|c| sans.iter().all(|san| has_san(c, san)));
        if !covered {
            let mut all = sans.clone();
            // Names the certificate has beyond the state's (an advertised host) stay.
            for kept in current.iter().flat_map(|c| {
                (c.dns_names.iter().cloned()).chain(c.ips.iter().map(IpAddr::to_string))
            }) {
                if !all.contains(&kept) {
                    all.push(kept);
                }
            }
            let id = (current.as_ref())
                .and_then(|c| proxy_id_of(&c.uris))
                .map_or_else(|| hex::random(8), str::to_string);
            self.write_server_cert(&all, &id, now)?;
        }
        Ok(NamesAdded {
            added,
            sans,
            reissued: !covered,
        })
    }

    /// Issues a new server certificate with a new key for `sans` and `proxy_id`, writes
    /// both, and returns the certificate.
    pub(crate) fn write_server_cert(
        &self,
        sans: &[String],
        proxy_id: &str,
        now: OffsetDateTime,
    ) -> Result<String, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut names = sans
            .iter()
            .map(|s| match s.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => Ok(SanType::DnsName(s.clone().try_into()?)),
            })
            .collect::<Result<Vec<_>, rcgen::Error>>()?;
        names.push(SanType::URI(
            proxy_uri(&self.trust_domain, proxy_id).try_into()?,
        ));
        let params = profile::leaf(
            "revproxy proxy",
            names,
            ExtendedKeyUsagePurpose::ServerAuth,
            now,
            SERVER_CERT_TTL,
        );
        let cert = params.signed_by(&key, &self.issuer()?)?;
        // Key before certificate: a crash in between leaves a key whose certificate is the
        // old one, which `server_identity` detects as mismatched only if we let it; so the
        // certificate is always reissued together with its key here.
        self.write(
            SERVER_KEY_FILE,
            key.serialize_pem().as_bytes(),
            fsutil::PRIVATE_FILE_MODE,
        )?;
        self.write(
            SERVER_CERT_FILE,
            cert.pem().as_bytes(),
            fsutil::PUBLIC_FILE_MODE,
        )?;
        Ok(cert.pem())
    }
}

/// What [`Ca::add_server_names`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamesAdded {
    /// The names that were new.
    pub added: Vec<String>,
    /// Every name the state now records for the server certificate.
    pub sans: Vec<String>,
    /// Whether `server.crt` was reissued (it was not when it named them all already).
    pub reissued: bool,
}

/// The address a token names when `token create` is given no `--server`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EnrollmentAddress {
    /// Where the proxy said agents reach it: its `advertise`, or its agent listener.
    Advertised(String),
    /// The proxy listens on every address (`listen`, a wildcard): the CA's enrollment host
    /// with that listener's port.
    Wildcard { address: String, listen: String },
    /// No proxy has recorded where it listens: the address chosen at `ca init`.
    Initial(String),
}

impl EnrollmentAddress {
    /// The `host:port` itself.
    pub fn address(&self) -> &str {
        match self {
            EnrollmentAddress::Advertised(a)
            | EnrollmentAddress::Wildcard { address: a, .. }
            | EnrollmentAddress::Initial(a) => a,
        }
    }
}

/// Where tokens of `state` point by default: the advertised address a proxy recorded,
/// else the `ca init` host with the recorded listener's port, else the `ca init` address.
pub(crate) fn enrollment_address(state: &Settings) -> EnrollmentAddress {
    match &state.agent_listener {
        Some(AgentListener {
            advertised: Some(a),
            ..
        }) => EnrollmentAddress::Advertised(a.clone()),
        Some(AgentListener { listen, .. }) => {
            let host = state.server.rsplit_once(':').map_or("", |(h, _)| h);
            match listen.rsplit_once(':') {
                Some((_, port)) if !host.is_empty() => EnrollmentAddress::Wildcard {
                    address: format!("{host}:{port}"),
                    listen: listen.clone(),
                },
                _ => EnrollmentAddress::Initial(state.server.clone()),
            }
        }
        None => EnrollmentAddress::Initial(state.server.clone()),
    }
}

/// Whether a certificate names `san` (a DNS name, or an IP address).
fn has_san(cert: &CertSummary, san: &str) -> bool {
    match san.parse::<IpAddr>() {
        Ok(ip) => cert.ips.contains(&ip),
        Err(_) => cert.dns_names.iter().any(|d| d == san),
    }
}

/// Normalizes the server certificate's names: IP addresses, or DNS names without wildcards.
pub(crate) fn normalize_sans(sans: &[String]) -> Result<Vec<String>, CaError> {
    if sans.is_empty() {
        return Err(CaError::InvalidInput("give at least one --san".into()));
    }
    sans.iter()
        .map(|s| match s.parse::<IpAddr>() {
            Ok(ip) => Ok(ip.to_string()),
            Err(_) => normalize_host(s)
                .ok()
                .filter(|h| !h.starts_with('*'))
                .ok_or_else(|| {
                    CaError::InvalidInput(format!(
                        "invalid --san {s:?}: expected a DNS name or an IP address"
                    ))
                }),
        })
        .collect()
}

/// `host:port` for a SAN, bracketing IPv6 addresses.
pub(crate) fn default_server(san: &str) -> String {
    match san.parse::<IpAddr>() {
        Ok(IpAddr::V6(ip)) => format!("[{ip}]:{DEFAULT_AGENT_PORT}"),
        _ => format!("{san}:{DEFAULT_AGENT_PORT}"),
    }
}

/// Checks a `host:port` enrollment address.
pub fn validate_server(s: &str) -> Result<String, CaError> {
    let bad = || {
        CaError::InvalidInput(format!(
            "invalid server address {s:?}: expected HOST:PORT, e.g. proxy.example.com:{DEFAULT_AGENT_PORT}"
        ))
    };
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    port.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(bad)?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.parse::<IpAddr>().is_err() && normalize_host(host).is_err() {
        return Err(bad());
    }
    Ok(s.to_string())
}
