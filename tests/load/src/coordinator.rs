//! The coordinator: starts the workers (one in this process, or N child
//! processes that re-run this binary), moves them through the phases,
//! prints progress and collects their reports.

use std::ffi::OsString;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{mpsc, watch};
use tokio::time::{sleep_until, Instant};

use crate::cli::Scenario;
use crate::procfs::{self, ProcessSample};
use crate::scenario;
use crate::stats::CounterSnapshot;
use crate::worker::{self, Phase, WorkerContext, WorkerEvent, WorkerReport};

/// What the coordinator needs besides the scenario.
pub struct RunSettings {
    pub scenario: Scenario,
    pub processes: u16,
    pub server_pids: Vec<u32>,
    pub progress_interval: Duration,
    pub setup_timeout: Duration,
    pub handshake_timeout: Duration,
    /// Environment for child processes (the resolved user prefix).
    pub child_env: Vec<(String, String)>,
}

/// Everything the coordinator observed.
pub struct Outcome {
    pub reports: Vec<WorkerReport>,
    pub failures: Vec<String>,
    pub setup: Duration,
    pub run: Duration,
    pub servers_before: Vec<ProcessSample>,
    pub servers_after: Vec<ProcessSample>,
    pub interrupted: bool,
}

/// A message from a worker, tagged with its index.
enum Input {
    Event(WorkerEvent),
    Exited(String),
}

/// How the coordinator reaches one worker.
enum Handle {
    InProcess(watch::Sender<Phase>),
    Child(Option<ChildStdin>),
}

impl Handle {
    async fn send(&mut self, phase: Phase) {
        match self {
            Handle::InProcess(sender) => {
                sender.send_if_modified(|current| {
                    let advance = phase > *current;
                    if advance {
                        *current = phase;
                    }
                    advance
                });
            }
            Handle::Child(stdin) => {
                let line: &[u8] = match phase {
                    Phase::Setup => return,
                    Phase::Run => b"start\n",
                    Phase::Stop => b"stop\n",
                };
                if let Some(pipe) = stdin.as_mut() {
                    // A child that is gone shows up as Exited; nothing to do here.
                    let written = pipe.write_all(line).await.and(pipe.flush().await);
                    if written.is_err() {
                        *stdin = None;
                    }
                }
            }
        }
    }
}

#[derive(Default)]
struct WorkerState {
    progress: CounterSnapshot,
    ready: bool,
    finished: bool,
    report: Option<WorkerReport>,
    failure: Option<String>,
}

impl WorkerState {
    fn done(&self) -> bool {
        self.report.is_some() || self.failure.is_some()
    }
}

/// Runs the scenario in this process with one worker.
pub async fn run_in_process(settings: RunSettings, context: WorkerContextParts) -> Result<Outcome> {
    let (input_tx, input_rx) = mpsc::unbounded_channel();
    let (phase_tx, phase_rx) = watch::channel(Phase::Setup);
    let (closing_tx, closing_rx) = watch::channel(false);
    let (events_tx, mut events_rx) = mpsc::unbounded_channel();
    let context = Arc::new(context.build(0, 1, phase_rx, closing_rx));

    let forward = input_tx.clone();
    tokio::spawn(async move {
        while let Some(event) = events_rx.recv().await {
            if forward.send((0, Input::Event(event))).is_err() {
                return;
            }
        }
    });
    let progress = worker::spawn_progress(Arc::clone(&context), events_tx.clone());
    let scenario_copy = settings.scenario.clone();
    tokio::spawn(async move {
        let report =
            scenario::run_worker(context, scenario_copy, events_tx.clone(), closing_tx).await;
        progress.abort();
        let _ = events_tx.send(WorkerEvent::Result {
            report: Box::new(report),
        });
    });
    drop(input_tx);
    coordinate(settings, vec![Handle::InProcess(phase_tx)], input_rx).await
}

