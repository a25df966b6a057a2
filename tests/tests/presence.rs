//! Presence: online and offline updates to conversation partners (or to
//! everyone with `presence_reach = "broadcast"`), `GET_ONLINE_USERS`, across
//! instances, and after an instance dies.

use std::time::{Duration, Instant};

use nexus_tests::client::exchange;
use nexus_tests::matchers::presence_of;
use nexus_tests::wire::str_field;
use nexus_tests::{Client, Settings, System, EVENT_TIMEOUT, QUIET_PERIOD};
use serde_json::Value;

fn any_presence_of(user: &str) -> impl Fn(&Value) -> bool + '_ {
    move |data: &Value| data.get("userId").and_then(Value::as_str) == Some(user)
}

async fn recv_presence(client: &mut Client, user: &str, status: &str, timeout: Duration) {
    client
        .recv_matching("USER_PRESENCE_UPDATE", timeout, presence_of(user, status))
        .await;
}

/// Sends `GET_ONLINE_USERS` and returns the ids of `ONLINE_USERS`, checking
/// that the data is an array of distinct strings.
async fn online_users(client: &mut Client) -> Vec<String> {
    client.send_without_data("GET_ONLINE_USERS").await;
    let data = client.recv_event("ONLINE_USERS", EVENT_TIMEOUT).await;
    let ids: Vec<String> = data
        .as_array()
        .unwrap_or_else(|| panic!("ONLINE_USERS data is not an array: {data}"))
        .iter()
        .map(|id| {
            id.as_str()
                .unwrap_or_else(|| panic!("ONLINE_USERS holds a non-string {id}"))
                .to_owned()
        })
        .collect();
    let mut distinct = ids.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        ids.len(),
        "ONLINE_USERS repeats ids: {data}"
    );
    ids
}

#[tokio::test]
async fn presence_reaches_partners_only() {
    let system = System::start(1).await;
    let mut alice = system.connect(0, "alice").await;
    let mut bob = system.connect(0, "bob").await;
    exchange(&mut alice, &mut bob, "now we are partners").await;
    let mut carol = system.connect(0, "carol").await;

    bob.close().await;
    recv_presence(&mut alice, "bob", "offline", EVENT_TIMEOUT).await;

    let mut bob = system.connect(0, "bob").await;
    recv_presence(&mut alice, "bob", "online", EVENT_TIMEOUT).await;
    carol
        .expect_no_matching("USER_PRESENCE_UPDATE", QUIET_PERIOD, any_presence_of("bob"))
        .await;

    // Partnership goes both ways.
    alice.close().await;
    recv_presence(&mut bob, "alice", "offline", EVENT_TIMEOUT).await;
    carol
        .expect_no_matching(
            "USER_PRESENCE_UPDATE",
            QUIET_PERIOD,
            any_presence_of("alice"),
        )
        .await;
}

#[tokio::test]
async fn presence_broadcast_reach() {
    let system = System::start_with(
        1,
        Settings::default().variable("presence_reach", "broadcast"),
    )
    .await;
    let mut alice = system.connect(0, "alice").await;
    let mut carol = system.connect(0, "carol").await;

    let dave = system.connect(0, "dave").await;
    recv_presence(&mut alice, "dave", "online", EVENT_TIMEOUT).await;
    recv_presence(&mut carol, "dave", "online", EVENT_TIMEOUT).await;

    dave.close().await;
    recv_presence(&mut alice, "dave", "offline", EVENT_TIMEOUT).await;
    recv_presence(&mut carol, "dave", "offline", EVENT_TIMEOUT).await;
}

#[tokio::test]
async fn presence_across_instances() {
    let system = System::start(2).await;
    let mut alice = system.connect(0, "alice").await;
    let mut bob = system.connect(1, "bob").await;
    exchange(&mut alice, &mut bob, "partners across instances").await;

    bob.close().await;
    recv_presence(&mut alice, "bob", "offline", EVENT_TIMEOUT).await;
    let mut bob = system.connect(1, "bob").await;
    recv_presence(&mut alice, "bob", "online", EVENT_TIMEOUT).await;

    alice.close().await;
    recv_presence(&mut bob, "alice", "offline", EVENT_TIMEOUT).await;
}

