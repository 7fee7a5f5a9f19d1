//! The PostgreSQL store: several proxies share one CA state.
//!
//! The state is one versioned document (`revproxy.state`, a single JSONB row), changed
//! only in a transaction that holds that row `FOR UPDATE`: of two proxies trading one token
//! at the same moment, the second reads what the first wrote and refuses. Each change
//! bumps the version and sends `NOTIFY revproxy_state` with the commit; proxies `LISTEN`
//! and also poll the version, so a lost notification (a listening connection cut) costs
//! at most one poll. Proxies heartbeat in `revproxy.proxies`, which is how they and their
//! agents know each other.
//!
//! Callers are synchronous (the `ca` crate's [`Store`] is): the store runs its connections
//! on a runtime of its own, one thread, and every call waits at most [`OP_TIMEOUT`].
//! Async code calls it through `spawn_blocking`: a call blocks its thread.
//!
//! The schema is created and migrated by revproxy itself ([`SCHEMA_VERSION`]), under an
//! advisory lock so that proxies starting together do it once.

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use revproxy_ca::state::State;
use revproxy_ca::{CaError, ProxyEntry, Store};
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::{AsyncMessage, Client, Config};
use tracing::{debug, info, warn};

use super::tls::Tls;
use super::StoreError;

/// Longest any one store operation may take, connecting included.
pub const OP_TIMEOUT: Duration = Duration::from_secs(10);
/// After a failed operation, others fail at once for this long instead of trying again.
const FAIL_FAST: Duration = Duration::from_secs(1);
/// A proxy that has not announced itself for this long is no longer listed.
pub const PROXY_STALE_SECS: u32 = 30;
/// The schema version this revproxy writes (`revproxy.schema_version`).
pub const SCHEMA_VERSION: i32 = 1;
/// The channel changes are announced on.
const CHANNEL: &str = "revproxy_state";
/// Advisory lock key serializing schema migrations ("revproxy" in ASCII, truncated).
const MIGRATION_LOCK: i64 = 0x7265_7670_726f_7879;

