//! The store's tables and their migrations: revproxy creates and upgrades the schema
//! itself ([`SCHEMA_VERSION`]), under an advisory lock so that proxies starting together do
//! it once, and uses it only if the schema and everything in it belong to the role it
//! connects as (whoever owns them can rewrite the CA state). The queries on these tables
//! are in `queries.rs`.

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

/// Why the store's schema is not used.
#[derive(Debug, thiserror::Error)]
pub(super) enum SchemaError {
    #[error("the store's schema is version {current}, newer than this revproxy knows ({SCHEMA_VERSION}): upgrade revproxy")]
    TooNew { current: i32 },
    #[error("the store's {kind} {object} belongs to role {owner:?}, not to {me:?}, the role revproxy connects as: role {owner:?} could change the CA state behind revproxy's back. If that role is yours, connect as it (the store URL's user); otherwise have a superuser run `ALTER {kind} {object} OWNER TO {me}` once you know who made it")]
    ForeignOwner {
        kind: String,
        object: String,
        owner: String,
        me: String,
    },
}

/// The first object of the `revproxy` schema, the schema itself included, that belongs to
/// another role than the session's, if any.
async fn foreign_owned(
    tx: &tokio_postgres::Transaction<'_>,
) -> Result<Option<SchemaError>, tokio_postgres::Error> {
    let row = tx
        .query_opt(
            "SELECT kind, object, owner, current_user::text FROM ( \
                 SELECT 0 AS rank, 'SCHEMA' AS kind, n.nspname::text AS object, \
                        pg_get_userbyid(n.nspowner)::text AS owner, n.nspowner AS owner_id \
                 FROM pg_namespace n WHERE n.nspname = 'revproxy' \
                 UNION ALL \
                 SELECT 1, CASE c.relkind WHEN 'S' THEN 'SEQUENCE' WHEN 'v' THEN 'VIEW' \
                        ELSE 'TABLE' END, 'revproxy.' || c.relname, \
                        pg_get_userbyid(c.relowner)::text, c.relowner \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = 'revproxy' AND c.relkind <> 'i' \
                 UNION ALL \
                 SELECT 2, 'FUNCTION', 'revproxy.' || p.proname, \
                        pg_get_userbyid(p.proowner)::text, p.proowner \
                 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
                 WHERE n.nspname = 'revproxy' \
             ) o WHERE o.owner_id <> (SELECT oid FROM pg_roles WHERE rolname = current_user) \
             ORDER BY rank, object LIMIT 1",
            &[],
        )
        .await?;
    Ok(row.map(|row| SchemaError::ForeignOwner {
        kind: row.get(0),
        object: row.get(1),
        owner: row.get(2),
        me: row.get(3),
    }))
}

/// Applies the migrations this store lacks, under an advisory lock; refuses a schema newer
/// than this revproxy knows, and one that another role owns or holds objects in.
pub(super) async fn migrate(
    client: &mut Client,
) -> Result<Result<(), CaError>, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute("CREATE SCHEMA IF NOT EXISTS revproxy")
        .await?;
    // Checked before anything is created in it, and again below once it all exists.
    if let Some(e) = foreign_owned(&tx).await? {
        return Ok(Err(CaError::InvalidInput(e.to_string())));
    }
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS revproxy.schema_version (version integer NOT NULL)",
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
        let e = SchemaError::TooNew { current };
        return Ok(Err(CaError::InvalidInput(e.to_string())));
    }
    for (from, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        tx.batch_execute(sql).await?;
        info!(version = from + 1, was = from, "store schema migrated");
    }
    tx.execute(
        "UPDATE revproxy.schema_version SET version = $1",
        &[&SCHEMA_VERSION],
    )
    .await?;
    if let Some(e) = foreign_owned(&tx).await? {
        return Ok(Err(CaError::InvalidInput(e.to_string())));
    }
    tx.commit().await?;
    Ok(Ok(()))
}
