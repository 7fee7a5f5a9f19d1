//! The embedded store: the CA's records as rows of one SQLite file, `state.db` in the state
//! directory. A change reads and writes the rows it touches ([`Tx`]), in one transaction
//! that holds SQLite's write lock, so writers (a proxy enrolling, `revproxy cert revoke`)
//! see each other's changes and never lose one; readers never wait for a writer (WAL).
//!
//! Each record is a row: its key and the columns lookups need, and the record itself as
//! JSON, so that fields added later ride along as in the document (older readers ignore
//! them). Every write also appends its record's kind and key to `changes`, whose last
//! number is the state's version: what a proxy watching the state compares.
//!
//! A state directory that holds only the `state.json` of an earlier release is migrated
//! on first use, under the directory's lock: the records go into a new `state.db`, and
//! `state.json` is kept as `state.json.bak`.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};
use serde::{de::DeserializeOwned, Serialize};

use crate::error::CaError;
use crate::records::{Settings, Tx};
use crate::state::{
    AgentGrant, CertRecord, OperatorRecord, State, StateFile, TokenRecord, Unix, LOCK_TIMEOUT,
    RETENTION_SECS, STATE_FILE,
};
use crate::store::Store;

/// File name of the embedded store.
pub const DB_FILE: &str = "state.db";
/// What a migrated `state.json` is kept as.
pub const BACKUP_FILE: &str = "state.json.bak";
/// What `revproxy store migrate` renames `state.db` to, so that no proxy serves from the
/// stale copy.
pub const MIGRATED_FILE: &str = "state.db.migrated";
/// Where `state.db` waits while `revproxy store migrate` copies it.
pub const MIGRATING_FILE: &str = "state.db.migrating";
/// Where a new store is written before it takes its name.
const NEW_FILE: &str = "state.db.new";
/// The schema this revproxy writes (`meta.schema`).
const SCHEMA_VERSION: i64 = 1;
/// Change records kept: a proxy that fell further behind reads the whole state again.
const CHANGES_KEPT: i64 = 100_000;

const SCHEMA: &str = "
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE tokens (id TEXT PRIMARY KEY, agent TEXT NOT NULL, ended INTEGER NOT NULL,
                     doc TEXT NOT NULL);
CREATE INDEX tokens_by_agent ON tokens (agent);
CREATE INDEX tokens_by_end ON tokens (ended);
CREATE TABLE certs (serial TEXT PRIMARY KEY, agent TEXT NOT NULL, not_after INTEGER NOT NULL,
                    doc TEXT NOT NULL);
CREATE INDEX certs_by_agent ON certs (agent);
CREATE INDEX certs_by_expiry ON certs (not_after);
CREATE TABLE grants (agent TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE access (agent TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE operators (serial TEXT PRIMARY KEY, name TEXT NOT NULL,
                        not_after INTEGER NOT NULL, doc TEXT NOT NULL);
CREATE INDEX operators_by_name ON operators (name);
CREATE TABLE changes (seq INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL,
                      key TEXT NOT NULL);
";

/// The open connection, held for one call.
struct Held<'a>(MutexGuard<'a, Option<(Connection, FileId)>>);

impl Held<'_> {
    fn get(&mut self) -> &mut Connection {
        &mut self.0.as_mut().expect("opened by SqliteStore::conn").0
    }
}

/// The CA state in `state.db`.
#[derive(Debug)]
pub struct SqliteStore {
    dir: PathBuf,
    /// Opened on first use (a store that holds nothing yet is no file), with the identity
    /// of the file it opened.
    conn: Mutex<Option<(Connection, FileId)>>,
}

/// Which file a path named: `state.db` replaced or renamed away (`store migrate`) is
/// noticed before the next call, which then opens what the path names now.
type FileId = (u64, u64);

fn file_id(path: &Path) -> Option<FileId> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

