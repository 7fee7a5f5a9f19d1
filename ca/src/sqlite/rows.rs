//! The rows of one SQLite transaction as a [`Tx`]: each record's key columns and its JSON,
//! every write noted in `changes`; and the whole-state forms (export, import, the writes a
//! changed document needs).

use rusqlite::{params, OptionalExtension};
use serde::{de::DeserializeOwned, Serialize};

use super::{SqliteStore, CHANGES_KEPT};
use crate::error::CaError;
use crate::records::{Settings, Tx};
use crate::state::{
    AgentGrant, CertRecord, OperatorRecord, State, TlsRecord, TokenRecord, Unix, RETENTION_SECS,
};

/// A [`Tx`] on the rows of one SQLite transaction.
pub(super) struct SqlTx<'a> {
    pub(super) tx: &'a rusqlite::Transaction<'a>,
    pub(super) store: &'a SqliteStore,
}

impl SqlTx<'_> {
    fn one<T: DeserializeOwned>(&self, sql: &str, key: &str) -> Result<Option<T>, CaError> {
        let doc: Option<String> = self
            .tx
            .query_row(sql, params![key], |r| r.get(0))
            .optional()
            .map_err(|e| self.store.error(e))?;
        doc.map(|d| self.parse(&d)).transpose()
    }

    fn many<T: DeserializeOwned>(
        &self,
        sql: &str,
        key: &[&dyn rusqlite::ToSql],
    ) -> Result<Vec<T>, CaError> {
        let mut stmt = self
            .tx
            .prepare_cached(sql)
            .map_err(|e| self.store.error(e))?;
        let docs = stmt
            .query_map(key, |r| r.get::<_, String>(0))
            .map_err(|e| self.store.error(e))?;
        let mut out = Vec::new();
        for doc in docs {
            out.push(self.parse(&doc.map_err(|e| self.store.error(e))?)?);
        }
        Ok(out)
    }

    /// Calls `each` with the key and the record of every row `sql` selects (key, JSON), one
    /// row at a time, while it returns true.
    fn each<T: DeserializeOwned>(
        &self,
        sql: &str,
        each: &mut dyn FnMut(String, T) -> bool,
    ) -> Result<(), CaError> {
        let mut stmt = self.tx.prepare(sql).map_err(|e| self.store.error(e))?;
        let mut rows = stmt.query([]).map_err(|e| self.store.error(e))?;
        while let Some(row) = rows.next().map_err(|e| self.store.error(e))? {
            let key: String = row.get(0).map_err(|e| self.store.error(e))?;
            let doc: String = row.get(1).map_err(|e| self.store.error(e))?;
            if !each(key, self.parse(&doc)?) {
                break;
            }
        }
        Ok(())
    }

    fn parse<T: DeserializeOwned>(&self, doc: &str) -> Result<T, CaError> {
        serde_json::from_str(doc).map_err(|e| self.store.corrupt(e))
    }

    fn run(&self, sql: &str, values: &[&dyn rusqlite::ToSql]) -> Result<(), CaError> {
        let mut stmt = self
            .tx
            .prepare_cached(sql)
            .map_err(|e| self.store.error(e))?;
        stmt.execute(values).map_err(|e| self.store.error(e))?;
        Ok(())
    }

    /// Records that the record `kind`/`key` changed (the state's version moves).
    fn changed(&self, kind: &str, key: &str) -> Result<(), CaError> {
        self.run(
            "INSERT INTO changes (kind, key) VALUES (?1, ?2)",
            &[&kind, &key],
        )
    }

    /// Every record, as one document.
    pub(super) fn export(&mut self) -> Result<State, CaError> {
        let mut state = State {
            tokens: self.many("SELECT doc FROM tokens ORDER BY rowid", &[])?,
            certs: self.many("SELECT doc FROM certs ORDER BY rowid", &[])?,
            operators: self.many("SELECT doc FROM operators ORDER BY rowid", &[])?,
            ..self.settings()?.into_state()
        };
        let keyed = |sql: &str| -> Result<Vec<(String, String)>, CaError> {
            let mut stmt = self.tx.prepare(sql).map_err(|e| self.store.error(e))?;
            let rows = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(|e| self.store.error(e))?;
            rows.collect::<Result<_, _>>()
                .map_err(|e| self.store.error(e))
        };
        for (agent, doc) in keyed("SELECT agent, doc FROM grants")? {
            state.agents.insert(agent, self.parse(&doc)?);
        }
        for (agent, doc) in keyed("SELECT agent, doc FROM access")? {
            state.access.insert(agent, self.parse(&doc)?);
        }
        for (name, doc) in keyed("SELECT name, doc FROM tls")? {
            state.tls.insert(name, self.parse(&doc)?);
        }
        Ok(state)
    }

    /// Writes every record of `state` (into an empty store).
    pub(super) fn import(&mut self, state: &State) -> Result<(), CaError> {
        self.put_settings(Settings::of(state))?;
        for t in &state.tokens {
            self.put_token(t.clone())?;
        }
        for c in &state.certs {
            self.put_cert(c.clone())?;
        }
        for o in &state.operators {
            self.put_operator(o.clone())?;
        }
        for (agent, grant) in &state.agents {
            self.put_grant(agent, grant.clone())?;
        }
        for record in state.tls.values() {
            self.put_tls(record.clone())?;
        }
        for (agent, names) in &state.access {
            self.put_access(agent, names.clone())?;
        }
        Ok(())
    }
}

