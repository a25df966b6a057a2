//! HTTP routes: token checks, history limited to the caller's
//! conversations, the online-user list, `/health` and `/livez`.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use nexus_tests::client::exchange;
use nexus_tests::http;
use nexus_tests::wire::{message_id, rfc3339, str_field};
use nexus_tests::{tokens, Settings, System};
use serde_json::Value;

/// Asserts a JSON error response `{code, message}` with `status`.
fn assert_json_error(response: &http::HttpResponse, status: u16, what: &str) {
    assert_eq!(response.status, status, "{what}: {}", response.body);
    let body = response.json();
    assert!(
        body.get("code").and_then(Value::as_str).is_some(),
        "{what}: error body without a code: {body}"
    );
    assert!(
        body.get("message").and_then(Value::as_str).is_some(),
        "{what}: error body without a message: {body}"
    );
}

/// Returns the messages of a history page and its `nextBefore`.
fn history_page(response: &http::HttpResponse) -> (Vec<Value>, Value) {
    assert_eq!(response.status, 200, "{}", response.body);
    let body = response.json();
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("no messages array in {body}"))
        .clone();
    let next_before = body.get("nextBefore").cloned().unwrap_or(Value::Null);
    (messages, next_before)
}

/// Returns the user ids of a `/presence/online` page, accepting ids as
/// strings or as objects with a `userId`, and its `nextCursor`.
fn presence_page(response: &http::HttpResponse) -> (Vec<String>, Value) {
    assert_eq!(response.status, 200, "{}", response.body);
    let body = response.json();
    let users = body
        .get("users")
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("no users array in {body}"))
        .iter()
        .map(|user| match user {
            Value::String(id) => id.clone(),
            other => str_field(other, "userId").to_owned(),
        })
        .collect();
    let next_cursor = body.get("nextCursor").cloned().unwrap_or(Value::Null);
    (users, next_cursor)
}

#[tokio::test]
async fn livez_and_health() {
    let system = System::start(1).await;
    let livez = system.http_get(0, "/livez", None).await;
    assert_eq!(livez.status, 200, "{}", livez.body);

    let health = system.http_get(0, "/health", None).await;
    assert_eq!(health.status, 200, "{}", health.body);
    let body = health.json();
    for field in ["status", "redis", "postgres", "components"] {
        assert!(body.get(field).is_some(), "/health has no {field}: {body}");
    }
}

