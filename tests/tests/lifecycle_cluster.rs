//! Connection lifecycle across a cluster of hosts: one connection per user
//! (replacement and racing logins), an instance killed with SIGKILL, an
//! instance stopped with SIGTERM, heartbeats and inactivity, and token
//! renewal and expiry. Every check is on what a client receives.

use std::time::{Duration, Instant};

use nexus_tests::client::exchange;
use nexus_tests::matchers::{content_is, presence_of, typing_of};
use nexus_tests::raw::RawClient;
use nexus_tests::wire::{message_id, rfc3339, str_field};
use nexus_tests::{tokens, Client, Close, Event, Settings, System, EVENT_TIMEOUT, QUIET_PERIOD};
use serde_json::{json, Value};

/// Heartbeat settings of the tests that stop an instance: short, so a dead
/// instance's users are announced offline within about two seconds.
const HEARTBEAT_MS: u64 = 500;
const INSTANCE_TTL_MS: u64 = 1500;

/// Extra time on top of `INSTANCE_TTL_MS + INSTANCE_HEARTBEAT_MS` for a
/// reaper on a loaded 2-core machine: one more heartbeat check, the
/// `$disconnected` handler and the delivery to the watcher.
const REAP_MARGIN: Duration = Duration::from_millis(1500);

/// Settings with short instance heartbeats and a typing timeout that never
/// fires during a test, so only a disconnect clears an indicator.
fn short_heartbeats() -> Settings {
    Settings::default()
        .env("INSTANCE_HEARTBEAT_MS", HEARTBEAT_MS)
        .env("INSTANCE_TTL_MS", INSTANCE_TTL_MS)
        .variable("typing_timeout_ms", 30_000)
}

/// Returns the bound on a dead instance's users being announced offline.
fn reap_bound() -> Duration {
    Duration::from_millis(INSTANCE_TTL_MS + HEARTBEAT_MS) + REAP_MARGIN
}

/// Opens a connection to `url` and authenticates as `user`, without
/// borrowing the [`System`] (whose host may be stopping at the same time).
async fn connect_to(url: &str, user: &str, last_message_id: Option<&str>) -> Client {
    let mut client = Client::connect(url, user).await;
    let mut data = json!({"userId": user, "token": tokens::valid(user)});
    if let Some(last) = last_message_id {
        data["lastMessageId"] = json!(last);
    }
    client.send("authenticate", data).await;
    let success = client.recv_event("CONNECTION_SUCCESS", EVENT_TIMEOUT).await;
    assert_eq!(
        str_field(&success, "userId"),
        user,
        "CONNECTION_SUCCESS names another user"
    );
    client.set_user(user);
    client
}

/// Returns the message ids of the `NEW_MESSAGE` events among `events`.
fn new_message_ids(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter(|event| event.name == "NEW_MESSAGE")
        .map(|event| message_id(&event.data, "messageId"))
        .collect()
}

#[tokio::test]
async fn replacement_across_three_instances() {
    let system = System::start(3).await;
    let mut alice = system.connect(0, "alice").await;
    let mut first_bob = system.connect(1, "bob").await;
    exchange(&mut alice, &mut first_bob, "partners first").await;

    // bob moves from instance b to c, then to a, where alice is.
    let mut second_bob = system.connect(2, "bob").await;
    let close = first_bob.recv_close(EVENT_TIMEOUT).await;
    assert_eq!(close.code, Some(4001), "first connection: {close}");
    assert!(
        !close.reason.is_empty(),
        "first connection: close 4001 without a reason text"
    );

    let mut third_bob = system.connect(0, "bob").await;
    let close = second_bob.recv_close(EVENT_TIMEOUT).await;
    assert_eq!(close.code, Some(4001), "second connection: {close}");
    assert!(
        !close.reason.is_empty(),
        "second connection: close 4001 without a reason text"
    );

    // alice, a conversation partner, receives no offline update for bob
    // while he only switches connections.
    alice
        .expect_no_matching(
            "USER_PRESENCE_UPDATE",
            Duration::from_millis(1500),
            presence_of("bob", "offline"),
        )
        .await;
    exchange(&mut alice, &mut third_bob, "to the newest connection").await;
    exchange(&mut third_bob, &mut alice, "from the newest connection").await;
    third_bob.expect_no_event("NEW_MESSAGE", QUIET_PERIOD).await;
}

