//! A worker runs its share of a scenario's connections, in this process or
//! in a child process, and talks to the coordinator through events.
//!
//! A worker first opens its connections (setup) and reports `Ready`. On
//! `Run` it starts the measured part, and a scenario that ends by itself
//! reports `Finished`. On `Stop` the worker stops sending, drains, closes
//! its connections and reports `Result`. A child process writes its events
//! to stdout as JSON lines and reads `start` and `stop` lines from stdin.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::client::{ClientSettings, Connection, HandshakeTiming, Incoming};
use crate::procfs::{self, ProcessSample};
use crate::stats::{bump, drop_one, CounterSnapshot, Counters, LatencyRecorder, Tally};
use crate::target::{source_for, Target};
use crate::wire::{self, ServerFrame};

/// The coordinator's instruction to the workers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Setup,
    Run,
    Stop,
}

/// A worker's message to the coordinator.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WorkerEvent {
    Progress { counters: CounterSnapshot },
    Ready,
    Finished,
    Result { report: Box<WorkerReport> },
    Failed { error: String },
}

/// Everything a worker measured, in a form that adds up over workers.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct WorkerReport {
    pub counters: CounterSnapshot,
    /// Connections still open when `Stop` arrived.
    pub open_at_stop: u64,
    /// Latency histograms by name, as `[value_us, count]` pairs.
    pub histograms: BTreeMap<String, Vec<[u64; 2]>>,
    /// How connections ended before the run was over, by close code or error.
    pub close_reasons: BTreeMap<String, u64>,
    /// Failed connection attempts by stage and cause.
    pub connect_errors: BTreeMap<String, u64>,
    /// ERROR events by code.
    pub error_codes: BTreeMap<String, u64>,
    /// Milliseconds from `Run` until the worker's scenario ended by itself
    /// (connect: the last handshake finished).
    pub finished_ms: Option<u64>,
    /// Milliseconds from `Run` to the first and the last storm handshake
    /// (presence).
    pub storm_start_ms: Option<u64>,
    pub storm_end_ms: Option<u64>,
    /// The worker process's own VmRSS and CPU time when `Stop` arrived.
    pub process: Option<ProcessSample>,
}

/// The latency histograms a worker keeps.
#[derive(Default)]
pub struct Recorders {
    pub handshake: LatencyRecorder,
    pub tcp: LatencyRecorder,
    pub upgrade: LatencyRecorder,
    pub delivery: LatencyRecorder,
    pub ack: LatencyRecorder,
    pub delivery_before_storm: LatencyRecorder,
    pub delivery_during_storm: LatencyRecorder,
    pub delivery_after_storm: LatencyRecorder,
    pub storm_handshake: LatencyRecorder,
}

impl Recorders {
    fn export(&self) -> BTreeMap<String, Vec<[u64; 2]>> {
        let named = [
            ("handshake", &self.handshake),
            ("tcp", &self.tcp),
            ("upgrade", &self.upgrade),
            ("delivery", &self.delivery),
            ("ack", &self.ack),
            ("delivery_before_storm", &self.delivery_before_storm),
            ("delivery_during_storm", &self.delivery_during_storm),
            ("delivery_after_storm", &self.delivery_after_storm),
            ("storm_handshake", &self.storm_handshake),
        ];
        named
            .into_iter()
            .map(|(name, recorder)| (name.to_string(), recorder.export()))
            .filter(|(_, pairs)| !pairs.is_empty())
            .collect()
    }

    pub fn record_handshake(&self, timing: &HandshakeTiming) {
        self.handshake.record(timing.total);
        self.tcp.record(timing.tcp);
        self.upgrade.record(timing.upgrade);
    }
}

/// Readings taken when `Stop` arrives.
pub struct AtStop {
    open: u64,
    process: Option<ProcessSample>,
}

/// Times of the presence storm, in microseconds on the worker's clock
/// (0 while unset).
#[derive(Default)]
pub struct StormClock {
    pub start_us: AtomicU64,
    pub end_us: AtomicU64,
}

/// Which part of a presence run a message was sent in.
enum StormPhase {
    Before,
    During,
    After,
}

impl StormClock {
    fn phase_of(&self, sent_us: u64) -> StormPhase {
        let start = self.start_us.load(Ordering::Acquire);
        let end = self.end_us.load(Ordering::Acquire);
        if start == 0 || sent_us < start {
            StormPhase::Before
        } else if end != 0 && sent_us > end {
            StormPhase::After
        } else {
            StormPhase::During
        }
    }
}