#[tokio::test]
async fn health_503_while_redis_down() {
    let mut system = System::start(1).await;
    system.redis_mut().stop();

    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let health = system.http_get(0, "/health", None).await;
        if health.status == 503 {
            health.json();
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/health still {} 15 s after Redis stopped: {}",
            health.status,
            health.body
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let livez = system.http_get(0, "/livez", None).await;
    assert_eq!(
        livez.status, 200,
        "/livez must not depend on Redis: {}",
        livez.body
    );

    system.redis_mut().restart().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let health = system.http_get(0, "/health", None).await;
        if health.status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/health still {} 20 s after Redis came back: {}",
            health.status,
            health.body
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    system.connect(0, "alice").await.health_check().await;
}

#[tokio::test]
async fn auth_verify_needs_valid_token() {
    let system = System::start(1).await;
    let exp = tokens::now_s() + 900;
    let response = system
        .http_get(0, "/auth/verify", Some(&tokens::expiring_at("alice", exp)))
        .await;
    assert_eq!(response.status, 200, "{}", response.body);
    let body = response.json();
    assert_eq!(str_field(&body, "userId"), "alice");
    let expires_at = rfc3339(&body, "expiresAt");
    assert!(
        (expires_at.timestamp() - exp).abs() <= 1,
        "expiresAt {expires_at} is not exp {exp}"
    );

    let no_token = system.http_get(0, "/auth/verify", None).await;
    assert_json_error(&no_token, 401, "no token");
    for (case, token) in [
        ("forged", tokens::forged("alice")),
        ("expired", tokens::expired("alice")),
        ("alg none", tokens::alg_none("alice")),
        ("HS512", tokens::hs512("alice")),
        ("garbage", "garbage".to_owned()),
    ] {
        let response = system.http_get(0, "/auth/verify", Some(&token)).await;
        assert_json_error(&response, 401, case);
    }
    let url = format!("{}/auth/verify", system.host(0).http_url());
    let not_bearer = http::get_with_headers(
        &url,
        &[(
            "Authorization",
            &format!("Basic {}", tokens::valid("alice")),
        )],
    )
    .await;
    assert_json_error(&not_bearer, 401, "Basic scheme");
}

#[tokio::test]
async fn history_only_callers_conversations() {
    let system = System::start(1).await;
    let mut alice = system.connect(0, "alice").await;
    let mut bob = system.connect(0, "bob").await;
    let mut carol = system.connect(0, "carol").await;
    exchange(&mut alice, &mut bob, "a to b 1").await;
    exchange(&mut bob, &mut alice, "b to a").await;
    exchange(&mut alice, &mut bob, "a to b 2").await;
    exchange(&mut alice, &mut carol, "a to c").await;
    exchange(&mut carol, &mut bob, "c to b").await;

    let cases = [
        ("alice", "bob", vec!["a to b 2", "b to a", "a to b 1"]),
        ("bob", "alice", vec!["a to b 2", "b to a", "a to b 1"]),
        ("alice", "carol", vec!["a to c"]),
        ("carol", "alice", vec!["a to c"]),
        ("bob", "carol", vec!["c to b"]),
        ("dave", "bob", vec![]),
        ("dave", "alice", vec![]),
    ];
    for (caller, peer, expected) in cases {
        let response = system
            .http_get(
                0,
                &format!("/messages/{peer}"),
                Some(&tokens::valid(caller)),
            )
            .await;
        let (messages, _) = history_page(&response);
        let contents: Vec<&str> = messages.iter().map(|m| str_field(m, "content")).collect();
        assert_eq!(contents, expected, "history of {caller} with {peer}");
        for message in &messages {
            let pair = BTreeSet::from([
                str_field(message, "senderId"),
                str_field(message, "receiverId"),
            ]);
            assert_eq!(
                pair,
                BTreeSet::from([caller, peer]),
                "{caller} read {message}"
            );
            message_id(message, "messageId");
        }
    }

    let no_token = system.http_get(0, "/messages/bob", None).await;
    assert_json_error(&no_token, 401, "history without a token");
    let forged = system
        .http_get(0, "/messages/bob", Some(&tokens::forged("alice")))
        .await;
    assert_json_error(&forged, 401, "history with a forged token");
}

#[tokio::test]
async fn history_pages_newest_first() {
    let system = System::start_with(1, Settings::default().variable("history_page_max", 3)).await;
    let mut alice = system.connect(0, "alice").await;
    let mut bob = system.connect(0, "bob").await;
    let mut ids = Vec::new();
    for index in 0..5 {
        let delivered = exchange(&mut alice, &mut bob, &format!("page {index}")).await;
        ids.push(message_id(&delivered, "messageId"));
    }
    let token = tokens::valid("alice");

    let first = system
        .http_get(0, "/messages/bob?limit=2", Some(&token))
        .await;
    let (messages, next_before) = history_page(&first);
    let page: Vec<String> = messages
        .iter()
        .map(|m| message_id(m, "messageId"))
        .collect();
    assert_eq!(page, vec![ids[4].clone(), ids[3].clone()]);
    let cursor = next_before
        .as_str()
        .unwrap_or_else(|| panic!("no nextBefore after a full page: {}", first.body))
        .to_owned();

    let mut seen = page;
    let mut cursor = Some(cursor);
    let mut pages = 1;
    while let Some(before) = cursor {
        assert!(pages < 10, "history paging did not end after 10 pages");
        let response = system
            .http_get(
                0,
                &format!("/messages/bob?limit=2&before={before}"),
                Some(&token),
            )
            .await;
        let (messages, next_before) = history_page(&response);
        seen.extend(messages.iter().map(|m| message_id(m, "messageId")));
        cursor = next_before.as_str().map(str::to_owned);
        pages += 1;
    }
    let mut newest_first = ids.clone();
    newest_first.reverse();
    assert_eq!(seen, newest_first);

    // The protocol bounds a page by history_page_max but leaves open whether
    // a larger limit is capped or rejected as an invalid parameter.
    let over_max = system
        .http_get(0, "/messages/bob?limit=50", Some(&token))
        .await;
    if over_max.status == 400 {
        assert_json_error(&over_max, 400, "limit=50 over history_page_max 3");
    } else {
        let (messages, _) = history_page(&over_max);
        assert!(
            messages.len() <= 3,
            "{} messages in a page, over history_page_max 3",
            messages.len()
        );
    }

    let after = system
        .http_get(0, &format!("/messages/bob?after={}", ids[2]), Some(&token))
        .await;
    let (messages, _) = history_page(&after);
    let later: BTreeSet<String> = messages
        .iter()
        .map(|m| message_id(m, "messageId"))
        .collect();
    assert_eq!(later, BTreeSet::from([ids[3].clone(), ids[4].clone()]));

    let invalid = system
        .http_get(0, "/messages/bob?limit=abc", Some(&token))
        .await;
    assert_json_error(&invalid, 400, "limit=abc");
}

#[tokio::test]
async fn presence_online_route() {
    let system =
        System::start_with(1, Settings::default().variable("online_users_page_max", 2)).await;
    let _alice = system.connect(0, "alice").await;
    let _bob = system.connect(0, "bob").await;
    let _carol = system.connect(0, "carol").await;
    let token = tokens::valid("alice");

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10 {
        let path = match &cursor {
            Some(cursor) => format!("/presence/online?limit=2&cursor={cursor}"),
            None => "/presence/online?limit=2".to_owned(),
        };
        let response = system.http_get(0, &path, Some(&token)).await;
        let (users, next_cursor) = presence_page(&response);
        assert!(
            users.len() <= 2,
            "page over online_users_page_max 2: {}",
            response.body
        );
        seen.extend(users);
        cursor = match next_cursor {
            Value::String(next) => Some(next),
            Value::Number(next) => Some(next.to_string()),
            _ => None,
        };
        if cursor.is_none() {
            break;
        }
    }
    assert!(
        cursor.is_none(),
        "presence paging did not end after 10 pages"
    );
    let seen: BTreeSet<String> = seen.into_iter().collect();
    assert_eq!(
        seen,
        BTreeSet::from(["alice".to_owned(), "bob".to_owned(), "carol".to_owned()])
    );

    let no_token = system.http_get(0, "/presence/online", None).await;
    assert_json_error(&no_token, 401, "presence without a token");
}

#[tokio::test]
async fn unknown_route_404() {
    let system = System::start(1).await;
    let response = system
        .http_get(0, "/no/such/route", Some(&tokens::valid("alice")))
        .await;
    assert_json_error(&response, 404, "unknown route");
}

/// An HTTP route's instance keeps its place among MAX_CONCURRENT_INSTANCES
/// until it ends, also while the host sends a long body after the head.
/// Otherwise requests and events beyond the pool's slots fail instead of
/// waiting for an instance.
#[tokio::test]
async fn http_instances_stay_within_limit() {
    let system =
        System::start_with(1, Settings::default().env("MAX_CONCURRENT_INSTANCES", 2)).await;
    let db = system.db().connect().await;
    db.execute(
        "INSERT INTO messages (sender_id, receiver_id, content) \
         SELECT 'alice', 'bob', repeat('x', 4000) FROM generate_series(1, 100)",
        &[],
    )
    .await
    .expect("storing 100 messages");

    let url = format!("{}/messages/bob?limit=100", system.host(0).http_url());
    let token = tokens::valid("alice");
    let requests = (0..40).map(|_| http::get(&url, Some(&token)));
    let mut carol = system.connect(0, "carol").await;
    let events = async {
        for _ in 0..20 {
            carol.health_check().await;
        }
    };
    let (responses, ()) = tokio::join!(futures_util::future::join_all(requests), events);
    for (index, response) in responses.iter().enumerate() {
        assert_eq!(
            response.status, 200,
            "request {index} of 40: {}",
            response.body
        );
    }
}

/// A peer id that Postgres cannot store is a client error, not an outage.
#[tokio::test]
async fn history_peer_with_nul_is_400() {
    let system = System::start(1).await;
    let token = tokens::valid("alice");
    let response = system.http_get(0, "/messages/b%00b", Some(&token)).await;
    assert_json_error(&response, 400, "peer id with U+0000");
    assert!(response.body.contains("peerId"), "{}", response.body);
}

/// Sends `request` as raw bytes and returns the whole response text.
async fn raw_http(port: u16, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connecting to the host");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("sending the request");
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response))
        .await
        .expect("the host closed the connection within 5 s")
        .expect("reading the response");
    String::from_utf8_lossy(&response).into_owned()
}

/// A component route needs the request's authority, so a request without
/// a Host header is a client error, not a component failure.
#[tokio::test]
async fn route_without_host_is_400() {
    let system = System::start(1).await;
    let port = system.host(0).port();
    for request in [
        "GET /auth/verify HTTP/1.0\r\n\r\n",
        "GET /auth/verify HTTP/1.0\r\nHost:\r\n\r\n",
    ] {
        let response = raw_http(port, request).await;
        assert!(
            response.starts_with("HTTP/1.0 400") || response.starts_with("HTTP/1.1 400"),
            "{request:?}: {response}"
        );
        assert!(response.contains("BAD_REQUEST"), "{request:?}: {response}");
    }
}
