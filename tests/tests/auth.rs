//! Authentication: by event, by handshake header and by `?token=`, the
//! authentication timeout, invalid tokens, renewal and expiry, and the
//! `nexus-host token` command.

use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use futures_util::FutureExt;

use nexus_tests::client::{exchange, handshake_status};
use nexus_tests::host::{host_command, run_to_end};
use nexus_tests::wire::{int_field, rfc3339, str_field};
use nexus_tests::{tokens, Client, Settings, System, EVENT_TIMEOUT, QUIET_PERIOD};
use serde_json::{json, Value};

/// Asserts that a rejected first `authenticate` did not authenticate, got
/// `ERROR UNAUTHORIZED`, and was followed by a close with 1008.
async fn assert_rejected_and_closed(client: &mut Client, case: &str) {
    let close = client.recv_close(EVENT_TIMEOUT).await;
    if let Some(success) = client.take_buffered("CONNECTION_SUCCESS") {
        panic!("case {case}: the connection was authenticated: {success}");
    }
    let error = client
        .take_buffered("ERROR")
        .unwrap_or_else(|| panic!("case {case}: no ERROR before the connection ended ({close})"));
    assert_eq!(
        str_field(&error, "code"),
        "UNAUTHORIZED",
        "case {case}: {error}"
    );
    assert_eq!(
        str_field(&error, "event"),
        "authenticate",
        "case {case}: {error}"
    );
    assert_eq!(close.code, Some(1008), "case {case}: {close}");
}

#[tokio::test]
async fn authenticate_by_event() {
    let system = System::start(1).await;
    let mut bob = system.connect(0, "bob").await;
    let mut alice = system.connect_anonymous(0, "alice").await;
    alice
        .expect_no_event("CONNECTION_SUCCESS", QUIET_PERIOD)
        .await;

    let success = alice.authenticate("alice", &tokens::valid("alice")).await;
    assert_eq!(str_field(&success, "userId"), "alice");
    exchange(&mut alice, &mut bob, "authenticated by event").await;
}

#[tokio::test]
async fn authenticate_by_handshake_header() {
    let system = System::start(1).await;
    let mut bob = system.connect(0, "bob").await;
    let header = format!("Bearer {}", tokens::valid("alice"));
    let mut alice = Client::connect_with_headers(
        &system.host(0).ws_url(),
        &[("Authorization", &header)],
        "alice-header",
    )
    .await
    .expect("handshake with a valid bearer token");

    let success = alice.recv_event("CONNECTION_SUCCESS", EVENT_TIMEOUT).await;
    assert_eq!(str_field(&success, "userId"), "alice");
    alice.set_user("alice");
    exchange(&mut alice, &mut bob, "authenticated by header").await;
    exchange(&mut bob, &mut alice, "reply to header client").await;
}

#[tokio::test]
async fn authenticate_by_query_token() {
    let system = System::start(1).await;
    let mut bob = system.connect(0, "bob").await;
    let url = format!(
        "{}?token={}",
        system.host(0).ws_url(),
        tokens::valid("alice")
    );
    let mut alice = Client::connect(&url, "alice-query").await;

    let success = alice.recv_event("CONNECTION_SUCCESS", EVENT_TIMEOUT).await;
    assert_eq!(str_field(&success, "userId"), "alice");
    alice.set_user("alice");
    exchange(&mut alice, &mut bob, "authenticated by query").await;
}

#[tokio::test]
async fn handshake_with_invalid_token_not_authenticated() {
    let system = System::start(1).await;
    let header = format!("Bearer {}", tokens::forged("alice"));
    let result = Client::connect_with_headers(
        &system.host(0).ws_url(),
        &[("Authorization", &header)],
        "alice-forged-header",
    )
    .await;
    // The protocol fixes the outcome (no authentication) but not whether the
    // upgrade is refused or the connection is opened and then closed.
    match result {
        Err(error) => {
            let status = handshake_status(&error);
            assert!(
                matches!(status, Some(401 | 403)),
                "handshake failed other than with 401 or 403: {error}"
            );
        }
        Ok(mut client) => assert_rejected_and_closed(&mut client, "forged handshake token").await,
    }
    system.connect(0, "alice").await.health_check().await;
}

