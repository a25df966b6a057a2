//! Rate limits: messages per user (over reconnects and instances, with a
//! block), typing and online-user limits without a block, and the frame rate
//! per connection.

use std::time::Duration;

use nexus_tests::wire::{int_field, str_field};
use nexus_tests::{Client, Settings, System, EVENT_TIMEOUT, QUIET_PERIOD};
use serde_json::{json, Value};

/// Sends a message and returns the name and data of the reply: either
/// `MESSAGE_SENT` or `RATE_LIMIT_EXCEEDED` (any other reply fails the test).
async fn send_and_classify(client: &mut Client, receiver: &str, content: &str) -> (String, Value) {
    client
        .send(
            "NEW_MESSAGE",
            json!({"receiverId": receiver, "content": content}),
        )
        .await;
    loop {
        let event = client.next_event(EVENT_TIMEOUT).await.unwrap_or_else(|| {
            panic!("no reply to NEW_MESSAGE {content:?} within {EVENT_TIMEOUT:?}")
        });
        match event.name.as_str() {
            "MESSAGE_SENT" | "RATE_LIMIT_EXCEEDED" => return (event.name, event.data),
            "ERROR" => panic!("NEW_MESSAGE {content:?} got ERROR {}", event.data),
            _ => {}
        }
    }
}

/// Asserts the fields of a `RATE_LIMIT_EXCEEDED` and returns `retryAfter`.
fn assert_rate_limited(data: &Value, event: &str, max_retry_after: i64) -> i64 {
    assert!(
        !str_field(data, "error").is_empty(),
        "empty error text in {data}"
    );
    assert_eq!(str_field(data, "event"), event, "{data}");
    let retry_after = int_field(data, "retryAfter");
    assert!(
        (1..=max_retry_after).contains(&retry_after),
        "retryAfter {retry_after} is outside 1..={max_retry_after} s: {data}"
    );
    retry_after
}

fn content_is(content: &str) -> impl Fn(&Value) -> bool + '_ {
    move |data: &Value| data.get("content").and_then(Value::as_str) == Some(content)
}

#[tokio::test]
async fn message_limit_counts_across_reconnect_and_instances() {
    let settings = Settings::default()
        .variable("message_rate_limit", 5)
        .variable("message_rate_window_s", 60)
        .variable("message_block_s", 3);
    let system = System::start_with(2, settings).await;
    let mut bob = system.connect(1, "bob").await;

    let mut alice = system.connect(0, "alice").await;
    for index in 0..3 {
        let (name, data) = send_and_classify(&mut alice, "bob", &format!("m{index}")).await;
        assert_eq!(name, "MESSAGE_SENT", "message {index}: {data}");
    }
    alice.close().await;

    // The count carries over to a new connection on the other instance.
    let mut alice = system.connect(1, "alice").await;
    for index in 3..5 {
        let (name, data) = send_and_classify(&mut alice, "bob", &format!("m{index}")).await;
        assert_eq!(name, "MESSAGE_SENT", "message {index}: {data}");
    }
    let (name, data) = send_and_classify(&mut alice, "bob", "m5").await;
    assert_eq!(
        name, "RATE_LIMIT_EXCEEDED",
        "the sixth message was accepted: {data}"
    );
    assert_rate_limited(&data, "NEW_MESSAGE", 3);

    for index in 0..5 {
        bob.recv_matching(
            "NEW_MESSAGE",
            EVENT_TIMEOUT,
            content_is(&format!("m{index}")),
        )
        .await;
    }
    bob.expect_no_matching("NEW_MESSAGE", QUIET_PERIOD, content_is("m5"))
        .await;

    // The block holds on a new connection back on the first instance.
    alice.close().await;
    let mut alice = system.connect(0, "alice").await;
    let (name, data) = send_and_classify(&mut alice, "bob", "m6").await;
    assert_eq!(
        name, "RATE_LIMIT_EXCEEDED",
        "a blocked user sent a message: {data}"
    );
    assert_rate_limited(&data, "NEW_MESSAGE", 3);
    bob.expect_no_matching("NEW_MESSAGE", QUIET_PERIOD, content_is("m6"))
        .await;

    assert_eq!(system.message_count().await, 5);
}

#[tokio::test]
async fn message_limit_lifts_after_block_and_window() {
    let settings = Settings::default()
        .variable("message_rate_limit", 3)
        .variable("message_rate_window_s", 2)
        .variable("message_block_s", 2);
    let system = System::start_with(1, settings).await;
    let mut alice = system.connect(0, "alice").await;
    let mut bob = system.connect(0, "bob").await;

    for index in 0..3 {
        let (name, data) = send_and_classify(&mut alice, "bob", &format!("w{index}")).await;
        assert_eq!(name, "MESSAGE_SENT", "message {index}: {data}");
    }
    let (name, data) = send_and_classify(&mut alice, "bob", "w3").await;
    assert_eq!(name, "RATE_LIMIT_EXCEEDED", "{data}");
    let retry_after = assert_rate_limited(&data, "NEW_MESSAGE", 2);

    // Other events are not blocked.
    alice.health_check().await;

    let wait_s = u64::try_from(retry_after.max(2)).unwrap_or(2) + 1;
    tokio::time::sleep(Duration::from_secs(wait_s)).await;
    let (name, data) = send_and_classify(&mut alice, "bob", "w4").await;
    assert_eq!(
        name, "MESSAGE_SENT",
        "still limited {wait_s} s after the block: {data}"
    );
    bob.recv_matching("NEW_MESSAGE", EVENT_TIMEOUT, content_is("w4"))
        .await;
    assert_eq!(system.message_count().await, 4);
}

