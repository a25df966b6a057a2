//! The Wasmtime side of the host: the engine, loading and pre-instantiating
//! components, and running one fresh instance per event or HTTP request.
//!
//! Nothing here depends on sockets: callers pass an event in and get
//! effects back.

pub mod bindings;
pub mod http;
pub mod outbound;
pub mod postgres;
pub mod redis;
pub mod state;
pub mod variables;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use tracing::{info, warn};
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{
    Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, StoreLimitsBuilder, Trap,
    UpdateDeadline,
};
use wasmtime_wasi::WasiCtxBuilder;
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::WasiHttpCtx;

use crate::config::Config;
use crate::manifest::{expand_template, ComponentSpec, Manifest};
use bindings::{ChatHostPre, ConnectionInfo, Effect, Event, EventSource, HandlerError};
use outbound::{url_host_port, OutboundPolicy};
use state::{Backends, ComponentContext, State};

/// Interval of the epoch ticker that enforces guest deadlines.
const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Guest computation between two yields to the async runtime.
const GUEST_SLICE: Duration = Duration::from_millis(10);

/// A component compiled and pre-instantiated against the host's linker.
pub struct LoadedComponent {
    pub id: String,
    /// SHA-256 of the `.wasm` file, in hex.
    pub digest: String,
    /// Load number, unique within this process; a reload that applies a new
    /// version gets a higher one.
    pub generation: u64,
    pub loaded_at: chrono::DateTime<chrono::Utc>,
    context: Arc<ComponentContext>,
    handler: ChatHostPre<State>,
    proxy: ProxyPre<State>,
}

/// Failure of an event to produce effects.
#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    /// The handler rejected the event with a typed error.
    #[error("{}: {}", .0.code, .0.message)]
    Rejected(HandlerError),
    /// The guest trapped (a panic, an out-of-bounds access, memory cap).
    #[error("handler trapped: {0}")]
    Trapped(String),
    /// The guest ran past its computation deadline.
    #[error("handler ran past its deadline")]
    DeadlineExceeded,
    /// No component handles the event, or it failed to instantiate.
    #[error("{0}")]
    Unavailable(String),
}

pub struct Runtime {
    engine: Engine,
    linker: Linker<State>,
    components: RwLock<HashMap<String, Arc<LoadedComponent>>>,
    backends: Arc<Backends>,
    /// One per running instance. An HTTP instance moves its permit into the
    /// task that runs it, so the permit lives as long as the instance.
    permits: Arc<Semaphore>,
    deadline: Duration,
    memory_cap: usize,
    /// Counts loads, so every loaded version has its own number.
    generations: AtomicU64,
}

/// Result of a reload for one component.
#[derive(Debug)]
pub enum ReloadOutcome {
    Unchanged,
    Applied { digest: String },
    Rejected { reason: String },
}

/// Name of the event a new component version must handle, without a trap,
/// before it serves. Any typed reply, an error included, passes.
const SELF_CHECK_EVENT: &str = "$self-check";

impl Runtime {
    /// Builds the engine and loads every component of the manifest.
    pub fn load(
        manifest: &Manifest,
        config: &Config,
        backends: Arc<Backends>,
    ) -> anyhow::Result<Self> {
        let memory_cap = config.instance_memory_mib * 1024 * 1024;
        let engine = build_engine(config, memory_cap)?;
        start_epoch_ticker(&engine);

        let mut linker: Linker<State> = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
        bindings::ChatHost::add_to_linker::<State, wasmtime::component::HasSelf<State>>(
            &mut linker,
            |state| state,
        )?;

        let runtime = Self {
            engine,
            linker,
            components: RwLock::new(HashMap::new()),
            backends,
            permits: Arc::new(Semaphore::new(config.max_concurrent_instances as usize)),
            deadline: config.handler_deadline(),
            memory_cap,
            generations: AtomicU64::new(0),
        };
        let app_variables = resolve_app_variables(manifest, config)?;
        let mut components = HashMap::new();
        for spec in &manifest.components {
            let loaded = runtime.compile(spec, &app_variables, &manifest.interface)?;
            components.insert(spec.id.clone(), Arc::new(loaded));
        }
        *runtime
            .components
            .write()
            .expect("components lock poisoned") = components;
        Ok(runtime)
    }

