//! The Redis backplane: connection ownership, cross-instance delivery and
//! control, and presence refresh.
//!
//! Each instance subscribes to `nexus:user:{id}` for the users connected to
//! it, so a delivery to a user on another instance is one `PUBLISH` that
//! only that instance receives. Pub/sub drops what is in flight while Redis
//! is down; Postgres keeps every message for catch-up.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::ws::Utf8Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, PushInfo, PushKind, Script, Value};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::registry::{Control, Registry};
use crate::metrics::Metrics;

pub const BROADCAST_CHANNEL: &str = "nexus:broadcast";
const ONLINE_KEY: &str = "nexus:online";

pub fn user_channel(user_id: &str) -> String {
    format!("nexus:user:{user_id}")
}

fn owner_key(user_id: &str) -> String {
    format!("nexus:owner:{user_id}")
}

fn epoch_key(user_id: &str) -> String {
    format!("nexus:epoch:{user_id}")
}

const INSTANCES_KEY: &str = "nexus:instances";

fn instance_key(instance_id: &str) -> String {
    format!("nexus:instance:{instance_id}")
}

fn instance_users_key(instance_id: &str) -> String {
    format!("nexus:instance-users:{instance_id}")
}

fn reaping_key(instance_id: &str) -> String {
    format!("nexus:reaping:{instance_id}")
}

/// Makes the connection the user's current one: a new epoch, the owner
/// record, and the online set. Returns the epoch and the previous owner.
const BIND_SCRIPT: &str = r"
local epoch = redis.call('INCR', KEYS[1])
local previous = redis.call('GET', KEYS[2])
redis.call('SET', KEYS[2], ARGV[1] .. '|' .. epoch, 'PX', ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4])
redis.call('SADD', KEYS[4], ARGV[4])
if previous then return {epoch, previous} end
return {epoch}
";

/// Removes the owner record and the online entry if the connection is still
/// the user's current one. Returns 1 when it was.
const UNBIND_SCRIPT: &str = r"
redis.call('SREM', KEYS[3], ARGV[2])
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], ARGV[2])
  return 1
end
return 0
";

/// Extends the owner record and the online score of a current connection,
/// and writes them again when they are missing (Redis restarted empty).
const REFRESH_SCRIPT: &str = r"
local owner = redis.call('GET', KEYS[1])
if owner == ARGV[1] or not owner then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
  redis.call('SADD', KEYS[3], ARGV[4])
  return 1
end
return 0
";

/// Clears a user of a dead instance unless the user has since connected
/// elsewhere. Returns 1 when the user went offline. A missing owner record
/// (it expired before the reaper came) also counts as offline, because the
/// dead instance's user set still listing the user means no clean
/// disconnect removed it.
const REAP_SCRIPT: &str = r"
local owner = redis.call('GET', KEYS[1])
if owner and string.sub(owner, 1, string.len(ARGV[1])) ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[2])
return 1
";

/// Payload prefixes on a user channel.
const DELIVERY_PREFIX: char = 'D';
const REPLACED_PREFIX: char = 'R';

pub struct Backplane {
    instance_id: String,
    commands: ConnectionManager,
    subscriber: ConnectionManager,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    presence_ttl: Duration,
    bind_script: Script,
    unbind_script: Script,
}

/// Result of binding a connection to a user.
pub struct Bound {
    pub epoch: u64,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn with_resp3(url: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    let has_path = url
        .split_once("://")
        .is_some_and(|(_, rest)| rest.contains('/'));
    let slash = if has_path { "" } else { "/" };
    format!("{url}{slash}{separator}protocol=resp3")
}

impl Backplane {
    /// Connects the command and subscriber connections and starts the task
    /// that routes published messages to local sessions.
    pub async fn connect(
        redis_url: &str,
        commands: ConnectionManager,
        instance_id: String,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        presence_ttl: Duration,
        io_timeout: Duration,
    ) -> anyhow::Result<Arc<Self>> {
        let (push_tx, push_rx) = mpsc::unbounded_channel::<PushInfo>();
        let client = redis::Client::open(with_resp3(redis_url)).context("invalid Redis URL")?;
        let config = ConnectionManagerConfig::new()
            .set_push_sender(push_tx)
            .set_automatic_resubscription()
            .set_connection_timeout(Some(io_timeout))
            .set_response_timeout(Some(io_timeout))
            .set_max_delay(Duration::from_secs(2));
        let mut subscriber = ConnectionManager::new_with_config(client, config)
            .await
            .context("failed to open the Redis subscriber connection")?;
        subscriber
            .subscribe(BROADCAST_CHANNEL)
            .await
            .context("failed to subscribe to the broadcast channel")?;

        let backplane = Arc::new(Self {
            instance_id,
            commands,
            subscriber,
            registry,
            metrics,
            presence_ttl,
            bind_script: Script::new(BIND_SCRIPT),
            unbind_script: Script::new(UNBIND_SCRIPT),
        });
        tokio::spawn(route_published(push_rx, backplane.registry.clone(), {
            let backplane = Arc::downgrade(&backplane);
            move |user: &str| {
                if let Some(backplane) = backplane.upgrade() {
                    let user = user.to_string();
                    tokio::spawn(async move { backplane.unsubscribe_user(&user).await });
                }
            }
        }));
        Ok(backplane)
    }

