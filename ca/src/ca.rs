//! The certificate authority on disk: its key and certificate, the proxy's own server
//! certificate, and the state file beside them. What operator commands change is in
//! `records.rs`; issuing agent certificates (enrollment, renewal) is in `issue.rs`.
//!
//! Files in a proxy state directory:
//!
//! | file          | mode | what |
//! |---------------|------|------|
//! | `ca.key`      | 0600 | CA private key (ECDSA P-256). Back it up: it cannot be recovered. |
//! | `ca.crt`      | 0644 | self-signed CA certificate |
//! | `server.key`  | 0600 | the agent listener's TLS key |
//! | `server.crt`  | 0644 | the agent listener's certificate, signed by the CA |
//! | `state.json`  | 0600 | tokens (hashed secrets), issued certificates, agent grants |
//! | `state.lock`  | 0600 | lock serializing changes between processes |
//!
//! `ca.key` is written last by [`Ca::init`]: its presence is what marks the CA as existing,
//! so an interrupted `init` can simply be run again.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
};
use ring::rand::{SecureRandom, SystemRandom};
use time::OffsetDateTime;

use crate::error::CaError;
use crate::issue::random_serial;
use crate::names::normalize_host;
use crate::pin::Pin;
use crate::state::{State, StateFile, Unix};
use crate::store::Store;
use crate::token::Secret;
use crate::{fsutil, hex};

pub const CA_KEY_FILE: &str = "ca.key";
pub const CA_CERT_FILE: &str = "ca.crt";
pub const SERVER_KEY_FILE: &str = "server.key";
pub const SERVER_CERT_FILE: &str = "server.crt";

/// Port of the agent listener unless configured otherwise.
pub const DEFAULT_AGENT_PORT: u16 = 7443;
/// SPIFFE trust domain unless `--trust-domain` says otherwise.
pub const DEFAULT_TRUST_DOMAIN: &str = "revproxy.local";
/// Names in the proxy's server certificate unless `--san` says otherwise.
pub const DEFAULT_SANS: [&str; 2] = ["localhost", "127.0.0.1"];
/// How long an enrollment token stays valid by default.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);
/// Longest token lifetime accepted: tokens are meant to be used right away.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// Lifetime of agent certificates by default.
pub const DEFAULT_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Bounds of agent certificate lifetimes accepted from operators (`--cert-ttl`).
pub const MIN_CERT_TTL: Duration = Duration::from_secs(3600);
pub const MAX_CERT_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// A retried enrollment (same token, same key) this soon after the first gets the same
/// certificate back instead of "token already used": the first answer may have been lost.
pub const REISSUE_WINDOW: Duration = Duration::from_secs(5 * 60);
/// Part of a certificate's lifetime, in percent, that must pass before it may be renewed.
/// Agents renew at about two thirds; this leaves room for their clocks to run a sixth of
/// the lifetime ahead (four hours of a day-long certificate).
pub const MIN_RENEWAL_AGE_PERCENT: u8 = 50;
/// Certificates are valid from this long before they are issued, against clock skew.
pub const BACKDATE: Duration = Duration::from_secs(60);
/// Lifetime of the CA certificate.
pub const CA_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Lifetime of the proxy's server certificate; it is reissued when a third is left.
pub const SERVER_CERT_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// Longest accepted CSR, in bytes of PEM.
pub const MAX_CSR_LEN: usize = 16 * 1024;
/// Most names one token may grant.
pub const MAX_HOSTS: usize = 100;

/// Options of `revproxy ca init`.
#[derive(Clone, Debug)]
pub struct InitOptions {
    /// DNS names and IP addresses for the proxy's server certificate.
    pub sans: Vec<String>,
    /// SPIFFE trust domain of agent identities.
    pub trust_domain: String,
    /// Enrollment address put into tokens; defaults to the first SAN and the default port.
    pub server: Option<String>,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            sans: DEFAULT_SANS.iter().map(|s| s.to_string()).collect(),
            trust_domain: DEFAULT_TRUST_DOMAIN.into(),
            server: None,
        }
    }
}

/// What to mint with [`Ca::create_token`].
#[derive(Clone, Debug)]
pub struct NewToken {
    pub agent: String,
    /// Names the agent may serve to public clients.
    pub hosts: Vec<String>,
    /// Names the agent may serve only to enrolled identities with access (never routed
    /// from a public listener).
    pub private_hosts: Vec<String>,
    /// Names the agent may reach through its tunnel (access rules granted at enrollment).
    pub connect: Vec<String>,
    pub ttl: Duration,
    pub cert_ttl: Duration,
    /// Enrollment address to put into the token instead of the state's default.
    pub server: Option<String>,
}

