//! Host lifecycle: migrations, concurrent start-up, graceful shutdown and
//! the inactivity timeout.

use std::time::Duration;

use nexus_tests::client::exchange;
use nexus_tests::host::{host_command, run_to_end};
use nexus_tests::raw::RawClient;
use nexus_tests::{tokens, Settings, System, EVENT_TIMEOUT};
use serde_json::json;

#[tokio::test]
async fn migrate_command_is_idempotent() {
    let system = System::start(0).await;
    for attempt in 1..=2 {
        let mut command = host_command(&system.host_env());
        command.arg("migrate");
        let output = run_to_end(command, Duration::from_secs(60), "nexus-host migrate").await;
        assert!(
            output.status.success(),
            "nexus-host migrate (run {attempt}) failed with {}: {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            system.db().table_exists("messages").await,
            "no messages table after run {attempt}"
        );
    }
    assert_eq!(system.message_count().await, 0);
}

#[tokio::test]
async fn invalid_settings_stop_start_up() {
    let system = System::start(0).await;
    let cases = [
        (
            "PING_INTERVAL_MS",
            "0",
            "PING_INTERVAL_MS must be at least 1 ms",
        ),
        (
            "MAX_EVENTS_PER_SECOND",
            "0",
            "MAX_EVENTS_PER_SECOND must be at least 1",
        ),
        (
            "PRESENCE_TTL_S",
            "2",
            "PRESENCE_TTL_S must be at least 3 seconds",
        ),
    ];
    for (name, value, expected) in cases {
        let mut env = system.host_env();
        env.insert(name.to_owned(), value.to_owned());
        env.insert("PORT".to_owned(), "0".to_owned());
        let mut command = host_command(&env);
        command.arg("serve");
        let label = format!("nexus-host serve with {name}={value}");
        let output = run_to_end(command, Duration::from_secs(30), &label).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{label} exited successfully");
        assert!(
            stderr.contains(expected),
            "{label} did not print {expected:?}: {stderr}"
        );
    }
}

#[tokio::test]
async fn instances_starting_together_share_schema() {
    // System::start launches all hosts before waiting for any, so they run
    // their start-up migrations on the same fresh database at once.
    let system = System::start(3).await;
    assert!(system.db().table_exists("messages").await);
    let mut alice = system.connect(0, "alice").await;
    let mut bob = system.connect(2, "bob").await;
    exchange(&mut alice, &mut bob, "after a crowded start").await;
}

#[tokio::test]
async fn shutdown_closes_1012() {
    let mut system = System::start(2).await;
    let mut alice = system.connect(0, "alice").await;
    let mut bob = system.connect(1, "bob").await;

    let status = system.host_mut(0).terminate(Duration::from_secs(20)).await;
    let close = alice.recv_close(EVENT_TIMEOUT).await;
    assert_eq!(close.code, Some(1012), "{close}");
    let status = status.expect("nexus-host did not exit within 20 s of SIGTERM");
    assert!(
        status.success(),
        "nexus-host exited with {status} after SIGTERM"
    );

    // The client reconnects to the other instance and carries on.
    let mut alice = system.connect(1, "alice").await;
    exchange(&mut alice, &mut bob, "after the restart").await;
}

#[tokio::test]
async fn inactive_connection_closed_4003() {
    let settings = Settings::default()
        .env("INACTIVITY_TIMEOUT_MS", 1500)
        .env("PING_INTERVAL_MS", 300);
    let system = System::start_with(1, settings).await;

    // `idle` authenticates and then sends nothing, not even pongs.
    let mut idle = RawClient::connect(system.host(0).port()).await;
    let authenticate = json!({
        "event": "authenticate",
        "data": {"userId": "idle", "token": tokens::valid("idle")},
    });
    idle.send_text(&authenticate.to_string()).await;

    // `active` reads all the time, so tungstenite sends a pong for every ping.
    let mut active = system.connect(0, "active").await;
    active
        .expect_no_event("ERROR", Duration::from_millis(3500))
        .await;
    assert!(
        active.closed().is_none(),
        "the connection that sent pongs was closed"
    );
    active.health_check().await;

    let transcript = idle.read_until_closed(EVENT_TIMEOUT).await;
    assert!(
        transcript
            .texts
            .iter()
            .any(|text| text.contains("CONNECTION_SUCCESS")),
        "idle connection never authenticated: {transcript:?}"
    );
    assert!(
        transcript.pings > 0,
        "no pings within 3.5 s at PING_INTERVAL_MS 300: {transcript:?}"
    );
    assert!(
        transcript.closed,
        "idle connection ended without a close frame: {transcript:?}"
    );
    assert_eq!(transcript.close_code, Some(4003), "{transcript:?}");
}
