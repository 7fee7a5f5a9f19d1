//! The proxy as agents see it: its server certificate (issued and reissued here), its proxy
//! id, its names and the enrollment address tokens carry. Agent certificates are `issue.rs`.

use std::net::IpAddr;
use std::time::Duration;

use rcgen::{ExtendedKeyUsagePurpose, KeyPair, SanType};
use time::OffsetDateTime;

use crate::ca::{read_private, Ca, SERVER_CERT_FILE, SERVER_KEY_FILE};
use crate::cert::{signed_by, CertSummary};
use crate::error::CaError;
use crate::names::normalize_host;
use crate::state::StateFile;
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
    /// an older revproxy), or when it lacks `extra_san` (the host of the address this
    /// proxy advertises to agents). The id stays the same across reissues.
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
        let (cert_pem, proxy_id) = match current {
            Some((pem, summary))
                if signed_by(&pem, &self.cert_der)
                    && summary.not_after - now.unix_timestamp()
                        >= (SERVER_CERT_TTL.as_secs() / 3) as i64
                    && proxy_id_of(&summary.uris).is_some()
                    && extra_san
                        .as_ref()
                        .is_none_or(|extra| has_san(&summary, &extra[0])) =>
            {
                let id = proxy_id_of(&summary.uris).unwrap_or_default().to_string();
                (pem, id)
            }
            current => {
                let id = current
                    .as_ref()
                    .and_then(|(_, summary)| proxy_id_of(&summary.uris))
                    .map_or_else(|| hex::random(8), str::to_string);
                let mut sans = self.state.read()?.server_sans;
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

    /// The enrollment address tokens name by default.
    pub fn default_server(&self) -> Result<String, CaError> {
        Ok(self.state.read()?.server)
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