/// Schema migrations; entry `n` brings version `n` to `n + 1`.
const MIGRATIONS: [&str; 1] = [r#"
CREATE TABLE revproxy.state (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version   bigint NOT NULL,
    doc       jsonb NOT NULL,
    updated   timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE revproxy.proxies (
    id       text PRIMARY KEY,
    address  text,
    instance text NOT NULL,
    started  timestamptz NOT NULL DEFAULT now(),
    seen     timestamptz NOT NULL DEFAULT now()
);
"#];

/// The CA state in PostgreSQL.
pub struct PgStore {
    runtime: Option<tokio::runtime::Runtime>,
    config: Config,
    tls: Tls,
    /// The URL without its password.
    described: String,
    /// The connection for reads and changes; made again after any failure.
    client: Mutex<Option<Client>>,
    /// Whether this process has checked the schema.
    migrated: AtomicBool,
    /// Until when calls fail at once, after one failed: while the database does not
    /// answer, callers queued behind the connection do not each wait [`OP_TIMEOUT`].
    failing: Mutex<Option<(Instant, String)>>,
    /// Marks this process's heartbeats: another process announcing the same proxy id
    /// (a copied state directory) is noticed.
    instance: String,
    /// The `LISTEN` task, once [`Store::on_change`] asked for it.
    listening: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("url", &self.described)
            .finish_non_exhaustive()
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl PgStore {
    /// Parses `url` and prepares the store; connects on first use.
    ///
    /// TLS follows libpq's `sslmode` and `sslrootcert` parameters, but stricter: the
    /// database's certificate is always verified (`require` and `verify-full` both verify
    /// the chain against `sslrootcert` and the name against the host), and a database
    /// beyond loopback must either use TLS or be named with `sslmode=disable` on purpose.
    pub fn open(url: &str) -> Result<PgStore, StoreError> {
        let (config, tls) = PgStore::parse(url)?;
        let described = describe(&config);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("revproxy-store")
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| CaError::StoreUnavailable {
                store: described.clone(),
                reason: format!("cannot start its runtime: {e}"),
            })?;
        Ok(PgStore {
            runtime: Some(runtime),
            config,
            tls,
            described,
            client: Mutex::new(None),
            migrated: AtomicBool::new(false),
            failing: Mutex::new(None),
            instance: format!("{}-{}", std::process::id(), rand_suffix()),
            listening: Mutex::new(None),
        })
    }

    /// Checks `url` (syntax, TLS settings, the `sslrootcert` file) without connecting:
    /// what `revproxy check` does.
    pub fn check_url(url: &str) -> Result<(), StoreError> {
        PgStore::parse(url).map(|_| ())
    }

    /// The connection settings and TLS of `url`.
    fn parse(url: &str) -> Result<(Config, Tls), StoreError> {
        let (url, sslmode, rootcert) = split_tls_params(url)?;
        let mut config = Config::from_str(&url).map_err(|e| StoreError::Url(e.to_string()))?;
        let local = is_local(&config);
        // libpq's variable for a password kept out of the URL (and so out of `ps`).
        if config.get_password().is_none() {
            if let Ok(password) = std::env::var("PGPASSWORD") {
                config.password(password);
            }
        }
        let tls = match (sslmode.as_deref(), rootcert) {
            (Some("disable"), _) => Tls(None),
            (Some("require" | "verify-full") | None, Some(path)) => {
                Tls::verified(&path).map_err(StoreError::Url)?
            }
            (None, None) if local => Tls(None),
            (None | Some("prefer" | "allow"), None) => {
                return Err(StoreError::Url(
                    "the database is not on this machine: give sslmode=verify-full&sslrootcert=FILE (the CA of its certificate), or sslmode=disable to send the state unencrypted".into(),
                ))
            }
            (Some("require" | "verify-full" | "verify-ca"), None) => {
                return Err(StoreError::Url(
                    "TLS to the database needs sslrootcert=FILE: revproxy verifies the database's certificate against it".into(),
                ))
            }
            (Some(other), _) => {
                return Err(StoreError::Url(format!(
                    "sslmode={other} is not supported; use verify-full (with sslrootcert=FILE) or disable"
                )))
            }
        };
        config.ssl_mode(if tls.0.is_some() {
            SslMode::Require
        } else {
            SslMode::Disable
        });
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(OP_TIMEOUT / 2);
        }
        // A database that stops answering (a frozen machine, a cut cable) is noticed by
        // the socket, not only by the next query's timeout.
        config.tcp_user_timeout(OP_TIMEOUT);
        config.keepalives_idle(Duration::from_secs(5));
        config.keepalives_interval(Duration::from_secs(2));
        config.keepalives_retries(3);
        if config.get_application_name().is_none() {
            config.application_name("revproxy");
        }
        Ok((config, tls))
    }

    fn runtime(&self) -> &tokio::runtime::Runtime {
        self.runtime
            .as_ref()
            .expect("the runtime lives as long as the store")
    }

    fn unavailable(&self, reason: impl std::fmt::Display) -> CaError {
        CaError::StoreUnavailable {
            store: self.described.clone(),
            reason: reason.to_string(),
        }
    }

    /// Runs `op` on the store's connection (made first if there is none), within
    /// [`OP_TIMEOUT`]. A failed or timed-out operation drops the connection: the next
    /// one starts afresh.
    fn with_client<T: Send>(
        &self,
        op: impl AsyncFnOnce(&mut Client) -> Result<Result<T, CaError>, tokio_postgres::Error> + Send,
    ) -> Result<T, CaError> {
        // A panic in a change leaves the lock poisoned; the connection is made again.
        let mut guard = self.client.lock().unwrap_or_else(|poisoned| {
            let mut guard = poisoned.into_inner();
            *guard = None;
            guard
        });
        if let Some((until, reason)) = &*self.failing.lock().unwrap_or_else(|p| p.into_inner()) {
            if Instant::now() < *until {
                return Err(self.unavailable(reason));
            }
        }
        let slot: &mut Option<Client> = &mut guard;
        let run = || {
            self.runtime().block_on(async {
                tokio::time::timeout(OP_TIMEOUT, async {
                    if slot.as_ref().is_none_or(Client::is_closed) {
                        *slot = Some(self.connect().await?);
                    }
                    let client = slot.as_mut().expect("connected above");
                    if !self.migrated.load(Ordering::Acquire) {
                        if let Err(e) = migrate(client).await? {
                            return Ok(Err(e));
                        }
                        self.migrated.store(true, Ordering::Release);
                    }
                    op(client).await
                })
                .await
            })
        };
        // Called on a thread that belongs to another runtime (a proxy starting up), this
        // thread may not block on ours: a scoped thread does it instead.
        let outcome = if tokio::runtime::Handle::try_current().is_ok() {
            std::thread::scope(|s| s.spawn(run).join())
        } else {
            Ok(run())
        };
        let reason = match outcome {
            Ok(Ok(Ok(result))) => {
                *self.failing.lock().unwrap_or_else(|p| p.into_inner()) = None;
                return result;
            }
            Ok(Ok(Err(e))) => pg_reason(&e),
            Ok(Err(_)) => format!("no answer within {} s", OP_TIMEOUT.as_secs()),
            Err(_) => "a store operation panicked".to_string(),
        };
        *slot = None;
        *self.failing.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((Instant::now() + FAIL_FAST, reason.clone()));
        Err(self.unavailable(reason))
    }

    async fn connect(&self) -> Result<Client, tokio_postgres::Error> {
        let (client, connection) = self.config.connect(self.tls.clone()).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(error = %e, "store connection ended");
            }
        });
        // A proxy that stops in the middle of a change (frozen, killed) must not hold the
        // state's row lock for long: the others would wait on it.
        client
            .batch_execute(
                "SET statement_timeout = '10s'; SET lock_timeout = '10s'; \
                 SET idle_in_transaction_session_timeout = '10s'",
            )
            .await?;
        Ok(client)
    }

    /// Keeps a connection that `LISTEN`s and calls `wake` at every notification and after
    /// every (re)connection (a notification may have been missed while there was none).
    async fn listen(
        config: Config,
        tls: Tls,
        described: String,
        wake: Arc<dyn Fn() + Send + Sync>,
    ) {
        let mut backoff = crate::runtime::backoff::Backoff::new(
            Duration::from_millis(100),
            Duration::from_secs(5),
        );
        let mut was_down = false;
        loop {
            match tokio::time::timeout(OP_TIMEOUT, config.connect(tls.clone())).await {
                Ok(Ok((client, mut connection))) => {
                    let on_message = wake.clone();
                    let mut driver = tokio::spawn(async move {
                        loop {
                            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                                Some(Ok(AsyncMessage::Notification(_))) => on_message(),
                                Some(Ok(_)) => {}
                                Some(Err(e)) => return pg_reason(&e),
                                None => return "the database closed the connection".into(),
                            }
                        }
                    });
                    let sql = format!("LISTEN {CHANNEL}");
                    let listen = client.batch_execute(&sql);
                    match tokio::time::timeout(OP_TIMEOUT, listen).await {
                        Ok(Ok(())) => {
                            if was_down {
                                info!(store = %described, "listening for state changes again");
                            }
                            backoff.reset();
                            wake(); // whatever changed while nobody listened
                            let why = (&mut driver).await.unwrap_or_else(|e| e.to_string());
                            warn!(store = %described, reason = %why,
                                  "lost the store's change notifications; polling until listening again");
                        }
                        Ok(Err(e)) => {
                            warn!(store = %described, reason = %pg_reason(&e), "cannot LISTEN for state changes")
                        }
                        Err(_) => {
                            warn!(store = %described, "cannot LISTEN for state changes: no answer")
                        }
                    }
                    driver.abort();
                }
                Ok(Err(e)) if !was_down => {
                    warn!(store = %described, reason = %pg_reason(&e), "cannot connect to listen for state changes")
                }
                Ok(Err(e)) => {
                    debug!(store = %described, reason = %pg_reason(&e), "still cannot connect")
                }
                Err(_) => debug!(store = %described, "connecting to listen timed out"),
            }
            was_down = true;
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }
}

