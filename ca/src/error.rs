//! Errors of CA operations. Each message is one sentence that says what to do next.

use std::io;
use std::path::{Path, PathBuf};

/// An error from managing the CA or its state.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot access {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("a CA already exists in {0}; refusing to overwrite it (move the directory away to start over, and keep a backup of ca.key)")]
    AlreadyInitialized(PathBuf),
    #[error("{0} holds a CA certificate and state but no ca.key: restore ca.key from your backup (a new CA would lock out every enrolled agent)")]
    MissingKey(PathBuf),
    #[error("no CA in {0}: run `revproxy ca init --state {0}` first")]
    NotInitialized(PathBuf),
    #[error("{path} is accessible by group or others (mode {mode:03o}); run `chmod 600 {path}`")]
    InsecurePermissions { path: PathBuf, mode: u32 },
    #[error("the state directory {path} can be written by group or others (mode {mode:03o}): anyone who can write there can replace the CA; run `chmod 700 {path}`")]
    WritableDir { path: PathBuf, mode: u32 },
    #[error("the state directory {path} belongs to user {owner}, not to the user running revproxy ({me}); run revproxy as its owner, or `chown` it")]
    ForeignOwner { path: PathBuf, owner: u32, me: u32 },
    #[error("{path} belongs to user {owner}, not to the user running revproxy ({me}); run revproxy as its owner, or `chown {me} {path}`")]
    ForeignFile { path: PathBuf, owner: u32, me: u32 },
    #[error("the state in {0} is locked by another revproxy process; try again when it is done")]
    Locked(PathBuf),
    #[error("{path} is damaged: {reason}")]
    CorruptState { path: PathBuf, reason: String },
    #[error("{0}")]
    InvalidInput(String),
    #[error("no token with id {0:?}; `revproxy token list` shows the ids")]
    UnknownToken(String),
    #[error("no certificate or agent {0:?}; `revproxy cert list` shows them")]
    UnknownCert(String),
    #[error("the store {0} holds a CA state already; to add a proxy to it, copy ca.key and ca.crt from a proxy that uses it into an empty state directory and run `revproxy serve --store URL` there")]
    StoreHoldsState(String),
    #[error("the store {0} holds no CA state yet: create it with `revproxy ca init --store URL`, or move an existing one there with `revproxy store migrate --from DIR --to URL`")]
    StoreEmpty(String),
    #[error("{0} is beside a shared store, which a proxy never reads it with: move it away (after `revproxy store migrate`, its records are in the store) and use --store URL for every command")]
    StaleStateFile(PathBuf),
    #[error("no state in {0}: if this proxy keeps its state in a shared store, give --store URL (or set REVPROXY_STORE)")]
    NoStateFile(PathBuf),
    #[error("the state store {store} is unavailable: {reason}")]
    StoreUnavailable { store: String, reason: String },
    /// A shared store's version is a counter that only grows; a smaller one means another
    /// state took its place. Refused until the process restarts.
    #[error("the state in {store} went back from version {from} to {to} (a restored backup, or another database?); this process keeps the newer state it read and refuses changes. If the older state is the right one, re-apply what was changed since (revocations first: `revproxy cert list`) and restart every proxy; otherwise point --store back at the right database")]
    StoreWentBack { store: String, from: u64, to: u64 },
    #[error("the state of {0} was moved to a database by `revproxy store migrate` (state.db.migrated or state.json.migrated is the old copy); run with --store URL or REVPROXY_STORE")]
    Migrated(PathBuf),
    #[error("the CA in {dir} (pin {dir_pin}) is not the CA of the store {store} (pin {store_pin}); copy ca.key and ca.crt from a proxy that uses this store")]
    WrongCa {
        dir: PathBuf,
        dir_pin: String,
        store: String,
        store_pin: String,
    },
    #[error("certificate operation failed: {0}")]
    Certificate(#[from] rcgen::Error),
}

impl CaError {
    /// Whether the error passes once the store is reachable again: the request may be
    /// retried (the proxy answers 503).
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            CaError::StoreUnavailable { .. } | CaError::StoreWentBack { .. } | CaError::Locked(_)
        )
    }

    pub(crate) fn io(path: &Path, source: io::Error) -> CaError {
        CaError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Why an enrollment was refused. The proxy sends the `Display` text to the agent.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("the certificate signing request is invalid: {0}")]
    BadCsr(String),
    #[error("unknown token: check that you copied the whole token, or ask the operator for a new one with `revproxy token create`")]
    UnknownToken,
    #[error("the token's secret is wrong: copy the whole token again, or ask the operator for a new one")]
    WrongSecret,
    #[error("token expired: ask the operator for a new one with `revproxy token create`")]
    Expired,
    #[error("token already used: ask the operator for a new one with `revproxy token create`")]
    Used,
    #[error("token revoked: ask the operator for a new one with `revproxy token create`")]
    Revoked,
    #[error("this certificate is not known to the proxy; enroll again with a new token")]
    UnknownCert,
    #[error("this certificate was revoked; ask the operator for a new token and run `revproxy-agent enroll`")]
    CertRevoked,
    #[error("this certificate has expired and cannot be renewed; ask the operator for a new token and run `revproxy-agent enroll`")]
    CertExpired,
    #[error("this certificate is not due for renewal for another {wait_secs} s (renewal is allowed from {min_age_percent}% of its lifetime); if this repeats, the agent's clock is ahead of the proxy's")]
    TooEarly { wait_secs: u64, min_age_percent: u8 },
    #[error("this certificate was already renewed, as certificate {successor}, for another key: another machine may hold a copy of this agent's identity, or its state directory was restored from an old backup; ask the operator to revoke the agent (`revproxy cert revoke AGENT`) and to enroll it again with a new token")]
    AlreadyRenewed { successor: String },
    #[error(transparent)]
    Internal(#[from] CaError),
}

impl EnrollError {
    /// A stable machine-readable code for the wire protocol.
    pub fn code(&self) -> &'static str {
        match self {
            EnrollError::BadCsr(_) => "bad_csr",
            EnrollError::UnknownToken => "unknown_token",
            EnrollError::WrongSecret => "wrong_secret",
            EnrollError::Expired => "token_expired",
            EnrollError::Used => "token_used",
            EnrollError::Revoked => "token_revoked",
            EnrollError::UnknownCert => "unknown_cert",
            EnrollError::CertRevoked => "cert_revoked",
            EnrollError::CertExpired => "cert_expired",
            EnrollError::TooEarly { .. } => "too_early",
            EnrollError::AlreadyRenewed { .. } => "already_renewed",
            EnrollError::Internal(_) => "internal",
        }
    }

    /// Seconds after which the same request may succeed, for refusals that pass with time.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            EnrollError::TooEarly { wait_secs, .. } => Some(*wait_secs),
            _ => None,
        }
    }
}
