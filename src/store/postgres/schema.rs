//! The store's tables and their migrations: revproxy creates and upgrades the schema
//! itself ([`SCHEMA_VERSION`]), under an advisory lock so that proxies starting together do
//! it once. The queries on these tables are in `queries.rs`.

use revproxy_ca::CaError;
use tokio_postgres::Client;
use tracing::info;

/// The schema version this revproxy writes (`revproxy.schema_version`).
pub const SCHEMA_VERSION: i32 = 1;
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

/// Applies the migrations this store lacks, under an advisory lock; refuses a schema newer
/// than this revproxy knows.
pub(super) async fn migrate(
    client: &mut Client,
) -> Result<Result<(), CaError>, tokio_postgres::Error> {
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