/// A token as `revproxy token list` shows it. Never carries the secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenInfo {
    pub id: String,
    pub agent: String,
    pub hosts: Vec<String>,
    pub expires: Unix,
    pub state: TokenState,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenState {
    Unused,
    Used,
    Expired,
    Revoked,
}

impl TokenState {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenState::Unused => "unused",
            TokenState::Used => "used",
            TokenState::Expired => "expired",
            TokenState::Revoked => "revoked",
        }
    }
}

/// A certificate as `revproxy cert list` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    pub serial: String,
    pub agent: String,
    pub hosts: Vec<String>,
    pub not_before: Unix,
    pub not_after: Unix,
    pub state: CertState,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertState {
    Valid,
    /// Within the last third of its lifetime: renewal is due.
    Expiring,
    Expired,
    Revoked,
}

impl CertState {
    pub fn as_str(self) -> &'static str {
        match self {
            CertState::Valid => "valid",
            CertState::Expiring => "expiring",
            CertState::Expired => "expired",
            CertState::Revoked => "revoked",
        }
    }
}

/// An enrollment request as received from an agent.
#[derive(Debug)]
pub struct EnrollRequest<'a> {
    pub token_id: &'a str,
    pub secret: &'a Secret,
    pub csr_pem: &'a str,
}

/// The outcome of a successful enrollment.
#[derive(Clone, Debug)]
pub struct Enrolled {
    pub agent: String,
    pub identity: String,
    pub hosts: Vec<String>,
    pub serial: String,
    pub not_after: Unix,
    pub cert_pem: String,
    pub ca_pem: String,
    /// True when this answered a retry with the certificate issued before.
    pub reissued: bool,
}

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

/// An open CA: its key in memory, its state in a [`Store`].
pub struct Ca {
    pub(crate) dir: PathBuf,
    pub(crate) state: Arc<dyn Store>,
    pub(crate) key: KeyPair,
    pub(crate) cert_der: Vec<u8>,
    pub(crate) cert_pem: String,
    pub(crate) pin: Pin,
    pub(crate) trust_domain: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("dir", &self.dir)
            .field("pin", &self.pin)
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// Whether `dir` holds a CA, or what is left of one (any of its files): then `init`
    /// refuses, so a missing `ca.key` is restored from backup rather than replaced.
    pub fn exists(dir: &Path) -> bool {
        [CA_KEY_FILE, CA_CERT_FILE, crate::state::STATE_FILE]
            .iter()
            .any(|f| dir.join(f).exists())
    }

    /// Creates a new CA, its server certificate and an empty state in `dir`.
    pub fn init(dir: &Path, opts: &InitOptions, now: OffsetDateTime) -> Result<Ca, CaError> {
        Ca::init_in(dir, Arc::new(StateFile::new(dir)), opts, now)
    }

