//! The CA's records as rows (schema version 2; 3 adds terminated names): each record's key, the columns lookups
//! need, and the record itself as JSONB, so that fields added later ride along as in the
//! document of earlier releases. Every write also adds its record's kind and key to
//! `revproxy.changes` under the version of the change that made it: what a proxy that
//! holds an older version reads to catch up ([`Store::changes_since`]).
//!
//! These are the queries, as async functions on one transaction; [`PgTx`] is the
//! synchronous [`Tx`] the CA's changes run on, each call waiting for its query
//! ([`Session::wait`]).
//!
//! [`Store::changes_since`]: revproxy_ca::Store::changes_since

use std::collections::HashMap;

use revproxy_ca::records::{Settings, Tx};
use revproxy_ca::state::{
    AgentGrant, CertRecord, OperatorRecord, State, TlsRecord, TokenRecord, Unix, RETENTION_SECS,
};
use revproxy_ca::{CaError, Changed};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio_postgres::types::ToSql;
use tokio_postgres::Transaction;

use super::session::{Fault, Session};

/// Versions whose changes are kept: a proxy further behind reads the state whole.
const CHANGES_KEPT: i64 = 100_000;
/// Rows one statement writes when a whole state is imported.
const IMPORT_CHUNK: usize = 5_000;

fn json(record: &impl Serialize) -> String {
    serde_json::to_string(record).expect("records serialize")
}

fn parse<T: DeserializeOwned>(doc: &str) -> Result<T, Fault> {
    serde_json::from_str(doc).map_err(|e| Fault::Corrupt(e.to_string()))
}

/// When a token stops mattering: once used, or at its expiry.
fn token_end(t: &TokenRecord) -> Unix {
    t.used.as_ref().map_or(t.expires, |u| u.at.min(t.expires))
}

/// The record `sql` selects by `key` (its JSON as text), if any.
async fn one<T: DeserializeOwned>(
    tx: &Transaction<'_>,
    sql: &str,
    key: &str,
) -> Result<Option<T>, Fault> {
    let row = tx.query_opt(sql, &[&key]).await?;
    row.map(|r| parse(r.get(0))).transpose()
}

/// The records `sql` selects (their JSON as text), in its order.
async fn many<T: DeserializeOwned>(
    tx: &Transaction<'_>,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<T>, Fault> {
    let rows = tx.query(sql, params).await?;
    rows.iter().map(|r| parse(r.get(0))).collect()
}

/// Notes that the record `kind`/`key` changed in version `version`.
async fn changed(tx: &Transaction<'_>, version: i64, kind: &str, key: &str) -> Result<(), Fault> {
    tx.execute(
        "INSERT INTO revproxy.changes (version, kind, key) VALUES ($1, $2, $3)",
        &[&version, &kind, &key],
    )
    .await?;
    Ok(())
}

pub(super) async fn token(tx: &Transaction<'_>, id: &str) -> Result<Option<TokenRecord>, Fault> {
    one(
        tx,
        "SELECT doc::text FROM revproxy.tokens WHERE id = $1",
        id,
    )
    .await
}

pub(super) async fn cert(tx: &Transaction<'_>, serial: &str) -> Result<Option<CertRecord>, Fault> {
    let sql = "SELECT doc::text FROM revproxy.certs WHERE serial = $1";
    one(tx, sql, serial).await
}

pub(super) async fn certs_of(tx: &Transaction<'_>, agent: &str) -> Result<Vec<CertRecord>, Fault> {
    let sql = "SELECT doc::text FROM revproxy.certs WHERE agent = $1 ORDER BY n";
    many(tx, sql, &[&agent]).await
}

pub(super) async fn grant(tx: &Transaction<'_>, agent: &str) -> Result<Option<AgentGrant>, Fault> {
    one(
        tx,
        "SELECT doc::text FROM revproxy.grants WHERE agent = $1",
        agent,
    )
    .await
}

pub(super) async fn access(tx: &Transaction<'_>, agent: &str) -> Result<Vec<String>, Fault> {
    let sql = "SELECT doc::text FROM revproxy.access WHERE agent = $1";
    Ok(one(tx, sql, agent).await?.unwrap_or_default())
}

