//! A whole Nexus Chat system for one test: private Redis, a fresh Postgres
//! database and any number of host instances sharing them.

use std::collections::BTreeMap;

use crate::client::Client;
use crate::host::{HostProcess, Settings};
use crate::http::{self, HttpResponse};
use crate::postgres::TestDatabase;
use crate::redis::RedisServer;
use crate::{tokens, TestDir};

/// Redis, Postgres and host instances, torn down on drop: hosts first, then
/// Redis, then the database.
pub struct System {
    // Field order is drop order: hosts must stop before their stores go.
    hosts: Vec<HostProcess>,
    redis: RedisServer,
    db: TestDatabase,
    settings: Settings,
    dir: TestDir,
}

impl System {
    /// Starts a system with `instances` hosts and the default [`Settings`].
    pub async fn start(instances: usize) -> System {
        System::start_with(instances, Settings::default()).await
    }

    /// Starts a system with `instances` hosts, all started at once (so they
    /// also race for the start-up migrations), and waits until each serves.
    pub async fn start_with(instances: usize, settings: Settings) -> System {
        let db = TestDatabase::create().await;
        System::start_with_database(instances, settings, db).await
    }

    /// Starts a system like [`System::start_with`] on a database the caller
    /// created, for example one on a private
    /// [`crate::pg_cluster::PostgresCluster`] that the test stops and starts.
    /// That cluster must outlive the system, whose drop removes the database.
    pub async fn start_with_database(
        instances: usize,
        settings: Settings,
        db: TestDatabase,
    ) -> System {
        let dir = TestDir::create();
        let redis = RedisServer::start(dir.path()).await;
        let mut system = System {
            hosts: Vec::new(),
            redis,
            db,
            settings,
            dir,
        };
        for _ in 0..instances {
            system.spawn_host();
        }
        for host in &mut system.hosts {
            host.wait_ready().await;
        }
        system
    }

    /// Returns the environment every host of this system gets.
    pub fn host_env(&self) -> BTreeMap<String, String> {
        let mut env = self.settings.vars().clone();
        env.insert("JWT_SECRET".into(), tokens::JWT_SECRET.into());
        env.insert("DATABASE_URL".into(), self.db.url().to_owned());
        env.insert("REDIS_URL".into(), self.redis.url());
        env.insert("REDIS_HOST".into(), "127.0.0.1".into());
        env.insert("REDIS_PORT".into(), self.redis.port().to_string());
        env
    }

    fn spawn_host(&mut self) -> usize {
        let index = self.hosts.len();
        let host = HostProcess::spawn(&instance_id(index), &self.host_env(), self.dir.path());
        self.hosts.push(host);
        index
    }

    /// Starts one more host and returns its index once it serves.
    pub async fn add_host(&mut self) -> usize {
        let index = self.spawn_host();
        self.hosts[index].wait_ready().await;
        index
    }

    pub fn host(&self, index: usize) -> &HostProcess {
        &self.hosts[index]
    }

    /// Returns how many hosts the system has started.
    pub fn host_count(&self) -> usize {
        self.hosts.len()
    }

    pub fn host_mut(&mut self, index: usize) -> &mut HostProcess {
        &mut self.hosts[index]
    }

    pub fn redis(&self) -> &RedisServer {
        &self.redis
    }

    pub fn redis_mut(&mut self) -> &mut RedisServer {
        &mut self.redis
    }

    pub fn db(&self) -> &TestDatabase {
        &self.db
    }

    /// Returns the folder that keeps this test's logs.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Returns a valid token for `user`.
    pub fn token(&self, user: &str) -> String {
        tokens::valid(user)
    }

    /// Connects to host `index` and authenticates as `user` with the
    /// `authenticate` event.
    pub async fn connect(&self, index: usize, user: &str) -> Client {
        let mut client = self.connect_anonymous(index, user).await;
        client.authenticate(user, &self.token(user)).await;
        client
    }

    /// Connects to host `index` without authenticating.
    pub async fn connect_anonymous(&self, index: usize, label: &str) -> Client {
        let host = &self.hosts[index];
        let label = format!("{label}@{}", host.instance_id());
        Client::connect(&host.ws_url(), &label).await
    }

    /// Returns the number of rows in the `messages` table.
    pub async fn message_count(&self) -> i64 {
        self.db.message_count().await
    }

    /// Sends `GET path` (with its query) to host `index`.
    pub async fn http_get(&self, index: usize, path: &str, token: Option<&str>) -> HttpResponse {
        let url = format!("{}{path}", self.hosts[index].http_url());
        http::get(&url, token).await
    }
}

/// Returns the instance id of the host at `index`: `test-a`, `test-b`, ...
pub fn instance_id(index: usize) -> String {
    match u8::try_from(index) {
        Ok(small) if small < 26 => format!("test-{}", char::from(b'a' + small)),
        _ => format!("test-{index}"),
    }
}
