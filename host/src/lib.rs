//! The Nexus Chat host: WebSocket and Socket.IO sessions (`net`), the
//! Wasmtime runtime that runs the chat components (`runtime`), delivery
//! through the Redis backplane (`delivery`), and what ties them together.
//! The `nexus-host` binary is a thin command line over this library, which
//! also serves the benchmarks.

pub mod app;
pub mod config;
pub mod delivery;
pub mod lifecycle;
pub mod logging;
pub mod manifest;
pub mod metrics;
pub mod migrate;
pub mod net;
pub mod runtime;
pub mod token;
