//! Nexus Chat presence component.
//!
//! It handles typing indicators (`TYPING_START`, `TYPING_STOP` and the
//! `$typing-expired` timer), `GET_ONLINE_USERS`, `HEALTH_CHECK` and the
//! host's `$connected` and `$disconnected` events, and serves
//! `GET /presence/online`.

use nexus_guest::presence::{self, OnlinePageQuery, PresenceReach};
use nexus_guest::rate_limit::{Decision, FixedWindow};
use nexus_guest::{fields, http, payload, settings, storage, time, Error};
use spin_sdk::http::Request;
use spin_sdk::redis;

/// Bindings of the `nexus:chat` `event-handler` world and the export of the
/// typed handler.
#[allow(unsafe_code)]
mod bindings {
    wit_bindgen::generate!({
        world: "event-handler",
        path: "../../wit",
    });

    use super::Presence;
    export!(Presence);
}

use bindings::exports::nexus::chat::handler::Guest;
use bindings::exports::nexus::chat::types::{
    Connection, Delivery, Effect, Event, EventSource, HandlerError, Outbound, Timer, TimerCancel,
};

/// Event name of the typing timer, raised by the host when it fires.
const TYPING_EXPIRED: &str = "$typing-expired";

struct Presence;

impl Guest for Presence {
    fn handle(conn: Connection, event: Event) -> Result<Vec<Effect>, HandlerError> {
        let result = match (event.name.as_str(), event.source) {
            ("TYPING_START", EventSource::Client) => typing_start(&conn, &event),
            ("TYPING_STOP", EventSource::Client) => typing_stop(&conn, &event),
            (TYPING_EXPIRED, EventSource::Timer) => typing_expired(&conn, &event),
            ("GET_ONLINE_USERS", EventSource::Client) => get_online_users(&conn),
            ("HEALTH_CHECK", EventSource::Client) => Ok(health_check(&conn)),
            ("SUBSCRIBE_PRESENCE", EventSource::Client) => subscribe_presence(&conn, &event, true),
            ("UNSUBSCRIBE_PRESENCE", EventSource::Client) => {
                subscribe_presence(&conn, &event, false)
            }
            ("$connected", EventSource::Host) => presence_changed(&event, true),
            ("$disconnected", EventSource::Host) => presence_changed(&event, false),
            (other, _) => Err(Error::unknown_event("presence", other)),
        };
        result.map_err(|error| HandlerError {
            code: error.code.as_str().to_owned(),
            message: error.message,
        })
    }
}

fn sender(conn: &Connection) -> Result<&str, Error> {
    conn.user_id.as_deref().ok_or_else(Error::unauthenticated)
}

fn reply(event: &str, data: String) -> Effect {
    Effect::Reply(Outbound {
        event: event.to_owned(),
        data,
    })
}

fn typing_update(sender: &str, receiver: &str, is_typing: bool) -> Effect {
    Effect::Deliver(Delivery {
        user_id: receiver.to_owned(),
        event: "USER_TYPING".to_owned(),
        data: payload::user_typing(sender, is_typing),
    })
}

/// Counts one event against the user's limit of kind `kind`. Returns the
/// `RATE_LIMIT_EXCEEDED` reply when the user is over it.
fn rate_limit(
    redis: &redis::Connection,
    kind: &str,
    user_id: &str,
    settings_prefix: &str,
    event: &str,
) -> Result<Option<Effect>, Error> {
    let window = FixedWindow {
        kind,
        user_id,
        limit: settings::get_u64(&format!("{settings_prefix}_rate_limit"), 0)?,
        window_s: settings::get_u64(&format!("{settings_prefix}_rate_window_s"), 1)?,
        block_s: 0,
    };
    match window.check(redis)? {
        Decision::Allowed => Ok(None),
        Decision::Limited { retry_after_s } => {
            let error = format!("{} rate limit exceeded", settings_prefix.replace('_', " "));
            let data = payload::rate_limit_exceeded(&error, retry_after_s, event);
            Ok(Some(reply("RATE_LIMIT_EXCEEDED", data)))
        }
    }
}

