//! WebSocket close codes of the client protocol.

pub const NORMAL: u16 = 1000;
pub const PROTOCOL: u16 = 1002;
pub const INVALID_UTF8: u16 = 1007;
pub const POLICY: u16 = 1008;
pub const TOO_LARGE: u16 = 1009;
pub const RESTARTING: u16 = 1012;
/// Replaced by a newer connection of the same user.
pub const REPLACED: u16 = 4001;
/// The token expired without renewal.
pub const TOKEN_EXPIRED: u16 = 4002;
/// No frames, pongs included, within the inactivity timeout.
pub const INACTIVE: u16 = 4003;
/// The client read too slowly and its send queue filled up.
pub const SEND_QUEUE_FULL: u16 = 4004;
