//! A private `redis-server` per test, on a free loopback port, keeping
//! nothing on disk.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{file_tail, free_port};

/// Bound on a Redis server becoming ready after its start.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A `redis-server` child process, killed on drop.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    log_path: PathBuf,
}

impl RedisServer {
    /// Starts a server that writes its log into `dir` and waits until it
    /// replies to `PING`. The binary is `NEXUS_REDIS_SERVER` or `redis-server`
    /// from `PATH`.
    pub async fn start(dir: &Path) -> RedisServer {
        let port = free_port();
        let mut server = RedisServer {
            child: None,
            port,
            dir: dir.to_path_buf(),
            log_path: dir.join(format!("redis-{port}.log")),
        };
        server.spawn().await;
        server
    }

    async fn spawn(&mut self) {
        let binary = std::env::var("NEXUS_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let port = self.port.to_string();
        let child = Command::new(&binary)
            .args(["--port", &port, "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(&self.log_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|error| {
                panic!(
                    "failed to start {binary}: {error}; install Debian's redis-server package \
                     or set NEXUS_REDIS_SERVER to the binary"
                )
            });
        self.child = Some(child);

        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if ping(self.port).await {
                return;
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "redis-server on port {} exited with {status}; its log:\n{}",
                        self.port,
                        file_tail(&self.log_path, 30)
                    );
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "redis-server on port {} did not reply to PING within {START_TIMEOUT:?}; its log:\n{}",
            self.port,
            file_tail(&self.log_path, 30)
        );
    }

    /// Returns the server's URL, `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Runs one command with `redis-cli` (installed with Debian's
    /// `redis-server`, which depends on `redis-tools`) and returns its
    /// reply as `redis-cli` prints it, without the trailing newline.
    pub fn command(&self, arguments: &[&str]) -> String {
        let output = std::process::Command::new("redis-cli")
            .arg("-p")
            .arg(self.port.to_string())
            .args(arguments)
            .output()
            .unwrap_or_else(|error| panic!("failed to run redis-cli {arguments:?}: {error}"));
        assert!(
            output.status.success(),
            "redis-cli {arguments:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout)
            .trim_end()
            .to_owned()
    }

    /// Kills the server (SIGKILL), so clients see Redis as unreachable.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port, after [`RedisServer::stop`].
    pub async fn restart(&mut self) {
        self.stop();
        self.spawn().await;
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Sends `PING` to a Redis server on a loopback port and returns whether it
/// replied `+PONG` within half a second.
pub async fn ping(port: u16) -> bool {
    let attempt = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        stream.write_all(b"PING\r\n").await.ok()?;
        let mut reply = [0u8; 7];
        stream.read_exact(&mut reply).await.ok()?;
        Some(&reply == b"+PONG\r\n")
    };
    matches!(
        tokio::time::timeout(Duration::from_millis(500), attempt).await,
        Ok(Some(true))
    )
}
