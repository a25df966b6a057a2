//! Checks of the protocol's wire types: message ids, timestamps and fields.

use chrono::{DateTime, Utc};
use serde_json::Value;

/// Returns `data[field]` as a string, panicking with `data` when the field is
/// missing or not a string.
pub fn str_field<'a>(data: &'a Value, field: &str) -> &'a str {
    data.get(field)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("expected a string field {field:?} in {data}"))
}

/// Returns `data[field]` as an integer, panicking with `data` when the field
/// is missing or not an integer.
pub fn int_field(data: &Value, field: &str) -> i64 {
    data.get(field)
        .and_then(Value::as_i64)
        .unwrap_or_else(|| panic!("expected an integer field {field:?} in {data}"))
}

/// Returns whether `data[field]` is absent or `null`.
pub fn is_absent(data: &Value, field: &str) -> bool {
    data.get(field).is_none_or(Value::is_null)
}

/// Asserts that `data[field]` is a message id (20 ASCII digits) and returns
/// it.
pub fn message_id(data: &Value, field: &str) -> String {
    let id = str_field(data, field);
    assert_eq!(
        id.len(),
        20,
        "message id {id:?} in {data} is not 20 characters long"
    );
    assert!(
        id.bytes().all(|b| b.is_ascii_digit()),
        "message id {id:?} in {data} is not all decimal digits"
    );
    id.to_owned()
}

/// Asserts that `data[field]` is RFC 3339 in UTC with millisecond precision
/// (`YYYY-MM-DDTHH:MM:SS.mmmZ`), within ten minutes of this machine's clock,
/// and returns it parsed.
pub fn created_at(data: &Value, field: &str) -> DateTime<Utc> {
    let text = str_field(data, field);
    let bytes = text.as_bytes();
    let shape_ok = bytes.len() == 24
        && bytes.iter().enumerate().all(|(index, byte)| match index {
            4 | 7 => *byte == b'-',
            10 => *byte == b'T',
            13 | 16 => *byte == b':',
            19 => *byte == b'.',
            23 => *byte == b'Z',
            _ => byte.is_ascii_digit(),
        });
    assert!(
        shape_ok,
        "{field} {text:?} in {data} is not of the form YYYY-MM-DDTHH:MM:SS.mmmZ"
    );
    let parsed = rfc3339(data, field);
    let skew = (Utc::now() - parsed).num_seconds().abs();
    assert!(
        skew < 600,
        "{field} {text:?} is {skew} s away from the clock of this machine"
    );
    parsed
}

/// Asserts that `data[field]` is an RFC 3339 timestamp and returns it in UTC.
pub fn rfc3339(data: &Value, field: &str) -> DateTime<Utc> {
    let text = str_field(data, field);
    DateTime::parse_from_rfc3339(text)
        .unwrap_or_else(|error| panic!("{field} {text:?} in {data} is not RFC 3339: {error}"))
        .with_timezone(&Utc)
}
