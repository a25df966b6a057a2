//! Order: one sender's messages reach the receiver in the order sent, across
//! instances, even when the sender does not wait between them.

use std::time::Duration;

use nexus_tests::wire::{message_id, str_field};
use nexus_tests::System;
use serde_json::{json, Value};

const COUNT: usize = 50;

/// Bound on all 50 replies, generous for a loaded 2-core machine.
const ALL_REPLIES_TIMEOUT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn fifty_messages_keep_order_across_instances() {
    let system = System::start(2).await;
    let mut alice = system.connect(0, "alice").await;
    let mut bob = system.connect(1, "bob").await;

    for index in 0..COUNT {
        alice
            .send(
                "NEW_MESSAGE",
                json!({
                    "receiverId": "bob",
                    "content": format!("msg-{index:02}"),
                    "clientMessageId": format!("order-{index:02}"),
                }),
            )
            .await;
    }

    let mut sent_ids = Vec::with_capacity(COUNT);
    for index in 0..COUNT {
        let sent = alice.recv_event("MESSAGE_SENT", ALL_REPLIES_TIMEOUT).await;
        assert_eq!(
            str_field(&sent, "clientMessageId"),
            format!("order-{index:02}"),
            "MESSAGE_SENT {index} is out of order"
        );
        sent_ids.push(message_id(&sent, "messageId"));
    }
    for pair in sent_ids.windows(2) {
        assert!(
            pair[0] < pair[1],
            "message ids {} then {} do not increase",
            pair[0],
            pair[1]
        );
    }

    for (index, expected_id) in sent_ids.iter().enumerate() {
        let delivered = bob.recv_event("NEW_MESSAGE", ALL_REPLIES_TIMEOUT).await;
        assert_eq!(
            str_field(&delivered, "content"),
            format!("msg-{index:02}"),
            "NEW_MESSAGE {index} is out of order"
        );
        assert_eq!(&message_id(&delivered, "messageId"), expected_id);
    }
    assert_eq!(
        system.message_count().await,
        i64::try_from(COUNT).unwrap_or(i64::MAX)
    );

    // History returns the same messages, newest first.
    let token = system.token("bob");
    let response = system
        .http_get(1, &format!("/messages/alice?limit={COUNT}"), Some(&token))
        .await;
    assert_eq!(response.status, 200, "{}", response.body);
    let body = response.json();
    let history: Vec<String> = body["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("no messages array in {body}"))
        .iter()
        .map(|message: &Value| message_id(message, "messageId"))
        .collect();
    let mut newest_first = sent_ids.clone();
    newest_first.reverse();
    assert_eq!(history, newest_first);
}