/// Applies the migrations this store lacks, under an advisory lock; refuses a schema newer
/// than this revproxy knows.
async fn migrate(client: &mut Client) -> Result<Result<(), CaError>, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE SCHEMA IF NOT EXISTS revproxy; \
         CREATE TABLE IF NOT EXISTS revproxy.schema_version (version integer NOT NULL)",
    )
    .await?;
    let current: i32 = match tx
        .query_opt("SELECT version FROM revproxy.schema_version", &[])
        .await?
    {
        Some(row) => row.get(0),
        None => {
            tx.execute("INSERT INTO revproxy.schema_version VALUES (0)", &[])
                .await?;
            0
        }
    };
    if current > SCHEMA_VERSION {
        return Ok(Err(CaError::InvalidInput(format!(
            "the store's schema is version {current}, newer than this revproxy knows ({SCHEMA_VERSION}): upgrade revproxy"
        ))));
    }
    for (from, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        tx.batch_execute(sql).await?;
        info!(from, to = from + 1, "store schema migrated");
    }
    tx.execute(
        "UPDATE revproxy.schema_version SET version = $1",
        &[&SCHEMA_VERSION],
    )
    .await?;
    tx.commit().await?;
    Ok(Ok(()))
}

fn parse_state(described: &str, text: &str) -> Result<State, CaError> {
    let state: State = serde_json::from_str(text).map_err(|e| CaError::CorruptState {
        path: described.into(),
        reason: e.to_string(),
    })?;
    if state.version != State::VERSION {
        return Err(CaError::CorruptState {
            path: described.into(),
            reason: format!(
                "format version {} is not {} (written by another revproxy version?)",
                state.version,
                State::VERSION
            ),
        });
    }
    Ok(state)
}