    /// Sends a frame to a user wherever the user is connected: directly when
    /// the user is on this instance, else with one `PUBLISH`.
    pub async fn deliver(&self, user_id: &str, frame: Utf8Bytes) -> anyhow::Result<()> {
        if self.registry.send_to_user(user_id, &frame) {
            self.count_delivery("local");
            return Ok(());
        }
        let payload = format!("{DELIVERY_PREFIX}{}", frame.as_str());
        let mut commands = self.commands.clone();
        let published = commands
            .publish::<_, _, ()>(user_channel(user_id), payload)
            .await;
        if published.is_err() {
            self.metrics.storage_error("redis");
        } else {
            self.count_delivery("remote");
        }
        published.context("failed to publish a delivery")
    }

    fn count_delivery(&self, route: &'static str) {
        self.metrics
            .deliveries
            .get_or_create(&Metrics::label("route", route))
            .inc();
    }

    /// Sends a frame to every authenticated connection on every instance.
    pub async fn broadcast(&self, frame: Utf8Bytes) -> anyhow::Result<()> {
        let mut commands = self.commands.clone();
        commands
            .publish::<_, _, ()>(BROADCAST_CHANNEL, frame.as_str())
            .await
            .context("failed to publish a broadcast")
    }

    /// Makes `connection_id` the user's current connection and closes older
    /// ones on any instance.
    pub async fn bind(&self, user_id: &str, connection_id: &str) -> anyhow::Result<Bound> {
        // Subscribe first, so a newer bind elsewhere, which runs its script
        // after ours, always reaches this instance.
        let mut subscriber = self.subscriber.clone();
        subscriber
            .subscribe(user_channel(user_id))
            .await
            .context("failed to subscribe to the user channel")?;

        let owner = format!("{}|{connection_id}", self.instance_id);
        let mut commands = self.commands.clone();
        let reply: Vec<Value> = self
            .bind_script
            .key(epoch_key(user_id))
            .key(owner_key(user_id))
            .key(ONLINE_KEY)
            .key(instance_users_key(&self.instance_id))
            .arg(&owner)
            .arg(self.presence_ttl.as_millis() as u64)
            .arg(now_ms())
            .arg(user_id)
            .invoke_async(&mut commands)
            .await
            .context("failed to record the connection in Redis")?;
        let epoch = match reply.first() {
            Some(Value::Int(epoch)) => *epoch as u64,
            other => anyhow::bail!("unexpected bind reply {other:?}"),
        };
        let previous = match reply.get(1) {
            Some(Value::BulkString(bytes)) => Some(String::from_utf8_lossy(bytes).into_owned()),
            _ => None,
        };
        if let Some(previous) = previous {
            let previous_connection = previous.split('|').nth(1).unwrap_or_default();
            if previous_connection != connection_id {
                let payload = format!("{REPLACED_PREFIX}{epoch}");
                commands
                    .publish::<_, _, ()>(user_channel(user_id), payload)
                    .await
                    .context("failed to publish the replacement")?;
            }
        }
        Ok(Bound { epoch })
    }

