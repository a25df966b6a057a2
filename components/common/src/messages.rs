//! Stored messages: the SQL of the `messages` table, row decoding, the
//! message payloads and the history page.
//!
//! Every query passes its parameters as text (`str`, or `db-null`) and casts
//! them in SQL, so that the host's Postgres binding only has to map text.
//! Message ids leave Postgres as 20-digit zero-padded text and timestamps
//! as RFC 3339 UTC text with milliseconds.

use serde_json::{json, Map, Value};
use spin_sdk::pg3::{DbValue, ParameterValue};

use crate::fields;
use crate::{Error, Result};

/// Columns of a full message row, in the order that
/// [`StoredMessage::from_row`] reads them.
macro_rules! select_message {
    ($rest:literal) => {
        concat!(
            "SELECT lpad(id::text, 20, '0'), sender_id, receiver_id, content, ",
            "to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), ",
            "client_message_id FROM messages ",
            $rest
        )
    };
}

/// Stores a message unless `(sender_id, client_message_id)` exists, and
/// returns its id and creation time. Parameters: sender, receiver, content,
/// client message id or null, and `true` or `false` for whether the
/// receiver was offline (pending). Returns no row on a conflict.
pub const INSERT_SQL: &str = concat!(
    "INSERT INTO messages (sender_id, receiver_id, content, client_message_id, pending) ",
    "VALUES ($1, $2, $3, $4, CAST($5::text AS boolean)) ",
    "ON CONFLICT (sender_id, client_message_id) DO NOTHING ",
    "RETURNING lpad(id::text, 20, '0'), ",
    "to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')"
);

/// Selects the message of a sender with a client message id. Parameters:
/// sender, client message id.
pub const SELECT_BY_CLIENT_ID_SQL: &str =
    select_message!("WHERE sender_id = $1 AND client_message_id = $2");

/// Selects a message by id, only if `sender` sent it. Parameters: message
/// id, sender.
pub const SELECT_BY_ID_SQL: &str =
    select_message!("WHERE id = CAST($1::text AS bigint) AND sender_id = $2");

/// Selects a page of the conversation between two users, newest first.
/// Parameters: user, peer, `before` id or null, `after` id or null, row
/// count.
pub const HISTORY_NEWEST_FIRST_SQL: &str = select_message!(
    "WHERE ((sender_id = $1 AND receiver_id = $2) OR (sender_id = $2 AND receiver_id = $1)) \
     AND ($3::text IS NULL OR id < CAST($3::text AS bigint)) \
     AND ($4::text IS NULL OR id > CAST($4::text AS bigint)) \
     ORDER BY id DESC LIMIT CAST($5::text AS bigint)"
);

/// Like [`HISTORY_NEWEST_FIRST_SQL`], oldest first.
pub const HISTORY_OLDEST_FIRST_SQL: &str = select_message!(
    "WHERE ((sender_id = $1 AND receiver_id = $2) OR (sender_id = $2 AND receiver_id = $1)) \
     AND ($3::text IS NULL OR id < CAST($3::text AS bigint)) \
     AND ($4::text IS NULL OR id > CAST($4::text AS bigint)) \
     ORDER BY id ASC LIMIT CAST($5::text AS bigint)"
);

/// Selects the messages to a receiver after a message id, oldest first.
/// Parameters: receiver, message id, row count.
pub const CATCH_UP_AFTER_SQL: &str = select_message!(
    "WHERE receiver_id = $1 AND id > CAST($2::text AS bigint) \
     ORDER BY id ASC LIMIT CAST($3::text AS bigint)"
);

/// Selects the messages stored while the receiver was offline, oldest
/// first. Parameters: receiver, row count.
pub const CATCH_UP_PENDING_SQL: &str = select_message!(
    "WHERE receiver_id = $1 AND pending ORDER BY id ASC LIMIT CAST($2::text AS bigint)"
);

/// Marks a receiver's messages up to an id as sent. Parameters: receiver,
/// message id.
pub const CLEAR_PENDING_SQL: &str = "UPDATE messages SET pending = false \
     WHERE receiver_id = $1 AND pending AND id <= CAST($2::text AS bigint)";

/// Default number of messages in a history page, capped by
/// `history_page_max`.
pub const HISTORY_DEFAULT_LIMIT: u64 = 50;