impl SqliteStore {
    /// The store of the state directory `dir`; nothing is opened yet.
    pub fn new(dir: &Path) -> SqliteStore {
        SqliteStore {
            dir: dir.to_path_buf(),
            conn: Mutex::new(None),
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(DB_FILE)
    }

    /// Whether `dir` holds a state, in either form.
    pub fn exists_in(dir: &Path) -> bool {
        dir.join(DB_FILE).exists() || dir.join(STATE_FILE).exists()
    }

    fn error(&self, e: rusqlite::Error) -> CaError {
        if let rusqlite::Error::SqliteFailure(f, _) = &e {
            if matches!(
                f.code,
                rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
            ) {
                return CaError::Locked(self.dir.clone());
            }
        }
        CaError::StoreUnavailable {
            store: self.describe(),
            reason: e.to_string(),
        }
    }

    fn corrupt(&self, reason: impl std::fmt::Display) -> CaError {
        CaError::CorruptState {
            path: self.path(),
            reason: reason.to_string(),
        }
    }

    /// The connection, opened first if need be: from `state.db`, or from a `state.json`
    /// migrated into a new one.
    fn conn(&self) -> Result<Held<'_>, CaError> {
        // A panic in a change leaves the lock poisoned; the connection is opened again.
        let mut guard = self.conn.lock().unwrap_or_else(|poisoned| {
            let mut guard = poisoned.into_inner();
            *guard = None;
            guard
        });
        let current = file_id(&self.path());
        if guard
            .as_ref()
            .is_some_and(|(_, opened)| Some(*opened) != current)
        {
            *guard = None;
        }
        if guard.is_none() {
            let conn = self.open()?;
            let id = file_id(&self.path()).ok_or_else(|| CaError::NoStateFile(self.dir.clone()))?;
            *guard = Some((conn, id));
        }
        Ok(Held(guard))
    }

    fn open(&self) -> Result<Connection, CaError> {
        let path = self.path();
        if !path.exists() {
            let _lock = StateFile::new(&self.dir).lock()?;
            if !path.exists() {
                let old = StateFile::new(&self.dir);
                if !old.path().exists() {
                    return Err(CaError::NoStateFile(self.dir.clone()));
                }
                self.write_new(&old.read()?)?;
                tracing_free_note(&self.dir);
            }
        }
        let conn = self.connect(&path, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
        let schema: Option<String> = conn
            .query_row("SELECT value FROM meta WHERE key = 'schema'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(|e| self.error(e))?;
        match schema.as_deref().map(str::parse::<i64>) {
            Some(Ok(SCHEMA_VERSION)) => {}
            Some(Ok(v)) if v > SCHEMA_VERSION => {
                return Err(self.corrupt(format!(
                    "schema version {v} is newer than this revproxy knows ({SCHEMA_VERSION}): upgrade revproxy"
                )))
            }
            other => return Err(self.corrupt(format!("unknown schema version {other:?}"))),
        }
        // A migration interrupted after `state.db` took its name leaves `state.json`.
        let json = self.dir.join(STATE_FILE);
        if json.exists() {
            std::fs::rename(&json, self.dir.join(BACKUP_FILE))
                .map_err(|e| CaError::io(&json, e))?;
        }
        Ok(conn)
    }

    fn connect(&self, path: &Path, flags: OpenFlags) -> Result<Connection, CaError> {
        let conn = Connection::open_with_flags(path, flags | OpenFlags::SQLITE_OPEN_NO_MUTEX)
            .map_err(|e| self.error(e))?;
        conn.busy_timeout(LOCK_TIMEOUT).map_err(|e| self.error(e))?;
        // WAL: readers never wait for a writer. FULL: a change reported as done is on disk.
        conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;")
            .map_err(|e| self.error(e))?;
        Ok(conn)
    }

    /// Writes `state` as a new `state.db` (made under another name, then renamed, so that
    /// a crash leaves no half-made store); the caller holds the directory's lock.
    fn write_new(&self, state: &State) -> Result<(), CaError> {
        let new = self.dir.join(NEW_FILE);
        for leftover in [NEW_FILE, "state.db.new-wal", "state.db.new-shm"] {
            let _ = std::fs::remove_file(self.dir.join(leftover));
        }
        // Private from its first byte: SQLite gives its side files the same mode.
        crate::fsutil::create_private_file(&new).map_err(|e| CaError::io(&new, e))?;
        {
            let mut conn = self.connect(&new, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
            let tx = conn.transaction().map_err(|e| self.error(e))?;
            tx.execute_batch(SCHEMA).map_err(|e| self.error(e))?;
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('schema', ?1)",
                params![SCHEMA_VERSION.to_string()],
            )
            .map_err(|e| self.error(e))?;
            let mut rows = SqlTx {
                tx: &tx,
                store: self,
            };
            rows.import(state)?;
            tx.commit().map_err(|e| self.error(e))?;
            conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
                .map_err(|e| self.error(e))?;
        }
        let path = self.path();
        std::fs::rename(&new, &path).map_err(|e| CaError::io(&new, e))?;
        for side in ["state.db.new-wal", "state.db.new-shm"] {
            let _ = std::fs::remove_file(self.dir.join(side));
        }
        crate::fsutil::sync_dir(&self.dir).map_err(|e| CaError::io(&self.dir, e))
    }

    /// Writes a consistent copy of the store to `to`, a new file readable by its owner
    /// only (SQLite's `VACUUM INTO`: a snapshot, also while others write); returns how
    /// many records it holds.
    pub fn backup(&self, to: &Path) -> Result<u64, CaError> {
        crate::fsutil::create_private_file(to).map_err(|e| CaError::io(to, e))?;
        let mut held = self.conn()?;
        let conn = held.get();
        let target = to.to_str().ok_or_else(|| {
            CaError::InvalidInput(format!("{} is not a UTF-8 path", to.display()))
        })?;
        // Counted in the copy: what it holds, and proof that it opens.
        let copied = conn
            .execute("VACUUM INTO ?1", params![target])
            .and_then(|_| Connection::open_with_flags(to, OpenFlags::SQLITE_OPEN_READ_ONLY))
            .and_then(|copy| {
                copy.query_row(
                    "SELECT (SELECT count(*) FROM tokens) + (SELECT count(*) FROM certs) \
                     + (SELECT count(*) FROM grants) + (SELECT count(*) FROM access) \
                     + (SELECT count(*) FROM operators)",
                    [],
                    |r| r.get::<_, i64>(0),
                )
            });
        match copied {
            Ok(n) => Ok(n as u64),
            Err(e) => {
                let _ = std::fs::remove_file(to);
                Err(self.error(e))
            }
        }
    }

    /// Takes the store out of use after `revproxy store migrate` copied it elsewhere:
    /// everything written is folded into `state.db`, which is renamed to `to`.
    pub fn retire(dir: &Path, to: &Path) -> Result<(), CaError> {
        let store = SqliteStore::new(dir);
        store
            .conn()?
            .get()
            .execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
            .map_err(|e| store.error(e))?;
        drop(store);
        let path = dir.join(DB_FILE);
        std::fs::rename(&path, to).map_err(|e| CaError::io(&path, e))?;
        for side in ["state.db-wal", "state.db-shm"] {
            let _ = std::fs::remove_file(dir.join(side));
        }
        Ok(())
    }
}

/// Says on stderr that a `state.json` was migrated (the CA crate has no logger; this
/// happens once per state directory).
fn tracing_free_note(dir: &Path) {
    eprintln!(
        "note: the state in {} moved from state.json to state.db (state.json is kept as {BACKUP_FILE})",
        dir.display()
    );
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        if let Ok(mut guard) = self.conn.lock() {
            if let Some((conn, _)) = guard.take() {
                let _ = conn.close();
            }
        }
    }
}

impl Store for SqliteStore {
    fn describe(&self) -> String {
        self.path().display().to_string()
    }

