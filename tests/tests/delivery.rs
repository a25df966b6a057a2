//! Delivery guarantees as a client receives them. Catch-up after a reconnect
//! merges with live delivery (each message once, in order, none missing), an
//! old client gets the messages that arrived while it was offline, and a
//! slow consumer neither grows the host's memory nor holds up other clients.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nexus_tests::client::exchange;
use nexus_tests::raw::RawClient;
use nexus_tests::wire::{message_id, str_field};
use nexus_tests::{tokens, Client, Event, Settings, System, EVENT_TIMEOUT, QUIET_PERIOD};
use serde_json::{json, Value};

fn presence_of<'a>(user: &'a str, status: &'a str) -> impl Fn(&Value) -> bool + 'a {
    move |data: &Value| {
        data.get("userId").and_then(Value::as_str) == Some(user)
            && data.get("status").and_then(Value::as_str) == Some(status)
    }
}

/// Returns the message ids of the `NEW_MESSAGE` events among `events`, in
/// order.
fn new_message_ids(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter(|event| event.name == "NEW_MESSAGE")
        .map(|event| message_id(&event.data, "messageId"))
        .collect()
}

/// Returns the ids that occur more than once in `ids`.
fn repeated(ids: &[String]) -> Vec<String> {
    let mut seen = HashSet::new();
    ids.iter()
        .filter(|id| !seen.insert(id.as_str()))
        .cloned()
        .collect()
}

/// Connects to host `index` and authenticates as `user`, naming
/// `last_message_id` when given. Returns the client right after
/// `CONNECTION_SUCCESS`, with any replayed messages still unread.
async fn reconnect(
    system: &System,
    index: usize,
    user: &str,
    last_message_id: Option<&str>,
) -> Client {
    let mut client = system.connect_anonymous(index, user).await;
    let mut data = json!({"userId": user, "token": tokens::valid(user)});
    if let Some(last) = last_message_id {
        data["lastMessageId"] = json!(last);
    }
    client.send("authenticate", data).await;
    client.recv_event("CONNECTION_SUCCESS", EVENT_TIMEOUT).await;
    client.set_user(user);
    client
}

/// Reads events until `count` `NEW_MESSAGE` events have arrived or
/// `timeout` passes, and returns every event read.
async fn read_new_messages(client: &mut Client, count: usize, timeout: Duration) -> Vec<Event> {
    let deadline = Instant::now() + timeout;
    let mut events = Vec::new();
    let mut messages = 0;
    while messages < count {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(event) = client.next_event(left).await else {
            break;
        };
        if event.name == "NEW_MESSAGE" {
            messages += 1;
        }
        events.push(event);
    }
    events
}

