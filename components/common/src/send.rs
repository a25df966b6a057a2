//! The Redis side of sending a message, in two scripts so that a message
//! costs two Redis round trips besides the delivery's `PUBLISH`: one before
//! the message is stored and one after.
//!
//! Both scripts name every key they touch in KEYS, and the keys belong to
//! two users, so they need a single Redis server (not Redis Cluster), as
//! the rate-limit script does.

use spin_sdk::redis::{self, RedisResult};

use crate::presence::{owner_key, partners_key};
use crate::rate_limit::{retry_after_seconds, FixedWindow};
use crate::storage::{execute, integer, reply_text, text};
use crate::{Error, Result};

/// Checks a new message before it is stored.
///
/// KEYS[1] and KEYS[2] are the sender's rate-limit counter and block flag,
/// KEYS[3] the receiver's owner key and KEYS[4], when the message has a
/// client message id, its dedup key. ARGV[1..3] are the rate limit's
/// arguments (see [`crate::rate_limit_lua!`]).
///
/// It returns `{1, message id}` when the dedup key exists, without counting
/// the message. Otherwise it counts the message and returns
/// `{2, milliseconds until a retry}` when the sender is over the limit, or
/// `{0, 1 or 0}` for whether the receiver has a connection anywhere.
pub const ADMIT_SCRIPT: &str = concat!(
    crate::rate_limit_lua!(),
    r#"
if KEYS[4] then
  local stored_id = redis.call('GET', KEYS[4])
  if stored_id then
    return {1, stored_id}
  end
end
local retry_ms = rate_limit(KEYS[1], KEYS[2], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]))
if retry_ms > 0 then
  return {2, retry_ms}
end
return {0, redis.call('EXISTS', KEYS[3])}
"#
);

/// Records a stored message.
///
/// KEYS[1] and KEYS[2] are the sender's and the receiver's partner sets,
/// KEYS[3], when the message has a client message id, its dedup key.
/// ARGV[1] is the sender, ARGV[2] the receiver, ARGV[3] the message id and
/// ARGV[4] the dedup key's lifetime in seconds.
pub const RECORD_SCRIPT: &str = r#"
redis.call('SADD', KEYS[1], ARGV[2])
redis.call('SADD', KEYS[2], ARGV[1])
if KEYS[3] then
  redis.call('SET', KEYS[3], ARGV[3], 'EX', ARGV[4])
end
return 0
"#;

/// Outcome of [`ADMIT_SCRIPT`] for a new message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// The dedup key names the message stored for an earlier attempt.
    Duplicate { message_id: String },
    /// The sender is over the rate limit and may retry after this many
    /// whole seconds.
    Limited { retry_after_s: u64 },
    /// The message counts against the limit and may be stored.
    Allowed { receiver_online: bool },
}

/// Returns the dedup key of `(sender, client_message_id)`.
pub fn dedup_key(sender: &str, client_message_id: &str) -> String {
    format!("nexus:dedup:{sender}:{client_message_id}")
}

/// Runs [`ADMIT_SCRIPT`] for a message from `window.user_id` to `receiver`.
/// With `dedup_key` set, a repeated client message id returns
/// [`Admission::Duplicate`] before the rate limit counts it.
pub fn admit(
    redis: &redis::Connection,
    window: &FixedWindow<'_>,
    receiver: &str,
    dedup_key: Option<&str>,
) -> Result<Admission> {
    let [limit, window_ms, block_ms] = window.limit_arguments();
    let key_count = if dedup_key.is_some() { 4 } else { 3 };
    let mut arguments = vec![
        text(ADMIT_SCRIPT),
        integer(key_count),
        text(&window.counter_key()),
        text(&window.block_key()),
        text(&owner_key(receiver)),
    ];
    arguments.extend(dedup_key.map(text));
    arguments.extend([limit, window_ms, block_ms]);
    admission_from_reply(&execute(redis, "EVAL", &arguments)?)
}

/// Runs [`RECORD_SCRIPT`]: makes sender and receiver each other's
/// conversation partners and, for a message with a client message id,
/// points its dedup key at `message_id` for `dedup_ttl_s` seconds.
pub fn record(
    redis: &redis::Connection,
    sender: &str,
    receiver: &str,
    message_id: &str,
    client_message_id: Option<&str>,
    dedup_ttl_s: u64,
) -> Result<()> {
    let dedup_key = client_message_id.map(|id| dedup_key(sender, id));
    let key_count = if dedup_key.is_some() { 3 } else { 2 };
    let mut arguments = vec![
        text(RECORD_SCRIPT),
        integer(key_count),
        text(&partners_key(sender)),
        text(&partners_key(receiver)),
    ];
    arguments.extend(dedup_key.as_deref().map(text));
    arguments.extend([
        text(sender),
        text(receiver),
        text(message_id),
        integer(dedup_ttl_s),
    ]);
    execute(redis, "EVAL", &arguments)?;
    Ok(())
}

/// Decodes the reply of [`ADMIT_SCRIPT`].
pub fn admission_from_reply(reply: &[RedisResult]) -> Result<Admission> {
    match reply {
        [RedisResult::Int64(1), stored_id] => match reply_text(stored_id) {
            Some(message_id) => Ok(Admission::Duplicate { message_id }),
            None => Err(unexpected_reply(reply)),
        },
        [RedisResult::Int64(2), RedisResult::Int64(retry_ms)] => Ok(Admission::Limited {
            retry_after_s: retry_after_seconds(*retry_ms),
        }),
        [RedisResult::Int64(0), RedisResult::Int64(online)] => Ok(Admission::Allowed {
            receiver_online: *online > 0,
        }),
        _ => Err(unexpected_reply(reply)),
    }
}

fn unexpected_reply(reply: &[RedisResult]) -> Error {
    eprintln!("message admission script returned an unexpected reply: {reply:?}");
    Error::internal("message admission check returned an unexpected reply")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_decodes_each_outcome() {
        let duplicate = [
            RedisResult::Int64(1),
            RedisResult::Binary(b"00000000000000000042".to_vec()),
        ];
        assert_eq!(
            admission_from_reply(&duplicate),
            Ok(Admission::Duplicate {
                message_id: "00000000000000000042".to_owned()
            })
        );
        let limited = [RedisResult::Int64(2), RedisResult::Int64(1500)];
        assert_eq!(
            admission_from_reply(&limited),
            Ok(Admission::Limited { retry_after_s: 2 })
        );
        let online = [RedisResult::Int64(0), RedisResult::Int64(1)];
        assert_eq!(
            admission_from_reply(&online),
            Ok(Admission::Allowed {
                receiver_online: true
            })
        );
        let offline = [RedisResult::Int64(0), RedisResult::Int64(0)];
        assert_eq!(
            admission_from_reply(&offline),
            Ok(Admission::Allowed {
                receiver_online: false
            })
        );
    }

    #[test]
    fn admission_rejects_other_replies() {
        assert!(admission_from_reply(&[]).is_err());
        assert!(admission_from_reply(&[RedisResult::Int64(0)]).is_err());
        assert!(admission_from_reply(&[RedisResult::Int64(1), RedisResult::Nil]).is_err());
        assert!(admission_from_reply(&[RedisResult::Int64(3), RedisResult::Int64(0)]).is_err());
    }
}
