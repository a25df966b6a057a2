//! Verification of HS256 JSON Web Tokens.
//!
//! A token is valid when its header names `HS256`, its signature matches
//! `jwt_secret`, it has a string `sub` of 1 to 128 characters and a
//! numeric `exp` (seconds since the Unix epoch) that has not passed, with
//! no leeway. Other claims are ignored.

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde_json::{Map, Value};
use sha2::Sha256;

use crate::fields::ID_MAX_CHARS;
use crate::{settings, Error, Result};

/// Minimum length of `jwt_secret`, in bytes.
pub const SECRET_MIN_BYTES: usize = 32;

/// Latest accepted `exp`: 9999-12-31T23:59:59Z, the last instant that RFC
/// 3339 can write with its four-digit year.
pub const EXP_MAX_S: u64 = 253_402_300_799;

/// The claims of a verified token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// Expiry in seconds since the Unix epoch.
    pub exp: u64,
}

impl Claims {
    /// Returns the expiry in milliseconds since the Unix epoch.
    pub fn expires_at_ms(&self) -> u64 {
        self.exp.saturating_mul(1000)
    }
}

/// Reasons a token is rejected. The messages never contain the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenError {
    Missing,
    Malformed,
    /// The header's `alg` is not `HS256`. The `alg` value is kept for the
    /// message when it is a short printable string.
    WrongAlgorithm(Option<String>),
    BadSignature,
    Expired,
    /// `nbf` is later than now.
    NotYetValid,
    /// `nbf` is present but is not a number of seconds.
    InvalidNotBefore,
    /// `sub` is missing or is not a string.
    MissingSubject,
    /// `exp` is missing or is not a whole number of seconds.
    MissingExpiry,
    /// `exp` is later than [`EXP_MAX_S`].
    ExpiryOutOfRange,
    /// `sub` is not a valid user id.
    InvalidSubject,
    /// `sub` is not the `userId` the client sent.
    SubjectMismatch,
    /// The token's user differs from the user the connection is already
    /// authenticated as.
    UserSwitch,
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenError::Missing => f.write_str("token is missing"),
            TokenError::Malformed => f.write_str("token is malformed: expected a signed JWT"),
            TokenError::WrongAlgorithm(Some(alg)) => {
                write!(f, "token algorithm must be HS256, got {alg}")
            }
            TokenError::WrongAlgorithm(None) => f.write_str("token algorithm must be HS256"),
            TokenError::BadSignature => f.write_str("token signature is invalid"),
            TokenError::Expired => f.write_str("token has expired"),
            TokenError::NotYetValid => f.write_str("token is not valid yet (claim nbf)"),
            TokenError::InvalidNotBefore => {
                f.write_str("token claim nbf is not a number of seconds")
            }
            TokenError::MissingSubject => {
                f.write_str("token claim sub is missing or is not a string")
            }
            TokenError::MissingExpiry => {
                f.write_str("token claim exp is missing or is not a whole number of seconds")
            }
            TokenError::ExpiryOutOfRange => {
                f.write_str("token claim exp is later than the year 9999")
            }
            TokenError::InvalidSubject => write!(
                f,
                "token claim sub must be a user id of 1 to {ID_MAX_CHARS} characters without U+0000"
            ),
            TokenError::SubjectMismatch => f.write_str("token subject does not match userId"),
            TokenError::UserSwitch => f.write_str(
                "userId differs from the user this connection is authenticated as, \
                 and a connection cannot switch users",
            ),
        }
    }
}

impl std::error::Error for TokenError {}

impl From<TokenError> for Error {
    fn from(error: TokenError) -> Self {
        Error::unauthorized(error.to_string())
    }
}

/// Reads `jwt_secret` from the Spin variables and checks its length.
pub fn secret_from_settings() -> Result<String> {
    let secret = settings::get("jwt_secret")?;
    check_secret(&secret)?;
    Ok(secret)
}

/// Checks that a secret is long enough for HS256 signing, because an empty
/// or short secret would let anyone forge tokens.
pub fn check_secret(secret: &str) -> Result<()> {
    if secret.len() < SECRET_MIN_BYTES {
        return Err(Error::internal(format!(
            "setting jwt_secret is shorter than {SECRET_MIN_BYTES} bytes"
        )));
    }
    Ok(())
}

/// Verifies `token` with `secret` and returns its claims.
pub fn verify(token: &str, secret: &[u8]) -> std::result::Result<Claims, TokenError> {
    verify_at(token, secret, crate::time::now_ms() / 1000)
}

