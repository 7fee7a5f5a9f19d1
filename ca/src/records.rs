//! The CA's state as records: what one change reads and writes ([`Tx`]), by key, so that a
//! store keeping records apart (rows) can make a change cost what the change touches, not
//! what the state holds. Every change of the CA goes through a [`Tx`]
//! ([`Store::update`](crate::Store)); whole-state reads remain for what needs everything
//! (a proxy's first snapshot, `store migrate`).

use crate::error::CaError;
use crate::state::{
    AgentGrant, AgentListener, CertRecord, OperatorRecord, State, TlsRecord, TokenRecord, Unix,
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
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub acme_accounts: std::collections::BTreeMap<String, String>,
    /// The ports agents may be granted (`token create --tcp-port`), as the last proxy
    /// configured with a range recorded it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<crate::ports::PortRange>,
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
            acme_accounts: self.acme_accounts,
            ports: self.ports,
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
            acme_accounts: s.acme_accounts.clone(),
            ports: s.ports,
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

    /// Every agent's grant, by agent, as [`Tx::each_token`].
    fn each_grant(
        &mut self,
        each: &mut dyn FnMut(String, AgentGrant) -> bool,
    ) -> Result<(), CaError>;

    /// The terminated name `name`, if it is one.
    fn tls(&mut self, name: &str) -> Result<Option<TlsRecord>, CaError>;
    /// Adds a terminated name or replaces its record.
    fn put_tls(&mut self, record: TlsRecord) -> Result<(), CaError>;
    /// Passes `name` through again (its record goes).
    fn remove_tls(&mut self, name: &str) -> Result<(), CaError>;
    /// Every terminated name, by name, as [`Tx::each_token`].
    fn each_tls(&mut self, each: &mut dyn FnMut(TlsRecord) -> bool) -> Result<(), CaError>;

    fn settings(&mut self) -> Result<Settings, CaError>;
    fn put_settings(&mut self, settings: Settings) -> Result<(), CaError>;

    /// Drops records that can no longer matter ([`State::prune`]); a store may also do
    /// this on its own schedule.
    fn prune(&mut self, now: Unix) -> Result<(), CaError>;
}