/// Handles `TYPING_START {receiverId}`: shows the indicator at the receiver
/// and starts the timer that clears it after `typing_timeout_ms`, or when
/// the sender's connection closes.
fn typing_start(conn: &Connection, event: &Event) -> Result<Vec<Effect>, Error> {
    let sender = sender(conn)?;
    let data = fields::parse_object(&event.data)?;
    let receiver = fields::receiver_id(&data, sender)?;
    let redis = storage::open_redis()?;
    if let Some(limited) = rate_limit(&redis, "typing", sender, "typing", &event.name)? {
        return Ok(vec![limited]);
    }
    let timeout_ms = settings::get_u64("typing_timeout_ms", 1)?;
    remember_typing(&redis, sender, receiver, timeout_ms)?;
    Ok(vec![
        typing_update(sender, receiver, true),
        Effect::StartTimer(Timer {
            key: presence::typing_timer_key(receiver),
            delay_ms: timeout_ms,
            event: Outbound {
                event: TYPING_EXPIRED.to_owned(),
                data: payload::typing_timer(receiver),
            },
            fire_on_close: true,
        }),
    ])
}

/// Handles `TYPING_STOP {receiverId}`: clears the indicator and cancels the
/// timer without running it.
fn typing_stop(conn: &Connection, event: &Event) -> Result<Vec<Effect>, Error> {
    let sender = sender(conn)?;
    let data = fields::parse_object(&event.data)?;
    let receiver = fields::receiver_id(&data, sender)?;
    let redis = storage::open_redis()?;
    if let Some(limited) = rate_limit(&redis, "typing", sender, "typing", &event.name)? {
        return Ok(vec![limited]);
    }
    forget_typing(&redis, sender, receiver)?;
    Ok(vec![
        typing_update(sender, receiver, false),
        Effect::CancelTimer(TimerCancel {
            key: presence::typing_timer_key(receiver),
            fire: false,
        }),
    ])
}

/// Handles the `$typing-expired {receiverId}` timer: clears the indicator.
fn typing_expired(conn: &Connection, event: &Event) -> Result<Vec<Effect>, Error> {
    let sender = sender(conn)?;
    let data = fields::parse_object(&event.data)?;
    let receiver = fields::user_id(&data, "receiverId")?;
    let redis = storage::open_redis()?;
    forget_typing(&redis, sender, receiver)?;
    Ok(vec![typing_update(sender, receiver, false)])
}

/// Records that `sender` shows a typing indicator to `receiver`, so that
/// the indicator can be cleared when the sender's instance dies and its
/// timers with it. The record outlives the timer a little and then expires.
fn remember_typing(
    redis: &redis::Connection,
    sender: &str,
    receiver: &str,
    timeout_ms: u64,
) -> Result<(), Error> {
    let key = presence::typing_key(sender);
    redis
        .sadd(&key, &[receiver.to_owned()])
        .map_err(|error| Error::unavailable("Redis", "SADD", &error))?;
    let ttl_ms = timeout_ms.saturating_mul(2);
    storage::execute(
        redis,
        "PEXPIRE",
        &[storage::text(&key), storage::integer(ttl_ms)],
    )?;
    Ok(())
}

fn forget_typing(redis: &redis::Connection, sender: &str, receiver: &str) -> Result<(), Error> {
    redis
        .srem(&presence::typing_key(sender), &[receiver.to_owned()])
        .map_err(|error| Error::unavailable("Redis", "SREM", &error))?;
    Ok(())
}

/// Most user ids one `SUBSCRIBE_PRESENCE` or `UNSUBSCRIBE_PRESENCE` may name.
const SUBSCRIBE_MAX_IDS: usize = 100;

/// Adds the watcher (ARGV[2]) to the watchers of each target (ARGV[3..],
/// whose watcher sets are KEYS[2..] in the same order) and the targets to
/// the watcher's own set (KEYS[1]), unless that set would then hold more
/// than ARGV[1] users. Returns the number of new targets, or -1 and changes
/// nothing when the cap would be passed.
const WATCH_SCRIPT: &str = r"
local added = 0
for i = 3, #ARGV do
  if redis.call('SISMEMBER', KEYS[1], ARGV[i]) == 0 then added = added + 1 end
end
if added > 0 and redis.call('SCARD', KEYS[1]) + added > tonumber(ARGV[1]) then
  return -1
