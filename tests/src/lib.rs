//! Test harness for the Nexus Chat integration tests.
//!
//! Each test builds a [`System`]: a private `redis-server` on a free loopback
//! port, a fresh Postgres database on the machine's Postgres, and one or more
//! `nexus-host` processes. Tests of a Postgres outage put that database on a
//! private cluster ([`pg_cluster`]) that they stop and start. Tests then
//! drive it the way a client would, through
//! [`Client`] (WebSocket) and [`http`] (HTTP routes). Every wait is bounded, so
//! a broken server fails a test instead of hanging it. When a test panics,
//! each host prints the tail of its log and the test's folder under
//! `target/nexus-tests/` is kept.

pub mod client;
pub mod host;
pub mod http;
pub mod matchers;
pub mod pg_cluster;
pub mod postgres;
pub mod raw;
pub mod redis;
pub mod system;
pub mod tokens;
pub mod wire;

use std::collections::HashSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

pub use client::{Client, Close, Event};
pub use host::{HostProcess, Settings, FRONTEND_ORIGIN};
pub use system::System;

/// Default bound on waiting for one expected event.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a check that some event does not arrive keeps listening.
pub const QUIET_PERIOD: Duration = Duration::from_millis(700);

/// Returns the workspace root: the parent of this crate's folder.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the nexus-tests crate lives in a folder of the workspace")
        .to_path_buf()
}

/// Returns a loopback TCP port that was free a moment ago and that this
/// process has not handed out before.
///
/// NOTE: another process can still take the port before the server binds
/// it. The server then fails to start, and the test reports that.
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let mut handed_out = HANDED_OUT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let handed_out = handed_out.get_or_insert_with(HashSet::new);
    for _ in 0..100 {
        let listener = TcpListener::bind("127.0.0.1:0").expect("failed to bind a loopback port");
        let port = listener
            .local_addr()
            .expect("a bound listener has a local address")
            .port();
        if handed_out.insert(port) {
            return port;
        }
    }
    panic!("found no free loopback port in 100 attempts");
}

/// Returns a string unique to this call within the machine: the process id,
/// a counter and the clock, in lowercase letters, digits and `_`.
pub fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.subsec_nanos())
        .unwrap_or(0);
    format!("{}_{count}_{nanos:09}", std::process::id())
}

/// Returns the running test's name, taken from the thread name that the
/// standard test harness gives each test, with characters other than
/// letters, digits, `-` and `_` replaced by `_`.
pub fn current_test_name() -> String {
    let name = std::thread::current()
        .name()
        .map(str::to_owned)
        .unwrap_or_else(|| "test".to_owned());
    let short = name.rsplit("::").next().unwrap_or("test");
    short
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A folder under `target/nexus-tests/` for one test's logs and Redis data.
/// It is removed when the test passes and kept when it panics.
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    /// Creates the folder for the running test.
    pub fn create() -> TestDir {
        let path = workspace_root()
            .join("target")
            .join("nexus-tests")
            .join(format!("{}-{}", current_test_name(), unique_suffix()));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|error| panic!("failed to create {}: {error}", path.display()));
        TestDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("test logs kept in {}", self.path.display());
        } else if let Err(error) = std::fs::remove_dir_all(&self.path) {
            eprintln!("failed to remove {}: {error}", self.path.display());
        }
    }
}

/// Returns the last `lines` lines of a text file, or a note saying why it
/// could not be read.
pub fn file_tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            let start = all.len().saturating_sub(lines);
            all[start..].join("\n")
        }
        Err(error) => format!("(failed to read {}: {error})", path.display()),
    }
}