pub(super) async fn operator(
    tx: &Transaction<'_>,
    serial: &str,
) -> Result<Option<OperatorRecord>, Fault> {
    let sql = "SELECT doc::text FROM revproxy.operators WHERE serial = $1";
    one(tx, sql, serial).await
}

pub(super) async fn settings(tx: &Transaction<'_>) -> Result<Settings, Fault> {
    let row = tx
        .query_opt("SELECT settings::text FROM revproxy.state", &[])
        .await?;
    match row.and_then(|r| r.get::<_, Option<&str>>(0).map(str::to_owned)) {
        Some(doc) => parse(&doc),
        None => Ok(Settings::default()),
    }
}

/// Every record, as one document (in one transaction that sees one moment).
pub(super) async fn export(tx: &Transaction<'_>) -> Result<State, Fault> {
    let mut state = State {
        tokens: many(tx, "SELECT doc::text FROM revproxy.tokens ORDER BY n", &[]).await?,
        certs: many(tx, "SELECT doc::text FROM revproxy.certs ORDER BY n", &[]).await?,
        operators: many(
            tx,
            "SELECT doc::text FROM revproxy.operators ORDER BY n",
            &[],
        )
        .await?,
        ..settings(tx).await?.into_state()
    };
    for row in (tx.query("SELECT agent, doc::text FROM revproxy.grants", &[])).await? {
        state.agents.insert(row.get(0), parse(row.get(1))?);
    }
    for row in (tx.query("SELECT agent, doc::text FROM revproxy.access", &[])).await? {
        state.access.insert(row.get(0), parse(row.get(1))?);
    }
    for row in (tx.query("SELECT name, doc::text FROM revproxy.tls", &[])).await? {
        state.tls.insert(row.get(0), parse(row.get(1))?);
    }
    Ok(state)
}

/// Writes every record of `state` into empty tables, a few thousand rows per statement,
/// and its settings into the state's row (which exists). Notes no changes: a proxy reads
/// a state it has no version of whole.
pub(super) async fn import(tx: &Transaction<'_>, state: &State) -> Result<(), Fault> {
    tx.execute(
        "UPDATE revproxy.state SET settings = $1::text::jsonb",
        &[&json(&Settings::of(state))],
    )
    .await?;
    for chunk in state.tokens.chunks(IMPORT_CHUNK) {
        let ids: Vec<&str> = chunk.iter().map(|t| t.id.as_str()).collect();
        let agents: Vec<&str> = chunk.iter().map(|t| t.agent.as_str()).collect();
        let ends: Vec<i64> = chunk.iter().map(token_end).collect();
        let docs: Vec<String> = chunk.iter().map(json).collect();
        tx.execute(
            "INSERT INTO revproxy.tokens (id, agent, ended, doc) \
             SELECT i, a, e, d::jsonb FROM unnest($1::text[], $2::text[], $3::int8[], $4::text[]) \
             WITH ORDINALITY AS u(i, a, e, d, o) ORDER BY o",
            &[&ids, &agents, &ends, &docs],
        )
        .await?;
    }
    for chunk in state.certs.chunks(IMPORT_CHUNK) {
        let serials: Vec<&str> = chunk.iter().map(|c| c.serial.as_str()).collect();
        let agents: Vec<&str> = chunk.iter().map(|c| c.agent.as_str()).collect();
        let ends: Vec<i64> = chunk.iter().map(|c| c.not_after).collect();
        let docs: Vec<String> = chunk.iter().map(json).collect();
        tx.execute(
            "INSERT INTO revproxy.certs (serial, agent, not_after, doc) \
             SELECT s, a, e, d::jsonb FROM unnest($1::text[], $2::text[], $3::int8[], $4::text[]) \
             WITH ORDINALITY AS u(s, a, e, d, o) ORDER BY o",
            &[&serials, &agents, &ends, &docs],
        )
        .await?;
    }
    for o in &state.operators {
        put_operator(tx, None, o).await?;
    }
    for record in state.tls.values() {
        put_tls(tx, None, record).await?;
    }
    let grants: Vec<(&String, String)> = (state.agents.iter())
        .map(|(agent, g)| (agent, json(g)))
        .collect();
    let access: Vec<(&String, String)> = (state.access.iter())
        .map(|(agent, names)| (agent, json(names)))
        .collect();
    for (table, pairs) in [("grants", grants), ("access", access)] {
        for chunk in pairs.chunks(IMPORT_CHUNK) {
            let agents: Vec<&str> = chunk.iter().map(|(a, _)| a.as_str()).collect();
            let docs: Vec<&str> = chunk.iter().map(|(_, d)| d.as_str()).collect();
            let sql = format!(
                "INSERT INTO revproxy.{table} (agent, doc) \
                 SELECT a, d::jsonb FROM unnest($1::text[], $2::text[]) AS u(a, d)"
            );
            tx.execute(&sql, &[&agents, &docs]).await?;
        }
    }
    Ok(())
}

