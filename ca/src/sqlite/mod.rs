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

mod rows;
use rows::SqlTx;

use crate::error::CaError;
use crate::records::Tx;
use crate::state::{State, StateFile, LOCK_TIMEOUT, STATE_FILE};
use crate::store::{Changed, Changes, Store};

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
/// Most records a proxy reads one by one to catch up; beyond, it reads the state whole.
const MAX_CHANGES: i64 = 10_000;

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

/// Terminated names (in every store: a store made before it gets it when opened).
const TLS_TABLE: &str =
    "CREATE TABLE IF NOT EXISTS tls (name TEXT PRIMARY KEY, doc TEXT NOT NULL);";

/// The open connection, held for one call.
struct Held<'a>(MutexGuard<'a, Option<(Connection, FileId)>>);

impl Held<'_> {
    fn get(&mut self) -> &mut Connection {
        &mut self.0.as_mut().expect("opened by SqliteStore::conn").0
    }

    /// The file the connection opened.
    fn opened(&self) -> FileId {
        self.0.as_ref().expect("opened by SqliteStore::conn").1
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
            // Under the lock that writers of `state.json` take: a process of the previous
            // release (`serve --upgrade` from it) finds the file gone, not changed unseen.
            let _lock = StateFile::new(&self.dir).lock()?;
            if !path.exists() {
                let old = StateFile::new(&self.dir);
                if !old.path().exists() {
                    let moved = [
                        MIGRATED_FILE,
                        MIGRATING_FILE,
                        crate::state::MIGRATED_FILE,
                        crate::state::MIGRATING_FILE,
                    ]
                    .iter()
                    .any(|f| self.dir.join(f).exists());
                    return Err(if moved {
                        CaError::Migrated(self.dir.clone())
                    } else {
                        CaError::NoStateFile(self.dir.clone())
                    });
                }
                self.write_new(&old.read()?)?;
                let kept = self.keep_old_file()?;
                eprintln!(
                    "note: the state in {} moved from state.json to state.db (the old file is kept as {})",
                    self.dir.display(),
                    kept.display()
                );
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
        // Added within schema 1 (readers that know nothing of it ignore it).
        conn.execute_batch(TLS_TABLE).map_err(|e| self.error(e))?;
        // A migration interrupted after `state.db` took its name leaves `state.json`.
        if self.dir.join(STATE_FILE).exists() {
            let _lock = StateFile::new(&self.dir).lock()?;
            if self.dir.join(STATE_FILE).exists() {
                self.keep_old_file()?;
            }
        }
        Ok(conn)
    }

    /// Renames a migrated `state.json` to [`BACKUP_FILE`], or to the first of
    /// `state.json.bak.1`, `.2`, ... that does not exist (a backup is never overwritten);
    /// returns where it went. The caller holds the directory's lock.
    fn keep_old_file(&self) -> Result<PathBuf, CaError> {
        let json = self.dir.join(STATE_FILE);
        let mut kept = self.dir.join(BACKUP_FILE);
        let mut n = 0;
        while kept.exists() {
            n += 1;
            kept = self.dir.join(format!("{BACKUP_FILE}.{n}"));
        }
        std::fs::rename(&json, &kept).map_err(|e| CaError::io(&json, e))?;
        Ok(kept)
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
            tx.execute_batch(TLS_TABLE).map_err(|e| self.error(e))?;
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
                     + (SELECT count(*) FROM operators) + (SELECT count(*) FROM tls)",
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

    /// Takes the store out of use for `revproxy store migrate`: under the write lock, reads
    /// the whole state and renames `state.db` (with its write-ahead log) to `to`, so that
    /// no change is committed between the read and the rename (a writer that waited for
    /// the lock finds the file gone: [`Store::transact`] checks). Returns what was read;
    /// [`SqliteStore::restore`] puts the file back.
    pub fn retire(dir: &Path, to: &Path) -> Result<State, CaError> {
        let store = SqliteStore::new(dir);
        let state = {
            let mut held = store.conn()?;
            let conn = held.get();
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(|e| store.error(e))?;
            let state = SqlTx {
                tx: &tx,
                store: &store,
            }
            .export()?;
            move_with_log(dir, DB_FILE, to)?;
            state
        }; // the transaction ends (nothing written), then the connection
        drop(store);
        // Fold the log into the moved file, so that it is whole by itself (best effort:
        // its log moved with it, and SQLite reads both).
        if let Ok(copy) = Connection::open_with_flags(to, OpenFlags::SQLITE_OPEN_READ_WRITE) {
            let _ = copy.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)");
        }
        Ok(state)
    }

    /// Puts back a store [`SqliteStore::retire`] moved to `from` (a migration failed).
    pub fn restore(dir: &Path, from: &Path) -> Result<(), CaError> {
        let name = from
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| CaError::InvalidInput(format!("{} has no file name", from.display())))?;
        move_with_log(dir, name, &dir.join(DB_FILE))
    }
}

