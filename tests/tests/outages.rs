//! Store outages while clients are connected: the test's private Redis
//! restarted empty, and a private Postgres cluster stopped and started
//! again. Clients must get `ERROR` for what cannot be done, keep what does
//! not need the store that is down, and chat again once it is back.

use std::time::{Duration, Instant};

use nexus_tests::client::exchange;
use nexus_tests::matchers::{content_is, presence_of, typing_of};
use nexus_tests::pg_cluster::PostgresCluster;
use nexus_tests::postgres::TestDatabase;
use nexus_tests::wire::{message_id, str_field};
use nexus_tests::{Client, Settings, System, EVENT_TIMEOUT, QUIET_PERIOD};
use serde_json::{json, Value};

/// Bound on each Redis or Postgres call made for a component, so an event
/// that needs a store that is down fails fast.
const IO_TIMEOUT_MS: u64 = 1000;

/// Bound on an `ERROR` reply while a store is down: the I/O timeout of one
/// call plus handling, on a loaded machine.
const OUTAGE_REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// Bound on `/health` changing after a store stops or comes back.
const HEALTH_CHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// Time a host gets after `/health` returns 200 again before deliveries
/// across instances must work, so it can renew its pub/sub subscriptions.
const RESUBSCRIBE_GRACE: Duration = Duration::from_secs(1);

fn outage_settings() -> Settings {
    Settings::default()
        .env("IO_TIMEOUT_MS", IO_TIMEOUT_MS)
        .variable("typing_timeout_ms", 30_000)
}