impl Store for PgStore {
    fn describe(&self) -> String {
        self.described.clone()
    }

    fn read(&self) -> Result<State, CaError> {
        let described = &self.described;
        self.with_client(async |client| {
            let row = client
                .query_opt("SELECT doc::text FROM revproxy.state", &[])
                .await?;
            Ok(match row {
                Some(row) => parse_state(described, row.get(0)),
                None => Err(CaError::StoreEmpty(described.clone())),
            })
        })
    }

    fn version(&self) -> Result<u64, CaError> {
        let described = &self.described;
        self.with_client(async |client| {
            let row = client
                .query_opt("SELECT version FROM revproxy.state", &[])
                .await?;
            Ok(match row {
                Some(row) => Ok(row.get::<_, i64>(0) as u64),
                None => Err(CaError::StoreEmpty(described.clone())),
            })
        })
    }

    fn apply(&self, change: &mut (dyn FnMut(&mut State) -> bool + Send)) -> Result<(), CaError> {
        let described = &self.described;
        self.with_client(async |client| {
            let tx = client.transaction().await?;
            let Some(row) = tx
                .query_opt(
                    "SELECT version, doc::text FROM revproxy.state FOR UPDATE",
                    &[],
                )
                .await?
            else {
                return Ok(Err(CaError::StoreEmpty(described.clone())));
            };
            let version: i64 = row.get(0);
            let mut state = match parse_state(described, row.get(1)) {
                Ok(state) => state,
                Err(e) => return Ok(Err(e)),
            };
            let before = state.clone();
            if !change(&mut state) || state == before {
                tx.rollback().await?;
                return Ok(Ok(()));
            }
            let doc = serde_json::to_string(&state).expect("state serializes");
            tx.execute(
                "UPDATE revproxy.state SET version = $1, doc = $2::text::jsonb, updated = now()",
                &[&(version + 1), &doc],
            )
            .await?;
            tx.execute(
                "SELECT pg_notify($1, $2)",
                &[&CHANNEL, &(version + 1).to_string()],
            )
            .await?;
            tx.commit().await?;
            Ok(Ok(()))
        })
    }

