//! Two users chatting: both directions, payload fields, wire formats, order,
//! across instances, and delivery of messages sent while the receiver was
//! offline.

use nexus_tests::client::exchange;
use nexus_tests::wire::{created_at, is_absent, message_id, rfc3339, str_field};
use nexus_tests::{tokens, System, EVENT_TIMEOUT, QUIET_PERIOD};
use serde_json::{json, Value};

#[tokio::test]
async fn connection_success_fields() {
    let system = System::start(1).await;
    let mut alice = system.connect_anonymous(0, "alice").await;
    let exp = tokens::now_s() + 1800;
    let success = alice
        .authenticate("alice", &tokens::expiring_at("alice", exp))
        .await;

    assert_eq!(str_field(&success, "userId"), "alice");
    assert!(
        !str_field(&success, "connectionId").is_empty(),
        "connectionId is empty in {success}"
    );
    assert_eq!(str_field(&success, "instanceId"), "test-a");
    let expires_at = rfc3339(&success, "expiresAt");
    assert!(
        (expires_at.timestamp() - exp).abs() <= 1,
        "expiresAt {expires_at} is not the token's exp {exp}"
    );
}

#[tokio::test]
async fn two_users_chat_both_directions() {
    let system = System::start(1).await;
    let mut alice = system.connect(0, "alice").await;
    let mut bob = system.connect(0, "bob").await;

    alice
        .send(
            "NEW_MESSAGE",
            json!({"receiverId": "bob", "content": "hello bob", "clientMessageId": "c-1"}),
        )
        .await;
    let sent = alice.recv_event("MESSAGE_SENT", EVENT_TIMEOUT).await;
    let first_id = message_id(&sent, "messageId");
    assert_eq!(str_field(&sent, "clientMessageId"), "c-1");
    let sent_at = created_at(&sent, "createdAt");

    let received = bob.recv_event("NEW_MESSAGE", EVENT_TIMEOUT).await;
    assert_eq!(message_id(&received, "messageId"), first_id);
    assert_eq!(str_field(&received, "senderId"), "alice");
    assert_eq!(str_field(&received, "receiverId"), "bob");
    assert_eq!(str_field(&received, "content"), "hello bob");
    assert_eq!(created_at(&received, "createdAt"), sent_at);
    assert!(
        is_absent(&received, "clientMessageId") || str_field(&received, "clientMessageId") == "c-1",
        "NEW_MESSAGE carries another clientMessageId: {received}"
    );
    alice.expect_no_event("NEW_MESSAGE", QUIET_PERIOD).await;

    bob.send(
        "NEW_MESSAGE",
        json!({"receiverId": "alice", "content": "hi alice, ünïcødé ✓"}),
    )
    .await;
    let reply_sent = bob.recv_event("MESSAGE_SENT", EVENT_TIMEOUT).await;
    let second_id = message_id(&reply_sent, "messageId");
    assert!(
        is_absent(&reply_sent, "clientMessageId"),
        "MESSAGE_SENT has a clientMessageId that was never sent: {reply_sent}"
    );
    let reply = alice.recv_event("NEW_MESSAGE", EVENT_TIMEOUT).await;
    assert_eq!(message_id(&reply, "messageId"), second_id);
    assert_eq!(str_field(&reply, "senderId"), "bob");
    assert_eq!(str_field(&reply, "receiverId"), "alice");
    assert_eq!(str_field(&reply, "content"), "hi alice, ünïcødé ✓");
    let reply_at = created_at(&reply, "createdAt");
    bob.expect_no_event("NEW_MESSAGE", QUIET_PERIOD).await;

    assert!(
        second_id > first_id,
        "ids {first_id} then {second_id} do not sort in creation order"
    );
    let first_number: u128 = first_id.parse().expect("message ids are decimal");
    let second_number: u128 = second_id.parse().expect("message ids are decimal");
    assert!(second_number > first_number);
    assert!(
        reply_at >= sent_at,
        "createdAt went back from {sent_at} to {reply_at}"
    );

    assert_eq!(system.message_count().await, 2);
}

#[tokio::test]
async fn chat_across_instances() {
    let system = System::start(2).await;
    let mut alice = system.connect(0, "alice").await;
    let mut bob = system.connect(1, "bob").await;

    let to_bob = exchange(&mut alice, &mut bob, "from instance a").await;
    assert_eq!(str_field(&to_bob, "senderId"), "alice");
    assert_eq!(str_field(&to_bob, "receiverId"), "bob");
    created_at(&to_bob, "createdAt");

    let to_alice = exchange(&mut bob, &mut alice, "from instance b").await;
    assert_eq!(str_field(&to_alice, "senderId"), "bob");
    assert!(message_id(&to_alice, "messageId") > message_id(&to_bob, "messageId"));

    alice.expect_no_event("NEW_MESSAGE", QUIET_PERIOD).await;
    bob.expect_no_event("NEW_MESSAGE", QUIET_PERIOD).await;
    assert_eq!(system.message_count().await, 2);
}

#[tokio::test]
async fn messages_to_offline_user_delivered_on_connect() {
    let system = System::start(2).await;
    let mut alice = system.connect(0, "alice").await;
    let mut ids = Vec::new();
    for index in 0..3 {
        let sent = alice
            .send_message_to("bob", &format!("while away {index}"), None)
            .await;
        ids.push(message_id(&sent, "messageId"));
    }

    // An old client sends no lastMessageId and still gets what it missed.
    let mut bob = system.connect(1, "bob").await;
    for (index, id) in ids.iter().enumerate() {
        let delivered = bob.recv_event("NEW_MESSAGE", EVENT_TIMEOUT).await;
        assert_eq!(
            &message_id(&delivered, "messageId"),
            id,
            "message {index} out of order"
        );
        assert_eq!(
            str_field(&delivered, "content"),
            format!("while away {index}")
        );
        assert_eq!(str_field(&delivered, "senderId"), "alice");
    }
    bob.expect_no_event("NEW_MESSAGE", QUIET_PERIOD).await;
}

#[tokio::test]
async fn last_message_id_delivers_only_later_messages() {
    let system = System::start(1).await;
    let mut alice = system.connect(0, "alice").await;
    let mut ids = Vec::new();
    for index in 0..3 {
        let sent = alice
            .send_message_to("bob", &format!("catch-up {index}"), None)
            .await;
        ids.push(message_id(&sent, "messageId"));
    }

    let mut bob = system.connect_anonymous(0, "bob").await;
    bob.send(
        "authenticate",
        json!({"userId": "bob", "token": tokens::valid("bob"), "lastMessageId": ids[0]}),
    )
    .await;
    bob.recv_event("CONNECTION_SUCCESS", EVENT_TIMEOUT).await;
    for id in &ids[1..] {
        let delivered = bob.recv_event("NEW_MESSAGE", EVENT_TIMEOUT).await;
        assert_eq!(&message_id(&delivered, "messageId"), id);
    }
    let first = ids[0].clone();
    bob.expect_no_matching("NEW_MESSAGE", QUIET_PERIOD, |data: &Value| {
        data.get("messageId").and_then(Value::as_str) == Some(first.as_str())
    })
    .await;
}
