//! Fixed-window rate limits in Redis, counted by one atomic Lua script so
//! that every connection and host instance of a user shares the count.
//!
//! The key `nexus:rate:{kind}:{user}` counts events in the current window
//! and expires with it. For limits with a block, `nexus:block:{kind}:{user}`
//! exists while the user is blocked.

use spin_sdk::redis::{self, RedisResult};

use crate::storage::{execute, integer, text};
use crate::{Error, Result};

/// The rate-limit script.
///
/// KEYS[1] is the window counter, KEYS[2] the block flag.
/// ARGV[1] is the limit per window, ARGV[2] the window and ARGV[3] the
/// block duration, both in milliseconds. A block of 0 means no block.
/// It returns 0 when the event is allowed and otherwise the number of
/// milliseconds until the user may try again (at least 1).
///
/// While a block exists the script neither counts the event nor extends
/// the block, so `retryAfter` counts down to the end of the first block.
pub const SCRIPT: &str = r#"
local limit = tonumber(ARGV[1])
local window_ms = tonumber(ARGV[2])
local block_ms = tonumber(ARGV[3])
if block_ms > 0 then
  local blocked_for = redis.call('PTTL', KEYS[2])
  if blocked_for > 0 then
    return blocked_for
  end
  if blocked_for == -1 then
    redis.call('PEXPIRE', KEYS[2], block_ms)
    return block_ms
  end
end
local count = redis.call('INCR', KEYS[1])
if redis.call('PTTL', KEYS[1]) < 0 then
  redis.call('PEXPIRE', KEYS[1], window_ms)
end
if count <= limit then
  return 0
end
if block_ms > 0 then
  redis.call('SET', KEYS[2], '1', 'PX', block_ms)
  return block_ms
end
local window_left = redis.call('PTTL', KEYS[1])
if window_left < 1 then
  window_left = 1
end
return window_left
"#;

/// One user's fixed-window limit for one kind of event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FixedWindow<'a> {
    /// Key segment naming the limited events: `msg`, `typing` or `online`.
    pub kind: &'a str,
    pub user_id: &'a str,
    /// Events allowed per window.
    pub limit: u64,
    /// Window length in seconds.
    pub window_s: u64,
    /// Block duration in seconds after the limit is passed, or 0 for no
    /// block.
    pub block_s: u64,
}

/// Outcome of a rate-limit check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    /// The event is rejected, and the user may retry after this many whole
    /// seconds.
    Limited {
        retry_after_s: u64,
    },
}

impl FixedWindow<'_> {
    pub fn counter_key(&self) -> String {
        format!("nexus:rate:{}:{}", self.kind, self.user_id)
    }

    pub fn block_key(&self) -> String {
        format!("nexus:block:{}:{}", self.kind, self.user_id)
    }

    /// Counts one event and reports whether it is within the limit.
    pub fn check(&self, redis: &redis::Connection) -> Result<Decision> {
        let arguments = [
            text(SCRIPT),
            integer(2),
            text(&self.counter_key()),
            text(&self.block_key()),
            integer(self.limit),
            integer(self.window_s.saturating_mul(1000)),
            integer(self.block_s.saturating_mul(1000)),
        ];
        let reply = execute(redis, "EVAL", &arguments)?;
        decision_from_reply(&reply)
    }
}

/// Interprets the script's reply: one integer, 0 for allowed or the
/// milliseconds until a retry.
pub fn decision_from_reply(reply: &[RedisResult]) -> Result<Decision> {
    match reply {
        [RedisResult::Int64(0)] => Ok(Decision::Allowed),
        [RedisResult::Int64(retry_ms)] => Ok(Decision::Limited {
            retry_after_s: retry_after_seconds(*retry_ms),
        }),
        _ => {
            eprintln!("rate-limit script returned an unexpected reply: {reply:?}");
            Err(Error::internal(
                "rate-limit check returned an unexpected reply",
            ))
        }
    }
}

/// Converts milliseconds to whole seconds, rounding up, and at least 1.
pub fn retry_after_seconds(retry_ms: i64) -> u64 {
    let retry_ms = u64::try_from(retry_ms).unwrap_or(0);
    retry_ms.div_ceil(1000).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_naming() {
        let window = FixedWindow {
            kind: "msg",
            user_id: "alice",
            limit: 100,
            window_s: 60,
            block_s: 60,
        };
        assert_eq!(window.counter_key(), "nexus:rate:msg:alice");
        assert_eq!(window.block_key(), "nexus:block:msg:alice");
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_seconds(1), 1);
        assert_eq!(retry_after_seconds(1000), 1);
        assert_eq!(retry_after_seconds(1001), 2);
        assert_eq!(retry_after_seconds(59_999), 60);
        assert_eq!(retry_after_seconds(0), 1);
        assert_eq!(retry_after_seconds(-2), 1);
    }

    #[test]
    fn decision_from_script_reply() {
        assert_eq!(
            decision_from_reply(&[RedisResult::Int64(0)]),
            Ok(Decision::Allowed)
        );
        assert_eq!(
            decision_from_reply(&[RedisResult::Int64(1500)]),
            Ok(Decision::Limited { retry_after_s: 2 })
        );
        assert!(decision_from_reply(&[]).is_err());
        assert!(decision_from_reply(&[RedisResult::Nil]).is_err());
    }
}