/// Runs the scenario in `settings.processes` child processes that re-run
/// this binary with the same arguments plus their worker index.
pub async fn run_children(settings: RunSettings, args: Vec<OsString>) -> Result<Outcome> {
    let executable =
        std::env::current_exe().context("locating the nexus-load executable failed")?;
    let (input_tx, input_rx) = mpsc::unbounded_channel();
    let mut handles = Vec::new();
    let mut children: Vec<Child> = Vec::new();
    for index in 0..settings.processes {
        let mut command = Command::new(&executable);
        command
            .args(&args)
            .arg("--worker-index")
            .arg(index.to_string())
            .arg("--worker-count")
            .arg(settings.processes.to_string())
            .envs(settings.child_env.iter().map(|(key, value)| (key, value)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .with_context(|| format!("starting worker process {index} failed"))?;
        let stdout = child.stdout.take().context("worker stdout is not piped")?;
        let stdin = child.stdin.take();
        let sender = input_tx.clone();
        let slot = usize::from(index);
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            loop {
                match lines.next_line().await {
                    Ok(Some(line)) => match serde_json::from_str::<WorkerEvent>(&line) {
                        Ok(event) => {
                            let _ = sender.send((slot, Input::Event(event)));
                        }
                        Err(error) => {
                            let text: String = line.chars().take(200).collect();
                            eprintln!(
                                "nexus-load: worker {slot} wrote an invalid line \
                                     ({error}): {text}"
                            );
                        }
                    },
                    Ok(None) => break,
                    Err(error) => {
                        let _ = sender.send((
                            slot,
                            Input::Exited(format!("reading its output failed: {error}")),
                        ));
                        return;
                    }
                }
            }
            let _ = sender.send((slot, Input::Exited("its output ended".to_string())));
        });
        handles.push(Handle::Child(stdin));
        children.push(child);
    }
    drop(input_tx);
    let outcome = coordinate(settings, handles, input_rx).await;
    for child in &mut children {
        let waited = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
        if waited.is_err() {
            let _ = child.kill().await;
        }
    }
    outcome
}

/// Returns how long the run phase lasts at most.
fn run_length(scenario: &Scenario) -> Duration {
    Duration::from_secs(match scenario {
        Scenario::Idle(args) => args.duration,
        Scenario::Chat(args) => args.duration,
        Scenario::Connect(args) => args.duration,
        Scenario::Presence(args) => args.chat.duration,
    })
}

fn drain_length(scenario: &Scenario) -> Duration {
    Duration::from_secs(match scenario {
        Scenario::Chat(args) => args.drain,
        Scenario::Presence(args) => args.chat.drain,
        Scenario::Idle(_) | Scenario::Connect(_) => 0,
    })
}

async fn coordinate(
    settings: RunSettings,
    mut handles: Vec<Handle>,
    mut input: mpsc::UnboundedReceiver<(usize, Input)>,
) -> Result<Outcome> {
    let servers_before = sample_servers(&settings.server_pids)?;
    let begun = Instant::now();
    let mut states: Vec<WorkerState> = handles.iter().map(|_| WorkerState::default()).collect();
    let mut progress = Progress::new(settings.progress_interval, begun);
    let mut interrupted = false;
    let interrupt = tokio::signal::ctrl_c();
    tokio::pin!(interrupt);

    // Setup: every worker opens its connections and reports Ready.
    let setup_limit =
        begun + settings.setup_timeout + settings.handshake_timeout + Duration::from_secs(30);
    while !states.iter().all(|state| state.ready || state.done()) {
        tokio::select! {
            received = input.recv() => match received {
                Some((index, message)) => apply(&mut states, index, message),
                None => break,
            },
            () = sleep_until(setup_limit) => {
                eprintln!(
                    "nexus-load: the connection phase ran past its time limit; starting anyway"
                );
                break;
            }
            () = progress.due() => progress.print("setup", &states),
            _ = &mut interrupt => {
                interrupted = true;
                break;
            }
        }
    }
    let setup = begun.elapsed();

    // Run: until the scenario's time is up or every worker finished.
    let run_started = Instant::now();
    if !interrupted {
        for handle in &mut handles {
            handle.send(Phase::Run).await;
        }
        let run_limit = run_started + run_length(&settings.scenario);
        progress.restart();
        while !states.iter().all(|state| state.finished || state.done()) {
            tokio::select! {
                received = input.recv() => match received {
                    Some((index, message)) => apply(&mut states, index, message),
                    None => break,
                },
                () = sleep_until(run_limit) => break,
                () = progress.due() => progress.print("run", &states),
                _ = &mut interrupt => {
                    interrupted = true;
                    break;
                }
            }
        }
    }
    let run = run_started.elapsed();
    // Read the servers while the connections are still open.
    let servers_after = sample_servers(&settings.server_pids)?;

    // Stop: workers drain, close their connections and report.
    for handle in &mut handles {
        handle.send(Phase::Stop).await;
    }
    let report_limit = Instant::now()
        + drain_length(&settings.scenario)
        + settings.handshake_timeout
        + Duration::from_secs(30);
    while !states.iter().all(WorkerState::done) {
        tokio::select! {
            received = input.recv() => match received {
                Some((index, message)) => apply(&mut states, index, message),
                None => break,
            },
            () = sleep_until(report_limit) => break,
            () = progress.due() => progress.print("stop", &states),
        }
    }

    let mut reports = Vec::new();
    let mut failures = Vec::new();
    for (index, state) in states.into_iter().enumerate() {
        match (state.report, state.failure) {
            (Some(report), _) => reports.push(report),
            (None, Some(failure)) => failures.push(format!("worker {index}: {failure}")),
            (None, None) => failures.push(format!("worker {index}: sent no result in time")),
        }
    }
    Ok(Outcome {
        reports,
        failures,
        setup,
        run,
        servers_before,
        servers_after,
        interrupted,
    })
}

