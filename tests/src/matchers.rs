//! Predicates on event data for `Client::recv_matching` and friends.

use serde_json::{json, Value};

/// Matches `USER_PRESENCE_UPDATE` data for `user` with `status`.
pub fn presence_of<'a>(user: &'a str, status: &'a str) -> impl Fn(&Value) -> bool + 'a {
    move |data: &Value| {
        data.get("userId").and_then(Value::as_str) == Some(user)
            && data.get("status").and_then(Value::as_str) == Some(status)
    }
}

/// Matches `USER_TYPING` data for `user` with `isTyping` equal to `typing`.
pub fn typing_of(user: &str, typing: bool) -> impl Fn(&Value) -> bool + '_ {
    move |data: &Value| {
        data.get("userId").and_then(Value::as_str) == Some(user)
            && data.get("isTyping") == Some(&json!(typing))
    }
}

/// Matches message data whose `content` is `content`.
pub fn content_is(content: &str) -> impl Fn(&Value) -> bool + '_ {
    move |data: &Value| data.get("content").and_then(Value::as_str) == Some(content)
}