#[tokio::test]
async fn racing_logins_leave_one_open() {
    let system = System::start(3).await;
    let mut partner = system.connect(2, "pat").await;
    let settle = Duration::from_millis(1000);

    for round in 0..10 {
        let user = format!("racer{round}");
        let mut first = system.connect_anonymous(0, &user).await;
        let mut second = system.connect_anonymous(1, &user).await;
        let data = json!({"userId": user, "token": system.token(&user)});

        // Both handshakes are done, so the two authenticate frames leave at
        // the same moment and race on two instances.
        tokio::join!(
            first.send("authenticate", data.clone()),
            second.send("authenticate", data.clone())
        );
        let (first_reply, second_reply) = tokio::join!(
            first.recv_event_or_close("CONNECTION_SUCCESS", EVENT_TIMEOUT),
            second.recv_event_or_close("CONNECTION_SUCCESS", EVENT_TIMEOUT)
        );
        assert!(
            first_reply.is_ok() || second_reply.is_ok(),
            "round {round}: neither connection got CONNECTION_SUCCESS: {first_reply:?}, \
             {second_reply:?}"
        );

        let (first_close, second_close) =
            tokio::join!(first.wait_for_close(settle), second.wait_for_close(settle));
        let open = usize::from(first_close.is_none()) + usize::from(second_close.is_none());
        assert_eq!(
            open, 1,
            "round {round}: {open} connections open after the race; first ended with \
             {first_close:?}, second with {second_close:?}"
        );
        let loser_close: &Close = first_close
            .as_ref()
            .or(second_close.as_ref())
            .expect("one connection closed, as the assert above checked");
        assert_eq!(
            loser_close.code,
            Some(4001),
            "round {round}: the losing connection ended with {loser_close}"
        );

        // The survivor is the one that deliveries to the user reach.
        let survivor = if first_close.is_none() {
            &mut first
        } else {
            &mut second
        };
        survivor.health_check().await;
        let content = format!("to the winner of round {round}");
        partner.send_message_to(&user, &content, None).await;
        survivor
            .recv_matching("NEW_MESSAGE", EVENT_TIMEOUT, content_is(&content))
            .await;
    }
}

#[tokio::test]
async fn killed_instance_users_go_offline() {
    let mut system = System::start_with(3, short_heartbeats()).await;
    let mut wendy = system.connect(0, "wendy").await;
    let mut dave = system.connect(2, "dave").await;
    let mut erin = system.connect(2, "erin").await;
    exchange(&mut dave, &mut wendy, "dave to wendy").await;
    exchange(&mut erin, &mut wendy, "erin to wendy").await;

    dave.send("TYPING_START", json!({"receiverId": "wendy"}))
        .await;
    wendy
        .recv_matching("USER_TYPING", EVENT_TIMEOUT, typing_of("dave", true))
        .await;

    system.host_mut(2).kill();
    let killed_at = Instant::now();
    drop(dave);
    drop(erin);

    // erin reconnects to instance b at once and chats with wendy.
    let mut erin = system.connect(1, "erin").await;
    exchange(&mut erin, &mut wendy, "erin after the crash").await;
    exchange(&mut wendy, &mut erin, "wendy to erin after the crash").await;

    let bound = reap_bound();
    wendy
        .recv_matching(
            "USER_PRESENCE_UPDATE",
            bound + EVENT_TIMEOUT,
            presence_of("dave", "offline"),
        )
        .await;
    let offline_after = killed_at.elapsed();
    assert!(
        offline_after <= bound,
        "dave shown offline {offline_after:?} after the kill, over the bound {bound:?} \
         (INSTANCE_TTL_MS {INSTANCE_TTL_MS} + INSTANCE_HEARTBEAT_MS {HEARTBEAT_MS} + margin)"
    );

    // The reaper has run, and it left erin alone because she reconnected.
    wendy
        .expect_no_matching(
            "USER_PRESENCE_UPDATE",
            QUIET_PERIOD,
            presence_of("erin", "offline"),
        )
        .await;
    exchange(&mut erin, &mut wendy, "erin after the reaper").await;

    // The typing indicator dave started before the kill is cleared too.
    let typing_wait = (bound + EVENT_TIMEOUT).saturating_sub(killed_at.elapsed());
    wendy
        .recv_matching("USER_TYPING", typing_wait, typing_of("dave", false))
        .await;
    let cleared_after = killed_at.elapsed();
    assert!(
        cleared_after <= bound,
        "dave's typing indicator cleared {cleared_after:?} after the kill, over the bound \
         {bound:?}"
    );

    // dave comes back on the instance where wendy is.
    let mut dave = system.connect(0, "dave").await;
    wendy
        .recv_matching(
            "USER_PRESENCE_UPDATE",
            EVENT_TIMEOUT,
            presence_of("dave", "online"),
        )
        .await;
    exchange(&mut dave, &mut wendy, "dave is back").await;
}

