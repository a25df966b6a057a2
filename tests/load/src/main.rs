//! nexus-load: drives Nexus Chat (native protocol) or the reference
//! Socket.IO gateway with the same scenarios, on loopback only.

mod cli;
mod client;
mod coordinator;
mod procfs;
mod report;
mod scenario;
mod stats;
mod target;
mod token;
mod wire;
mod worker;

use std::ffi::OsString;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Parser;
use tokio::sync::{mpsc, watch};

use crate::cli::{AuthMode, Cli, CommonArgs, Protocol, Scenario, MAX_CONNECTIONS};
use crate::client::ClientSettings;
use crate::coordinator::{RunSettings, WorkerContextParts};
use crate::report::RunInfo;
use crate::token::TokenMinter;
use crate::worker::{Phase, WorkerEvent};

/// Open files each process keeps free for itself (stdio, runtime, pipes).
const RESERVED_FILES: u64 = 256;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("nexus-load: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let common = &cli.common;
    let protocol = common.protocol;
    let auth = match (protocol, common.auth) {
        (Protocol::Socketio, Some(AuthMode::Header)) => bail!(
            "--auth header is not available with --protocol socketio: Socket.IO clients \
             authenticate with the authenticate event"
        ),
        (Protocol::Socketio, _) => AuthMode::Event,
        (Protocol::Native, mode) => mode.unwrap_or(AuthMode::Header),
    };
    let targets = common
        .urls
        .iter()
        .map(|url| target::parse_target(url, protocol))
        .collect::<Result<Vec<_>>>()?;
    let secret = match common.jwt_secret.as_deref() {
        Some(secret) if !secret.is_empty() => secret.to_string(),
        _ => bail!("JWT_SECRET is not set; export the servers' token secret as JWT_SECRET"),
    };

    let total = cli.scenario.connection_count();
    if total > MAX_CONNECTIONS {
        bail!("the scenario opens {total} connections; the maximum is {MAX_CONNECTIONS}");
    }
    let file_limit = procfs::open_file_limit()?;
    let per_process = file_limit.saturating_sub(RESERVED_FILES).max(1);

    let runtime = build_runtime(common.threads)?;
    let parts = |user_prefix: String| WorkerContextParts {
        client: ClientSettings {
            protocol,
            auth,
            minter: TokenMinter::new(&secret, Duration::from_secs(common.token_ttl)),
            handshake_timeout: Duration::from_secs(common.handshake_timeout),
        },
        targets: targets.clone(),
        sources: target::source_addresses(common.source_addresses),
        user_prefix,
        setup_timeout: Duration::from_secs(common.setup_timeout),
    };

    if let (Some(index), Some(count)) = (common.worker_index, common.worker_count) {
        let prefix = common
            .user_prefix
            .clone()
            .context("a worker process needs the parent's user prefix")?;
        let share = worker::share(total, count, index);
        check_share(share.end - share.start, per_process, file_limit)?;
        return runtime.block_on(run_child(cli.scenario.clone(), parts(prefix), index, count));
    }

    let processes = match common.processes {
        0 => u16::try_from(total.div_ceil(per_process))
            .unwrap_or(u16::MAX)
            .max(1),
        explicit => explicit,
    };
    let largest_share = total.div_ceil(u64::from(processes));
    check_share(largest_share, per_process, file_limit).with_context(|| {
        format!(
            "pass --processes {} or more, or --processes 0 to choose automatically",
            total.div_ceil(per_process)
        )
    })?;
    let user_prefix = common
        .user_prefix
        .clone()
        .unwrap_or_else(default_user_prefix);
    let warnings = collect_warnings(&cli.scenario, common, targets.len());
    for warning in &warnings {
        eprintln!("nexus-load: warning: {warning}");
    }

    let settings = RunSettings {
        scenario: cli.scenario.clone(),
        processes,
        server_pids: common.server_pids.clone(),
        progress_interval: Duration::from_secs(common.progress_interval),
        setup_timeout: Duration::from_secs(common.setup_timeout),
        handshake_timeout: Duration::from_secs(common.handshake_timeout),
        child_env: vec![("NEXUS_LOAD_USER_PREFIX".to_string(), user_prefix.clone())],
    };
    let info = RunInfo {
        scenario: cli.scenario.clone(),
        protocol,
        urls: common.urls.clone(),
        processes,
        source_addresses: common.source_addresses,
        user_prefix: user_prefix.clone(),
        started_at_unix_ms: unix_ms(),
        warnings,
    };
    eprintln!(
        "nexus-load: {} with {} connection(s) over {} process(es), users {}N",
        cli.scenario.name(),
        total,
        processes,
        user_prefix
    );
    let outcome = if processes == 1 {
        runtime.block_on(coordinator::run_in_process(settings, parts(user_prefix)))?
    } else {
        let args: Vec<OsString> = std::env::args_os().skip(1).collect();
        runtime.block_on(coordinator::run_children(settings, args))?
    };
    // Children may still hold blocking stdin readers; do not wait for them.
    runtime.shutdown_background();

    let report = report::build(info, outcome);
    print!("{}", report::summary(&report));
    if let Some(path) = &common.out {
        let json = serde_json::to_string_pretty(&report).context("encoding the result failed")?;
        std::fs::write(path, json + "\n")
            .with_context(|| format!("writing the result to {} failed", path.display()))?;
        eprintln!("nexus-load: result written to {}", path.display());
    }
    Ok(if report.worker_failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn build_runtime(threads: u16) -> Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if threads > 0 {
        builder.worker_threads(usize::from(threads));
    }
    builder.build().context("starting the tokio runtime failed")
}

fn check_share(connections: u64, per_process: u64, file_limit: u64) -> Result<()> {
    if connections > per_process {
        bail!(
            "one process would open {connections} connections, but the open-file limit is \
             {file_limit} ({per_process} usable for connections)"
        );
    }
    Ok(())
}

/// Runs one worker as a child process of a coordinator.
async fn run_child(
    scenario: Scenario,
    parts: WorkerContextParts,
    index: u16,
    count: u16,
) -> Result<ExitCode> {
    // The terminal sends Ctrl-C to the whole process group. The parent
    // handles it and sends its children the stop command.
    tokio::spawn(async { while tokio::signal::ctrl_c().await.is_ok() {} });
    let (phase_tx, phase_rx) = watch::channel(Phase::Setup);
    let (closing_tx, closing_rx) = watch::channel(false);
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let context = Arc::new(parts.build(index, count, phase_rx, closing_rx));
    let progress = worker::spawn_progress(Arc::clone(&context), events_tx.clone());
    tokio::spawn(async move {
        let report = scenario::run_worker(context, scenario, events_tx.clone(), closing_tx).await;
        progress.abort();
        let _ = events_tx.send(WorkerEvent::Result {
            report: Box::new(report),
        });
    });
    worker::serve_child(phase_tx, events_rx).await?;
    // The stdin reader blocks a runtime thread; leave without waiting for it.
    std::process::exit(0);
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Returns `load-` plus a run id from the clock and PID, so that each run
/// has its own users.
fn default_user_prefix() -> String {
    format!("load-{:x}{:x}-", unix_ms(), std::process::id())
}

/// The servers' default per-user message limit (messages per minute).
const SERVER_MESSAGE_LIMIT_PER_MINUTE: f64 = 100.0;
/// Nexus Chat's default MAX_EVENTS_PER_SECOND per connection.
const SERVER_FRAMES_PER_SECOND: f64 = 20.0;

/// Warns about settings that will run into the servers' default limits or
/// the token lifetime.
fn collect_warnings(scenario: &Scenario, common: &CommonArgs, target_count: usize) -> Vec<String> {
    let mut warnings = Vec::new();
    let (chat, duration) = match scenario {
        Scenario::Chat(args) => (Some(args), args.duration + args.drain),
        Scenario::Presence(args) => (Some(&args.chat), args.chat.duration + args.chat.drain),
        Scenario::Idle(args) => (None, args.duration),
        Scenario::Connect(args) => (None, args.duration),
    };
    if let Some(chat) = chat {
        let users = chat.connection_count() as f64;
        if chat.rate == 0 {
            warnings.push(format!(
                "--rate 0 sends as fast as acknowledgements allow; each user will pass the \
                 servers' default limit of {SERVER_MESSAGE_LIMIT_PER_MINUTE} messages per minute \
                 (and Nexus Chat's {SERVER_FRAMES_PER_SECOND} frames per second per connection) \
                 unless both are raised on the servers"
            ));
        } else {
            let per_user_minute = f64::from(chat.rate) * 60.0 / users;
            if per_user_minute > SERVER_MESSAGE_LIMIT_PER_MINUTE {
                warnings.push(format!(
                    "each user sends about {per_user_minute:.0} messages per minute, more than \
                     the servers' default limit of {SERVER_MESSAGE_LIMIT_PER_MINUTE}; raise the \
                     limit on the servers, or add --pairs or --rotate"
                ));
            }
            let per_connection_second = f64::from(chat.rate) / users;
            if per_connection_second > SERVER_FRAMES_PER_SECOND {
                warnings.push(format!(
                    "each connection sends about {per_connection_second:.0} frames per second, \
                     more than Nexus Chat's default MAX_EVENTS_PER_SECOND of \
                     {SERVER_FRAMES_PER_SECOND}"
                ));
            }
        }
        if chat.cross_instance && target_count < 2 {
            warnings.push(
                "--cross-instance needs at least two --url values; all pairs use one server"
                    .to_string(),
            );
        }
    }
    if let Scenario::Presence(args) = scenario {
        if args.storm_after >= args.chat.duration {
            warnings.push(format!(
                "--storm-after {} s is not shorter than --duration {} s, so no storm happens",
                args.storm_after, args.chat.duration
            ));
        }
    }
    let lifetime = common.setup_timeout + duration;
    if common.token_ttl < lifetime {
        warnings.push(format!(
            "--token-ttl {} s is shorter than the run may last ({lifetime} s); servers close \
             connections whose token expires",
            common.token_ttl
        ));
    }
    warnings
}
