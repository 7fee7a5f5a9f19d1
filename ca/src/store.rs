//! Where the CA state lives: the [`Store`] trait. The embedded default is `sqlite.rs`
//! (records in `state.db`); `state.json`, the file of earlier releases
//! ([`StateFile`](crate::state::StateFile)), is only read, to be migrated.
//!
//! Every change runs in one transaction ([`Store::transact`], [`Tx`]) that reads the
//! newest records under the store's write lock and makes its writes durable before the
//! lock is released, so that concurrent writers (two proxies trading the same token,
//! `revproxy cert revoke` beside a renewal) see each other's changes and never lose one.
//! A store several proxies share also keeps the list of those proxies ([`Store::announce`], [`Store::proxies`]), which agents use
//! to keep a tunnel to each of them.
//!
//! The PostgreSQL store lives in the main crate (it needs sockets and an async runtime,
//! which this crate does without).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::CaError;
use crate::records::Tx;
use crate::state::State;

/// A proxy serving from a shared store, as the others and the agents see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyEntry {
    /// The proxy's identity: the last segment of the `spiffe://TRUST_DOMAIN/proxy/ID` name
    /// in its server certificate.
    pub id: String,
    /// Where agents reach its agent listener (`host:port`), when it says.
    pub address: Option<String>,
}

/// What changed in a store after a version ([`Store::changes_since`]): every record that
/// changed, as it is now.
#[derive(Debug, Default)]
pub struct Changes {
    /// The version these changes bring the state to.
    pub version: u64,
    pub records: Vec<Changed>,
}

/// One record that changed, as it is now (`None`, or empty: it is gone).
#[derive(Debug)]
pub enum Changed {
    Token(String, Option<crate::state::TokenRecord>),
    /// A certificate, with every certificate its agent has now (for the agent's expiry).
    Cert {
        serial: String,
        cert: Option<crate::state::CertRecord>,
        of_agent: Vec<crate::state::CertRecord>,
    },
    Grant(String, Option<crate::state::AgentGrant>),
    Access(String, Vec<String>),
    Operator(String, Option<crate::state::OperatorRecord>),
    /// A terminated name (`None`: passed through again).
    Tls(String, Option<crate::state::TlsRecord>),
    /// The CA-wide settings (nothing a proxy's snapshot holds).
    Settings,
}

impl Changed {
    /// The record of `kind` (as a store's change log names it: `token`, `cert`, `grant`,
    /// `access`, `operator`, `tls`, `settings`) and `key`, as `tx` reads it now.
    pub fn read(tx: &mut dyn Tx, kind: &str, key: String) -> Result<Changed, CaError> {
        Ok(match kind {
            "token" => Changed::Token(key.clone(), tx.token(&key)?),
            "cert" => {
                let cert = tx.cert(&key)?;
                let of_agent = match &cert {
                    Some(c) => tx.certs_of(&c.agent)?,
                    None => Vec::new(),
                };
                Changed::Cert {
                    serial: key,
                    cert,
                    of_agent,
                }
            }
            "grant" => Changed::Grant(key.clone(), tx.grant(&key)?),
            "access" => Changed::Access(key.clone(), tx.access(&key)?),
            "operator" => Changed::Operator(key.clone(), tx.operator(&key)?),
            "tls" => Changed::Tls(key.clone(), tx.tls(&key)?),
            _ => Changed::Settings,
        })
    }
}

/// Where the CA state lives.
pub trait Store: Send + Sync + std::fmt::Debug {
    /// What to call this store in messages and logs: a path, or a database URL without
    /// its password.
    fn describe(&self) -> String;

    /// The current state.
    fn read(&self) -> Result<State, CaError>;

    /// A number that changes whenever the state does (cheaper than [`Store::read`]).
    fn version(&self) -> Result<u64, CaError>;

    /// Runs `change` once in one transaction on the newest records, under the store's
    /// write lock; commits its writes if it returns true, durably before returning.
    /// Returns an error without calling `change` when the store cannot be reached or
    /// locked, and an error after it when the writes could not be committed.
    fn transact(&self, change: &mut (dyn FnMut(&mut dyn Tx) -> bool + Send))
        -> Result<(), CaError>;

