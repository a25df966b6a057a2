//! The shared state of one host process.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::watch;

use crate::config::Config;
use crate::delivery::backplane::Backplane;
use crate::delivery::registry::Registry;
use crate::manifest::Manifest;
use crate::metrics::Metrics;
use crate::runtime::Runtime;

pub struct App {
    pub config: Config,
    /// The manifest in force; a reload replaces it.
    manifest: RwLock<Arc<Manifest>>,
    pub runtime: Arc<Runtime>,
    pub registry: Arc<Registry>,
    pub backplane: Arc<Backplane>,
    pub postgres: deadpool_postgres::Pool,
    pub metrics: Arc<Metrics>,
    pub instance_id: String,
    pub allowed_origins: Vec<String>,
    /// Flips to true when the process starts shutting down.
    pub shutdown: watch::Receiver<bool>,
    connections_per_ip: Mutex<HashMap<IpAddr, usize>>,
}

impl App {
    #[expect(clippy::too_many_arguments, reason = "built once at start-up")]
    pub fn new(
        config: Config,
        manifest: Manifest,
        runtime: Arc<Runtime>,
        registry: Arc<Registry>,
        backplane: Arc<Backplane>,
        postgres: deadpool_postgres::Pool,
        metrics: Arc<Metrics>,
        instance_id: String,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let allowed_origins = config.allowed_origins();
        Self {
            config,
            manifest: RwLock::new(Arc::new(manifest)),
            runtime,
            registry,
            backplane,
            postgres,
            metrics,
            instance_id,
            allowed_origins,
            shutdown,
            connections_per_ip: Mutex::new(HashMap::new()),
        }
    }

    /// Counts a new connection from `ip`, or returns None when the address
    /// already has `MAX_CONNECTIONS_PER_IP` open.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<AddressSlot> {
        let mut counts = self.connections_per_ip.lock().expect("lock poisoned");
        let count = counts.entry(ip).or_insert(0);
        if *count >= self.config.max_connections_per_ip {
            return None;
        }
        *count += 1;
        Some(AddressSlot {
            app: self.clone(),
            ip,
        })
    }

    pub fn manifest(&self) -> Arc<Manifest> {
        self.manifest
            .read()
            .expect("manifest lock poisoned")
            .clone()
    }

    pub fn set_manifest(&self, manifest: Manifest) {
        *self.manifest.write().expect("manifest lock poisoned") = Arc::new(manifest);
    }

    pub fn is_origin_allowed(&self, origin: &str) -> bool {
        let origin = origin.trim_end_matches('/');
        self.allowed_origins.iter().any(|allowed| allowed == origin)
    }
}

/// The address slot that a new Socket.IO session took at its handshake,
/// carried in the handshake request's extensions. The session's socket
/// takes it when it joins a namespace, and a session that never joins
/// frees it when the session ends.
#[derive(Clone)]
pub struct HandshakeSlot(pub Arc<Mutex<Option<AddressSlot>>>);

/// One counted connection of an address; dropping it frees the slot.
pub struct AddressSlot {
    app: Arc<App>,
    ip: IpAddr,
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut counts = self.app.connections_per_ip.lock().expect("lock poisoned");
        if let Some(count) = counts.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}
