//! `nexus-host` processes: their environment, start-up, readiness and logs.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use crate::{file_tail, free_port, workspace_root};

/// The one origin that test hosts accept in `FRONTEND_URLS`. No test connects
/// to it; it only appears in `Origin` headers.
pub const FRONTEND_ORIGIN: &str = "http://app.nexus.test";

/// Bound on a host returning 200 on `GET /livez` after its start. Hosts
/// compile their components at start-up, which is slow on a loaded machine.
const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// Lines of a host's log printed when a test fails.
const LOG_TAIL_LINES: usize = 80;

/// Environment variables passed through from the test process to hosts, so
/// hosts find their tools and honour the caller's log settings.
const PASSED_THROUGH: &[&str] = &[
    "PATH",
    "HOME",
    "TMPDIR",
    "LANG",
    "RUST_LOG",
    "RUST_BACKTRACE",
];

/// The environment of test hosts, apart from the addresses and secret that
/// [`crate::System`] adds.
#[derive(Clone, Debug)]
pub struct Settings {
    vars: BTreeMap<String, String>,
}

impl Default for Settings {
    /// Returns settings that bind hosts to loopback only, with a short ping
    /// interval and presence TTL and a frame rate limit high enough that
    /// tests sending bursts do not hit it. Tests of a time limit shorten
    /// that limit themselves.
    fn default() -> Self {
        let defaults = [
            ("BIND_ADDRESS", "127.0.0.1"),
            ("NODE_ENV", "development"),
            ("NO_COLOR", "1"),
            ("FRONTEND_URLS", FRONTEND_ORIGIN),
            ("AUTH_TIMEOUT_MS", "10000"),
            ("INACTIVITY_TIMEOUT_MS", "60000"),
            ("PING_INTERVAL_MS", "1000"),
            ("HANDLER_DEADLINE_MS", "1000"),
            ("MAX_EVENTS_PER_SECOND", "1000"),
            ("MAX_CONNECTIONS_PER_IP", "1000"),
            ("PRESENCE_TTL_S", "10"),
        ];
        Settings {
            vars: defaults
                .iter()
                .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
                .collect(),
        }
    }
}

impl Settings {
    /// Sets a host environment variable, for example `AUTH_TIMEOUT_MS`.
    pub fn env(mut self, name: &str, value: impl ToString) -> Settings {
        self.vars.insert(name.to_owned(), value.to_string());
        self
    }

    /// Sets a Spin variable of `spin.toml` through `SPIN_VARIABLE_<NAME>`,
    /// for example `variable("message_rate_limit", 5)`.
    pub fn variable(self, name: &str, value: impl ToString) -> Settings {
        let env_name = format!("SPIN_VARIABLE_{}", name.to_ascii_uppercase());
        self.env(&env_name, value)
    }

    /// Turns on the test faults of the message component (`!fault:trap`,
    /// `!fault:spin`, `!fault:trap-after-store`).
    pub fn with_faults(self) -> Settings {
        self.variable("fault_injection", "on")
    }

    /// Returns the value of a variable, if set.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars.get(name).map(String::as_str)
    }

    pub fn vars(&self) -> &BTreeMap<String, String> {
        &self.vars
    }
}

/// Returns the host binary: `NEXUS_HOST_BIN` or `target/release/nexus-host`.
pub fn host_binary() -> PathBuf {
    match std::env::var_os("NEXUS_HOST_BIN") {
        Some(path) => PathBuf::from(path),
        None => workspace_root()
            .join("target")
            .join("release")
            .join("nexus-host"),
    }
}

/// Returns the manifest that hosts load: `spin.toml` at the workspace root.
pub fn manifest_path() -> PathBuf {
    workspace_root().join("spin.toml")
}

/// Returns a command for the host binary with exactly `env` plus the
/// variables in [`PASSED_THROUGH`], run from the workspace root.
pub fn host_command(env: &BTreeMap<String, String>) -> Command {
    let binary = host_binary();
    assert!(
        binary.is_file(),
        "nexus-host binary not found at {}; build it with `cargo build --release -p nexus-host` \
         or set NEXUS_HOST_BIN",
        binary.display()
    );
    let mut command = Command::new(binary);
    command.env_clear();
    for name in PASSED_THROUGH {
        if let Some(value) = std::env::var_os(name) {
            command.env(name, value);
        }
    }
    command.envs(env);
    command.current_dir(workspace_root());
    command.stdin(Stdio::null());
    command
}

