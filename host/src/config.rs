//! Host configuration, read from the environment (and `.env.local`).
//!
//! Every time limit is configurable so that tests can run with short ones.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;

/// Settings of one host process. Each field documents its default.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// TCP port for WebSockets and HTTP routes.
    #[arg(global = true, long, env = "PORT", default_value_t = 3000)]
    pub port: u16,

    /// Address to bind.
    #[arg(global = true, long, env = "BIND_ADDRESS", default_value = "0.0.0.0")]
    pub bind_address: String,

    /// Path of the Spin manifest that lists the components and event routes.
    #[arg(
        global = true,
        long,
        env = "NEXUS_MANIFEST",
        default_value = "spin.toml"
    )]
    pub manifest: PathBuf,

    /// HS256 secret for tokens, at least 32 characters.
    #[arg(global = true, long, env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// Postgres connection URL.
    #[arg(
        global = true,
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/nexus_chat",
        hide_env_values = true
    )]
    pub database_url: String,

    /// Full Redis URL; when unset it is built from the REDIS_* parts.
    #[arg(global = true, long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    #[arg(global = true, long, env = "REDIS_HOST", default_value = "127.0.0.1")]
    pub redis_host: String,
    #[arg(global = true, long, env = "REDIS_PORT", default_value_t = 6379)]
    pub redis_port: u16,
    #[arg(global = true, long, env = "REDIS_PASSWORD", hide_env_values = true)]
    pub redis_password: Option<String>,
    #[arg(global = true, long, env = "REDIS_DB", default_value_t = 0)]
    pub redis_db: u32,

    /// Comma-separated origins allowed to open WebSockets from a browser.
    #[arg(
        global = true,
        long,
        env = "FRONTEND_URLS",
        default_value = "http://localhost:3000,http://localhost:3001"
    )]
    pub frontend_urls: String,

    /// `development` (readable logs, `token` command) or `production` (JSON
    /// logs).
    #[arg(global = true, long, env = "NODE_ENV", default_value = "development")]
    pub node_env: String,

    /// Instance id; a random one is chosen when unset.
    #[arg(global = true, long, env = "NEXUS_INSTANCE_ID")]
    pub instance_id: Option<String>,

    /// Largest accepted WebSocket frame or message, in bytes (close 1009).
    #[arg(global = true, long, env = "MAX_FRAME_BYTES", default_value_t = 16 * 1024)]
    pub max_frame_bytes: usize,

    /// Time a new connection has to authenticate, in ms (close 1008).
    #[arg(global = true, long, env = "AUTH_TIMEOUT_MS", default_value_t = 10_000)]
    pub auth_timeout_ms: u64,

    /// Time without any frame, pongs included, before close 4003, in ms.
    #[arg(
        global = true,
        long,
        env = "INACTIVITY_TIMEOUT_MS",
        default_value_t = 300_000
    )]
    pub inactivity_timeout_ms: u64,

    /// Interval between server pings, in ms.
    #[arg(
        global = true,
        long,
        env = "PING_INTERVAL_MS",
        default_value_t = 25_000
    )]
    pub ping_interval_ms: u64,

    /// Guest computation allowed per event, in ms. Host I/O is not counted;
    /// it has its own timeouts.
    #[arg(
        global = true,
        long,
        env = "HANDLER_DEADLINE_MS",
        default_value_t = 2_000
    )]
    pub handler_deadline_ms: u64,

    /// Timeout of one Redis or Postgres call made for a component, in ms.
    #[arg(global = true, long, env = "IO_TIMEOUT_MS", default_value_t = 5_000)]
    pub io_timeout_ms: u64,

    /// Linear memory cap per component instance, in MiB.
    #[arg(global = true, long, env = "INSTANCE_MEMORY_MIB", default_value_t = 32)]
    pub instance_memory_mib: usize,

    /// Component instances that may run at once, counting those waiting on
    /// Redis or Postgres. The pooling allocator reserves a slot for each,
    /// and each slot used keeps up to INSTANCE_KEEP_RESIDENT_KIB resident.
    #[arg(
        global = true,
        long,
        env = "MAX_CONCURRENT_INSTANCES",
        default_value_t = 64
    )]
    pub max_concurrent_instances: u32,

    /// Instance memory, in KiB, that is reset in place and kept resident when
    /// the instance ends, so the next event in the slot takes fewer page
    /// faults. 0 unmaps all of it.
    #[arg(
        global = true,
        long,
        env = "INSTANCE_KEEP_RESIDENT_KIB",
        default_value_t = 64
    )]
    pub instance_keep_resident_kib: usize,

    /// Average frames per second one connection may send; bursts may reach
    /// twice this.
    #[arg(
        global = true,
        long,
        env = "MAX_EVENTS_PER_SECOND",
        default_value_t = 20
    )]
    pub max_events_per_second: u32,

    /// Whether the host sits behind a proxy that appends the client address
    /// to `X-Forwarded-For`; the last entry then counts as the client's
    /// address, and an invalid one as the proxy's. Leave off when clients
    /// connect directly, because they can set the header themselves.
    #[arg(
        global = true,
        long,
        env = "TRUST_FORWARDED_FOR",
        default_value_t = false
    )]
    pub trust_forwarded_for: bool,

    /// Open connections allowed from one remote IP address.
    #[arg(
        global = true,
        long,
        env = "MAX_CONNECTIONS_PER_IP",
        default_value_t = 5_000
    )]
    pub max_connections_per_ip: usize,

    /// Lifetime of a presence record that its instance stops refreshing, in
    /// seconds. The host refreshes records every third of this.
    #[arg(global = true, long, env = "PRESENCE_TTL_S", default_value_t = 60)]
    pub presence_ttl_s: u64,

    /// Interval between this instance's heartbeats in Redis, in ms. Every
    /// instance also checks the others' heartbeats at this interval.
    #[arg(
        global = true,
        long,
        env = "INSTANCE_HEARTBEAT_MS",
        default_value_t = 2_000
    )]
    pub instance_heartbeat_ms: u64,

    /// Time without a heartbeat after which an instance counts as dead and
    /// its users are announced offline, in ms.
    #[arg(global = true, long, env = "INSTANCE_TTL_MS", default_value_t = 6_000)]
    pub instance_ttl_ms: u64,

    /// Frames queued for one client before it counts as a slow consumer and
    /// is closed.
    #[arg(global = true, long, env = "SEND_QUEUE_FRAMES", default_value_t = 1024)]
    pub send_queue_frames: usize,

    /// Folder for Wasmtime's cache of compiled components, so restarts skip
    /// compilation; empty disables the cache. Unset uses Wasmtime's default
    /// folder under the user's cache directory.
    #[arg(global = true, long, env = "COMPILE_CACHE_DIR")]
    pub compile_cache_dir: Option<PathBuf>,

    /// Postgres connections in the host's pool.
    #[arg(global = true, long, env = "POSTGRES_POOL_SIZE", default_value_t = 16)]
    pub postgres_pool_size: usize,
}

