//! `chat` and `presence`: pairs of users sending each other messages at a
//! target rate or as fast as acknowledgements allow. `presence` adds a
//! storm of new connections while the chat runs.
//!
//! Users are numbered globally: in pair `p`, rotation slot `j`, side `s`,
//! the ordinal is `(p * rotate + j) * 2 + s`, and its partner is the
//! ordinal with the last bit flipped. Storm users come after all chat users.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{Instant, Interval, MissedTickBehavior};

use super::{await_all, open_connection, start_run};
use crate::cli::{ChatArgs, PresenceArgs};
use crate::client::{self, Connection, Incoming};
use crate::stats::{bump, drop_one};
use crate::wire::{self, ServerFrame};
use crate::worker::{
    count_frame, hold, sent_time, wait_closing, Phase, WorkerContext, WorkerEvent, WorkerReport,
};

/// When one user sends.
#[derive(Clone, Copy)]
enum Schedule {
    /// One message every `period`, the first at `offset` after `Run`.
    Rate { period: Duration, offset: Duration },
    /// Back to back, with at most `in_flight` unacknowledged.
    Flood { in_flight: usize },
}

/// One chat user's part in the exchange.
struct ChatUser {
    ordinal: u64,
    peer_id: String,
    target_index: u64,
    schedule: Schedule,
    payload_bytes: usize,
    client_message_id: bool,
    with_storm: bool,
}

pub async fn run(
    context: Arc<WorkerContext>,
    args: &ChatArgs,
    storm: Option<&PresenceArgs>,
    events: &mpsc::UnboundedSender<WorkerEvent>,
    closing: &watch::Sender<bool>,
) -> WorkerReport {
    let permits = Arc::new(Semaphore::new(context.concurrency_share(args.concurrency)));
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let mut tasks = JoinSet::new();
    let mut expected = 0;
    let senders = Arc::new(AtomicU64::new(0));
    for user in chat_users(&context, args, storm.is_some()) {
        expected += 1;
        let context = Arc::clone(&context);
        let permits = Arc::clone(&permits);
        let done = done_tx.clone();
        // Registered before the task runs, so the drain cannot miss it.
        let sending = Sending::new(Arc::clone(&senders));
        tasks.spawn(async move {
            let deadline = Some(context.setup_deadline);
            let opened = open_connection(
                &context,
                &permits,
                user.ordinal,
                user.target_index,
                deadline,
            )
            .await;
            let _ = done.send(());
            drop(done);
            if let Some((connection, _)) = opened {
                run_user(&context, connection, &user, sending).await;
            }
        });
    }
    drop(done_tx);
    await_all(&mut done_rx, expected).await;
    let _ = events.send(WorkerEvent::Ready);

    let started = start_run(&context).await;
    if let Some(storm) = storm {
        spawn_storm(&context, args, storm, started, &mut tasks);
    }
    context.wait_phase(Phase::Stop).await;
    let at_stop = context.at_stop();
    drain(&context, &senders, Duration::from_secs(args.drain)).await;
    let _ = closing.send(true);
    while tasks.join_next().await.is_some() {}
    context.report(at_stop)
}

/// Lists this worker's chat users with their partners and schedules.
fn chat_users(context: &WorkerContext, args: &ChatArgs, with_storm: bool) -> Vec<ChatUser> {
    let rotate = u64::from(args.rotate);
    let total_users = args.connection_count();
    let cross = u64::from(args.cross_instance && context.targets.len() > 1);
    let mut users = Vec::new();
    for pair in context.share(u64::from(args.pairs)) {
        for slot in 0..rotate {
            for side in 0..2 {
                let ordinal = (pair * rotate + slot) * 2 + side;
                let schedule = if args.rate == 0 {
                    Schedule::Flood {
                        in_flight: usize::try_from(args.in_flight).unwrap_or(1),
                    }
                } else {
                    // Every user sends once per period; the offsets spread
                    // all users' sends evenly, 1/rate seconds apart.
                    let rate = f64::from(args.rate);
                    Schedule::Rate {
                        period: Duration::from_secs_f64(total_users as f64 / rate),
                        offset: Duration::from_secs_f64(ordinal as f64 / rate),
                    }
                };
                users.push(ChatUser {
                    ordinal,
                    peer_id: context.user_id(ordinal ^ 1),
                    target_index: pair + side * cross,
                    schedule,
                    payload_bytes: usize::try_from(args.payload_bytes).unwrap_or(64),
                    client_message_id: !args.no_client_message_id,
                    with_storm,
                });
            }
        }
    }
    users
}

/// Counts a user among those that may still send, until it has seen
/// `Stop` or ended.
struct Sending {
    senders: Arc<AtomicU64>,
    active: bool,
}

impl Sending {
    fn new(senders: Arc<AtomicU64>) -> Self {
        senders.fetch_add(1, Ordering::AcqRel);
        Self {
            senders,
            active: true,
        }
    }

