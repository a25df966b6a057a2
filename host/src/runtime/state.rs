//! Per-instance store state and the shared backends behind the Spin
//! interfaces.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::Mutex;
use wasmtime::component::ResourceTable;
use wasmtime::StoreLimits;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use super::outbound::OutboundPolicy;
use crate::metrics::Metrics;

/// Redis connections and Postgres pools shared by all instances, keyed by
/// the address a component opens.
pub struct Backends {
    pub metrics: Arc<Metrics>,
    redis: Mutex<HashMap<String, ConnectionManager>>,
    postgres: Mutex<HashMap<String, deadpool_postgres::Pool>>,
    pub io_timeout: Duration,
    postgres_pool_size: usize,
}

impl Backends {
    pub fn new(io_timeout: Duration, postgres_pool_size: usize, metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            redis: Mutex::new(HashMap::new()),
            postgres: Mutex::new(HashMap::new()),
            io_timeout,
            postgres_pool_size,
        }
    }

    /// Returns the multiplexed Redis connection for `url`, connecting on
    /// first use. The connection reconnects by itself after failures.
    pub async fn redis(&self, url: &str) -> anyhow::Result<ConnectionManager> {
        let mut connections = self.redis.lock().await;
        if let Some(manager) = connections.get(url) {
            return Ok(manager.clone());
        }
        let client = redis::Client::open(url).context("invalid Redis URL")?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.io_timeout))
            .set_response_timeout(Some(self.io_timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(2));
        let manager = tokio::time::timeout(
            self.io_timeout,
            ConnectionManager::new_with_config(client, config),
        )
        .await
        .context("timed out connecting to Redis")?
        .context("failed to connect to Redis")?;
        connections.insert(url.to_string(), manager.clone());
        Ok(manager)
    }

    /// Returns the Postgres pool for `url`, creating it on first use.
    pub async fn postgres(&self, url: &str) -> anyhow::Result<deadpool_postgres::Pool> {
        let mut pools = self.postgres.lock().await;
        if let Some(pool) = pools.get(url) {
            return Ok(pool.clone());
        }
        let pg_config: tokio_postgres::Config = url.parse().context("invalid Postgres URL")?;
        let manager = deadpool_postgres::Manager::from_config(
            pg_config,
            tokio_postgres::NoTls,
            deadpool_postgres::ManagerConfig {
                recycling_method: deadpool_postgres::RecyclingMethod::Fast,
            },
        );
        let timeouts = deadpool_postgres::Timeouts {
            wait: Some(self.io_timeout),
            create: Some(self.io_timeout),
            recycle: Some(self.io_timeout),
        };
        let pool = deadpool_postgres::Pool::builder(manager)
            .max_size(self.postgres_pool_size)
            .timeouts(timeouts)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .context("failed to build the Postgres pool")?;
        pools.insert(url.to_string(), pool.clone());
        Ok(pool)
    }
}

/// Variables and outbound hosts of one component.
pub struct ComponentContext {
    pub id: String,
    pub variables: HashMap<String, String>,
    pub outbound: OutboundPolicy,
}

/// The data of one store, which lives for one event or one HTTP request.
pub struct State {
    pub(super) wasi: WasiCtx,
    pub(super) http: WasiHttpCtx,
    pub(super) table: ResourceTable,
    pub(super) limits: StoreLimits,
    pub(super) component: Arc<ComponentContext>,
    pub(super) backends: Arc<Backends>,
    /// Time spent in host I/O, which the guest deadline does not count.
    pub(super) io_time: Duration,
    pub(super) started: Instant,
    pub(super) deadline: Duration,
    /// Connections opened through the Spin interfaces by this instance.
    pub(super) open_connections: u32,
}

/// Most Redis or Postgres connections one instance may open.
pub(super) const MAX_OPEN_CONNECTIONS: u32 = 8;

impl State {
    /// Measures a host I/O call, so its time is left out of the guest
    /// deadline, and bounds it with the I/O timeout.
    pub(super) async fn timed<T, E>(
        &mut self,
        future: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<Result<T, E>, IoTimeout> {
        let start = Instant::now();
        let result = tokio::time::timeout(self.backends.io_timeout, future).await;
        self.io_time += start.elapsed();
        result.map_err(|_| IoTimeout)
    }

    /// Guest computation time so far: wall time minus host I/O.
    pub(super) fn guest_time(&self) -> Duration {
        self.started.elapsed().saturating_sub(self.io_time)
    }
}

#[derive(Debug)]
pub(super) struct IoTimeout;

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for State {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: super::http::deny_outgoing_hooks(),
        }
    }
}