    /// Compiles and pre-instantiates one component against the host's
    /// linker, with its variables and outbound hosts resolved.
    fn compile(
        &self,
        spec: &ComponentSpec,
        app_variables: &BTreeMap<String, String>,
        interface: &str,
    ) -> anyhow::Result<LoadedComponent> {
        let started = Instant::now();
        let bytes = std::fs::read(&spec.source).with_context(|| {
            format!(
                "failed to read component {} from {}; build the components first",
                spec.id,
                spec.source.display()
            )
        })?;
        let digest = hex::encode(Sha256::digest(&bytes));
        let component = Component::new(&self.engine, &bytes)
            .map_err(anyhow::Error::from)
            .with_context(|| format!("failed to compile component {}", spec.id))?;
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(anyhow::Error::from)
            .with_context(|| {
                format!(
                    "component {} imports what the host does not provide",
                    spec.id
                )
            })?;
        let handler = ChatHostPre::new(pre.clone())
            .map_err(anyhow::Error::from)
            .with_context(|| format!("component {} does not export {interface}", spec.id))?;
        let proxy = ProxyPre::new(pre)
            .map_err(anyhow::Error::from)
            .with_context(|| {
                format!(
                    "component {} does not export wasi:http/incoming-handler",
                    spec.id
                )
            })?;

        let mut variables = HashMap::new();
        for (name, template) in &spec.variables {
            let value = expand_template(template, app_variables)
                .with_context(|| format!("component {} variable {name}", spec.id))?;
            variables.insert(name.clone(), value);
        }
        let allowed: Vec<String> = spec
            .allowed_outbound_hosts
            .iter()
            .map(|entry| expand_template(entry, app_variables))
            .collect::<anyhow::Result<_>>()?;
        let outbound = OutboundPolicy::new(&allowed)
            .with_context(|| format!("component {} allowed_outbound_hosts", spec.id))?;

        let generation = self.generations.fetch_add(1, Ordering::Relaxed) + 1;
        info!(
            component = %spec.id,
            digest = %&digest[..12],
            generation,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "component compiled"
        );
        Ok(LoadedComponent {
            id: spec.id.clone(),
            digest,
            generation,
            loaded_at: chrono::Utc::now(),
            context: Arc::new(ComponentContext {
                id: spec.id.clone(),
                variables,
                outbound,
            }),
            handler,
            proxy,
        })
    }

    /// Loads the components of `manifest` whose file or settings changed.
    /// A new version serves only after it compiled, linked against the
    /// host's interfaces and handled a self-check event without a trap.
    /// Otherwise the previous version keeps serving. Events already running
    /// finish on the version they started on.
    pub async fn reload(
        self: &Arc<Self>,
        manifest: &Manifest,
        config: &Config,
    ) -> anyhow::Result<Vec<(String, ReloadOutcome)>> {
        let app_variables = resolve_app_variables(manifest, config)?;
        let mut outcomes = Vec::new();
        for spec in &manifest.components {
            let outcome = self
                .reload_one(spec, &app_variables, &manifest.interface)
                .await;
            outcomes.push((spec.id.clone(), outcome));
        }
        Ok(outcomes)
    }

    async fn reload_one(
        self: &Arc<Self>,
        spec: &ComponentSpec,
        app_variables: &BTreeMap<String, String>,
        interface: &str,
    ) -> ReloadOutcome {
        let current = self.component(&spec.id).ok();
        let runtime = self.clone();
        let (spec_owned, variables, interface) =
            (spec.clone(), app_variables.clone(), interface.to_string());
        // Compiling takes about a second of CPU, off the async workers.
        let compiled = tokio::task::spawn_blocking(move || {
            runtime.compile(&spec_owned, &variables, &interface)
        })
        .await;
        let loaded = match compiled {
            Ok(Ok(loaded)) => loaded,
            Ok(Err(error)) => {
                return ReloadOutcome::Rejected {
                    reason: format!("{error:#}"),
                }
            }
            Err(error) => {
                return ReloadOutcome::Rejected {
                    reason: format!("compile task failed: {error}"),
                }
            }
        };
        if let Some(current) = &current {
            let same_settings = current.context.variables == loaded.context.variables
                && current.context.outbound == loaded.context.outbound;
            if current.digest == loaded.digest && same_settings {
                return ReloadOutcome::Unchanged;
            }
        }
        let loaded = Arc::new(loaded);
        if let Err(reason) = self.self_check(&loaded).await {
            return ReloadOutcome::Rejected { reason };
        }
        let digest = loaded.digest.clone();
        self.components
            .write()
            .expect("components lock poisoned")
            .insert(spec.id.clone(), loaded);
        ReloadOutcome::Applied { digest }
    }

