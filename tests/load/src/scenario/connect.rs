//! `connect`: on `Run`, open new connections as fast as the concurrency
//! limit allows, hold them until `Stop`, and report when the last
//! handshake finished.

use std::sync::Arc;

use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;

use super::{await_all, open_connection, start_run};
use crate::cli::ConnectArgs;
use crate::worker::{hold, Phase, WorkerContext, WorkerEvent, WorkerReport};

pub async fn run(
    context: Arc<WorkerContext>,
    args: &ConnectArgs,
    events: &mpsc::UnboundedSender<WorkerEvent>,
    closing: &watch::Sender<bool>,
) -> WorkerReport {
    let _ = events.send(WorkerEvent::Ready);
    let started = start_run(&context).await;

    let range = context.share(u64::from(args.connections));
    let expected = range.end - range.start;
    let permits = Arc::new(Semaphore::new(context.concurrency_share(args.concurrency)));
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let mut tasks = JoinSet::new();
    for ordinal in range {
        let context = Arc::clone(&context);
        let permits = Arc::clone(&permits);
        let done = done_tx.clone();
        tasks.spawn(async move {
            let opened = open_connection(&context, &permits, ordinal, ordinal, None).await;
            let _ = done.send(());
            drop(done);
            if let Some((connection, _)) = opened {
                hold(&context, connection).await;
            }
        });
    }
    drop(done_tx);

    let mut finished_ms = None;
    tokio::select! {
        () = await_all(&mut done_rx, expected) => {
            let elapsed = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
            finished_ms = Some(elapsed);
            let _ = events.send(WorkerEvent::Finished);
        }
        () = context.wait_phase(Phase::Stop) => {}
    }
    context.wait_phase(Phase::Stop).await;
    // Attempts still running at Stop finish within the handshake timeout.
    await_all(&mut done_rx, expected).await;
    let at_stop = context.at_stop();
    let _ = closing.send(true);
    while tasks.join_next().await.is_some() {}
    let mut report = context.report(at_stop);
    report.finished_ms = finished_ms;
    report
}
