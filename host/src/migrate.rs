//! Postgres schema migrations, applied under an advisory lock so that
//! instances starting together do not race.

use anyhow::Context;
use tokio_postgres::NoTls;
use tracing::info;

/// Migrations in order; each runs once, in its own transaction.
const MIGRATIONS: &[(&str, &str)] = &[
    (
        "0001_messages",
        include_str!("../migrations/0001_messages.sql"),
    ),
    (
        "0002_pending_messages",
        include_str!("../migrations/0002_pending_messages.sql"),
    ),
];

/// Key of the advisory lock that serializes migrations (an arbitrary
/// constant that only this project uses).
const MIGRATION_LOCK_KEY: i64 = 0x6e65_7875_735f_6d67;

/// Applies pending migrations and returns how many ran.
pub async fn run(database_url: &str) -> anyhow::Result<usize> {
    let (mut client, connection) = tokio_postgres::connect(database_url, NoTls)
        .await
        .context("failed to connect to Postgres for migrations; check DATABASE_URL")?;
    let connection = tokio::spawn(connection);

    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await
        .context("failed to take the migration lock")?;
    let result = apply(&mut client).await;
    let unlock = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY])
        .await;
    drop(client);
    let _ = connection.await;
    let applied = result?;
    unlock.context("failed to release the migration lock")?;
    Ok(applied)
}

async fn apply(client: &mut tokio_postgres::Client) -> anyhow::Result<usize> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                 name text PRIMARY KEY,
                 applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await
        .context("failed to create schema_migrations")?;
    let mut applied = 0;
    for (name, sql) in MIGRATIONS {
        let done = client
            .query_opt("SELECT 1 FROM schema_migrations WHERE name = $1", &[name])
            .await?
            .is_some();
        if done {
            continue;
        }
        let transaction = client.transaction().await?;
        transaction
            .batch_execute(sql)
            .await
            .with_context(|| format!("migration {name} failed"))?;
        transaction
            .execute("INSERT INTO schema_migrations (name) VALUES ($1)", &[name])
            .await?;
        transaction.commit().await?;
        info!(migration = name, "migration applied");
        applied += 1;
    }
    Ok(applied)
}
