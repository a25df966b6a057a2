//! A private Nexus Chat stack for the load tests: a `redis-server` on a
//! free loopback port, a fresh Postgres database, and `nexus-host`
//! processes, all stopped (and the database dropped) on drop. Also runs the
//! `nexus-load` binary and reads its JSON result.

#![allow(dead_code)]

use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

pub const JWT_SECRET: &str = "nexus-load-test-secret-with-more-than-32-characters";

/// Admin connection that may create databases (trust auth on loopback).
const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// Every test starts servers, and the machine has 2 cores: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Holds the test lock for the life of a test.
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root exists")
}

/// Returns a port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding a free port");
    listener.local_addr().expect("local address").port()
}

/// Kills the child process on drop.
struct ChildGuard {
    child: Child,
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One running `nexus-host`.
pub struct Host {
    pub port: u16,
    pub log: PathBuf,
    guard: ChildGuard,
}

impl Host {
    pub fn url(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.guard.child.id()
    }

    /// Returns the end of the host's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

/// Redis, a database and some hosts.
pub struct Stack {
    pub hosts: Vec<Host>,
    redis: ChildGuard,
    database: String,
    admin_url: String,
    pub dir: TempDir,
}

/// Extra environment for every host of a stack.
pub type HostEnv<'a> = &'a [(&'a str, &'a str)];

/// Host settings that keep the servers' limits out of the load tests'
/// way: the per-user message limit and the per-connection frame limit.
pub const RELAXED_LIMITS: HostEnv<'static> = &[
    ("SPIN_VARIABLE_MESSAGE_RATE_LIMIT", "100000"),
    ("MAX_EVENTS_PER_SECOND", "1000"),
];

impl Stack {
    /// Starts Redis, creates a database and starts `hosts` hosts with
    /// `env` on top of the required settings.
    pub fn start(hosts: usize, env: HostEnv<'_>) -> Stack {
        let dir = tempfile::Builder::new()
            .prefix("nexus-load-test-")
            .tempdir()
            .expect("creating a temporary folder");
        let redis_port = free_port();
        let redis = start_redis(dir.path(), redis_port);
        let admin_url =
            std::env::var("NEXUS_TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_ADMIN_URL.into());
        let database = create_database(&admin_url);
        let database_url = database_url(&admin_url, &database);
        let mut stack = Stack {
            hosts: Vec::new(),
            redis,
            database,
            admin_url,
            dir,
        };
        let redis_url = format!("redis://127.0.0.1:{redis_port}");
        for index in 0..hosts {
            let host = start_host(stack.dir.path(), index, &database_url, &redis_url, env);
            stack.hosts.push(host);
        }
        stack
    }

    pub fn urls(&self) -> Vec<String> {
        self.hosts.iter().map(Host::url).collect()
    }

    pub fn logs(&self) -> String {
        self.hosts
            .iter()
            .map(|host| format!("--- host on port {} ---\n{}", host.port, host.log_tail()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // Hosts first, so that no connection to the database is left open.
        self.hosts.clear();
        drop_database(&self.admin_url, &self.database);
    }
}

fn start_redis(dir: &Path, port: u16) -> ChildGuard {
    let log = File::create(dir.join("redis.log")).expect("creating the Redis log");
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .stdout(log.try_clone().expect("log handle"))
        .stderr(log)
        .spawn()
        .expect("starting redis-server failed; install Debian's redis-server package");
    let guard = ChildGuard { child };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if redis_answers(port) {
            return guard;
        }
        assert!(
            Instant::now() < deadline,
            "redis-server on port {port} did not answer PING in 10 s"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

fn redis_answers(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut reply = [0_u8; 7];
    matches!(stream.read(&mut reply), Ok(n) if reply[..n].starts_with(b"+PONG"))
}

static DATABASE_COUNTER: AtomicU32 = AtomicU32::new(0);

fn run_sql(admin_url: &str, statement: &str) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| error.to_string())?;
    runtime.block_on(async {
        let (client, connection) = tokio_postgres::connect(admin_url, tokio_postgres::NoTls)
            .await
            .map_err(|error| format!("connecting to {admin_url} failed: {error}"))?;
        let driver = tokio::spawn(connection);
        let result = client
            .batch_execute(statement)
            .await
            .map_err(|error| format!("{statement:?} failed: {error}"));
        drop(client);
        let _ = driver.await;
        result
    })
}

fn create_database(admin_url: &str) -> String {
    let name = format!(
        "nexus_load_test_{}_{}",
        std::process::id(),
        DATABASE_COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    run_sql(admin_url, &format!("DROP DATABASE IF EXISTS {name}"))
        .and_then(|()| run_sql(admin_url, &format!("CREATE DATABASE {name}")))
        .unwrap_or_else(|error| panic!("creating the test database failed: {error}"));
    name
}

fn drop_database(admin_url: &str, name: &str) {
    if let Err(error) = run_sql(
        admin_url,
        &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
    ) {
        eprintln!("dropping test database {name} failed: {error}");
    }
}

/// Replaces the database name (the URL path) of the admin URL.
fn database_url(admin_url: &str, database: &str) -> String {
    let mut url = url::Url::parse(admin_url).expect("NEXUS_TEST_DATABASE_URL is a valid URL");
    url.set_path(&format!("/{database}"));
    url.to_string()
}

fn host_binary() -> PathBuf {
    let path = std::env::var_os("NEXUS_HOST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/release/nexus-host"));
    assert!(
        path.exists(),
        "{} does not exist; build it with `cargo build --release -p nexus-host` \
         (and the components, see spin.toml) or set NEXUS_HOST_BIN",
        path.display()
    );
    path
}

fn start_host(
    dir: &Path,
    index: usize,
    database_url: &str,
    redis_url: &str,
    env: HostEnv<'_>,
) -> Host {
    let port = free_port();
    let log_path = dir.join(format!("host-{index}.log"));
    let log = File::create(&log_path).expect("creating the host log");
    let root = workspace_root();
    let mut command = Command::new(host_binary());
    command
        .current_dir(&root)
        .env("JWT_SECRET", JWT_SECRET)
        .env("DATABASE_URL", database_url)
        .env("REDIS_URL", redis_url)
        .env("PORT", port.to_string())
        .env("BIND_ADDRESS", "127.0.0.1")
        .env("NEXUS_MANIFEST", root.join("spin.toml"))
        .env("NEXUS_INSTANCE_ID", format!("load-test-{index}"))
        .env("NODE_ENV", "development")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log handle"))
        .stderr(log);
    for (key, value) in env {
        command.env(key, value);
    }
    let child = command.spawn().expect("starting nexus-host failed");
    let host = Host {
        port,
        log: log_path,
        guard: ChildGuard { child },
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if livez_ok(port) {
            return host;
        }
        assert!(
            Instant::now() < deadline,
            "nexus-host on port {port} did not answer GET /livez in 60 s:\n{}",
            host.log_tail()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

fn livez_ok(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request =
        format!("GET /livez HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let _ = stream.shutdown(Shutdown::Write);
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.starts_with("HTTP/1.1 200")
}

/// Output of one `nexus-load` run.
pub struct LoadRun {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// The JSON result, when the run wrote one.
    pub result: Option<Value>,
}

impl LoadRun {
    /// Returns the JSON result, failing the test with the output when
    /// there is none.
    pub fn json(&self) -> &Value {
        self.result.as_ref().unwrap_or_else(|| {
            panic!(
                "nexus-load wrote no result (exit {:?})\nstdout:\n{}\nstderr:\n{}",
                self.code, self.stdout, self.stderr
            )
        })
    }

    pub fn counter(&self, name: &str) -> u64 {
        self.json()["counters"][name]
            .as_u64()
            .unwrap_or_else(|| panic!("counter {name} missing in {}", self.json()))
    }
}

/// Splits a command line on whitespace (no quoting).
pub fn words(line: &str) -> Vec<String> {
    line.split_whitespace().map(str::to_string).collect()
}

/// Runs `nexus-load` with `args` (plus `--out`), killing it after
/// `limit`.
pub fn run_load<S: AsRef<OsStr>>(dir: &Path, args: &[S], limit: Duration) -> LoadRun {
    static RUN_COUNTER: AtomicU32 = AtomicU32::new(0);
    let run = RUN_COUNTER.fetch_add(1, Ordering::Relaxed);
    let out = dir.join(format!("load-{run}.json"));
    let stdout_path = dir.join(format!("load-{run}.stdout"));
    let stderr_path = dir.join(format!("load-{run}.stderr"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_nexus-load"))
        .args(args)
        .arg("--out")
        .arg(&out)
        .env("JWT_SECRET", JWT_SECRET)
        .env_remove("NEXUS_LOAD_USER_PREFIX")
        .stdin(Stdio::null())
        .stdout(File::create(&stdout_path).expect("stdout file"))
        .stderr(File::create(&stderr_path).expect("stderr file"))
        .spawn()
        .expect("starting nexus-load failed");

    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for nexus-load") {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(50));
    };

    let stdout = std::fs::read_to_string(&stdout_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    let result = std::fs::read_to_string(&out)
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok());
    LoadRun {
        code: status.and_then(|status| status.code()),
        stdout,
        stderr,
        result,
    }
}
