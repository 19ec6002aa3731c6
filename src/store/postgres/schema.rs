//! The store's schema and its migrations: versioned, idempotent, and safe to run from several
//! processes at once.
//!
//! Every (re)connection runs [`migrate`] on its listening connection before loading the state.
//! A database already at this build's version (or newer) is used as it is, without a lock or any
//! DDL, so that processes whose role may not create tables (PostgreSQL 15 no longer lets every
//! role create in `public`) run once the schema is current. Otherwise, one transaction that takes a transaction-level advisory lock (so processes starting together
//! migrate one after the other, and the lock goes with the transaction whatever happens), creates
//! `matrix_auth_schema` if needed, reads the version recorded there, applies every later migration
//! in order, and records the new version. A migration that fails rolls the whole transaction back
//! (PostgreSQL's DDL is transactional) and the connection attempt is retried like any other.
//!
//! Migrations are only ever appended, and each keeps the previous release working (new columns
//! have defaults, nothing is dropped or renamed in the same release that stops using it), so that
//! processes of two releases can share one database during a rolling upgrade. A database whose
//! version is newer than this build knows is used as it is.

/// The advisory lock key all of the store's processes take while migrating.
const LOCK_KEY: i64 = 7_318_720_451;

/// Migration `i` takes the schema from version `i` to `i + 1`. Version 1 is the schema of the
/// releases before versioning, written so that it also adopts a database they created.
pub(super) const MIGRATIONS: &[&str] = &["
CREATE TABLE IF NOT EXISTS matrix_auth_sessions (
    session_id TEXT PRIMARY KEY,
    live_generation BIGINT NOT NULL,
    pending_generation BIGINT,
    next_generation BIGINT NOT NULL,
    revoked BOOLEAN NOT NULL,
    until_ms BIGINT NOT NULL,
    version BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS matrix_auth_sessions_until ON matrix_auth_sessions (until_ms);
ALTER TABLE matrix_auth_sessions ADD COLUMN IF NOT EXISTS user_id TEXT NOT NULL DEFAULT '';
CREATE TABLE IF NOT EXISTS matrix_auth_users (
    user_id TEXT PRIMARY KEY,
    -- The user's floor: sessions whose epoch is below it are revoked.
    revoked_before_ms BIGINT NOT NULL
);", "
-- The refresh record: the generation last refreshed at /v3/refresh, when first, and
-- next_generation right after its latest refresh (a refresh replay's grace window). Constant
-- defaults: no table rewrite. Releases before it neither read nor write these columns, but
-- every refresh they make advances next_generation, which makes the record stale: no window.
ALTER TABLE matrix_auth_sessions ADD COLUMN IF NOT EXISTS refreshed_generation BIGINT;
ALTER TABLE matrix_auth_sessions ADD COLUMN IF NOT EXISTS refreshed_at_ms BIGINT NOT NULL DEFAULT 0;
ALTER TABLE matrix_auth_sessions ADD COLUMN IF NOT EXISTS refreshed_next BIGINT NOT NULL DEFAULT 0;"];

/// The schema version this build writes and expects.
pub(super) fn current_version() -> i32 {
    i32::try_from(MIGRATIONS.len()).unwrap_or(i32::MAX)
}

/// The version recorded in the database, if it has the version table.
async fn recorded_version(
    client: &tokio_postgres::Client,
) -> Result<Option<i32>, tokio_postgres::Error> {
    let exists: bool = client
        .query_one("SELECT to_regclass('matrix_auth_schema') IS NOT NULL", &[])
        .await?
        .get(0);
    if !exists {
        return Ok(None);
    }
    client
        .query_one("SELECT max(version) FROM matrix_auth_schema", &[])
        .await
        .map(|row| row.get(0))
}

/// Brings the database's schema to [`current_version`]; returns the version found before.
pub(super) async fn migrate(client: &tokio_postgres::Client) -> Result<i32, tokio_postgres::Error> {
    if let Some(found) = recorded_version(client).await? {
        if found >= current_version() {
            return Ok(found);
        }
    }
    client
        .batch_execute(&format!(
            "BEGIN; SELECT pg_advisory_xact_lock({LOCK_KEY}); \
             CREATE TABLE IF NOT EXISTS matrix_auth_schema (version INT NOT NULL); \
             INSERT INTO matrix_auth_schema SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM matrix_auth_schema);"
        ))
        .await?;
    let outcome = async {
        let found: i32 = client
            .query_one("SELECT max(version) FROM matrix_auth_schema", &[])
            .await?
            .get(0);
        let start = usize::try_from(found).unwrap_or(0);
        for (i, migration) in MIGRATIONS.iter().enumerate().skip(start) {
            client.batch_execute(migration).await?;
            let version = i32::try_from(i + 1).unwrap_or(i32::MAX);
            client
                .execute("UPDATE matrix_auth_schema SET version = $1", &[&version])
                .await?;
            tracing::info!(version, "revocation database schema migrated");
        }
        if found > current_version() {
            tracing::debug!(
                found,
                known = current_version(),
                "revocation database schema is newer than this build; using it as it is"
            );
        }
        Ok(found)
    }
    .await;
    match outcome {
        Ok(found) => {
            client.batch_execute("COMMIT").await?;
            Ok(found)
        }
        Err(error) => {
            let _ = client.batch_execute("ROLLBACK").await;
            Err(error)
        }
    }
}
