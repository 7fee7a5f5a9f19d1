//! The [`Store`] calls as SQL. The records are rows (`rows.rs`); `revproxy.state` is one
//! row holding the state's version and the CA-wide settings, which every change holds
//! `FOR UPDATE` while it runs. Proxies heartbeat in `revproxy.proxies`, which is how they
//! and their agents know each other. How a call runs (connection, timeout) is in `mod.rs`
//! and `session.rs`.

use std::sync::Arc;

use revproxy_ca::records::Tx;
use revproxy_ca::state::State;
use revproxy_ca::{CaError, Changes, ProxyEntry, Store};
use tokio_postgres::{Client, IsolationLevel, Transaction};
use tracing::warn;

use super::rows::{self, PgTx};
use super::session::Session;
use super::{feed, PgStore};

/// Most records a proxy reads one by one to catch up; beyond, it reads the state whole.
const MAX_CHANGES: i64 = 10_000;

/// A proxy that has not announced itself for this long is no longer listed.
const PROXY_STALE_SECS: u32 = 30;

impl Store for PgStore {
    fn describe(&self) -> String {
        self.described.clone()
    }

    // The version is checked while the call holds the connection: calls run one at a
    // time on it, so the versions are checked in the order the database answered them.
    fn read(&self) -> Result<State, CaError> {
        self.session(|client, s| {
            let tx = s.wait(snapshot(client))?;
            let version = self.state_version(s, &tx, "")?;
            self.check_version(version)?;
            s.wait(rows::export(&tx))
        })
    }

    fn version(&self) -> Result<u64, CaError> {
        let described = &self.described;
        self.with_client(async |client| {
            let row = client
                .query_opt("SELECT version FROM revproxy.state", &[])
                .await?;
            Ok(match row {
                Some(row) => {
                    let version: i64 = row.get(0);
                    self.check_version(version).map(|()| version as u64)
                }
                None => Err(CaError::StoreEmpty(described.clone())),
            })
        })
    }

    fn transact(
        &self,
        change: &mut (dyn FnMut(&mut dyn Tx) -> bool + Send),
    ) -> Result<(), CaError> {
        self.session(|client, s| {
            // Read committed, whatever the role's default: each statement after the lock
            // sees what the changes before this one committed.
            let begin = client
                .build_transaction()
                .isolation_level(IsolationLevel::ReadCommitted);
            let tx = s.wait(begin.start())?;
            let version = self.state_version(s, &tx, " FOR UPDATE")?;
            // Never a change written over an older state than this process has seen.
            self.check_version(version)?;
            let mut rows = PgTx {
                tx,
                session: s,
                next: version + 1,
                wrote: false,
            };
            let commit = change(&mut rows);
            let PgTx {
                tx,
                session: s,
                wrote,
                ..
            } = rows;
            if let Some(reason) = &s.failed {
                return Err(self.unavailable(reason));
            }
            if !(commit && wrote) {
                return s.wait(tx.rollback());
            }
            s.wait(async {
                tx.execute(
                    "UPDATE revproxy.state SET version = $1, updated = now()",
                    &[&(version + 1)],
                )
                .await?;
                feed::notify(&tx, version + 1).await?;
                tx.commit().await
            })?;
            self.check_version(version + 1)
        })
    }

    fn view(&self, look: &mut (dyn FnMut(&mut dyn Tx) + Send)) -> Result<(), CaError> {
        self.session(|client, s| {
            let tx = s.wait(snapshot(client))?;
            let mut rows = PgTx {
                tx,
                session: s,
                next: 0,
                wrote: false,
            };
            look(&mut rows);
            match &rows.session.failed {
                Some(reason) => Err(self.unavailable(reason)),
                None => Ok(()),
            }
        })
    }

    fn changes_since(&self, since: u64) -> Result<Option<Changes>, CaError> {
        self.session(|client, s| {
            // One snapshot: the changes and the records as of one moment.
            let tx = s.wait(snapshot(client))?;
            let newest = self.state_version(s, &tx, "")?;
            self.check_version(newest)?;
            let trimmed: i64 = s
                .wait(tx.query_one("SELECT trimmed FROM revproxy.state", &[]))?
                .get(0);
            let since = i64::try_from(since).unwrap_or(i64::MAX);
            // Changes after `since` trimmed, or written without a record of what (the
            // migration into tables): no telling what changed.
            if since > newest || since < trimmed {
                return Ok(None);
            }
            let keys = s.wait(rows::changed_keys(&tx, since, newest, MAX_CHANGES + 1))?;
            if keys.len() > MAX_CHANGES as usize {
                return Ok(None); // as cheap to read whole
            }
            let records = s.wait(rows::changed_records(&tx, keys))?;
            Ok(Some(Changes {
                version: newest as u64,
                records,
            }))
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
        self.session(|client, s| {
            let tx = s.wait(client.transaction())?;
            let sql = "INSERT INTO revproxy.state (version) VALUES (1) ON CONFLICT DO NOTHING";
            if s.wait(tx.execute(sql, &[]))? != 1 {
                return Err(CaError::StoreHoldsState(self.described.clone()));
            }
            s.wait(rows::import(&tx, state))?;
            s.wait(tx.commit())
        })
    }

    fn shared(&self) -> bool {
        true
    }

    fn on_change(&self, wake: Arc<dyn Fn() + Send + Sync>) {
        self.listen_for_changes(wake);
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
                warn!(proxy = %proxy.id, other = %address.as_deref().unwrap_or("-"),
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

/// A read-only transaction that sees one moment throughout.
async fn snapshot(client: &mut Client) -> Result<Transaction<'_>, tokio_postgres::Error> {
    client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
}

impl PgStore {
    /// The state's version (`lock`: the SQL that follows the select, to lock its row), or
    /// [`CaError::StoreEmpty`] when the store holds no state yet.
    fn state_version(
        &self,
        s: &mut Session,
        tx: &Transaction<'_>,
        lock: &str,
    ) -> Result<i64, CaError> {
        let sql = format!("SELECT version FROM revproxy.state{lock}");
        match s.wait(tx.query_opt(&sql, &[]))? {
            Some(row) => Ok(row.get(0)),
            None => Err(CaError::StoreEmpty(self.described.clone())),
        }
    }
}
