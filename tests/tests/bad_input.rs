//! Malformed and hostile input: each gets a clear `ERROR` or close code, and
//! afterwards the same connection (when still open) and other connections
//! keep working.

use nexus_tests::client::{exchange, handshake_status};
use nexus_tests::wire::{is_absent, str_field};
use nexus_tests::{Client, Settings, System, EVENT_TIMEOUT, FRONTEND_ORIGIN, QUIET_PERIOD};
use serde_json::{json, Value};

/// `MAX_FRAME_BYTES` of the hosts in this file.
const MAX_FRAME_BYTES: usize = 8192;

fn settings() -> Settings {
    Settings::default().env("MAX_FRAME_BYTES", MAX_FRAME_BYTES)
}

enum Input {
    Text(String),
    Binary(Vec<u8>),
}

struct Case {
    name: &'static str,
    input: Input,
    code: &'static str,
    /// The expected `event` of the `ERROR`: `Some(None)` for `null`, `None`
    /// when the test does not check it.
    event: Option<Option<&'static str>>,
    /// A field name that the error message must contain.
    field: Option<&'static str>,
}

fn frame(event: &str, data: Value) -> Input {
    Input::Text(json!({"event": event, "data": data}).to_string())
}

fn text(raw: &str) -> Input {
    Input::Text(raw.to_owned())
}

fn invalid_json(name: &'static str, input: Input) -> Case {
    Case {
        name,
        input,
        code: "INVALID_JSON",
        event: Some(None),
        field: None,
    }
}

fn unknown_event(name: &'static str, event: &'static str) -> Case {
    Case {
        name,
        input: frame(event, json!({})),
        code: "UNKNOWN_EVENT",
        event: Some(Some(event)),
        field: None,
    }
}

fn invalid_field(
    name: &'static str,
    event: &'static str,
    data: Value,
    field: &'static str,
) -> Case {
    Case {
        name,
        input: frame(event, data),
        code: "VALIDATION_ERROR",
        event: Some(Some(event)),
        field: Some(field),
    }
}