/// State shared by all tasks of one worker.
pub struct WorkerContext {
    pub index: u16,
    pub count: u16,
    pub client: ClientSettings,
    pub targets: Vec<Target>,
    pub sources: Vec<IpAddr>,
    pub user_prefix: String,
    pub counters: Counters,
    pub recorders: Recorders,
    pub close_reasons: Tally,
    pub connect_errors: Tally,
    pub error_codes: Tally,
    pub storm: StormClock,
    /// The worker's clock: message timestamps are microseconds since this.
    pub epoch: Instant,
    /// When `Run` arrived, in microseconds on the worker's clock (0 before).
    pub run_started_us: AtomicU64,
    /// Connections not started by this time count as not attempted.
    pub setup_deadline: Instant,
    pub phase: watch::Receiver<Phase>,
    /// Set by the worker to make every connection task close and exit.
    pub closing: watch::Receiver<bool>,
}

impl WorkerContext {
    /// Returns microseconds since the worker's epoch (at least 1, so that 0
    /// can mean "unset").
    pub fn now_us(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// Returns the user id for a connection ordinal; ordinals are global
    /// over all workers, so ids do not collide between processes.
    pub fn user_id(&self, ordinal: u64) -> String {
        format!("{}{ordinal}", self.user_prefix)
    }

    /// Picks the target and source address for a connection.
    pub fn route(&self, target_index: u64, ordinal: u64) -> (&Target, Option<IpAddr>) {
        let index = usize::try_from(target_index % self.targets.len() as u64).unwrap_or(0);
        let target = &self.targets[index];
        (target, source_for(&self.sources, target, ordinal))
    }

    /// Returns this worker's slice of `total` items.
    pub fn share(&self, total: u64) -> Range<u64> {
        share(total, self.count, self.index)
    }

    /// Returns this worker's part of a concurrency limit, at least 1.
    pub fn concurrency_share(&self, total: u32) -> usize {
        let count = u32::from(self.count.max(1));
        usize::try_from(total.div_ceil(count).max(1)).unwrap_or(1)
    }

    /// Records a delivered message's latency, and its storm phase's when a
    /// storm is part of the run.
    pub fn record_delivery(&self, sent_us: u64, with_storm: bool) {
        let latency = self.now_us().saturating_sub(sent_us);
        self.recorders.delivery.record_us(latency);
        if with_storm {
            let recorder = match self.storm.phase_of(sent_us) {
                StormPhase::Before => &self.recorders.delivery_before_storm,
                StormPhase::During => &self.recorders.delivery_during_storm,
                StormPhase::After => &self.recorders.delivery_after_storm,
            };
            recorder.record_us(latency);
        }
    }

    /// Counts one event that is not part of a chat exchange.
    pub fn count_event(&self, name: &str, data: &Value) {
        match name {
            "USER_PRESENCE_UPDATE" => bump(&self.counters.presence_updates),
            "ERROR" => self.count_error(data),
            "RATE_LIMIT_EXCEEDED" => bump(&self.counters.rate_limited),
            "NEW_MESSAGE" => bump(&self.counters.foreign_messages),
            _ => bump(&self.counters.other_events),
        }
    }

    pub fn count_error(&self, data: &Value) {
        bump(&self.counters.errors);
        let code = data
            .get("code")
            .and_then(Value::as_str)
            .unwrap_or("(no code)");
        self.error_codes.add(code);
    }

    /// Counts a connection that ended before the worker closed it.
    pub fn count_drop(&self, reason: &str) {
        bump(&self.counters.dropped);
        drop_one(&self.counters.open);
        self.close_reasons.add(reason);
    }

    /// Notes what the worker measures the moment `Stop` arrives, before it
    /// closes its connections.
    pub fn at_stop(&self) -> AtStop {
        AtStop {
            open: self.counters.open.load(Ordering::Relaxed),
            process: procfs::sample(std::process::id()).ok(),
        }
    }

    /// Collects the worker's measurements.
    pub fn report(&self, at_stop: AtStop) -> WorkerReport {
        let micros_to_ms = |micros: u64| (micros != 0).then_some(micros / 1000);
        let run_started = self.run_started_us.load(Ordering::Acquire);
        let relative =
            |micros: u64| micros_to_ms(micros).map(|ms| ms.saturating_sub(run_started / 1000));
        WorkerReport {
            counters: self.counters.snapshot(),
            open_at_stop: at_stop.open,
            histograms: self.recorders.export(),
            close_reasons: self.close_reasons.export(),
            connect_errors: self.connect_errors.export(),
            error_codes: self.error_codes.export(),
            finished_ms: None,
            storm_start_ms: relative(self.storm.start_us.load(Ordering::Acquire)),
            storm_end_ms: relative(self.storm.end_us.load(Ordering::Acquire)),
            process: at_stop.process,
        }
    }

    /// Waits until the coordinator's phase reaches `phase`.
    pub async fn wait_phase(&self, phase: Phase) {
        let mut receiver = self.phase.clone();
        let _ = receiver.wait_for(|current| *current >= phase).await;
    }

    pub fn phase_now(&self) -> Phase {
        *self.phase.borrow()
    }
}

/// Waits until the worker starts closing its connections. (The watch
/// guard is dropped here, so the caller's future stays `Send`.)
pub async fn wait_closing(closing: &mut watch::Receiver<bool>) {
    let _ = closing.wait_for(|closing| *closing).await;
}

/// Returns part `index` of `count` nearly equal parts of `0..total`.
pub fn share(total: u64, count: u16, index: u16) -> Range<u64> {
    let count = u64::from(count.max(1));
    let index = u64::from(index);
    (total * index / count)..(total * (index + 1) / count)
}

/// Holds an open connection: reads and counts events until the worker
/// closes its connections or the server ends this one.
pub async fn hold(context: &WorkerContext, mut connection: Connection) {
    let mut closing = context.closing.clone();
    loop {
        tokio::select! {
            message = connection.next_message() => {
                match connection.handle(message).await {
                    Incoming::Frame(frame) => count_frame(context, frame),
                    Incoming::Closed(reason) => {
                        context.count_drop(&reason);
                        return;
                    }
                }
            }
            () = wait_closing(&mut closing) => break,
        }
    }
    connection.close().await;
    drop_one(&context.counters.open);
}

/// Counts a frame read outside a chat exchange.
pub fn count_frame(context: &WorkerContext, frame: ServerFrame) {
    match frame {
        ServerFrame::Event { name, data } => context.count_event(&name, &data),
        ServerFrame::Malformed(_) => bump(&context.counters.malformed_frames),
        _ => {}
    }
}

/// Reads a NEW_MESSAGE's content and returns its send time when nexus-load
/// wrote it.
pub fn sent_time(data: &Value) -> Option<u64> {
    data.get("content")
        .and_then(Value::as_str)
        .and_then(wire::decode_content)
}

/// Sends a progress snapshot every second until the worker ends.
pub fn spawn_progress(
    context: Arc<WorkerContext>,
    events: mpsc::UnboundedSender<WorkerEvent>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        loop {
            ticker.tick().await;
            let counters = context.counters.snapshot();
            if events.send(WorkerEvent::Progress { counters }).is_err() {
                return;
            }
        }
    })
}

