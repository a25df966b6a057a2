//! A WebSocket client of the native protocol that remembers what it
//! received, so a test can wait for one event while others arrive, and
//! reports everything it saw when a wait fails.

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::EVENT_TIMEOUT;

type WsStream = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Bound on the TCP connect and WebSocket handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Bound on writing one frame.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// Frames kept for failure messages.
const HISTORY_LEN: usize = 40;

/// One server frame `{"event": NAME, "data": VALUE}`.
#[derive(Clone, Debug)]
pub struct Event {
    pub name: String,
    pub data: Value,
}

/// How the connection ended, as the client saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Close {
    /// The close code of the server's close frame, or `None` when the
    /// connection ended without one (reset, EOF or an empty close frame).
    pub code: Option<u16>,
    pub reason: String,
}

impl fmt::Display for Close {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.code {
            Some(code) => write!(f, "close code {code}, reason {:?}", self.reason),
            None => write!(f, "no close code ({})", self.reason),
        }
    }
}

enum Incoming {
    Event(Event),
    Closed(Close),
}

/// A native WebSocket client of one host.
pub struct Client {
    label: String,
    user: Option<String>,
    ws: WsStream,
    /// Events received but not yet consumed by a `recv_*` call, in order.
    buffered: VecDeque<Event>,
    /// Short descriptions of the last frames received, for failure messages.
    history: VecDeque<String>,
    closed: Option<Close>,
}

impl Client {
    /// Opens a connection without an `Origin` header, as a native client
    /// does. Panics when the handshake fails.
    pub async fn connect(url: &str, label: &str) -> Client {
        Client::connect_with_headers(url, &[], label)
            .await
            .unwrap_or_else(|error| {
                panic!(
                    "{label}: WebSocket handshake with {url} failed: {}",
                    describe_ws_error(&error)
                )
            })
    }

