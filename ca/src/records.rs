//! The CA's state as records: what one change reads and writes ([`Tx`]), by key, so that a
//! store keeping records apart (rows) can make a change cost what the change touches, not
//! what the state holds. Every change of the CA goes through a [`Tx`]
//! ([`Store::update`](crate::Store)); whole-state reads remain for what needs everything
//! (a proxy's first snapshot, `store migrate`).
//!
//! [`DocTx`] is the transaction of a store that keeps one document ([`State`]): the file
//! store of release 0.1 (`state.json`), which tests and the default
//! [`Store::transact`](crate::Store::transact) still use. The embedded store and
//! PostgreSQL keep rows.

use crate::error::CaError;
use crate::state::{
    AgentGrant, AgentListener, CertRecord, OperatorRecord, State, TokenRecord, Unix,
};

/// The CA-wide settings: one record (stored with the field names of the document they
/// came from).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Settings {
    pub trust_domain: String,
    pub server: String,
    pub server_sans: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pin: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_listener: Option<AgentListener>,
}

impl Settings {
    /// A state with these settings and no records.
    pub fn into_state(self) -> State {
        State {
            version: State::VERSION,
            trust_domain: self.trust_domain,
            server: self.server,
            server_sans: self.server_sans,
            ca_pin: self.ca_pin,
            agent_listener: self.agent_listener,
            ..State::default()
        }
    }

    /// The settings in a whole document.
    pub fn of(s: &State) -> Settings {
        Settings {
            trust_domain: s.trust_domain.clone(),
            server: s.server.clone(),
            server_sans: s.server_sans.clone(),
            ca_pin: s.ca_pin.clone(),
            agent_listener: s.agent_listener.clone(),
        }
    }
}

/// One change of the CA's records. Reads see the newest committed records and this
/// change's own writes; the writes take effect together, when the change commits, or not
/// at all.
pub trait Tx {
    fn token(&mut self, id: &str) -> Result<Option<TokenRecord>, CaError>;
    /// Every token of `agent` on record, oldest first.
    fn tokens_of(&mut self, agent: &str) -> Result<Vec<TokenRecord>, CaError>;
    /// Adds a token or replaces the one with its id.
    fn put_token(&mut self, token: TokenRecord) -> Result<(), CaError>;

    fn cert(&mut self, serial: &str) -> Result<Option<CertRecord>, CaError>;
    /// Every certificate of `agent` on record, oldest first.
    fn certs_of(&mut self, agent: &str) -> Result<Vec<CertRecord>, CaError>;
    /// Adds a certificate or replaces the one with its serial.
    fn put_cert(&mut self, cert: CertRecord) -> Result<(), CaError>;

    fn grant(&mut self, agent: &str) -> Result<Option<AgentGrant>, CaError>;
    fn put_grant(&mut self, agent: &str, grant: AgentGrant) -> Result<(), CaError>;

    /// The names `agent` may reach (empty: none).
    fn access(&mut self, agent: &str) -> Result<Vec<String>, CaError>;
    /// Sets them; empty removes the rule.
    fn put_access(&mut self, agent: &str, names: Vec<String>) -> Result<(), CaError>;

    fn operator(&mut self, serial: &str) -> Result<Option<OperatorRecord>, CaError>;
    /// Every operator certificate of `name`, oldest first.
    fn operators_named(&mut self, name: &str) -> Result<Vec<OperatorRecord>, CaError>;
    fn put_operator(&mut self, operator: OperatorRecord) -> Result<(), CaError>;

    /// Calls `each` with every token on record, oldest first, while it returns true: a
    /// store that keeps rows reads them a batch at a time, never all at once.
    fn each_token(&mut self, each: &mut dyn FnMut(TokenRecord) -> bool) -> Result<(), CaError>;
    /// Every certificate on record, oldest first, as [`Tx::each_token`].
    fn each_cert(&mut self, each: &mut dyn FnMut(CertRecord) -> bool) -> Result<(), CaError>;
    /// Every access rule (agent, names), by agent, as [`Tx::each_token`].
    fn each_access(
        &mut self,
        each: &mut dyn FnMut(String, Vec<String>) -> bool,
    ) -> Result<(), CaError>;

    fn settings(&mut self) -> Result<Settings, CaError>;
    fn put_settings(&mut self, settings: Settings) -> Result<(), CaError>;

    /// Drops records that can no longer matter ([`State::prune`]); a store may also do
    /// this on its own schedule.
    fn prune(&mut self, now: Unix) -> Result<(), CaError>;
}

