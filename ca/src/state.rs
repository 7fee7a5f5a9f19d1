//! The proxy's persistent state as one document ([`State`]): tokens, issued certificates,
//! agent grants. It is what a store exports whole (a proxy's snapshot, `store migrate`),
//! and what release 0.1 kept: `state.json`, its file store, which the embedded store
//! (`sqlite.rs`) migrates, and the single row of its PostgreSQL store, which the schema's
//! version 2 moves into tables.
//!
//! [`StateFile`] reads `state.json` to migrate it, and holds the directory's exclusive
//! `flock` on `state.lock`, which serializes `ca init` and migrations of the state
//! directory.
//!
//! Fields added later are optional (`serde(default)`), and readers ignore fields they do not
//! know, so that an older revproxy keeps reading the state a newer one wrote (two versions
//! side by side during an upgrade, or a rollback). An older writer drops what it does not
//! know: additions must be safe to lose.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions, TryLockError};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::CaError;
use crate::fsutil;

/// File name of the state document.
pub const STATE_FILE: &str = "state.json";
/// What `revproxy store migrate` renames the state file to, so that no proxy serves from
/// the stale copy.
pub const MIGRATED_FILE: &str = "state.json.migrated";
/// Where the state file waits while `revproxy store migrate` copies it.
pub const MIGRATING_FILE: &str = "state.json.migrating";
/// File name of the lock file.
pub const LOCK_FILE: &str = "state.lock";
/// How long to wait for another process holding the lock.
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(10);
/// Records of expired certificates and spent tokens are dropped this long after they stop
/// mattering, so the state stays small over years of renewals.
pub const RETENTION_SECS: i64 = 7 * 24 * 3600;

/// Seconds since the Unix epoch.
pub type Unix = i64;

/// The whole state document.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Format version of this document.
    pub version: u32,
    /// SPIFFE trust domain of agent identities.
    pub trust_domain: String,
    /// Default enrollment address written into tokens (`host:port`).
    pub server: String,
    /// DNS names and IP addresses of the proxy's server certificate.
    pub server_sans: Vec<String>,
    /// Enrollment tokens by creation order.
    pub tokens: Vec<TokenRecord>,
    /// Certificates issued to agents.
    pub certs: Vec<CertRecord>,
    /// What each agent is currently allowed to serve, by agent name.
    pub agents: BTreeMap<String, AgentGrant>,
    /// Access rules: which names each agent may reach through its tunnel (default deny).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub access: BTreeMap<String, Vec<String>>,
    /// Pin of the CA this state belongs to (`sha256/...`): a proxy whose `ca.key` is
    /// another CA's refuses to serve from it. Absent in states written before stores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pin: Option<String>,
    /// Certificates issued to operators, for the admin listener.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub operators: Vec<OperatorRecord>,
    /// Where the last proxy to start on this state listens for agents: tokens name it
    /// unless `--server` says otherwise. Absent until a proxy has started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_listener: Option<AgentListener>,
    /// Names whose TLS the proxy terminates (DESIGN.md section 10), by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tls: BTreeMap<String, TlsRecord>,
    /// The proxies' ACME accounts, by directory URL: their credentials (which hold the
    /// account key), sealed ([`crate::Sealer`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub acme_accounts: BTreeMap<String, String>,
    /// The ports agents may be granted, as the last proxy configured with a range
    /// recorded it ([`crate::ports`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<crate::ports::PortRange>,
}

/// Where a proxy listens for agents, as it recorded at start.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentListener {
    /// The agent listener's own address, a wildcard such as `0.0.0.0:7443` included.
    pub listen: String,
    /// The address agents reach it at: its `advertise`, else `listen` when that is not a
    /// wildcard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertised: Option<String>,
}

/// One operator certificate: it opens the admin listener when that is not on loopback.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorRecord {
    /// Hex serial number.
    pub serial: String,
    pub name: String,
    pub not_before: Unix,
    pub not_after: Unix,
    pub revoked_at: Option<Unix>,
}

/// One enrollment token. The secret itself is never stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: String,
    pub agent: String,
    pub hosts: Vec<String>,
    /// Hex SHA-256 of the secret.
    pub secret_sha256: String,
    pub created: Unix,
    pub expires: Unix,
    /// Lifetime of the certificate this token buys, in seconds.
    pub cert_ttl_secs: i64,
    pub revoked: bool,
    pub used: Option<Traded>,
    /// Names granted for private serving only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub private_hosts: Vec<String>,
    /// Names the enrolled agent may reach (added to the access rules at enrollment).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub connect: Vec<String>,
}