    /// Opens a connection with extra handshake headers, returning the
    /// handshake error (for example an HTTP 403) instead of panicking.
    pub async fn connect_with_headers(
        url: &str,
        headers: &[(&str, &str)],
        label: &str,
    ) -> Result<Client, WsError> {
        let mut request = url.into_client_request()?;
        for (name, value) in headers {
            let value = HeaderValue::from_str(value)
                .unwrap_or_else(|error| panic!("invalid value for header {name}: {error}"));
            let name =
                tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes())
                    .unwrap_or_else(|error| panic!("invalid header name {name}: {error}"));
            request.headers_mut().insert(name, value);
        }
        let handshake = tokio_tungstenite::connect_async(request);
        let (ws, _response) = match tokio::time::timeout(CONNECT_TIMEOUT, handshake).await {
            Ok(result) => result?,
            Err(_) => panic!(
                "{label}: WebSocket handshake with {url} timed out after {CONNECT_TIMEOUT:?}"
            ),
        };
        Ok(Client {
            label: label.to_owned(),
            user: None,
            ws,
            buffered: VecDeque::new(),
            history: VecDeque::new(),
            closed: None,
        })
    }

    /// Returns the name used for this client in failure messages.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Returns the user this connection authenticated as, if it did.
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// Records the user a handshake token authenticated.
    pub fn set_user(&mut self, user: &str) {
        self.user = Some(user.to_owned());
    }

    /// Returns how the connection ended, if this client has read its end.
    pub fn closed(&self) -> Option<&Close> {
        self.closed.as_ref()
    }

    // ---- sending ----

    /// Sends `{"event": event, "data": data}`.
    pub async fn send(&mut self, event: &str, data: Value) {
        let frame = json!({"event": event, "data": data}).to_string();
        self.send_message(Message::text(frame)).await;
    }

    /// Sends `{"event": event}` without a `data` field.
    pub async fn send_without_data(&mut self, event: &str) {
        let frame = json!({"event": event}).to_string();
        self.send_message(Message::text(frame)).await;
    }

    /// Sends a text frame with exactly this text.
    pub async fn send_text(&mut self, text: &str) {
        self.send_message(Message::text(text.to_owned())).await;
    }

    /// Sends a binary frame.
    pub async fn send_binary(&mut self, bytes: Vec<u8>) {
        self.send_message(Message::binary(bytes)).await;
    }

    /// Sends a text frame whose payload is taken as is, valid UTF-8 or not.
    /// Errors are recorded, not raised, because the server may close the
    /// connection while the frame is in flight.
    pub async fn send_raw_text_frame(&mut self, payload: Vec<u8>, is_final: bool) {
        let frame = Frame::message(payload, OpCode::Data(Data::Text), is_final);
        self.send_message_lenient(Message::Frame(frame)).await;
    }

    /// Sends a continuation frame of a fragmented message, recording errors
    /// as [`Client::send_raw_text_frame`] does.
    pub async fn send_continuation_frame(&mut self, payload: Vec<u8>, is_final: bool) {
        let frame = Frame::message(payload, OpCode::Data(Data::Continue), is_final);
        self.send_message_lenient(Message::Frame(frame)).await;
    }

    /// Sends a text frame, recording errors instead of panicking (for frames
    /// the server is expected to close the connection for).
    pub async fn send_text_lenient(&mut self, text: &str) {
        self.send_message_lenient(Message::text(text.to_owned()))
            .await;
    }

    async fn send_message(&mut self, message: Message) {
        if let Some(close) = &self.closed {
            panic!(
                "{}: cannot send, the connection already ended ({close})",
                self.label
            );
        }
        match tokio::time::timeout(SEND_TIMEOUT, self.ws.send(message)).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => panic!(
                "{}: failed to send a frame: {}; last frames received:\n{}",
                self.label,
                describe_ws_error(&error),
                self.history_text()
            ),
            Err(_) => panic!(
                "{}: sending a frame timed out after {SEND_TIMEOUT:?}",
                self.label
            ),
        }
    }

    async fn send_message_lenient(&mut self, message: Message) {
        match tokio::time::timeout(SEND_TIMEOUT, self.ws.send(message)).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                self.remember(format!("(send failed: {})", describe_ws_error(&error)))
            }
            Err(_) => self.remember(format!("(send timed out after {SEND_TIMEOUT:?})")),
        }
    }

    // ---- protocol helpers ----

    /// Sends `authenticate {userId, token}` and returns the
    /// `CONNECTION_SUCCESS` data, after checking that it names `user`.
    pub async fn authenticate(&mut self, user: &str, token: &str) -> Value {
        self.send("authenticate", json!({"userId": user, "token": token}))
            .await;
        let success = self.recv_event("CONNECTION_SUCCESS", EVENT_TIMEOUT).await;
        assert_eq!(
            success.get("userId").and_then(Value::as_str),
            Some(user),
            "{}: CONNECTION_SUCCESS names another user: {success}",
            self.label
        );
        self.user = Some(user.to_owned());
        success
    }

    /// Sends `NEW_MESSAGE` and returns the `MESSAGE_SENT` data.
    pub async fn send_message_to(
        &mut self,
        receiver: &str,
        content: &str,
        client_message_id: Option<&str>,
    ) -> Value {
        let mut data = json!({"receiverId": receiver, "content": content});
        if let Some(id) = client_message_id {
            data["clientMessageId"] = json!(id);
        }
        self.send("NEW_MESSAGE", data).await;
        self.recv_event("MESSAGE_SENT", EVENT_TIMEOUT).await
    }

    /// Sends `HEALTH_CHECK` and returns the `HEALTH_STATUS` data: a quick
    /// proof that the connection is open and served.
    pub async fn health_check(&mut self) -> Value {
        self.send_without_data("HEALTH_CHECK").await;
        self.recv_event("HEALTH_STATUS", EVENT_TIMEOUT).await
    }

    // ---- receiving ----

    /// Waits for the next event named `name` and returns its data. Other
    /// events are kept for later calls. Panics on timeout or close.
    pub async fn recv_event(&mut self, name: &str, timeout: Duration) -> Value {
        self.recv_matching(name, timeout, |_| true).await
    }

    /// Waits for the next event named `name` whose data satisfies
    /// `predicate`. Panics on timeout or close.
    pub async fn recv_matching(
        &mut self,
        name: &str,
        timeout: Duration,
        predicate: impl Fn(&Value) -> bool,
    ) -> Value {
        match self.try_recv_matching(name, timeout, predicate).await {
            Some(data) => data,
            None => panic!(
                "{}: timed out after {timeout:?} waiting for {name}; last frames received:\n{}",
                self.label,
                self.history_text()
            ),
        }
    }

    /// Like [`Client::recv_matching`], but returns `None` on timeout.
    /// Panics when the connection ends first.
    pub async fn try_recv_matching(
        &mut self,
        name: &str,
        timeout: Duration,
        predicate: impl Fn(&Value) -> bool,
    ) -> Option<Value> {
        if let Some(position) = self
            .buffered
            .iter()
            .position(|event| event.name == name && predicate(&event.data))
        {
            return self.buffered.remove(position).map(|event| event.data);
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.read_until(deadline).await {
                None => return None,
                Some(Incoming::Event(event)) if event.name == name && predicate(&event.data) => {
                    return Some(event.data)
                }
                Some(Incoming::Event(event)) => self.buffered.push_back(event),
                Some(Incoming::Closed(close)) => panic!(
                    "{}: connection ended ({close}) while waiting for {name}; last frames received:\n{}",
                    self.label,
                    self.history_text()
                ),
            }
        }
    }

    /// Waits for the next event whose name is one of `names` and returns it,
    /// so a test can tell which of several replies came first. Other events
    /// are kept. Panics on timeout or close.
    pub async fn recv_any_of(&mut self, names: &[&str], timeout: Duration) -> Event {
        if let Some(position) = self
            .buffered
            .iter()
            .position(|event| names.contains(&event.name.as_str()))
        {
            if let Some(event) = self.buffered.remove(position) {
                return event;
            }
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.read_until(deadline).await {
                None => panic!(
                    "{}: timed out after {timeout:?} waiting for any of {names:?}; last frames received:\n{}",
                    self.label,
                    self.history_text()
                ),
                Some(Incoming::Event(event)) if names.contains(&event.name.as_str()) => {
                    return event
                }
                Some(Incoming::Event(event)) => self.buffered.push_back(event),
                Some(Incoming::Closed(close)) => panic!(
                    "{}: connection ended ({close}) while waiting for any of {names:?}; last frames received:\n{}",
                    self.label,
                    self.history_text()
                ),
            }
        }
    }

    /// Removes and returns the first already received event named `name`,
    /// without reading from the connection (which may have ended).
    pub fn take_buffered(&mut self, name: &str) -> Option<Value> {
        let position = self.buffered.iter().position(|event| event.name == name)?;
        self.buffered.remove(position).map(|event| event.data)
    }

    /// Returns the next event of any name, buffered ones first, or `None`
    /// when none arrives within `timeout`. Panics when the connection ends.
    pub async fn next_event(&mut self, timeout: Duration) -> Option<Event> {
        if let Some(event) = self.buffered.pop_front() {
            return Some(event);
        }
        let deadline = Instant::now() + timeout;
        match self.read_until(deadline).await {
            None => None,
            Some(Incoming::Event(event)) => Some(event),
            Some(Incoming::Closed(close)) => panic!(
                "{}: connection ended ({close}) while waiting for any event; last frames received:\n{}",
                self.label,
                self.history_text()
            ),
        }
    }

    /// Listens for `duration` and panics if an event named `name` arrives
    /// (or was already buffered). Other events are kept.
    pub async fn expect_no_event(&mut self, name: &str, duration: Duration) {
        self.expect_no_matching(name, duration, |_| true).await;
    }

    /// Listens for `duration` and panics if an event named `name` whose data
    /// satisfies `predicate` arrives or was already buffered.
    pub async fn expect_no_matching(
        &mut self,
        name: &str,
        duration: Duration,
        predicate: impl Fn(&Value) -> bool,
    ) {
        if let Some(event) = self
            .buffered
            .iter()
            .find(|event| event.name == name && predicate(&event.data))
        {
            panic!("{}: unexpected {name} {}", self.label, event.data);
        }
        let deadline = Instant::now() + duration;
        loop {
            match self.read_until(deadline).await {
                None => return,
                Some(Incoming::Event(event)) if event.name == name && predicate(&event.data) => {
                    panic!(
                        "{}: unexpected {name} {}; last frames received:\n{}",
                        self.label,
                        event.data,
                        self.history_text()
                    )
                }
                Some(Incoming::Event(event)) => self.buffered.push_back(event),
                Some(Incoming::Closed(close)) => panic!(
                    "{}: connection ended ({close}) while checking that no {name} arrives",
                    self.label
                ),
            }
        }
    }

    /// Waits for the connection to end and returns how it ended. Events that
    /// arrive first are kept. Panics when it is still open after `timeout`.
    pub async fn recv_close(&mut self, timeout: Duration) -> Close {
        let deadline = Instant::now() + timeout;
        loop {
            match self.read_until(deadline).await {
                None => panic!(
                    "{}: connection still open after {timeout:?}, expected a close; last frames received:\n{}",
                    self.label,
                    self.history_text()
                ),
                Some(Incoming::Event(event)) => self.buffered.push_back(event),
                Some(Incoming::Closed(close)) => return close,
            }
        }
    }

    /// Waits up to `timeout` for the connection to end and returns how it
    /// ended, or `None` when it is still open. Events that arrive first are
    /// kept.
    pub async fn wait_for_close(&mut self, timeout: Duration) -> Option<Close> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.read_until(deadline).await {
                None => return None,
                Some(Incoming::Event(event)) => self.buffered.push_back(event),
                Some(Incoming::Closed(close)) => return Some(close),
            }
        }
    }

    /// Waits for the next event named `name` and returns its data, or
    /// returns how the connection ended when it ends first. Other events are
    /// kept. Panics on timeout.
    pub async fn recv_event_or_close(
        &mut self,
        name: &str,
        timeout: Duration,
    ) -> Result<Value, Close> {
        if let Some(position) = self.buffered.iter().position(|event| event.name == name) {
            if let Some(event) = self.buffered.remove(position) {
                return Ok(event.data);
            }
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.read_until(deadline).await {
                None => panic!(
                    "{}: timed out after {timeout:?} waiting for {name} or a close; last frames received:\n{}",
                    self.label,
                    self.history_text()
                ),
                Some(Incoming::Event(event)) if event.name == name => return Ok(event.data),
                Some(Incoming::Event(event)) => self.buffered.push_back(event),
                Some(Incoming::Closed(close)) => return Err(close),
            }
        }
    }

    /// Removes and returns every event received so far and not yet
    /// consumed, in arrival order.
    pub fn take_all_buffered(&mut self) -> Vec<Event> {
        self.buffered.drain(..).collect()
    }

    /// Sends a normal close (1000), waits briefly for the server's reply and
    /// returns every unconsumed event, including those that arrived during
    /// the closing handshake. [`Client::close`] drops those.
    pub async fn close_collecting(mut self) -> Vec<Event> {
        if self.closed.is_none() {
            let _ = tokio::time::timeout(SEND_TIMEOUT, self.ws.close(None)).await;
            let deadline = Instant::now() + Duration::from_secs(2);
            while self.closed.is_none() {
                match self.read_until(deadline).await {
                    None => break,
                    Some(Incoming::Event(event)) => self.buffered.push_back(event),
                    Some(Incoming::Closed(_)) => break,
                }
            }
        }
        self.take_all_buffered()
    }

    /// Sends a normal close (1000) and waits briefly for the server's reply.
    pub async fn close(mut self) {
        if self.closed.is_some() {
            return;
        }
        let _ = tokio::time::timeout(SEND_TIMEOUT, self.ws.close(None)).await;
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.closed.is_none() {
            if self.read_until(deadline).await.is_none() {
                break;
            }
        }
    }

    /// Reads frames until an event arrives, the connection ends or the
    /// deadline passes (`None`). tungstenite sends a pong for each ping it
    /// reads.
    async fn read_until(&mut self, deadline: Instant) -> Option<Incoming> {
        loop {
            if let Some(close) = &self.closed {
                return Some(Incoming::Closed(close.clone()));
            }
            let next = match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return None,
                Ok(next) => next,
            };
            match next {
                None => self.set_closed(None, "the stream ended without a close frame".into()),
                Some(Err(error)) => self.set_closed(None, describe_ws_error(&error)),
                Some(Ok(Message::Text(text))) => {
                    let event = parse_event(&self.label, text.as_str());
                    self.remember(format!("{} {}", event.name, event.data));
                    return Some(Incoming::Event(event));
                }
                Some(Ok(Message::Binary(bytes))) => panic!(
                    "{}: the server sent a binary frame of {} bytes; the protocol uses text frames only",
                    self.label,
                    bytes.len()
                ),
                Some(Ok(Message::Close(frame))) => {
                    let (code, reason) = match frame {
                        Some(CloseFrame { code, reason }) => (Some(u16::from(code)), reason.to_string()),
                        None => (None, "a close frame without a code".into()),
                    };
                    self.set_closed(code, reason);
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
            }
        }
    }

    fn set_closed(&mut self, code: Option<u16>, reason: String) {
        let close = Close { code, reason };
        self.remember(format!("(connection ended: {close})"));
        self.closed = Some(close);
    }

    fn remember(&mut self, line: String) {
        let mut line = line;
        if line.len() > 300 {
            let mut cut = 300;
            while !line.is_char_boundary(cut) {
                cut -= 1;
            }
            line.truncate(cut);
            line.push_str("...");
        }
        if self.history.len() == HISTORY_LEN {
            self.history.pop_front();
        }
        self.history.push_back(line);
    }

    fn history_text(&self) -> String {
        if self.history.is_empty() {
            return "  (none)".into();
        }
        self.history
            .iter()
            .map(|line| format!("  {line}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn parse_event(label: &str, text: &str) -> Event {
    let value: Value = serde_json::from_str(text).unwrap_or_else(|error| {
        panic!("{label}: the server sent a frame that is not JSON ({error}): {text}")
    });
    let name = value
        .get("event")
        .and_then(Value::as_str)
        .unwrap_or_else(|| {
            panic!("{label}: the server sent a frame without a string \"event\": {text}")
        })
        .to_owned();
    let data = value.get("data").cloned().unwrap_or(Value::Null);
    Event { name, data }
}

/// Describes a WebSocket error, including the HTTP status of a rejected
/// handshake.
pub fn describe_ws_error(error: &WsError) -> String {
    match error {
        WsError::Http(response) => format!("handshake rejected with HTTP {}", response.status()),
        other => other.to_string(),
    }
}

/// Returns the HTTP status of a rejected handshake, if that is what the
/// error is.
pub fn handshake_status(error: &WsError) -> Option<u16> {
    match error {
        WsError::Http(response) => Some(response.status().as_u16()),
        _ => None,
    }
}

/// Sends a message from `sender` to `receiver` and waits for both sides:
/// `MESSAGE_SENT` on the sender and `NEW_MESSAGE` with this content on the
/// receiver. Returns the `NEW_MESSAGE` data.
pub async fn exchange(sender: &mut Client, receiver: &mut Client, content: &str) -> Value {
    let receiver_id = receiver
        .user()
        .unwrap_or_else(|| panic!("{} is not authenticated", receiver.label()))
        .to_owned();
    let sent = sender.send_message_to(&receiver_id, content, None).await;
    let delivered = receiver
        .recv_matching("NEW_MESSAGE", EVENT_TIMEOUT, |data| {
            data.get("content").and_then(Value::as_str) == Some(content)
        })
        .await;
    assert_eq!(
        sent.get("messageId"),
        delivered.get("messageId"),
        "MESSAGE_SENT {sent} and NEW_MESSAGE {delivered} name different messages"
    );
    delivered
}