    /// Creates a new CA in `dir` (its key and certificate, the server certificate) with its
    /// state in `store`, which must hold none yet.
    pub fn init_in(
        dir: &Path,
        store: Arc<dyn Store>,
        opts: &InitOptions,
        now: OffsetDateTime,
    ) -> Result<Ca, CaError> {
        if Ca::exists(dir) {
            return Err(CaError::AlreadyInitialized(dir.to_path_buf()));
        }
        let trust_domain = normalize_host(&opts.trust_domain)
            .ok()
            .filter(|d| !d.starts_with('*'))
            .ok_or_else(|| {
                CaError::InvalidInput(format!(
                    "invalid trust domain {:?}: expected a DNS name like example.org",
                    opts.trust_domain
                ))
            })?;
        let sans = normalize_sans(&opts.sans)?;
        let server = match &opts.server {
            Some(s) => validate_server(s)?,
            None => default_server(&sans[0]),
        };
        fsutil::create_private_dir(dir).map_err(|e| CaError::io(dir, e))?;
        check_dir(dir)?;
        // Two `init`s racing: the lock makes the second see the first's files and refuse.
        let _lock = StateFile::new(dir).lock()?;
        if Ca::exists(dir) {
            return Err(CaError::AlreadyInitialized(dir.to_path_buf()));
        }
        if store.has_state()? {
            return Err(CaError::StoreHoldsState(store.describe()));
        }

        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("revproxy CA {trust_domain}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = now - BACKDATE;
        params.not_after = now + CA_TTL;
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;

        let pin = Pin::from_spki(&key.subject_public_key_info());
        let ca = Ca {
            dir: dir.to_path_buf(),
            state: store,
            pin,
            cert_der: cert.der().to_vec(),
            cert_pem: cert.pem(),
            key,
            trust_domain: trust_domain.clone(),
        };
        ca.write_server_cert(&sans, &random_hex(8), now)?;
        ca.write(
            CA_CERT_FILE,
            ca.cert_pem.as_bytes(),
            fsutil::PUBLIC_FILE_MODE,
        )?;
        ca.state.create(&State {
            version: State::VERSION,
            trust_domain,
            server,
            server_sans: sans,
            ca_pin: Some(pin.to_string()),
            ..State::default()
        })?;
        // Last: from here on the CA exists.
        ca.write(
            CA_KEY_FILE,
            ca.key.serialize_pem().as_bytes(),
            fsutil::PRIVATE_FILE_MODE,
        )?;
        Ok(ca)
    }

    /// Opens the CA in `dir`, refusing private files that others can read.
    pub fn open(dir: &Path) -> Result<Ca, CaError> {
        if !dir.join(crate::state::STATE_FILE).exists() && dir.join(CA_KEY_FILE).exists() {
            let migrated = [crate::state::MIGRATED_FILE, crate::state::MIGRATING_FILE]
                .iter()
                .any(|f| dir.join(f).exists());
            return Err(if migrated {
                CaError::Migrated(dir.to_path_buf())
            } else {
                CaError::NoStateFile(dir.to_path_buf())
            });
        }
        Ca::open_in(dir, Arc::new(StateFile::new(dir)))
    }

    /// Opens the CA whose key and certificate are in `dir` and whose state is in `store`:
    /// refuses a store that holds another CA's state.
    pub fn open_in(dir: &Path, store: Arc<dyn Store>) -> Result<Ca, CaError> {
        if !dir.join(CA_KEY_FILE).exists() {
            if Ca::exists(dir) {
                return Err(CaError::MissingKey(dir.to_path_buf()));
            }
            return Err(CaError::NotInitialized(dir.to_path_buf()));
        }
        check_dir(dir)?;
        let key_pem = read_private(&dir.join(CA_KEY_FILE))?;
        let key = KeyPair::from_pem(&key_pem)?;
        let cert_path = dir.join(CA_CERT_FILE);
        let cert_pem =
            std::fs::read_to_string(&cert_path).map_err(|e| CaError::io(&cert_path, e))?;
        let cert_der =
            pem_to_der(&cert_pem, "CERTIFICATE").ok_or_else(|| CaError::CorruptState {
                path: cert_path.clone(),
                reason: "not a PEM certificate".into(),
            })?;
        let pin = Pin::from_cert_der(&cert_der).ok_or_else(|| CaError::CorruptState {
            path: cert_path.clone(),
            reason: "cannot parse certificate".into(),
        })?;
        if pin != Pin::from_spki(&key.subject_public_key_info()) {
            return Err(CaError::CorruptState {
                path: cert_path,
                reason: "it does not match ca.key".into(),
            });
        }
        let state = store.read()?;
        if state.ca_pin.is_none() && store.shared() {
            return Err(CaError::CorruptState {
                path: store.describe().into(),
                reason: "it records no CA pin, so nothing tells whose CA it belongs to".into(),
            });
        }
        if let Some(store_pin) = state.ca_pin.filter(|p| *p != pin.to_string()) {
            return Err(CaError::WrongCa {
                dir: dir.to_path_buf(),
                dir_pin: pin.to_string(),
                store: store.describe(),
                store_pin,
            });
        }
        let trust_domain = state.trust_domain;
        Ok(Ca {
            dir: dir.to_path_buf(),
            state: store,
            key,
            cert_der,
            cert_pem,
            pin,
            trust_domain,
        })
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA pin agents check the proxy against.
    pub fn pin(&self) -> Pin {
        self.pin
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The SPIFFE identity of agent `name`.
    pub fn identity_of(&self, name: &str) -> String {
        format!("spiffe://{}/agent/{name}", self.trust_domain)
    }

    /// Where the state lives, for readers such as the proxy's revocation watch.
    pub fn state(&self) -> &Arc<dyn Store> {
        &self.state
    }

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
                let summary = crate::cert::CertSummary::from_pem(&pem).ok_or_else(|| {
                    CaError::CorruptState {
                        path: cert_path.clone(),
                        reason: "not a PEM certificate".into(),
                    }
                })?;
                Some((pem, summary))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(CaError::io(&cert_path, e)),
        };
        let extra_san = extra_san.and_then(|h| normalize_sans(&[h.to_string()]).ok());
        let (cert_pem, proxy_id) = match current {
            Some((pem, summary))
                if crate::cert::signed_by(&pem, &self.cert_der)
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
                    .map_or_else(|| random_hex(8), str::to_string);
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

    fn write_server_cert(
        &self,
        sans: &[String],
        proxy_id: &str,
        now: OffsetDateTime,
    ) -> Result<String, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "revproxy proxy");
        params.subject_alt_names = sans
            .iter()
            .map(|s| match s.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => Ok(SanType::DnsName(s.clone().try_into()?)),
            })
            .collect::<Result<Vec<_>, rcgen::Error>>()?;
        params.subject_alt_names.push(SanType::URI(
            proxy_uri(&self.trust_domain, proxy_id).try_into()?,
        ));
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = now - BACKDATE;
        params.not_after = now + SERVER_CERT_TTL;
        params.serial_number = Some(random_serial());
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

    pub(crate) fn issuer(&self) -> Result<Issuer<'static, &KeyPair>, CaError> {
        Ok(Issuer::from_ca_cert_der(
            &self.cert_der.clone().into(),
            &self.key,
        )?)
    }