#[tokio::test]
async fn sigterm_closes_1012_keeps_messages() {
    let mut system = System::start_with(3, short_heartbeats()).await;
    let mut bob = system.connect(1, "bob").await;
    let mut alice = system.connect(0, "alice").await;
    let mut carol = system.connect(0, "carol").await;
    let mut dave = system.connect(0, "dave").await;
    exchange(&mut alice, &mut bob, "alice and bob").await;
    exchange(&mut dave, &mut bob, "dave and bob").await;
    let baseline = exchange(&mut alice, &mut carol, "alice and carol").await;
    let carol_last_seen = message_id(&baseline, "messageId");

    // Both messages have MESSAGE_SENT before SIGTERM goes out, and no client
    // reads the receivers' sockets in between.
    let to_carol = alice
        .send_message_to("carol", "carol, right before SIGTERM", None)
        .await;
    let to_carol_id = message_id(&to_carol, "messageId");
    let to_bob = alice
        .send_message_to("bob", "bob, right before SIGTERM", None)
        .await;
    let to_bob_id = message_id(&to_bob, "messageId");

    // alice and carol reconnect to instance c as soon as they see the close,
    // not after the host has exited.
    let url_c = system.host(2).ws_url();
    let alice_flow = async {
        let close = alice.recv_close(EVENT_TIMEOUT).await;
        let new_alice = connect_to(&url_c, "alice", None).await;
        (close, new_alice)
    };
    let carol_flow = async {
        let close = carol.wait_for_close(EVENT_TIMEOUT).await;
        let mut seen = carol.take_all_buffered();
        let last_seen = new_message_ids(&seen)
            .into_iter()
            .max()
            .unwrap_or_else(|| carol_last_seen.clone());
        let mut new_carol = connect_to(&url_c, "carol", Some(&last_seen)).await;
        // Catch-up arrives right after CONNECTION_SUCCESS.
        while let Some(event) = new_carol.next_event(QUIET_PERIOD).await {
            seen.push(event);
        }
        (close, seen)
    };
    let dave_flow = dave.recv_close(EVENT_TIMEOUT);
    let (status, (alice_close, mut new_alice), (carol_close, carol_seen), dave_close) = tokio::join!(
        system.host_mut(0).terminate(Duration::from_secs(20)),
        alice_flow,
        carol_flow,
        dave_flow
    );

    assert_eq!(alice_close.code, Some(1012), "alice: {alice_close}");
    assert_eq!(
        carol_close.as_ref().and_then(|close| close.code),
        Some(1012),
        "carol: {carol_close:?}"
    );
    assert_eq!(dave_close.code, Some(1012), "dave: {dave_close}");
    let status = status.expect("nexus-host did not exit within 20 s of SIGTERM");
    assert!(
        status.success(),
        "nexus-host exited with {status} after SIGTERM"
    );

    let carol_ids = new_message_ids(&carol_seen);
    let copies = carol_ids.iter().filter(|id| **id == to_carol_id).count();
    assert_eq!(
        copies, 1,
        "carol received message {to_carol_id} {copies} times, live or through catch-up; \
         ids received: {carol_ids:?}"
    );
    let delivered = bob.recv_event("NEW_MESSAGE", EVENT_TIMEOUT).await;
    assert_eq!(
        message_id(&delivered, "messageId"),
        to_bob_id,
        "bob's first NEW_MESSAGE after SIGTERM is another message: {delivered}"
    );

    // dave did not reconnect, so the survivors reap him. By then any offline
    // update for alice, who reconnected at once, would have come too.
    let bound = reap_bound();
    bob.recv_matching(
        "USER_PRESENCE_UPDATE",
        bound + EVENT_TIMEOUT,
        presence_of("dave", "offline"),
    )
    .await;
    bob.expect_no_matching(
        "USER_PRESENCE_UPDATE",
        QUIET_PERIOD,
        presence_of("alice", "offline"),
    )
    .await;

    exchange(&mut new_alice, &mut bob, "alice on instance c").await;
    exchange(&mut bob, &mut new_alice, "bob to alice on instance c").await;
}

