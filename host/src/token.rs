//! `nexus-host token`: development tokens signed with JWT_SECRET.

use anyhow::{bail, Context};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde::Serialize;

use crate::config::Config;

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    exp: u64,
    iat: u64,
}

/// Prints a HS256 token for `user_id` valid for `ttl_s` seconds.
pub fn print(config: &Config, user_id: &str, ttl_s: u64) -> anyhow::Result<()> {
    if config.is_production() {
        bail!("the token command is for development only; NODE_ENV is production");
    }
    config.validate()?;
    if user_id.is_empty() || user_id.chars().count() > 128 {
        bail!("USER_ID must be 1 to 128 characters");
    }
    let now = chrono::Utc::now().timestamp().max(0) as u64;
    let claims = Claims {
        sub: user_id,
        exp: now + ttl_s,
        iat: now,
    };
    let key = EncodingKey::from_secret(config.jwt_secret()?.as_bytes());
    let token = encode(&Header::new(Algorithm::HS256), &claims, &key)
        .context("failed to sign the token")?;
    println!("{token}");
    Ok(())
}
