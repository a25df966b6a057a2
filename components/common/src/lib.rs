//! Shared library of the Nexus Chat guest components (auth, message and
//! presence).
//!
//! It contains what the components have in common and what can be tested on
//! the build machine: token verification, settings, the Redis rate limit,
//! field validation, the JSON payloads of the client protocol and the HTTP
//! route helpers. Modules that talk to Redis, Postgres or the Spin variables
//! keep their input and output handling in separate, natively tested
//! functions, because the Spin imports only work inside a component.

pub mod error;
pub mod fields;
pub mod http;
pub mod jwt;
pub mod messages;
pub mod payload;
pub mod presence;
pub mod rate_limit;
pub mod send;
pub mod settings;
pub mod storage;
pub mod time;

pub use error::{Error, ErrorCode, Result};
