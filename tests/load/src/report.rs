//! The run's result: worker reports merged, derived rates, server readings,
//! the JSON document and the human summary.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;
use serde_json::Value;

use crate::cli::{Protocol, Scenario};
use crate::coordinator::Outcome;
use crate::procfs::ProcessSample;
use crate::stats::{histogram_from, merge_tally, CounterSnapshot, LatencySummary};

/// Facts about the run that the report repeats.
pub struct RunInfo {
    pub scenario: Scenario,
    pub protocol: Protocol,
    pub urls: Vec<String>,
    pub processes: u16,
    pub source_addresses: u8,
    pub user_prefix: String,
    pub started_at_unix_ms: u64,
    pub warnings: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub tool: &'static str,
    pub version: &'static str,
    pub scenario: &'static str,
    pub protocol: Protocol,
    pub urls: Vec<String>,
    pub processes: u16,
    pub source_addresses: u8,
    pub user_prefix: String,
    pub parameters: Value,
    pub started_at_unix_ms: u64,
    /// Seconds spent opening connections before the measured run.
    pub setup_s: f64,
    /// Seconds of the measured run (for chat: the sending window).
    pub run_s: f64,
    pub interrupted: bool,
    pub counters: CounterSnapshot,
    /// Connections open when the run ended.
    pub open_at_stop: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub throughput: Option<Throughput>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connects: Option<ConnectRate>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storm: Option<StormSummary>,
    /// Latency percentiles by histogram name: `handshake` (TCP connect to
    /// CONNECTION_SUCCESS), `tcp`, `upgrade`, `delivery` (send to receive),
    /// `ack` (send to MESSAGE_SENT), `delivery_before_storm`,
    /// `delivery_during_storm`, `delivery_after_storm`, `storm_handshake`.
    pub latency_ms: BTreeMap<String, LatencySummary>,
    pub close_reasons: BTreeMap<String, u64>,
    pub connect_errors: BTreeMap<String, u64>,
    pub error_codes: BTreeMap<String, u64>,
    pub servers: Vec<ServerUsage>,
    /// nexus-load's own worker processes when the run ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generator: Option<GeneratorUsage>,
    /// Growth of the servers' summed VmRSS per connection open at the end.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_per_connection_bytes: Option<f64>,
    pub worker_failures: Vec<String>,
    pub warnings: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Throughput {
    pub sent_per_s: f64,
    pub acked_per_s: f64,
    pub delivered_per_s: f64,
}

#[derive(Debug, Serialize)]
pub struct ConnectRate {
    /// Seconds from the first attempt to the last handshake's end.
    pub elapsed_s: f64,
    pub connects_per_s: f64,
}

#[derive(Debug, Serialize)]
pub struct StormSummary {
    /// Seconds after the run started when the first storm attempt began.
    pub start_s: f64,
    /// Seconds from the first storm attempt to the last one's end.
    pub duration_s: f64,
    pub connects_per_s: f64,
}

#[derive(Debug, Serialize)]
pub struct GeneratorUsage {
    /// Summed VmRSS of the worker processes, in KiB.
    pub rss_kib: u64,
    /// Summed CPU seconds of the worker processes since they started.
    pub cpu_s: f64,
}

#[derive(Debug, Serialize)]
pub struct ServerUsage {
    pub pid: u32,
    pub rss_kib_before: u64,
    pub rss_kib_after: u64,
    pub rss_kib_delta: i64,
    /// CPU seconds the server used from before setup to the end of the run.
    pub cpu_s: f64,
}

/// Merges the workers' reports and derives the rates.
pub fn build(info: RunInfo, outcome: Outcome) -> Report {
    let mut counters = CounterSnapshot::default();
    let mut open_at_stop = 0;
    let mut pairs: BTreeMap<String, Vec<[u64; 2]>> = BTreeMap::new();
    let mut close_reasons = BTreeMap::new();
    let mut connect_errors = BTreeMap::new();
    let mut error_codes = BTreeMap::new();
    let mut finished_ms: Option<u64> = None;
    let mut all_finished = !outcome.reports.is_empty();
    let mut storm_start: Option<u64> = None;
    let mut storm_end: Option<u64> = None;
    for report in &outcome.reports {
        counters.add(&report.counters);
        open_at_stop += report.open_at_stop;
        for (name, values) in &report.histograms {
            pairs.entry(name.clone()).or_default().extend(values);
        }
        merge_tally(&mut close_reasons, &report.close_reasons);
        merge_tally(&mut connect_errors, &report.connect_errors);
        merge_tally(&mut error_codes, &report.error_codes);
        match report.finished_ms {
            Some(ms) => finished_ms = Some(finished_ms.map_or(ms, |max| max.max(ms))),
            None => all_finished = false,
        }
        if let Some(ms) = report.storm_start_ms {
            storm_start = Some(storm_start.map_or(ms, |min| min.min(ms)));
        }
        if let Some(ms) = report.storm_end_ms {
            storm_end = Some(storm_end.map_or(ms, |max| max.max(ms)));
        }
    }
    let latency_ms = pairs
        .iter()
        .filter_map(|(name, values)| {
            LatencySummary::of(&histogram_from(values)).map(|summary| (name.clone(), summary))
        })
        .collect();

    let run_s = outcome.run.as_secs_f64();
    let per_second = |count: u64| {
        if run_s > 0.0 {
            count as f64 / run_s
        } else {
            0.0
        }
    };
    let throughput =
        matches!(info.scenario, Scenario::Chat(_) | Scenario::Presence(_)).then(|| Throughput {
            sent_per_s: per_second(counters.sent),
            acked_per_s: per_second(counters.acked),
            delivered_per_s: per_second(counters.delivered),
        });
    let connects = matches!(info.scenario, Scenario::Connect(_)).then(|| {
        let elapsed_s = match finished_ms {
            Some(ms) if all_finished => ms as f64 / 1000.0,
            _ => run_s,
        };
        ConnectRate {
            elapsed_s,
            connects_per_s: rate(counters.connected, elapsed_s),
        }
    });
    let storm = match (&info.scenario, storm_start, storm_end) {
        (Scenario::Presence(_), Some(start), end) => {
            let duration_s = end.map_or(run_s, |end| end.saturating_sub(start) as f64 / 1000.0);
            Some(StormSummary {
                start_s: start as f64 / 1000.0,
                duration_s,
                connects_per_s: rate(counters.storm_connected, duration_s),
            })
        }
        _ => None,
    };

    let servers = server_usage(&outcome.servers_before, &outcome.servers_after);
    let samples: Vec<_> = outcome
        .reports
        .iter()
        .filter_map(|report| report.process)
        .collect();
    let generator = (!samples.is_empty()).then(|| GeneratorUsage {
        rss_kib: samples.iter().map(|sample| sample.rss_kib).sum(),
        cpu_s: samples.iter().map(|sample| sample.cpu_s).sum(),
    });
    let memory_per_connection_bytes = match info.scenario {
        Scenario::Idle(_) if !servers.is_empty() && open_at_stop > 0 => {
            let delta: i64 = servers.iter().map(|server| server.rss_kib_delta).sum();
            Some(delta as f64 * 1024.0 / open_at_stop as f64)
        }
        _ => None,
    };

    Report {
        tool: "nexus-load",
        version: env!("CARGO_PKG_VERSION"),
        scenario: info.scenario.name(),
        protocol: info.protocol,
        urls: info.urls,
        processes: info.processes,
        source_addresses: info.source_addresses,
        user_prefix: info.user_prefix,
        parameters: scenario_parameters(&info.scenario),
        started_at_unix_ms: info.started_at_unix_ms,
        setup_s: outcome.setup.as_secs_f64(),
        run_s,
        interrupted: outcome.interrupted,
        counters,
        open_at_stop,
        throughput,
        connects,
        storm,
        latency_ms,
        close_reasons,
        connect_errors,
        error_codes,
        servers,
        generator,
        memory_per_connection_bytes,
        worker_failures: outcome.failures,
        warnings: info.warnings,
    }
}

fn rate(count: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        count as f64 / seconds
    } else {
        0.0
    }
}