    fn read(&self) -> Result<State, CaError> {
        let mut held = self.conn()?;
        let conn = held.get();
        // One read transaction: every table as of one moment.
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Deferred)
            .map_err(|e| self.error(e))?;
        SqlTx {
            tx: &tx,
            store: self,
        }
        .export()
    }

    fn version(&self) -> Result<u64, CaError> {
        let mut held = self.conn()?;
        let conn = held.get();
        let seq: i64 = conn
            .query_row("SELECT coalesce(max(seq), 0) FROM changes", [], |r| {
                r.get(0)
            })
            .map_err(|e| self.error(e))?;
        Ok(seq as u64)
    }

    /// The document form of a change, for what still changes the whole state: it is
    /// read whole, changed, and what changed is written back.
    fn apply(&self, change: &mut (dyn FnMut(&mut State) -> bool + Send)) -> Result<(), CaError> {
        let mut held = self.conn()?;
        let conn = held.get();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.error(e))?;
        let mut rows = SqlTx {
            tx: &tx,
            store: self,
        };
        let before = rows.export()?;
        let mut after = before.clone();
        if !change(&mut after) || after == before {
            return Ok(());
        }
        rows.write_diff(&before, &after)?;
        tx.commit().map_err(|e| self.error(e))
    }

    fn transact(
        &self,
        change: &mut (dyn FnMut(&mut dyn Tx) -> bool + Send),
    ) -> Result<(), CaError> {
        let mut held = self.conn()?;
        let conn = held.get();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.error(e))?;
        let commit = change(&mut SqlTx {
            tx: &tx,
            store: self,
        });
        if commit {
            tx.commit().map_err(|e| self.error(e))?;
        }
        Ok(())
    }

    fn has_state(&self) -> Result<bool, CaError> {
        Ok(SqliteStore::exists_in(&self.dir))
    }

    /// The caller holds the directory's lock ([`Ca::init_in`](crate::Ca::init_in) does).
    fn create(&self, state: &State) -> Result<(), CaError> {
        if self.has_state()? {
            return Err(CaError::StoreHoldsState(self.describe()));
        }
        self.write_new(state)
    }
}