#[tokio::test]
async fn typing_limit_rejects_without_block() {
    let settings = Settings::default()
        .variable("typing_rate_limit", 3)
        .variable("typing_rate_window_s", 2)
        .variable("typing_timeout_ms", 30_000);
    let system = System::start_with(1, settings).await;
    let mut alice = system.connect(0, "alice").await;
    let mut bob = system.connect(0, "bob").await;

    for _ in 0..3 {
        alice
            .send("TYPING_START", json!({"receiverId": "bob"}))
            .await;
    }
    alice
        .send("TYPING_START", json!({"receiverId": "bob"}))
        .await;
    let limited = alice.recv_event("RATE_LIMIT_EXCEEDED", EVENT_TIMEOUT).await;
    assert_rate_limited(&limited, "TYPING_START", 2);
    bob.recv_event("USER_TYPING", EVENT_TIMEOUT).await;

    // Typing limits do not stop messages.
    let (name, data) = send_and_classify(&mut alice, "bob", "typed too much").await;
    assert_eq!(name, "MESSAGE_SENT", "{data}");

    // Once the window has passed, typing events are handled again.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    alice
        .send("TYPING_STOP", json!({"receiverId": "bob"}))
        .await;
    bob.recv_matching("USER_TYPING", EVENT_TIMEOUT, |data: &Value| {
        data["isTyping"] == json!(false)
    })
    .await;
    alice
        .expect_no_event("RATE_LIMIT_EXCEEDED", QUIET_PERIOD)
        .await;
}

#[tokio::test]
async fn online_users_limit_rejects_without_block() {
    let settings = Settings::default()
        .variable("online_users_rate_limit", 2)
        .variable("online_users_rate_window_s", 2);
    let system = System::start_with(1, settings).await;
    let mut alice = system.connect(0, "alice").await;

    for _ in 0..2 {
        alice.send_without_data("GET_ONLINE_USERS").await;
        alice.recv_event("ONLINE_USERS", EVENT_TIMEOUT).await;
    }
    alice.send_without_data("GET_ONLINE_USERS").await;
    let limited = alice.recv_event("RATE_LIMIT_EXCEEDED", EVENT_TIMEOUT).await;
    assert_rate_limited(&limited, "GET_ONLINE_USERS", 2);

    tokio::time::sleep(Duration::from_millis(2500)).await;
    alice.send_without_data("GET_ONLINE_USERS").await;
    alice.recv_event("ONLINE_USERS", EVENT_TIMEOUT).await;
}

#[tokio::test]
async fn frame_rate_per_connection_limited() {
    let system = System::start_with(1, Settings::default().env("MAX_EVENTS_PER_SECOND", 5)).await;
    let mut alice = system.connect(0, "alice").await;
    let mut bob = system.connect(0, "bob").await;

    let burst = 30;
    for _ in 0..burst {
        alice.send_without_data("HEALTH_CHECK").await;
    }
    let mut handled = 0;
    let mut limited = 0;
    while handled + limited < burst {
        let event = alice
            .next_event(EVENT_TIMEOUT)
            .await
            .unwrap_or_else(|| panic!("{handled} handled and {limited} limited of {burst} frames"));
        match event.name.as_str() {
            "HEALTH_STATUS" => handled += 1,
            "ERROR" => {
                assert_eq!(
                    str_field(&event.data, "code"),
                    "RATE_LIMITED",
                    "{}",
                    event.data
                );
                limited += 1;
            }
            _ => {}
        }
    }
    assert!(
        limited > 0,
        "none of {burst} frames sent at once was rate limited"
    );
    assert!(
        handled > 0,
        "every frame was rate limited, bursts of up to 10 should pass"
    );

    // Another connection is not affected, and the limit refills.
    bob.health_check().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    alice.health_check().await;
}

/// Binary frames, which are invalid, count against the frame budget like
/// text frames.
#[tokio::test]
async fn binary_frames_count_against_frame_rate() {
    let system = System::start_with(1, Settings::default().env("MAX_EVENTS_PER_SECOND", 5)).await;
    let mut alice = system.connect(0, "alice").await;

    let burst = 30;
    for _ in 0..burst {
        alice.send_binary(vec![1, 2, 3]).await;
    }
    let mut invalid = 0;
    let mut limited = 0;
    while invalid + limited < burst {
        let event = alice
            .next_event(EVENT_TIMEOUT)
            .await
            .unwrap_or_else(|| panic!("{invalid} invalid and {limited} limited of {burst} frames"));
        assert_eq!(event.name, "ERROR", "{}", event.data);
        match str_field(&event.data, "code") {
            "INVALID_FRAME" => invalid += 1,
            "RATE_LIMITED" => limited += 1,
            other => panic!("unexpected error code {other}: {}", event.data),
        }
    }
    assert!(
        limited > 0,
        "none of {burst} binary frames sent at once was rate limited"
    );
}
