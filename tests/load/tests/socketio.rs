//! The Socket.IO client against a small in-test Socket.IO v4 server: the
//! Engine.IO handshake, pings every 200 ms that need a pong in reply, the
//! `authenticate` event with a token checked against the secret, and
//! message relay between two users.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{decode, Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::Message;

use support::{run_load, LoadRun, JWT_SECRET};

const PING_INTERVAL_MS: u64 = 200;
/// Unanswered pings after which the mock closes a connection.
const MAX_MISSED_PINGS: u64 = 3;

#[derive(Default)]
struct MockStats {
    handshakes: AtomicU64,
    bad_paths: AtomicU64,
    authenticated: AtomicU64,
    rejected_tokens: AtomicU64,
    pings: AtomicU64,
    pongs: AtomicU64,
    closed_for_missed_pongs: AtomicU64,
    messages: AtomicU64,
}

type Users = Arc<Mutex<HashMap<String, mpsc::UnboundedSender<String>>>>;

#[derive(Deserialize)]
struct Claims {
    sub: String,
}

fn event(name: &str, data: &Value) -> String {
    format!("42{}", json!([name, data]))
}

async fn serve(listener: TcpListener, stats: Arc<MockStats>) {
    let users: Users = Arc::default();
    while let Ok((stream, _)) = listener.accept().await {
        tokio::spawn(connection(stream, Arc::clone(&stats), Arc::clone(&users)));
    }
}

// The handshake callback's error type is tungstenite's, however large.
#[allow(clippy::result_large_err)]
async fn connection(stream: TcpStream, stats: Arc<MockStats>, users: Users) {
    let check_path = |request: &Request, response: Response| -> Result<Response, ErrorResponse> {
        let uri = request.uri();
        let query = uri.query().unwrap_or_default();
        if uri.path() != "/socket.io/"
            || !query.contains("EIO=4")
            || !query.contains("transport=websocket")
        {
            stats.bad_paths.fetch_add(1, Ordering::Relaxed);
        }
        Ok(response)
    };
    let Ok(websocket) = tokio_tungstenite::accept_hdr_async(stream, check_path).await else {
        return;
    };
    stats.handshakes.fetch_add(1, Ordering::Relaxed);
    let (mut sink, mut source) = websocket.split();
    let (outgoing, mut queue) = mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        while let Some(text) = queue.recv().await {
            if sink.send(Message::text(text)).await.is_err() {
                return;
            }
        }
        let _ = sink.close().await;
    });
    let open = json!({
        "sid": "mock",
        "upgrades": [],
        "pingInterval": PING_INTERVAL_MS,
        "pingTimeout": PING_INTERVAL_MS * MAX_MISSED_PINGS,
        "maxPayload": 1_000_000,
    });
    let _ = outgoing.send(format!("0{open}"));

    let mut user_id: Option<String> = None;
    let mut unanswered = 0;
    let mut ticker = tokio::time::interval(Duration::from_millis(PING_INTERVAL_MS));
    ticker.tick().await;
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                if unanswered >= MAX_MISSED_PINGS {
                    stats.closed_for_missed_pongs.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                unanswered += 1;
                stats.pings.fetch_add(1, Ordering::Relaxed);
                let _ = outgoing.send("2".to_string());
            }
            message = source.next() => {
                let Some(Ok(Message::Text(text))) = message else { break };
                let text = text.as_str();
                if text == "3" {
                    unanswered = 0;
                    stats.pongs.fetch_add(1, Ordering::Relaxed);
                } else if text == "40" {
                    let _ = outgoing.send(r#"40{"sid":"mock-socket"}"#.to_string());
                } else if let Some(body) = text.strip_prefix("42") {
                    let Ok(Value::Array(items)) = serde_json::from_str::<Value>(body) else {
                        continue;
                    };
                    let name = items.first().and_then(Value::as_str).unwrap_or_default();
                    let data = items.get(1).cloned().unwrap_or(Value::Null);
                    match name {
                        "authenticate" => {
                            let Some(id) = authenticate(&data) else {
                                stats.rejected_tokens.fetch_add(1, Ordering::Relaxed);
                                let error =
                                    json!({"code": "UNAUTHORIZED", "event": "authenticate"});
                                let _ = outgoing.send(event("ERROR", &error));
                                break;
                            };
                            stats.authenticated.fetch_add(1, Ordering::Relaxed);
                            users
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .insert(id.clone(), outgoing.clone());
                            let success = json!({"userId": id});
                            let _ = outgoing.send(event("CONNECTION_SUCCESS", &success));
                            user_id = Some(id);
                        }
                        "NEW_MESSAGE" => {
                            let Some(sender) = user_id.as_deref() else { continue };
                            let number = stats.messages.fetch_add(1, Ordering::Relaxed);
                            let receiver = data["receiverId"].as_str().unwrap_or_default();
                            let message = json!({
                                "messageId": format!("{number:020}"),
                                "senderId": sender,
                                "receiverId": receiver,
                                "content": data["content"],
                            });
                            let registry = users.lock().unwrap_or_else(PoisonError::into_inner);
                            if let Some(target) = registry.get(receiver) {
                                let _ = target.send(event("NEW_MESSAGE", &message));
                            }
                            drop(registry);
                            let ack = json!({
                                "messageId": format!("{number:020}"),
                                "clientMessageId": data["clientMessageId"],
                            });
                            let _ = outgoing.send(event("MESSAGE_SENT", &ack));
                        }
                        _ => {}
                    }
                }
            }
        }
    }
    if let Some(id) = user_id {
        users
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
    }
}