/// A [`Tx`] on the rows of one SQLite transaction.
struct SqlTx<'a> {
    tx: &'a rusqlite::Transaction<'a>,
    store: &'a SqliteStore,
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
    fn export(&mut self) -> Result<State, CaError> {
        let settings: Settings = self.settings()?;
        let mut state = State {
            version: State::VERSION,
            trust_domain: settings.trust_domain,
            server: settings.server,
            server_sans: settings.server_sans,
            ca_pin: settings.ca_pin,
            agent_listener: settings.agent_listener,
            tokens: self.many("SELECT doc FROM tokens ORDER BY rowid", &[])?,
            certs: self.many("SELECT doc FROM certs ORDER BY rowid", &[])?,
            operators: self.many("SELECT doc FROM operators ORDER BY rowid", &[])?,
            ..State::default()
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
        Ok(state)
    }

    /// Writes every record of `state` (into an empty store).
    fn import(&mut self, state: &State) -> Result<(), CaError> {
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
        for (agent, names) in &state.access {
            self.put_access(agent, names.clone())?;
        }
        Ok(())
    }

    /// Writes what differs between two whole documents.
    fn write_diff(&mut self, before: &State, after: &State) -> Result<(), CaError> {
        if Settings::of(before) != Settings::of(after) {
            self.put_settings(Settings::of(after))?;
        }
        for t in after.tokens.iter().filter(|t| !before.tokens.contains(t)) {
            self.put_token(t.clone())?;
        }
        for c in after.certs.iter().filter(|c| !before.certs.contains(c)) {
            self.put_cert(c.clone())?;
        }
        for o in after
            .operators
            .iter()
            .filter(|o| !before.operators.contains(o))
        {
            self.put_operator(o.clone())?;
        }
        for (agent, grant) in &after.agents {
            if before.agents.get(agent) != Some(grant) {
                self.put_grant(agent, grant.clone())?;
            }
        }
        for (agent, names) in &after.access {
            if before.access.get(agent) != Some(names) {
                self.put_access(agent, names.clone())?;
            }
        }
        for agent in before
            .access
            .keys()
            .filter(|a| !after.access.contains_key(*a))
        {
            self.put_access(agent, Vec::new())?;
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

    fn settings(&mut self) -> Result<Settings, CaError> {
        let settings: Option<SettingsDoc> =
            self.one("SELECT value FROM meta WHERE key = ?1", "settings")?;
        Ok(settings.map(Settings::from).unwrap_or_default())
    }

    fn put_settings(&mut self, settings: Settings) -> Result<(), CaError> {
        self.run(
            "INSERT INTO meta (key, value) VALUES ('settings', ?1) \
             ON CONFLICT (key) DO UPDATE SET value = ?1",
            &[&json(&SettingsDoc::from(settings))],
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

/// [`Settings`] as stored (the fields of the document they came from).
#[derive(serde::Serialize, serde::Deserialize)]
struct SettingsDoc {
    trust_domain: String,
    server: String,
    server_sans: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ca_pin: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    agent_listener: Option<crate::state::AgentListener>,
}

impl From<Settings> for SettingsDoc {
    fn from(s: Settings) -> Self {
        SettingsDoc {
            trust_domain: s.trust_domain,
            server: s.server,
            server_sans: s.server_sans,
            ca_pin: s.ca_pin,
            agent_listener: s.agent_listener,
        }
    }
}

impl From<SettingsDoc> for Settings {
    fn from(s: SettingsDoc) -> Self {
        Settings {
            trust_domain: s.trust_domain,
            server: s.server,
            server_sans: s.server_sans,
            ca_pin: s.ca_pin,
            agent_listener: s.agent_listener,
        }
    }
}