    /// Removes the owner record if the connection is still current. Returns
    /// whether the user went offline.
    pub async fn unbind(
        &self,
        user_id: &str,
        connection_id: &str,
        epoch: u64,
    ) -> anyhow::Result<bool> {
        let owner = format!("{}|{connection_id}|{epoch}", self.instance_id);
        let mut commands = self.commands.clone();
        let removed: i64 = self
            .unbind_script
            .key(owner_key(user_id))
            .key(ONLINE_KEY)
            .key(instance_users_key(&self.instance_id))
            .arg(owner)
            .arg(user_id)
            .invoke_async(&mut commands)
            .await
            .context("failed to remove the connection record")?;
        Ok(removed == 1)
    }

    /// Drops the user channel subscription when no local connection of the
    /// user is left.
    pub async fn unsubscribe_user(&self, user_id: &str) {
        if self.registry.contains(user_id) {
            return;
        }
        let mut subscriber = self.subscriber.clone();
        if let Err(error) = subscriber.unsubscribe(user_channel(user_id)).await {
            debug!(user_id, cause = %error, "unsubscribe failed");
        }
    }

    /// Refreshes the owner records and online scores of local users every
    /// third of the presence TTL, and prunes stale online entries.
    pub fn spawn_refresh(self: &Arc<Self>) {
        let backplane = Arc::downgrade(self);
        let period = self.presence_ttl / 3;
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(period);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                let Some(backplane) = backplane.upgrade() else {
                    break;
                };
                if let Err(error) = backplane.refresh_once().await {
                    warn!(cause = %format!("{error:#}"), "presence refresh failed");
                }
            }
        });
    }

    async fn refresh_once(&self) -> anyhow::Result<()> {
        let sessions = self.registry.snapshot();
        let ttl_ms = self.presence_ttl.as_millis() as u64;
        let now = now_ms();
        let mut commands = self.commands.clone();
        for chunk in sessions.chunks(500) {
            let mut pipe = redis::pipe();
            for (user, connection, epoch) in chunk {
                let owner = format!("{}|{connection}|{epoch}", self.instance_id);
                pipe.cmd("EVAL")
                    .arg(REFRESH_SCRIPT)
                    .arg(3)
                    .arg(owner_key(user))
                    .arg(ONLINE_KEY)
                    .arg(instance_users_key(&self.instance_id))
                    .arg(owner)
                    .arg(ttl_ms)
                    .arg(now)
                    .arg(user)
                    .ignore();
            }
            pipe.query_async::<()>(&mut commands).await?;
        }
        let stale_before = now - ttl_ms as i64;
        commands
            .zrembyscore::<_, _, _, ()>(ONLINE_KEY, "-inf", format!("({stale_before}"))
            .await?;
        Ok(())
    }

    /// Forgets a replaced connection's user in this instance's user set.
    pub async fn forget_user(&self, user_id: &str) {
        if self.registry.contains(user_id) {
            return;
        }
        let mut commands = self.commands.clone();
        let key = instance_users_key(&self.instance_id);
        if let Err(error) = commands.srem::<_, _, ()>(key, user_id).await {
            debug!(user_id, cause = %error, "failed to drop the user from the instance set");
        }
    }

    /// Publishes this instance's heartbeat every `interval`, and reaps the
    /// users of instances whose heartbeat expired: each user that did not
    /// connect elsewhere is sent on `offline` to be announced as offline.
    pub fn spawn_heartbeat(
        self: &Arc<Self>,
        interval: Duration,
        ttl: Duration,
        offline: mpsc::UnboundedSender<String>,
    ) {
        let backplane = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                let Some(backplane) = backplane.upgrade() else {
                    break;
                };
                if let Err(error) = backplane.beat(ttl).await {
                    warn!(cause = %format!("{error:#}"), "instance heartbeat failed");
                    continue;
                }
                match backplane.reap_dead_instances(ttl).await {
                    Ok(users) => {
                        for user in users {
                            let _ = offline.send(user);
                        }
                    }
                    Err(error) => {
                        warn!(cause = %format!("{error:#}"), "reaping dead instances failed")
                    }
                }
            }
        });
    }

    async fn beat(&self, ttl: Duration) -> anyhow::Result<()> {
        let mut commands = self.commands.clone();
        redis::pipe()
            .set_options(
                instance_key(&self.instance_id),
                now_ms(),
                redis::SetOptions::default()
                    .with_expiration(redis::SetExpiry::PX(ttl.as_millis() as u64)),
            )
            .ignore()
            .sadd(INSTANCES_KEY, &self.instance_id)
            .ignore()
            .query_async::<()>(&mut commands)
            .await?;
        Ok(())
    }

    async fn reap_dead_instances(&self, ttl: Duration) -> anyhow::Result<Vec<String>> {
        let mut commands = self.commands.clone();
        let instances: Vec<String> = commands.smembers(INSTANCES_KEY).await?;
        let mut offline = Vec::new();
        for instance in instances {
            if instance == self.instance_id {
                continue;
            }
            let alive: bool = commands.exists(instance_key(&instance)).await?;
            if alive {
                continue;
            }
            // One surviving instance reaps each dead one.
            let claimed: Option<String> = redis::cmd("SET")
                .arg(reaping_key(&instance))
                .arg(&self.instance_id)
                .arg("NX")
                .arg("PX")
                .arg((ttl * 5).as_millis() as u64)
                .query_async(&mut commands)
                .await?;
            if claimed.is_none() {
                continue;
            }
            let users: Vec<String> = commands.smembers(instance_users_key(&instance)).await?;
            let prefix = format!("{instance}|");
            let reap = Script::new(REAP_SCRIPT);
            for user in &users {
                let went_offline: i64 = reap
                    .key(owner_key(user))
                    .key(ONLINE_KEY)
                    .arg(&prefix)
                    .arg(user)
                    .invoke_async(&mut commands)
                    .await?;
                if went_offline == 1 {
                    offline.push(user.clone());
                }
            }
            redis::pipe()
                .del(instance_users_key(&instance))
                .ignore()
                .srem(INSTANCES_KEY, &instance)
                .ignore()
                .query_async::<()>(&mut commands)
                .await?;
            info!(
                instance,
                users = users.len(),
                offline = offline.len(),
                "reaped a dead instance"
            );
        }
        Ok(offline)
    }

    /// Removes this instance's heartbeat at shutdown, so that the other
    /// instances reap its users who do not reconnect.
    pub async fn retire(&self) {
        let mut commands = self.commands.clone();
        if let Err(error) = commands.del::<_, ()>(instance_key(&self.instance_id)).await {
            warn!(cause = %error, "failed to remove the instance heartbeat");
        }
    }

    /// Returns whether Redis replies to `PING` within a second.
    pub async fn ping(&self) -> bool {
        let mut commands = self.commands.clone();
        let command = redis::cmd("PING");
        let ping = command.query_async::<String>(&mut commands);
        matches!(
            tokio::time::timeout(Duration::from_secs(1), ping).await,
            Ok(Ok(_))
        )
    }
}

