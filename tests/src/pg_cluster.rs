//! A private Postgres cluster for one test, on a free loopback port, that the
//! test can stop and start again to make Postgres unreachable for the hosts.
//!
//! The cluster is created with `initdb` and run with `pg_ctl`, both from
//! `pg_config --bindir` (or `NEXUS_PG_BINDIR`). `initdb` rejects the root
//! user, so under root both run as the `postgres` OS user through
//! `runuser`. Authentication is `trust` on loopback and on a Unix socket in
//! the cluster's own folder, so nothing else on the machine is touched.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::{file_tail, free_port};

/// Bound on `initdb`, which writes a whole cluster.
const INITDB_TIMEOUT: Duration = Duration::from_secs(120);

/// Bound on `pg_ctl start` and `pg_ctl stop`. `pg_ctl` itself waits (`-w`)
/// up to its `-t` seconds, which are set below this bound.
const PG_CTL_TIMEOUT: Duration = Duration::from_secs(60);

/// The OS user that runs the cluster when the tests run as root.
const CLUSTER_OS_USER: &str = "postgres";

/// A running private Postgres cluster, stopped (`-m immediate`) on drop and
/// its folder removed.
pub struct PostgresCluster {
    bindir: PathBuf,
    /// The cluster's folder, removed when this value drops.
    folder: tempfile::TempDir,
    port: u16,
    as_postgres_user: bool,
    running: bool,
}

impl PostgresCluster {
    /// Creates a cluster in a fresh folder under the system's temporary
    /// folder and starts it.
    pub async fn start() -> PostgresCluster {
        let bindir = bindir();
        let folder = tempfile::Builder::new()
            .prefix("nexus-pg-")
            .tempdir()
            .unwrap_or_else(|error| panic!("failed to create a folder for Postgres: {error}"));
        let as_postgres_user = running_as_root();
        if as_postgres_user {
            let status = Command::new("chown")
                .arg(format!("{CLUSTER_OS_USER}:"))
                .arg(folder.path())
                .status();
            assert!(
                matches!(status, Ok(status) if status.success()),
                "failed to give {} to the {CLUSTER_OS_USER} user: {status:?}",
                folder.path().display()
            );
        }
        let mut cluster = PostgresCluster {
            bindir,
            folder,
            port: free_port(),
            as_postgres_user,
            running: false,
        };
        cluster.initdb().await;
        cluster.start_again().await;
        cluster
    }

    /// Returns the admin URL, `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server at once (`pg_ctl stop -m immediate`): every backend
    /// is killed and the port closes, as when the database host fails.
    pub async fn stop_immediately(&mut self) {
        let output = self
            .run_pg_ctl(&["stop", "-m", "immediate", "-w", "-t", "30"])
            .await;
        assert!(
            output.status.success(),
            "pg_ctl stop -m immediate failed with {}: {}{}\nserver log:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            self.log_tail()
        );
        self.running = false;
    }

    /// Starts the server on the same port and data folder and waits until it
    /// accepts connections. After [`PostgresCluster::stop_immediately`] the
    /// server first runs crash recovery.
    pub async fn start_again(&mut self) {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off -c max_connections=200",
            self.port,
            self.folder.path().display()
        );
        let log = self.log_path().display().to_string();
        let output = self
            .run_pg_ctl(&["start", "-w", "-t", "45", "-l", &log, "-o", &options])
            .await;
        assert!(
            output.status.success(),
            "pg_ctl start on port {} failed with {}: {}{}\nserver log:\n{}",
            self.port,
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            self.log_tail()
        );
        self.running = true;
    }

    fn data_dir(&self) -> PathBuf {
        self.folder.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.folder.path().join("server.log")
    }

    fn log_tail(&self) -> String {
        file_tail(&self.log_path(), 30)
    }

    async fn initdb(&self) {
        let initdb = self.bindir.join("initdb");
        let data_dir = self.data_dir().display().to_string();
        let arguments = [
            "-D",
            &data_dir,
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-sync",
        ];
        let output = run_bounded(self.command(&initdb, &arguments), INITDB_TIMEOUT).await;
        assert!(
            output.status.success(),
            "initdb failed with {}: {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    async fn run_pg_ctl(&self, arguments: &[&str]) -> Output {
        let pg_ctl = self.bindir.join("pg_ctl");
        let data_dir = self.data_dir().display().to_string();
        let mut all = vec!["-D", data_dir.as_str()];
        all.extend_from_slice(arguments);
        run_bounded(self.command(&pg_ctl, &all), PG_CTL_TIMEOUT).await
    }

    /// Returns a command for `program`, run as [`CLUSTER_OS_USER`] when the
    /// tests run as root. It runs from the cluster's folder, because that
    /// user may lack access to the test's working folder.
    fn command(&self, program: &Path, arguments: &[&str]) -> Command {
        let mut command = if self.as_postgres_user {
            let mut command = Command::new("runuser");
            command.args(["-u", CLUSTER_OS_USER, "--"]).arg(program);
            command
        } else {
            Command::new(program)
        };
        command
            .args(arguments)
            .current_dir(self.folder.path())
            .env_remove("PGDATA")
            .env_remove("PGPORT")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command
    }
}

impl Drop for PostgresCluster {
    fn drop(&mut self) {
        if !self.running {
            return;
        }
        let pg_ctl = self.bindir.join("pg_ctl");
        let data_dir = self.data_dir().display().to_string();
        let arguments = ["-D", &data_dir, "stop", "-m", "immediate", "-w", "-t", "30"];
        // Drop cannot await, so `pg_ctl -t 30` bounds this blocking call.
        match self.command(&pg_ctl, &arguments).output() {
            Ok(output) if output.status.success() => {}
            Ok(output) => eprintln!(
                "pg_ctl stop of the private cluster on port {} failed with {}: {}",
                self.port,
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ),
            Err(error) => eprintln!(
                "failed to run pg_ctl to stop the private cluster on port {}: {error}",
                self.port
            ),
        }
    }
}

/// Returns the folder of the Postgres server programs: `NEXUS_PG_BINDIR` or
/// the output of `pg_config --bindir`.
pub fn bindir() -> PathBuf {
    if let Some(dir) = std::env::var_os("NEXUS_PG_BINDIR") {
        return PathBuf::from(dir);
    }
    let output = Command::new("pg_config")
        .arg("--bindir")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|error| {
            panic!(
                "failed to run pg_config --bindir: {error}; install Debian's postgresql \
                 packages or set NEXUS_PG_BINDIR to the folder of initdb and pg_ctl"
            )
        });
    assert!(
        output.status.success(),
        "pg_config --bindir failed with {}",
        output.status
    );
    PathBuf::from(String::from_utf8_lossy(&output.stdout).trim())
}

/// Returns whether this process runs as root, from the real user id in
/// `/proc/self/status` (this crate forbids the unsafe call to `getuid`).
fn running_as_root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|line| line.starts_with("Uid:"))
        .and_then(|line| line.split_whitespace().nth(1))
        == Some("0")
}

/// Runs `command` to completion, killing it when `timeout` passes.
async fn run_bounded(command: Command, timeout: Duration) -> Output {
    let mut command = tokio::process::Command::from(command);
    command.kill_on_drop(true);
    let program = format!("{:?}", command.as_std().get_program());
    match tokio::time::timeout(timeout, command.output()).await {
        Ok(Ok(output)) => output,
        Ok(Err(error)) => panic!("failed to run {program}: {error}"),
        Err(_) => panic!("{program} did not finish within {timeout:?}"),
    }
}