fn scenario_parameters(scenario: &Scenario) -> Value {
    let value = match scenario {
        Scenario::Idle(args) => serde_json::to_value(args),
        Scenario::Chat(args) => serde_json::to_value(args),
        Scenario::Connect(args) => serde_json::to_value(args),
        Scenario::Presence(args) => serde_json::to_value(args),
    };
    value.unwrap_or(Value::Null)
}

fn server_usage(before: &[ProcessSample], after: &[ProcessSample]) -> Vec<ServerUsage> {
    before
        .iter()
        .zip(after)
        .map(|(before, after)| ServerUsage {
            pid: before.pid,
            rss_kib_before: before.rss_kib,
            rss_kib_after: after.rss_kib,
            rss_kib_delta: after.rss_kib as i64 - before.rss_kib as i64,
            cpu_s: after.cpu_s - before.cpu_s,
        })
        .collect()
}

/// Formats the human summary printed on stdout.
pub fn summary(report: &Report) -> String {
    let mut text = String::new();
    let _ = writeln!(
        text,
        "nexus-load {}: protocol {}, {} server URL(s), {} process(es){}",
        report.scenario,
        match report.protocol {
            Protocol::Native => "native",
            Protocol::Socketio => "socketio",
        },
        report.urls.len(),
        report.processes,
        if report.interrupted {
            ", interrupted"
        } else {
            ""
        },
    );
    let _ = writeln!(
        text,
        "  setup {:.1} s, run {:.1} s",
        report.setup_s, report.run_s
    );

    write_connections(&mut text, report);
    write_messages(&mut text, report);
    for (name, latency) in ordered_latencies(&report.latency_ms) {
        let _ = writeln!(
            text,
            "  {name} latency: p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms, max {:.2} ms (n={})",
            latency.p50_ms, latency.p95_ms, latency.p99_ms, latency.max_ms, latency.count
        );
    }
    write_resources(&mut text, report);

    write_tally(&mut text, "close reasons", &report.close_reasons);
    write_tally(&mut text, "connect errors", &report.connect_errors);
    write_tally(&mut text, "ERROR codes", &report.error_codes);
    for failure in &report.worker_failures {
        let _ = writeln!(text, "  worker failure: {failure}");
    }
    for warning in &report.warnings {
        let _ = writeln!(text, "  warning: {warning}");
    }
    text
}

