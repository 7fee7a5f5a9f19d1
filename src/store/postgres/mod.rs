//! The PostgreSQL store: several proxies share one CA state. This file holds the store's
//! connection and how each call runs; the URL, the schema, the change feed, the queries
//! and TLS are files of their own.
//!
//! Callers are synchronous (the `ca` crate's [`Store`] is): the store runs its connections
//! on a runtime of its own, one thread, and every call waits at most [`OP_TIMEOUT`].
//! Async code calls it through `spawn_blocking`: a call blocks its thread.
//!
//! [`Store`]: revproxy_ca::Store

mod feed;
mod queries;
mod rows;
mod schema;
mod session;
mod tls;
mod url;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use revproxy_ca::CaError;
use tokio_postgres::{Client, Config};
use tokio_postgres_rustls::MakeRustlsConnect;
use tracing::debug;

use session::Session;

pub use schema::SCHEMA_VERSION;
pub use tls::RootCertError;
pub use url::UrlError;

use super::StoreError;

/// Longest any one store operation may take, connecting included.
const OP_TIMEOUT: Duration = Duration::from_secs(10);
/// After a failed operation, others fail at once for this long instead of trying again.
const FAIL_FAST: Duration = Duration::from_secs(1);

/// The CA state in PostgreSQL.
pub struct PgStore {
    runtime: Option<tokio::runtime::Runtime>,
    config: Config,
    tls: MakeRustlsConnect,
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
    /// The `LISTEN` task, once [`Store::on_change`](revproxy_ca::Store::on_change) asked
    /// for it.
    listening: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The newest state version this process has seen, and whether the store went back.
    seen: Mutex<Seen>,
}

/// What a process remembers of the store's version, a counter each change adds one to.
#[derive(Debug, Default)]
struct Seen {
    /// The newest version read or written.
    newest: i64,
    /// Once the store answered an older version than `newest`: the two. From then on every
    /// call is refused, until the process restarts: taking the older state for a newer one
    /// would bring back what was revoked since and let used tokens enroll again, and no
    /// later version can be trusted to descend from what this process saw.
    went_back: Option<(i64, i64)>,
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
        let (config, tls) = url::parse(url)?;
        let described = url::describe(&config);
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
            seen: Mutex::new(Seen::default()),
        })
    }

    /// Checks the state's `version` as the store answered it against the newest this
    /// process has seen: an older one is refused (see [`Seen::went_back`]); the proxy's
    /// state view says so in its log, once.
    fn check_version(&self, version: i64) -> Result<(), CaError> {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.went_back.is_none() && version < seen.newest {
            seen.went_back = Some((seen.newest, version));
        }
        if let Some((from, to)) = seen.went_back {
            return Err(CaError::StoreWentBack {
                store: self.described.clone(),
                from: from as u64,
                to: to as u64,
            });
        }
        seen.newest = version;
        Ok(())
    }

    /// Checks `url` (syntax, TLS settings, the `sslrootcert` file) without connecting:
    /// what `revproxy check` does.
    pub fn check_url(url: &str) -> Result<(), StoreError> {
        url::parse(url)?;
        Ok(())
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

    /// Runs `op` on the store's connection (made first if there is none, the schema
    /// checked once per process), its queries within [`OP_TIMEOUT`] in all
    /// ([`Session::wait`]). A failed or timed-out query drops the connection: the next
    /// call starts afresh.
    fn session<T: Send>(
        &self,
        op: impl FnOnce(&mut Client, &mut Session) -> Result<T, CaError> + Send,
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
            let handle = self.runtime().handle().clone();
            let mut session = Session::new(handle, self.described.clone());
            let call = || {
                if slot.as_ref().is_none_or(Client::is_closed) {
                    *slot = Some(session.wait(self.connect())?);
                }
                let client = slot.as_mut().expect("connected above");
                if !self.migrated.load(Ordering::Acquire) {
                    // Moving a large state into a new schema takes longer than a call.
                    session.allow(schema::MIGRATION_TIMEOUT);
                    session.wait(schema::migrate(client))??;
                    session.allow(OP_TIMEOUT);
                    self.migrated.store(true, Ordering::Release);
                }
                op(client, &mut session)
            };
            let result = call();
            (result, session.failed)
        };
        // Called on a thread that belongs to another runtime (a proxy starting up), this
        // thread may not block on ours: a scoped thread does it instead.
        let outcome = if tokio::runtime::Handle::try_current().is_ok() {
            std::thread::scope(|s| s.spawn(run).join())
        } else {
            Ok(run())
        };
        let (result, reason) = match outcome {
            Ok((result, None)) => {
                *self.failing.lock().unwrap_or_else(|p| p.into_inner()) = None;
                return result;
            }
            Ok((result, Some(reason))) => (result, reason),
            Err(_) => {
                let reason = "a store operation panicked".to_string();
                (Err(self.unavailable(&reason)), reason)
            }
        };
        *guard = None;
        *self.failing.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((Instant::now() + FAIL_FAST, reason));
        result
    }

    /// Runs one async `op` on the store's connection ([`PgStore::session`]).
    fn with_client<T: Send>(
        &self,
        op: impl AsyncFnOnce(&mut Client) -> Result<Result<T, CaError>, tokio_postgres::Error> + Send,
    ) -> Result<T, CaError> {
        self.session(|client, session| session.wait(op(client))?)
    }

    async fn connect(&self) -> Result<Client, tokio_postgres::Error> {
        let (client, connection) = self.config.connect(self.tls.clone()).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(error = %e, "store connection ended");
            }
        });
        // A proxy that stops in the middle of a change (frozen, killed) must not hold the
        // state's row lock for long: the others would wait on it. Every table is named
        // with its schema, and everything else resolves in the system catalog only: no
        // function, operator or type another role put in `public` or its own schema can
        // be called in place of the built-in one (a closer match on argument types wins
        // over `pg_catalog`'s otherwise, CVE-2018-1058), whatever search_path the role or
        // the database were given.
        client
            .batch_execute(
                "SET search_path = pg_catalog, pg_temp; \
                 SET statement_timeout = '10s'; SET lock_timeout = '10s'; \
                 SET idle_in_transaction_session_timeout = '10s'",
            )
            .await?;
        Ok(client)
    }
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
