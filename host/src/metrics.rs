//! Prometheus metrics of one host process, served at `GET /metrics`.
//!
//! Label values are bounded: event names are the manifest's routes (others
//! count as `unknown`), component ids come from the manifest, and outcomes,
//! routes and close codes are fixed sets.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

pub struct Metrics {
    registry: Registry,
    /// Open WebSocket and Socket.IO connections.
    pub connections: Gauge,
    /// Authenticated users with a connection on this instance.
    pub authenticated_users: Gauge,
    /// Events handled, by event name and outcome.
    pub events: Family<Labels, Counter>,
    /// Messages accepted (`NEW_MESSAGE` handled without an error).
    pub messages: Counter,
    /// Time of one component invocation, instantiation included.
    pub invocation_seconds: Family<Labels, Histogram>,
    /// Guest traps and deadline overruns, by component and kind.
    pub guest_failures: Family<Labels, Counter>,
    /// `RATE_LIMIT_EXCEEDED` replies and frames over the per-connection
    /// rate, by event.
    pub rate_limited: Family<Labels, Counter>,
    /// Frames delivered to users, by route (`local` or `remote`).
    pub deliveries: Family<Labels, Counter>,
    /// Connections the server closed, by close code.
    pub closes: Family<Labels, Counter>,
    /// Handshakes rejected (origin, connection cap) and failed reads.
    pub connection_errors: Family<Labels, Counter>,
    /// Redis and Postgres calls that failed, by backend.
    pub storage_errors: Family<Labels, Counter>,
    /// Postgres pool connections: `size` open, `available` idle.
    pub postgres_pool: Family<Labels, Gauge>,
    /// Component reloads, by outcome (`applied`, `rejected`).
    pub reloads: Family<Labels, Counter>,
}

fn invocation_histogram() -> Histogram {
    // 20 us to about 5 s.
    Histogram::new(exponential_buckets(0.000_02, 2.0, 18))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("nexus");
        let connections = Gauge::default();
        let authenticated_users = Gauge::default();
        let events = Family::<Labels, Counter>::default();
        let messages = Counter::default();
        let invocation_seconds = Family::<Labels, Histogram>::new_with_constructor(
            invocation_histogram as fn() -> Histogram,
        );
        let guest_failures = Family::<Labels, Counter>::default();
        let rate_limited = Family::<Labels, Counter>::default();
        let deliveries = Family::<Labels, Counter>::default();
        let closes = Family::<Labels, Counter>::default();
        let connection_errors = Family::<Labels, Counter>::default();
        let storage_errors = Family::<Labels, Counter>::default();
        let postgres_pool = Family::<Labels, Gauge>::default();
        let reloads = Family::<Labels, Counter>::default();

        registry.register(
            "connections",
            "Open client connections",
            connections.clone(),
        );
        registry.register(
            "authenticated_users",
            "Users with an authenticated connection on this instance",
            authenticated_users.clone(),
        );
        registry.register(
            "events",
            "Client and host events handled, by event and outcome",
            events.clone(),
        );
        registry.register("messages", "Messages accepted", messages.clone());
        registry.register(
            "component_invocation_seconds",
            "Time of one component invocation, instantiation included",
            invocation_seconds.clone(),
        );
        registry.register(
            "guest_failures",
            "Component traps and deadline overruns",
            guest_failures.clone(),
        );
        registry.register(
            "rate_limited",
            "Events rejected by a rate limit",
            rate_limited.clone(),
        );
        registry.register(
            "deliveries",
            "Frames delivered to users, by route",
            deliveries.clone(),
        );
        registry.register(
            "server_closes",
            "Connections closed by the server, by close code",
            closes.clone(),
        );
        registry.register(
            "connection_errors",
            "Rejected handshakes and failed connections, by reason",
            connection_errors.clone(),
        );
        registry.register(
            "storage_errors",
            "Failed Redis and Postgres calls",
            storage_errors.clone(),
        );
        registry.register(
            "postgres_pool_connections",
            "Postgres pool connections by state",
            postgres_pool.clone(),
        );
        registry.register(
            "component_reloads",
            "Component reloads by outcome",
            reloads.clone(),
        );

        Self {
            registry,
            connections,
            authenticated_users,
            events,
            messages,
            invocation_seconds,
            guest_failures,
            rate_limited,
            deliveries,
            closes,
            connection_errors,
            storage_errors,
            postgres_pool,
            reloads,
        }
    }

    pub fn event(&self, event: &str, outcome: &'static str) {
        self.events
            .get_or_create(&vec![
                ("event", event.to_string()),
                ("outcome", outcome.to_string()),
            ])
            .inc();
    }

    pub fn storage_error(&self, backend: &'static str) {
        self.storage_errors
            .get_or_create(&Self::label("backend", backend))
            .inc();
    }

    pub fn label(name: &'static str, value: impl Into<String>) -> Labels {
        vec![(name, value.into())]
    }

    /// Renders the Prometheus text format.
    pub fn render(&self) -> String {
        let mut text = String::new();
        if let Err(error) = encode(&mut text, &self.registry) {
            tracing::warn!(cause = %error, "failed to encode metrics");
        }
        text
    }
}