/// Runs a worker as a child process: forwards its events to stdout as JSON
/// lines and turns `start` and `stop` lines on stdin into phases. A closed
/// stdin (the parent is gone) stops the run.
pub async fn serve_child(
    phase: watch::Sender<Phase>,
    mut events: mpsc::UnboundedReceiver<WorkerEvent>,
) -> Result<()> {
    tokio::spawn(async move {
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        loop {
            let next = match lines.next_line().await {
                Ok(Some(line)) => match line.trim() {
                    "start" => Phase::Run,
                    "stop" => Phase::Stop,
                    other => {
                        eprintln!("nexus-load worker: ignoring unknown command {other:?}");
                        continue;
                    }
                },
                Ok(None) | Err(_) => Phase::Stop,
            };
            let stop = next == Phase::Stop;
            phase.send_if_modified(|current| {
                let advance = next > *current;
                if advance {
                    *current = next;
                }
                advance
            });
            if stop {
                return;
            }
        }
    });

    let mut stdout = tokio::io::stdout();
    while let Some(event) = events.recv().await {
        let mut line = serde_json::to_vec(&event).context("encoding a worker event failed")?;
        line.push(b'\n');
        stdout
            .write_all(&line)
            .await
            .context("writing to the parent process failed")?;
        stdout
            .flush()
            .await
            .context("writing to the parent process failed")?;
        if matches!(
            event,
            WorkerEvent::Result { .. } | WorkerEvent::Failed { .. }
        ) {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_everything_once() {
        for (total, count) in [(10, 3), (1, 4), (19_999, 2), (0, 2)] {
            let mut next = 0;
            for index in 0..count {
                let range = share(total, count, index);
                assert_eq!(range.start, next);
                next = range.end;
            }
            assert_eq!(next, total);
        }
    }

    #[test]
    fn storm_phases_follow_the_clock() {
        let clock = StormClock::default();
        assert!(matches!(clock.phase_of(5), StormPhase::Before));
        clock.start_us.store(10, Ordering::Release);
        assert!(matches!(clock.phase_of(5), StormPhase::Before));
        assert!(matches!(clock.phase_of(15), StormPhase::During));
        clock.end_us.store(20, Ordering::Release);
        assert!(matches!(clock.phase_of(20), StormPhase::During));
        assert!(matches!(clock.phase_of(21), StormPhase::After));
    }
}
