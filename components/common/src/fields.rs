//! Parsing of event `data` and validation of its fields. Every error is a
//! `VALIDATION_ERROR` (or `CONTENT_TOO_LARGE`) whose message names the field.

use serde_json::{Map, Value};

use crate::{Error, ErrorCode, Result};

/// The `data` object of an event.
pub type Object = Map<String, Value>;

/// Maximum length of a user id or a client message id, in characters.
pub const ID_MAX_CHARS: usize = 128;

/// Length of a message id: a zero-padded decimal number.
pub const MESSAGE_ID_DIGITS: usize = 20;

/// Parses an event's `data` JSON text into an object. `null` (the client
/// sent no data) becomes an empty object, so that required fields are
/// reported as missing.
pub fn parse_object(data: &str) -> Result<Object> {
    let value: Value = serde_json::from_str(data)
        .map_err(|error| Error::validation(format!("data is not valid JSON: {error}")))?;
    match value {
        Value::Object(object) => Ok(object),
        Value::Null => Ok(Object::new()),
        _ => Err(Error::validation("data must be a JSON object")),
    }
}

/// Returns the string field `field`. A missing or `null` field is an error.
pub fn required_string<'a>(object: &'a Object, field: &str) -> Result<&'a str> {
    optional_string(object, field)?.ok_or_else(|| Error::validation(format!("{field} is required")))
}

/// Returns the string field `field`, or `None` when it is missing or `null`.
pub fn optional_string<'a>(object: &'a Object, field: &str) -> Result<Option<&'a str>> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(value)) => Ok(Some(value)),
        Some(_) => Err(Error::validation(format!("{field} must be a string"))),
    }
}

/// Checks that `value` is an id of 1 to 128 characters. `field` names the
/// value in the error.
pub fn check_id(field: &str, value: &str) -> Result<()> {
    let chars = value.chars().count();
    if chars == 0 || chars > ID_MAX_CHARS {
        return Err(Error::validation(format!(
            "{field} must be a string of 1 to {ID_MAX_CHARS} characters, got {chars}"
        )));
    }
    check_no_nul(field, value)
}

/// Rejects text that contains U+0000, which a Postgres `text` column
/// cannot store.
pub fn check_no_nul(field: &str, value: &str) -> Result<()> {
    if value.contains('\0') {
        return Err(Error::validation(format!(
            "{field} must not contain the NUL character (U+0000)"
        )));
    }
    Ok(())
}

/// Returns the required user id field `field` (1 to 128 characters).
pub fn user_id<'a>(object: &'a Object, field: &str) -> Result<&'a str> {
    let value = required_string(object, field)?;
    check_id(field, value)?;
    Ok(value)
}

/// Returns the array field `field` of 1 to `max` user ids, without
/// repeats, in the order given.
pub fn user_id_list(object: &Object, field: &str, max: usize) -> Result<Vec<String>> {
    let items = match object.get(field) {
        Some(Value::Array(items)) => items,
        Some(_) => {
            return Err(Error::validation(format!(
                "{field} must be an array of user ids"
            )))
        }
        None => return Err(Error::validation(format!("{field} is required"))),
    };
    if items.is_empty() || items.len() > max {
        return Err(Error::validation(format!(
            "{field} must name 1 to {max} user ids"
        )));
    }
    let mut ids: Vec<String> = Vec::with_capacity(items.len());
    for item in items {
        let Value::String(id) = item else {
            return Err(Error::validation(format!(
                "{field} must contain only strings"
            )));
        };
        check_id(field, id)?;
        if !ids.contains(id) {
            ids.push(id.clone());
        }
    }
    Ok(ids)
}

/// Returns the `receiverId` field, which must be a user id other than
/// `sender`.
pub fn receiver_id<'a>(object: &'a Object, sender: &str) -> Result<&'a str> {
    let receiver = user_id(object, "receiverId")?;
    if receiver == sender {
        return Err(Error::validation("receiverId must differ from the sender"));
    }
    Ok(receiver)
}