/// A message as stored in Postgres.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// 20-digit zero-padded id.
    pub id: String,
    pub sender_id: String,
    pub receiver_id: String,
    pub content: String,
    /// RFC 3339 UTC with milliseconds.
    pub created_at: String,
    pub client_message_id: Option<String>,
}

impl StoredMessage {
    /// Decodes a row selected with the columns of the `select_message!`
    /// queries.
    pub fn from_row(row: &[DbValue]) -> Result<Self> {
        match row {
            [id, sender, receiver, content, created_at, client_message_id] => Ok(StoredMessage {
                id: row_text(id, "id")?,
                sender_id: row_text(sender, "sender_id")?,
                receiver_id: row_text(receiver, "receiver_id")?,
                content: row_text(content, "content")?,
                created_at: row_text(created_at, "created_at")?,
                client_message_id: row_optional_text(client_message_id, "client_message_id")?,
            }),
            _ => Err(unexpected_row(row.len(), 6)),
        }
    }

    /// Returns the fields of the `NEW_MESSAGE` event, which history pages
    /// also use.
    pub fn to_json(&self) -> Value {
        let mut object = Map::new();
        object.insert("messageId".into(), self.id.clone().into());
        object.insert("senderId".into(), self.sender_id.clone().into());
        object.insert("receiverId".into(), self.receiver_id.clone().into());
        object.insert("content".into(), self.content.clone().into());
        object.insert("createdAt".into(), self.created_at.clone().into());
        if let Some(client_message_id) = &self.client_message_id {
            object.insert("clientMessageId".into(), client_message_id.clone().into());
        }
        Value::Object(object)
    }

    /// `NEW_MESSAGE {messageId, senderId, receiverId, content, createdAt, clientMessageId?}`.
    pub fn new_message_data(&self) -> String {
        self.to_json().to_string()
    }

    /// `MESSAGE_SENT {messageId, clientMessageId?, createdAt}`.
    pub fn message_sent_data(&self) -> String {
        let mut object = Map::new();
        object.insert("messageId".into(), self.id.clone().into());
        if let Some(client_message_id) = &self.client_message_id {
            object.insert("clientMessageId".into(), client_message_id.clone().into());
        }
        object.insert("createdAt".into(), self.created_at.clone().into());
        Value::Object(object).to_string()
    }
}

/// Decodes the `(id, created_at)` row that [`INSERT_SQL`] returns.
pub fn inserted_row(row: &[DbValue]) -> Result<(String, String)> {
    match row {
        [id, created_at] => Ok((row_text(id, "id")?, row_text(created_at, "created_at")?)),
        _ => Err(unexpected_row(row.len(), 2)),
    }
}

/// Builds a text query parameter, or `db-null` for `None`.
pub fn text_parameter(value: Option<&str>) -> ParameterValue {
    match value {
        Some(value) => ParameterValue::Str(value.to_owned()),
        None => ParameterValue::DbNull,
    }
}

fn row_text(value: &DbValue, column: &str) -> Result<String> {
    match value {
        DbValue::Str(text) => Ok(text.clone()),
        other => {
            eprintln!("column {column} has an unexpected value: {other:?}");
            Err(Error::internal(format!(
                "stored message column {column} has an unexpected type"
            )))
        }
    }
}

fn row_optional_text(value: &DbValue, column: &str) -> Result<Option<String>> {
    match value {
        DbValue::DbNull => Ok(None),
        other => row_text(other, column).map(Some),
    }
}

fn unexpected_row(found: usize, expected: usize) -> Error {
    Error::internal(format!(
        "stored message row has {found} columns, expected {expected}"
    ))
}

/// Parameters of `GET /messages/{peerId}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryQuery {
    /// Only messages with a smaller id.
    pub before: Option<String>,
    /// Only messages with a larger id. The page is then oldest first.
    pub after: Option<String>,
    /// Messages in the page.
    pub limit: u64,
}

