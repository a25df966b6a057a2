//! Operating a running host: reloading components on SIGHUP under live
//! traffic, rejecting a broken component, and `/metrics`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nexus_tests::host::manifest_path;
use nexus_tests::{workspace_root, Settings, System, EVENT_TIMEOUT};
use serde_json::Value;

const COMPONENTS: [&str; 3] = ["nexus_auth", "nexus_message", "nexus_presence"];

/// Copies `spin.toml` and the built components into `dir`, keeping the
/// manifest's relative `source` paths, and returns the manifest's path.
fn private_manifest(dir: &Path) -> PathBuf {
    let component_dir = dir.join("target/wasm32-wasip2/component");
    std::fs::create_dir_all(&component_dir).expect("failed to create the component folder");
    for name in COMPONENTS {
        let built = workspace_root()
            .join("target/wasm32-wasip2/component")
            .join(format!("{name}.wasm"));
        std::fs::copy(&built, component_dir.join(format!("{name}.wasm")))
            .unwrap_or_else(|error| panic!("failed to copy {}: {error}", built.display()));
    }
    let manifest = dir.join("spin.toml");
    std::fs::copy(manifest_path(), &manifest).expect("failed to copy spin.toml");
    manifest
}

fn component_file(manifest: &Path, name: &str) -> PathBuf {
    manifest
        .parent()
        .expect("the manifest has a folder")
        .join("target/wasm32-wasip2/component")
        .join(format!("{name}.wasm"))
}

/// Appends a custom section to a component: a new file with a new digest
/// that behaves exactly like the old one.
fn append_custom_section(path: &Path, payload: &str) {
    let name = b"nexus-test";
    let mut body = vec![name.len() as u8];
    body.extend_from_slice(name);
    body.extend_from_slice(payload.as_bytes());
    let mut bytes = std::fs::read(path).expect("failed to read the component");
    bytes.push(0); // custom section id
    let mut size = body.len();
    loop {
        let byte = (size & 0x7f) as u8;
        size >>= 7;
        if size == 0 {
            bytes.push(byte);
            break;
        }
        bytes.push(byte | 0x80);
    }
    bytes.extend_from_slice(&body);
    // Write a new file and rename it over the old one, as a deploy would.
    let staged = path.with_extension("wasm.new");
    std::fs::write(&staged, bytes).expect("failed to write the new component");
    std::fs::rename(&staged, path).expect("failed to replace the component");
}

fn send_hangup(pid: u32) {
    let status = std::process::Command::new("kill")
        .arg("-HUP")
        .arg(pid.to_string())
        .status()
        .expect("failed to run kill");
    assert!(status.success(), "kill -HUP {pid} failed");
}

fn component_entry(health: &Value, id: &str) -> Value {
    health["components"]
        .as_array()
        .and_then(|components| components.iter().find(|c| c["id"] == id))
        .cloned()
        .unwrap_or_else(|| panic!("/health lists no component {id}: {health}"))
}