#[tokio::test]
async fn unanswered_pings_close_4003() {
    let inactivity_ms: u64 = 1500;
    let settings = Settings::default()
        .env("INACTIVITY_TIMEOUT_MS", inactivity_ms)
        .env("PING_INTERVAL_MS", 300);
    let system = System::start_with(2, settings).await;
    let mut wanda = system.connect(1, "wanda").await;

    // `idle` authenticates and sends one message, which makes wanda its
    // conversation partner, and then sends nothing, not even pongs.
    let mut idle = RawClient::connect(system.host(0).port()).await;
    let frames = [
        json!({"event": "authenticate", "data": {"userId": "idle", "token": tokens::valid("idle")}}),
        json!({"event": "NEW_MESSAGE", "data": {"receiverId": "wanda", "content": "from idle"}}),
    ];
    for frame in frames {
        idle.send_text(&frame.to_string()).await;
    }
    wanda
        .recv_matching("NEW_MESSAGE", EVENT_TIMEOUT, content_is("from idle"))
        .await;
    let idle_since = Instant::now();

    // `active` sends nothing but reads all the time, so tungstenite sends a
    // pong for every ping. It stays open for three inactivity timeouts.
    let mut active = system.connect(0, "active").await;
    let stay = Duration::from_millis(3 * inactivity_ms);
    let wanda_flow = async {
        wanda
            .recv_matching("USER_PRESENCE_UPDATE", stay, presence_of("idle", "offline"))
            .await;
        let offline_after = idle_since.elapsed();
        // wanda goes on reading, and so sending pongs, until `active` is
        // done.
        let close = wanda
            .wait_for_close(stay.saturating_sub(offline_after))
            .await;
        (offline_after, close)
    };
    let (active_close, (offline_after, wanda_close)) =
        tokio::join!(active.wait_for_close(stay), wanda_flow);
    assert!(
        active_close.is_none(),
        "the connection that answered pings was closed: {active_close:?}"
    );
    assert!(
        wanda_close.is_none(),
        "the watcher was closed: {wanda_close:?}"
    );
    assert!(
        offline_after >= Duration::from_millis(inactivity_ms / 2),
        "idle shown offline {offline_after:?} after its last frame, well before \
         INACTIVITY_TIMEOUT_MS {inactivity_ms}"
    );
    active.health_check().await;

    let transcript = idle.read_until_closed(EVENT_TIMEOUT).await;
    assert!(
        transcript.pings > 0,
        "idle connection got no pings at PING_INTERVAL_MS 300: {transcript:?}"
    );
    assert!(
        transcript.closed,
        "idle connection ended without a close frame: {transcript:?}"
    );
    assert_eq!(transcript.close_code, Some(4003), "{transcript:?}");
}

#[tokio::test]
async fn renewal_outlives_first_token() {
    let system = System::start(2).await;
    let mut bob = system.connect(1, "bob").await;
    let mut alice = system.connect_anonymous(0, "alice").await;
    let first_exp = tokens::now_s() + 2;
    alice
        .authenticate("alice", &tokens::expiring_at("alice", first_exp))
        .await;

    tokio::time::sleep(Duration::from_millis(700)).await;
    let fresh_exp = tokens::now_s() + 3600;
    let renewed = alice
        .authenticate("alice", &tokens::expiring_at("alice", fresh_exp))
        .await;
    let expires_at = rfc3339(&renewed, "expiresAt");
    assert!(
        (expires_at.timestamp() - fresh_exp).abs() <= 1,
        "renewed expiresAt {expires_at} is not the new token's exp {fresh_exp}"
    );

    // Read until two seconds past the first token's exp. A close in that
    // time fails the test.
    let until_past_exp =
        Duration::from_secs(u64::try_from(first_exp + 2 - tokens::now_s()).unwrap_or(0));
    let close = alice.wait_for_close(until_past_exp).await;
    assert!(
        close.is_none(),
        "renewed connection closed around the first token's exp: {close:?}"
    );
    assert!(
        tokens::now_s() > first_exp,
        "the check ended before the first token's exp {first_exp}"
    );
    exchange(&mut alice, &mut bob, "after renewal").await;
    exchange(&mut bob, &mut alice, "to alice after renewal").await;
}

