//! `idle`: open connections, hold them until `Stop`, count how many stayed.

use std::sync::Arc;

use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;

use super::{await_all, open_connection, start_run};
use crate::cli::IdleArgs;
use crate::worker::{hold, Phase, WorkerContext, WorkerEvent, WorkerReport};

pub async fn run(
    context: Arc<WorkerContext>,
    args: &IdleArgs,
    events: &mpsc::UnboundedSender<WorkerEvent>,
    closing: &watch::Sender<bool>,
) -> WorkerReport {
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
            let deadline = Some(context.setup_deadline);
            let opened = open_connection(&context, &permits, ordinal, ordinal, deadline).await;
            let _ = done.send(());
            drop(done);
            if let Some((connection, _)) = opened {
                hold(&context, connection).await;
            }
        });
    }
    drop(done_tx);
    await_all(&mut done_rx, expected).await;
    let _ = events.send(WorkerEvent::Ready);

    start_run(&context).await;
    context.wait_phase(Phase::Stop).await;
    let at_stop = context.at_stop();
    let _ = closing.send(true);
    while tasks.join_next().await.is_some() {}
    context.report(at_stop)
}