/// Verifies `token` as [`verify`] does, at `now_s` seconds since the Unix
/// epoch. A token whose `exp` equals `now_s` is still valid, and so is one
/// whose optional `nbf` equals it.
///
/// The checks run in a fixed order: the token's shape, the header's `alg`,
/// the signature, then the claims. So the error for a token with a bad
/// signature reveals nothing about its claims.
pub fn verify_at(
    token: &str,
    secret: &[u8],
    now_s: u64,
) -> std::result::Result<Claims, TokenError> {
    if token.is_empty() {
        return Err(TokenError::Missing);
    }
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed);
    };
    check_algorithm(header)?;

    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| TokenError::Malformed)?;
    // HMAC accepts a key of any length, and `check_secret` enforces the minimum.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).map_err(|_| TokenError::BadSignature)?;
    mac.update(header.as_bytes());
    mac.update(b".");
    mac.update(payload.as_bytes());
    // `verify_slice` compares in constant time.
    mac.verify_slice(&signature)
        .map_err(|_| TokenError::BadSignature)?;

    let payload = URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| TokenError::Malformed)?;
    let claims: Map<String, Value> =
        serde_json::from_slice(&payload).map_err(|_| TokenError::Malformed)?;
    let not_before = match claims.get("nbf") {
        None => None,
        Some(value) => Some(value.as_f64().ok_or(TokenError::InvalidNotBefore)?),
    };
    let claims = claims_from_map(&claims)?;
    if claims.exp < now_s {
        return Err(TokenError::Expired);
    }
    // Seconds since 1970 stay far below 2^53, so f64 compares them exactly.
    if not_before.is_some_and(|nbf| nbf > now_s as f64) {
        return Err(TokenError::NotYetValid);
    }
    Ok(claims)
}

/// Checks verified `claims` against the `userId` the client sent
/// (`claimed_user`) and the user the connection is already authenticated
/// as (`bound_user`).
pub fn check_subject(
    claims: &Claims,
    claimed_user: Option<&str>,
    bound_user: Option<&str>,
) -> std::result::Result<(), TokenError> {
    if claimed_user.is_some_and(|user| user != claims.sub) {
        return Err(TokenError::SubjectMismatch);
    }
    if bound_user.is_some_and(|user| user != claims.sub) {
        return Err(TokenError::UserSwitch);
    }
    Ok(())
}

fn check_algorithm(encoded_header: &str) -> std::result::Result<(), TokenError> {
    let header_bytes = URL_SAFE_NO_PAD
        .decode(encoded_header)
        .map_err(|_| TokenError::Malformed)?;
    let header: Value = serde_json::from_slice(&header_bytes).map_err(|_| TokenError::Malformed)?;
    match header.get("alg") {
        Some(Value::String(alg)) if alg == "HS256" => Ok(()),
        Some(Value::String(alg)) => Err(TokenError::WrongAlgorithm(printable_algorithm(alg))),
        _ => Err(TokenError::WrongAlgorithm(None)),
    }
}

/// Returns `alg` for use in a message when it is short and printable.
fn printable_algorithm(alg: &str) -> Option<String> {
    let printable = alg.len() <= 16 && alg.bytes().all(|byte| byte.is_ascii_alphanumeric());
    printable.then(|| alg.to_owned())
}