fn json(record: &impl Serialize) -> String {
    serde_json::to_string(record).expect("records serialize")
}

/// When a token stops mattering: once used, or at its expiry.
fn token_end(t: &TokenRecord) -> Unix {
    t.used.as_ref().map_or(t.expires, |u| u.at.min(t.expires))
}

impl Tx for SqlTx<'_> {
    fn token(&mut self, id: &str) -> Result<Option<TokenRecord>, CaError> {
        self.one("SELECT doc FROM tokens WHERE id = ?1", id)
    }

    fn tokens_of(&mut self, agent: &str) -> Result<Vec<TokenRecord>, CaError> {
        self.many(
            "SELECT doc FROM tokens WHERE agent = ?1 ORDER BY rowid",
            &[&agent],
        )
    }

    fn put_token(&mut self, token: TokenRecord) -> Result<(), CaError> {
        self.run(
            "INSERT INTO tokens (id, agent, ended, doc) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (id) DO UPDATE SET agent = ?2, ended = ?3, doc = ?4",
            &[&token.id, &token.agent, &token_end(&token), &json(&token)],
        )?;
        self.changed("token", &token.id)
    }

    fn cert(&mut self, serial: &str) -> Result<Option<CertRecord>, CaError> {
        self.one("SELECT doc FROM certs WHERE serial = ?1", serial)
    }

    fn certs_of(&mut self, agent: &str) -> Result<Vec<CertRecord>, CaError> {
        self.many(
            "SELECT doc FROM certs WHERE agent = ?1 ORDER BY rowid",
            &[&agent],
        )
    }

    fn put_cert(&mut self, cert: CertRecord) -> Result<(), CaError> {
        self.run(
            "INSERT INTO certs (serial, agent, not_after, doc) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (serial) DO UPDATE SET agent = ?2, not_after = ?3, doc = ?4",
            &[&cert.serial, &cert.agent, &cert.not_after, &json(&cert)],
        )?;
        self.changed("cert", &cert.serial)
    }

    fn grant(&mut self, agent: &str) -> Result<Option<AgentGrant>, CaError> {
        self.one("SELECT doc FROM grants WHERE agent = ?1", agent)
    }

    fn put_grant(&mut self, agent: &str, grant: AgentGrant) -> Result<(), CaError> {
        self.run(
            "INSERT INTO grants (agent, doc) VALUES (?1, ?2) \
             ON CONFLICT (agent) DO UPDATE SET doc = ?2",
            &[&agent, &json(&grant)],
        )?;
        self.changed("grant", agent)
    }

    fn access(&mut self, agent: &str) -> Result<Vec<String>, CaError> {
        Ok(self
            .one("SELECT doc FROM access WHERE agent = ?1", agent)?
            .unwrap_or_default())
    }

    fn put_access(&mut self, agent: &str, names: Vec<String>) -> Result<(), CaError> {
        if names.is_empty() {
            self.run("DELETE FROM access WHERE agent = ?1", &[&agent])?;
        } else {
            self.run(
                "INSERT INTO access (agent, doc) VALUES (?1, ?2) \
                 ON CONFLICT (agent) DO UPDATE SET doc = ?2",
                &[&agent, &json(&names)],
            )?;
        }
        self.changed("access", agent)
    }

    fn operator(&mut self, serial: &str) -> Result<Option<OperatorRecord>, CaError> {
        self.one("SELECT doc FROM operators WHERE serial = ?1", serial)
    }

    fn operators_named(&mut self, name: &str) -> Result<Vec<OperatorRecord>, CaError> {
        self.many(
            "SELECT doc FROM operators WHERE name = ?1 ORDER BY rowid",
            &[&name],
        )
    }

    fn put_operator(&mut self, operator: OperatorRecord) -> Result<(), CaError> {
        self.run(
            "INSERT INTO operators (serial, name, not_after, doc) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (serial) DO UPDATE SET name = ?2, not_after = ?3, doc = ?4",
            &[
                &operator.serial,
                &operator.name,
                &operator.not_after,
                &json(&operator),
            ],
        )?;
        self.changed("operator", &operator.serial)
    }

    fn each_token(&mut self, each: &mut dyn FnMut(TokenRecord) -> bool) -> Result<(), CaError> {
        self.each("SELECT '', doc FROM tokens ORDER BY rowid", &mut |_, t| {
            each(t)
        })
    }

    fn each_cert(&mut self, each: &mut dyn FnMut(CertRecord) -> bool) -> Result<(), CaError> {
        self.each("SELECT '', doc FROM certs ORDER BY rowid", &mut |_, c| {
            each(c)
        })
    }

    fn each_access(
        &mut self,
        each: &mut dyn FnMut(String, Vec<String>) -> bool,
    ) -> Result<(), CaError> {
        self.each("SELECT agent, doc FROM access ORDER BY agent", each)
    }

    fn each_grant(
        &mut self,
        each: &mut dyn FnMut(String, AgentGrant) -> bool,
    ) -> Result<(), CaError> {
        self.each("SELECT agent, doc FROM grants ORDER BY agent", each)
    }

    fn tls(&mut self, name: &str) -> Result<Option<TlsRecord>, CaError> {
        self.one("SELECT doc FROM tls WHERE name = ?1", name)
    }

    fn put_tls(&mut self, record: TlsRecord) -> Result<(), CaError> {
        self.run(
            "INSERT INTO tls (name, doc) VALUES (?1, ?2) \
             ON CONFLICT (name) DO UPDATE SET doc = ?2",
            &[&record.name, &json(&record)],
        )?;
        self.changed("tls", &record.name)
    }

    fn remove_tls(&mut self, name: &str) -> Result<(), CaError> {
        self.run("DELETE FROM tls WHERE name = ?1", &[&name])?;
        self.changed("tls", name)
    }

    fn each_tls(&mut self, each: &mut dyn FnMut(TlsRecord) -> bool) -> Result<(), CaError> {
        self.each("SELECT name, doc FROM tls ORDER BY name", &mut |_, r| {
            each(r)
        })
    }

    fn settings(&mut self) -> Result<Settings, CaError> {
        let settings: Option<Settings> =
            self.one("SELECT value FROM meta WHERE key = ?1", "settings")?;
        Ok(settings.unwrap_or_default())
    }

    fn put_settings(&mut self, settings: Settings) -> Result<(), CaError> {
        self.run(
            "INSERT INTO meta (key, value) VALUES ('settings', ?1) \
             ON CONFLICT (key) DO UPDATE SET value = ?1",
            &[&json(&settings)],
        )?;
        self.changed("settings", "")
    }

    fn prune(&mut self, now: Unix) -> Result<(), CaError> {
        let horizon = now - RETENTION_SECS;
        for (kind, sql) in [
            ("cert", "serial FROM certs WHERE not_after <= ?1"),
            ("operator", "serial FROM operators WHERE not_after <= ?1"),
            ("token", "id FROM tokens WHERE ended <= ?1"),
        ] {
            self.run(
                &format!("INSERT INTO changes (kind, key) SELECT '{kind}', {sql}"),
                &[&horizon],
            )?;
        }
        self.run("DELETE FROM certs WHERE not_after <= ?1", &[&horizon])?;
        self.run("DELETE FROM operators WHERE not_after <= ?1", &[&horizon])?;
        self.run("DELETE FROM tokens WHERE ended <= ?1", &[&horizon])?;
        self.run(
            "DELETE FROM changes WHERE seq <= (SELECT max(seq) FROM changes) - ?1",
            &[&CHANGES_KEPT],
        )
    }
}