/// Routes published messages from the subscriber connection to local
/// sessions.
async fn route_published(
    mut pushes: mpsc::UnboundedReceiver<PushInfo>,
    registry: Arc<Registry>,
    unsubscribe: impl Fn(&str),
) {
    while let Some(push) = pushes.recv().await {
        match push.kind {
            PushKind::Message => {}
            PushKind::Disconnection => {
                warn!("redis subscriber connection lost; it reconnects and resubscribes");
                continue;
            }
            _ => continue,
        }
        let mut data = push.data.into_iter();
        let (Some(Value::BulkString(channel)), Some(Value::BulkString(payload))) =
            (data.next(), data.next())
        else {
            continue;
        };
        let Ok(payload) = String::from_utf8(payload) else {
            warn!("dropped a published message that is not UTF-8");
            continue;
        };
        if channel == BROADCAST_CHANNEL.as_bytes() {
            registry.send_to_all(&Utf8Bytes::from(payload));
            continue;
        }
        let Some(user) = channel
            .strip_prefix(b"nexus:user:")
            .and_then(|user| std::str::from_utf8(user).ok())
        else {
            continue;
        };
        let mut chars = payload.chars();
        match chars.next() {
            Some(DELIVERY_PREFIX) => {
                let frame = Utf8Bytes::from(payload[DELIVERY_PREFIX.len_utf8()..].to_string());
                registry.send_to_user(user, &frame);
            }
            Some(REPLACED_PREFIX) => {
                let Ok(epoch) = chars.as_str().parse::<u64>() else {
                    continue;
                };
                if let Some(session) = registry.replace_older(user, epoch) {
                    info!(user_id = user, connection_id = %session.connection_id, "connection replaced by a newer one");
                    session.control.send(Control::Replaced);
                    unsubscribe(user);
                }
            }
            _ => warn!(
                user_id = user,
                "dropped a published message of unknown kind"
            ),
        }
    }
}