/// Adds or replaces an operator certificate; notes the change when `version` says which.
async fn put_operator(
    tx: &Transaction<'_>,
    version: Option<i64>,
    o: &OperatorRecord,
) -> Result<(), Fault> {
    tx.execute(
        "INSERT INTO revproxy.operators (serial, name, not_after, doc) \
         VALUES ($1, $2, $3, $4::text::jsonb) ON CONFLICT (serial) DO UPDATE \
         SET name = excluded.name, not_after = excluded.not_after, doc = excluded.doc",
        &[&o.serial, &o.name, &o.not_after, &json(o)],
    )
    .await?;
    match version {
        Some(v) => changed(tx, v, "operator", &o.serial).await,
        None => Ok(()),
    }
}

/// Adds or replaces a terminated name; notes the change when `version` says which.
async fn put_tls(
    tx: &Transaction<'_>,
    version: Option<i64>,
    record: &TlsRecord,
) -> Result<(), Fault> {
    tx.execute(
        "INSERT INTO revproxy.tls (name, doc) VALUES ($1, $2::text::jsonb) \
         ON CONFLICT (name) DO UPDATE SET doc = excluded.doc",
        &[&record.name, &json(record)],
    )
    .await?;
    match version {
        Some(v) => changed(tx, v, "tls", &record.name).await,
        None => Ok(()),
    }
}

