//! The agent's identity on disk.
//!
//! | file         | mode | what |
//! |--------------|------|------|
//! | `agent.key`  | 0600 | the agent's private key; generated here, never sent anywhere |
//! | `agent.crt`  | 0644 | the agent's certificate, issued by the proxy's CA |
//! | `ca.crt`     | 0644 | the proxy's CA certificate, pinned at enrollment |
//! | `agent.json` | 0644 | proxy address, agent name and identity, the names granted privately |
//!
//! The four files are replaced together with `fsutil::replace_all`, so a crash during a
//! re-enrollment leaves the old identity or the new one, never a key that does not match
//! its certificate.

use std::path::{Path, PathBuf};

use revproxy_ca::{fsutil, CaError, Pin};
use serde::{Deserialize, Serialize};

use crate::tls::{Credentials, TlsError};

pub const AGENT_KEY_FILE: &str = "agent.key";
pub const AGENT_CERT_FILE: &str = "agent.crt";
pub const CA_CERT_FILE: &str = "ca.crt";
pub const AGENT_INFO_FILE: &str = "agent.json";

/// An enrolled agent's identity.
#[derive(Clone)]
pub struct Identity {
    /// The proxy's agent address, `host:port`.
    pub server: String,
    /// Agent name.
    pub agent: String,
    /// SPIFFE identity.
    pub identity: String,
    /// Names the certificate authorizes.
    pub hosts: Vec<String>,
    /// Of those, the ones granted privately at enrollment or the last renewal: served only
    /// to mesh streams, never to a stream without a caller.
    pub private: Vec<String>,
    /// Expiry, seconds since the Unix epoch.
    pub not_after: i64,
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("server", &self.server)
            .field("identity", &self.identity)
            .field("hosts", &self.hosts)
            .field("private", &self.private)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Info {
    server: String,
    agent: String,
    identity: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    private: Vec<String>,
}

/// Why the identity could not be loaded or saved.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("this agent is not enrolled (no {0}): run `revproxy-agent enroll --token TOKEN` with a token from `revproxy token create`")]
    NotEnrolled(PathBuf),
    #[error(
        "{0} holds a proxy's CA (ca.key); give the agent its own state directory with --state"
    )]
    ProxyStateDir(PathBuf),
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("cannot access {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is damaged: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{0} holds another certificate now (the agent was enrolled again meanwhile); the renewed certificate of the old one was not stored")]
    Replaced(PathBuf),
    #[error("the agent's state directory {path} can be written by group or others (mode {mode:03o}): whoever can write there can replace the CA certificate this agent trusts; run `chmod 700 {path}`")]
    WritableDir { path: PathBuf, mode: u32 },
    #[error("{path} can be written by group or others (mode {mode:03o}): whoever can change it can change whom this agent trusts or is; run `chmod 644 {path}`")]
    WritableFile { path: PathBuf, mode: u32 },
    #[error("{path} belongs to user {owner}, not to the user running revproxy-agent ({me}); run the agent as its owner, or `chown -R {me} {path}`")]
    ForeignOwner { path: PathBuf, owner: u32, me: u32 },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Identity {
    /// Refuses a directory that is a proxy's state, so the two can never overwrite
    /// each other's `ca.crt`, and one the proxy's rules refuse for its own state: that
    /// group or others can write to, or that another user owns (whoever can write there
    /// can swap `ca.crt`, the agent's trust anchor). A directory not made yet passes.
    pub fn check_dir(dir: &Path) -> Result<(), IdentityError> {
        if dir.join(revproxy_ca::CA_KEY_FILE).exists() {
            return Err(IdentityError::ProxyStateDir(dir.to_path_buf()));
        }
        let path = dir.to_path_buf();
        match fsutil::unsafe_dir(dir) {
            Ok(None) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(dir)(e)),
            Ok(Some(fsutil::DirProblem::Writable(mode))) => {
                Err(IdentityError::WritableDir { path, mode })
            }
            Ok(Some(fsutil::DirProblem::Owner { owner, me })) => {
                Err(IdentityError::ForeignOwner { path, owner, me })
            }
        }
    }

    /// Refuses the identity's files when others could read the key or change any of them
    /// (the proxy's rules for its own key and state): the key must be `0600`, the others
    /// writable by their owner only, and all owned by the user the agent runs as.
    fn check_files(dir: &Path) -> Result<(), IdentityError> {
        for (name, forbidden) in [
            (AGENT_KEY_FILE, 0o077),
            (AGENT_CERT_FILE, 0o022),
            (CA_CERT_FILE, 0o022),
            (AGENT_INFO_FILE, 0o022),
        ] {
            let path = dir.join(name);
            match fsutil::unsafe_file(&path, forbidden).map_err(io_err(&path))? {
                None => {}
                Some(fsutil::FileProblem::Mode(mode)) if forbidden == 0o077 => {
                    return Err(CaError::InsecurePermissions { path, mode }.into())
                }
                Some(fsutil::FileProblem::Mode(mode)) => {
                    return Err(IdentityError::WritableFile { path, mode })
                }
                Some(fsutil::FileProblem::Owner { owner, me }) => {
                    return Err(IdentityError::ForeignOwner { path, owner, me })
                }
            }
        }
        Ok(())
    }

    /// Loads the identity in `dir`, finishing an interrupted save first.
    pub fn load(dir: &Path) -> Result<Identity, IdentityError> {
        Identity::check_dir(dir)?;
        // Finish an interrupted save first: the info file is the last one it renames.
        if dir.exists() {
            fsutil::recover(dir).map_err(io_err(dir))?;
        }
        Identity::read(dir)
    }

    /// Reads the identity in `dir` as it is, without finishing an interrupted save (a
    /// running agent looking for a re-enrollment leaves that to the writer).
    pub(super) fn read(dir: &Path) -> Result<Identity, IdentityError> {
        Identity::check_dir(dir)?;
        if !dir.join(AGENT_INFO_FILE).exists() {
            return Err(IdentityError::NotEnrolled(dir.join(AGENT_INFO_FILE)));
        }
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(io_err(&path))
        };
        Identity::check_files(dir)?;
        let info_path = dir.join(AGENT_INFO_FILE);
        let info: Info =
            serde_json::from_str(&read(AGENT_INFO_FILE)?).map_err(|e| IdentityError::Corrupt {
                path: info_path,
                reason: e.to_string(),
            })?;
        let cert_pem = read(AGENT_CERT_FILE)?;
        let cert_path = dir.join(AGENT_CERT_FILE);
        let (hosts, not_after) = cert_hosts(&cert_pem).ok_or_else(|| IdentityError::Corrupt {
            path: cert_path,
            reason: "not a PEM certificate".into(),
        })?;
        Ok(Identity {
            server: info.server,
            agent: info.agent,
            identity: info.identity,
            private: info.private,
            hosts,
            not_after,
            cert_pem,
            key_pem: read(AGENT_KEY_FILE)?,
            ca_pem: read(CA_CERT_FILE)?,
        })
    }

    /// Saves this identity into `dir`, replacing any previous one as a unit.
    pub fn save(&self, dir: &Path) -> Result<(), IdentityError> {
        Identity::check_dir(dir)?;
        fsutil::create_private_dir(dir).map_err(io_err(dir))?;
        let info = serde_json::to_vec_pretty(&Info {
            server: self.server.clone(),
            agent: self.agent.clone(),
            identity: self.identity.clone(),
            private: self.private.clone(),
        })
        .expect("info serializes");
        fsutil::replace_all(
            dir,
            &[
                (
                    AGENT_KEY_FILE,
                    self.key_pem.as_bytes(),
                    fsutil::PRIVATE_FILE_MODE,
                ),
                (
                    AGENT_CERT_FILE,
                    self.cert_pem.as_bytes(),
                    fsutil::PUBLIC_FILE_MODE,
                ),
                (
                    CA_CERT_FILE,
                    self.ca_pem.as_bytes(),
                    fsutil::PUBLIC_FILE_MODE,
                ),
                (AGENT_INFO_FILE, &info, fsutil::PUBLIC_FILE_MODE),
            ],
        )
        .map_err(io_err(dir))
    }

    /// Whether the files belong together: the certificate is for this key and signed by
    /// this CA (a set read while a save was replacing it may mix two identities).
    pub(super) fn is_consistent(&self) -> bool {
        use rcgen::PublicKeyData;
        let (Some(pin), Ok(key)) = (self.ca_pin(), rcgen::KeyPair::from_pem(&self.key_pem)) else {
            return false;
        };
        revproxy_ca::cert::check_issued(
            &self.cert_pem,
            &self.ca_pem,
            &[pin],
            &key.subject_public_key_info(),
        )
        .is_ok()
    }

    /// The pin of the CA this agent trusts.
    pub fn ca_pin(&self) -> Option<Pin> {
        let der = revproxy_ca::pem_to_der(&self.ca_pem, "CERTIFICATE")?;
        Pin::from_cert_der(&der)
    }

    /// The serial of its certificate, hex.
    pub fn serial(&self) -> Option<String> {
        Some(revproxy_ca::CertSummary::from_pem(&self.cert_pem)?.serial)
    }

    /// What the agent presents on the agent port.
    pub(crate) fn credentials(&self) -> Result<Credentials<'_>, TlsError> {
        Ok(Credentials {
            pin: self.ca_pin().ok_or_else(|| TlsError::Pem {
                what: CA_CERT_FILE.into(),
                kind: "certificate",
            })?,
            cert_pem: &self.cert_pem,
            key_pem: &self.key_pem,
            proxy: None,
        })
    }
}

/// The names (DNS names, then granted ports as `tcp:PORT`) and expiry in a PEM
/// certificate.
pub(super) fn cert_hosts(pem: &str) -> Option<(Vec<String>, i64)> {
    let cert = revproxy_ca::CertSummary::from_pem(pem)?;
    Some((cert.served(), cert.not_after))
}
