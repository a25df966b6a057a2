//! HS256 access tokens for the load users, signed with the servers'
//! `JWT_SECRET`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde::Serialize;

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    iat: u64,
    exp: u64,
}

/// Signs tokens for any user id with one secret and one lifetime.
pub struct TokenMinter {
    key: EncodingKey,
    header: Header,
    lifetime: Duration,
}

impl TokenMinter {
    pub fn new(secret: &str, lifetime: Duration) -> Self {
        Self {
            key: EncodingKey::from_secret(secret.as_bytes()),
            header: Header::new(Algorithm::HS256),
            lifetime,
        }
    }

    /// Signs a token whose `sub` is `user_id` and whose `exp` is the
    /// lifetime from now.
    pub fn mint(&self, user_id: &str) -> Result<String> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .context("system clock is before 1970")?
            .as_secs();
        let claims = Claims {
            sub: user_id,
            iat: now,
            exp: now + self.lifetime.as_secs(),
        };
        encode(&self.header, &claims, &self.key).context("signing a token failed")
    }
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{decode, DecodingKey, Validation};
    use serde::Deserialize;

    use super::*;

    #[derive(Deserialize)]
    struct Decoded {
        sub: String,
        exp: u64,
    }

    #[test]
    fn token_verifies_with_the_secret() {
        let secret = "a-test-secret-that-is-long-enough-for-hs256";
        let minter = TokenMinter::new(secret, Duration::from_secs(600));
        let token = minter.mint("user-7").expect("token");
        let decoded = decode::<Decoded>(
            &token,
            &DecodingKey::from_secret(secret.as_bytes()),
            &Validation::new(Algorithm::HS256),
        )
        .expect("valid token");
        assert_eq!(decoded.claims.sub, "user-7");
        assert!(decoded.claims.exp > jsonwebtoken::get_current_timestamp() + 500);
    }
}