    fn stop(&mut self) {
        if self.active {
            self.active = false;
            self.senders.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for Sending {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A message waiting for its MESSAGE_SENT, ERROR or RATE_LIMIT_EXCEEDED.
struct Outstanding {
    client_message_id: String,
    sent: Instant,
}

/// Runs one user's connection after setup: reads until `Run`, sends on its
/// schedule until `Stop`, then keeps reading until the worker closes.
async fn run_user(
    context: &WorkerContext,
    mut connection: Connection,
    user: &ChatUser,
    mut registration: Sending,
) {
    let mut phase = context.phase.clone();
    let mut closing = context.closing.clone();
    let mut outstanding: VecDeque<Outstanding> = VecDeque::new();
    let mut sequence: u64 = 0;
    let mut ticker: Option<Interval> = None;
    let mut sending = false;
    let mut stopped = false;
    let flood_limit = match user.schedule {
        Schedule::Flood { in_flight } => Some(in_flight),
        Schedule::Rate { .. } => None,
    };
    // Run may have arrived before this task subscribed.
    let initial = *phase.borrow_and_update();
    apply_phase(initial, user, &mut sending, &mut stopped, &mut ticker);
    if stopped {
        registration.stop();
    }

    loop {
        let flood_ready = sending && flood_limit.is_some_and(|limit| outstanding.len() < limit);
        let rate_active = sending && ticker.is_some();
        tokio::select! {
            message = connection.next_message() => {
                match connection.handle(message).await {
                    Incoming::Frame(frame) => on_frame(context, user, frame, &mut outstanding),
                    Incoming::Closed(reason) => {
                        forget_outstanding(context, &mut outstanding);
                        context.count_drop(&reason);
                        return;
                    }
                }
            }
            () = tick(&mut ticker), if rate_active => {
                let sent =
                    send_message(context, &mut connection, user, &mut sequence, &mut outstanding);
                if !sent.await {
                    return;
                }
            }
            () = std::future::ready(()), if flood_ready => {
                let sent =
                    send_message(context, &mut connection, user, &mut sequence, &mut outstanding);
                if !sent.await {
                    return;
                }
            }
            changed = phase.changed(), if !stopped => {
                let now = if changed.is_err() { Phase::Stop } else { *phase.borrow_and_update() };
                apply_phase(now, user, &mut sending, &mut stopped, &mut ticker);
                if stopped {
                    registration.stop();
                }
            }
            () = wait_closing(&mut closing) => break,
        }
    }
    forget_outstanding(context, &mut outstanding);
    connection.close().await;
    drop_one(&context.counters.open);
}

/// Starts sending on `Run` (with the rate schedule's first tick at its
/// offset) and stops for good on `Stop`.
fn apply_phase(
    phase: Phase,
    user: &ChatUser,
    sending: &mut bool,
    stopped: &mut bool,
    ticker: &mut Option<Interval>,
) {
    match phase {
        Phase::Setup => {}
        Phase::Run if !*sending && !*stopped => {
            *sending = true;
            if let Schedule::Rate { period, offset } = user.schedule {
                let mut interval = tokio::time::interval_at(Instant::now() + offset, period);
                interval.set_missed_tick_behavior(MissedTickBehavior::Skip);
                *ticker = Some(interval);
            }
        }
        Phase::Run => {}
        Phase::Stop => {
            *sending = false;
            *stopped = true;
        }
    }
}

async fn tick(ticker: &mut Option<Interval>) {
    match ticker {
        Some(ticker) => {
            ticker.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// Sends one NEW_MESSAGE; returns false when the connection is broken.
async fn send_message(
    context: &WorkerContext,
    connection: &mut Connection,
    user: &ChatUser,
    sequence: &mut u64,
    outstanding: &mut VecDeque<Outstanding>,
) -> bool {
    *sequence += 1;
    let client_message_id = format!("m{sequence}");
    let content = wire::encode_content(context.now_us(), user.payload_bytes);
    let data = if user.client_message_id {
        json!({
            "receiverId": user.peer_id,
            "content": content,
            "clientMessageId": client_message_id,
        })
    } else {
        json!({ "receiverId": user.peer_id, "content": content })
    };
    let sent = Instant::now();
    match connection.send_event("NEW_MESSAGE", &data).await {
        Ok(()) => {
            bump(&context.counters.sent);
            bump(&context.counters.in_flight);
            outstanding.push_back(Outstanding {
                client_message_id,
                sent,
            });
            true
        }
        Err(error) => {
            bump(&context.counters.send_failed);
            forget_outstanding(context, outstanding);
            context.count_drop(&format!("send failed: {error}"));
            false
        }
    }
}

/// Handles one frame on a chat connection.
fn on_frame(
    context: &WorkerContext,
    user: &ChatUser,
    frame: ServerFrame,
    outstanding: &mut VecDeque<Outstanding>,
) {
    let ServerFrame::Event { name, data } = frame else {
        count_frame(context, frame);
        return;
    };
    match name.as_str() {
        "NEW_MESSAGE" => match sent_time(&data) {
            Some(sent_us) => {
                bump(&context.counters.delivered);
                context.record_delivery(sent_us, user.with_storm);
            }
            None => bump(&context.counters.foreign_messages),
        },
        "MESSAGE_SENT" => {
            bump(&context.counters.acked);
            let id = data.get("clientMessageId").and_then(Value::as_str);
            if let Some(entry) = take_outstanding(outstanding, id) {
                drop_one(&context.counters.in_flight);
                context.recorders.ack.record(entry.sent.elapsed());
            }
        }
        "ERROR" => {
            context.count_error(&data);
            // The servers handle one connection's events in order, and a
            // chat connection sends only NEW_MESSAGE, so an ERROR is the
            // reply to the oldest message. Host errors such as RATE_LIMITED
            // carry no event name.
            let event = data.get("event").and_then(Value::as_str);
            if matches!(event, None | Some("NEW_MESSAGE")) && outstanding.pop_front().is_some() {
                drop_one(&context.counters.in_flight);
            }
        }
        "RATE_LIMIT_EXCEEDED" => {
            bump(&context.counters.rate_limited);
            if outstanding.pop_front().is_some() {
                drop_one(&context.counters.in_flight);
            }
        }
        _ => context.count_event(&name, &data),
    }
}

/// Removes the entry with this clientMessageId, or the oldest entry when
/// the acknowledgement has none.
fn take_outstanding(
    outstanding: &mut VecDeque<Outstanding>,
    id: Option<&str>,
) -> Option<Outstanding> {
    let position = match id {
        Some(id) => outstanding
            .iter()
            .position(|entry| entry.client_message_id == id)
            .unwrap_or(0),
        None => 0,
    };
    outstanding.remove(position)
}

/// Takes a closed connection's unanswered messages off the in-flight gauge.
fn forget_outstanding(context: &WorkerContext, outstanding: &mut VecDeque<Outstanding>) {
    for _ in outstanding.drain(..) {
        drop_one(&context.counters.in_flight);
    }
}

/// Waits until every user has stopped sending, every sent message is
/// acknowledged or rejected and every acknowledged one delivered, or until
/// `limit` passes.
async fn drain(context: &WorkerContext, senders: &AtomicU64, limit: Duration) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        let counters = context.counters.snapshot();
        let quiet = senders.load(Ordering::Acquire) == 0;
        if quiet && counters.in_flight == 0 && counters.delivered >= counters.acked {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts this worker's share of the storm: attempts spread evenly over
/// the storm window, each new user held until the worker closes.
fn spawn_storm(
    context: &Arc<WorkerContext>,
    chat: &ChatArgs,
    storm: &PresenceArgs,
    started: Instant,
    tasks: &mut JoinSet<()>,
) {
    let range = context.share(u64::from(storm.storm_connections));
    let count = range.end - range.start;
    if count == 0 {
        return;
    }
    let first_ordinal = chat.connection_count();
    let begin = started + Duration::from_secs(storm.storm_after);
    let window = Duration::from_secs(storm.storm_window);
    let permits = Arc::new(Semaphore::new(
        context.concurrency_share(storm.storm_concurrency),
    ));
    let remaining = Arc::new(AtomicU64::new(count));
    for (position, index) in range.enumerate() {
        let offset = window.mul_f64(position as f64 / count as f64);
        let context = Arc::clone(context);
        let permits = Arc::clone(&permits);
        let remaining = Arc::clone(&remaining);
        tasks.spawn(async move {
            let ordinal = first_ordinal + index;
            let opened = storm_attempt(&context, &permits, begin + offset, ordinal).await;
            if remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
                let now = context.now_us();
                context.storm.end_us.store(now, Ordering::Release);
            }
            if let Some(connection) = opened {
                hold(&context, connection).await;
            }
        });
    }
}

/// Opens one storm connection once its start time comes.
async fn storm_attempt(
    context: &WorkerContext,
    permits: &Semaphore,
    at: Instant,
    ordinal: u64,
) -> Option<Connection> {
    tokio::select! {
        () = tokio::time::sleep_until(at) => {}
        () = context.wait_phase(Phase::Stop) => {}
    }
    let _permit = permits.acquire().await.ok()?;
    if context.phase_now() == Phase::Stop {
        bump(&context.counters.not_attempted);
        return None;
    }
    let now = context.now_us();
    let _ = context
        .storm
        .start_us
        .compare_exchange(0, now, Ordering::AcqRel, Ordering::Acquire);
    bump(&context.counters.storm_attempts);
    let (target, source) = context.route(ordinal, ordinal);
    let user_id = context.user_id(ordinal);
    match client::connect(&context.client, target, source, &user_id).await {
        Ok((connection, timing)) => {
            bump(&context.counters.storm_connected);
            bump(&context.counters.open);
            context.recorders.storm_handshake.record(timing.total);
            Some(connection)
        }
        Err(error) => {
            bump(&context.counters.storm_failed);
            context
                .connect_errors
                .add(format!("storm {}", error.label()));
            None
        }
    }
}