impl Config {
    /// Checks the settings that have no safe default.
    pub fn validate(&self) -> anyhow::Result<()> {
        let secret = self.jwt_secret()?;
        if secret.len() < 32 {
            bail!("JWT_SECRET is shorter than 32 characters; set a longer secret");
        }
        if self.presence_ttl_s < 3 {
            bail!("PRESENCE_TTL_S must be at least 3 seconds");
        }
        if self.instance_ttl_ms <= self.instance_heartbeat_ms {
            bail!("INSTANCE_TTL_MS must be longer than INSTANCE_HEARTBEAT_MS");
        }
        if self.max_events_per_second == 0 {
            bail!("MAX_EVENTS_PER_SECOND must be at least 1");
        }
        if self.ping_interval_ms == 0 {
            bail!("PING_INTERVAL_MS must be at least 1 ms");
        }
        Ok(())
    }

    pub fn jwt_secret(&self) -> anyhow::Result<&str> {
        self.jwt_secret
            .as_deref()
            .context("JWT_SECRET is not set; set it to a random string of 32 or more characters")
    }

    /// Returns the Redis URL, built from the REDIS_* parts when REDIS_URL is
    /// unset.
    pub fn redis_url(&self) -> String {
        if let Some(url) = &self.redis_url {
            return url.clone();
        }
        let auth = match &self.redis_password {
            Some(password) if !password.is_empty() => format!(":{password}@"),
            _ => String::new(),
        };
        format!(
            "redis://{auth}{}:{}/{}",
            self.redis_host, self.redis_port, self.redis_db
        )
    }

    pub fn allowed_origins(&self) -> Vec<String> {
        self.frontend_urls
            .split(',')
            .map(|origin| origin.trim().trim_end_matches('/').to_string())
            .filter(|origin| !origin.is_empty())
            .collect()
    }

    pub fn is_production(&self) -> bool {
        self.node_env == "production"
    }

    pub fn auth_timeout(&self) -> Duration {
        Duration::from_millis(self.auth_timeout_ms)
    }

    pub fn inactivity_timeout(&self) -> Duration {
        Duration::from_millis(self.inactivity_timeout_ms)
    }

    pub fn ping_interval(&self) -> Duration {
        Duration::from_millis(self.ping_interval_ms)
    }

    pub fn handler_deadline(&self) -> Duration {
        Duration::from_millis(self.handler_deadline_ms)
    }

    pub fn io_timeout(&self) -> Duration {
        Duration::from_millis(self.io_timeout_ms)
    }

    pub fn presence_ttl(&self) -> Duration {
        Duration::from_secs(self.presence_ttl_s)
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct TestCli {
        #[command(flatten)]
        config: Config,
    }

    fn parse(arguments: &[&str]) -> Config {
        let secret = [
            "test",
            "--jwt-secret",
            "a test secret of at least 32 bytes!!",
        ];
        let all = secret.iter().chain(arguments);
        TestCli::parse_from(all).config
    }

    #[test]
    fn validate_accepts_defaults() {
        let result = parse(&[]).validate();
        assert!(result.is_ok(), "{result:?}");
    }

    #[test]
    fn validate_rejects_zero_ping_interval() {
        let error = parse(&["--ping-interval-ms", "0"]).validate().err();
        let message = error.map(|error| error.to_string()).unwrap_or_default();
        assert_eq!(message, "PING_INTERVAL_MS must be at least 1 ms");
    }
}