#[tokio::test]
async fn online_users_lists_connected_users() {
    let system = System::start(2).await;
    let mut alice = system.connect(0, "alice").await;
    let bob = system.connect(1, "bob").await;
    let _carol = system.connect(0, "carol").await;

    let online = online_users(&mut alice).await;
    for user in ["alice", "bob", "carol"] {
        assert!(
            online.iter().any(|id| id == user),
            "{user} missing from ONLINE_USERS {online:?}"
        );
    }

    bob.close().await;
    let deadline = Instant::now() + EVENT_TIMEOUT;
    loop {
        let online = online_users(&mut alice).await;
        if !online.iter().any(|id| id == "bob") {
            assert!(
                online.iter().any(|id| id == "carol"),
                "carol dropped out: {online:?}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "bob still in ONLINE_USERS {online:?} {EVENT_TIMEOUT:?} after disconnecting"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test]
async fn online_users_page_bounded() {
    let system =
        System::start_with(1, Settings::default().variable("online_users_page_max", 2)).await;
    let mut alice = system.connect(0, "alice").await;
    let _bob = system.connect(0, "bob").await;
    let _carol = system.connect(0, "carol").await;

    let online = online_users(&mut alice).await;
    assert!(
        !online.is_empty(),
        "ONLINE_USERS is empty with three users online"
    );
    assert!(
        online.len() <= 2,
        "ONLINE_USERS has {} ids, over online_users_page_max 2",
        online.len()
    );
}

#[tokio::test]
async fn instance_failure_marks_users_offline() {
    let ttl_s = 3;
    let mut system = System::start_with(2, Settings::default().env("PRESENCE_TTL_S", ttl_s)).await;
    let mut alice = system.connect(0, "alice").await;
    let mut bob = system.connect(1, "bob").await;
    exchange(&mut alice, &mut bob, "before the crash").await;

    system.host_mut(1).kill();
    // Instance heartbeats expire within the presence TTL; the margin covers
    // the surviving instance's check interval on a loaded machine.
    recv_presence(
        &mut alice,
        "bob",
        "offline",
        Duration::from_secs(ttl_s + 15),
    )
    .await;
    let online = online_users(&mut alice).await;
    assert!(
        !online.iter().any(|id| id == "bob"),
        "bob still online after his instance died: {online:?}"
    );
    drop(bob);

    // bob comes back on the surviving instance.
    let _bob = system.connect(0, "bob").await;
    recv_presence(&mut alice, "bob", "online", EVENT_TIMEOUT).await;
}

#[tokio::test]
async fn explicit_presence_subscription() {
    let system = System::start(2).await;
    let mut watcher = system.connect(0, "watcher").await;

    watcher
        .send(
            "SUBSCRIBE_PRESENCE",
            serde_json::json!({"userIds": ["bob"]}),
        )
        .await;
    let subscribed = watcher
        .recv_event("PRESENCE_SUBSCRIBED", EVENT_TIMEOUT)
        .await;
    assert_eq!(
        subscribed["userIds"],
        serde_json::json!(["bob"]),
        "subscribed ids"
    );
    recv_presence(&mut watcher, "bob", "offline", EVENT_TIMEOUT).await;

    // bob has never exchanged a message with the watcher, and connects to
    // the other instance.
    let bob = system.connect(1, "bob").await;
    recv_presence(&mut watcher, "bob", "online", EVENT_TIMEOUT).await;

    watcher
        .send(
            "UNSUBSCRIBE_PRESENCE",
            serde_json::json!({"userIds": ["bob"]}),
        )
        .await;
    watcher
        .recv_event("PRESENCE_UNSUBSCRIBED", EVENT_TIMEOUT)
        .await;
    bob.close().await;
    watcher
        .expect_no_event("USER_PRESENCE_UPDATE", QUIET_PERIOD)
        .await;
}

#[tokio::test]
async fn presence_subscription_rejects_bad_ids() {
    let system = System::start(1).await;
    let mut watcher = system.connect(0, "watcher").await;
    let too_many: Vec<String> = (0..101).map(|index| format!("user{index}")).collect();
    for data in [
        serde_json::json!({}),
        serde_json::json!({"userIds": "bob"}),
        serde_json::json!({"userIds": []}),
        serde_json::json!({"userIds": [5]}),
        serde_json::json!({"userIds": too_many}),
    ] {
        watcher.send("SUBSCRIBE_PRESENCE", data.clone()).await;
        let error = watcher.recv_event("ERROR", EVENT_TIMEOUT).await;
        assert_eq!(error["code"], "VALIDATION_ERROR", "code for {data}");
        assert_eq!(error["event"], "SUBSCRIBE_PRESENCE", "event for {data}");
    }
    let status = watcher.health_check().await;
    assert_eq!(status["status"], "ok", "the connection stopped working");
}

/// Subscribes to the presence of offline `users` and receives their
/// current status.
async fn subscribe_to_offline(watcher: &mut Client, users: &[&str]) {
    watcher
        .send("SUBSCRIBE_PRESENCE", serde_json::json!({"userIds": users}))
        .await;
    watcher
        .recv_event("PRESENCE_SUBSCRIBED", EVENT_TIMEOUT)
        .await;
    for user in users {
        recv_presence(watcher, user, "offline", EVENT_TIMEOUT).await;
    }
}

/// One user watches at most `presence_watch_max` users, and unsubscribing
/// frees places. A subscription past the cap changes nothing.
#[tokio::test]
async fn presence_subscription_capped() {
    let settings = Settings::default().variable("presence_watch_max", 3);
    let system = System::start_with(1, settings).await;
    let mut watcher = system.connect(0, "watcher").await;
    let subscribe = |ids: &[&str]| serde_json::json!({"userIds": ids});

    subscribe_to_offline(&mut watcher, &["u1", "u2"]).await;
    // Ids already watched take no new place.
    subscribe_to_offline(&mut watcher, &["u2", "u3"]).await;

    watcher.send("SUBSCRIBE_PRESENCE", subscribe(&["u4"])).await;
    let error = watcher.recv_event("ERROR", EVENT_TIMEOUT).await;
    assert_eq!(error["code"], "VALIDATION_ERROR", "{error}");
    assert!(
        str_field(&error, "message").contains("maximum of 3 watched users"),
        "{error}"
    );
    // The rejected subscription did not take effect.
    let _u4 = system.connect(0, "u4").await;
    watcher
        .expect_no_event("USER_PRESENCE_UPDATE", QUIET_PERIOD)
        .await;

    watcher
        .send("UNSUBSCRIBE_PRESENCE", subscribe(&["u1"]))
        .await;
    watcher
        .recv_event("PRESENCE_UNSUBSCRIBED", EVENT_TIMEOUT)
        .await;
    watcher.send("SUBSCRIBE_PRESENCE", subscribe(&["u4"])).await;
    watcher
        .recv_event("PRESENCE_SUBSCRIBED", EVENT_TIMEOUT)
        .await;
    recv_presence(&mut watcher, "u4", "online", EVENT_TIMEOUT).await;
}

/// `SUBSCRIBE_PRESENCE` and `UNSUBSCRIBE_PRESENCE` share a per-user rate
/// limit, as the other events that write to Redis do.
#[tokio::test]
async fn presence_subscription_rate_limited() {
    let settings = Settings::default().variable("presence_subscribe_rate_limit", 2);
    let system = System::start_with(1, settings).await;
    let mut watcher = system.connect(0, "watcher").await;
    let data = serde_json::json!({"userIds": ["bob"]});

    watcher.send("SUBSCRIBE_PRESENCE", data.clone()).await;
    watcher
        .recv_event("PRESENCE_SUBSCRIBED", EVENT_TIMEOUT)
        .await;
    watcher.send("UNSUBSCRIBE_PRESENCE", data.clone()).await;
    watcher
        .recv_event("PRESENCE_UNSUBSCRIBED", EVENT_TIMEOUT)
        .await;
    watcher.send("SUBSCRIBE_PRESENCE", data).await;
    let limited = watcher
        .recv_event("RATE_LIMIT_EXCEEDED", EVENT_TIMEOUT)
        .await;
    assert_eq!(limited["event"], "SUBSCRIBE_PRESENCE", "{limited}");
}