impl HistoryQuery {
    /// Parses the query string (without `?`). `page_max` is the
    /// `history_page_max` setting. Unknown parameters are ignored.
    pub fn parse(query: &str, page_max: u64) -> Result<Self> {
        let mut parsed = HistoryQuery {
            before: None,
            after: None,
            limit: HISTORY_DEFAULT_LIMIT.min(page_max),
        };
        for (name, value) in form_urlencoded::parse(query.as_bytes()) {
            match name.as_ref() {
                "before" => parsed.before = Some(parse_cursor_id("before", &value)?),
                "after" => parsed.after = Some(parse_cursor_id("after", &value)?),
                "limit" => parsed.limit = parse_limit(&value, page_max)?,
                _ => {}
            }
        }
        Ok(parsed)
    }

    /// Reports whether the page is oldest first, which is the case when
    /// `after` is given.
    pub fn oldest_first(&self) -> bool {
        self.after.is_some()
    }

    /// Returns the SQL of the page.
    pub fn sql(&self) -> &'static str {
        if self.oldest_first() {
            HISTORY_OLDEST_FIRST_SQL
        } else {
            HISTORY_NEWEST_FIRST_SQL
        }
    }

    /// Returns the query parameters for `user` and `peer`. The row count is
    /// one more than the page, so that the extra row shows whether another
    /// page follows.
    pub fn parameters(&self, user: &str, peer: &str) -> Vec<ParameterValue> {
        vec![
            ParameterValue::Str(user.to_owned()),
            ParameterValue::Str(peer.to_owned()),
            text_parameter(self.before.as_deref()),
            text_parameter(self.after.as_deref()),
            ParameterValue::Str((self.limit + 1).to_string()),
        ]
    }
}

/// Builds the history response `{messages, nextBefore}` from up to
/// `limit + 1` rows.
///
/// In a newest-first page, `nextBefore` is the id to pass as `before` for
/// the next older page, or `null` when no older message exists. In an
/// oldest-first page (`after` given) it is always `null`, and a client
/// continues with `after` set to the last id of the page.
pub fn history_page(mut messages: Vec<StoredMessage>, query: &HistoryQuery) -> Value {
    let limit = usize::try_from(query.limit).unwrap_or(usize::MAX);
    let has_more = messages.len() > limit;
    messages.truncate(limit);
    let next_before = match messages.last() {
        Some(last) if has_more && !query.oldest_first() => Value::from(last.id.clone()),
        _ => Value::Null,
    };
    let messages: Vec<Value> = messages.iter().map(StoredMessage::to_json).collect();
    json!({"messages": messages, "nextBefore": next_before})
}

/// Checks a `before` or `after` value: a message id that fits Postgres'
/// `bigint`.
fn parse_cursor_id(field: &str, value: &str) -> Result<String> {
    fields::check_message_id(field, value)?;
    Ok(value.to_owned())
}

