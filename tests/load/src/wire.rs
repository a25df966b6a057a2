//! Text frame formats of the two wire protocols, and the message content
//! that carries a send timestamp.
//!
//! Native frames are JSON objects `{"event": NAME, "data": VALUE}`.
//!
//! Socket.IO v4 runs over Engine.IO v4. Every WebSocket text frame starts
//! with an Engine.IO packet type: `0` open, `1` close, `2` ping, `3` pong,
//! `4` message, `6` noop. A message packet carries a Socket.IO packet whose
//! first character is its type: `0` connect, `1` disconnect, `2` event, `4`
//! connect error. An event is `42["NAME",DATA]`, optionally with a
//! namespace (`42/chat,[...]`) or an acknowledgement id (`4217[...]`).

use serde_json::{json, Value};

use crate::cli::Protocol;

/// A decoded text frame from the server.
#[derive(Debug, PartialEq)]
pub enum ServerFrame {
    /// An application event with its data (`Value::Null` when it had none).
    Event { name: String, data: Value },
    /// Engine.IO open packet with the session's settings.
    EngineOpen(Value),
    /// Engine.IO ping, which the client must reply to with a pong.
    EnginePing,
    /// Socket.IO connect acknowledgement for the default namespace.
    SocketConnect,
    /// Socket.IO connect error, with the server's data.
    SocketConnectError(Value),
    /// Engine.IO close or Socket.IO disconnect.
    Disconnect,
    /// A frame that needs no action (Engine.IO pong or noop, other packets).
    Ignored,
    /// A frame that does not parse; the text is kept for error reports.
    Malformed(String),
}

/// Engine.IO pong, sent in reply to a ping.
pub const ENGINE_PONG: &str = "3";
/// Socket.IO connect request for the default namespace.
pub const SOCKET_CONNECT: &str = "40";

/// Encodes a client event in the protocol's text frame format.
pub fn encode_event(protocol: Protocol, name: &str, data: &Value) -> String {
    match protocol {
        Protocol::Native => json!({ "event": name, "data": data }).to_string(),
        Protocol::Socketio => format!("42{}", json!([name, data])),
    }
}

/// Decodes one text frame from the server.
pub fn decode_frame(protocol: Protocol, text: &str) -> ServerFrame {
    match protocol {
        Protocol::Native => decode_native(text),
        Protocol::Socketio => decode_engine_io(text),
    }
}

fn decode_native(text: &str) -> ServerFrame {
    let Ok(Value::Object(mut frame)) = serde_json::from_str::<Value>(text) else {
        return ServerFrame::Malformed(truncate(text));
    };
    let Some(Value::String(name)) = frame.remove("event") else {
        return ServerFrame::Malformed(truncate(text));
    };
    let data = frame.remove("data").unwrap_or(Value::Null);
    ServerFrame::Event { name, data }
}

fn decode_engine_io(text: &str) -> ServerFrame {
    let mut chars = text.chars();
    let Some(packet_type) = chars.next() else {
        return ServerFrame::Malformed(String::new());
    };
    let body = chars.as_str();
    match packet_type {
        '0' => match serde_json::from_str(body) {
            Ok(open) => ServerFrame::EngineOpen(open),
            Err(_) => ServerFrame::Malformed(truncate(text)),
        },
        '1' => ServerFrame::Disconnect,
        '2' => ServerFrame::EnginePing,
        '3' | '6' => ServerFrame::Ignored,
        '4' => decode_socket_io(body, text),
        _ => ServerFrame::Malformed(truncate(text)),
    }
}

fn decode_socket_io(packet: &str, text: &str) -> ServerFrame {
    let mut chars = packet.chars();
    let Some(packet_type) = chars.next() else {
        return ServerFrame::Malformed(truncate(text));
    };
    let rest = chars.as_str();
    let (namespace, rest) = split_namespace(rest);
    if namespace != "/" {
        // Only the default namespace is used; other namespaces' packets
        // are not ours.
        return ServerFrame::Ignored;
    }
    match packet_type {
        '0' => ServerFrame::SocketConnect,
        '1' => ServerFrame::Disconnect,
        '2' => {
            let payload = rest.trim_start_matches(|c: char| c.is_ascii_digit());
            let Ok(Value::Array(mut items)) = serde_json::from_str::<Value>(payload) else {
                return ServerFrame::Malformed(truncate(text));
            };
            if items.is_empty() {
                return ServerFrame::Malformed(truncate(text));
            }
            let Value::String(name) = items.remove(0) else {
                return ServerFrame::Malformed(truncate(text));
            };
            let data = if items.is_empty() {
                Value::Null
            } else {
                items.remove(0)
            };
            ServerFrame::Event { name, data }
        }
        '4' => ServerFrame::SocketConnectError(serde_json::from_str(rest).unwrap_or(Value::Null)),
        _ => ServerFrame::Ignored,
    }
}

/// Splits an optional `/namespace,` prefix off a Socket.IO packet body.
fn split_namespace(rest: &str) -> (&str, &str) {
    if !rest.starts_with('/') {
        return ("/", rest);
    }
    match rest.find(',') {
        Some(comma) => (&rest[..comma], &rest[comma + 1..]),
        None => (rest, ""),
    }
}

