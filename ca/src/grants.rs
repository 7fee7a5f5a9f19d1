//! What an enrolled agent is granted beyond its certificate: the names it may serve now
//! ([`Ca::set_hosts`]) and the names it may reach through its tunnel (access rules).

use std::collections::BTreeSet;

use crate::ca::Ca;
use crate::error::CaError;
use crate::names::{name_matches, normalize_hosts, normalize_served_names, validate_agent_name};
use crate::records::Tx;
use crate::state::Unix;

impl Ca {
    /// Sets the names agent `agent` may serve. Live tunnels follow within seconds; names
    /// outside the agent's certificate stay unserved until it is reissued.
    pub fn set_hosts(&self, agent: &str, hosts: &[String]) -> Result<Vec<String>, CaError> {
        let hosts = normalize_served_names(hosts)?;
        self.state.update(|tx| {
            crate::ports::check_granted(tx, &hosts)?;
            let mut grant = tx
                .grant(agent)?
                .ok_or_else(|| CaError::UnknownCert(agent.to_string()))?;
            grant.hosts = hosts.clone();
            tx.put_grant(agent, grant)?;
            Ok(hosts)
        })
    }

    /// Lets `agent` reach `names` through its tunnel (exact names or `*.example.com`).
    /// Returns everything it may reach now.
    pub fn allow_access(&self, agent: &str, names: &[String]) -> Result<Vec<String>, CaError> {
        validate_agent_name(agent).map_err(|e| CaError::InvalidInput(e.to_string()))?;
        let names = normalize_hosts(names)?;
        self.state.update(|tx| {
            if tx.grant(agent)?.is_none() {
                return Err(CaError::UnknownCert(agent.to_string()));
            }
            add_access(tx, agent, names)
        })
    }

    /// Takes back `names` from `agent`'s access; open streams to them are cut within
    /// seconds. Returns what it may still reach.
    pub fn revoke_access(&self, agent: &str, names: &[String]) -> Result<Vec<String>, CaError> {
        let names = normalize_hosts(names)?;
        self.state.update(|tx| {
            let mut rules = tx.access(agent)?;
            if rules.is_empty() {
                return Err(CaError::InvalidInput(format!(
                    "{agent} has no access rules"
                )));
            }
            rules.retain(|n| !names.contains(n));
            tx.put_access(agent, rules.clone())?;
            Ok(rules)
        })
    }

    /// Every access rule: agent and the names it may reach, by agent name.
    pub fn list_access(&self) -> Result<Vec<(String, Vec<String>)>, CaError> {
        let mut all = Vec::new();
        self.each_access(None, |agent, names| {
            all.push((agent, names));
            Ok::<_, CaError>(())
        })?;
        Ok(all)
    }

    /// Calls `each` with every agent's access rule (only `agent`'s, when given), by agent
    /// name; stops at the first error `each` returns. All of them are read a batch at a
    /// time ([`Tx::each_access`](crate::Tx::each_access)).
    pub fn each_access<E: From<CaError> + Send>(
        &self,
        agent: Option<&str>,
        mut each: impl FnMut(String, Vec<String>) -> Result<(), E> + Send,
    ) -> Result<(), E> {
        let mut failed = None;
        let mut one = |agent: String, names: Vec<String>| {
            each(agent, names).map_err(|e| failed = Some(e)).is_ok()
        };
        match agent {
            Some(agent) => {
                let names = self.state.look(|tx| tx.access(agent))?;
                if !names.is_empty() {
                    one(agent.to_string(), names);
                }
            }
            None => self.state.look(|tx| tx.each_access(&mut one))?,
        }
        failed.map_or(Ok(()), Err)
    }

    /// Names granted privately that a public wildcard also covers, as (private name,
    /// public pattern), over every agent's grant and every token not yet used. The private
    /// grant wins: such a name is never routed from a public listener, which an operator
    /// who granted the wildcard may not expect (`token create` and `agent set-hosts` say
    /// so).
    pub fn private_under_public(&self, now: Unix) -> Result<Vec<(String, String)>, CaError> {
        let state = self.state.read()?;
        let open = state
            .tokens
            .iter()
            .filter(|t| t.used.is_none() && !t.revoked && t.expires > now);
        let grants = state.agents.values();
        let public: BTreeSet<&String> = (grants.clone().flat_map(|g| &g.hosts))
            .chain(open.clone().flat_map(|t| &t.hosts))
            .filter(|p| p.starts_with("*."))
            .collect();
        let private: BTreeSet<&String> = (grants.flat_map(|g| &g.private))
            .chain(open.flat_map(|t| &t.private_hosts))
            .collect();
        Ok((private.iter())
            .flat_map(|name| {
                (public.iter())
                    .filter(|pattern| name_matches(pattern, name))
                    .map(|pattern| (name.to_string(), pattern.to_string()))
            })
            .collect())
    }
}

/// Adds `names` to `agent`'s access rule (those it has already stay once); returns the
/// whole rule.
pub(crate) fn add_access(
    tx: &mut dyn Tx,
    agent: &str,
    names: impl IntoIterator<Item = String>,
) -> Result<Vec<String>, CaError> {
    let mut rules = tx.access(agent)?;
    for name in names {
        if !rules.contains(&name) {
            rules.push(name);
        }
    }
    tx.put_access(agent, rules.clone())?;
    Ok(rules)
}