#[tokio::test]
async fn catch_up_merges_with_live_burst() {
    let burst: usize = 40;
    let rounds = 3;
    let settings = Settings::default().variable("message_rate_limit", 10_000);
    let system = System::start_with(3, settings).await;
    let mut alice = system.connect(0, "alice").await;
    let mut bob = system.connect(1, "bob").await;
    let first = exchange(&mut alice, &mut bob, "before the bursts").await;

    let mut sent_ids = vec![message_id(&first, "messageId")];
    let mut received_ids = vec![message_id(&first, "messageId")];
    for round in 0..rounds {
        // bob switches between instances b and c.
        let next_instance = if round % 2 == 0 { 2 } else { 1 };
        // bob leaves after a different share of each burst.
        let leave_after = 5 + round * 12;

        let sender = async {
            let mut ids = Vec::new();
            for index in 0..burst {
                let content = format!("round {round} message {index}");
                let sent = alice.send_message_to("bob", &content, None).await;
                ids.push(message_id(&sent, "messageId"));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            ids
        };
        let old_bob = bob;
        let receiver = async {
            let mut old_bob = old_bob;
            let mut events = read_new_messages(&mut old_bob, leave_after, EVENT_TIMEOUT).await;
            events.extend(old_bob.close_collecting().await);
            let received_before_leaving = new_message_ids(&events);
            let last = received_before_leaving
                .iter()
                .chain(received_ids.iter())
                .max()
                .cloned()
                .expect("bob received at least the first message");
            let mut new_bob = reconnect(&system, next_instance, "bob", Some(&last)).await;
            let remaining = burst.saturating_sub(received_before_leaving.len());
            events
                .extend(read_new_messages(&mut new_bob, remaining, Duration::from_secs(10)).await);
            (events, new_bob)
        };
        let (round_sent, (round_events, new_bob)) = tokio::join!(sender, receiver);
        bob = new_bob;
        sent_ids.extend(round_sent);
        received_ids.extend(new_message_ids(&round_events));
    }
    // Late duplicates would arrive now.
    while let Some(event) = bob.next_event(QUIET_PERIOD).await {
        if event.name == "NEW_MESSAGE" {
            received_ids.push(message_id(&event.data, "messageId"));
        }
    }

    let duplicates = repeated(&received_ids);
    assert!(
        duplicates.is_empty(),
        "bob received these messages more than once: {duplicates:?}"
    );
    let received: HashSet<&String> = received_ids.iter().collect();
    let missing: Vec<&String> = sent_ids
        .iter()
        .filter(|id| !received.contains(id))
        .collect();
    assert!(
        missing.is_empty(),
        "bob never received these messages that got MESSAGE_SENT: {missing:?}"
    );
    let sent: HashSet<&String> = sent_ids.iter().collect();
    let unknown: Vec<&String> = received_ids
        .iter()
        .filter(|id| !sent.contains(id))
        .collect();
    assert!(
        unknown.is_empty(),
        "bob received messages alice never got MESSAGE_SENT for: {unknown:?}"
    );
    assert_eq!(
        received_ids, sent_ids,
        "bob received alice's messages in another order"
    );
}

#[tokio::test]
async fn old_client_gets_missed_messages_once() {
    let system = System::start(2).await;
    let mut alice = system.connect(0, "alice").await;
    let mut bob = system.connect(1, "bob").await;
    let live = exchange(&mut alice, &mut bob, "seen live").await;
    let live_id = message_id(&live, "messageId");

    bob.close().await;
    alice
        .recv_matching(
            "USER_PRESENCE_UPDATE",
            EVENT_TIMEOUT,
            presence_of("bob", "offline"),
        )
        .await;
    let mut missed = Vec::new();
    for index in 0..3 {
        let sent = alice
            .send_message_to("bob", &format!("while away {index}"), None)
            .await;
        missed.push(message_id(&sent, "messageId"));
    }

    // An old client names no lastMessageId.
    let mut bob = reconnect(&system, 0, "bob", None).await;
    let events = read_new_messages(&mut bob, missed.len() + 1, Duration::from_secs(2)).await;
    let replayed = new_message_ids(&events);
    assert_eq!(
        replayed, missed,
        "the first reconnect replayed other messages than those sent while bob was away \
         (the live one was {live_id})"
    );

    // What was replayed once is not replayed again.
    bob.close().await;
    alice
        .recv_matching(
            "USER_PRESENCE_UPDATE",
            EVENT_TIMEOUT,
            presence_of("bob", "offline"),
        )
        .await;
    let mut bob = reconnect(&system, 1, "bob", None).await;
    bob.expect_no_event("NEW_MESSAGE", QUIET_PERIOD).await;
    exchange(&mut alice, &mut bob, "live again").await;
}

/// Content size of the flood messages. With the frame around it, a
/// delivery to the slow reader is about 16.2 KB.
const FLOOD_CONTENT_BYTES: usize = 16_000;

/// Messages in the flood: about 16 MB of deliveries to the slow reader.
const FLOOD_MESSAGES: usize = 1000;

/// Messages the flooding client keeps in flight before reading replies.
const FLOOD_WINDOW: usize = 16;

#[tokio::test]
async fn slow_reader_closed_others_unaffected() {
    let queue_frames = 32;
    let settings = Settings::default()
        .env("SEND_QUEUE_FRAMES", queue_frames)
        .env("MAX_FRAME_BYTES", 32 * 1024)
        .env("MAX_EVENTS_PER_SECOND", 100_000)
        .variable("max_content_bytes", FLOOD_CONTENT_BYTES)
        .variable("message_rate_limit", 1_000_000);
    let system = System::start_with(1, settings).await;

    // The slow reader authenticates and never reads again. Its small
    // receive buffer keeps the kernel from absorbing the flood for it.
    let mut slow = RawClient::connect_with_receive_buffer(system.host(0).port(), 64 * 1024).await;
    let authenticate = json!({
        "event": "authenticate",
        "data": {"userId": "slow", "token": tokens::valid("slow")},
    });
    slow.send_text(&authenticate.to_string()).await;

    let mut fran = system.connect(0, "fran").await;
    let mut carol = system.connect(0, "carol").await;
    let mut dave = system.connect(0, "dave").await;
    exchange(&mut carol, &mut dave, "warm-up").await;
    fran.send_message_to("slow", "warm-up", None).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let baseline_kib = system
        .host(0)
        .resident_memory_kib()
        .expect("VmRSS of the host is readable");
    let flood_done = AtomicBool::new(false);
    let content = "x".repeat(FLOOD_CONTENT_BYTES);

    let flood = async {
        let mut sent = 0;
        while sent < FLOOD_MESSAGES {
            let window = FLOOD_WINDOW.min(FLOOD_MESSAGES - sent);
            for _ in 0..window {
                fran.send(
                    "NEW_MESSAGE",
                    json!({"receiverId": "slow", "content": content}),
                )
                .await;
            }
            for _ in 0..window {
                fran.recv_event("MESSAGE_SENT", EVENT_TIMEOUT).await;
            }
            sent += window;
        }
        flood_done.store(true, Ordering::SeqCst);
    };
    let chat = async {
        let mut exchanges = 0;
        let mut slowest = Duration::ZERO;
        while !flood_done.load(Ordering::SeqCst) {
            let started = Instant::now();
            let text = format!("during the flood {exchanges}");
            if exchanges % 2 == 0 {
                exchange(&mut carol, &mut dave, &text).await;
            } else {
                exchange(&mut dave, &mut carol, &text).await;
            }
            slowest = slowest.max(started.elapsed());
            exchanges += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        (exchanges, slowest)
    };
    let sampler = async {
        let mut peak_kib = baseline_kib;
        while !flood_done.load(Ordering::SeqCst) {
            if let Some(kib) = system.host(0).resident_memory_kib() {
                peak_kib = peak_kib.max(kib);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        peak_kib
    };
    let flood_started = Instant::now();
    let ((), (exchanges, slowest), peak_kib) = tokio::join!(flood, chat, sampler);
    let flood_took = flood_started.elapsed();

    // A host that queued every frame for the slow reader would grow by
    // about the whole flood: in one trial with SEND_QUEUE_FRAMES 1000000 and
    // twice this flood, VmRSS grew by more than the flood. A bounded queue
    // keeps at most 32 frames.
    let flood_kib = (FLOOD_MESSAGES * FLOOD_CONTENT_BYTES / 1024) as u64;
    let growth_kib = peak_kib.saturating_sub(baseline_kib);
    assert!(
        growth_kib < flood_kib / 2,
        "host VmRSS grew by {growth_kib} KiB (from {baseline_kib} KiB) during a flood of \
         {flood_kib} KiB to a reader that never reads"
    );
    assert!(
        exchanges > 0,
        "carol and dave exchanged no message during the {flood_took:?} flood"
    );
    assert!(
        slowest < Duration::from_secs(2),
        "an exchange between carol and dave took {slowest:?} during the flood"
    );

    let transcript = slow.read_until_closed(Duration::from_secs(10)).await;
    eprintln!(
        "flood of {FLOOD_MESSAGES} messages took {flood_took:?}; host VmRSS {baseline_kib} KiB \
         before, peak {peak_kib} KiB; {exchanges} exchanges, slowest {slowest:?}; the slow \
         reader got {} text frames and close code {:?} (close frame: {})",
        transcript.texts.len(),
        transcript.close_code,
        transcript.closed
    );
    if transcript.closed {
        assert_eq!(
            transcript.close_code,
            Some(4004),
            "the slow reader's close frame (after {} text frames)",
            transcript.texts.len()
        );
    }
    assert!(
        transcript.texts.len() < FLOOD_MESSAGES,
        "the slow reader got all {} frames, so no queue limit applied",
        transcript.texts.len()
    );

    // The pair and the flooding client carry on after the flood.
    exchange(&mut carol, &mut dave, "after the flood").await;
    exchange(&mut dave, &mut carol, "dave after the flood").await;
    let status = fran.health_check().await;
    assert_eq!(str_field(&status, "status"), "ok", "{status}");
}
