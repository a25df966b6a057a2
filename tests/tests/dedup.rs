//! Deduplication by `clientMessageId`: a repeat gets the original
//! `MESSAGE_SENT` and is stored and delivered once, and a retry after a
//! handler that trapped after storing ends with one message.

use nexus_tests::wire::{message_id, str_field};
use nexus_tests::{Settings, System, EVENT_TIMEOUT, QUIET_PERIOD};
use serde_json::{json, Value};

#[tokio::test]
async fn repeat_gets_original_message_sent() {
    let system = System::start(2).await;
    let mut alice = system.connect(0, "alice").await;
    let mut bob = system.connect(0, "bob").await;

    let original = alice
        .send_message_to("bob", "first content", Some("dup-1"))
        .await;
    let original_id = message_id(&original, "messageId");
    assert_eq!(str_field(&original, "clientMessageId"), "dup-1");
    let delivered = bob.recv_event("NEW_MESSAGE", EVENT_TIMEOUT).await;
    assert_eq!(str_field(&delivered, "content"), "first content");

    // Same clientMessageId, other content: the original reply, no delivery.
    let repeat = alice
        .send_message_to("bob", "second content", Some("dup-1"))
        .await;
    assert_eq!(message_id(&repeat, "messageId"), original_id);
    assert_eq!(str_field(&repeat, "clientMessageId"), "dup-1");
    assert_eq!(
        repeat.get("createdAt"),
        original.get("createdAt"),
        "{repeat} vs {original}"
    );
    bob.expect_no_event("NEW_MESSAGE", QUIET_PERIOD).await;

    // Also from a new connection on the other instance.
    alice.close().await;
    let mut alice = system.connect(1, "alice").await;
    let again = alice
        .send_message_to("bob", "third content", Some("dup-1"))
        .await;
    assert_eq!(message_id(&again, "messageId"), original_id);
    bob.expect_no_event("NEW_MESSAGE", QUIET_PERIOD).await;
    assert_eq!(system.message_count().await, 1);

    // Another clientMessageId is another message.
    let other = alice.send_message_to("bob", "new one", Some("dup-2")).await;
    assert_ne!(message_id(&other, "messageId"), original_id);
    let delivered = bob.recv_event("NEW_MESSAGE", EVENT_TIMEOUT).await;
    assert_eq!(str_field(&delivered, "content"), "new one");
    assert_eq!(system.message_count().await, 2);
}

#[tokio::test]
async fn client_message_id_is_per_sender() {
    let system = System::start(1).await;
    let mut alice = system.connect(0, "alice").await;
    let mut bob = system.connect(0, "bob").await;

    let from_alice = alice
        .send_message_to("bob", "alice says", Some("shared-id"))
        .await;
    bob.recv_event("NEW_MESSAGE", EVENT_TIMEOUT).await;
    let from_bob = bob
        .send_message_to("alice", "bob says", Some("shared-id"))
        .await;
    let delivered = alice.recv_event("NEW_MESSAGE", EVENT_TIMEOUT).await;

    assert_ne!(
        message_id(&from_alice, "messageId"),
        message_id(&from_bob, "messageId")
    );
    assert_eq!(str_field(&delivered, "content"), "bob says");
    assert_eq!(system.message_count().await, 2);
}

#[tokio::test]
async fn stale_dedup_key_stores_new_message() {
    let system = System::start(1).await;
    let mut alice = system.connect(0, "alice").await;
    let mut bob = system.connect(0, "bob").await;
    // A dedup key that names no stored message of alice's, as a key left
    // by another sender whose ids contain `:` would.
    let stale_id = "00000000000000099999";
    let reply = system
        .redis()
        .command(&["SET", "nexus:dedup:alice:stale-1", stale_id]);
    assert_eq!(reply, "OK");

    let sent = alice
        .send_message_to("bob", "after a stale key", Some("stale-1"))
        .await;
    let id = message_id(&sent, "messageId");
    assert_ne!(id, stale_id);
    let delivered = bob.recv_event("NEW_MESSAGE", EVENT_TIMEOUT).await;
    assert_eq!(message_id(&delivered, "messageId"), id);
    assert_eq!(system.message_count().await, 1);
    // Counted once against the rate limit, and the key now names it.
    let counted = system.redis().command(&["GET", "nexus:rate:msg:alice"]);
    assert_eq!(counted, "1");
    let key = system
        .redis()
        .command(&["GET", "nexus:dedup:alice:stale-1"]);
    assert_eq!(key, id);

    let repeat = alice
        .send_message_to("bob", "after a stale key", Some("stale-1"))
        .await;
    assert_eq!(message_id(&repeat, "messageId"), id);
    bob.expect_no_event("NEW_MESSAGE", QUIET_PERIOD).await;
    assert_eq!(system.message_count().await, 1);
}

#[tokio::test]
async fn retry_after_trap_after_store_delivers_once() {
    let system = System::start_with(1, Settings::default().with_faults()).await;
    let mut alice = system.connect(0, "alice").await;
    let mut bob = system.connect(0, "bob").await;
    let content = "!fault:trap-after-store";

    alice
        .send(
            "NEW_MESSAGE",
            json!({"receiverId": "bob", "content": content, "clientMessageId": "retry-1"}),
        )
        .await;
    let error = alice.recv_event("ERROR", EVENT_TIMEOUT).await;
    assert_eq!(str_field(&error, "code"), "HANDLER_FAILED", "{error}");
    assert_eq!(str_field(&error, "event"), "NEW_MESSAGE", "{error}");
    alice.expect_no_event("MESSAGE_SENT", QUIET_PERIOD).await;
    bob.expect_no_event("NEW_MESSAGE", QUIET_PERIOD).await;

    let sent = alice.send_message_to("bob", content, Some("retry-1")).await;
    let id = message_id(&sent, "messageId");
    let delivered = bob.recv_event("NEW_MESSAGE", EVENT_TIMEOUT).await;
    assert_eq!(message_id(&delivered, "messageId"), id);
    assert_eq!(str_field(&delivered, "content"), content);
    bob.expect_no_event("NEW_MESSAGE", QUIET_PERIOD).await;
    assert_eq!(system.message_count().await, 1);

    // One more retry changes nothing.
    let again = alice.send_message_to("bob", content, Some("retry-1")).await;
    assert_eq!(message_id(&again, "messageId"), id);
    bob.expect_no_matching("NEW_MESSAGE", QUIET_PERIOD, |data: &Value| {
        data.get("content").and_then(Value::as_str) == Some(content)
    })
    .await;
    assert_eq!(system.message_count().await, 1);
}