/// Polls `GET /health` on host `index` until its status is `expected` and
/// returns the last body. Panics with the last status and body when
/// [`HEALTH_CHANGE_TIMEOUT`] passes first.
async fn wait_for_health(system: &System, index: usize, expected: u16) -> Value {
    let deadline = Instant::now() + HEALTH_CHANGE_TIMEOUT;
    loop {
        let response = system.http_get(index, "/health", None).await;
        if response.status == expected {
            return response.json();
        }
        assert!(
            Instant::now() < deadline,
            "/health of host {index} still returned {} after {HEALTH_CHANGE_TIMEOUT:?}, \
             expected {expected}; body: {}",
            response.status,
            response.body
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Sends `NEW_MESSAGE` and returns the first `ERROR` or `MESSAGE_SENT`
/// reply as `(event name, data)`.
async fn send_and_reply(
    client: &mut Client,
    receiver: &str,
    content: &str,
    client_message_id: &str,
) -> (String, Value) {
    client
        .send(
            "NEW_MESSAGE",
            json!({"receiverId": receiver, "content": content, "clientMessageId": client_message_id}),
        )
        .await;
    let reply = client
        .recv_any_of(&["ERROR", "MESSAGE_SENT"], OUTAGE_REPLY_TIMEOUT)
        .await;
    (reply.name, reply.data)
}

/// Sends `GET_ONLINE_USERS` and returns the ids of `ONLINE_USERS`.
async fn online_users(client: &mut Client) -> Vec<String> {
    client.send_without_data("GET_ONLINE_USERS").await;
    let data = client.recv_event("ONLINE_USERS", EVENT_TIMEOUT).await;
    data.as_array()
        .unwrap_or_else(|| panic!("ONLINE_USERS data is not an array: {data}"))
        .iter()
        .filter_map(|id| id.as_str().map(str::to_owned))
        .collect()
}

/// Retries a message with the same `clientMessageId` every 500 ms until it
/// gets `MESSAGE_SENT` or `timeout` passes, and returns the `MESSAGE_SENT`
/// data. Each `ERROR` in between must be `UNAVAILABLE`.
async fn retry_until_sent(
    client: &mut Client,
    receiver: &str,
    content: &str,
    client_message_id: &str,
    timeout: Duration,
) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let (name, data) = send_and_reply(client, receiver, content, client_message_id).await;
        if name == "MESSAGE_SENT" {
            return data;
        }
        assert_eq!(
            str_field(&data, "code"),
            "UNAVAILABLE",
            "a retry while the store comes back got another error: {data}"
        );
        assert!(
            Instant::now() < deadline,
            "no MESSAGE_SENT within {timeout:?} after the store came back; last reply: {data}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test]
async fn redis_restart_recovers_delivery() {
    let mut system = System::start_with(2, outage_settings()).await;
    let mut alice = system.connect(0, "alice").await;
    let mut bob = system.connect(1, "bob").await;
    let before_to_bob = exchange(&mut alice, &mut bob, "before the outage").await;
    exchange(&mut bob, &mut alice, "bob before the outage").await;

    system.redis_mut().stop();
    for index in 0..2 {
        let body = wait_for_health(&system, index, 503).await;
        assert_eq!(
            body["status"], "degraded",
            "/health of host {index} while Redis is down: {body}"
        );
        assert_eq!(
            body["redis"], "unreachable",
            "/health of host {index} while Redis is down: {body}"
        );
    }

    let (name, data) = send_and_reply(&mut alice, "bob", "during the outage", "outage-1").await;
    assert_eq!(
        name, "ERROR",
        "NEW_MESSAGE while Redis is down got {name} {data}"
    );
    assert_eq!(
        str_field(&data, "code"),
        "UNAVAILABLE",
        "NEW_MESSAGE while Redis is down: {data}"
    );
    assert_eq!(
        str_field(&data, "event"),
        "NEW_MESSAGE",
        "NEW_MESSAGE while Redis is down: {data}"
    );
    alice.expect_no_event("MESSAGE_SENT", QUIET_PERIOD).await;

    // Redis comes back on the same port, empty.
    system.redis_mut().restart().await;
    for index in 0..2 {
        let body = wait_for_health(&system, index, 200).await;
        assert_eq!(
            body["status"], "ok",
            "/health of host {index} after Redis is back: {body}"
        );
    }
    tokio::time::sleep(RESUBSCRIBE_GRACE).await;

    // The rejected message, retried with its clientMessageId, is stored
    // and delivered once. Then both directions work across instances.
    let retried = retry_until_sent(
        &mut alice,
        "bob",
        "during the outage",
        "outage-1",
        EVENT_TIMEOUT,
    )
    .await;
    let retried_id = message_id(&retried, "messageId");
    let delivered = bob
        .recv_matching(
            "NEW_MESSAGE",
            EVENT_TIMEOUT,
            content_is("during the outage"),
        )
        .await;
    assert_eq!(
        message_id(&delivered, "messageId"),
        retried_id,
        "the retried message was delivered under another id"
    );
    let after_to_bob = exchange(&mut alice, &mut bob, "after the outage").await;
    exchange(&mut bob, &mut alice, "bob after the outage").await;
    bob.expect_no_event("NEW_MESSAGE", QUIET_PERIOD).await;
    assert!(
        message_id(&before_to_bob, "messageId") < retried_id
            && retried_id < message_id(&after_to_bob, "messageId"),
        "message ids are out of creation order across the outage"
    );

    // bob stayed connected, so alice received no offline update for him.
    // His disconnect and return are announced as usual.
    alice
        .expect_no_matching(
            "USER_PRESENCE_UPDATE",
            Duration::from_millis(0),
            presence_of("bob", "offline"),
        )
        .await;
    bob.close().await;
    alice
        .recv_matching(
            "USER_PRESENCE_UPDATE",
            EVENT_TIMEOUT,
            presence_of("bob", "offline"),
        )
        .await;
    let _bob = system.connect(1, "bob").await;
    alice
        .recv_matching(
            "USER_PRESENCE_UPDATE",
            EVENT_TIMEOUT,
            presence_of("bob", "online"),
        )
        .await;

    // alice's own online entry was lost with Redis's data, so her instance
    // has to write it again when it refreshes presence.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let online = online_users(&mut alice).await;
        if online.iter().any(|id| id == "alice") && online.iter().any(|id| id == "bob") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "ONLINE_USERS {online:?} still lacks alice or bob 10 s after Redis came back"
        );
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
}

#[tokio::test]
async fn postgres_outage_rejects_messages_only() {
    // Declared before the system, so it stops after the system's hosts and
    // database are gone.
    let mut cluster = PostgresCluster::start().await;
    let db = TestDatabase::create_with_admin(&cluster.admin_url()).await;
    let system = System::start_with_database(2, outage_settings(), db).await;
    let mut alice = system.connect(0, "alice").await;
    let mut bob = system.connect(1, "bob").await;
    exchange(&mut alice, &mut bob, "before the outage").await;

    cluster.stop_immediately().await;
    let body = wait_for_health(&system, 0, 503).await;
    assert_eq!(
        body["postgres"], "unreachable",
        "/health while Postgres is down: {body}"
    );
    assert_eq!(
        body["status"], "degraded",
        "/health while Postgres is down: {body}"
    );

    let (name, data) = send_and_reply(&mut alice, "bob", "during the outage", "pg-1").await;
    assert_eq!(
        name, "ERROR",
        "NEW_MESSAGE while Postgres is down got {name} {data}"
    );
    assert_eq!(
        str_field(&data, "code"),
        "UNAVAILABLE",
        "NEW_MESSAGE while Postgres is down: {data}"
    );
    alice.expect_no_event("MESSAGE_SENT", QUIET_PERIOD).await;
    bob.expect_no_event("NEW_MESSAGE", Duration::from_millis(0))
        .await;

    // Typing, the online list and HEALTH_CHECK need Redis only.
    alice
        .send("TYPING_START", json!({"receiverId": "bob"}))
        .await;
    bob.recv_matching("USER_TYPING", EVENT_TIMEOUT, typing_of("alice", true))
        .await;
    alice
        .send("TYPING_STOP", json!({"receiverId": "bob"}))
        .await;
    bob.recv_matching("USER_TYPING", EVENT_TIMEOUT, typing_of("alice", false))
        .await;
    let online = online_users(&mut alice).await;
    assert!(
        online.iter().any(|id| id == "bob"),
        "bob missing from ONLINE_USERS {online:?} while Postgres is down"
    );
    let status = alice.health_check().await;
    assert_eq!(
        str_field(&status, "status"),
        "ok",
        "HEALTH_STATUS while Postgres is down: {status}"
    );

    // A user who connects now gets no catch-up. `$connected` has no client
    // request to reply to, so the host's log is where the failure shows.
    let _carol = system.connect(0, "carol").await;
    let deadline = Instant::now() + EVENT_TIMEOUT;
    loop {
        let log = std::fs::read_to_string(system.host(0).log_path()).unwrap_or_default();
        if log.contains("handler rejected a host event") && log.contains("$connected") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no log line for the failed $connected catch-up of carol"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    cluster.start_again().await;
    let retried = retry_until_sent(
        &mut alice,
        "bob",
        "during the outage",
        "pg-1",
        Duration::from_secs(10),
    )
    .await;
    let delivered = bob
        .recv_matching(
            "NEW_MESSAGE",
            EVENT_TIMEOUT,
            content_is("during the outage"),
        )
        .await;
    assert_eq!(
        message_id(&delivered, "messageId"),
        message_id(&retried, "messageId"),
        "the retried message was delivered under another id"
    );
    exchange(&mut alice, &mut bob, "after the outage").await;
    bob.expect_no_event("NEW_MESSAGE", QUIET_PERIOD).await;
    for index in 0..2 {
        let body = wait_for_health(&system, index, 200).await;
        assert_eq!(
            body["postgres"], "ok",
            "/health of host {index} after Postgres is back: {body}"
        );
    }
    assert_eq!(
        system.message_count().await,
        3,
        "stored messages: one before, the retried one and one after the outage"
    );
}