fn truncate(text: &str) -> String {
    text.chars().take(120).collect()
}

/// Prefix of the message content that nexus-load sends.
const CONTENT_PREFIX: &str = "nexus-load:";

/// Builds message content of `size` bytes that starts with the send time in
/// microseconds, padded with `x`. Content is never shorter than the
/// timestamp header (about 13 to 31 bytes), whatever `size` requests.
pub fn encode_content(sent_us: u64, size: usize) -> String {
    let mut content = format!("{CONTENT_PREFIX}{sent_us}:");
    if content.len() < size {
        content.extend(std::iter::repeat_n('x', size - content.len()));
    }
    content
}

/// Reads the send time back from content built by [`encode_content`].
pub fn decode_content(content: &str) -> Option<u64> {
    let rest = content.strip_prefix(CONTENT_PREFIX)?;
    let (digits, _) = rest.split_once(':')?;
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(name: &str, data: Value) -> ServerFrame {
        ServerFrame::Event {
            name: name.to_string(),
            data,
        }
    }

    #[test]
    fn native_round_trip() {
        let text = encode_event(Protocol::Native, "NEW_MESSAGE", &json!({"receiverId": "b"}));
        assert_eq!(
            decode_frame(Protocol::Native, &text),
            event("NEW_MESSAGE", json!({"receiverId": "b"}))
        );
    }

    #[test]
    fn native_without_data_is_null() {
        assert_eq!(
            decode_frame(Protocol::Native, r#"{"event":"HEALTH_STATUS"}"#),
            event("HEALTH_STATUS", Value::Null)
        );
    }

    #[test]
    fn native_rejects_non_objects() {
        assert!(matches!(
            decode_frame(Protocol::Native, "[1,2]"),
            ServerFrame::Malformed(_)
        ));
        assert!(matches!(
            decode_frame(Protocol::Native, r#"{"event":5}"#),
            ServerFrame::Malformed(_)
        ));
    }

    #[test]
    fn socketio_event_encoding() {
        let text = encode_event(Protocol::Socketio, "authenticate", &json!({"userId": "a"}));
        assert_eq!(text, r#"42["authenticate",{"userId":"a"}]"#);
    }

    #[test]
    fn socketio_control_packets() {
        let open = r#"0{"sid":"abc","upgrades":[],"pingInterval":25000,"pingTimeout":20000}"#;
        assert!(matches!(
            decode_frame(Protocol::Socketio, open),
            ServerFrame::EngineOpen(_)
        ));
        assert_eq!(
            decode_frame(Protocol::Socketio, "2"),
            ServerFrame::EnginePing
        );
        assert_eq!(decode_frame(Protocol::Socketio, "3"), ServerFrame::Ignored);
        assert_eq!(
            decode_frame(Protocol::Socketio, "1"),
            ServerFrame::Disconnect
        );
        assert_eq!(
            decode_frame(Protocol::Socketio, r#"40{"sid":"xyz"}"#),
            ServerFrame::SocketConnect
        );
        assert_eq!(
            decode_frame(Protocol::Socketio, "41"),
            ServerFrame::Disconnect
        );
        assert_eq!(
            decode_frame(Protocol::Socketio, r#"44{"message":"no"}"#),
            ServerFrame::SocketConnectError(json!({"message": "no"}))
        );
    }

    #[test]
    fn socketio_events() {
        assert_eq!(
            decode_frame(Protocol::Socketio, r#"42["ONLINE_USERS",["a","b"]]"#),
            event("ONLINE_USERS", json!(["a", "b"]))
        );
        assert_eq!(
            decode_frame(Protocol::Socketio, r#"42["PING_ONLY"]"#),
            event("PING_ONLY", Value::Null)
        );
        assert_eq!(
            decode_frame(
                Protocol::Socketio,
                r#"4217["MESSAGE_SENT",{"messageId":"m"}]"#
            ),
            event("MESSAGE_SENT", json!({"messageId": "m"}))
        );
        assert_eq!(
            decode_frame(Protocol::Socketio, r#"42/,["X",1]"#),
            event("X", json!(1))
        );
        assert_eq!(
            decode_frame(Protocol::Socketio, r#"42/admin,["X",1]"#),
            ServerFrame::Ignored
        );
    }

    #[test]
    fn socketio_malformed_frames() {
        for text in ["", "9", "42", "42[]", "42[5]", "42{", "0nope"] {
            assert!(
                matches!(
                    decode_frame(Protocol::Socketio, text),
                    ServerFrame::Malformed(_)
                ),
                "{text:?}"
            );
        }
    }

    #[test]
    fn content_carries_timestamp() {
        let content = encode_content(1_234_567, 64);
        assert_eq!(content.len(), 64);
        assert_eq!(decode_content(&content), Some(1_234_567));
    }

    #[test]
    fn short_content_keeps_header() {
        let content = encode_content(42, 1);
        assert_eq!(content, "nexus-load:42:");
        assert_eq!(decode_content(&content), Some(42));
    }

    #[test]
    fn foreign_content_is_not_decoded() {
        assert_eq!(decode_content("hello"), None);
        assert_eq!(decode_content("nexus-load:abc:"), None);
    }
}