/// Returns the user id when the token is a valid HS256 token for it.
fn authenticate(data: &Value) -> Option<String> {
    let user_id = data["userId"].as_str()?;
    let token = data["token"].as_str()?;
    let claims = decode::<Claims>(
        token,
        &DecodingKey::from_secret(JWT_SECRET.as_bytes()),
        &Validation::new(Algorithm::HS256),
    )
    .ok()?
    .claims;
    (claims.sub == user_id).then(|| user_id.to_string())
}

/// Starts the mock on a free loopback port and runs nexus-load against it.
async fn run_against_mock(args: &[&str]) -> (LoadRun, Arc<MockStats>) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binding the mock");
    let url = format!(
        "ws://127.0.0.1:{}",
        listener.local_addr().expect("address").port()
    );
    let stats = Arc::new(MockStats::default());
    let server = tokio::spawn(serve(listener, Arc::clone(&stats)));
    let mut full: Vec<String> = vec!["--protocol".into(), "socketio".into(), "--url".into(), url];
    full.extend(args.iter().map(|arg| arg.to_string()));
    let run = tokio::task::spawn_blocking(move || {
        let dir = tempfile::tempdir().expect("temporary folder");
        run_load(dir.path(), &full, Duration::from_secs(60))
    })
    .await
    .expect("nexus-load runner");
    server.abort();
    (run, stats)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socketio_chat_relays_messages() {
    let (run, stats) =
        run_against_mock(&["chat", "--pairs", "3", "--rate", "30", "--duration", "2"]).await;
    let result = run.json();
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(stats.bad_paths.load(Ordering::Relaxed), 0);
    assert_eq!(stats.authenticated.load(Ordering::Relaxed), 6);
    assert_eq!(stats.rejected_tokens.load(Ordering::Relaxed), 0);
    let sent = run.counter("sent");
    assert!(sent >= 45, "sent {sent}: {result}");
    assert_eq!(run.counter("acked"), sent, "{result}");
    assert_eq!(run.counter("delivered"), sent, "{result}");
    assert_eq!(stats.messages.load(Ordering::Relaxed), sent);
    assert_eq!(run.counter("malformed_frames"), 0, "{result}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socketio_idle_answers_engine_pings() {
    let (run, stats) = run_against_mock(&["idle", "--connections", "10", "--duration", "2"]).await;
    let result = run.json();
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(run.counter("connected"), 10, "{result}");
    assert_eq!(result["open_at_stop"], 10, "{result}");
    assert_eq!(run.counter("dropped"), 0, "{result}");
    assert_eq!(stats.closed_for_missed_pongs.load(Ordering::Relaxed), 0);
    // About ten pings per connection in 2 s, and a pong for all but the
    // last few.
    let pongs = stats.pongs.load(Ordering::Relaxed);
    assert!(pongs >= 50, "pongs {pongs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socketio_rejects_header_auth() {
    let (run, stats) =
        run_against_mock(&["--auth", "header", "connect", "--connections", "1"]).await;
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(
        run.stderr.contains("--auth header is not available"),
        "{}",
        run.stderr
    );
    assert_eq!(stats.handshakes.load(Ordering::Relaxed), 0);
}
