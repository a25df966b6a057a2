//! Opening Redis and Postgres connections, and small Redis command helpers
//! that map every failure to a retryable `UNAVAILABLE` error, except a
//! value that Postgres rejects.

use spin_sdk::pg3;
use spin_sdk::redis::{self, RedisParameter, RedisResult};

use crate::{settings, Error, Result};

/// Opens the Redis connection named by the `redis_url` setting.
pub fn open_redis() -> Result<redis::Connection> {
    let url = settings::get("redis_url")?;
    redis::Connection::open(&url).map_err(|error| Error::unavailable("Redis", "connect", &error))
}

/// Opens the Postgres connection named by the `database_url` setting.
pub fn open_postgres() -> Result<pg3::Connection> {
    let url = settings::get("database_url")?;
    pg3::Connection::open(&url).map_err(|error| Error::unavailable("Postgres", "connect", &error))
}

/// Maps a failed Postgres `operation`. A data exception (SQLSTATE class
/// 22, which nexus-host puts first in the message) means that Postgres
/// rejected a value of the request, so a retry would fail again and the
/// error is `VALIDATION_ERROR`. Any other failure is `UNAVAILABLE`.
pub fn postgres_error(operation: &str, error: &pg3::PgError) -> Error {
    if let pg3::PgError::QueryFailed(message) = error {
        if let Some(code) = message.get(..5).filter(|code| code.starts_with("22")) {
            eprintln!("Postgres {operation} rejected a value: {message}");
            return Error::validation(format!(
                "a value of the request cannot be stored (Postgres {operation} failed with SQLSTATE {code})"
            ));
        }
    }
    Error::unavailable("Postgres", operation, error)
}

/// Builds a binary Redis argument from text.
pub fn text(value: &str) -> RedisParameter {
    RedisParameter::Binary(value.as_bytes().to_vec())
}

/// Builds an integer Redis argument, saturating at `i64::MAX`.
pub fn integer(value: u64) -> RedisParameter {
    RedisParameter::Int64(i64::try_from(value).unwrap_or(i64::MAX))
}

/// Runs a Redis command through the generic `execute` call.
pub fn execute(
    redis: &redis::Connection,
    command: &str,
    arguments: &[RedisParameter],
) -> Result<Vec<RedisResult>> {
    redis
        .execute(command, arguments)
        .map_err(|error| Error::unavailable("Redis", command, &error))
}

/// Returns the text of a string reply, or `None` for a nil or non-text
/// reply.
pub fn reply_text(reply: &RedisResult) -> Option<String> {
    match reply {
        RedisResult::Binary(bytes) => String::from_utf8(bytes.clone()).ok(),
        RedisResult::Status(status) => Some(status.clone()),
        RedisResult::Int64(number) => Some(number.to_string()),
        RedisResult::Nil => None,
    }
}

/// Returns the elements of an array reply as strings, skipping nil and
/// non-UTF-8 elements.
pub fn reply_strings(replies: &[RedisResult]) -> Vec<String> {
    replies.iter().filter_map(reply_text).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorCode;

    #[test]
    fn postgres_data_exception_is_validation() {
        let rejected = pg3::PgError::QueryFailed(
            "22021: invalid byte sequence for encoding \"UTF8\": 0x00".to_owned(),
        );
        let error = postgres_error("INSERT", &rejected);
        assert_eq!(error.code, ErrorCode::ValidationError);
        assert_eq!(
            error.message,
            "a value of the request cannot be stored (Postgres INSERT failed with SQLSTATE 22021)"
        );
    }

    #[test]
    fn postgres_other_failures_are_unavailable() {
        let failures = [
            pg3::PgError::QueryFailed("57P01: terminating connection".to_owned()),
            pg3::PgError::ConnectionFailed("connection refused".to_owned()),
            pg3::PgError::QueryFailed("postgres call timed out".to_owned()),
            pg3::PgError::QueryFailed("22".to_owned()),
        ];
        for failure in &failures {
            let error = postgres_error("SELECT", failure);
            assert_eq!(error.code, ErrorCode::Unavailable, "{failure:?}");
        }
    }

    #[test]
    fn reply_strings_skips_nil() {
        let replies = [
            RedisResult::Binary(b"alice".to_vec()),
            RedisResult::Nil,
            RedisResult::Binary(vec![0xff]),
            RedisResult::Binary(b"bob".to_vec()),
        ];
        assert_eq!(reply_strings(&replies), vec!["alice", "bob"]);
    }

    #[test]
    fn integer_saturates() {
        assert!(matches!(integer(u64::MAX), RedisParameter::Int64(i64::MAX)));
        assert!(matches!(integer(5), RedisParameter::Int64(5)));
    }
}
