//! The error type of the components: a protocol error code and a message
//! that is safe to show to the client.

use std::fmt;

/// Error codes of the client protocol that the components raise, plus the
/// two codes that only HTTP routes use (`NOT_FOUND`, `METHOD_NOT_ALLOWED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    Unauthenticated,
    Unauthorized,
    ValidationError,
    ContentTooLarge,
    Unavailable,
    UnknownEvent,
    NotFound,
    MethodNotAllowed,
    InternalError,
}

impl ErrorCode {
    /// Returns the code as it appears on the wire, for example `VALIDATION_ERROR`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Unauthenticated => "UNAUTHENTICATED",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::ValidationError => "VALIDATION_ERROR",
            ErrorCode::ContentTooLarge => "CONTENT_TOO_LARGE",
            ErrorCode::Unavailable => "UNAVAILABLE",
            ErrorCode::UnknownEvent => "UNKNOWN_EVENT",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::MethodNotAllowed => "METHOD_NOT_ALLOWED",
            ErrorCode::InternalError => "INTERNAL_ERROR",
        }
    }

    /// Returns the HTTP status of an HTTP route's error response with this code.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::ValidationError | ErrorCode::ContentTooLarge => 400,
            ErrorCode::Unauthenticated | ErrorCode::Unauthorized => 401,
            ErrorCode::NotFound | ErrorCode::UnknownEvent => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::Unavailable => 503,
            ErrorCode::InternalError => 500,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rejected event or HTTP request. The host sends it to the client as
/// `ERROR {code, message, event}`, and an HTTP route returns it as
/// `{code, message}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub code: ErrorCode,
    /// Human-readable reason. It never contains a token or a secret.
    pub message: String,
}

/// Result type of the shared helpers.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Error {
            code,
            message: message.into(),
        }
    }

    pub fn validation(message: impl Into<String>) -> Self {
        Error::new(ErrorCode::ValidationError, message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Error::new(ErrorCode::Unauthorized, message)
    }

    pub fn unauthenticated() -> Self {
        Error::new(
            ErrorCode::Unauthenticated,
            "this event needs an authenticated connection, so send authenticate first",
        )
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Error::new(ErrorCode::InternalError, message)
    }

    /// Builds the error for an unknown event name.
    pub fn unknown_event(component: &str, event: &str) -> Self {
        Error::new(
            ErrorCode::UnknownEvent,
            format!("the {component} component does not handle event `{event}`"),
        )
    }

    /// Logs a failed Redis or Postgres operation to the component's stderr
    /// and builds the retryable `UNAVAILABLE` error for the client.
    ///
    /// The client message leaves out `detail`, because driver errors can
    /// contain server addresses.
    pub fn unavailable(service: &str, operation: &str, detail: &dyn fmt::Debug) -> Self {
        eprintln!("{service} {operation} failed: {detail:?}");
        Error::new(
            ErrorCode::Unavailable,
            format!("{service} is unavailable ({operation} failed); retry"),
        )
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for Error {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_wire_names() {
        assert_eq!(ErrorCode::ValidationError.as_str(), "VALIDATION_ERROR");
        assert_eq!(ErrorCode::ContentTooLarge.as_str(), "CONTENT_TOO_LARGE");
        assert_eq!(ErrorCode::Unavailable.as_str(), "UNAVAILABLE");
        assert_eq!(ErrorCode::UnknownEvent.as_str(), "UNKNOWN_EVENT");
        assert_eq!(ErrorCode::Unauthorized.as_str(), "UNAUTHORIZED");
    }

    #[test]
    fn code_http_statuses() {
        assert_eq!(ErrorCode::ValidationError.http_status(), 400);
        assert_eq!(ErrorCode::Unauthorized.http_status(), 401);
        assert_eq!(ErrorCode::NotFound.http_status(), 404);
        assert_eq!(ErrorCode::Unavailable.http_status(), 503);
        assert_eq!(ErrorCode::InternalError.http_status(), 500);
    }

    #[test]
    fn unavailable_message_asks_for_retry() {
        let error = Error::unavailable("Redis", "GET", &"connection refused to 10.0.0.1");
        assert_eq!(error.code, ErrorCode::Unavailable);
        assert!(error.message.ends_with("; retry"));
        assert!(!error.message.contains("10.0.0.1"));
    }
}