    fn write(&self, name: &str, contents: &[u8], mode: u32) -> Result<(), CaError> {
        let path = self.dir.join(name);
        fsutil::write_atomic(&path, contents, mode).map_err(|e| CaError::io(&path, e))
    }
}

/// Whether a certificate names `san` (a DNS name, or an IP address).
fn has_san(cert: &crate::cert::CertSummary, san: &str) -> bool {
    match san.parse::<IpAddr>() {
        Ok(ip) => cert.ips.contains(&ip),
        Err(_) => cert.dns_names.iter().any(|d| d == san),
    }
}

/// Refuses a state directory that others can write to or that another user owns: whoever
/// can write there can replace the CA.
fn check_dir(dir: &Path) -> Result<(), CaError> {
    match fsutil::unsafe_dir(dir).map_err(|e| CaError::io(dir, e))? {
        Some(fsutil::DirProblem::Writable(mode)) => Err(CaError::WritableDir {
            path: dir.to_path_buf(),
            mode,
        }),
        Some(fsutil::DirProblem::Owner { owner, me }) => Err(CaError::ForeignOwner {
            path: dir.to_path_buf(),
            owner,
            me,
        }),
        None => Ok(()),
    }
}

pub(crate) fn read_private(path: &Path) -> Result<String, CaError> {
    if let Some(mode) = fsutil::exposed_mode(path).map_err(|e| CaError::io(path, e))? {
        return Err(CaError::InsecurePermissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    std::fs::read_to_string(path).map_err(|e| CaError::io(path, e))
}

pub(crate) fn normalize_hosts(hosts: &[String]) -> Result<Vec<String>, CaError> {
    if hosts.is_empty() || hosts.len() > MAX_HOSTS {
        return Err(CaError::InvalidInput(format!(
            "give between 1 and {MAX_HOSTS} host names with --host"
        )));
    }
    normalize_names(hosts)
}

/// Normalizes names (any number up to [`MAX_HOSTS`]), dropping repeats.
pub(crate) fn normalize_names(hosts: &[String]) -> Result<Vec<String>, CaError> {
    if hosts.len() > MAX_HOSTS {
        return Err(CaError::InvalidInput(format!(
            "give at most {MAX_HOSTS} names"
        )));
    }
    let mut out = Vec::with_capacity(hosts.len());
    for h in hosts {
        let h = normalize_host(h).map_err(|e| CaError::InvalidInput(e.to_string()))?;
        if !out.contains(&h) {
            out.push(h);
        }
    }
    Ok(out)
}

fn normalize_sans(sans: &[String]) -> Result<Vec<String>, CaError> {
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
fn default_server(san: &str) -> String {
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

pub(crate) fn random_hex(len: usize) -> String {
    let mut bytes = vec![0u8; len];
    SystemRandom::new()
        .fill(&mut bytes)
        .expect("the OS random number generator failed");
    hex::encode(&bytes)
}

/// Decodes the first PEM block with the given label.
pub fn pem_to_der(pem: &str, label: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = pem.find(&begin)? + begin.len();
    let stop = start + pem[start..].find(&end)?;
    let body: String = pem[start..stop].split_whitespace().collect();
    base64::engine::general_purpose::STANDARD.decode(body).ok()
}

/// The validity period (not-before, not-after) of the first certificate in `pem`.
pub fn validity(pem: &str) -> Option<(Unix, Unix)> {
    crate::cert::CertSummary::from_pem(pem).map(|c| (c.not_before, c.not_after))
}