#[tokio::test]
async fn unauthenticated_connection_closed_1008() {
    let system = System::start_with(1, Settings::default().env("AUTH_TIMEOUT_MS", 1500)).await;
    let mut waiting = system.connect_anonymous(0, "never-authenticates").await;
    let started = Instant::now();
    let close = waiting
        .recv_close(Duration::from_millis(1500) + EVENT_TIMEOUT)
        .await;
    let elapsed = started.elapsed();
    assert_eq!(close.code, Some(1008), "{close}");
    assert!(
        elapsed >= Duration::from_millis(1000),
        "closed after {elapsed:?}, well before AUTH_TIMEOUT_MS of 1500 ms"
    );

    // A connection that authenticates in time stays open past the timeout.
    let mut alice = system.connect(0, "alice").await;
    alice
        .expect_no_event("ERROR", Duration::from_millis(2500))
        .await;
    alice.health_check().await;
}

#[tokio::test]
async fn invalid_tokens_rejected_with_1008() {
    let system = System::start(1).await;
    let mut bob = system.connect(0, "bob").await;
    let cases: Vec<(&str, Value)> = vec![
        ("forged signature", json!(tokens::forged("alice"))),
        ("expired", json!(tokens::expired("alice"))),
        ("not valid yet", json!(tokens::not_yet_valid("alice"))),
        ("alg none", json!(tokens::alg_none("alice"))),
        ("HS512", json!(tokens::hs512("alice"))),
        ("no exp claim", json!(tokens::without_exp("alice"))),
        ("no sub claim", json!(tokens::without_sub())),
        ("not a JWT", json!("not-a-jwt")),
        ("empty string", json!("")),
        ("subject of another user", json!(tokens::valid("mallory"))),
    ];
    // Every case runs even when an earlier one fails, so one run shows
    // which tokens are handled wrongly.
    let mut failed = Vec::new();
    for (case, token) in cases {
        let attempt = async {
            let mut client = system.connect_anonymous(0, case).await;
            client
                .send("authenticate", json!({"userId": "alice", "token": token}))
                .await;
            assert_rejected_and_closed(&mut client, case).await;
        };
        if AssertUnwindSafe(attempt).catch_unwind().await.is_err() {
            failed.push(case);
        }
    }
    let attempt = async {
        let mut client = system.connect_anonymous(0, "no token field").await;
        client
            .send("authenticate", json!({"userId": "alice"}))
            .await;
        assert_rejected_and_closed(&mut client, "no token field").await;
    };
    if AssertUnwindSafe(attempt).catch_unwind().await.is_err() {
        failed.push("no token field");
    }
    assert!(
        failed.is_empty(),
        "cases that failed (their panics are above): {failed:?}"
    );

    // Nothing above authenticated anyone, and the service carries on.
    let mut alice = system.connect(0, "alice").await;
    exchange(&mut alice, &mut bob, "after the invalid tokens").await;
}

#[tokio::test]
async fn events_before_authentication_rejected() {
    let system = System::start(1).await;
    let mut bob = system.connect(0, "bob").await;
    let mut anonymous = system.connect_anonymous(0, "anonymous").await;
    let events = [
        (
            "NEW_MESSAGE",
            json!({"receiverId": "bob", "content": "sneaky"}),
        ),
        ("TYPING_START", json!({"receiverId": "bob"})),
        ("TYPING_STOP", json!({"receiverId": "bob"})),
        ("GET_ONLINE_USERS", json!({})),
    ];
    for (event, data) in events {
        anonymous.send(event, data).await;
        let error = anonymous.recv_event("ERROR", EVENT_TIMEOUT).await;
        assert_eq!(
            str_field(&error, "code"),
            "UNAUTHENTICATED",
            "{event}: {error}"
        );
        assert_eq!(str_field(&error, "event"), event, "{error}");
    }

    // HEALTH_CHECK needs no authentication.
    let health = anonymous.health_check().await;
    assert_eq!(str_field(&health, "status"), "ok");
    let timestamp = int_field(&health, "timestamp");
    let now_ms = chrono::Utc::now().timestamp_millis();
    assert!(
        (now_ms - timestamp).abs() < 60_000,
        "HEALTH_STATUS timestamp {timestamp} is not near now ({now_ms} ms)"
    );
    assert_eq!(str_field(&health, "instanceId"), "test-a");

    bob.expect_no_event("NEW_MESSAGE", QUIET_PERIOD).await;
    bob.expect_no_event("USER_TYPING", Duration::from_millis(100))
        .await;
    assert_eq!(system.message_count().await, 0);

    // The same connection can still authenticate and chat.
    anonymous
        .authenticate("alice", &tokens::valid("alice"))
        .await;
    exchange(&mut anonymous, &mut bob, "now authenticated").await;
}