end
for i = 3, #ARGV do
  redis.call('SADD', KEYS[1], ARGV[i])
  redis.call('SADD', KEYS[i - 1], ARGV[2])
end
return added
";

/// Handles `SUBSCRIBE_PRESENCE {userIds}`: the connection's user receives
/// `USER_PRESENCE_UPDATE` for these users from now on, as a conversation
/// partner does, and gets their current status at once. A user watches at
/// most `presence_watch_max` users, and both events share the
/// `presence_subscribe_rate_limit`.
fn subscribe_presence(
    conn: &Connection,
    event: &Event,
    subscribe: bool,
) -> Result<Vec<Effect>, Error> {
    let watcher = sender(conn)?;
    let data = fields::parse_object(&event.data)?;
    let targets = fields::user_id_list(&data, "userIds", SUBSCRIBE_MAX_IDS)?;
    let redis = storage::open_redis()?;
    let event_name = if subscribe {
        "SUBSCRIBE_PRESENCE"
    } else {
        "UNSUBSCRIBE_PRESENCE"
    };
    if let Some(limited) = rate_limit(
        &redis,
        "presence-subscribe",
        watcher,
        "presence_subscribe",
        event_name,
    )? {
        return Ok(vec![limited]);
    }
    let watching_key = presence::watching_key(watcher);
    let mut effects = Vec::new();
    if subscribe {
        let max = settings::get_u64("presence_watch_max", 1)?;
        watch(&redis, &watching_key, watcher, &targets, max)?;
        for target in &targets {
            let owner = storage::execute(
                &redis,
                "EXISTS",
                &[storage::text(&presence::owner_key(target))],
            )?;
            let online =
                matches!(owner.as_slice(), [redis::RedisResult::Int64(count)] if *count > 0);
            effects.push(reply(
                "USER_PRESENCE_UPDATE",
                payload::presence_update(target, online),
            ));
        }
    } else {
        redis
            .srem(&watching_key, &targets)
            .map_err(|error| Error::unavailable("Redis", "SREM", &error))?;
        for target in &targets {
            redis
                .srem(&presence::watchers_key(target), &[watcher.to_owned()])
                .map_err(|error| Error::unavailable("Redis", "SREM", &error))?;
        }
    }
    let name = if subscribe {
        "PRESENCE_SUBSCRIBED"
    } else {
        "PRESENCE_UNSUBSCRIBED"
    };
    effects.insert(
        0,
        reply(name, serde_json::json!({ "userIds": targets }).to_string()),
    );
    Ok(effects)
}

/// Runs [`WATCH_SCRIPT`]. A subscription past `max` watched users is a
/// `VALIDATION_ERROR` that changes nothing.
fn watch(
    redis: &redis::Connection,
    watching_key: &str,
    watcher: &str,
    targets: &[String],
    max: u64,
) -> Result<(), Error> {
    let mut arguments = vec![
        storage::text(WATCH_SCRIPT),
        storage::integer(targets.len() as u64 + 1),
        storage::text(watching_key),
    ];
    arguments.extend(
        targets
            .iter()
            .map(|target| storage::text(&presence::watchers_key(target))),
    );
    arguments.push(storage::integer(max));
    arguments.push(storage::text(watcher));
    arguments.extend(targets.iter().map(|target| storage::text(target)));
    let reply = storage::execute(redis, "EVAL", &arguments)?;
    match reply.as_slice() {
        [redis::RedisResult::Int64(added)] if *added >= 0 => Ok(()),
        [redis::RedisResult::Int64(_)] => Err(Error::validation(format!(
            "userIds would pass the maximum of {max} watched users; unsubscribe from some first"
        ))),
        other => {
            eprintln!("presence watch script returned an unexpected reply: {other:?}");
            Err(Error::internal(
                "presence watch script returned an unexpected reply",
            ))
        }
    }
}

/// Handles `GET_ONLINE_USERS`: replies `ONLINE_USERS` with the users seen
/// within `presence_ttl_s`, most recently seen first, at most
/// `online_users_page_max` of them.
fn get_online_users(conn: &Connection) -> Result<Vec<Effect>, Error> {
    let user = sender(conn)?;
    let redis = storage::open_redis()?;
    if let Some(limited) = rate_limit(&redis, "online", user, "online_users", "GET_ONLINE_USERS")? {
        return Ok(vec![limited]);
    }
    let ttl_s = settings::get_u64("presence_ttl_s", 1)?;
    let page_max = settings::get_u64("online_users_page_max", 1)?;
    let users = online_users(&redis, conn.now_ms, ttl_s, 0, page_max)?;
    Ok(vec![reply("ONLINE_USERS", payload::online_users(&users))])
}

