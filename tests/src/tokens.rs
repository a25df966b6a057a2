//! Tokens for tests: valid HS256 tokens signed with the test hosts'
//! `JWT_SECRET`, and the invalid kinds a hostile client might send.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{json, Value};

/// The `JWT_SECRET` of every test host (at least 32 characters, as the host
/// requires).
pub const JWT_SECRET: &str = "nexus-integration-tests-jwt-secret-0123456789";

/// A secret of the right length that no test host is given.
const FORGER_SECRET: &str = "not-the-nexus-secret-but-long-enough-000000";

/// Lifetime of the tokens that [`valid`] mints, in seconds.
pub const VALID_TTL_S: i64 = 3600;

/// Returns the current Unix time in seconds.
pub fn now_s() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Signs `claims` with `algorithm` and `secret`.
pub fn sign(claims: &Value, algorithm: Algorithm, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(algorithm),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap_or_else(|error| panic!("failed to sign a {algorithm:?} token: {error}"))
}

/// Returns an HS256 token for `user` that expires at `exp` (Unix seconds).
pub fn expiring_at(user: &str, exp: i64) -> String {
    sign(
        &json!({"sub": user, "exp": exp, "iat": now_s()}),
        Algorithm::HS256,
        JWT_SECRET,
    )
}

/// Returns an HS256 token for `user` valid for [`VALID_TTL_S`].
pub fn valid(user: &str) -> String {
    expiring_at(user, now_s() + VALID_TTL_S)
}

/// Returns a token that expired an hour ago, well past any clock leeway.
pub fn expired(user: &str) -> String {
    expiring_at(user, now_s() - 3600)
}

/// Returns a token for `user` that becomes valid (`nbf`) in an hour.
pub fn not_yet_valid(user: &str) -> String {
    sign(
        &json!({"sub": user, "exp": now_s() + VALID_TTL_S, "nbf": now_s() + 3600}),
        Algorithm::HS256,
        JWT_SECRET,
    )
}

/// Returns an HS256 token signed with a secret the hosts do not know.
pub fn forged(user: &str) -> String {
    sign(
        &json!({"sub": user, "exp": now_s() + VALID_TTL_S}),
        Algorithm::HS256,
        FORGER_SECRET,
    )
}

/// Returns an unsigned token with header `{"alg": "none"}`.
pub fn alg_none(user: &str) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let claims = json!({"sub": user, "exp": now_s() + VALID_TTL_S}).to_string();
    format!("{header}.{}.", URL_SAFE_NO_PAD.encode(claims))
}

/// Returns a token signed with the right secret but with HS512, which the
/// protocol rejects because only HS256 is accepted.
pub fn hs512(user: &str) -> String {
    sign(
        &json!({"sub": user, "exp": now_s() + VALID_TTL_S}),
        Algorithm::HS512,
        JWT_SECRET,
    )
}

/// Returns a correctly signed token without the required `exp` claim.
pub fn without_exp(user: &str) -> String {
    sign(&json!({"sub": user}), Algorithm::HS256, JWT_SECRET)
}

/// Returns a correctly signed token without the required `sub` claim.
pub fn without_sub() -> String {
    sign(
        &json!({"exp": now_s() + VALID_TTL_S}),
        Algorithm::HS256,
        JWT_SECRET,
    )
}

/// Verifies an HS256 token with [`JWT_SECRET`] and returns its claims.
pub fn verify(token: &str) -> Value {
    let mut validation = Validation::new(Algorithm::HS256);
    validation.set_required_spec_claims(&["sub", "exp"]);
    jsonwebtoken::decode::<Value>(
        token,
        &DecodingKey::from_secret(JWT_SECRET.as_bytes()),
        &validation,
    )
    .unwrap_or_else(|error| panic!("token {token:?} does not verify: {error}"))
    .claims
}