/// When, for which key and as which certificate a token was spent or a certificate renewed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traded {
    pub at: Unix,
    /// Hex SHA-256 of the CSR's SubjectPublicKeyInfo: a retry with the same key gets the
    /// same certificate back.
    pub spki_sha256: String,
    /// Serial of the certificate issued.
    pub serial: String,
}

/// One issued agent certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertRecord {
    /// Hex serial number.
    pub serial: String,
    pub agent: String,
    pub hosts: Vec<String>,
    pub not_before: Unix,
    pub not_after: Unix,
    pub revoked_at: Option<Unix>,
    /// The certificate, kept to answer a retried enrollment or renewal.
    pub pem: String,
    /// Its successor, once it was renewed: each certificate is renewed at most once (a
    /// retry with the same key gets the same successor back). Losing it (an older writer)
    /// would only allow one more renewal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renewed: Option<Traded>,
}

/// A name whose TLS the proxy terminates, with the certificate it serves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsRecord {
    /// The exact name (never a wildcard).
    pub name: String,
    /// Where its certificate comes from.
    pub source: TlsSource,
    /// Plain HTTP to the name is served as before, not redirected to https.
    #[serde(default)]
    pub keep_http: bool,
    /// The certificate chain served (PEM, the name's certificate first); none yet while
    /// one is being ordered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain_pem: Option<String>,
    /// Its private key, sealed with the key only proxies hold ([`crate::Sealer`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_sealed: Option<String>,
    /// When the certificate expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<Unix>,
    /// Why the last attempt to get or reload its certificate failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When this record last changed.
    pub updated: Unix,
    /// Where ordering its certificate from ACME stands (empty for the operator's files).
    #[serde(default, skip_serializing_if = "AcmeProgress::is_idle")]
    pub acme: AcmeProgress,
}

/// Where ordering a name's certificate from ACME stands, shared by every proxy.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcmeProgress {
    /// The proxy ordering it now: no other orders it until the lease ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<Lease>,
    /// The answer the ACME server may ask any proxy for now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub challenge: Option<Challenge>,
    /// Orders that failed since the last certificate.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub failures: u32,
    /// No order before then (backing off after failures).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<Unix>,
}

impl AcmeProgress {
    /// Nothing under way and nothing to wait for.
    pub fn is_idle(&self) -> bool {
        self == &AcmeProgress::default()
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// A proxy's hold on ordering one name's certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The proxy's id.
    pub holder: String,
    pub until: Unix,
}

/// A pending ACME challenge's answer (nothing in it is secret: the ACME server publishes
/// what it checks).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum Challenge {
    /// On the HTTP listener: `GET /.well-known/acme-challenge/TOKEN` answers the key
    /// authorization.
    #[serde(rename = "http-01")]
    Http01 {
        token: String,
        key_authorization: String,
    },
    /// On the SNI listener: a ClientHello offering only `acme-tls/1` gets a certificate
    /// carrying this SHA-256 of the key authorization (hex).
    #[serde(rename = "tls-alpn-01")]
    TlsAlpn01 { digest: String },
}

/// Where a terminated name's certificate comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum TlsSource {
    /// Ordered from the ACME CA in the proxies' `[acme]`.
    Acme,
    /// The operator's files (absolute paths): a proxy that can read them serves their
    /// contents again when they change.
    File { cert: String, key: String },
}

impl TlsSource {
    /// `acme` or `file`, as `tls list` says.
    pub fn label(&self) -> &'static str {
        match self {
            TlsSource::Acme => "acme",
            TlsSource::File { .. } => "file",
        }
    }
}

/// The names an agent may serve now (an operator may narrow this without reissuing).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentGrant {
    /// Served to public clients.
    pub hosts: Vec<String>,
    /// Served only to enrolled identities the access rules let in; never routed from a
    /// public listener.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub private: Vec<String>,
}

impl State {
    /// Current document format.
    pub const VERSION: u32 = 1;