/// A [`Tx`] on a whole document held in memory.
pub struct DocTx<'a> {
    state: &'a mut State,
}

impl<'a> DocTx<'a> {
    pub fn new(state: &'a mut State) -> DocTx<'a> {
        DocTx { state }
    }
}

/// Replaces the record `key` picks out of `records` with `record`, or adds it last.
fn put<T>(records: &mut Vec<T>, record: T, key: impl Fn(&T) -> &str) {
    match records.iter_mut().find(|r| key(r) == key(&record)) {
        Some(old) => *old = record,
        None => records.push(record),
    }
}

impl Tx for DocTx<'_> {
    fn token(&mut self, id: &str) -> Result<Option<TokenRecord>, CaError> {
        Ok(self.state.tokens.iter().find(|t| t.id == id).cloned())
    }

    fn tokens_of(&mut self, agent: &str) -> Result<Vec<TokenRecord>, CaError> {
        Ok((self.state.tokens.iter())
            .filter(|t| t.agent == agent)
            .cloned()
            .collect())
    }

    fn put_token(&mut self, token: TokenRecord) -> Result<(), CaError> {
        put(&mut self.state.tokens, token, |t| &t.id);
        Ok(())
    }

    fn cert(&mut self, serial: &str) -> Result<Option<CertRecord>, CaError> {
        Ok(self
            .state
            .certs
            .iter()
            .find(|c| c.serial == serial)
            .cloned())
    }

    fn certs_of(&mut self, agent: &str) -> Result<Vec<CertRecord>, CaError> {
        Ok((self.state.certs.iter())
            .filter(|c| c.agent == agent)
            .cloned()
            .collect())
    }

    fn put_cert(&mut self, cert: CertRecord) -> Result<(), CaError> {
        put(&mut self.state.certs, cert, |c| &c.serial);
        Ok(())
    }

    fn grant(&mut self, agent: &str) -> Result<Option<AgentGrant>, CaError> {
        Ok(self.state.agents.get(agent).cloned())
    }

    fn put_grant(&mut self, agent: &str, grant: AgentGrant) -> Result<(), CaError> {
        self.state.agents.insert(agent.to_string(), grant);
        Ok(())
    }

    fn access(&mut self, agent: &str) -> Result<Vec<String>, CaError> {
        Ok(self.state.access.get(agent).cloned().unwrap_or_default())
    }

    fn put_access(&mut self, agent: &str, names: Vec<String>) -> Result<(), CaError> {
        if names.is_empty() {
            self.state.access.remove(agent);
        } else {
            self.state.access.insert(agent.to_string(), names);
        }
        Ok(())
    }

    fn operator(&mut self, serial: &str) -> Result<Option<OperatorRecord>, CaError> {
        Ok((self.state.operators.iter())
            .find(|o| o.serial == serial)
            .cloned())
    }

    fn operators_named(&mut self, name: &str) -> Result<Vec<OperatorRecord>, CaError> {
        Ok((self.state.operators.iter())
            .filter(|o| o.name == name)
            .cloned()
            .collect())
    }

    fn put_operator(&mut self, operator: OperatorRecord) -> Result<(), CaError> {
        put(&mut self.state.operators, operator, |o| &o.serial);
        Ok(())
    }

    fn each_token(&mut self, each: &mut dyn FnMut(TokenRecord) -> bool) -> Result<(), CaError> {
        let _ = self.state.tokens.iter().cloned().all(each);
        Ok(())
    }

    fn each_cert(&mut self, each: &mut dyn FnMut(CertRecord) -> bool) -> Result<(), CaError> {
        let _ = self.state.certs.iter().cloned().all(each);
        Ok(())
    }

    fn each_access(
        &mut self,
        each: &mut dyn FnMut(String, Vec<String>) -> bool,
    ) -> Result<(), CaError> {
        let _ = (self.state.access.iter()).all(|(agent, names)| each(agent.clone(), names.clone()));
        Ok(())
    }

    fn settings(&mut self) -> Result<Settings, CaError> {
        Ok(Settings::of(self.state))
    }

    fn put_settings(&mut self, settings: Settings) -> Result<(), CaError> {
        let s = &mut self.state;
        s.trust_domain = settings.trust_domain;
        s.server = settings.server;
        s.server_sans = settings.server_sans;
        s.ca_pin = settings.ca_pin;
        s.agent_listener = settings.agent_listener;
        Ok(())
    }

    fn prune(&mut self, now: Unix) -> Result<(), CaError> {
        self.state.prune(now);
        Ok(())
    }
}