/// Renames the database `name` in `dir` to `to`, its `-wal` and `-shm` files beside it.
fn move_with_log(dir: &Path, name: &str, to: &Path) -> Result<(), CaError> {
    let from = dir.join(name);
    std::fs::rename(&from, to).map_err(|e| CaError::io(&from, e))?;
    for side in ["-wal", "-shm"] {
        let (old, new) = (dir.join(format!("{name}{side}")), {
            let mut n = to.as_os_str().to_owned();
            n.push(side);
            PathBuf::from(n)
        });
        if old.exists() {
            std::fs::rename(&old, &new).map_err(|e| CaError::io(&old, e))?;
        }
    }
    Ok(())
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

    fn transact(
        &self,
        change: &mut (dyn FnMut(&mut dyn Tx) -> bool + Send),
    ) -> Result<(), CaError> {
        let mut held = self.conn()?;
        let opened = held.opened();
        let conn = held.get();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.error(e))?;
        // Under the write lock, the path must still name the file this connection opened:
        // `store migrate` renames it away while holding that lock, and a change written
        // now would be in the old copy only.
        if file_id(&self.path()) != Some(opened) {
            return Err(CaError::Migrated(self.dir.clone()));
        }
        let commit = change(&mut SqlTx {
            tx: &tx,
            store: self,
        });
        if commit {
            tx.commit().map_err(|e| self.error(e))?;
        }
        Ok(())
    }

    fn view(&self, look: &mut (dyn FnMut(&mut dyn Tx) + Send)) -> Result<(), CaError> {
        let mut held = self.conn()?;
        let conn = held.get();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Deferred)
            .map_err(|e| self.error(e))?;
        look(&mut SqlTx {
            tx: &tx,
            store: self,
        });
        Ok(()) // dropped: rolled back, whatever `look` did
    }

    fn changes_since(&self, since: u64) -> Result<Option<Changes>, CaError> {
        let mut held = self.conn()?;
        let conn = held.get();
        // One read transaction: the changes and the records as of one moment.
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Deferred)
            .map_err(|e| self.error(e))?;
        let (oldest, newest): (i64, i64) = tx
            .query_row(
                "SELECT coalesce(min(seq), 0), coalesce(max(seq), 0) FROM changes",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(|e| self.error(e))?;
        let since = i64::try_from(since).unwrap_or(i64::MAX);
        // Trimmed past `since` (or a store that went back): no telling what changed.
        if since > newest || (since < newest && oldest > since + 1) {
            return Ok(None);
        }
        let keys: Vec<(String, String)> = {
            let mut stmt = tx
                .prepare(
                    "SELECT kind, key FROM changes WHERE seq > ?1 \
                     GROUP BY kind, key ORDER BY max(seq) LIMIT ?2",
                )
                .map_err(|e| self.error(e))?;
            let rows = stmt
                .query_map(params![since, MAX_CHANGES + 1], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .map_err(|e| self.error(e))?;
            rows.collect::<Result<_, _>>().map_err(|e| self.error(e))?
        };
        if keys.len() > MAX_CHANGES as usize {
            return Ok(None); // as cheap to read whole
        }
        let mut rows = SqlTx {
            tx: &tx,
            store: self,
        };
        let mut records = Vec::with_capacity(keys.len());
        for (kind, key) in keys {
            records.push(Changed::read(&mut rows, &kind, key)?);
        }
        Ok(Some(Changes {
            version: newest as u64,
            records,
        }))
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
