//! Cost of one event on a fresh component instance, without I/O: the
//! presence component's `HEALTH_CHECK` (instantiate, call, drop the store)
//! through the same `Runtime::invoke` the sessions use.
//!
//! Run with `cargo bench -p nexus-host --bench invoke`. It prints the
//! median, p90 and p99 of single calls, after a warm-up.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use nexus_host::config::Config;
use nexus_host::manifest::Manifest;
use nexus_host::metrics::Metrics;
use nexus_host::runtime::bindings::{ConnectionInfo, Event, EventSource};
use nexus_host::runtime::state::Backends;
use nexus_host::runtime::Runtime;

/// The allocator of the nexus-host binary, so the benchmark measures the
/// same malloc and free as a running host.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Calls measured after the warm-up.
const SAMPLES: usize = 20_000;
const WARM_UP: usize = 2_000;

#[derive(Parser)]
struct BenchConfig {
    #[command(flatten)]
    config: Config,
}

fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * fraction).round() as usize;
    sorted[index]
}

fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let manifest = Manifest::load(&root.join("spin.toml"))?;
    // Only the variables matter here; nothing connects to Redis or Postgres.
    let BenchConfig { mut config } = BenchConfig::parse_from(["invoke-bench"]);
    config.jwt_secret = Some("benchmark-secret-benchmark-secret-0123".to_string());
    let metrics = Arc::new(Metrics::new());
    let backends = Arc::new(Backends::new(config.io_timeout(), 1, metrics));
    let runtime = Runtime::load(&manifest, &config, backends)?;

    let connection = ConnectionInfo {
        id: "bench".to_string(),
        instance_id: "bench".to_string(),
        user_id: Some("alice".to_string()),
        expires_at_ms: 0,
        remote_addr: "127.0.0.1:1".to_string(),
        now_ms: 0,
    };
    let event = Event {
        name: "HEALTH_CHECK".to_string(),
        data: "null".to_string(),
        source: EventSource::Client,
    };

    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let samples = tokio.block_on(async {
        for _ in 0..WARM_UP {
            runtime.invoke("presence", &connection, &event).await.ok();
        }
        let mut samples = Vec::with_capacity(SAMPLES);
        for _ in 0..SAMPLES {
            let started = Instant::now();
            let effects = runtime.invoke("presence", &connection, &event).await;
            samples.push(started.elapsed());
            assert!(effects.is_ok(), "HEALTH_CHECK failed: {effects:?}");
        }
        samples
    });
    let mut sorted = samples;
    sorted.sort();
    println!(
        "invoke presence HEALTH_CHECK (fresh instance per call, {SAMPLES} calls): \
         median {:.1} us, p90 {:.1} us, p99 {:.1} us",
        percentile(&sorted, 0.5).as_secs_f64() * 1e6,
        percentile(&sorted, 0.9).as_secs_f64() * 1e6,
        percentile(&sorted, 0.99).as_secs_f64() * 1e6,
    );
    Ok(())
}
