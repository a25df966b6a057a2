//! Command-line interface: the options shared by every scenario and one
//! subcommand per scenario. Every count and time has an upper bound, so a
//! run always ends by itself.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;

#[derive(Parser, Debug)]
#[command(
    name = "nexus-load",
    version,
    about = "Load generator for Nexus Chat and the reference Socket.IO gateway",
    long_about = "Load generator for Nexus Chat and the reference Socket.IO gateway. \
        It connects only to loopback servers (127.0.0.0/8, ::1, localhost), mints its own \
        HS256 tokens from JWT_SECRET, prints progress to stderr, a summary to stdout and, \
        with --out, a JSON result file."
)]
pub struct Cli {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(subcommand)]
    pub scenario: Scenario,
}

/// Options that every scenario takes.
#[derive(Args, Debug, Clone)]
#[command(next_display_order = 1000)]
pub struct CommonArgs {
    /// Wire protocol: native JSON frames at /ws, or Socket.IO v4 at /socket.io/.
    #[arg(long, value_enum, default_value_t = Protocol::Native, global = true)]
    pub protocol: Protocol,

    /// Server URL (ws:// or http://, loopback only); repeat for several
    /// instances. Connections are spread over them in turn.
    #[arg(
        long = "url",
        value_name = "URL",
        default_value = "ws://127.0.0.1:3000",
        global = true
    )]
    pub urls: Vec<String>,

    /// Secret that signs the HS256 tokens; must equal the servers'
    /// JWT_SECRET. Prefer the environment variable, which `ps` does not show.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true, global = true)]
    pub jwt_secret: Option<String>,

    /// How to authenticate: `header` sends `Authorization: Bearer` with the
    /// WebSocket handshake, `event` sends an `authenticate` event after it.
    /// Default: header for native, event for Socket.IO (its only way).
    #[arg(long, value_enum, global = true)]
    pub auth: Option<AuthMode>,

    /// Number of loopback source addresses (127.0.0.1 to 127.0.0.N) that
    /// client sockets bind to; each has its own ephemeral port range.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u8).range(1..=254), global = true)]
    pub source_addresses: u8,

    /// Worker processes that split the connections; 0 picks the fewest
    /// that the open-file limit allows. 1 runs everything in this process.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=32), global = true)]
    pub processes: u16,

    /// Tokio worker threads per process (0: one per core).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=64), global = true)]
    pub threads: u16,

    /// Write the JSON result to this file.
    #[arg(long, value_name = "PATH", global = true)]
    pub out: Option<PathBuf>,

    /// PID of a server process whose resident memory (VmRSS) and CPU time
    /// are read from /proc before and after the run; repeatable.
    #[arg(long = "server-pid", value_name = "PID", global = true)]
    pub server_pids: Vec<u32>,

    /// Seconds between progress lines on stderr.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=600), global = true)]
    pub progress_interval: u64,

    /// Seconds one connection may take from TCP connect to CONNECTION_SUCCESS.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=120), global = true)]
    pub handshake_timeout: u64,

    /// Seconds the connection phase before the measured run may take;
    /// connections not started by then are counted as not attempted.
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=1800), global = true)]
    pub setup_timeout: u64,

    /// Prefix of the generated user ids (default: `load-` and a run id, so
    /// runs do not share users, rate-limit counters or deduplication keys).
    #[arg(long, env = "NEXUS_LOAD_USER_PREFIX", global = true)]
    pub user_prefix: Option<String>,

    /// Lifetime of the minted tokens in seconds; a connection whose token
    /// expires is closed by the server.
    #[arg(long, default_value_t = 7200, value_parser = clap::value_parser!(u64).range(60..=86_400), global = true)]
    pub token_ttl: u64,

    /// Index of this worker process (set by the parent process).
    #[arg(long, hide = true, global = true)]
    pub worker_index: Option<u16>,

    /// Number of worker processes (set by the parent process).
    #[arg(long, hide = true, global = true)]
    pub worker_count: Option<u16>,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Native,
    Socketio,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    Header,
    Event,
}

