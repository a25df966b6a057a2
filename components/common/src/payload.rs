//! `data` payloads of the server-to-client events, as JSON text.

use serde_json::{json, Value};

/// `CONNECTION_SUCCESS {userId, connectionId, instanceId, expiresAt}`.
pub fn connection_success(
    user_id: &str,
    connection_id: &str,
    instance_id: &str,
    expires_at: &str,
) -> String {
    json!({
        "userId": user_id,
        "connectionId": connection_id,
        "instanceId": instance_id,
        "expiresAt": expires_at,
    })
    .to_string()
}

/// `ERROR {code, message, event}`.
pub fn error_event(code: &str, message: &str, event: &str) -> String {
    json!({"code": code, "message": message, "event": event}).to_string()
}

/// `RATE_LIMIT_EXCEEDED {error, retryAfter, event}`, `retryAfter` in seconds.
pub fn rate_limit_exceeded(error: &str, retry_after_s: u64, event: &str) -> String {
    json!({"error": error, "retryAfter": retry_after_s, "event": event}).to_string()
}

/// `USER_TYPING {userId, isTyping}`.
pub fn user_typing(user_id: &str, is_typing: bool) -> String {
    json!({"userId": user_id, "isTyping": is_typing}).to_string()
}

/// `USER_PRESENCE_UPDATE {userId, status}`, status `online` or `offline`.
pub fn presence_update(user_id: &str, online: bool) -> String {
    let status = if online { "online" } else { "offline" };
    json!({"userId": user_id, "status": status}).to_string()
}

/// `HEALTH_STATUS {status: "ok", timestamp, instanceId}`, `timestamp` in
/// milliseconds since the Unix epoch.
pub fn health_status(timestamp_ms: u64, instance_id: &str) -> String {
    json!({"status": "ok", "timestamp": timestamp_ms, "instanceId": instance_id}).to_string()
}

/// `ONLINE_USERS`: a JSON array of user ids.
pub fn online_users(user_ids: &[String]) -> String {
    Value::from(user_ids.to_vec()).to_string()
}

/// Data of the `$typing-expired` timer event.
pub fn typing_timer(receiver_id: &str) -> String {
    json!({"receiverId": receiver_id}).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Value {
        serde_json::from_str(text).unwrap_or(Value::Null)
    }

    #[test]
    fn connection_success_fields() {
        let data = parse(&connection_success(
            "alice",
            "c1",
            "i1",
            "2026-01-01T00:00:00.000Z",
        ));
        assert_eq!(data["userId"], "alice");
        assert_eq!(data["connectionId"], "c1");
        assert_eq!(data["instanceId"], "i1");
        assert_eq!(data["expiresAt"], "2026-01-01T00:00:00.000Z");
    }

    #[test]
    fn error_event_fields() {
        let data = parse(&error_event(
            "UNAUTHORIZED",
            "token has expired",
            "authenticate",
        ));
        assert_eq!(
            data,
            json!({"code": "UNAUTHORIZED", "message": "token has expired", "event": "authenticate"})
        );
    }

    #[test]
    fn rate_limit_fields() {
        let data = parse(&rate_limit_exceeded(
            "message rate limit exceeded",
            42,
            "NEW_MESSAGE",
        ));
        assert_eq!(data["error"], "message rate limit exceeded");
        assert_eq!(data["retryAfter"], 42);
        assert_eq!(data["event"], "NEW_MESSAGE");
    }

    #[test]
    fn presence_and_typing() {
        assert_eq!(
            parse(&presence_update("bob", true)),
            json!({"userId": "bob", "status": "online"})
        );
        assert_eq!(parse(&presence_update("bob", false))["status"], "offline");
        assert_eq!(
            parse(&user_typing("bob", false)),
            json!({"userId": "bob", "isTyping": false})
        );
        assert_eq!(
            parse(&typing_timer("carol")),
            json!({"receiverId": "carol"})
        );
    }

    #[test]
    fn health_and_online_users() {
        assert_eq!(
            parse(&health_status(1234, "i1")),
            json!({"status": "ok", "timestamp": 1234, "instanceId": "i1"})
        );
        assert_eq!(online_users(&["a".into(), "b".into()]), r#"["a","b"]"#);
        assert_eq!(online_users(&[]), "[]");
    }
}
