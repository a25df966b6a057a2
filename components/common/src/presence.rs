//! Presence: Redis keys, the freshness filter of the online set, the
//! presence audience setting and the online-users page.

use serde_json::{json, Value};
use spin_sdk::redis::RedisParameter;

use crate::storage::{integer, text};
use crate::{Error, Result};

/// Sorted set of online users, scored by last-seen time in milliseconds.
/// The host writes it.
pub const ONLINE_KEY: &str = "nexus:online";

/// Returns the key of the record of the user's current connection, which
/// the host writes while the user is connected anywhere.
pub fn owner_key(user_id: &str) -> String {
    format!("nexus:owner:{user_id}")
}

/// Returns the key of the set of users that subscribed to the presence of
/// `user_id` with `SUBSCRIBE_PRESENCE`.
pub fn watchers_key(user_id: &str) -> String {
    format!("nexus:watchers:{user_id}")
}

/// Returns the key of the set of users whose presence `user_id` has
/// subscribed to, the reverse of [`watchers_key`].
pub fn watching_key(user_id: &str) -> String {
    format!("nexus:watching:{user_id}")
}

/// Returns the key of the set of receivers that `user_id` shows a typing
/// indicator to.
pub fn typing_key(user_id: &str) -> String {
    format!("nexus:typing:{user_id}")
}

/// Returns the key of the set of users that `user_id` has exchanged a
/// message with.
pub fn partners_key(user_id: &str) -> String {
    format!("nexus:partners:{user_id}")
}

/// Returns the key of the typing-indicator timer on the sender's
/// connection for `receiver_id`.
pub fn typing_timer_key(receiver_id: &str) -> String {
    format!("typing:{receiver_id}")
}

/// Audience of a user's `USER_PRESENCE_UPDATE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresenceReach {
    /// The user's conversation partners, one delivery each.
    Partners,
    /// Every authenticated connection, with one broadcast.
    Broadcast,
}

impl PresenceReach {
    /// Parses the `presence_reach` setting.
    pub fn parse(raw: &str) -> Result<Self> {
        match raw.trim() {
            "partners" => Ok(PresenceReach::Partners),
            "broadcast" => Ok(PresenceReach::Broadcast),
            _ => Err(Error::internal(format!(
                "setting presence_reach must be partners or broadcast, got {raw:?}"
            ))),
        }
    }
}

/// Returns the exclusive lower score bound of fresh entries in the online
/// set: last seen less than `ttl_s` seconds before `now_ms`.
pub fn online_min_score(now_ms: u64, ttl_s: u64) -> String {
    match now_ms.checked_sub(ttl_s.saturating_mul(1000)) {
        Some(cutoff) => format!("({cutoff}"),
        None => "-inf".to_owned(),
    }
}

/// Returns the `ZREVRANGEBYSCORE` arguments that list fresh online users,
/// most recently seen first, skipping `offset` and returning up to
/// `count`.
pub fn online_range_arguments(
    now_ms: u64,
    ttl_s: u64,
    offset: u64,
    count: u64,
) -> Vec<RedisParameter> {
    vec![
        text(ONLINE_KEY),
        text("+inf"),
        text(&online_min_score(now_ms, ttl_s)),
        text("LIMIT"),
        integer(offset),
        integer(count),
    ]
}

/// Parameters of `GET /presence/online`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OnlinePageQuery {
    /// Users in the page, by default `online_users_page_max`.
    pub limit: u64,
    /// Number of users to skip.
    pub cursor: u64,
}

impl OnlinePageQuery {
    /// Parses the query string (without `?`). Unknown parameters are
    /// ignored.
    pub fn parse(query: &str, page_max: u64) -> Result<Self> {
        let mut parsed = OnlinePageQuery {
            limit: page_max,
            cursor: 0,
        };
        for (name, value) in form_urlencoded::parse(query.as_bytes()) {
            match name.as_ref() {
                "limit" => {
                    parsed.limit = match value.parse::<u64>() {
                        Ok(limit) if (1..=page_max).contains(&limit) => limit,
                        _ => {
                            return Err(Error::validation(format!(
                                "limit must be a whole number from 1 to {page_max}"
                            )))
                        }
                    }
                }
                "cursor" => {
                    parsed.cursor = value.parse::<u64>().map_err(|_| {
                        Error::validation("cursor must be a nextCursor value from an earlier page")
                    })?
                }
                _ => {}
            }
        }
        Ok(parsed)
    }
}

/// Builds `{users, nextCursor}` from up to `limit + 1` users read from
/// offset `cursor`. `nextCursor` is `null` on the last page.
pub fn online_page(mut users: Vec<String>, query: &OnlinePageQuery) -> Value {
    let limit = usize::try_from(query.limit).unwrap_or(usize::MAX);
    let next_cursor = if users.len() > limit {
        users.truncate(limit);
        Value::from(query.cursor.saturating_add(query.limit).to_string())
    } else {
        Value::Null
    };
    json!({"users": users, "nextCursor": next_cursor})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorCode;

    #[test]
    fn reach_values() {
        assert_eq!(
            PresenceReach::parse("partners"),
            Ok(PresenceReach::Partners)
        );
        assert_eq!(
            PresenceReach::parse("broadcast"),
            Ok(PresenceReach::Broadcast)
        );
        let error = PresenceReach::parse("everyone");
        assert_eq!(
            error.as_ref().map_err(|e| e.code),
            Err(ErrorCode::InternalError)
        );
        assert!(error.is_err_and(|e| e.message.contains("everyone")));
    }

    #[test]
    fn min_score_is_exclusive() {
        assert_eq!(online_min_score(100_000, 60), "(40000");
        assert_eq!(online_min_score(1_000, 60), "-inf");
    }

    #[test]
    fn keys() {
        assert_eq!(partners_key("alice"), "nexus:partners:alice");
        assert_eq!(typing_timer_key("bob"), "typing:bob");
    }

    #[test]
    fn page_query_defaults_and_limits() {
        assert_eq!(
            OnlinePageQuery::parse("", 500),
            Ok(OnlinePageQuery {
                limit: 500,
                cursor: 0
            })
        );
        assert_eq!(
            OnlinePageQuery::parse("limit=2&cursor=4", 500),
            Ok(OnlinePageQuery {
                limit: 2,
                cursor: 4
            })
        );
        for query in ["limit=0", "limit=501", "cursor=-1", "cursor=x"] {
            assert!(OnlinePageQuery::parse(query, 500).is_err(), "{query}");
        }
    }

    #[test]
    fn page_next_cursor() {
        let query = OnlinePageQuery {
            limit: 2,
            cursor: 4,
        };
        let users = vec!["a".to_owned(), "b".to_owned(), "c".to_owned()];
        let page = online_page(users, &query);
        assert_eq!(page["users"], json!(["a", "b"]));
        assert_eq!(page["nextCursor"], "6");

        let last = online_page(vec!["a".to_owned()], &query);
        assert_eq!(last["nextCursor"], Value::Null);
    }
}