#[derive(Subcommand, Debug, Clone)]
pub enum Scenario {
    /// Hold N authenticated connections for a while and measure the
    /// servers' memory per connection.
    Idle(IdleArgs),
    /// Pairs of users exchanging messages; measures throughput and
    /// send-to-receive latency.
    Chat(ChatArgs),
    /// A storm of new authenticated connections; measures connects per
    /// second and handshake latency.
    Connect(ConnectArgs),
    /// A chat run with a storm of new connections in the middle; measures
    /// the chat's latency before, during and after the storm.
    Presence(PresenceArgs),
}

impl Scenario {
    pub fn name(&self) -> &'static str {
        match self {
            Scenario::Idle(_) => "idle",
            Scenario::Chat(_) => "chat",
            Scenario::Connect(_) => "connect",
            Scenario::Presence(_) => "presence",
        }
    }

    /// Returns the number of connections the scenario opens at its peak.
    pub fn connection_count(&self) -> u64 {
        match self {
            Scenario::Idle(args) => u64::from(args.connections),
            Scenario::Chat(args) => args.connection_count(),
            Scenario::Connect(args) => u64::from(args.connections),
            Scenario::Presence(args) => {
                args.chat.connection_count() + u64::from(args.storm_connections)
            }
        }
    }
}

/// Upper bound on all connections of one run, over all worker processes.
pub const MAX_CONNECTIONS: u64 = 200_000;

#[derive(Args, Debug, Clone, Serialize)]
pub struct IdleArgs {
    /// Connections to open and hold.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=200_000))]
    pub connections: u32,

    /// Seconds to hold the connections once they are all open.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub duration: u64,

    /// Handshakes in progress at once, over all worker processes.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub concurrency: u32,
}

#[derive(Args, Debug, Clone, Serialize)]
pub struct ChatArgs {
    /// Pairs of users; both users of a pair send to each other.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=50_000))]
    pub pairs: u32,

    /// Users on each side of a pair that take turns sending, each with its
    /// own connection. With R users, each user sends every R-th message of
    /// its side, so the rate per user (which the servers limit) is divided
    /// by R.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub rotate: u32,

    /// Seconds of sending once all connections are open.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub duration: u64,

    /// Target messages per second over all senders; 0 sends as fast as the
    /// acknowledgements allow, with --in-flight messages unacknowledged per
    /// connection.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub rate: u32,

    /// With --rate 0: unacknowledged messages allowed per connection.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub in_flight: u32,

    /// Message content size in bytes (at least the timestamp header of
    /// about 13 to 31 bytes).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub payload_bytes: u32,

    /// Put the two users of a pair on different --url servers, so every
    /// message crosses instances.
    #[arg(long)]
    pub cross_instance: bool,

    /// Send no clientMessageId with messages (the ack latency is then
    /// matched to the oldest unacknowledged message).
    #[arg(long)]
    pub no_client_message_id: bool,

    /// Seconds to wait after sending stops for outstanding acks and
    /// deliveries.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(0..=60))]
    pub drain: u64,

    /// Handshakes in progress at once while the users connect, over all
    /// worker processes.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub concurrency: u32,
}

impl ChatArgs {
    pub fn connection_count(&self) -> u64 {
        u64::from(self.pairs) * u64::from(self.rotate) * 2
    }
}

#[derive(Args, Debug, Clone, Serialize)]
pub struct ConnectArgs {
    /// New connections to open; each stays open until the storm ends.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=200_000))]
    pub connections: u32,

    /// Handshakes in progress at once, over all worker processes.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub concurrency: u32,

    /// Maximum seconds for the storm; connections not started by then are
    /// counted as not attempted.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub duration: u64,
}

#[derive(Args, Debug, Clone, Serialize)]
pub struct PresenceArgs {
    #[command(flatten)]
    pub chat: ChatArgs,

    /// New users that connect during the storm.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub storm_connections: u32,

    /// Seconds after sending starts when the storm begins.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub storm_after: u64,

    /// Seconds over which the storm's connection attempts are spread evenly.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(0..=600))]
    pub storm_window: u64,

    /// Storm handshakes in progress at once, over all worker processes.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub storm_concurrency: u32,
}
