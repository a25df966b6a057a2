//! Fixed-window rate limits in Redis, counted by one atomic Lua script so
//! that every connection and host instance of a user shares the count.
//!
//! The key `nexus:rate:{kind}:{user}` counts events in the current window
//! and expires with it. For limits with a block, `nexus:block:{kind}:{user}`
//! exists while the user is blocked.

use spin_sdk::redis::{self, RedisParameter, RedisResult};

use crate::storage::{execute, integer, text};
use crate::{Error, Result};

/// Expands to the Lua source of `rate_limit(counter_key, block_key, limit,
/// window_ms, block_ms)`, the fixed-window check that [`SCRIPT`] runs. Other
/// scripts put it in front of their own body, so that a rate limit and the
/// commands around it cost one Redis round trip.
///
/// `counter_key` counts events in the window and `block_key` is the block
/// flag. The window and block durations are in milliseconds, and a block of
/// 0 means no block. The function returns 0 when the event is allowed and
/// otherwise the number of milliseconds until the user may try again (at
/// least 1).
///
/// While a block exists the function neither counts the event nor extends
/// the block, so `retryAfter` counts down to the end of the first block.
#[macro_export]
macro_rules! rate_limit_lua {
    () => {
        r#"
local function rate_limit(counter_key, block_key, limit, window_ms, block_ms)
  if block_ms > 0 then
    local blocked_for = redis.call('PTTL', block_key)
    if blocked_for > 0 then
      return blocked_for
    end
    if blocked_for == -1 then
      redis.call('PEXPIRE', block_key, block_ms)
      return block_ms
    end
  end
  local count = redis.call('INCR', counter_key)
  if redis.call('PTTL', counter_key) < 0 then
    redis.call('PEXPIRE', counter_key, window_ms)
  end
  if count <= limit then
    return 0
  end
  if block_ms > 0 then
    redis.call('SET', block_key, '1', 'PX', block_ms)
    return block_ms
  end
  local window_left = redis.call('PTTL', counter_key)
  if window_left < 1 then
    window_left = 1
  end
  return window_left
end
"#
    };
}

/// The rate-limit script: [`rate_limit_lua!`] on KEYS[1] (the window
/// counter) and KEYS[2] (the block flag), with ARGV[1] the limit per window,
/// ARGV[2] the window and ARGV[3] the block duration in milliseconds.
pub const SCRIPT: &str = concat!(
    rate_limit_lua!(),
    "return rate_limit(KEYS[1], KEYS[2], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]))\n"
);

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
        let [limit, window_ms, block_ms] = self.limit_arguments();
        let arguments = [
            text(SCRIPT),
            integer(2),
            text(&self.counter_key()),
            text(&self.block_key()),
            limit,
            window_ms,
            block_ms,
        ];
        let reply = execute(redis, "EVAL", &arguments)?;
        decision_from_reply(&reply)
    }

    /// Returns the limit, the window in milliseconds and the block in
    /// milliseconds, the last three arguments of `rate_limit` in
    /// [`rate_limit_lua!`].
    pub fn limit_arguments(&self) -> [RedisParameter; 3] {
        [
            integer(self.limit),
            integer(self.window_s.saturating_mul(1000)),
            integer(self.block_s.saturating_mul(1000)),
        ]
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
