//! Networking: the HTTP server, WebSocket sessions and close codes.

pub mod close;
pub mod server;
pub mod session;
pub mod socketio;