    fn has_state(&self) -> Result<bool, CaError> {
        self.with_client(async |client| {
            let row = client
                .query_one("SELECT count(*) FROM revproxy.state", &[])
                .await?;
            Ok(Ok(row.get::<_, i64>(0) > 0))
        })
    }

    fn create(&self, state: &State) -> Result<(), CaError> {
        let described = &self.described;
        let doc = serde_json::to_string(state).expect("state serializes");
        self.with_client(async |client| {
            let added = client
                .execute(
                    "INSERT INTO revproxy.state (version, doc) VALUES (1, $1::text::jsonb) \
                     ON CONFLICT DO NOTHING",
                    &[&doc],
                )
                .await?;
            Ok(if added == 1 {
                Ok(())
            } else {
                Err(CaError::StoreHoldsState(described.clone()))
            })
        })
    }

    fn shared(&self) -> bool {
        true
    }

    fn on_change(&self, wake: Arc<dyn Fn() + Send + Sync>) {
        let mut listening = self.listening.lock().expect("listen task lock");
        if let Some(old) = listening.take() {
            old.abort();
        }
        *listening = Some(self.runtime().spawn(PgStore::listen(
            self.config.clone(),
            self.tls.clone(),
            self.described.clone(),
            wake,
        )));
    }

    fn announce(&self, proxy: &ProxyEntry) -> Result<(), CaError> {
        let instance = &self.instance;
        self.with_client(async |client| {
            let other = client
                .query_opt(
                    "SELECT address FROM revproxy.proxies WHERE id = $1 AND instance <> $2 \
                     AND seen > now() - make_interval(secs => $3)",
                    &[&proxy.id, instance, &(PROXY_STALE_SECS as f64)],
                )
                .await?;
            if let Some(row) = other {
                let address: Option<String> = row.get(0);
                warn!(id = %proxy.id, other = ?address,
                      "another proxy announces this proxy's id (a copied state directory?): agents take the two for one; give each proxy a state directory of its own with only ca.key and ca.crt copied");
            }
            client
                .execute(
                    "INSERT INTO revproxy.proxies (id, address, instance) VALUES ($1, $2, $3) \
                     ON CONFLICT (id) DO UPDATE SET address = excluded.address, \
                     instance = excluded.instance, seen = now()",
                    &[&proxy.id, &proxy.address, instance],
                )
                .await?;
            // Proxies gone for a day are forgotten.
            client
                .execute(
                    "DELETE FROM revproxy.proxies WHERE seen < now() - interval '1 day'",
                    &[],
                )
                .await?;
            Ok(Ok(()))
        })
    }

    fn withdraw(&self, id: &str) -> Result<(), CaError> {
        self.with_client(async |client| {
            client
                .execute("DELETE FROM revproxy.proxies WHERE id = $1", &[&id])
                .await?;
            Ok(Ok(()))
        })
    }

    fn proxies(&self) -> Result<Vec<ProxyEntry>, CaError> {
        self.with_client(async |client| {
            let rows = client
                .query(
                    "SELECT id, address FROM revproxy.proxies \
                     WHERE seen > now() - make_interval(secs => $1) ORDER BY id",
                    &[&(PROXY_STALE_SECS as f64)],
                )
                .await?;
            Ok(Ok(rows
                .iter()
                .map(|row| ProxyEntry {
                    id: row.get(0),
                    address: row.get(1),
                })
                .collect()))
        })
    }
}

