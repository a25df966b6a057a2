//! A fresh Postgres database per test, created through an admin connection
//! to the machine's Postgres and dropped after the test.

use std::time::Duration;

use tokio_postgres::NoTls;

use crate::unique_suffix;

/// Admin connection used when `NEXUS_TEST_DATABASE_URL` is not set.
pub const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// Bound on connecting to Postgres and on each admin statement.
const POSTGRES_TIMEOUT: Duration = Duration::from_secs(15);

/// A database that exists for the lifetime of this value.
pub struct TestDatabase {
    admin_url: String,
    name: String,
    url: String,
}

impl TestDatabase {
    /// Creates an empty database named `nexus_test_<unique suffix>` on the
    /// Postgres of [`admin_url`].
    pub async fn create() -> TestDatabase {
        TestDatabase::create_with_admin(&admin_url()).await
    }

    /// Creates an empty database through `admin_url`, a role that may create
    /// databases, for example on a [`crate::pg_cluster::PostgresCluster`].
    pub async fn create_with_admin(admin_url: &str) -> TestDatabase {
        let admin_url = admin_url.to_owned();
        let name = format!("nexus_test_{}", unique_suffix());
        let admin = connect(&admin_url).await.unwrap_or_else(|error| {
            panic!(
                "failed to connect to Postgres at {admin_url}: {error}; start Postgres \
                 (deploy/lib/services.sh does) or set NEXUS_TEST_DATABASE_URL to a role \
                 that may create databases"
            )
        });
        let statement = format!("CREATE DATABASE \"{name}\"");
        match tokio::time::timeout(POSTGRES_TIMEOUT, admin.batch_execute(&statement)).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => panic!("{statement} failed: {error}"),
            Err(_) => panic!("{statement} timed out after {POSTGRES_TIMEOUT:?}"),
        }
        let url = database_url(&admin_url, &name);
        TestDatabase {
            admin_url,
            name,
            url,
        }
    }

    /// Returns the URL of this database, with the admin connection's
    /// credentials.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Opens a connection to this database.
    pub async fn connect(&self) -> tokio_postgres::Client {
        connect(&self.url)
            .await
            .unwrap_or_else(|error| panic!("failed to connect to {}: {error}", self.url))
    }

    /// Returns the number of rows in the `messages` table.
    pub async fn message_count(&self) -> i64 {
        let client = self.connect().await;
        let query = client.query_one("SELECT count(*) FROM messages", &[]);
        let result = tokio::time::timeout(POSTGRES_TIMEOUT, query).await;
        match result {
            Ok(Ok(row)) => row.get(0),
            Ok(Err(error)) => panic!("failed to count rows of messages in {}: {error}", self.name),
            Err(_) => panic!("counting rows of messages timed out after {POSTGRES_TIMEOUT:?}"),
        }
    }

    /// Returns whether a table of that name exists in the `public` schema.
    pub async fn table_exists(&self, table: &str) -> bool {
        let client = self.connect().await;
        let parameters: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&table];
        let query = client.query_one(
            "SELECT count(*) FROM information_schema.tables \
             WHERE table_schema = 'public' AND table_name = $1",
            &parameters,
        );
        let result = tokio::time::timeout(POSTGRES_TIMEOUT, query).await;
        match result {
            Ok(Ok(row)) => row.get::<_, i64>(0) > 0,
            Ok(Err(error)) => panic!("failed to look up table {table}: {error}"),
            Err(_) => panic!("looking up table {table} timed out after {POSTGRES_TIMEOUT:?}"),
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // Drop runs outside async code, so the statement runs on a thread
        // with a runtime of its own.
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        let dropper = std::thread::spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(error) => {
                    eprintln!("failed to build a runtime to drop database {name}: {error}");
                    return;
                }
            };
            runtime.block_on(async {
                let admin = match connect(&admin_url).await {
                    Ok(admin) => admin,
                    Err(error) => {
                        eprintln!("failed to connect to drop database {name}: {error}");
                        return;
                    }
                };
                let statement = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
                match tokio::time::timeout(POSTGRES_TIMEOUT, admin.batch_execute(&statement)).await
                {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => eprintln!("{statement} failed: {error}"),
                    Err(_) => eprintln!("{statement} timed out after {POSTGRES_TIMEOUT:?}"),
                }
            });
        });
        if dropper.join().is_err() {
            eprintln!("the thread dropping database {} panicked", self.name);
        }
    }
}

/// Returns the admin URL: `NEXUS_TEST_DATABASE_URL` or [`DEFAULT_ADMIN_URL`].
pub fn admin_url() -> String {
    std::env::var("NEXUS_TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_ADMIN_URL.to_owned())
}

/// Returns `admin_url` with its database name replaced by `database`.
pub fn database_url(admin_url: &str, database: &str) -> String {
    let mut url = url::Url::parse(admin_url)
        .unwrap_or_else(|error| panic!("invalid Postgres URL {admin_url}: {error}"));
    url.set_path(&format!("/{database}"));
    url.to_string()
}

/// Connects with a timeout and drives the connection on a spawned task.
async fn connect(url: &str) -> Result<tokio_postgres::Client, String> {
    let (client, connection) =
        tokio::time::timeout(POSTGRES_TIMEOUT, tokio_postgres::connect(url, NoTls))
            .await
            .map_err(|_| format!("timed out after {POSTGRES_TIMEOUT:?}"))?
            .map_err(|error| error.to_string())?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            eprintln!("Postgres connection closed with an error: {error}");
        }
    });
    Ok(client)
}
