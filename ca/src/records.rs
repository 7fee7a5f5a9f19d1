//! What the operator's commands do to the CA state: tokens minted, listed and revoked;
//! certificates listed and revoked; the names an agent is granted. Each change is one
//! locked state update (`state.rs`), on disk before it returns.

use time::OffsetDateTime;

use crate::ca::{
    normalize_hosts, normalize_names, random_hex, validate_server, Ca, CertInfo, CertState,
    NewToken, TokenInfo, TokenState, MAX_CERT_TTL, MAX_HOSTS, MAX_TOKEN_TTL,
};
use crate::error::CaError;
use crate::hex;
use crate::names::validate_agent_name;
use crate::state::{CertRecord, State, TokenRecord, Unix};
use crate::token::{Secret, Token, TokenPublic};

impl Ca {
    /// Mints a one-time token; returns it whole. Only its secret's hash is stored.
    pub fn create_token(&self, req: &NewToken, now: OffsetDateTime) -> Result<Token, CaError> {
        validate_agent_name(&req.agent).map_err(|e| CaError::InvalidInput(e.to_string()))?;
        let hosts = normalize_names(&req.hosts)?;
        let private_hosts = normalize_names(&req.private_hosts)?;
        let connect = normalize_names(&req.connect)?;
        if hosts.is_empty() && private_hosts.is_empty() && connect.is_empty() {
            return Err(CaError::InvalidInput(
                "give at least one name: --host (public), --private-host or --connect".into(),
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
        self.state.update(|state: &mut State| {
            let id = loop {
                let id = random_hex(8);
                if !state.tokens.iter().any(|t| t.id == id) {
                    break id;
                }
            };
            state.prune(now_s);
            state.tokens.push(TokenRecord {
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
            });
            Ok::<_, CaError>(Token {
                public: TokenPublic {
                    server: server.unwrap_or_else(|| state.server.clone()),
                    pins: vec![self.pin.to_string()],
                    id,
                },
                secret,
            })
        })
    }

    /// All tokens still on record, oldest first.
    pub fn list_tokens(&self, now: OffsetDateTime) -> Result<Vec<TokenInfo>, CaError> {
        let now = now.unix_timestamp();
        Ok(self
            .state
            .read()?
            .tokens
            .into_iter()
            .map(|t| TokenInfo {
                state: token_state(&t, now),
                id: t.id,
                agent: t.agent,
                hosts: t.hosts,
                expires: t.expires,
            })
            .collect())
    }

    /// Revokes a token so that it can never be used. Revoking a used token is allowed (and
    /// harmless): it stops a lost-answer retry from fetching the certificate again.
    pub fn revoke_token(&self, id: &str) -> Result<(), CaError> {
        self.state.update(|state: &mut State| {
            let token = state
                .tokens
                .iter_mut()
                .find(|t| t.id == id)
                .ok_or_else(|| CaError::UnknownToken(id.to_string()))?;
            token.revoked = true;
            Ok(())
        })
    }

    /// Every certificate still on record, oldest first.
    pub fn list_certs(&self, now: OffsetDateTime) -> Result<Vec<CertInfo>, CaError> {
        let now = now.unix_timestamp();
        Ok(self
            .state
            .read()?
            .certs
            .into_iter()
            .map(|c| {
                let third = (c.not_after - c.not_before) / 3;
                let state = if c.revoked_at.is_some() {
                    CertState::Revoked
                } else if now >= c.not_after {
                    CertState::Expired
                } else if c.not_after - now <= third {
                    CertState::Expiring
                } else {
                    CertState::Valid
                };
                CertInfo {
                    serial: c.serial,
                    agent: c.agent,
                    hosts: c.hosts,
                    not_before: c.not_before,
                    not_after: c.not_after,
                    state,
                }
            })
            .collect())
    }

    /// Revokes the certificate with serial `what`, or every certificate of agent `what`.
    /// Returns the serials revoked now (already revoked ones are not repeated).
    pub fn revoke_certs(&self, what: &str, now: OffsetDateTime) -> Result<Vec<String>, CaError> {
        let serial = what.to_ascii_lowercase();
        self.state.update(|state: &mut State| {
            let matching: Vec<&mut CertRecord> = state
                .certs
                .iter_mut()
                .filter(|c| c.serial == serial || c.agent == what)
                .collect();
            if matching.is_empty() {
                return Err(CaError::UnknownCert(what.to_string()));
            }
            let mut revoked = Vec::new();
            for c in matching {
                if c.revoked_at.is_none() {
                    c.revoked_at = Some(now.unix_timestamp());
                    revoked.push(c.serial.clone());
                }
            }
            Ok(revoked)
        })
    }

    /// Sets the names agent `agent` may serve. Live tunnels follow within seconds; names
    /// outside the agent's certificate stay unserved until it is reissued.
    pub fn set_hosts(&self, agent: &str, hosts: &[String]) -> Result<Vec<String>, CaError> {
        let hosts = if hosts.is_empty() {
            Vec::new()
        } else {
            normalize_hosts(hosts)?
        };
        self.state.update(|state: &mut State| {
            let grant = state
                .agents
                .get_mut(agent)
                .ok_or_else(|| CaError::UnknownCert(agent.to_string()))?;
            grant.hosts = hosts.clone();
            Ok(hosts)
        })
    }
}

impl Ca {
    /// Lets `agent` reach `names` through its tunnel (exact names or `*.example.com`).
    /// Returns everything it may reach now.
    pub fn allow_access(&self, agent: &str, names: &[String]) -> Result<Vec<String>, CaError> {
        validate_agent_name(agent).map_err(|e| CaError::InvalidInput(e.to_string()))?;
        let names = normalize_hosts(names)?;
        self.state.update(|state: &mut State| {
            if !state.agents.contains_key(agent) {
                return Err(CaError::UnknownCert(agent.to_string()));
            }
            let rules = state.access.entry(agent.to_string()).or_default();
            for name in names {
                if !rules.contains(&name) {
                    rules.push(name);
                }
            }
            Ok(rules.clone())
        })
    }

    /// Takes back `names` from `agent`'s access; open streams to them are cut within
    /// seconds. Returns what it may still reach.
    pub fn revoke_access(&self, agent: &str, names: &[String]) -> Result<Vec<String>, CaError> {
        let names = normalize_hosts(names)?;
        self.state.update(|state: &mut State| {
            let rules = state
                .access
                .get_mut(agent)
                .ok_or_else(|| CaError::InvalidInput(format!("{agent} has no access rules")))?;
            rules.retain(|n| !names.contains(n));
            let left = rules.clone();
            if left.is_empty() {
                state.access.remove(agent);
            }
            Ok(left)
        })
    }

    /// Every access rule: agent and the names it may reach.
    pub fn list_access(&self) -> Result<Vec<(String, Vec<String>)>, CaError> {
        Ok(self.state.read()?.access.into_iter().collect())
    }
}

fn token_state(t: &TokenRecord, now: Unix) -> TokenState {
    if t.revoked {
        TokenState::Revoked
    } else if t.used.is_some() {
        TokenState::Used
    } else if now >= t.expires {
        TokenState::Expired
    } else {
        TokenState::Unused
    }
}