    /// Drops records that can no longer matter: certificates expired for a week (revocation
    /// of an expired certificate changes nothing) and tokens expired or spent a week ago.
    pub fn prune(&mut self, now: Unix) {
        let horizon = now - RETENTION_SECS;
        self.certs.retain(|c| c.not_after > horizon);
        self.operators.retain(|o| o.not_after > horizon);
        self.tokens.retain(|t| {
            let ended = t.used.as_ref().map_or(t.expires, |u| u.at.min(t.expires));
            ended > horizon
        });
    }
}

/// Handle on `state.json` and its lock in one state directory.
#[derive(Clone, Debug)]
pub struct StateFile {
    dir: PathBuf,
}

impl StateFile {
    pub fn new(dir: &Path) -> StateFile {
        StateFile {
            dir: dir.to_path_buf(),
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// Reads the state.
    pub fn read(&self) -> Result<State, CaError> {
        // No lock: `state.json` is only ever replaced whole, by rename, so a reader sees
        // one complete version or the next. Readers (a proxy under a handshake flood reads
        // it for every tunnel) therefore never hold up a writer such as `cert revoke`.
        self.load()
    }

    fn load(&self) -> Result<State, CaError> {
        let path = self.path();
        let bytes = std::fs::read(&path).map_err(|e| CaError::io(&path, e))?;
        let state: State = serde_json::from_slice(&bytes).map_err(|e| CaError::CorruptState {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if state.version != State::VERSION {
            return Err(CaError::CorruptState {
                path,
                reason: format!(
                    "format version {} is not {} (written by another revproxy version?)",
                    state.version,
                    State::VERSION
                ),
            });
        }
        Ok(state)
    }

    /// Writes `state`; the caller holds the lock. (Only tests write `state.json` now.)
    #[cfg(test)]
    pub(crate) fn store(&self, state: &State) -> Result<(), CaError> {
        let path = self.path();
        let bytes = serde_json::to_vec_pretty(state).expect("state serializes");
        fsutil::write_atomic(&path, &bytes, fsutil::PRIVATE_FILE_MODE)
            .map_err(|e| CaError::io(&path, e))
    }

    /// Takes the exclusive lock; it is released when the file is dropped.
    pub fn lock(&self) -> Result<File, CaError> {
        let path = self.dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(fsutil::PRIVATE_FILE_MODE)
            .open(&path)
            .map_err(|e| CaError::io(&path, e))?;
        let deadline = Instant::now() + LOCK_TIMEOUT;
        let mut pause = Duration::from_millis(1);
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(file),
                Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(50));
                }
                Err(TryLockError::WouldBlock) => return Err(CaError::Locked(self.dir.clone())),
                Err(TryLockError::Error(e)) => return Err(CaError::io(&path, e)),
            }
        }
    }
}

impl From<CaError> for io::Error {
    fn from(e: CaError) -> io::Error {
        io::Error::other(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A state written before renewals were recorded loads, and so does one written by a
    /// newer version with fields this one does not know.
    #[test]
    fn older_and_newer_documents_load() {
        let doc = |extra: &str| {
            format!(
                r#"{{"version": 1, "trust_domain": "revproxy.local", "server": "localhost:7443",
                "server_sans": ["localhost"], "tokens": [], "agents": {{}}{extra},
                "certs": [{{"serial": "4a", "agent": "web-1", "hosts": ["app.example.com"],
                "not_before": 0, "not_after": 100, "revoked_at": null, "pem": "x"{extra}}}]}}"#
            )
        };
        let old: State = serde_json::from_str(&doc("")).unwrap();
        assert_eq!(old.certs[0].renewed, None);
        let newer: State = serde_json::from_str(&doc(r#", "from_the_future": [1, 2]"#)).unwrap();
        assert_eq!(newer, old);
    }

    /// A proxy reads the state for every tunnel it admits; a writer (`revproxy cert revoke`)
    /// holding the lock must not make those reads wait, nor the reads the writer.
    #[test]
    fn reads_take_no_lock() {
        let dir = tempfile::tempdir().unwrap();
        let file = StateFile::new(dir.path());
        file.store(&State {
            version: State::VERSION,
            ..State::default()
        })
        .unwrap();
        let held = file.lock().unwrap();
        let started = Instant::now();
        assert_eq!(file.read().unwrap().version, State::VERSION);
        assert!(
            started.elapsed() < LOCK_TIMEOUT / 2,
            "the read waited for the lock"
        );
        drop(held);
    }
}