/// Reads one sample of the Prometheus text output: the line that starts
/// with `series` (name and labels exactly as the host writes them).
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// A folder removed on drop.
struct ScratchDir(PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn system_with_private_manifest() -> (System, PathBuf, ScratchDir) {
    let dir =
        std::env::temp_dir().join(format!("nexus-operations-{}", nexus_tests::unique_suffix()));
    let manifest = private_manifest(&dir);
    let settings = Settings::default().env("NEXUS_MANIFEST", manifest.display());
    let system = System::start_with(1, settings).await;
    (system, manifest, ScratchDir(dir))
}

#[tokio::test]
async fn reload_under_live_traffic_keeps_connections() {
    let (system, manifest, _scratch) = system_with_private_manifest().await;
    let mut alice = system.connect(0, "alice").await;
    let mut bob = system.connect(0, "bob").await;
    let before = system.http_get(0, "/health", None).await.json();
    let old = component_entry(&before, "message");

    let total = 40;
    let mut sent_ids = Vec::new();
    for index in 0..total {
        if index == total / 2 {
            append_custom_section(&component_file(&manifest, "nexus_message"), "v2");
            send_hangup(system.host(0).pid().expect("the host is running"));
        }
        let content = format!("message {index}");
        let sent = alice.send_message_to("bob", &content, None).await;
        sent_ids.push(sent["messageId"].as_str().unwrap_or_default().to_owned());
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    let mut received = Vec::new();
    for _ in 0..total {
        let message = bob.recv_event("NEW_MESSAGE", EVENT_TIMEOUT).await;
        received.push(message["messageId"].as_str().unwrap_or_default().to_owned());
    }
    assert_eq!(
        received, sent_ids,
        "bob did not get every message once, in order"
    );

    // The reload finishes in the background; wait for the new digest.
    let deadline = Instant::now() + Duration::from_secs(10);
    let new = loop {
        let health = system.http_get(0, "/health", None).await.json();
        let entry = component_entry(&health, "message");
        if entry["digest"] != old["digest"] || Instant::now() > deadline {
            break entry;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_ne!(
        new["digest"], old["digest"],
        "the new message component never served"
    );
    assert!(
        new["generation"].as_u64() > old["generation"].as_u64(),
        "the reloaded component has no newer generation: {new}"
    );
    assert!(
        alice.closed().is_none(),
        "alice's connection closed during the reload"
    );
    assert!(
        bob.closed().is_none(),
        "bob's connection closed during the reload"
    );
    let after = alice.send_message_to("bob", "after the reload", None).await;
    let delivered = bob.recv_event("NEW_MESSAGE", EVENT_TIMEOUT).await;
    assert_eq!(
        delivered["messageId"], after["messageId"],
        "the new version does not deliver"
    );
    assert_eq!(
        system.message_count().await,
        i64::from(total) + 1,
        "messages stored"
    );
}

#[tokio::test]
async fn broken_component_rejected_old_keeps_serving() {
    let (system, manifest, _scratch) = system_with_private_manifest().await;
    let mut alice = system.connect(0, "alice").await;
    let before = system.http_get(0, "/health", None).await.json();
    let old = component_entry(&before, "presence");

    std::fs::write(
        component_file(&manifest, "nexus_presence"),
        b"not a component",
    )
    .expect("failed to overwrite the component");
    send_hangup(system.host(0).pid().expect("the host is running"));

    // Wait until the reload has been rejected, as the metrics record.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut rejected = 0.0;
    while Instant::now() < deadline {
        let metrics = system.http_get(0, "/metrics", None).await.body;
        rejected = sample(
            &metrics,
            "nexus_component_reloads_total{outcome=\"rejected\"}",
        );
        if rejected >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(rejected, 1.0, "the broken component was not rejected");

    let after = system.http_get(0, "/health", None).await.json();
    let current = component_entry(&after, "presence");
    assert_eq!(
        current["digest"], old["digest"],
        "the broken component replaced the old one"
    );
    let status = alice.health_check().await;
    assert_eq!(
        status["status"], "ok",
        "the old presence component stopped serving"
    );
    let log = std::fs::read_to_string(system.host(0).log_path()).unwrap_or_default();
    assert!(
        log.contains("component rejected"),
        "the host logged no rejection line"
    );
}

#[tokio::test]
async fn metrics_move_with_events() {
    let system = System::start(1).await;
    let before = system.http_get(0, "/metrics", None).await;
    assert_eq!(before.status, 200, "/metrics status");
    let mut alice = system.connect(0, "alice").await;
    let mut bob = system.connect(0, "bob").await;
    alice.send_message_to("bob", "counted", None).await;
    bob.recv_event("NEW_MESSAGE", EVENT_TIMEOUT).await;

    let after = system.http_get(0, "/metrics", None).await.body;
    let before = before.body;
    let messages = "nexus_messages_total";
    assert_eq!(
        sample(&after, messages) - sample(&before, messages),
        1.0,
        "messages counter"
    );
    let handled = "nexus_events_total{event=\"NEW_MESSAGE\",outcome=\"ok\"}";
    assert_eq!(
        sample(&after, handled) - sample(&before, handled),
        1.0,
        "events counter"
    );
    let local = "nexus_deliveries_total{route=\"local\"}";
    assert!(
        sample(&after, local) > sample(&before, local),
        "local deliveries"
    );
    assert_eq!(sample(&after, "nexus_connections"), 2.0, "open connections");
    assert_eq!(
        sample(&after, "nexus_authenticated_users"),
        2.0,
        "authenticated users"
    );
    let invocations = "nexus_component_invocation_seconds_count{component=\"message\"}";
    assert!(
        sample(&after, invocations) >= 1.0,
        "no invocation of the message component in the histogram"
    );
}

/// A host started with `RUST_LOG=debug` writes debug lines of its own but
/// no message body, because the libraries that log SQL parameters and
/// frames stay at info.
#[tokio::test]
async fn debug_log_has_no_message_body() {
    let system = System::start_with(1, Settings::default().env("RUST_LOG", "debug")).await;
    let mut alice = system.connect(0, "alice").await;
    let mut bob = system.connect(0, "bob").await;
    let body = "body-that-must-not-be-logged-5f1c";
    alice.send_message_to("bob", body, None).await;
    bob.recv_event("NEW_MESSAGE", EVENT_TIMEOUT).await;

    let log = std::fs::read_to_string(system.host(0).log_path()).unwrap_or_default();
    assert!(
        log.contains("DEBUG") || log.contains("\"level\":\"DEBUG\""),
        "the host wrote no debug line, so the check below proves nothing"
    );
    assert!(!log.contains(body), "the debug log contains a message body");
}
