//! Socket.IO clients at `/socket.io/`. The Node checks of `tests/socketio/`
//! (the real `socket.io-client`) run against one host and against two hosts
//! sharing Redis and Postgres. Other tests make Socket.IO and native
//! WebSocket clients chat with each other, on one instance and across two.
//!
//! These tests need Node.js 18 or newer and npm on `PATH`. They run
//! `npm ci` in `tests/socketio/` once when its `node_modules` lacks
//! `socket.io-client`.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use nexus_tests::http;
use nexus_tests::wire::{created_at, message_id, str_field};
use nexus_tests::{
    tokens, workspace_root, Client, Settings, System, EVENT_TIMEOUT, FRONTEND_ORIGIN, QUIET_PERIOD,
};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// The `socket.io-client` version that `tests/socketio/package.json` pins.
const SOCKET_IO_CLIENT_VERSION: &str = "4.8.4";

/// Bound on `npm ci`.
const NPM_CI_TIMEOUT: Duration = Duration::from_secs(300);

/// Bound on one run of `check.js`. The script stops itself a minute
/// earlier (`NEXUS_DEADLINE_MS`), so its own report comes first.
const CHECK_SCRIPT_TIMEOUT: Duration = Duration::from_secs(660);

/// Bound on a Socket.IO connection through the driver.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Driver output lines kept for failure messages.
const DRIVER_HISTORY_LEN: usize = 40;

/// Check names that expose host bugs, each run by a test of its own, so the
/// other checks keep guarding everything else.
const BURST_CHECK: &str = "every event of a burst is answered";
const BINARY_CHECK: &str = "binary attachment rejected with a clear error";

/// Host settings of the check runs, each with the `check.js` variable that
/// passes the same value to the script: `(host variable, value, script
/// variable)`.
const HOST_LIMITS: &[(&str, &str, &str)] = &[
    // Low enough that a burst meets the per-second budget before it fills
    // the host's queue of waiting Socket.IO events (256).
    ("MAX_EVENTS_PER_SECOND", "50", "NEXUS_MAX_EVENTS_PER_SECOND"),
    ("AUTH_TIMEOUT_MS", "2000", "NEXUS_AUTH_TIMEOUT_MS"),
    // Socket.IO clients are exempt from the inactivity timeout, so the
    // heartbeat check stays idle for longer than this.
    (
        "INACTIVITY_TIMEOUT_MS",
        "2000",
        "NEXUS_INACTIVITY_TIMEOUT_MS",
    ),
];

/// Spin variables of the check runs: `(variable, value, script variable)`.
const COMPONENT_LIMITS: &[(&str, &str, &str)] = &[
    ("message_rate_limit", "10", "NEXUS_MESSAGE_RATE_LIMIT"),
    ("message_block_s", "30", "NEXUS_MESSAGE_BLOCK_S"),
    ("typing_rate_limit", "10", "NEXUS_TYPING_RATE_LIMIT"),
    (
        "online_users_rate_limit",
        "5",
        "NEXUS_ONLINE_USERS_RATE_LIMIT",
    ),
    ("typing_timeout_ms", "3000", "NEXUS_TYPING_TIMEOUT_MS"),
];

fn socketio_dir() -> PathBuf {
    workspace_root().join("tests").join("socketio")
}