fn apply(states: &mut [WorkerState], index: usize, message: Input) {
    let Some(state) = states.get_mut(index) else {
        return;
    };
    match message {
        Input::Event(WorkerEvent::Progress { counters }) => state.progress = counters,
        Input::Event(WorkerEvent::Ready) => state.ready = true,
        Input::Event(WorkerEvent::Finished) => state.finished = true,
        Input::Event(WorkerEvent::Result { report }) => {
            state.progress = report.counters;
            state.report = Some(*report);
        }
        Input::Event(WorkerEvent::Failed { error }) => state.failure = Some(error),
        Input::Exited(how) => {
            if state.report.is_none() && state.failure.is_none() {
                state.failure = Some(format!("exited before reporting ({how})"));
            }
        }
    }
}

fn sample_servers(pids: &[u32]) -> Result<Vec<ProcessSample>> {
    pids.iter().map(|pid| procfs::sample(*pid)).collect()
}

/// Prints one progress line to stderr every interval.
struct Progress {
    interval: Duration,
    begun: Instant,
    next: Instant,
}

impl Progress {
    fn new(interval: Duration, begun: Instant) -> Self {
        Self {
            interval,
            begun,
            next: begun + interval,
        }
    }

    fn restart(&mut self) {
        self.next = Instant::now() + self.interval;
    }

    async fn due(&self) {
        sleep_until(self.next).await;
    }

    fn print(&mut self, phase: &str, states: &[WorkerState]) {
        self.next += self.interval;
        let mut total = CounterSnapshot::default();
        for state in states {
            total.add(&state.progress);
        }
        eprintln!(
            "[{:>6.1}s] {phase}: connected {} (failed {}) open {} | sent {} acked {} delivered {} \
             | errors {} rate-limited {} dropped {}",
            self.begun.elapsed().as_secs_f64(),
            total.connected + total.storm_connected,
            total.connect_failed + total.storm_failed,
            total.open,
            total.sent,
            total.acked,
            total.delivered,
            total.errors,
            total.rate_limited,
            total.dropped,
        );
    }
}

/// The parts of a [`WorkerContext`] that do not depend on the worker's
/// index and channels.
pub struct WorkerContextParts {
    pub client: crate::client::ClientSettings,
    pub targets: Vec<crate::target::Target>,
    pub sources: Vec<std::net::IpAddr>,
    pub user_prefix: String,
    pub setup_timeout: Duration,
}

impl WorkerContextParts {
    pub fn build(
        self,
        index: u16,
        count: u16,
        phase: watch::Receiver<Phase>,
        closing: watch::Receiver<bool>,
    ) -> WorkerContext {
        let epoch = Instant::now();
        WorkerContext {
            index,
            count,
            client: self.client,
            targets: self.targets,
            sources: self.sources,
            user_prefix: self.user_prefix,
            counters: Default::default(),
            recorders: Default::default(),
            close_reasons: Default::default(),
            connect_errors: Default::default(),
            error_codes: Default::default(),
            storm: Default::default(),
            epoch,
            run_started_us: Default::default(),
            setup_deadline: epoch + self.setup_timeout,
            phase,
            closing,
        }
    }
}