    /// Runs `look` once on the newest records in one read (nothing it does is written),
    /// reading only what `look` asks for.
    fn view(&self, look: &mut (dyn FnMut(&mut dyn Tx) + Send)) -> Result<(), CaError>;

    /// The records that changed after version `since` (from [`Store::version`]), read
    /// together with the version they bring the state to; `None` when the store cannot
    /// say (it keeps no record of changes, or not back to `since`): read it whole then.
    fn changes_since(&self, since: u64) -> Result<Option<Changes>, CaError> {
        let _ = since;
        Ok(None)
    }

    /// Whether the store holds a state.
    fn has_state(&self) -> Result<bool, CaError>;

    /// Writes the first state of a new CA; refuses when the store holds one already.
    fn create(&self, state: &State) -> Result<(), CaError>;

    /// Whether several proxies can serve from this store at once.
    fn shared(&self) -> bool {
        false
    }

    /// Asks the store to call `wake` soon after the state changes, from any process.
    /// Stores that cannot are polled with [`Store::version`] instead.
    fn on_change(&self, wake: Arc<dyn Fn() + Send + Sync>) {
        let _ = wake;
    }

    /// Says that `proxy` is serving (repeated as a heartbeat).
    fn announce(&self, proxy: &ProxyEntry) -> Result<(), CaError> {
        let _ = proxy;
        Ok(())
    }

    /// Says that proxy `id` has stopped.
    fn withdraw(&self, id: &str) -> Result<(), CaError> {
        let _ = id;
        Ok(())
    }

    /// The proxies that announced themselves recently, this one included.
    fn proxies(&self) -> Result<Vec<ProxyEntry>, CaError> {
        Ok(Vec::new())
    }
}

impl dyn Store {
    /// Runs `change` on the newest records in one transaction and makes its writes
    /// durable ([`Store::transact`]). If `change` fails, nothing is written.
    pub fn update<T, E>(
        &self,
        change: impl FnOnce(&mut dyn Tx) -> Result<T, E> + Send,
    ) -> Result<T, E>
    where
        T: Send,
        E: From<CaError> + Send,
    {
        let mut change = Some(change);
        let mut out = None;
        self.transact(&mut |tx| {
            let change = change.take().expect("a store calls the change once");
            let result = change(tx);
            let commit = result.is_ok();
            out = Some(result);
            commit
        })?;
        out.expect("a store that succeeds has called the change")
    }

    /// What `look` reads from the newest records ([`Store::view`]).
    pub fn look<T: Send>(
        &self,
        look: impl FnOnce(&mut dyn Tx) -> Result<T, CaError> + Send,
    ) -> Result<T, CaError> {
        let mut look = Some(look);
        let mut out = None;
        self.view(&mut |tx| {
            let look = look.take().expect("a store calls the look once");
            out = Some(look(tx));
        })?;
        out.expect("a store that succeeds has called the look")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::Settings;

    fn store() -> (tempfile::TempDir, Arc<dyn Store>) {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(crate::sqlite::SqliteStore::new(dir.path()));
        store
            .create(&State {
                version: State::VERSION,
                ..State::default()
            })
            .unwrap();
        (dir, store)
    }

    /// A failed change writes nothing and its error comes back; a successful one is read
    /// back and moves the version; creating over a state is refused.
    #[test]
    fn update_through_the_trait() {
        let (_dir, store) = store();
        let before = store.version().unwrap();
        let failed: Result<(), CaError> = store.update(|tx| {
            let settings = Settings {
                server: "changed:1".into(),
                ..tx.settings()?
            };
            tx.put_settings(settings)?;
            Err(CaError::InvalidInput("no".into()))
        });
        assert!(matches!(failed, Err(CaError::InvalidInput(_))));
        assert_eq!(store.read().unwrap().server, "");
        assert_eq!(store.version().unwrap(), before);
        let n: Result<u32, CaError> = store.update(|tx| {
            let settings = Settings {
                server: "proxy.example.com:7443".into(),
                ..tx.settings()?
            };
            tx.put_settings(settings)?;
            Ok(7)
        });
        assert_eq!(n.unwrap(), 7);
        assert_eq!(store.read().unwrap().server, "proxy.example.com:7443");
        assert_ne!(store.version().unwrap(), before);
        assert!(matches!(
            store.create(&State::default()),
            Err(CaError::StoreHoldsState(_))
        ));
    }
}