/// Runs `command` to its end and returns its output. Panics, naming the
/// command as `label`, when it cannot start or runs longer than `limit`.
pub async fn run_to_end(command: Command, limit: Duration, label: &str) -> Output {
    let running = tokio::process::Command::from(command)
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(limit, running).await {
        Ok(Ok(output)) => output,
        Ok(Err(error)) => panic!("failed to run {label}: {error}"),
        Err(_) => panic!("{label} did not finish within {} s", limit.as_secs()),
    }
}

/// A running `nexus-host serve`, killed on drop. Its stdout and stderr go to
/// one log file, whose tail is printed when the owning test panics.
pub struct HostProcess {
    child: Option<Child>,
    port: u16,
    instance_id: String,
    log_path: PathBuf,
}

impl HostProcess {
    /// Starts a host on a free port without waiting for it to serve.
    pub fn spawn(instance_id: &str, env: &BTreeMap<String, String>, log_dir: &Path) -> HostProcess {
        let port = free_port();
        let log_path = log_dir.join(format!("host-{instance_id}-{port}.log"));
        let log = File::create(&log_path)
            .unwrap_or_else(|error| panic!("failed to create {}: {error}", log_path.display()));
        let log_for_stdout = log.try_clone().unwrap_or_else(|error| {
            panic!(
                "failed to clone the handle of {}: {error}",
                log_path.display()
            )
        });

        let mut env = env.clone();
        env.insert("PORT".into(), port.to_string());
        env.insert("NEXUS_INSTANCE_ID".into(), instance_id.to_owned());
        // A test may point the host at its own copy of the manifest.
        let manifest = env
            .entry("NEXUS_MANIFEST".into())
            .or_insert_with(|| manifest_path().display().to_string())
            .clone();

        // The options belong to nexus-host itself, so they come before the
        // subcommand.
        let mut command = host_command(&env);
        command
            .arg("--port")
            .arg(port.to_string())
            .arg("--manifest")
            .arg(manifest)
            .arg("serve")
            .stdout(log_for_stdout)
            .stderr(log);
        let child = command
            .spawn()
            .unwrap_or_else(|error| panic!("failed to start nexus-host {instance_id}: {error}"));
        HostProcess {
            child: Some(child),
            port,
            instance_id: instance_id.to_owned(),
            log_path,
        }
    }

    /// Waits until `GET /livez` returns 200. Panics with the log tail when
    /// the process exits first or the wait passes [`READY_TIMEOUT`].
    pub async fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        let url = format!("{}/livez", self.http_url());
        while Instant::now() < deadline {
            if let Some(status) = self.exit_status() {
                panic!(
                    "nexus-host {} exited with {status} before serving /livez; log tail:\n{}",
                    self.instance_id,
                    self.log_tail(LOG_TAIL_LINES)
                );
            }
            if crate::http::status_of(&url).await == Some(200) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "nexus-host {} did not return 200 on {url} within {READY_TIMEOUT:?}; log tail:\n{}",
            self.instance_id,
            self.log_tail(LOG_TAIL_LINES)
        );
    }

    /// Returns the WebSocket endpoint, `ws://127.0.0.1:PORT/ws`.
    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port)
    }

    /// Returns the HTTP base URL, `http://127.0.0.1:PORT`.
    pub fn http_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Returns the `NEXUS_INSTANCE_ID` the host was started with.
    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Returns the process id while the process runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Returns the process's resident memory (`VmRSS` of
    /// `/proc/PID/status`) in KiB, or `None` when the process is gone or the
    /// file cannot be read.
    pub fn resident_memory_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    /// Returns the exit status if the process has exited.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|child| child.try_wait().ok().flatten())
    }

    /// Kills the process (SIGKILL) and reaps it: an instance that dies
    /// without any shutdown.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM and waits up to `timeout` for the process to exit.
    /// Returns its exit status, or `None` if it was still running (it is then
    /// killed).
    pub async fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let pid = child.id().to_string();
        // The standard library sends only SIGKILL, and this crate forbids
        // unsafe code, so the signal goes through kill(1).
        let sent = Command::new("kill").args(["-TERM", &pid]).status();
        assert!(
            matches!(sent, Ok(status) if status.success()),
            "failed to send SIGTERM to nexus-host {} (pid {pid}): {sent:?}",
            self.instance_id
        );
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.exit_status() {
                self.child = None;
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.kill();
        None
    }

    /// Returns the last `lines` lines of the host's log.
    pub fn log_tail(&self, lines: usize) -> String {
        file_tail(&self.log_path, lines)
    }
}

impl Drop for HostProcess {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "---- nexus-host {} (port {}), last {LOG_TAIL_LINES} lines of {} ----\n{}\n---- end of nexus-host {} log ----",
                self.instance_id,
                self.port,
                self.log_path.display(),
                self.log_tail(LOG_TAIL_LINES),
                self.instance_id
            );
        }
    }
}
