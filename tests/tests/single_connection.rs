//! One connection per user: a new authenticated connection closes the older
//! one with 4001, on any instance, without showing the user offline.

use nexus_tests::client::exchange;
use nexus_tests::{Client, System, EVENT_TIMEOUT, QUIET_PERIOD};
use serde_json::Value;

fn offline_of(user: &str) -> impl Fn(&Value) -> bool + '_ {
    move |data: &Value| {
        data.get("userId").and_then(Value::as_str) == Some(user)
            && data.get("status").and_then(Value::as_str) == Some("offline")
    }
}

/// Connects bob a second time on `second_instance` and checks that the
/// first connection closes with 4001, alice receives no offline update, and
/// messages reach the new connection.
async fn assert_replaced(system: &System, first_instance: usize, second_instance: usize) {
    let mut alice = system.connect(0, "alice").await;
    let mut old_bob = system.connect(first_instance, "bob").await;
    exchange(&mut alice, &mut old_bob, "partners first").await;

    let mut new_bob = system.connect(second_instance, "bob").await;
    let close = old_bob.recv_close(EVENT_TIMEOUT).await;
    assert_eq!(close.code, Some(4001), "{close}");
    assert!(!close.reason.is_empty(), "close 4001 without a reason text");

    alice
        .expect_no_matching("USER_PRESENCE_UPDATE", QUIET_PERIOD, offline_of("bob"))
        .await;
    exchange(&mut alice, &mut new_bob, "to the new connection").await;
    exchange(&mut new_bob, &mut alice, "from the new connection").await;

    // Closing the newest connection does show bob offline.
    new_bob.close().await;
    alice
        .recv_matching("USER_PRESENCE_UPDATE", EVENT_TIMEOUT, offline_of("bob"))
        .await;
}

#[tokio::test]
async fn newer_connection_replaces_older_same_instance() {
    let system = System::start(1).await;
    assert_replaced(&system, 0, 0).await;
}

#[tokio::test]
async fn newer_connection_replaces_older_across_instances() {
    let system = System::start(2).await;
    assert_replaced(&system, 0, 1).await;
}

#[tokio::test]
async fn handshake_token_also_replaces_older() {
    let system = System::start(2).await;
    let mut old_bob = system.connect(1, "bob").await;
    let header = format!("Bearer {}", system.token("bob"));
    let mut new_bob = Client::connect_with_headers(
        &system.host(0).ws_url(),
        &[("Authorization", &header)],
        "bob-header",
    )
    .await
    .expect("handshake with a valid bearer token");
    new_bob
        .recv_event("CONNECTION_SUCCESS", EVENT_TIMEOUT)
        .await;

    let close = old_bob.recv_close(EVENT_TIMEOUT).await;
    assert_eq!(close.code, Some(4001), "{close}");
    new_bob.health_check().await;
}