#[tokio::test]
async fn expired_token_closes_4002_no_delivery() {
    let system = System::start(2).await;
    let mut bob = system.connect(1, "bob").await;

    // carol reads nothing until the end, so every frame the server sent
    // her, before or after a close frame, is still in her socket.
    let mut carol = RawClient::connect(system.host(0).port()).await;
    let exp = tokens::now_s() + 3;
    let exp_ms = exp * 1000;
    let authenticate = json!({
        "event": "authenticate",
        "data": {"userId": "carol", "token": tokens::expiring_at("carol", exp)},
    });
    carol.send_text(&authenticate.to_string()).await;
    // A message before the expiry also makes bob and carol partners.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let first = bob.send_message_to("carol", "before expiry", None).await;
    let first_id = message_id(&first, "messageId");

    // bob keeps sending, every 200 ms, until two seconds past carol's exp.
    let mut sent_around_expiry = Vec::new();
    let mut index = 0;
    while tokens::now_s() < exp + 2 {
        let sent = bob
            .send_message_to("carol", &format!("around expiry {index}"), None)
            .await;
        let created = rfc3339(&sent, "createdAt").timestamp_millis();
        sent_around_expiry.push((message_id(&sent, "messageId"), created));
        index += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bob.recv_matching(
        "USER_PRESENCE_UPDATE",
        EVENT_TIMEOUT,
        presence_of("carol", "offline"),
    )
    .await;

    let transcript = carol.read_for(Duration::from_secs(3)).await;
    assert!(
        transcript.closed,
        "expired connection ended without a close frame: {transcript:?}"
    );
    assert_eq!(
        transcript.close_code,
        Some(4002),
        "expired connection: {transcript:?}"
    );
    assert!(
        transcript.texts_after_close.is_empty(),
        "frames after the close frame: {:?}",
        transcript.texts_after_close
    );
    let delivered: Vec<Value> = transcript
        .texts
        .iter()
        .filter_map(|text| serde_json::from_str::<Value>(text).ok())
        .filter(|frame| frame["event"] == "NEW_MESSAGE")
        .map(|frame| frame["data"].clone())
        .collect();
    let delivered_ids: Vec<String> = delivered
        .iter()
        .map(|data| message_id(data, "messageId"))
        .collect();
    assert!(
        delivered_ids.contains(&first_id),
        "the message sent before expiry never reached carol: {delivered_ids:?}"
    );
    // The server closes at exp, and one second covers its timer and the
    // whole-second granularity of exp.
    for data in &delivered {
        let created = rfc3339(data, "createdAt").timestamp_millis();
        assert!(
            created <= exp_ms + 1000,
            "the expired connection got a message created {} ms after the token's exp: {data}",
            created - exp_ms
        );
    }

    // Messages sent after the close reach carol once when she comes back,
    // even as an old client that names no lastMessageId. No message that
    // reached the expired connection arrives again.
    let after: Vec<String> = sent_around_expiry
        .iter()
        .filter(|(_, created)| *created > exp_ms + 1000)
        .map(|(id, _)| id.clone())
        .collect();
    assert!(
        !after.is_empty(),
        "bob sent nothing more than a second after carol's exp"
    );
    let mut carol = system.connect(0, "carol").await;
    let mut replayed = Vec::new();
    while let Some(event) = carol.next_event(QUIET_PERIOD).await {
        if event.name == "NEW_MESSAGE" {
            replayed.push(message_id(&event.data, "messageId"));
        }
    }
    for id in &after {
        let copies = replayed.iter().filter(|seen| *seen == id).count();
        assert_eq!(
            copies, 1,
            "message {id}, sent after the expiry, replayed {copies} times: {replayed:?}"
        );
    }
    for id in &delivered_ids {
        assert!(
            !replayed.contains(id),
            "message {id} reached the expired connection and was replayed again"
        );
    }
}
