//! Typing indicators: start and stop, the timeout, and clearing by a sent
//! message and by the sender's disconnect, on one instance and across two.

use std::time::{Duration, Instant};

use nexus_tests::wire::str_field;
use nexus_tests::{Client, Settings, System, EVENT_TIMEOUT, QUIET_PERIOD};
use serde_json::{json, Value};

/// Waits for `USER_TYPING` about `user` with `isTyping` equal to `typing`.
async fn recv_typing(client: &mut Client, user: &str, typing: bool, timeout: Duration) -> Value {
    let user = user.to_owned();
    let data = client
        .recv_matching("USER_TYPING", timeout, move |data: &Value| {
            data.get("userId").and_then(Value::as_str) == Some(user.as_str())
                && data.get("isTyping") == Some(&json!(typing))
        })
        .await;
    assert!(
        data["isTyping"].is_boolean(),
        "isTyping is not a boolean: {data}"
    );
    data
}

/// Settings with a typing timeout long enough that it never fires during a
/// test that clears the indicator some other way.
fn long_typing_timeout() -> Settings {
    Settings::default().variable("typing_timeout_ms", 30_000)
}

#[tokio::test]
async fn typing_start_and_stop() {
    let system = System::start_with(1, long_typing_timeout()).await;
    let mut alice = system.connect(0, "alice").await;
    let mut bob = system.connect(0, "bob").await;

    alice
        .send("TYPING_START", json!({"receiverId": "bob"}))
        .await;
    let started = recv_typing(&mut bob, "alice", true, EVENT_TIMEOUT).await;
    assert_eq!(str_field(&started, "userId"), "alice");
    bob.expect_no_event("USER_TYPING", QUIET_PERIOD).await;

    alice
        .send("TYPING_STOP", json!({"receiverId": "bob"}))
        .await;
    recv_typing(&mut bob, "alice", false, EVENT_TIMEOUT).await;
    alice.health_check().await;
}

#[tokio::test]
async fn typing_across_instances() {
    let system = System::start_with(2, long_typing_timeout()).await;
    let mut alice = system.connect(0, "alice").await;
    let mut bob = system.connect(1, "bob").await;

    alice
        .send("TYPING_START", json!({"receiverId": "bob"}))
        .await;
    recv_typing(&mut bob, "alice", true, EVENT_TIMEOUT).await;
    alice
        .send("TYPING_STOP", json!({"receiverId": "bob"}))
        .await;
    recv_typing(&mut bob, "alice", false, EVENT_TIMEOUT).await;

    bob.send("TYPING_START", json!({"receiverId": "alice"}))
        .await;
    recv_typing(&mut alice, "bob", true, EVENT_TIMEOUT).await;
}

#[tokio::test]
async fn typing_cleared_by_timeout() {
    let timeout_ms = 800;
    let system = System::start_with(
        1,
        Settings::default().variable("typing_timeout_ms", timeout_ms),
    )
    .await;
    let mut alice = system.connect(0, "alice").await;
    let mut bob = system.connect(0, "bob").await;

    alice
        .send("TYPING_START", json!({"receiverId": "bob"}))
        .await;
    recv_typing(&mut bob, "alice", true, EVENT_TIMEOUT).await;
    let started = Instant::now();
    recv_typing(
        &mut bob,
        "alice",
        false,
        Duration::from_millis(timeout_ms) + EVENT_TIMEOUT,
    )
    .await;
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(timeout_ms / 2),
        "typing cleared after {elapsed:?}, well before typing_timeout_ms {timeout_ms}"
    );
}

#[tokio::test]
async fn typing_cleared_by_sent_message() {
    let system = System::start_with(1, long_typing_timeout()).await;
    let mut alice = system.connect(0, "alice").await;
    let mut bob = system.connect(0, "bob").await;

    alice
        .send("TYPING_START", json!({"receiverId": "bob"}))
        .await;
    recv_typing(&mut bob, "alice", true, EVENT_TIMEOUT).await;
    alice.send_message_to("bob", "done typing", None).await;
    bob.recv_event("NEW_MESSAGE", EVENT_TIMEOUT).await;
    recv_typing(&mut bob, "alice", false, EVENT_TIMEOUT).await;
}

#[tokio::test]
async fn typing_cleared_by_sender_disconnect() {
    let system = System::start_with(2, long_typing_timeout()).await;
    let mut alice = system.connect(0, "alice").await;
    let mut bob = system.connect(1, "bob").await;

    alice
        .send("TYPING_START", json!({"receiverId": "bob"}))
        .await;
    recv_typing(&mut bob, "alice", true, EVENT_TIMEOUT).await;
    alice.close().await;
    recv_typing(&mut bob, "alice", false, EVENT_TIMEOUT).await;

    // Also when the connection drops without a close frame.
    let mut alice = system.connect(0, "alice").await;
    alice
        .send("TYPING_START", json!({"receiverId": "bob"}))
        .await;
    recv_typing(&mut bob, "alice", true, EVENT_TIMEOUT).await;
    drop(alice);
    recv_typing(&mut bob, "alice", false, EVENT_TIMEOUT).await;
}