    /// Runs the self-check event on a fresh instance of a new version.
    async fn self_check(&self, loaded: &Arc<LoadedComponent>) -> Result<(), String> {
        let connection = ConnectionInfo {
            id: "self-check".to_string(),
            instance_id: String::new(),
            user_id: None,
            expires_at_ms: 0,
            remote_addr: String::new(),
            now_ms: chrono::Utc::now().timestamp_millis().max(0) as u64,
        };
        let event = Event {
            name: SELF_CHECK_EVENT.to_string(),
            data: "{}".to_string(),
            source: EventSource::Host,
        };
        match self
            .invoke_loaded(loaded.clone(), &connection, &event)
            .await
        {
            Ok(_) | Err(InvokeError::Rejected(_)) => Ok(()),
            Err(error) => Err(format!("self-check failed: {error}")),
        }
    }

    pub fn components(&self) -> Vec<Arc<LoadedComponent>> {
        let components = self.components.read().expect("components lock poisoned");
        let mut list: Vec<_> = components.values().cloned().collect();
        list.sort_by(|a, b| a.id.cmp(&b.id));
        list
    }

    /// Reports whether a component with this id is loaded.
    pub fn has_component(&self, id: &str) -> bool {
        self.components
            .read()
            .expect("components lock poisoned")
            .contains_key(id)
    }

    fn component(&self, id: &str) -> anyhow::Result<Arc<LoadedComponent>> {
        self.components
            .read()
            .expect("components lock poisoned")
            .get(id)
            .cloned()
            .with_context(|| format!("component {id} is not loaded"))
    }

    fn new_store(&self, loaded: &LoadedComponent) -> Store<State> {
        let wasi = WasiCtxBuilder::new()
            .inherit_stderr()
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let limits = StoreLimitsBuilder::new()
            .memory_size(self.memory_cap)
            .instances(16)
            .tables(64)
            .memories(8)
            .trap_on_grow_failure(true)
            .build();
        let state = State {
            wasi,
            http: WasiHttpCtx::new(),
            table: ResourceTable::new(),
            limits,
            component: loaded.context.clone(),
            backends: self.backends.clone(),
            io_time: Duration::ZERO,
            started: Instant::now(),
            deadline: self.deadline,
            open_connections: 0,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| &mut state.limits);
        store.set_epoch_deadline(ticks_for(GUEST_SLICE));
        // The guest runs in slices of GUEST_SLICE of wall time and yields
        // between them, so a spinning guest cannot hold a worker thread
        // from other connections. At each slice end the guest's own
        // computation time (wall time minus host I/O) decides whether it
        // ran past its deadline.
        store.epoch_deadline_callback(|context| {
            let state = context.data();
            let used = state.guest_time();
            if used >= state.deadline {
                return Err(Trap::Interrupt.into());
            }
            Ok(UpdateDeadline::Yield(ticks_for(GUEST_SLICE)))
        });
        store
    }

    /// Handles one event on a fresh instance of `component`.
    pub async fn invoke(
        &self,
        component: &str,
        connection: &ConnectionInfo,
        event: &Event,
    ) -> Result<Vec<Effect>, InvokeError> {
        let loaded = self
            .component(component)
            .map_err(|error| InvokeError::Unavailable(error.to_string()))?;
        self.invoke_loaded(loaded, connection, event).await
    }

    async fn invoke_loaded(
        &self,
        loaded: Arc<LoadedComponent>,
        connection: &ConnectionInfo,
        event: &Event,
    ) -> Result<Vec<Effect>, InvokeError> {
        let component = loaded.id.as_str();
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| InvokeError::Unavailable("runtime is shutting down".to_string()))?;
        let mut store = self.new_store(&loaded);
        let instance = loaded
            .handler
            .instantiate_async(&mut store)
            .await
            .map_err(|error| {
                warn!(component, cause = %format!("{error:#}"), "instantiation failed");
                InvokeError::Unavailable(format!("component {component} could not start"))
            })?;
        let outcome = instance
            .nexus_chat_handler()
            .call_handle(&mut store, connection, event)
            .await;
        match outcome {
            Ok(Ok(effects)) => Ok(effects),
            Ok(Err(rejection)) => Err(InvokeError::Rejected(rejection)),
            Err(error) => {
                if matches!(error.downcast_ref::<Trap>(), Some(Trap::Interrupt)) {
                    Err(InvokeError::DeadlineExceeded)
                } else {
                    Err(InvokeError::Trapped(format!("{error:#}")))
                }
            }
        }
    }
}

