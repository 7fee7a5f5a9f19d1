//! Enrollment tokens on record: minting, listing and revoking them, each one locked state
//! update. The token string itself is `token.rs`; trading a token is `issue.rs`.

use std::time::Duration;

use time::OffsetDateTime;

use crate::ca::Ca;
use crate::error::CaError;
use crate::hex;
use crate::issue::MAX_CERT_TTL;
use crate::names::{normalize_names, normalize_served_names, validate_agent_name, MAX_HOSTS};
use crate::server::validate_server;
use crate::state::{TokenRecord, Unix};
use crate::token::{Secret, Token, TokenPublic};

/// How long an enrollment token stays valid by default.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);
/// Longest token lifetime accepted: tokens are meant to be used right away.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

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
    pub private_hosts: Vec<String>,
    pub connect: Vec<String>,
    pub created: Unix,
    pub expires: Unix,
    pub state: TokenState,
    /// When it was traded, and the serial of the certificate it bought.
    pub used: Option<(Unix, String)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenState {
    /// Can still be traded.
    Open,
    Used,
    Expired,
    Revoked,
}

/// Which tokens [`Ca::each_token`] visits: those of one agent, in one state (all when
/// `None`).
#[derive(Clone, Debug, Default)]
pub struct TokenFilter {
    pub agent: Option<String>,
    pub state: Option<TokenState>,
}

impl TokenState {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenState::Open => "open",
            TokenState::Used => "used",
            TokenState::Expired => "expired",
            TokenState::Revoked => "revoked",
        }
    }
}

impl Ca {
    /// Mints a one-time token; returns it whole. Only its secret's hash is stored.
    pub fn create_token(&self, req: &NewToken, now: OffsetDateTime) -> Result<Token, CaError> {
        validate_agent_name(&req.agent).map_err(|e| CaError::InvalidInput(e.to_string()))?;
        let hosts = normalize_served_names(&req.hosts)?;
        let private_hosts = normalize_names(&req.private_hosts)?;
        let connect = normalize_names(&req.connect)?;
        if hosts.is_empty() && private_hosts.is_empty() && connect.is_empty() {
            return Err(CaError::InvalidInput(
                "give at least one name or port: --host (public), --tcp-port, --udp-port, --private-host or --connect".into(),
            ));
        }
        if hosts.len() + private_hosts.len() > MAX_HOSTS {
            return Err(CaError::InvalidInput(format!(
                "give at most {MAX_HOSTS} names to serve"
            )));
        }
        if let Some(both) = hosts.iter().find(|h| private_hosts.contains(h)) {
            return Err(CaError::InvalidInput(format!(
                "{both} cannot be both public (--host) and private (--private-host)"
            )));
        }
        if req.ttl.is_zero() || req.ttl > MAX_TOKEN_TTL {
            return Err(CaError::InvalidInput(format!(
                "token lifetime must be between 1s and {} days",
                MAX_TOKEN_TTL.as_secs() / 86400
            )));
        }
        // Operators are held to MIN_CERT_TTL by the command line; the library accepts
        // shorter lifetimes so that tests can run many renewals quickly.
        if req.cert_ttl.is_zero() || req.cert_ttl > MAX_CERT_TTL {
            return Err(CaError::InvalidInput(
                "certificate lifetime must be between 1h and 7d".into(),
            ));
        }
        let server = req.server.as_deref().map(validate_server).transpose()?;
        let secret = Secret::generate();
        let now_s = now.unix_timestamp();
        self.state.update(|tx| {
            let id = loop {
                let id = hex::random(8);
                if tx.token(&id)?.is_none() {
                    break id;
                }
            };
            crate::ports::check_granted(tx, &hosts)?;
            tx.prune(now_s)?;
            tx.put_token(TokenRecord {
                id: id.clone(),
                agent: req.agent.clone(),
                hosts,
                secret_sha256: hex::encode(&secret.hash().0),
                created: now_s,
                expires: now_s + req.ttl.as_secs() as i64,
                cert_ttl_secs: req.cert_ttl.as_secs() as i64,
                revoked: false,
                used: None,
                private_hosts,
                connect,
            })?;
            let server = match server {
                Some(server) => server,
                None => crate::server::enrollment_address(&tx.settings()?)
                    .address()
                    .to_string(),
            };
            Ok::<_, CaError>(Token {
                public: TokenPublic {
                    server,
                    pins: vec![self.pin.to_string()],
                    id,
                },
                secret,
            })
        })
    }

    /// All tokens still on record, oldest first.
    pub fn list_tokens(&self, now: OffsetDateTime) -> Result<Vec<TokenInfo>, CaError> {
        let mut all = Vec::new();
        self.each_token(now, &TokenFilter::default(), |t| {
            all.push(t);
            Ok::<_, CaError>(())
        })?;
        Ok(all)
    }

    /// Calls `each` with every token on record that `filter` lets through, oldest first;
    /// stops at the first error `each` returns. One agent's are read by their key; all of
    /// them a batch at a time ([`Tx::each_token`](crate::Tx::each_token)).
    pub fn each_token<E: From<CaError> + Send>(
        &self,
        now: OffsetDateTime,
        filter: &TokenFilter,
        mut each: impl FnMut(TokenInfo) -> Result<(), E> + Send,
    ) -> Result<(), E> {
        let now = now.unix_timestamp();
        let agent = filter.agent.as_deref();
        let mut failed = None;
        let mut one = |t: TokenRecord| {
            let status = token_state(&t, now);
            if agent.is_some_and(|a| a != t.agent) || filter.state.is_some_and(|s| s != status) {
                return true;
            }
            let info = TokenInfo {
                state: status,
                used: t.used.map(|u| (u.at, u.serial)),
                id: t.id,
                agent: t.agent,
                hosts: t.hosts,
                private_hosts: t.private_hosts,
                connect: t.connect,
                created: t.created,
                expires: t.expires,
            };
            each(info).map_err(|e| failed = Some(e)).is_ok()
        };
        match agent {
            Some(agent) => {
                let tokens = self.state.look(|tx| tx.tokens_of(agent))?;
                let _ = tokens.into_iter().all(&mut one);
            }
            None => self.state.look(|tx| tx.each_token(&mut one))?,
        }
        failed.map_or(Ok(()), Err)
    }

    /// Revokes a token so that it can never be used. Revoking a used token is allowed (and
    /// harmless): it stops a lost-answer retry from fetching the certificate again.
    pub fn revoke_token(&self, id: &str) -> Result<(), CaError> {
        self.state.update(|tx| {
            let mut token = tx
                .token(id)?
                .ok_or_else(|| CaError::UnknownToken(id.to_string()))?;
            token.revoked = true;
            tx.put_token(token)
        })
    }
}

pub(crate) fn token_state(t: &TokenRecord, now: Unix) -> TokenState {
    if t.revoked {
        TokenState::Revoked
    } else if t.used.is_some() {
        TokenState::Used
    } else if now >= t.expires {
        TokenState::Expired
    } else {
        TokenState::Open
    }
}