/// The records changed after version `since` up to `newest` (each kind and key once, by
/// its last change), at most `limit`.
pub(super) async fn changed_keys(
    tx: &Transaction<'_>,
    since: i64,
    newest: i64,
    limit: i64,
) -> Result<Vec<(String, String)>, Fault> {
    let rows = tx
        .query(
            "SELECT kind, key FROM revproxy.changes WHERE version > $1 AND version <= $2 \
             GROUP BY kind, key ORDER BY max(version) LIMIT $3",
            &[&since, &newest, &limit],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// The records whose JSON `sql` selects with their key (`$1`: the keys wanted), by key.
async fn by_key<T: DeserializeOwned>(
    tx: &Transaction<'_>,
    sql: &str,
    keys: &[&str],
) -> Result<HashMap<String, T>, Fault> {
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    let rows = tx.query(sql, &[&keys]).await?;
    rows.iter()
        .map(|r| Ok((r.get(0), parse(r.get(1))?)))
        .collect()
}

/// The records `keys` name (from [`changed_keys`]), as they are now: a few queries in
/// all, however many changed (one round trip a record would not keep up with a burst of
/// enrollments on a database a millisecond away).
pub(super) async fn changed_records(
    tx: &Transaction<'_>,
    keys: Vec<(String, String)>,
) -> Result<Vec<Changed>, Fault> {
    let of = |kind: &str| -> Vec<&str> {
        (keys.iter())
            .filter(|(k, _)| k == kind)
            .map(|(_, key)| key.as_str())
            .collect()
    };
    let sql = "SELECT id, doc::text FROM revproxy.tokens WHERE id = ANY($1)";
    let mut tokens: HashMap<String, TokenRecord> = by_key(tx, sql, &of("token")).await?;
    let sql = "SELECT serial, doc::text FROM revproxy.certs WHERE serial = ANY($1)";
    let mut certs: HashMap<String, CertRecord> = by_key(tx, sql, &of("cert")).await?;
    let sql = "SELECT agent, doc::text FROM revproxy.grants WHERE agent = ANY($1)";
    let mut grants: HashMap<String, AgentGrant> = by_key(tx, sql, &of("grant")).await?;
    let sql = "SELECT agent, doc::text FROM revproxy.access WHERE agent = ANY($1)";
    let mut access: HashMap<String, Vec<String>> = by_key(tx, sql, &of("access")).await?;
    let sql = "SELECT serial, doc::text FROM revproxy.operators WHERE serial = ANY($1)";
    let mut operators: HashMap<String, OperatorRecord> = by_key(tx, sql, &of("operator")).await?;
    let sql = "SELECT name, doc::text FROM revproxy.tls WHERE name = ANY($1)";
    let mut tls: HashMap<String, TlsRecord> = by_key(tx, sql, &of("tls")).await?;
    // Every certificate of the agents whose certificates changed, oldest first.
    let mut agents: Vec<&str> = certs.values().map(|c| c.agent.as_str()).collect();
    agents.sort_unstable();
    agents.dedup();
    let mut of_agent: HashMap<String, Vec<CertRecord>> = HashMap::new();
    if !agents.is_empty() {
        let sql = "SELECT doc::text FROM revproxy.certs WHERE agent = ANY($1) ORDER BY n";
        for cert in many::<CertRecord>(tx, sql, &[&agents]).await? {
            of_agent.entry(cert.agent.clone()).or_default().push(cert);
        }
    }
    // Each kind and key comes once (`changed_keys` groups them).
    Ok((keys.into_iter())
        .map(|(kind, key)| match kind.as_str() {
            "token" => Changed::Token(key.clone(), tokens.remove(&key)),
            "cert" => {
                let cert = certs.remove(&key);
                let of_agent = (cert.as_ref())
                    .and_then(|c| of_agent.get(&c.agent).cloned())
                    .unwrap_or_default();
                Changed::Cert {
                    serial: key,
                    cert,
                    of_agent,
                }
            }
            "grant" => Changed::Grant(key.clone(), grants.remove(&key)),
            "access" => Changed::Access(key.clone(), access.remove(&key).unwrap_or_default()),
            "operator" => Changed::Operator(key.clone(), operators.remove(&key)),
            "tls" => Changed::Tls(key.clone(), tls.remove(&key)),
            _ => Changed::Settings,
        })
        .collect())
}

/// A [`Tx`] on the rows of one transaction; its writes belong to version `next`.
pub(super) struct PgTx<'s, 'c> {
    pub(super) tx: Transaction<'c>,
    pub(super) session: &'s mut Session,
    /// The version this change brings the state to, if it writes.
    pub(super) next: i64,
    /// Whether it wrote anything.
    pub(super) wrote: bool,
}

/// Rows a listing reads at a time.
const EACH_BATCH: i32 = 1_000;

impl PgTx<'_, '_> {
    /// Calls `each` with the key and the record of every row `sql` selects (key, JSON as
    /// text), [`EACH_BATCH`] rows at a time from one cursor, while it returns true. Each
    /// batch has a call's time: a long listing is many reads, not one.
    fn each<T: DeserializeOwned>(
        &mut self,
        sql: &str,
        each: &mut dyn FnMut(String, T) -> bool,
    ) -> Result<(), CaError> {
        let portal = self.session.wait(self.tx.bind(sql, &[]))?;
        loop {
            self.session.allow(super::OP_TIMEOUT);
            let rows = self
                .session
                .wait(self.tx.query_portal(&portal, EACH_BATCH))?;
            let last = rows.len() < EACH_BATCH as usize;
            for row in rows {
                let record = parse(row.get(1)).map_err(|f| self.session.fault(f))?;
                if !each(row.get(0), record) {
                    return Ok(());
                }
            }
            if last {
                return Ok(());
            }
        }
    }

    /// Writes a record with `sql` (`$1` its key, then `values`) and notes the change.
    fn put(
        &mut self,
        kind: &str,
        sql: &str,
        key: &str,
        values: &[&(dyn ToSql + Sync)],
    ) -> Result<(), CaError> {
        self.wrote = true;
        let (tx, next) = (&self.tx, self.next);
        self.session.wait(async move {
            let mut params: Vec<&(dyn ToSql + Sync)> = vec![&key];
            params.extend_from_slice(values);
            tx.execute(sql, &params).await?;
            changed(tx, next, kind, key).await
        })
    }
}

impl Tx for PgTx<'_, '_> {
    fn token(&mut self, id: &str) -> Result<Option<TokenRecord>, CaError> {
        self.session.wait(token(&self.tx, id))
    }

    fn tokens_of(&mut self, agent: &str) -> Result<Vec<TokenRecord>, CaError> {
        let sql = "SELECT doc::text FROM revproxy.tokens WHERE agent = $1 ORDER BY n";
        self.session.wait(many(&self.tx, sql, &[&agent]))
    }

    fn put_token(&mut self, t: TokenRecord) -> Result<(), CaError> {
        self.put(
            "token",
            "INSERT INTO revproxy.tokens (id, agent, ended, doc) \
             VALUES ($1, $2, $3, $4::text::jsonb) ON CONFLICT (id) DO UPDATE \
             SET agent = excluded.agent, ended = excluded.ended, doc = excluded.doc",
            &t.id,
            &[&t.agent, &token_end(&t), &json(&t)],
        )
    }

    fn cert(&mut self, serial: &str) -> Result<Option<CertRecord>, CaError> {
        self.session.wait(cert(&self.tx, serial))
    }

    fn certs_of(&mut self, agent: &str) -> Result<Vec<CertRecord>, CaError> {
        self.session.wait(certs_of(&self.tx, agent))
    }

    fn put_cert(&mut self, c: CertRecord) -> Result<(), CaError> {
        self.put(
            "cert",
            "INSERT INTO revproxy.certs (serial, agent, not_after, doc) \
             VALUES ($1, $2, $3, $4::text::jsonb) ON CONFLICT (serial) DO UPDATE \
             SET agent = excluded.agent, not_after = excluded.not_after, doc = excluded.doc",
            &c.serial,
            &[&c.agent, &c.not_after, &json(&c)],
        )
    }

    fn grant(&mut self, agent: &str) -> Result<Option<AgentGrant>, CaError> {
        self.session.wait(grant(&self.tx, agent))
    }

    fn put_grant(&mut self, agent: &str, g: AgentGrant) -> Result<(), CaError> {
        self.put(
            "grant",
            "INSERT INTO revproxy.grants (agent, doc) VALUES ($1, $2::text::jsonb) \
             ON CONFLICT (agent) DO UPDATE SET doc = excluded.doc",
            agent,
            &[&json(&g)],
        )
    }

    fn access(&mut self, agent: &str) -> Result<Vec<String>, CaError> {
        self.session.wait(access(&self.tx, agent))
    }

    fn put_access(&mut self, agent: &str, names: Vec<String>) -> Result<(), CaError> {
        if names.is_empty() {
            let sql = "DELETE FROM revproxy.access WHERE agent = $1";
            return self.put("access", sql, agent, &[]);
        }
        self.put(
            "access",
            "INSERT INTO revproxy.access (agent, doc) VALUES ($1, $2::text::jsonb) \
             ON CONFLICT (agent) DO UPDATE SET doc = excluded.doc",
            agent,
            &[&json(&names)],
        )
    }

    fn operator(&mut self, serial: &str) -> Result<Option<OperatorRecord>, CaError> {
        self.session.wait(operator(&self.tx, serial))
    }

    fn operators_named(&mut self, name: &str) -> Result<Vec<OperatorRecord>, CaError> {
        let sql = "SELECT doc::text FROM revproxy.operators WHERE name = $1 ORDER BY n";
        self.session.wait(many(&self.tx, sql, &[&name]))
    }

    fn put_operator(&mut self, o: OperatorRecord) -> Result<(), CaError> {
        self.wrote = true;
        let next = self.next;
        self.session.wait(put_operator(&self.tx, Some(next), &o))
    }

    fn each_token(&mut self, each: &mut dyn FnMut(TokenRecord) -> bool) -> Result<(), CaError> {
        let sql = "SELECT '', doc::text FROM revproxy.tokens ORDER BY n";
        self.each(sql, &mut |_, t| each(t))
    }

    fn each_cert(&mut self, each: &mut dyn FnMut(CertRecord) -> bool) -> Result<(), CaError> {
        let sql = "SELECT '', doc::text FROM revproxy.certs ORDER BY n";
        self.each(sql, &mut |_, c| each(c))
    }

    fn each_access(
        &mut self,
        each: &mut dyn FnMut(String, Vec<String>) -> bool,
    ) -> Result<(), CaError> {
        // Bytewise, as the other stores order them, whatever the database's collation.
        let sql = "SELECT agent, doc::text FROM revproxy.access ORDER BY agent COLLATE \"C\"";
        self.each(sql, each)
    }

    fn each_grant(
        &mut self,
        each: &mut dyn FnMut(String, AgentGrant) -> bool,
    ) -> Result<(), CaError> {
        let sql = "SELECT agent, doc::text FROM revproxy.grants ORDER BY agent COLLATE \"C\"";
        self.each(sql, each)
    }

    fn tls(&mut self, name: &str) -> Result<Option<TlsRecord>, CaError> {
        let sql = "SELECT doc::text FROM revproxy.tls WHERE name = $1";
        self.session.wait(one(&self.tx, sql, name))
    }

    fn put_tls(&mut self, record: TlsRecord) -> Result<(), CaError> {
        self.wrote = true;
        let next = self.next;
        self.session.wait(put_tls(&self.tx, Some(next), &record))
    }

    fn remove_tls(&mut self, name: &str) -> Result<(), CaError> {
        self.wrote = true;
        let (tx, next) = (&self.tx, self.next);
        self.session.wait(async move {
            tx.execute("DELETE FROM revproxy.tls WHERE name = $1", &[&name])
                .await?;
            changed(tx, next, "tls", name).await
        })
    }

    fn each_tls(&mut self, each: &mut dyn FnMut(TlsRecord) -> bool) -> Result<(), CaError> {
        let sql = "SELECT name, doc::text FROM revproxy.tls ORDER BY name COLLATE \"C\"";
        self.each(sql, &mut |_, r| each(r))
    }

    fn settings(&mut self) -> Result<Settings, CaError> {
        self.session.wait(settings(&self.tx))
    }

    fn put_settings(&mut self, s: Settings) -> Result<(), CaError> {
        self.wrote = true;
        let (tx, next) = (&self.tx, self.next);
        self.session.wait(async move {
            let sql = "UPDATE revproxy.state SET settings = $1::text::jsonb";
            tx.execute(sql, &[&json(&s)]).await?;
            changed(tx, next, "settings", "").await
        })
    }

    fn prune(&mut self, now: Unix) -> Result<(), CaError> {
        self.wrote = true;
        let (tx, next, horizon) = (&self.tx, self.next, now - RETENTION_SECS);
        self.session.wait(async move {
            for (table, key, end) in [
                ("certs", "serial", "not_after"),
                ("operators", "serial", "not_after"),
                ("tokens", "id", "ended"),
            ] {
                let kind = &table[..table.len() - 1];
                let sql = format!(
                    "WITH gone AS (DELETE FROM revproxy.{table} WHERE {end} <= $1 RETURNING {key}) \
                     INSERT INTO revproxy.changes (version, kind, key) \
                     SELECT $2, $3, {key} FROM gone"
                );
                tx.execute(&sql, &[&horizon, &next, &kind]).await?;
            }
            let trim = next - CHANGES_KEPT;
            tx.execute("DELETE FROM revproxy.changes WHERE version <= $1", &[&trim])
                .await?;
            let sql = "UPDATE revproxy.state SET trimmed = greatest(trimmed, $1)";
            tx.execute(sql, &[&trim]).await?;
            Ok::<_, Fault>(())
        })
    }
}