/// Returns the optional `clientMessageId` field (1 to 128 characters).
pub fn client_message_id(object: &Object) -> Result<Option<&str>> {
    let value = optional_string(object, "clientMessageId")?;
    if let Some(value) = value {
        check_id("clientMessageId", value)?;
    }
    Ok(value)
}

/// Returns the `content` field: a non-empty string of at most `max_bytes`
/// bytes of UTF-8. Longer content is a `CONTENT_TOO_LARGE` error.
pub fn content(object: &Object, max_bytes: u64) -> Result<&str> {
    let content = required_string(object, "content")?;
    if content.is_empty() {
        return Err(Error::validation("content must not be empty"));
    }
    let bytes = content.len() as u64;
    if bytes > max_bytes {
        return Err(Error::new(
            ErrorCode::ContentTooLarge,
            format!("content is {bytes} bytes of UTF-8, more than the maximum of {max_bytes}"),
        ));
    }
    check_no_nul("content", content)?;
    Ok(content)
}

/// Reports whether `value` has the form of a message id: exactly 20 ASCII
/// digits.
pub fn is_message_id(value: &str) -> bool {
    value.len() == MESSAGE_ID_DIGITS && value.bytes().all(|byte| byte.is_ascii_digit())
}

/// Checks that `value` is a message id that fits Postgres' `bigint`, as
/// every stored id does. `field` names the value in the error.
pub fn check_message_id(field: &str, value: &str) -> Result<()> {
    if !is_message_id(value) {
        return Err(Error::validation(format!(
            "{field} must be a message id of {MESSAGE_ID_DIGITS} decimal digits"
        )));
    }
    if value.parse::<i64>().is_err() {
        return Err(Error::validation(format!(
            "{field} is larger than any message id"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(json: &str) -> Object {
        match parse_object(json) {
            Ok(object) => object,
            Err(error) => panic!("test JSON {json} did not parse: {error}"),
        }
    }

    fn message_of<T: std::fmt::Debug>(result: Result<T>) -> String {
        match result {
            Ok(value) => panic!("expected an error, got {value:?}"),
            Err(error) => {
                assert_eq!(error.code, ErrorCode::ValidationError, "{error}");
                error.message
            }
        }
    }

    #[test]
    fn parse_object_accepts_null_as_empty() {
        assert!(object("null").is_empty());
    }

    #[test]
    fn parse_object_rejects_non_objects() {
        for data in ["[]", "3", "\"text\"", "true"] {
            assert!(parse_object(data).is_err(), "{data}");
        }
        assert!(parse_object("{").is_err());
    }

    #[test]
    fn user_id_list_checks_shape_and_bounds() {
        let data = object(r#"{"userIds": ["bob", "carol", "bob"]}"#);
        assert_eq!(
            user_id_list(&data, "userIds", 10).unwrap(),
            vec!["bob", "carol"]
        );
        let empty = object(r#"{"userIds": []}"#);
        assert!(user_id_list(&empty, "userIds", 10).is_err());
        let too_many = object(r#"{"userIds": ["a", "b", "c"]}"#);
        assert!(user_id_list(&too_many, "userIds", 2).is_err());
        let mixed = object(r#"{"userIds": ["a", 5]}"#);
        assert!(user_id_list(&mixed, "userIds", 10).is_err());
        let missing = object(r#"{}"#);
        assert!(user_id_list(&missing, "userIds", 10).is_err());
    }

    #[test]
    fn required_string_names_field() {
        let data = object(r#"{"receiverId": 5, "content": null}"#);
        assert_eq!(
            message_of(required_string(&data, "receiverId")),
            "receiverId must be a string"
        );
        assert_eq!(
            message_of(required_string(&data, "content")),
            "content is required"
        );
        assert_eq!(
            message_of(required_string(&data, "token")),
            "token is required"
        );
    }

    #[test]
    fn user_id_length_limits() {
        let max = "é".repeat(ID_MAX_CHARS);
        let data = object(&format!(
            r#"{{"empty": "", "max": "{max}", "long": "{max}x"}}"#
        ));
        assert!(
            message_of(user_id(&data, "empty")).starts_with("empty must be a string of 1 to 128")
        );
        assert_eq!(user_id(&data, "max").ok(), Some(max.as_str()));
        assert!(message_of(user_id(&data, "long")).contains("got 129"));
    }

    #[test]
    fn receiver_id_must_differ_from_sender() {
        let data = object(r#"{"receiverId": "alice"}"#);
        assert_eq!(
            message_of(receiver_id(&data, "alice")),
            "receiverId must differ from the sender"
        );
        assert_eq!(receiver_id(&data, "bob").ok(), Some("alice"));
    }

    #[test]
    fn client_message_id_optional() {
        assert_eq!(client_message_id(&object("{}")).ok(), Some(None));
        assert_eq!(
            client_message_id(&object(r#"{"clientMessageId": null}"#)).ok(),
            Some(None)
        );
        assert_eq!(
            client_message_id(&object(r#"{"clientMessageId": "c1"}"#)).ok(),
            Some(Some("c1"))
        );
        assert!(
            message_of(client_message_id(&object(r#"{"clientMessageId": ""}"#)))
                .starts_with("clientMessageId")
        );
        assert!(
            message_of(client_message_id(&object(r#"{"clientMessageId": 7}"#)))
                .starts_with("clientMessageId")
        );
    }

    #[test]
    fn content_counts_utf8_bytes() {
        // "é" is 2 bytes of UTF-8, so 3 of them are 6 bytes.
        let data = object(r#"{"content": "ééé"}"#);
        assert_eq!(content(&data, 6).ok(), Some("ééé"));
        let too_large = content(&data, 5);
        assert_eq!(
            too_large.as_ref().map_err(|error| error.code),
            Err(ErrorCode::ContentTooLarge)
        );
    }

    #[test]
    fn content_rejects_empty_and_missing() {
        assert_eq!(
            message_of(content(&object(r#"{"content": ""}"#), 10)),
            "content must not be empty"
        );
        assert_eq!(
            message_of(content(&object("{}"), 10)),
            "content is required"
        );
    }

    #[test]
    fn message_id_shape() {
        assert!(is_message_id("00000000000000000042"));
        assert!(!is_message_id("0000000000000000042"));
        assert!(!is_message_id("000000000000000000421"));
        assert!(!is_message_id("0000000000000000004a"));
        assert!(!is_message_id("-0000000000000000042"));
        assert!(check_message_id("lastMessageId", "42")
            .is_err_and(|error| error.message.starts_with("lastMessageId")));
    }

    #[test]
    fn message_id_within_bigint() {
        assert!(check_message_id("lastMessageId", "09223372036854775807").is_ok());
        assert_eq!(
            message_of(check_message_id("lastMessageId", "09223372036854775808")),
            "lastMessageId is larger than any message id"
        );
        assert_eq!(
            message_of(check_message_id("lastMessageId", "99999999999999999999")),
            "lastMessageId is larger than any message id"
        );
    }

    #[test]
    fn nul_character_rejected() {
        let nul = "must not contain the NUL character (U+0000)";
        assert_eq!(
            message_of(check_id("receiverId", "bo\u{0}b")),
            format!("receiverId {nul}")
        );
        let data = object(r#"{"clientMessageId": "c\u0000"}"#);
        assert_eq!(
            message_of(client_message_id(&data)),
            format!("clientMessageId {nul}")
        );
        let data = object(r#"{"content": "hi\u0000"}"#);
        assert_eq!(message_of(content(&data, 100)), format!("content {nul}"));
        let data = object(r#"{"userIds": ["bob", "\u0000"]}"#);
        assert_eq!(
            message_of(user_id_list(&data, "userIds", 10)),
            format!("userIds {nul}")
        );
    }
}