fn write_connections(text: &mut String, report: &Report) {
    let c = &report.counters;
    let _ = writeln!(
        text,
        "  connections: {} attempted, {} connected, {} failed, {} not attempted, \
         {} open at the end, {} dropped",
        c.connect_attempts,
        c.connected,
        c.connect_failed,
        c.not_attempted,
        report.open_at_stop,
        c.dropped
    );
    if c.storm_attempts > 0 {
        let _ = writeln!(
            text,
            "  storm: {} attempted, {} connected, {} failed",
            c.storm_attempts, c.storm_connected, c.storm_failed
        );
    }
    if let Some(storm) = &report.storm {
        let _ = writeln!(
            text,
            "  storm timing: began {:.1} s into the run, lasted {:.2} s, {:.0} connects/s",
            storm.start_s, storm.duration_s, storm.connects_per_s
        );
    }
    if let Some(connects) = &report.connects {
        let _ = writeln!(
            text,
            "  connect rate: {:.1} connects/s over {:.2} s",
            connects.connects_per_s, connects.elapsed_s
        );
    }
}

fn write_messages(text: &mut String, report: &Report) {
    let c = &report.counters;
    if c.sent > 0 || report.throughput.is_some() {
        let _ = writeln!(
            text,
            "  messages: {} sent, {} acked, {} delivered, {} ERROR, {} RATE_LIMIT_EXCEEDED, \
             {} send failures",
            c.sent, c.acked, c.delivered, c.errors, c.rate_limited, c.send_failed
        );
    } else if c.errors > 0 || c.rate_limited > 0 {
        let _ = writeln!(
            text,
            "  events: {} ERROR, {} RATE_LIMIT_EXCEEDED",
            c.errors, c.rate_limited
        );
    }
    if let Some(throughput) = &report.throughput {
        let _ = writeln!(
            text,
            "  throughput: {:.1} sent/s, {:.1} acked/s, {:.1} delivered/s",
            throughput.sent_per_s, throughput.acked_per_s, throughput.delivered_per_s
        );
    }
    if c.presence_updates > 0 || c.foreign_messages > 0 || c.malformed_frames > 0 {
        let _ = writeln!(
            text,
            "  other frames: {} USER_PRESENCE_UPDATE, {} other events, {} foreign NEW_MESSAGE, \
             {} malformed",
            c.presence_updates, c.other_events, c.foreign_messages, c.malformed_frames
        );
    }
}

fn write_resources(text: &mut String, report: &Report) {
    for server in &report.servers {
        let _ = writeln!(
            text,
            "  server pid {}: VmRSS {:.1} MiB -> {:.1} MiB ({:+.1} MiB), {:.2} CPU s",
            server.pid,
            server.rss_kib_before as f64 / 1024.0,
            server.rss_kib_after as f64 / 1024.0,
            server.rss_kib_delta as f64 / 1024.0,
            server.cpu_s
        );
    }
    if let Some(generator) = &report.generator {
        let _ = writeln!(
            text,
            "  nexus-load itself: VmRSS {:.1} MiB, {:.2} CPU s",
            generator.rss_kib as f64 / 1024.0,
            generator.cpu_s
        );
    }
    if let Some(bytes) = report.memory_per_connection_bytes {
        let _ = writeln!(
            text,
            "  server memory per connection: {:.0} bytes ({:.1} KiB)",
            bytes,
            bytes / 1024.0
        );
    }
}

/// Lists the latencies in the order a reader follows a message, then any
/// others by name.
fn ordered_latencies(latencies: &BTreeMap<String, LatencySummary>) -> Vec<(&str, &LatencySummary)> {
    const ORDER: [&str; 9] = [
        "delivery",
        "ack",
        "delivery_before_storm",
        "delivery_during_storm",
        "delivery_after_storm",
        "storm_handshake",
        "handshake",
        "tcp",
        "upgrade",
    ];
    let mut ordered: Vec<(&str, &LatencySummary)> = ORDER
        .iter()
        .filter_map(|name| latencies.get(*name).map(|summary| (*name, summary)))
        .collect();
    for (name, summary) in latencies {
        if !ORDER.contains(&name.as_str()) {
            ordered.push((name, summary));
        }
    }
    ordered
}

fn write_tally(text: &mut String, title: &str, counts: &BTreeMap<String, u64>) {
    if counts.is_empty() {
        return;
    }
    let _ = writeln!(text, "  {title}:");
    for (label, count) in counts {
        let _ = writeln!(text, "    {count:>8}  {label}");
    }
}