/// Whether every host the configuration names is this machine: a Unix socket, a loopback
/// address, or `localhost` resolving to loopback only. `hostaddr` (the address actually
/// dialed) counts too.
fn is_local(config: &Config) -> bool {
    use std::net::ToSocketAddrs;
    let loopback_name = |name: &str| match name.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => {
            name == "localhost"
                && ("localhost", 0)
                    .to_socket_addrs()
                    .is_ok_and(|mut addrs| addrs.all(|a| a.ip().is_loopback()))
        }
    };
    !config.get_hosts().is_empty()
        && config.get_hosts().iter().all(|h| match h {
            Host::Unix(_) => true,
            Host::Tcp(name) => loopback_name(name),
        })
        && config.get_hostaddrs().iter().all(|ip| ip.is_loopback())
}

/// A few random hex digits.
fn rand_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{nanos:08x}")
}

/// What went wrong, in one line: the server's message for a database error, else the
/// client's.
fn pg_reason(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(inner) = source {
                text = format!("{text}: {inner}");
                source = inner.source();
            }
            text
        }
    }
}

/// `postgres://user@host:port/db`, never the password.
fn describe(config: &Config) -> String {
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(name)) => name.clone(),
        Some(Host::Unix(path)) => path.display().to_string(),
        None => "localhost".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "postgres://{}@{host}:{port}/{}",
        config.get_user().unwrap_or(""),
        config.get_dbname().unwrap_or("")
    )
}

/// Takes libpq's `sslmode` and `sslrootcert` out of the URL's query (tokio-postgres knows
/// neither `verify-full` nor `sslrootcert`).
fn split_tls_params(url: &str) -> Result<(String, Option<String>, Option<String>), StoreError> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_string(), None, None));
    };
    let (mut sslmode, mut rootcert, mut rest) = (None, None, Vec::new());
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("sslmode", v)) => sslmode = Some(v.to_string()),
            Some(("sslrootcert", v)) => rootcert = Some(percent_decode(v)?),
            _ => rest.push(pair),
        }
    }
    let url = if rest.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    Ok((url, sslmode, rootcert))
}

fn percent_decode(v: &str) -> Result<String, StoreError> {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = v
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| StoreError::Url(format!("bad percent escape in {v:?}")))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| StoreError::Url(format!("{v:?} is not UTF-8")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_tls_modes() {
        let (url, mode, root) =
            split_tls_params("postgres://u:p@db:5433/x?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&connect_timeout=3")
                .unwrap();
        assert_eq!(url, "postgres://u:p@db:5433/x?connect_timeout=3");
        assert_eq!(mode.as_deref(), Some("verify-full"));
        assert_eq!(root.as_deref(), Some("/etc/ca.pem"));
        // Beyond loopback without TLS, only on purpose.
        let e = PgStore::open("postgres://u@db.example.com/x").unwrap_err();
        assert!(e.to_string().contains("sslmode=verify-full"), "{e}");
        let e = PgStore::open("postgres://u@db.example.com/x?sslmode=require").unwrap_err();
        assert!(e.to_string().contains("sslrootcert"), "{e}");
        let store = PgStore::open("postgres://u:secret@127.0.0.1:5433/x").unwrap();
        assert_eq!(store.describe(), "postgres://u@127.0.0.1:5433/x");
        assert!(!format!("{store:?}").contains("secret"));
        assert!(PgStore::open("postgres://u@db.example.com/x?sslmode=disable").is_ok());
        // The address dialed counts, not only the name.
        let e = PgStore::open("postgres://u@localhost/x?hostaddr=203.0.113.9").unwrap_err();
        assert!(e.to_string().contains("sslmode=verify-full"), "{e}");
        assert!(PgStore::open("postgres://u@localhost/x?hostaddr=127.0.0.1").is_ok());
    }
}