#[tokio::test]
async fn renewal_extends_authentication() {
    let system = System::start(1).await;
    let mut bob = system.connect(0, "bob").await;
    let mut alice = system.connect_anonymous(0, "alice").await;
    alice
        .authenticate("alice", &tokens::expiring_at("alice", tokens::now_s() + 3))
        .await;

    let fresh_exp = tokens::now_s() + 3600;
    let renewed = alice
        .authenticate("alice", &tokens::expiring_at("alice", fresh_exp))
        .await;
    let expires_at = rfc3339(&renewed, "expiresAt");
    assert!(
        (expires_at.timestamp() - fresh_exp).abs() <= 1,
        "renewed expiresAt {expires_at} is not the new token's exp {fresh_exp}"
    );

    // Past the first token's expiry the connection is still open.
    alice.expect_no_event("ERROR", Duration::from_secs(5)).await;
    exchange(&mut alice, &mut bob, "after renewal").await;
}

#[tokio::test]
async fn rejected_renewal_keeps_authentication() {
    let system = System::start(1).await;
    let mut bob = system.connect(0, "bob").await;
    let mut alice = system.connect(0, "alice").await;

    let attempts = [
        (
            "another user",
            json!({"userId": "bob", "token": tokens::valid("bob")}),
        ),
        (
            "forged",
            json!({"userId": "alice", "token": tokens::forged("alice")}),
        ),
        (
            "expired",
            json!({"userId": "alice", "token": tokens::expired("alice")}),
        ),
        (
            "alg none",
            json!({"userId": "alice", "token": tokens::alg_none("alice")}),
        ),
    ];
    for (case, data) in attempts {
        alice.send("authenticate", data).await;
        let error = alice.recv_event("ERROR", EVENT_TIMEOUT).await;
        assert_eq!(
            str_field(&error, "code"),
            "UNAUTHORIZED",
            "case {case}: {error}"
        );
        let delivered = exchange(&mut alice, &mut bob, &format!("still alice after {case}")).await;
        assert_eq!(str_field(&delivered, "senderId"), "alice", "case {case}");
    }
}

#[tokio::test]
async fn expired_token_closes_4002() {
    let system = System::start(1).await;
    let mut alice = system.connect_anonymous(0, "alice").await;
    let exp = tokens::now_s() + 2;
    alice
        .authenticate("alice", &tokens::expiring_at("alice", exp))
        .await;

    let close = alice.recv_close(Duration::from_secs(12)).await;
    assert_eq!(close.code, Some(4002), "{close}");
    assert!(
        tokens::now_s() >= exp,
        "closed with 4002 before the token's exp {exp}"
    );
}

#[tokio::test]
async fn token_command_mints_valid_token() {
    let system = System::start(1).await;
    let mut command = host_command(&system.host_env());
    command.args(["token", "carol", "--ttl-s", "600"]);
    let output = run_to_end(command, Duration::from_secs(30), "nexus-host token").await;
    assert!(
        output.status.success(),
        "nexus-host token failed with {}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let token = String::from_utf8(output.stdout).expect("token output is UTF-8");
    let token = token.trim();

    let claims = tokens::verify(token);
    assert_eq!(claims["sub"], "carol");
    let exp = claims["exp"].as_i64().expect("exp is an integer");
    let expected = tokens::now_s() + 600;
    assert!(
        (exp - expected).abs() <= 5,
        "exp {exp} is not about now + 600 s ({expected})"
    );

    let mut carol = system.connect_anonymous(0, "carol").await;
    carol.authenticate("carol", token).await;
}
