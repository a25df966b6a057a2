//! Host implementation of `fermyon:spin/redis@2.0.0` on pooled, multiplexed
//! Redis connections.
//!
//! Failures the guest can handle (a refused address, a Redis error, a
//! timeout) return the interface's `error` value. Only a host bug, such as a
//! missing resource, traps.

use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Value};
use tracing::warn;
use wasmtime::component::Resource;

use super::bindings::redis::{self as wit, RedisParameter, RedisResult};
use super::state::{State, MAX_OPEN_CONNECTIONS};

/// A `connection` resource: a handle on the shared multiplexed connection.
pub struct RedisConnection {
    manager: ConnectionManager,
}

type WitResult<T> = wasmtime::Result<Result<T, wit::Error>>;

fn map_error(component: &str, error: redis::RedisError) -> wit::Error {
    warn!(component, cause = %error, "redis call failed");
    if error.kind() == redis::ErrorKind::UnexpectedReturnType {
        wit::Error::TypeError
    } else {
        wit::Error::Other(format!("redis error: {error}"))
    }
}

fn timeout_error() -> wit::Error {
    wit::Error::Other("redis call timed out".to_string())
}

impl State {
    fn redis_manager(
        &self,
        handle: &Resource<RedisConnection>,
    ) -> wasmtime::Result<ConnectionManager> {
        Ok(self.table.get(handle)?.manager.clone())
    }

    async fn redis_call<T>(
        &mut self,
        handle: &Resource<RedisConnection>,
        call: impl AsyncFnOnce(ConnectionManager) -> redis::RedisResult<T>,
    ) -> WitResult<T> {
        let manager = self.redis_manager(handle)?;
        let component = self.component.id.clone();
        let result = match self.timed(call(manager)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(map_error(&component, error)),
            Err(_) => Err(timeout_error()),
        };
        if result.is_err() {
            self.backends.metrics.storage_error("redis");
        }
        Ok(result)
    }
}

/// Flattens a Redis reply into the interface's list of results. Arrays,
/// sets and maps (nested ones too) become their elements in order.
fn flatten(value: Value, out: &mut Vec<RedisResult>) -> Result<(), wit::Error> {
    match value {
        Value::Nil => out.push(RedisResult::Nil),
        Value::Int(number) => out.push(RedisResult::Int64(number)),
        Value::BulkString(bytes) => out.push(RedisResult::Binary(bytes)),
        Value::SimpleString(status) => out.push(RedisResult::Status(status)),
        Value::Okay => out.push(RedisResult::Status("OK".to_string())),
        Value::Array(items) | Value::Set(items) => {
            for item in items {
                flatten(item, out)?;
            }
        }
        Value::Map(pairs) => {
            for (key, value) in pairs {
                flatten(key, out)?;
                flatten(value, out)?;
            }
        }
        Value::Attribute { data, .. } => flatten(*data, out)?,
        Value::Double(number) => out.push(RedisResult::Binary(number.to_string().into_bytes())),
        Value::Boolean(flag) => out.push(RedisResult::Int64(i64::from(flag))),
        Value::VerbatimString { text, .. } => out.push(RedisResult::Binary(text.into_bytes())),
        Value::BigNumber(number) => out.push(RedisResult::Binary(number.to_string().into_bytes())),
        Value::Push { .. } => {
            return Err(wit::Error::Other("unexpected push reply".to_string()));
        }
        Value::ServerError(error) => {
            return Err(wit::Error::Other(format!("redis error: {error:?}")));
        }
        _ => return Err(wit::Error::TypeError),
    }
    Ok(())
}

/// Commands that would break the shared multiplexed connection (blocking
/// reads, subscriptions, transactions, connection state) or the server.
const UNSUPPORTED_COMMANDS: &[&str] = &[
    "AUTH",
    "BLMOVE",
    "BLMPOP",
    "BLPOP",
    "BRPOP",
    "BRPOPLPUSH",
    "BZMPOP",
    "BZPOPMAX",
    "BZPOPMIN",
    "CLIENT",
    "CONFIG",
    "DEBUG",
    "DISCARD",
    "EXEC",
    "FLUSHALL",
    "FLUSHDB",
    "HELLO",
    "MONITOR",
    "MULTI",
    "PSUBSCRIBE",
    "PUNSUBSCRIBE",
    "QUIT",
    "RESET",
    "SELECT",
    "SHUTDOWN",
    "SSUBSCRIBE",
    "SUBSCRIBE",
    "SUNSUBSCRIBE",
    "SYNC",
    "UNSUBSCRIBE",
    "UNWATCH",
    "WAIT",
    "WATCH",
    "XREAD",
    "XREADGROUP",
];

