//! The scenarios, as run by one worker on its share of the connections.

mod chat;
mod connect;
mod idle;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::Instant;

use crate::cli::Scenario;
use crate::client::{self, Connection, HandshakeTiming};
use crate::stats::bump;
use crate::worker::{Phase, WorkerContext, WorkerEvent, WorkerReport};

/// Runs this worker's share of `scenario` and returns its measurements.
pub async fn run_worker(
    context: Arc<WorkerContext>,
    scenario: Scenario,
    events: mpsc::UnboundedSender<WorkerEvent>,
    closing: watch::Sender<bool>,
) -> WorkerReport {
    match scenario {
        Scenario::Idle(args) => idle::run(context, &args, &events, &closing).await,
        Scenario::Chat(args) => chat::run(context, &args, None, &events, &closing).await,
        Scenario::Presence(args) => {
            chat::run(context, &args.chat, Some(&args), &events, &closing).await
        }
        Scenario::Connect(args) => connect::run(context, &args, &events, &closing).await,
    }
}

/// Waits for `Run` and notes when it arrived.
async fn start_run(context: &WorkerContext) -> Instant {
    context.wait_phase(Phase::Run).await;
    context
        .run_started_us
        .store(context.now_us(), Ordering::Release);
    Instant::now()
}

/// Opens and authenticates the connection with this ordinal, counting the
/// attempt, its outcome and its handshake times. An attempt that would start
/// after `deadline`, or after `Stop`, is counted as not attempted.
async fn open_connection(
    context: &WorkerContext,
    permits: &Semaphore,
    ordinal: u64,
    target_index: u64,
    deadline: Option<Instant>,
) -> Option<(Connection, HandshakeTiming)> {
    let _permit = permits.acquire().await.ok()?;
    let late = deadline.is_some_and(|deadline| Instant::now() >= deadline);
    if late || context.phase_now() == Phase::Stop {
        bump(&context.counters.not_attempted);
        return None;
    }
    bump(&context.counters.connect_attempts);
    let (target, source) = context.route(target_index, ordinal);
    let user_id = context.user_id(ordinal);
    match client::connect(&context.client, target, source, &user_id).await {
        Ok((connection, timing)) => {
            bump(&context.counters.connected);
            bump(&context.counters.open);
            context.recorders.record_handshake(&timing);
            Some((connection, timing))
        }
        Err(error) => {
            bump(&context.counters.connect_failed);
            context.connect_errors.add(error.label());
            None
        }
    }
}

/// Counts `expected` completions on `done`, returning early when every
/// sender is gone.
async fn await_all(done: &mut mpsc::UnboundedReceiver<()>, expected: u64) {
    let mut seen = 0;
    while seen < expected {
        if done.recv().await.is_none() {
            return;
        }
        seen += 1;
    }
}
