//! The [`Store`] calls as SQL. The state is one versioned document (`revproxy.state`, a
//! single JSONB row), changed only in a transaction that holds that row `FOR UPDATE`: of
//! two proxies trading one token at the same moment, the second reads what the first
//! wrote and refuses. Proxies heartbeat in `revproxy.proxies`, which is how they and their
//! agents know each other. How a call runs (connection, timeout) is in `mod.rs`.

use std::sync::Arc;

use revproxy_ca::state::State;
use revproxy_ca::{CaError, ProxyEntry, Store};
use tokio_postgres::{GenericClient, Row};
use tracing::warn;

use super::{feed, PgStore};

/// A proxy that has not announced itself for this long is no longer listed.
const PROXY_STALE_SECS: u32 = 30;

impl Store for PgStore {
    fn describe(&self) -> String {
        self.described.clone()
    }

    // The version is checked while the call holds the connection: calls run one at a
    // time on it, so the versions are checked in the order the database answered them.
    fn read(&self) -> Result<State, CaError> {
        let described = &self.described;
        self.with_client(async |client| {
            let sql = "SELECT version, doc::text FROM revproxy.state";
            let row = state_row(client, described, sql).await?;
            Ok(row.and_then(|row| {
                self.check_version(row.get(0))?;
                parse_state(described, row.get(1))
            }))
        })
    }

    fn version(&self) -> Result<u64, CaError> {
        let described = &self.described;
        self.with_client(async |client| {
            let row = state_row(client, described, "SELECT version FROM revproxy.state").await?;
            Ok(row.and_then(|row| {
                let version: i64 = row.get(0);
                self.check_version(version).map(|()| version as u64)
            }))
        })
    }

    fn apply(&self, change: &mut (dyn FnMut(&mut State) -> bool + Send)) -> Result<(), CaError> {
        let described = &self.described;
        self.with_client(async |client| {
            let tx = client.transaction().await?;
            let sql = "SELECT version, doc::text FROM revproxy.state FOR UPDATE";
            let row = match state_row(&tx, described, sql).await? {
                Ok(row) => row,
                Err(e) => return Ok(Err(e)),
            };
            let version: i64 = row.get(0);
            // Never a change written over an older state than this process has seen.
            if let Err(e) = self.check_version(version) {
                tx.rollback().await?;
                return Ok(Err(e));
            }
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
            feed::notify(&tx, version + 1).await?;
            tx.commit().await?;
            Ok(self.check_version(version + 1))
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

/// The state's row as `sql` selects it, or [`CaError::StoreEmpty`] when the store holds
/// no state yet.
async fn state_row(
    client: &(impl GenericClient + Sync),
    described: &str,
    sql: &str,
) -> Result<Result<Row, CaError>, tokio_postgres::Error> {
    let row = client.query_opt(sql, &[]).await?;
    Ok(row.ok_or_else(|| CaError::StoreEmpty(described.into())))
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
