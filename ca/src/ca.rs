//! The certificate authority on disk: its key and certificate, opened or created beside its
//! state. Not here: the proxy's server certificate (`server.rs`), issuing agent
//! certificates (`issue.rs`), and what operator commands change (`tokens.rs`, `certs.rs`,
//! `grants.rs`).
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

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{Issuer, KeyPair, PublicKeyData};
use time::OffsetDateTime;

use crate::cert::pem_to_der;
use crate::error::CaError;
use crate::names::normalize_host;
use crate::pin::Pin;
use crate::server::{default_server, normalize_sans, validate_server};
use crate::sqlite::SqliteStore;
use crate::state::{State, StateFile};
use crate::store::Store;
use crate::{fsutil, hex, profile};

pub const CA_KEY_FILE: &str = "ca.key";
pub const CA_CERT_FILE: &str = "ca.crt";
pub const SERVER_KEY_FILE: &str = "server.key";
pub const SERVER_CERT_FILE: &str = "server.crt";

/// SPIFFE trust domain unless `--trust-domain` says otherwise.
pub const DEFAULT_TRUST_DOMAIN: &str = "revproxy.local";
/// Names in the proxy's server certificate unless `--san` says otherwise.
pub const DEFAULT_SANS: [&str; 2] = ["localhost", "127.0.0.1"];

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
        [
            CA_KEY_FILE,
            CA_CERT_FILE,
            crate::state::STATE_FILE,
            crate::sqlite::DB_FILE,
        ]
        .iter()
        .any(|f| dir.join(f).exists())
    }

    /// Creates a new CA, its server certificate and an empty state in `dir`.
    pub fn init(dir: &Path, opts: &InitOptions, now: OffsetDateTime) -> Result<Ca, CaError> {
        Ca::init_in(dir, Arc::new(SqliteStore::new(dir)), opts, now)
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
        let cert = profile::ca(&trust_domain, now).self_signed(&key)?;

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
        ca.write_server_cert(&sans, &hex::random(8), now)?;
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
        if !SqliteStore::exists_in(dir) && dir.join(CA_KEY_FILE).exists() {
            let migrated = [
                crate::state::MIGRATED_FILE,
                crate::state::MIGRATING_FILE,
                crate::sqlite::MIGRATED_FILE,
                crate::sqlite::MIGRATING_FILE,
            ]
            .iter()
            .any(|f| dir.join(f).exists());
            return Err(if migrated {
                CaError::Migrated(dir.to_path_buf())
            } else {
                CaError::NoStateFile(dir.to_path_buf())
            });
        }
        Ca::open_in(dir, Arc::new(SqliteStore::new(dir)))
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
        let state = store.look(|tx| tx.settings())?;
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

    pub(crate) fn issuer(&self) -> Result<Issuer<'static, &KeyPair>, CaError> {
        Ok(Issuer::from_ca_cert_der(
            &self.cert_der.clone().into(),
            &self.key,
        )?)
    }

    pub(crate) fn write(&self, name: &str, contents: &[u8], mode: u32) -> Result<(), CaError> {
        let path = self.dir.join(name);
        fsutil::write_atomic(&path, contents, mode).map_err(|e| CaError::io(&path, e))
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