fn online_users(
    redis: &redis::Connection,
    now_ms: u64,
    ttl_s: u64,
    offset: u64,
    count: u64,
) -> Result<Vec<String>, Error> {
    let arguments = presence::online_range_arguments(now_ms, ttl_s, offset, count);
    let reply = storage::execute(redis, "ZREVRANGEBYSCORE", &arguments)?;
    Ok(storage::reply_strings(&reply))
}

/// Handles `HEALTH_CHECK`, which needs no authentication and no I/O.
fn health_check(conn: &Connection) -> Vec<Effect> {
    vec![reply(
        "HEALTH_STATUS",
        payload::health_status(conn.now_ms, &conn.instance_id),
    )]
}

/// Handles `$connected {userId}` and `$disconnected {userId}`: sends
/// `USER_PRESENCE_UPDATE` to the user's conversation partners, or to
/// everyone when `presence_reach` is `broadcast`.
fn presence_changed(event: &Event, online: bool) -> Result<Vec<Effect>, Error> {
    let data = fields::parse_object(&event.data)?;
    let user = fields::user_id(&data, "userId")?;
    let update = payload::presence_update(user, online);
    let reach = PresenceReach::parse(&settings::get("presence_reach")?)?;
    let redis = storage::open_redis()?;
    let mut effects = Vec::new();
    if !online {
        // Timers of a dead instance never fire, so indicators it left
        // behind are cleared here; after a clean close the set is empty.
        let typing_key = presence::typing_key(user);
        let receivers = redis
            .smembers(&typing_key)
            .map_err(|error| Error::unavailable("Redis", "SMEMBERS", &error))?;
        for receiver in receivers {
            effects.push(typing_update(user, &receiver, false));
        }
        redis
            .del(&[typing_key])
            .map_err(|error| Error::unavailable("Redis", "DEL", &error))?;
    }
    match reach {
        PresenceReach::Broadcast => effects.push(Effect::Broadcast(Outbound {
            event: "USER_PRESENCE_UPDATE".to_owned(),
            data: update,
        })),
        PresenceReach::Partners => {
            // Conversation partners and explicit subscribers, once each.
            let arguments = [
                storage::text(&presence::partners_key(user)),
                storage::text(&presence::watchers_key(user)),
            ];
            let audience = storage::reply_strings(&storage::execute(&redis, "SUNION", &arguments)?);
            for member in audience {
                effects.push(Effect::Deliver(Delivery {
                    user_id: member,
                    event: "USER_PRESENCE_UPDATE".to_owned(),
                    data: update.clone(),
                }));
            }
        }
    }
    Ok(effects)
}

/// Export of `wasi:http/incoming-handler` for the component's HTTP route.
#[allow(unsafe_code)]
mod http_export {
    use spin_sdk::http::{Request, Response};
    use spin_sdk::http_component;

    /// Serves `GET /presence/online?limit=N&cursor=C`: `{users, nextCursor}`,
    /// where `cursor` is the offset that an earlier page returned.
    #[http_component]
    fn handle_http(request: Request) -> Response {
        nexus_guest::http::respond(super::online_route(&request))
    }
}

fn online_route(request: &Request) -> Result<serde_json::Value, Error> {
    if request.path() != "/presence/online" {
        return Err(http::not_found(request.path()));
    }
    http::require_get(request)?;
    http::authorize(request)?;
    let page_max = settings::get_u64("online_users_page_max", 1)?;
    let query = OnlinePageQuery::parse(request.query(), page_max)?;
    let ttl_s = settings::get_u64("presence_ttl_s", 1)?;
    let redis = storage::open_redis()?;
    // One user more than the page shows whether another page follows.
    let users = online_users(
        &redis,
        time::now_ms(),
        ttl_s,
        query.cursor,
        query.limit.saturating_add(1),
    )?;
    Ok(presence::online_page(users, &query))
}