fn ticks_for(duration: Duration) -> u64 {
    (duration.as_micros() / EPOCH_TICK.as_micros()).max(1) as u64 + 1
}

fn build_engine(config: &Config, memory_cap: usize) -> anyhow::Result<Engine> {
    let max_instances = config.max_concurrent_instances;
    let mut pool = PoolingAllocationConfig::default();
    // A Rust component has one or two core instances, memories and tables;
    // the pool reserves room for a few of each per component instance.
    pool.total_component_instances(max_instances)
        .total_core_instances(max_instances * 4)
        .total_memories(max_instances * 2)
        .total_tables(max_instances * 4)
        .max_memories_per_component(4)
        .max_tables_per_component(8)
        .max_core_instances_per_component(16)
        .max_memory_size(memory_cap);
    // An instance's memory goes back to the pool after every event. With
    // PAGEMAP_SCAN (Linux 6.7 and later) the pages the instance wrote are
    // reset by copying, up to keep_resident bytes, and stay mapped. So the
    // next instance in the slot takes no page faults on them, and no
    // madvise flushes the TLB. Without PAGEMAP_SCAN the lowest
    // keep_resident bytes are reset with memset. Either way the rest is
    // unmapped, and MAX_CONCURRENT_INSTANCES bounds the slots that keep
    // pages resident.
    let keep_resident = config.instance_keep_resident_kib * 1024;
    pool.pagemap_scan(wasmtime::Enabled::Auto)
        .linear_memory_keep_resident(keep_resident)
        .table_keep_resident(keep_resident);

    let cache = match &config.compile_cache_dir {
        Some(dir) if dir.as_os_str().is_empty() => None,
        dir => {
            let mut cache_config = wasmtime::CacheConfig::new();
            if let Some(dir) = dir {
                cache_config.with_directory(dir);
            }
            Some(wasmtime::Cache::new(cache_config).map_err(anyhow::Error::from)?)
        }
    };
    let mut config = wasmtime::Config::new();
    config
        .cache(cache)
        .wasm_component_model(true)
        .epoch_interruption(true)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    Engine::new(&config)
        .map_err(anyhow::Error::from)
        .context("failed to create the Wasmtime engine")
}

fn start_epoch_ticker(engine: &Engine) {
    let engine = engine.weak();
    std::thread::Builder::new()
        .name("epoch-ticker".to_string())
        .spawn(move || loop {
            std::thread::sleep(EPOCH_TICK);
            match engine.upgrade() {
                Some(engine) => engine.increment_epoch(),
                None => break,
            }
        })
        .expect("failed to start the epoch ticker thread");
}

/// Resolves the application variables of `spin.toml`: `SPIN_VARIABLE_<NAME>`
/// first, then the host settings mapped onto them, then the default.
pub fn resolve_app_variables(
    manifest: &Manifest,
    config: &Config,
) -> anyhow::Result<BTreeMap<String, String>> {
    let redis_url = config.redis_url();
    let mut mapped: BTreeMap<&str, String> = BTreeMap::new();
    if let Some(secret) = &config.jwt_secret {
        mapped.insert("jwt_secret", secret.clone());
    }
    mapped.insert("database_url", config.database_url.clone());
    mapped.insert("redis_url", redis_url.clone());
    if let Some((host, port)) = url_host_port(&redis_url) {
        mapped.insert("redis_host", host);
        mapped.insert("redis_port", port.to_string());
    }
    if let Some((host, port)) = url_host_port(&config.database_url) {
        mapped.insert("postgres_host", host);
        mapped.insert("postgres_port", port.to_string());
    }
    mapped.insert("presence_ttl_s", config.presence_ttl_s.to_string());

    let mut values = BTreeMap::new();
    for (name, variable) in &manifest.variables {
        let from_env = std::env::var(format!("SPIN_VARIABLE_{}", name.to_ascii_uppercase())).ok();
        let value = from_env
            .or_else(|| mapped.get(name.as_str()).cloned())
            .or_else(|| variable.default.clone());
        match value {
            Some(value) => {
                values.insert(name.clone(), value);
            }
            None if variable.required => bail!(
                "variable {name} is required; set SPIN_VARIABLE_{}",
                name.to_ascii_uppercase()
            ),
            None => {}
        }
    }
    Ok(values)
}
