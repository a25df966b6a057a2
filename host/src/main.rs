//! `nexus-host`: the native WebSocket host of Nexus Chat.

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::sync::watch;
use tracing::{error, info};

use nexus_host::app::App;
use nexus_host::config::Config;
use nexus_host::delivery::backplane::Backplane;
use nexus_host::delivery::registry::Registry;
use nexus_host::manifest::Manifest;
use nexus_host::runtime::state::Backends;
use nexus_host::runtime::Runtime;
use nexus_host::{lifecycle, metrics, migrate, net, token};

#[derive(Parser)]
#[command(name = "nexus-host", version, about = "Nexus Chat WebSocket host")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    config: Config,
}

#[derive(Subcommand)]
enum Command {
    /// Serve WebSockets and HTTP routes (the default).
    Serve,
    /// Apply pending Postgres migrations and exit.
    Migrate,
    /// Print a development token for USER_ID, signed with JWT_SECRET.
    Token {
        user_id: String,
        /// Token lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl_s: u64,
    },
}

/// jemalloc instead of glibc's malloc: connect storms spent about 17% of
/// the host's CPU samples in glibc's malloc and free, and jemalloc cut the
/// host's CPU per connect by about a sixth (bench notes in
/// docs/BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    // `.env.local` is optional; the environment wins over it.
    let _ = dotenvy::from_filename(".env.local");
    let cli = Cli::parse();
    init_tracing(&cli.config);

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            error!(cause = %error, "failed to start the async runtime");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command.unwrap_or(Command::Serve) {
            Command::Serve => serve(cli.config).await,
            Command::Migrate => {
                let applied = migrate::run(&cli.config.database_url).await?;
                info!(applied, "migrations up to date");
                Ok(())
            }
            Command::Token { user_id, ttl_s } => token::print(&cli.config, &user_id, ttl_s),
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            error!(cause = %format!("{error:#}"), "nexus-host failed");
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_tracing(config: &Config) {
    let spec = std::env::var("RUST_LOG").ok();
    let filter = nexus_host::logging::log_filter(spec.as_deref());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if config.is_production() {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    config.validate()?;
    let instance_id = config
        .instance_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::now_v7().simple().to_string()[20..].to_string());
    info!(instance_id, port = config.port, "starting");

    let applied = migrate::run(&config.database_url).await?;
    info!(applied, "migrations up to date");

    let manifest = Manifest::load(&config.manifest)?;
    info!(application = %manifest.app_name, components = manifest.components.len(), "manifest loaded");
    let metrics = Arc::new(metrics::Metrics::new());
    let backends = Arc::new(Backends::new(
        config.io_timeout(),
        config.postgres_pool_size,
        metrics.clone(),
    ));
    let redis_url = config.redis_url();
    let commands = backends
        .redis(&redis_url)
        .await
        .context("failed to connect to Redis; check REDIS_URL or REDIS_HOST/REDIS_PORT")?;
    let postgres = backends.postgres(&config.database_url).await?;
    let runtime = Arc::new(Runtime::load(&manifest, &config, backends.clone())?);

    let registry = Arc::new(Registry::default());
    let backplane = Backplane::connect(
        &redis_url,
        commands,
        instance_id.clone(),
        registry.clone(),
        metrics.clone(),
        config.presence_ttl(),
        config.io_timeout(),
    )
    .await?;
    backplane.spawn_refresh();
    let (offline_tx, offline_rx) = tokio::sync::mpsc::unbounded_channel();
    backplane.spawn_heartbeat(
        Duration::from_millis(config.instance_heartbeat_ms),
        Duration::from_millis(config.instance_ttl_ms),
        offline_tx,
    );

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let address: SocketAddr = format!("{}:{}", config.bind_address, config.port)
        .parse()
        .context("invalid BIND_ADDRESS or PORT")?;
    let (socketio_layer, socketio) = net::socketio::layer(
        config.max_frame_bytes,
        config.ping_interval(),
        config.send_queue_frames,
    );
    let app = Arc::new(App::new(
        config,
        manifest,
        runtime,
        registry,
        backplane,
        postgres,
        metrics,
        instance_id,
        shutdown_rx,
    ));

    lifecycle::spawn_offline_announcer(app.clone(), offline_rx);
    lifecycle::spawn_reloader(app.clone());
    net::socketio::attach(&socketio, app.clone());

    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("failed to listen on {address}"))?;
    info!(%address, "listening");
    let router = net::server::router(app.clone(), socketio_layer);
    // TODO: axum::serve sets no header-read, body-read or idle timeout, so a
    // client that sends part of a request keeps its connection until it
    // closes. The nginx config in deploy/ bounds both reads (nginx's 60 s
    // client_header_timeout and client_body_timeout).
    let server = axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        shutdown_signal().await;
        info!("shutting down: closing connections with 1012");
        let _ = shutdown_tx.send(true);
    });
    let server = tokio::spawn(server.into_future());
    let mut shutdown = app.shutdown.clone();
    let _ = shutdown.wait_for(|stopping| *stopping).await;
    // Sessions finish their event in flight and close; give them a bound.
    // The HTTP server stops first; upgraded WebSockets are tasks of their
    // own, so wait for their sessions to finish their close handshakes.
    let drained = async {
        let served = server.await;
        while app.metrics.connections.get() > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        served
    };
    match tokio::time::timeout(Duration::from_secs(10), drained).await {
        Ok(result) => result??,
        Err(_) => info!("connections still open after 10 s; exiting"),
    }
    app.backplane.retire().await;
    info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("failed to install the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