/// Returns a command for a Node.js tool with only `PATH` and `HOME` from
/// this process, run in `tests/socketio/`.
fn node_tool(program: &str) -> Command {
    let mut command = Command::new(program);
    command.env_clear();
    for name in ["PATH", "HOME"] {
        if let Some(value) = std::env::var_os(name) {
            command.env(name, value);
        }
    }
    command
        .current_dir(socketio_dir())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

/// Runs `program --version` and returns its output, panicking with an
/// install hint when the program is missing.
async fn tool_version(program: &str) -> String {
    let output = node_tool(program).arg("--version").output().await;
    match output {
        Ok(output) if output.status.success() => {
            String::from_utf8_lossy(&output.stdout).trim().to_owned()
        }
        Ok(output) => panic!(
            "`{program} --version` failed with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ),
        Err(error) => panic!(
            "{program} not found on PATH ({error}); the Socket.IO tests need Node.js 18 or \
             newer and npm (Debian: apt-get install nodejs npm)"
        ),
    }
}

/// Makes sure Node.js 18+ and npm exist and that `tests/socketio/node_modules`
/// contains `socket.io-client`, running `npm ci` once if it does not.
async fn ensure_node_modules() {
    static INSTALL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _guard = INSTALL.lock().await;

    let node = tool_version("node").await;
    let major: u32 = node
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|major| major.parse().ok())
        .unwrap_or_else(|| panic!("unrecognised `node --version` output {node:?}"));
    assert!(
        major >= 18,
        "node {node} is too old: socket.io-client {SOCKET_IO_CLIENT_VERSION} needs Node.js 18 or newer"
    );
    tool_version("npm").await;

    let installed = socketio_dir()
        .join("node_modules")
        .join("socket.io-client")
        .join("package.json");
    if installed.is_file() {
        return;
    }
    let install = node_tool("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .output();
    let output = match tokio::time::timeout(NPM_CI_TIMEOUT, install).await {
        Ok(Ok(output)) => output,
        Ok(Err(error)) => panic!(
            "failed to run npm ci in {}: {error}",
            socketio_dir().display()
        ),
        Err(_) => panic!(
            "npm ci in {} timed out after {NPM_CI_TIMEOUT:?}",
            socketio_dir().display()
        ),
    };
    assert!(
        output.status.success(),
        "npm ci in {} failed with {}:\n{}\n{}",
        socketio_dir().display(),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        installed.is_file(),
        "npm ci succeeded but {} is missing",
        installed.display()
    );
}

/// Returns the settings of the check runs: the harness defaults plus
/// [`HOST_LIMITS`] and [`COMPONENT_LIMITS`].
fn check_settings() -> Settings {
    let mut settings = Settings::default();
    for (name, value, _) in HOST_LIMITS {
        settings = settings.env(name, value);
    }
    for (name, value, _) in COMPONENT_LIMITS {
        settings = settings.variable(name, value);
    }
    settings
}

/// Runs `check.js` against the first `instances` hosts of `system` with
/// `extra_env` on top of the URLs, the secret, the allowed origin and the
/// limits of [`check_settings`], prints its report and asserts that it
/// exits 0.
async fn run_check_script(system: &System, instances: usize, extra_env: &[(&str, &str)]) {
    ensure_node_modules().await;
    let urls: Vec<String> = (0..instances)
        .map(|index| system.host(index).http_url())
        .collect();
    let deadline_ms = CHECK_SCRIPT_TIMEOUT.as_millis() - 60_000;

    let mut command = node_tool("node");
    command
        .arg("check.js")
        .env("NEXUS_URLS", urls.join(","))
        .env("JWT_SECRET", tokens::JWT_SECRET)
        .env("NEXUS_ORIGIN", FRONTEND_ORIGIN)
        .env("NEXUS_DEADLINE_MS", deadline_ms.to_string());
    for (_, value, script_name) in HOST_LIMITS.iter().chain(COMPONENT_LIMITS) {
        command.env(script_name, value);
    }
    command.envs(extra_env.iter().copied());

    let started = Instant::now();
    let output = match tokio::time::timeout(CHECK_SCRIPT_TIMEOUT, command.output()).await {
        Ok(Ok(output)) => output,
        Ok(Err(error)) => panic!("failed to run node check.js: {error}"),
        Err(_) => panic!("node check.js did not exit within {CHECK_SCRIPT_TIMEOUT:?}"),
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!(
        "node check.js against {} ({:?}, exit {}):\n{stdout}{stderr}",
        urls.join(", "),
        started.elapsed(),
        output.status
    );
    let failures: Vec<&str> = stdout
        .lines()
        .filter(|line| line.starts_with("FAIL"))
        .collect();
    assert!(
        output.status.success(),
        "node check.js exited with {}; failed checks:\n{}\nstderr:\n{stderr}",
        output.status,
        failures.join("\n")
    );
    assert!(
        stdout
            .lines()
            .any(|line| line.ends_with(" passed, 0 failed")),
        "node check.js exited 0 without its closing summary line:\n{stdout}"
    );
}

#[tokio::test]
async fn node_checks_one_instance() {
    let system = System::start_with(1, check_settings()).await;
    let excluded = format!("{BURST_CHECK},{BINARY_CHECK}");
    run_check_script(&system, 1, &[("NEXUS_EXCLUDE_CHECKS", &excluded)]).await;
}

#[tokio::test]
async fn node_checks_two_instances() {
    let system = System::start_with(2, check_settings()).await;
    let excluded = format!("{BURST_CHECK},{BINARY_CHECK}");
    run_check_script(&system, 2, &[("NEXUS_EXCLUDE_CHECKS", &excluded)]).await;
}

#[tokio::test]
async fn node_checks_presence_broadcast() {
    let settings = check_settings().variable("presence_reach", "broadcast");
    let system = System::start_with(1, settings).await;
    let checks = "presence reach,presence updates reach a partner";
    let extra_env = [
        ("NEXUS_PRESENCE_REACH", "broadcast"),
        ("NEXUS_CHECKS", checks),
    ];
    run_check_script(&system, 1, &extra_env).await;
}

/// Every event of a burst, also those that overflow the host's queue of
/// waiting Socket.IO events, must get its acknowledgement and a reply.
#[tokio::test]
async fn node_check_burst_answers_every_event() {
    let system = System::start_with(1, check_settings()).await;
    run_check_script(&system, 1, &[("NEXUS_CHECKS", BURST_CHECK)]).await;
}

/// A `NEW_MESSAGE` whose `content` is a Socket.IO binary attachment must be
/// rejected with an error that names `content` (or `INVALID_FRAME`).
#[tokio::test]
async fn node_check_binary_attachment_error() {
    let system = System::start_with(1, check_settings()).await;
    run_check_script(&system, 1, &[("NEXUS_CHECKS", BINARY_CHECK)]).await;
}

// ---- a Socket.IO peer driven from Rust ----

/// A `node driver.js` process holding Socket.IO sockets, each named by an
/// id. It keeps the lines it has not consumed, so a test can wait for one
/// event while others arrive.
struct Driver {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::UnboundedReceiver<Value>,
    buffered: VecDeque<Value>,
    history: VecDeque<String>,
    next_ack: u64,
}

impl Driver {
    async fn start() -> Driver {
        ensure_node_modules().await;
        let mut child = node_tool("node")
            .arg("driver.js")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|error| panic!("failed to start node driver.js: {error}"));
        let stdin = child.stdin.take().expect("stdin is piped");
        let stdout = child.stdout.take().expect("stdout is piped");
        let (sender, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                let value = serde_json::from_str(&line)
                    .unwrap_or_else(|_| json!({"id": null, "event": "$unparsed", "line": line}));
                if sender.send(value).is_err() {
                    break;
                }
            }
        });
        Driver {
            child,
            stdin,
            lines,
            buffered: VecDeque::new(),
            history: VecDeque::new(),
            next_ack: 0,
        }
    }

    async fn command(&mut self, command: Value) {
        let line = format!("{command}\n");
        let write = self.stdin.write_all(line.as_bytes());
        match tokio::time::timeout(Duration::from_secs(5), write).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => panic!("failed to send {command} to driver.js: {error}"),
            Err(_) => panic!("sending {command} to driver.js timed out"),
        }
    }

    /// Opens socket `id` to `url` with socket.io-client `options` and waits
    /// until it is connected.
    async fn connect(&mut self, id: &str, url: &str, options: Value) {
        self.command(json!({"cmd": "connect", "id": id, "url": url, "options": options}))
            .await;
        self.recv(id, "$connect", CONNECT_TIMEOUT, |_| true).await;
    }

    /// Connects socket `id` and authenticates as `user` with the
    /// `authenticate` event. Returns the `CONNECTION_SUCCESS` data.
    async fn login(&mut self, id: &str, url: &str, options: Value, user: &str) -> Value {
        self.connect(id, url, options).await;
        let token = tokens::valid(user);
        self.emit(id, "authenticate", json!({"userId": user, "token": token}))
            .await;
        let success = self
            .recv_data(id, "CONNECTION_SUCCESS", EVENT_TIMEOUT)
            .await;
        assert_eq!(str_field(&success, "userId"), user, "{success}");
        success
    }

    async fn emit(&mut self, id: &str, event: &str, data: Value) {
        self.command(json!({"cmd": "emit", "id": id, "event": event, "data": data}))
            .await;
    }

    /// Emits with an acknowledgement callback and returns the
    /// acknowledgement's first value.
    async fn emit_with_ack(&mut self, id: &str, event: &str, data: Value) -> Value {
        self.next_ack += 1;
        let seq = self.next_ack;
        self.command(json!({"cmd": "emit", "id": id, "event": event, "data": data, "ack": seq}))
            .await;
        let line = self
            .recv(id, "$ack", EVENT_TIMEOUT, move |line| {
                line["seq"] == json!(seq)
            })
            .await;
        line["data"].clone()
    }

    /// Returns `{connected, active, transport}` of socket `id`.
    async fn status(&mut self, id: &str) -> Value {
        self.command(json!({"cmd": "status", "id": id})).await;
        self.recv(id, "$status", EVENT_TIMEOUT, |_| true).await
    }

    async fn close(&mut self, id: &str) {
        self.command(json!({"cmd": "close", "id": id})).await;
        self.recv(id, "$disconnect", EVENT_TIMEOUT, |_| true).await;
    }

    fn remember(&mut self, line: &Value) {
        let mut text = line.to_string();
        if text.len() > 300 {
            let mut cut = 300;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            text.push_str("...");
        }
        self.history.push_back(text);
        if self.history.len() > DRIVER_HISTORY_LEN {
            self.history.pop_front();
        }
    }

    fn history_text(&self) -> String {
        if self.history.is_empty() {
            return "    (nothing received)".to_owned();
        }
        self.history
            .iter()
            .map(|line| format!("    {line}"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Returns the next line that the driver wrote, or `None` at `deadline`.
    /// Panics when the driver exits.
    async fn next_line(&mut self, deadline: Instant) -> Option<Value> {
        match tokio::time::timeout_at(deadline, self.lines.recv()).await {
            Err(_) => None,
            Ok(Some(line)) => {
                self.remember(&line);
                if line["event"] == "$error" || line["event"] == "$unparsed" {
                    panic!("driver.js reported {line}");
                }
                Some(line)
            }
            Ok(None) => {
                let status = self.child.try_wait();
                panic!(
                    "driver.js exited ({status:?}); last lines:\n{}",
                    self.history_text()
                )
            }
        }
    }

    /// Waits for the next line of socket `id` with `event` that satisfies
    /// `predicate` (given the whole line) and returns the line.
    async fn recv(
        &mut self,
        id: &str,
        event: &str,
        timeout: Duration,
        predicate: impl Fn(&Value) -> bool,
    ) -> Value {
        let matches = |line: &Value| line["id"] == id && line["event"] == event && predicate(line);
        if let Some(position) = self.buffered.iter().position(matches) {
            if let Some(line) = self.buffered.remove(position) {
                return line;
            }
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.next_line(deadline).await {
                Some(line) if matches(&line) => return line,
                Some(line) => self.buffered.push_back(line),
                None => panic!(
                    "socket {id}: no {event} within {timeout:?}; last driver lines:\n{}",
                    self.history_text()
                ),
            }
        }
    }

    /// Waits for the server event `event` on socket `id` and returns its
    /// data.
    async fn recv_data(&mut self, id: &str, event: &str, timeout: Duration) -> Value {
        self.recv(id, event, timeout, |_| true).await["data"].clone()
    }

    /// Waits for the server event `event` on socket `id` whose data
    /// satisfies `predicate`, and returns the data.
    async fn recv_data_matching(
        &mut self,
        id: &str,
        event: &str,
        timeout: Duration,
        predicate: impl Fn(&Value) -> bool,
    ) -> Value {
        self.recv(id, event, timeout, |line| predicate(&line["data"]))
            .await["data"]
            .clone()
    }

    /// Listens for `duration` and panics if socket `id` receives `event`
    /// with data satisfying `predicate`.
    async fn expect_none(
        &mut self,
        id: &str,
        event: &str,
        duration: Duration,
        predicate: impl Fn(&Value) -> bool,
    ) {
        let matches =
            |line: &Value| line["id"] == id && line["event"] == event && predicate(&line["data"]);
        if let Some(line) = self.buffered.iter().find(|line| matches(line)) {
            panic!("socket {id}: unexpected {line}");
        }
        let deadline = Instant::now() + duration;
        while let Some(line) = self.next_line(deadline).await {
            if matches(&line) {
                panic!(
                    "socket {id}: unexpected {line}; last driver lines:\n{}",
                    self.history_text()
                );
            }
            self.buffered.push_back(line);
        }
    }
}

fn presence_of(user: &str, status: &str) -> impl Fn(&Value) -> bool {
    let user = user.to_owned();
    let status = status.to_owned();
    move |data: &Value| data["userId"] == user.as_str() && data["status"] == status.as_str()
}

fn typing_of(user: &str, is_typing: bool) -> impl Fn(&Value) -> bool {
    let user = user.to_owned();
    move |data: &Value| data["userId"] == user.as_str() && data["isTyping"] == is_typing
}

fn content_is(content: &str) -> impl Fn(&Value) -> bool {
    let content = content.to_owned();
    move |data: &Value| data["content"] == content.as_str()
}

/// Socket.IO alice on `sio_instance` (with `options`) and native bob on
/// `native_instance` exchange messages both ways, see each other typing,
/// list each other online and see each other's presence.
async fn assert_mixed_chat(
    system: &System,
    sio_instance: usize,
    native_instance: usize,
    options: Value,
) {
    let mut driver = Driver::start().await;
    let sio_url = system.host(sio_instance).http_url();
    let mut bob = system.connect(native_instance, "bob").await;
    driver
        .login("alice", &sio_url, options.clone(), "alice")
        .await;

    // Socket.IO to native.
    driver
        .emit(
            "alice",
            "NEW_MESSAGE",
            json!({"receiverId": "bob", "content": "from socket.io ✓", "clientMessageId": "s-1"}),
        )
        .await;
    let sent = driver
        .recv_data("alice", "MESSAGE_SENT", EVENT_TIMEOUT)
        .await;
    let first_id = message_id(&sent, "messageId");
    assert_eq!(str_field(&sent, "clientMessageId"), "s-1");
    let received = bob.recv_event("NEW_MESSAGE", EVENT_TIMEOUT).await;
    assert_eq!(message_id(&received, "messageId"), first_id);
    assert_eq!(str_field(&received, "senderId"), "alice");
    assert_eq!(str_field(&received, "receiverId"), "bob");
    assert_eq!(str_field(&received, "content"), "from socket.io ✓");
    assert_eq!(
        created_at(&received, "createdAt"),
        created_at(&sent, "createdAt")
    );

    // Native to Socket.IO.
    let reply_sent = bob.send_message_to("alice", "from native", None).await;
    let reply = driver
        .recv_data_matching(
            "alice",
            "NEW_MESSAGE",
            EVENT_TIMEOUT,
            content_is("from native"),
        )
        .await;
    assert_eq!(
        message_id(&reply, "messageId"),
        message_id(&reply_sent, "messageId")
    );
    assert_eq!(str_field(&reply, "senderId"), "bob");
    assert_eq!(str_field(&reply, "receiverId"), "alice");
    created_at(&reply, "createdAt");
    assert!(message_id(&reply, "messageId") > first_id);

    // An acknowledgement carries MESSAGE_SENT.
    let acked = driver
        .emit_with_ack(
            "alice",
            "NEW_MESSAGE",
            json!({"receiverId": "bob", "content": "acknowledged"}),
        )
        .await;
    let acked_id = message_id(&acked, "messageId");
    let delivered = bob
        .recv_matching("NEW_MESSAGE", EVENT_TIMEOUT, content_is("acknowledged"))
        .await;
    assert_eq!(message_id(&delivered, "messageId"), acked_id);
    driver
        .recv_data("alice", "MESSAGE_SENT", EVENT_TIMEOUT)
        .await;

    // Typing both ways.
    driver
        .emit("alice", "TYPING_START", json!({"receiverId": "bob"}))
        .await;
    bob.recv_matching("USER_TYPING", EVENT_TIMEOUT, typing_of("alice", true))
        .await;
    driver
        .emit("alice", "TYPING_STOP", json!({"receiverId": "bob"}))
        .await;
    bob.recv_matching("USER_TYPING", EVENT_TIMEOUT, typing_of("alice", false))
        .await;
    bob.send("TYPING_START", json!({"receiverId": "alice"}))
        .await;
    driver
        .recv_data_matching(
            "alice",
            "USER_TYPING",
            EVENT_TIMEOUT,
            typing_of("bob", true),
        )
        .await;
    bob.send("TYPING_STOP", json!({"receiverId": "alice"}))
        .await;
    driver
        .recv_data_matching(
            "alice",
            "USER_TYPING",
            EVENT_TIMEOUT,
            typing_of("bob", false),
        )
        .await;

    // Online lists and presence both ways.
    let online = driver
        .emit_with_ack("alice", "GET_ONLINE_USERS", Value::Null)
        .await;
    let online = online
        .as_array()
        .unwrap_or_else(|| panic!("GET_ONLINE_USERS acknowledgement is not an array: {online}"));
    assert!(
        online.contains(&json!("bob")),
        "bob missing from {online:?}"
    );
    assert!(
        online.contains(&json!("alice")),
        "alice missing from {online:?}"
    );
    bob.send_without_data("GET_ONLINE_USERS").await;
    let listed = bob.recv_event("ONLINE_USERS", EVENT_TIMEOUT).await;
    assert!(
        listed
            .as_array()
            .is_some_and(|ids| ids.contains(&json!("alice"))),
        "alice missing from {listed}"
    );

    bob.close().await;
    driver
        .recv_data_matching(
            "alice",
            "USER_PRESENCE_UPDATE",
            EVENT_TIMEOUT,
            presence_of("bob", "offline"),
        )
        .await;
    let mut bob = system.connect(native_instance, "bob").await;
    driver
        .recv_data_matching(
            "alice",
            "USER_PRESENCE_UPDATE",
            EVENT_TIMEOUT,
            presence_of("bob", "online"),
        )
        .await;
    driver.close("alice").await;
    bob.recv_matching(
        "USER_PRESENCE_UPDATE",
        EVENT_TIMEOUT,
        presence_of("alice", "offline"),
    )
    .await;
    assert_eq!(system.message_count().await, 3);
}

#[tokio::test]
async fn socketio_and_native_chat_one_instance() {
    let system = System::start(1).await;
    assert_mixed_chat(&system, 0, 0, json!({})).await;
}

#[tokio::test]
async fn socketio_and_native_chat_across_instances() {
    let system = System::start(2).await;
    assert_mixed_chat(&system, 0, 1, json!({"transports": ["websocket"]})).await;
}

#[tokio::test]
async fn socketio_polling_and_native_chat_across_instances() {
    let system = System::start(2).await;
    let polling = json!({"transports": ["polling"], "upgrade": false});
    assert_mixed_chat(&system, 1, 0, polling).await;
}

#[tokio::test]
async fn socketio_connection_replaces_native_across_instances() {
    let system = System::start(2).await;
    let mut driver = Driver::start().await;
    let mut alice = system.connect(0, "alice").await;
    let mut old_bob = system.connect(0, "bob").await;
    nexus_tests::client::exchange(&mut alice, &mut old_bob, "partners first").await;

    let url = system.host(1).http_url();
    driver
        .connect(
            "bob",
            &url,
            json!({"auth": {"token": tokens::valid("bob")}}),
        )
        .await;
    driver
        .recv_data("bob", "CONNECTION_SUCCESS", EVENT_TIMEOUT)
        .await;
    let close = old_bob.recv_close(EVENT_TIMEOUT).await;
    assert_eq!(close.code, Some(4001), "{close}");
    alice
        .expect_no_matching(
            "USER_PRESENCE_UPDATE",
            QUIET_PERIOD,
            presence_of("bob", "offline"),
        )
        .await;

    alice.send_message_to("bob", "to socket.io bob", None).await;
    driver
        .recv_data_matching(
            "bob",
            "NEW_MESSAGE",
            EVENT_TIMEOUT,
            content_is("to socket.io bob"),
        )
        .await;
}

#[tokio::test]
async fn native_connection_replaces_socketio_across_instances() {
    let system = System::start(2).await;
    let mut driver = Driver::start().await;
    let mut alice = system.connect(0, "alice").await;
    let url = system.host(0).http_url();
    driver.login("bob", &url, json!({}), "bob").await;
    alice.send_message_to("bob", "partners first", None).await;
    driver
        .recv_data_matching(
            "bob",
            "NEW_MESSAGE",
            EVENT_TIMEOUT,
            content_is("partners first"),
        )
        .await;

    let mut new_bob = system.connect(1, "bob").await;
    let disconnect = driver
        .recv("bob", "$disconnect", EVENT_TIMEOUT, |_| true)
        .await;
    assert_eq!(
        disconnect["reason"], "io server disconnect",
        "the replaced Socket.IO socket ended with {disconnect}"
    );
    let status = driver.status("bob").await;
    assert_eq!(
        status["active"], false,
        "the replaced Socket.IO socket tries to reconnect: {status}"
    );
    alice
        .expect_no_matching(
            "USER_PRESENCE_UPDATE",
            QUIET_PERIOD,
            presence_of("bob", "offline"),
        )
        .await;
    nexus_tests::client::exchange(&mut alice, &mut new_bob, "to native bob").await;
    driver
        .expect_none("bob", "NEW_MESSAGE", QUIET_PERIOD, |_| true)
        .await;
}

/// A host that shuts down closes native clients with 1012. Socket.IO
/// clients must see the transport end (not a server disconnect, which
/// would stop socket.io-client from reconnecting) and keep reconnecting.
#[tokio::test]
async fn socketio_client_keeps_reconnecting_after_host_shutdown() {
    let mut system = System::start(1).await;
    let mut driver = Driver::start().await;
    let url = system.host(0).http_url();
    driver
        .connect(
            "alice",
            &url,
            json!({"auth": {"token": tokens::valid("alice")}}),
        )
        .await;
    driver
        .recv_data("alice", "CONNECTION_SUCCESS", EVENT_TIMEOUT)
        .await;
    let mut native = system.connect(0, "bob").await;

    let exit = system.host_mut(0).terminate(Duration::from_secs(20)).await;
    assert!(
        exit.is_some_and(|status| status.success()),
        "the host did not exit cleanly on SIGTERM: {exit:?}"
    );
    let close = native.recv_close(EVENT_TIMEOUT).await;
    assert_eq!(close.code, Some(1012), "{close}");

    let disconnect = driver
        .recv("alice", "$disconnect", EVENT_TIMEOUT, |_| true)
        .await;
    assert_ne!(
        disconnect["reason"], "io server disconnect",
        "a restart told the Socket.IO client not to reconnect: {disconnect}"
    );
    driver
        .recv("alice", "$connect_error", EVENT_TIMEOUT, |_| true)
        .await;
    let status = driver.status("alice").await;
    assert_eq!(
        status["active"], true,
        "the client gave up reconnecting: {status}"
    );
    assert_eq!(status["connected"], false, "{status}");
}

/// Starts one host with `settings` and connects Socket.IO socket `alice`
/// over the WebSocket transport, authenticated and without reconnection.
async fn start_with_alice(settings: Settings) -> (System, Driver) {
    let system = System::start_with(1, settings).await;
    let mut driver = Driver::start().await;
    let options = json!({
        "transports": ["websocket"],
        "reconnection": false,
        "auth": {"token": tokens::valid("alice")},
    });
    driver
        .connect("alice", &system.host(0).http_url(), options)
        .await;
    driver
        .recv_data("alice", "CONNECTION_SUCCESS", EVENT_TIMEOUT)
        .await;
    (system, driver)
}

/// MAX_FRAME_BYTES bounds a Socket.IO event on the WebSocket transport as
/// it bounds a frame at `/ws`: an event over it ends the transport, and the
/// host carries on.
#[tokio::test]
async fn socketio_websocket_event_over_frame_limit() {
    let (system, mut driver) =
        start_with_alice(Settings::default().env("MAX_FRAME_BYTES", 4096)).await;

    let content = "x".repeat(64 * 1024);
    driver
        .emit(
            "alice",
            "NEW_MESSAGE",
            json!({"receiverId": "bob", "content": content}),
        )
        .await;
    let disconnect = driver
        .recv("alice", "$disconnect", EVENT_TIMEOUT, |_| true)
        .await;
    assert_eq!(disconnect["reason"], "transport close", "{disconnect}");

    let mut bob = system.connect(0, "bob").await;
    bob.health_check().await;
}

/// A Socket.IO session takes a place of its address under
/// MAX_CONNECTIONS_PER_IP when it opens, also when it never joins a
/// namespace, and keeps that one place when it joins.
#[tokio::test]
async fn socketio_sessions_count_against_address_cap() {
    // alice's joined session takes the address's first place.
    let (system, _alice) =
        start_with_alice(Settings::default().env("MAX_CONNECTIONS_PER_IP", 2)).await;
    let url = system.host(0).http_url();

    // A session that opens and never joins a namespace.
    let handshake = format!("{url}/socket.io/?EIO=4&transport=polling");
    let opened = http::get(&handshake, None).await;
    assert_eq!(opened.status, 200, "{}", opened.body);

    // The address is at its cap, for new sessions and native connections.
    let over = http::get(&handshake, None).await;
    assert_eq!(over.status, 429, "{}", over.body);
    let native = Client::connect_with_headers(&system.host(0).ws_url(), &[], "native").await;
    assert!(
        native.is_err(),
        "a native connection over the cap was accepted"
    );
}