fn unsupported_command(command: &str) -> Option<String> {
    let upper = command.to_ascii_uppercase();
    UNSUPPORTED_COMMANDS
        .contains(&upper.as_str())
        .then(|| format!("redis command {upper} is not supported on the host's shared connection"))
}

impl wit::Host for State {}

impl wit::HostConnection for State {
    async fn open(&mut self, address: String) -> WitResult<Resource<RedisConnection>> {
        if let Err(reason) = self.component.outbound.check_url(&address) {
            warn!(component = %self.component.id, %reason, "redis address rejected");
            return Ok(Err(wit::Error::InvalidAddress));
        }
        if self.open_connections >= MAX_OPEN_CONNECTIONS {
            return Ok(Err(wit::Error::TooManyConnections));
        }
        let backends = self.backends.clone();
        let manager = match self.timed(backends.redis(&address)).await {
            Ok(Ok(manager)) => manager,
            Ok(Err(error)) => {
                self.backends.metrics.storage_error("redis");
                warn!(component = %self.component.id, cause = %error, "redis connect failed");
                return Ok(Err(wit::Error::Other(format!("{error:#}"))));
            }
            Err(_) => return Ok(Err(timeout_error())),
        };
        self.open_connections += 1;
        Ok(Ok(self.table.push(RedisConnection { manager })?))
    }

    async fn publish(
        &mut self,
        handle: Resource<RedisConnection>,
        channel: String,
        payload: Vec<u8>,
    ) -> WitResult<()> {
        self.redis_call(&handle, async |mut c| {
            c.publish::<_, _, ()>(channel, payload).await
        })
        .await
    }

    async fn get(
        &mut self,
        handle: Resource<RedisConnection>,
        key: String,
    ) -> WitResult<Option<Vec<u8>>> {
        self.redis_call(&handle, async |mut c| c.get(key).await)
            .await
    }

    async fn set(
        &mut self,
        handle: Resource<RedisConnection>,
        key: String,
        value: Vec<u8>,
    ) -> WitResult<()> {
        self.redis_call(&handle, async |mut c| c.set::<_, _, ()>(key, value).await)
            .await
    }

    async fn incr(&mut self, handle: Resource<RedisConnection>, key: String) -> WitResult<i64> {
        self.redis_call(&handle, async |mut c| c.incr(key, 1).await)
            .await
    }

    async fn del(
        &mut self,
        handle: Resource<RedisConnection>,
        keys: Vec<String>,
    ) -> WitResult<u32> {
        self.redis_call(&handle, async |mut c| c.del(keys).await)
            .await
    }

    async fn sadd(
        &mut self,
        handle: Resource<RedisConnection>,
        key: String,
        values: Vec<String>,
    ) -> WitResult<u32> {
        self.redis_call(&handle, async |mut c| c.sadd(key, values).await)
            .await
    }

    async fn smembers(
        &mut self,
        handle: Resource<RedisConnection>,
        key: String,
    ) -> WitResult<Vec<String>> {
        self.redis_call(&handle, async |mut c| c.smembers(key).await)
            .await
    }

    async fn srem(
        &mut self,
        handle: Resource<RedisConnection>,
        key: String,
        values: Vec<String>,
    ) -> WitResult<u32> {
        self.redis_call(&handle, async |mut c| c.srem(key, values).await)
            .await
    }

    async fn execute(
        &mut self,
        handle: Resource<RedisConnection>,
        command: String,
        arguments: Vec<RedisParameter>,
    ) -> WitResult<Vec<RedisResult>> {
        if let Some(reason) = unsupported_command(&command) {
            return Ok(Err(wit::Error::Other(reason)));
        }
        let mut cmd = redis::cmd(&command);
        for argument in arguments {
            match argument {
                RedisParameter::Int64(number) => cmd.arg(number),
                RedisParameter::Binary(bytes) => cmd.arg(bytes),
            };
        }
        let reply = self
            .redis_call(&handle, async |mut c| {
                cmd.query_async::<Value>(&mut c).await
            })
            .await?;
        Ok(reply.and_then(|value| {
            let mut results = Vec::new();
            flatten(value, &mut results)?;
            Ok(results)
        }))
    }

    async fn drop(&mut self, handle: Resource<RedisConnection>) -> wasmtime::Result<()> {
        self.table.delete(handle)?;
        Ok(())
    }
}