fn claims_from_map(claims: &Map<String, Value>) -> std::result::Result<Claims, TokenError> {
    let sub = match claims.get("sub") {
        Some(Value::String(sub)) => sub,
        _ => return Err(TokenError::MissingSubject),
    };
    if crate::fields::check_id("sub", sub).is_err() {
        return Err(TokenError::InvalidSubject);
    }
    let exp = claims
        .get("exp")
        .and_then(Value::as_u64)
        .ok_or(TokenError::MissingExpiry)?;
    if exp > EXP_MAX_S {
        return Err(TokenError::ExpiryOutOfRange);
    }
    Ok(Claims {
        sub: sub.clone(),
        exp,
    })
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    use serde_json::json;

    use super::*;

    const SECRET: &[u8] = b"a test secret of at least 32 bytes!!";

    fn now_s() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn sign(claims: &Value, secret: &[u8]) -> String {
        match encode(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(secret),
        ) {
            Ok(token) => token,
            Err(error) => panic!("signing the test token failed: {error}"),
        }
    }

    fn sign_with_header(header: &Value, claims: &Value) -> String {
        let header = URL_SAFE_NO_PAD.encode(header.to_string());
        let claims = URL_SAFE_NO_PAD.encode(claims.to_string());
        format!("{header}.{claims}.c2lnbmF0dXJl")
    }

    #[test]
    fn verify_accepts_valid_token() {
        let exp = now_s() + 3600;
        let token = sign(&json!({"sub": "alice", "exp": exp, "aud": "web"}), SECRET);
        let claims = verify(&token, SECRET);
        assert_eq!(
            claims,
            Ok(Claims {
                sub: "alice".into(),
                exp
            })
        );
        assert_eq!(claims.map(|c| c.expires_at_ms()), Ok(exp * 1000));
    }

    #[test]
    fn verify_rejects_expired_token() {
        let token = sign(&json!({"sub": "alice", "exp": now_s() - 1}), SECRET);
        assert_eq!(verify(&token, SECRET), Err(TokenError::Expired));
    }

    #[test]
    fn verify_rejects_bad_signature() {
        let token = sign(
            &json!({"sub": "alice", "exp": now_s() + 60}),
            b"another secret of at least 32 bytes!",
        );
        assert_eq!(verify(&token, SECRET), Err(TokenError::BadSignature));
    }

    #[test]
    fn verify_rejects_alg_none() {
        let token = sign_with_header(
            &json!({"alg": "none", "typ": "JWT"}),
            &json!({"sub": "alice", "exp": now_s() + 60}),
        );
        let error = verify(&token, SECRET);
        assert_eq!(error, Err(TokenError::WrongAlgorithm(Some("none".into()))));
        let message = error.err().map(|e| e.to_string()).unwrap_or_default();
        assert_eq!(message, "token algorithm must be HS256, got none");
    }

    #[test]
    fn verify_rejects_other_algorithms() {
        let claims = json!({"sub": "alice", "exp": now_s() + 60});
        for alg in ["HS512", "RS256", "ES256"] {
            let token = sign_with_header(&json!({"alg": alg}), &claims);
            assert_eq!(
                verify(&token, SECRET),
                Err(TokenError::WrongAlgorithm(Some(alg.into()))),
                "{alg}"
            );
        }
        let token = sign_with_header(&json!({"typ": "JWT"}), &claims);
        assert_eq!(
            verify(&token, SECRET),
            Err(TokenError::WrongAlgorithm(None))
        );
    }

    #[test]
    fn verify_requires_sub_and_exp() {
        let no_sub = sign(&json!({"exp": now_s() + 60}), SECRET);
        assert_eq!(verify(&no_sub, SECRET), Err(TokenError::MissingSubject));
        let numeric_sub = sign(&json!({"sub": 7, "exp": now_s() + 60}), SECRET);
        assert_eq!(
            verify(&numeric_sub, SECRET),
            Err(TokenError::MissingSubject)
        );
        let no_exp = sign(&json!({"sub": "alice"}), SECRET);
        assert_eq!(verify(&no_exp, SECRET), Err(TokenError::MissingExpiry));
        let text_exp = sign(&json!({"sub": "alice", "exp": "soon"}), SECRET);
        assert_eq!(verify(&text_exp, SECRET), Err(TokenError::MissingExpiry));
    }

    #[test]
    fn verify_rejects_far_expiry() {
        let token = sign(&json!({"sub": "alice", "exp": EXP_MAX_S + 1}), SECRET);
        assert_eq!(verify(&token, SECRET), Err(TokenError::ExpiryOutOfRange));
        let last = sign(&json!({"sub": "alice", "exp": EXP_MAX_S}), SECRET);
        assert!(verify(&last, SECRET).is_ok());
        assert!(
            crate::time::rfc3339_from_ms(EXP_MAX_S * 1000).is_some_and(|t| t.starts_with("9999-"))
        );
    }

    #[test]
    fn verify_rejects_bad_subject() {
        let empty = sign(&json!({"sub": "", "exp": now_s() + 60}), SECRET);
        assert_eq!(verify(&empty, SECRET), Err(TokenError::InvalidSubject));
        let long = sign(
            &json!({"sub": "x".repeat(129), "exp": now_s() + 60}),
            SECRET,
        );
        assert_eq!(verify(&long, SECRET), Err(TokenError::InvalidSubject));
    }

    #[test]
    fn verify_rejects_malformed_tokens() {
        for token in ["abc", "a.b.c", "e30.e30"] {
            let result = verify(token, SECRET);
            assert!(
                matches!(
                    result,
                    Err(TokenError::Malformed | TokenError::WrongAlgorithm(None))
                ),
                "{token}: {result:?}"
            );
        }
        assert_eq!(verify("", SECRET), Err(TokenError::Missing));
    }

    #[test]
    fn verify_at_expiry_boundary() {
        let exp = 2_000_000_000;
        let token = sign(&json!({"sub": "alice", "exp": exp}), SECRET);
        assert!(verify_at(&token, SECRET, exp).is_ok());
        assert_eq!(verify_at(&token, SECRET, exp + 1), Err(TokenError::Expired));
    }

    #[test]
    fn verify_at_not_before_boundary() {
        let nbf = 2_000_000_000;
        let token = sign(
            &json!({"sub": "alice", "exp": nbf + 60, "nbf": nbf}),
            SECRET,
        );
        assert_eq!(
            verify_at(&token, SECRET, nbf - 1),
            Err(TokenError::NotYetValid)
        );
        assert!(verify_at(&token, SECRET, nbf).is_ok());
        let fraction = sign(
            &json!({"sub": "alice", "exp": nbf + 60, "nbf": nbf as f64 + 0.5}),
            SECRET,
        );
        assert_eq!(
            verify_at(&fraction, SECRET, nbf),
            Err(TokenError::NotYetValid)
        );
        assert!(verify_at(&fraction, SECRET, nbf + 1).is_ok());
    }

    #[test]
    fn verify_rejects_non_numeric_not_before() {
        let token = sign(
            &json!({"sub": "alice", "exp": now_s() + 60, "nbf": "soon"}),
            SECRET,
        );
        assert_eq!(verify(&token, SECRET), Err(TokenError::InvalidNotBefore));
    }

    #[test]
    fn verify_checks_signature_before_claims() {
        let no_sub = sign(
            &json!({"exp": now_s() - 60}),
            b"another secret of at least 32 bytes!",
        );
        assert_eq!(verify(&no_sub, SECRET), Err(TokenError::BadSignature));
    }

    #[test]
    fn verify_rejects_tampered_parts() {
        let token = sign(&json!({"sub": "alice", "exp": now_s() + 60}), SECRET);
        let parts: Vec<&str> = token.split('.').collect();
        let forged_claims =
            URL_SAFE_NO_PAD.encode(json!({"sub": "bob", "exp": now_s() + 60}).to_string());
        let forged = format!("{}.{forged_claims}.{}", parts[0], parts[2]);
        assert_eq!(verify(&forged, SECRET), Err(TokenError::BadSignature));
        let truncated = format!(
            "{}.{}.{}",
            parts[0],
            parts[1],
            &parts[2][..parts[2].len() - 3]
        );
        assert_eq!(verify(&truncated, SECRET), Err(TokenError::BadSignature));
        let extra = format!("{token}.e30");
        assert_eq!(verify(&extra, SECRET), Err(TokenError::Malformed));
        let bad_base64 = format!("{}.{}.{}!", parts[0], parts[1], parts[2]);
        assert_eq!(verify(&bad_base64, SECRET), Err(TokenError::Malformed));
    }

    #[test]
    fn verify_rejects_non_object_payload() {
        for payload in [json!(["alice"]), json!("alice"), json!(null)] {
            let token = sign(&payload, SECRET);
            assert_eq!(
                verify(&token, SECRET),
                Err(TokenError::Malformed),
                "{payload}"
            );
        }
    }

    #[test]
    fn messages_omit_token() {
        let token = sign(&json!({"sub": "alice", "exp": now_s() - 10}), SECRET);
        let message = verify(&token, SECRET)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert_eq!(message, "token has expired");
        assert!(!message.contains(&token));
    }

    #[test]
    fn check_subject_cases() {
        let claims = Claims {
            sub: "alice".into(),
            exp: 1,
        };
        assert_eq!(check_subject(&claims, Some("alice"), None), Ok(()));
        assert_eq!(check_subject(&claims, None, Some("alice")), Ok(()));
        assert_eq!(
            check_subject(&claims, Some("bob"), None),
            Err(TokenError::SubjectMismatch)
        );
        assert_eq!(
            check_subject(&claims, Some("alice"), Some("bob")),
            Err(TokenError::UserSwitch)
        );
    }

    #[test]
    fn check_secret_length() {
        assert!(check_secret("short").is_err());
        assert!(check_secret("").is_err());
        assert!(check_secret(&"s".repeat(SECRET_MIN_BYTES)).is_ok());
    }
}
