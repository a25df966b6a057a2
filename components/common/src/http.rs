//! Helpers for the components' HTTP routes: bearer tokens, path segments
//! and JSON responses. Errors are JSON `{code, message}` with the status of
//! [`ErrorCode::http_status`].

use serde_json::{json, Value};
use spin_sdk::http::{Method, Request, Response};

use crate::jwt::{self, Claims, TokenError};
use crate::{Error, ErrorCode, Result};

/// Returns the token of an `Authorization: Bearer TOKEN` header value. The
/// scheme name is case-insensitive.
pub fn bearer_token(authorization: Option<&str>) -> Result<&str> {
    let header = authorization.ok_or_else(|| {
        Error::unauthorized("Authorization header is missing; send Authorization: Bearer TOKEN")
    })?;
    let (scheme, token) = header.trim().split_once(' ').unwrap_or((header.trim(), ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(Error::unauthorized(
            "Authorization header must use the Bearer scheme",
        ));
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(TokenError::Missing.into());
    }
    Ok(token)
}

/// Verifies the request's bearer token with the `jwt_secret` setting and
/// returns its claims.
pub fn authorize(request: &Request) -> Result<Claims> {
    let header = request
        .header("authorization")
        .and_then(|value| value.as_str());
    let token = bearer_token(header)?;
    let secret = jwt::secret_from_settings()?;
    Ok(jwt::verify(token, secret.as_bytes())?)
}

/// Rejects every method but `GET`.
pub fn require_get(request: &Request) -> Result<()> {
    if *request.method() == Method::Get {
        Ok(())
    } else {
        Err(Error::new(
            ErrorCode::MethodNotAllowed,
            format!("method {} is not allowed; use GET", request.method()),
        ))
    }
}

/// Returns the percent-decoded path segment after `prefix`, for example
/// `bob` for `/messages/bob` and prefix `/messages/`. An empty segment or
/// one that contains `/` is a `NOT_FOUND` error.
pub fn path_segment(path: &str, prefix: &str) -> Result<String> {
    let segment = path
        .strip_prefix(prefix)
        .filter(|segment| !segment.is_empty() && !segment.contains('/'))
        .ok_or_else(|| not_found(path))?;
    percent_encoding::percent_decode_str(segment)
        .decode_utf8()
        .map(|decoded| decoded.into_owned())
        .map_err(|_| Error::validation("path segment is not valid percent-encoded UTF-8"))
}

/// Builds the `NOT_FOUND` error for an unknown route.
pub fn not_found(path: &str) -> Error {
    Error::new(ErrorCode::NotFound, format!("no route for {path}"))
}

/// Builds a JSON response.
pub fn json_response(status: u16, body: &Value) -> Response {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("cache-control", "no-store")
        .body(body.to_string())
        .build()
}

/// Builds the JSON `{code, message}` response of an error.
pub fn error_response(error: &Error) -> Response {
    let body = json!({"code": error.code.as_str(), "message": error.message});
    json_response(error.code.http_status(), &body)
}

/// Builds a 200 response from `result`, or the error response.
pub fn respond(result: Result<Value>) -> Response {
    match result {
        Ok(body) => json_response(200, &body),
        Err(error) => error_response(&error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_token_accepts_scheme_any_case() {
        assert_eq!(bearer_token(Some("Bearer abc.def.ghi")), Ok("abc.def.ghi"));
        assert_eq!(bearer_token(Some("bearer  abc")), Ok("abc"));
    }

    #[test]
    fn bearer_token_rejects_bad_headers() {
        for header in [
            None,
            Some("Basic dXNlcjpwYXNz"),
            Some("Bearer"),
            Some("Bearer   "),
            Some(""),
        ] {
            let error = bearer_token(header);
            assert_eq!(
                error.map_err(|e| e.code),
                Err(ErrorCode::Unauthorized),
                "{header:?}"
            );
        }
    }

    #[test]
    fn path_segment_decodes() {
        assert_eq!(
            path_segment("/messages/bob", "/messages/"),
            Ok("bob".to_owned())
        );
        assert_eq!(
            path_segment("/messages/bob%20smith", "/messages/"),
            Ok("bob smith".to_owned())
        );
    }

    #[test]
    fn path_segment_rejects_missing_or_nested() {
        for path in ["/messages/", "/messages", "/messages/a/b", "/other/a"] {
            let error = path_segment(path, "/messages/");
            assert_eq!(
                error.map_err(|e| e.code),
                Err(ErrorCode::NotFound),
                "{path}"
            );
        }
        let invalid = path_segment("/messages/%ff", "/messages/");
        assert_eq!(invalid.map_err(|e| e.code), Err(ErrorCode::ValidationError));
    }
}