fn parse_limit(value: &str, page_max: u64) -> Result<u64> {
    match value.parse::<u64>() {
        Ok(limit) if (1..=page_max).contains(&limit) => Ok(limit),
        _ => Err(Error::validation(format!(
            "limit must be a whole number from 1 to {page_max}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorCode;

    fn message(id: u64, client_message_id: Option<&str>) -> StoredMessage {
        StoredMessage {
            id: format!("{id:020}"),
            sender_id: "alice".into(),
            receiver_id: "bob".into(),
            content: "hi".into(),
            created_at: "2026-12-04T15:02:07.123Z".into(),
            client_message_id: client_message_id.map(str::to_owned),
        }
    }

    fn text(value: &str) -> DbValue {
        DbValue::Str(value.into())
    }

    #[test]
    fn from_row_decodes_columns() {
        let row = [
            text("00000000000000000042"),
            text("alice"),
            text("bob"),
            text("hi"),
            text("2026-12-04T15:02:07.123Z"),
            DbValue::DbNull,
        ];
        assert_eq!(StoredMessage::from_row(&row), Ok(message(42, None)));
    }

    #[test]
    fn from_row_rejects_bad_rows() {
        assert!(StoredMessage::from_row(&[text("1")]).is_err());
        let row = [
            DbValue::Int64(42),
            text("alice"),
            text("bob"),
            text("hi"),
            text("t"),
            DbValue::DbNull,
        ];
        assert!(StoredMessage::from_row(&row).is_err_and(|e| e.message.contains("id")));
    }

    #[test]
    fn new_message_payload_fields() {
        let data: Value = serde_json::from_str(&message(42, Some("c1")).new_message_data())
            .unwrap_or(Value::Null);
        assert_eq!(
            data,
            json!({
                "messageId": "00000000000000000042",
                "senderId": "alice",
                "receiverId": "bob",
                "content": "hi",
                "createdAt": "2026-12-04T15:02:07.123Z",
                "clientMessageId": "c1",
            })
        );
        let without: Value =
            serde_json::from_str(&message(42, None).new_message_data()).unwrap_or(Value::Null);
        assert!(without.get("clientMessageId").is_none());
    }

    #[test]
    fn message_sent_payload_fields() {
        let data: Value = serde_json::from_str(&message(7, Some("c1")).message_sent_data())
            .unwrap_or(Value::Null);
        assert_eq!(
            data,
            json!({
                "messageId": "00000000000000000007",
                "clientMessageId": "c1",
                "createdAt": "2026-12-04T15:02:07.123Z",
            })
        );
        let without: Value =
            serde_json::from_str(&message(7, None).message_sent_data()).unwrap_or(Value::Null);
        assert!(without.get("clientMessageId").is_none());
    }

    #[test]
    fn history_query_defaults() {
        let query = HistoryQuery::parse("", 100);
        assert_eq!(
            query,
            Ok(HistoryQuery {
                before: None,
                after: None,
                limit: 50
            })
        );
        assert_eq!(HistoryQuery::parse("", 20).map(|q| q.limit), Ok(20));
    }

    #[test]
    fn history_query_parses_cursors() {
        let query = HistoryQuery::parse("before=00000000000000000042&limit=10&other=x", 100);
        assert_eq!(
            query,
            Ok(HistoryQuery {
                before: Some("00000000000000000042".into()),
                after: None,
                limit: 10
            })
        );
        let after = HistoryQuery::parse("after=00000000000000000001", 100);
        assert_eq!(after.as_ref().map(HistoryQuery::oldest_first), Ok(true));
        assert_eq!(after.map(|q| q.sql()), Ok(HISTORY_OLDEST_FIRST_SQL));
    }

    #[test]
    fn history_query_rejects_bad_values() {
        for query in [
            "limit=0",
            "limit=101",
            "limit=ten",
            "before=42",
            "after=abc",
            "before=99999999999999999999",
        ] {
            let parsed = HistoryQuery::parse(query, 100);
            assert_eq!(
                parsed.as_ref().map_err(|e| e.code),
                Err(ErrorCode::ValidationError),
                "{query}"
            );
        }
    }

    #[test]
    fn history_query_parameters_add_one_row() {
        let query = HistoryQuery {
            before: None,
            after: Some("00000000000000000003".into()),
            limit: 5,
        };
        let parameters = query.parameters("alice", "bob");
        assert_eq!(parameters.len(), 5);
        assert!(matches!(&parameters[2], ParameterValue::DbNull));
        assert!(matches!(&parameters[3], ParameterValue::Str(id) if id == "00000000000000000003"));
        assert!(matches!(&parameters[4], ParameterValue::Str(count) if count == "6"));
    }

    #[test]
    fn history_page_next_before() {
        let query = HistoryQuery {
            before: None,
            after: None,
            limit: 2,
        };
        let full = history_page(
            vec![message(9, None), message(8, None), message(7, None)],
            &query,
        );
        assert_eq!(full["messages"].as_array().map(Vec::len), Some(2));
        assert_eq!(full["nextBefore"], "00000000000000000008");

        let last = history_page(vec![message(2, None), message(1, None)], &query);
        assert_eq!(last["messages"].as_array().map(Vec::len), Some(2));
        assert_eq!(last["nextBefore"], Value::Null);
    }

    #[test]
    fn history_page_oldest_first_has_no_next_before() {
        let query = HistoryQuery {
            before: None,
            after: Some("00000000000000000001".into()),
            limit: 1,
        };
        let page = history_page(vec![message(2, None), message(3, None)], &query);
        assert_eq!(page["messages"][0]["messageId"], "00000000000000000002");
        assert_eq!(page["nextBefore"], Value::Null);
    }

    #[test]
    fn insert_sql_uses_conflict_target() {
        assert!(INSERT_SQL.contains("ON CONFLICT (sender_id, client_message_id) DO NOTHING"));
        assert!(SELECT_BY_ID_SQL.starts_with("SELECT lpad(id::text, 20, '0')"));
    }
}
