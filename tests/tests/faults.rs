//! Handler faults: a trap and a deadline overrun become `ERROR` for that
//! client only, and the next event on the same connection succeeds.

use std::time::{Duration, Instant};

use nexus_tests::client::exchange;
use nexus_tests::wire::str_field;
use nexus_tests::{Settings, System, EVENT_TIMEOUT, QUIET_PERIOD};
use serde_json::{json, Value};

#[tokio::test]
async fn trapping_handler_returns_handler_failed() {
    let system = System::start_with(1, Settings::default().with_faults()).await;
    let mut alice = system.connect(0, "alice").await;
    let mut bob = system.connect(0, "bob").await;

    alice
        .send(
            "NEW_MESSAGE",
            json!({"receiverId": "bob", "content": "!fault:trap"}),
        )
        .await;
    let error = alice.recv_event("ERROR", EVENT_TIMEOUT).await;
    assert_eq!(str_field(&error, "code"), "HANDLER_FAILED", "{error}");
    assert_eq!(str_field(&error, "event"), "NEW_MESSAGE", "{error}");
    bob.expect_no_event("NEW_MESSAGE", QUIET_PERIOD).await;

    exchange(&mut alice, &mut bob, "after the trap").await;
    exchange(&mut bob, &mut alice, "bob after the trap").await;
    assert_eq!(system.message_count().await, 2);
}

#[tokio::test]
async fn deadline_overrun_returns_handler_timeout() {
    let deadline_ms = 2000;
    let settings = Settings::default()
        .with_faults()
        .env("HANDLER_DEADLINE_MS", deadline_ms);
    let system = System::start_with(1, settings).await;
    let mut alice = system.connect(0, "alice").await;
    let mut bob = system.connect(0, "bob").await;

    let started = Instant::now();
    alice
        .send(
            "NEW_MESSAGE",
            json!({"receiverId": "bob", "content": "!fault:spin"}),
        )
        .await;

    // Other connections are served while alice's handler spins.
    bob.health_check().await;
    let bob_elapsed = started.elapsed();
    assert!(
        bob_elapsed < Duration::from_millis(deadline_ms * 3 / 4),
        "bob's HEALTH_CHECK took {bob_elapsed:?} while another handler spun"
    );

    let error = alice
        .recv_event("ERROR", Duration::from_millis(deadline_ms) + EVENT_TIMEOUT)
        .await;
    let elapsed = started.elapsed();
    assert_eq!(str_field(&error, "code"), "HANDLER_TIMEOUT", "{error}");
    assert_eq!(str_field(&error, "event"), "NEW_MESSAGE", "{error}");
    assert!(
        elapsed >= Duration::from_millis(deadline_ms / 2),
        "HANDLER_TIMEOUT after {elapsed:?}, well before HANDLER_DEADLINE_MS {deadline_ms}"
    );
    bob.expect_no_event("NEW_MESSAGE", QUIET_PERIOD).await;

    exchange(&mut alice, &mut bob, "after the overrun").await;
    assert_eq!(system.message_count().await, 1);
}

#[tokio::test]
async fn fault_content_is_plain_text_when_faults_off() {
    let system = System::start(1).await;
    let mut alice = system.connect(0, "alice").await;
    let mut bob = system.connect(0, "bob").await;

    for content in ["!fault:trap", "!fault:spin", "!fault:trap-after-store"] {
        let delivered = exchange(&mut alice, &mut bob, content).await;
        assert_eq!(str_field(&delivered, "content"), content);
    }
    alice
        .expect_no_matching("ERROR", QUIET_PERIOD, |_: &Value| true)
        .await;
    assert_eq!(system.message_count().await, 3);
}