fn cases() -> Vec<Case> {
    let long_id = "x".repeat(129);
    vec![
        invalid_json(
            "truncated JSON",
            text(r#"{"event": "NEW_MESSAGE", "data": "#),
        ),
        invalid_json("plain text", text("hello")),
        invalid_json("JSON array", text("[1, 2, 3]")),
        invalid_json("JSON string", text(r#""NEW_MESSAGE""#)),
        invalid_json("no event field", text(r#"{"data": {}}"#)),
        invalid_json("event not a string", text(r#"{"event": 42, "data": {}}"#)),
        unknown_event("unknown event", "SEND_MONEY"),
        unknown_event("lowercase event", "new_message"),
        unknown_event("reserved $connected", "$connected"),
        unknown_event("reserved $disconnected", "$disconnected"),
        unknown_event("reserved $typing-expired", "$typing-expired"),
        unknown_event("other reserved name", "$anything"),
        Case {
            name: "NEW_MESSAGE without data",
            input: text(r#"{"event": "NEW_MESSAGE"}"#),
            code: "VALIDATION_ERROR",
            event: Some(Some("NEW_MESSAGE")),
            field: None,
        },
        Case {
            name: "NEW_MESSAGE data not an object",
            input: frame("NEW_MESSAGE", json!("hello bob")),
            code: "VALIDATION_ERROR",
            event: Some(Some("NEW_MESSAGE")),
            field: None,
        },
        invalid_field(
            "missing receiverId",
            "NEW_MESSAGE",
            json!({"content": "hi"}),
            "receiverId",
        ),
        invalid_field(
            "receiverId a number",
            "NEW_MESSAGE",
            json!({"receiverId": 42, "content": "hi"}),
            "receiverId",
        ),
        invalid_field(
            "receiverId empty",
            "NEW_MESSAGE",
            json!({"receiverId": "", "content": "hi"}),
            "receiverId",
        ),
        invalid_field(
            "receiverId too long",
            "NEW_MESSAGE",
            json!({"receiverId": long_id, "content": "hi"}),
            "receiverId",
        ),
        invalid_field(
            "receiverId is the sender",
            "NEW_MESSAGE",
            json!({"receiverId": "alice", "content": "hi me"}),
            "receiverId",
        ),
        invalid_field(
            "missing content",
            "NEW_MESSAGE",
            json!({"receiverId": "bob"}),
            "content",
        ),
        invalid_field(
            "content a number",
            "NEW_MESSAGE",
            json!({"receiverId": "bob", "content": 7}),
            "content",
        ),
        invalid_field(
            "content empty",
            "NEW_MESSAGE",
            json!({"receiverId": "bob", "content": ""}),
            "content",
        ),
        Case {
            name: "content over 4096 bytes",
            input: frame(
                "NEW_MESSAGE",
                json!({"receiverId": "bob", "content": "a".repeat(4097)}),
            ),
            code: "CONTENT_TOO_LARGE",
            event: Some(Some("NEW_MESSAGE")),
            field: None,
        },
        Case {
            // 2049 two-byte characters: under 4096 characters, over 4096 bytes.
            name: "content over 4096 bytes in fewer characters",
            input: frame(
                "NEW_MESSAGE",
                json!({"receiverId": "bob", "content": "é".repeat(2049)}),
            ),
            code: "CONTENT_TOO_LARGE",
            event: Some(Some("NEW_MESSAGE")),
            field: None,
        },
        invalid_field(
            "clientMessageId a number",
            "NEW_MESSAGE",
            json!({"receiverId": "bob", "content": "hi", "clientMessageId": 5}),
            "clientMessageId",
        ),
        invalid_field(
            "clientMessageId empty",
            "NEW_MESSAGE",
            json!({"receiverId": "bob", "content": "hi", "clientMessageId": ""}),
            "clientMessageId",
        ),
        invalid_field(
            "clientMessageId too long",
            "NEW_MESSAGE",
            json!({"receiverId": "bob", "content": "hi", "clientMessageId": "c".repeat(129)}),
            "clientMessageId",
        ),
        invalid_field(
            "content with a NUL character",
            "NEW_MESSAGE",
            json!({"receiverId": "bob", "content": "a\u{0}b"}),
            "content",
        ),
        invalid_field(
            "receiverId with a NUL character",
            "NEW_MESSAGE",
            json!({"receiverId": "b\u{0}b", "content": "hi"}),
            "receiverId",
        ),
        invalid_field(
            "clientMessageId with a NUL character",
            "NEW_MESSAGE",
            json!({"receiverId": "bob", "content": "hi", "clientMessageId": "c\u{0}"}),
            "clientMessageId",
        ),
        invalid_field(
            "TYPING_START without receiverId",
            "TYPING_START",
            json!({}),
            "receiverId",
        ),
        invalid_field(
            "TYPING_STOP receiverId a list",
            "TYPING_STOP",
            json!({"receiverId": ["bob"]}),
            "receiverId",
        ),
        Case {
            name: "binary frame",
            input: Input::Binary(br#"{"event":"HEALTH_CHECK"}"#.to_vec()),
            code: "INVALID_FRAME",
            event: None,
            field: None,
        },
    ]
}

/// Checks that `alice`'s connection still works and that a new connection of
/// another user can chat with `bob`.
async fn assert_service_carries_on(
    system: &System,
    alice: Option<&mut Client>,
    bob: &mut Client,
    case: &str,
    guest: &str,
) {
    if let Some(alice) = alice {
        alice.health_check().await;
        exchange(alice, bob, &format!("alice after {case}")).await;
    }
    let mut other = system.connect(0, guest).await;
    exchange(&mut other, bob, &format!("{guest} after {case}")).await;
}

#[tokio::test]
async fn bad_frames_get_error_and_connection_survives() {
    let system = System::start_with(1, settings()).await;
    let mut alice = system.connect(0, "alice").await;
    let mut bob = system.connect(0, "bob").await;
    let mut delivered = 0;

    for (index, case) in cases().into_iter().enumerate() {
        match case.input {
            Input::Text(text) => alice.send_text(&text).await,
            Input::Binary(bytes) => alice.send_binary(bytes).await,
        }
        let error = alice.recv_event("ERROR", EVENT_TIMEOUT).await;
        let name = case.name;
        assert_eq!(str_field(&error, "code"), case.code, "case {name}: {error}");
        let message = str_field(&error, "message");
        assert!(!message.is_empty(), "case {name}: empty message in {error}");
        match case.event {
            Some(None) => assert!(
                is_absent(&error, "event"),
                "case {name}: event is not null in {error}"
            ),
            Some(Some(event)) => {
                assert_eq!(str_field(&error, "event"), event, "case {name}: {error}")
            }
            None => {}
        }
        if let Some(field) = case.field {
            assert!(
                message.contains(field),
                "case {name}: message {message:?} does not name {field}"
            );
        }

        let guest = format!("guest-{index}");
        assert_service_carries_on(&system, Some(&mut alice), &mut bob, name, &guest).await;
        delivered += 2;
    }

    bob.expect_no_event("NEW_MESSAGE", QUIET_PERIOD).await;
    assert_eq!(system.message_count().await, delivered);
}

#[tokio::test]
async fn boundary_values_accepted() {
    let system = System::start_with(1, settings()).await;
    let mut alice = system.connect(0, "alice").await;
    let mut bob = system.connect(0, "bob").await;

    let content = "b".repeat(4096);
    let sent = alice
        .send_message_to("bob", &content, Some(&"c".repeat(128)))
        .await;
    assert_eq!(str_field(&sent, "clientMessageId"), "c".repeat(128));
    let delivered = bob.recv_event("NEW_MESSAGE", EVENT_TIMEOUT).await;
    assert_eq!(str_field(&delivered, "content").len(), 4096);

    // A 128-character receiver who has never connected.
    alice
        .send_message_to(&"r".repeat(128), "hello stranger", None)
        .await;
    assert_eq!(system.message_count().await, 2);
}

#[tokio::test]
async fn oversize_frame_closes_1009() {
    let system = System::start_with(1, settings()).await;
    let mut bob = system.connect(0, "bob").await;
    let mut alice = system.connect(0, "alice").await;

    let big = json!({"event": "NEW_MESSAGE", "data": {"receiverId": "bob", "content": "z".repeat(MAX_FRAME_BYTES + 100)}});
    alice.send_text_lenient(&big.to_string()).await;
    let close = alice.recv_close(EVENT_TIMEOUT).await;
    assert_eq!(close.code, Some(1009), "{close}");

    bob.expect_no_event("NEW_MESSAGE", QUIET_PERIOD).await;
    assert_service_carries_on(&system, None, &mut bob, "an oversize frame", "alice").await;
}

#[tokio::test]
async fn oversize_fragmented_message_closes_1009() {
    let system = System::start_with(1, settings()).await;
    let mut bob = system.connect(0, "bob").await;
    let mut alice = system.connect(0, "alice").await;

    // Three fragments, each under MAX_FRAME_BYTES, together over it.
    let fragment = MAX_FRAME_BYTES / 2;
    alice.send_raw_text_frame(vec![b' '; fragment], false).await;
    alice
        .send_continuation_frame(vec![b' '; fragment], false)
        .await;
    alice
        .send_continuation_frame(vec![b' '; fragment], true)
        .await;
    let close = alice.recv_close(EVENT_TIMEOUT).await;
    assert_eq!(close.code, Some(1009), "{close}");

    assert_service_carries_on(&system, None, &mut bob, "an oversize message", "alice").await;
}

#[tokio::test]
async fn invalid_utf8_closes_1007() {
    let system = System::start_with(1, settings()).await;
    let mut bob = system.connect(0, "bob").await;
    let mut alice = system.connect(0, "alice").await;

    let mut payload = br#"{"event":"NEW_MESSAGE","data":{"receiverId":"bob","content":""#.to_vec();
    payload.extend_from_slice(&[0xff, 0xfe, 0xc3]);
    payload.extend_from_slice(br#""}}"#);
    alice.send_raw_text_frame(payload, true).await;
    let close = alice.recv_close(EVENT_TIMEOUT).await;
    assert_eq!(close.code, Some(1007), "{close}");

    bob.expect_no_event("NEW_MESSAGE", QUIET_PERIOD).await;
    assert_service_carries_on(&system, None, &mut bob, "invalid UTF-8", "alice").await;
}

#[tokio::test]
async fn foreign_origin_rejected_403() {
    let system = System::start_with(1, settings()).await;
    let mut bob = system.connect(0, "bob").await;
    let url = system.host(0).ws_url();

    let result =
        Client::connect_with_headers(&url, &[("Origin", "http://evil.test")], "foreign").await;
    let error = match result {
        Ok(_) => panic!("a handshake from a foreign Origin was accepted"),
        Err(error) => error,
    };
    assert_eq!(handshake_status(&error), Some(403), "{error}");

    // The allowed origin connects, and so does a native client without one.
    let mut browser = Client::connect_with_headers(&url, &[("Origin", FRONTEND_ORIGIN)], "browser")
        .await
        .expect("handshake from the allowed origin");
    browser.authenticate("alice", &system.token("alice")).await;
    exchange(&mut browser, &mut bob, "from the browser").await;

    assert_service_carries_on(&system, None, &mut bob, "a foreign origin", "carol").await;
}

/// Asserts that a connection over the per-address cap is rejected, either
/// by the handshake or by a prompt close, since the protocol allows both.
async fn assert_turned_away(url: &str, headers: &[(&str, &str)], label: &str) {
    match Client::connect_with_headers(url, headers, label).await {
        Err(error) => assert!(
            handshake_status(&error).is_some_and(|status| status >= 400),
            "{label}: the connection over the cap failed other than with an HTTP error: {error}"
        ),
        Ok(mut extra) => {
            let close = extra.recv_close(EVENT_TIMEOUT).await;
            assert!(
                close.code.is_some(),
                "{label}: the connection over the cap ended without a close code: {close}"
            );
        }
    }
}

#[tokio::test]
async fn connections_per_address_capped() {
    let system = System::start_with(1, settings().env("MAX_CONNECTIONS_PER_IP", 3)).await;
    let url = system.host(0).ws_url();
    let mut open = Vec::new();
    for index in 0..3 {
        open.push(system.connect(0, &format!("user-{index}")).await);
    }

    assert_turned_away(&url, &[], "over-the-cap").await;
    for client in &mut open {
        client.health_check().await;
    }

    // Closing one frees its place.
    open.pop()
        .expect("three connections are open")
        .close()
        .await;
    let mut attempts = 0;
    loop {
        match Client::connect_with_headers(&url, &[], "after-one-closed").await {
            Ok(mut client) => {
                client.authenticate("user-9", &system.token("user-9")).await;
                break;
            }
            Err(error) => {
                attempts += 1;
                assert!(attempts < 20, "no place freed 2 s after a close: {error}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// Connects `user` through a proxy that sent `chain` as `X-Forwarded-For`
/// and authenticates it.
async fn connect_forwarded(system: &System, chain: &str, user: &str) -> Client {
    let url = system.host(0).ws_url();
    let mut client = Client::connect_with_headers(&url, &[("X-Forwarded-For", chain)], user)
        .await
        .unwrap_or_else(|error| panic!("{user}: handshake under the cap failed: {error}"));
    client.authenticate(user, &system.token(user)).await;
    client
}

/// Behind a proxy, the cap counts the last `X-Forwarded-For` entry, which
/// the proxy wrote. An invalid last entry counts as the proxy's address, so
/// the addresses that a client writes before it cannot pass the cap.
#[tokio::test]
async fn forwarded_address_capped() {
    let system = System::start_with(
        1,
        settings()
            .env("MAX_CONNECTIONS_PER_IP", 2)
            .env("TRUST_FORWARDED_FOR", "true"),
    )
    .await;
    let url = system.host(0).ws_url();
    let mut open = vec![
        connect_forwarded(&system, "198.51.100.1, 192.0.2.7", "user-0").await,
        connect_forwarded(&system, "198.51.100.2, 192.0.2.7", "user-1").await,
    ];

    // The same client address, written with a port by the proxy.
    let chain = "203.0.113.9, 192.0.2.7:4711";
    assert_turned_away(&url, &[("X-Forwarded-For", chain)], "with a port").await;

    // Another client address behind the same proxy has its own cap.
    open.push(connect_forwarded(&system, "192.0.2.8", "other").await);

    // Invalid last entries count as the proxy's address, whatever the client
    // wrote before them.
    open.push(connect_forwarded(&system, "203.0.113.1, unknown", "unknown-1").await);
    open.push(connect_forwarded(&system, "203.0.113.2, unknown", "unknown-2").await);
    let chain = "203.0.113.99, unknown";
    assert_turned_away(&url, &[("X-Forwarded-For", chain)], "invalid last entry").await;
    let log = std::fs::read_to_string(system.host(0).log_path()).unwrap_or_default();
    assert!(
        log.contains("last X-Forwarded-For entry is not an address"),
        "the host logged no warning for the invalid entries"
    );

    for client in &mut open {
        client.health_check().await;
    }
}

/// A `lastMessageId` of 20 digits above the largest Postgres `bigint` is
/// rejected when the client authenticates, where the catch-up would
/// otherwise fail later with no reply.
#[tokio::test]
async fn last_message_id_beyond_bigint() {
    let system = System::start_with(1, settings()).await;
    let mut client = system.connect_anonymous(0, "alice").await;
    let data = json!({
        "userId": "alice",
        "token": system.token("alice"),
        "lastMessageId": "99999999999999999999",
    });
    client.send("authenticate", data).await;
    let error = client.recv_event("ERROR", EVENT_TIMEOUT).await;
    assert_eq!(str_field(&error, "code"), "VALIDATION_ERROR", "{error}");
    assert!(
        str_field(&error, "message").contains("lastMessageId"),
        "{error}"
    );
}
