//! One WebSocket session: reads frames, dispatches events to components one
//! at a time in arrival order, carries out their effects, and runs the
//! connection's timers, pings and time limits.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures::stream::{BoxStream, SplitSink};
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;
use socketioxide::extract::AckSender;
use tokio::sync::watch;
use tokio::time::{sleep_until, Instant as TokioInstant};
use tracing::{debug, info, warn};

use super::close;
use crate::app::{AddressSlot, App};
use crate::delivery::queue::{self, FrameReceiver, FrameSender, TrySendError};
use crate::delivery::registry::{Control, ControlSignal, Insert, Outgoing, SessionHandle};
use crate::metrics::Metrics;
use crate::runtime::bindings::{ConnectionInfo, Effect, Event, EventSource};
use crate::runtime::InvokeError;

/// Events a client may send before authenticating.
const PUBLIC_EVENTS: &[&str] = &["authenticate", "HEALTH_CHECK"];
const CONNECTED_EVENT: &str = "$connected";
const DISCONNECTED_EVENT: &str = "$disconnected";

/// A frame as clients send it: `{"event": NAME, "data": VALUE}`.
#[derive(Deserialize)]
struct ClientFrame<'a> {
    event: String,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

struct PendingTimer {
    due: Instant,
    event: String,
    data: String,
    fire_on_close: bool,
}

/// Token bucket for the per-connection frame rate.
struct FrameBudget {
    tokens: f64,
    capacity: f64,
    per_second: f64,
    refilled: Instant,
}

impl FrameBudget {
    fn new(per_second: u32) -> Self {
        let per_second = f64::from(per_second);
        Self {
            tokens: per_second * 2.0,
            capacity: per_second * 2.0,
            per_second,
            refilled: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        let elapsed = now.duration_since(self.refilled).as_secs_f64();
        self.refilled = now;
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.capacity);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Input that a transport passes to the session.
pub enum Inbound {
    /// A native WebSocket message.
    Message(Message),
    /// The native WebSocket failed to read a frame.
    ReadError(axum::Error),
    /// A Socket.IO event, already split into name and JSON data, with the
    /// client's acknowledgement callback if it passed one.
    Event {
        name: String,
        data: String,
        ack: Option<AckSender>,
    },
    /// The Socket.IO client disconnected.
    Closed,
}

/// The protocol a session speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Native WebSocket: the session sends pings and enforces the
    /// inactivity timeout.
    WebSocket,
    /// Socket.IO: Engine.IO's own ping and timeout keep the connection
    /// alive or end it, and its pongs never reach the session, so the
    /// session leaves both to it.
    SocketIo,
}

/// Signal to a session's writer to stop at once, with the close frame to send.
pub type AbortSignal = watch::Receiver<Option<(u16, String)>>;

/// Reason the session loop ended.
enum End {
    /// The client closed or the socket failed.
    ClientGone,
    /// The server closed with this code.
    Closed(u16),
}

/// Live deliveries held back while `$connected` handlers run, so that
/// messages a handler replays (catch-up) come first and a live copy of the
/// same frame is dropped.
struct Staging {
    frames: FrameReceiver,
    replayed: HashSet<u64>,
}

fn frame_hash(frame: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    frame.hash(&mut hasher);
    hasher.finish()
}

/// Time a session that sent a close frame waits for the client's reply.
const CLOSE_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(1);

/// Time a closing session gives its writer to flush queued frames.
const WRITER_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Session {
    app: Arc<App>,
    id: String,
    remote: SocketAddr,
    user_id: Option<String>,
    expires_at_ms: u64,
    epoch: u64,
    replaced: bool,
    /// Closed because the instance is shutting down: the user's presence
    /// stays, so a quick reconnect elsewhere shows no offline.
    restarting: bool,
    closing: Option<u16>,
    staging: Option<Staging>,
    /// Tells the writer to stop at once and send this close frame.
    abort_writer: watch::Sender<Option<(u16, String)>>,
    outgoing: FrameSender,
    control: Arc<ControlSignal>,
    timers: HashMap<String, PendingTimer>,
    /// Host-raised events queued by effects, run after the current batch.
    pending: VecDeque<(String, String, EventSource)>,
    last_activity: Instant,
    budget: FrameBudget,
    /// Acknowledgement callback of the Socket.IO event being handled; it
    /// receives the data of the event's first reply.
    ack: Option<AckSender>,
    transport: Transport,
    _slot: AddressSlot,
}

fn now_ms() -> u64 {
    chrono::Utc::now().timestamp_millis().max(0) as u64
}

/// Builds the JSON text frame `{"event": NAME, "data": DATA}`; `data` is JSON
/// text already.
pub fn frame(event: &str, data: &str) -> Utf8Bytes {
    let name = serde_json::to_string(event).unwrap_or_else(|_| "\"\"".to_string());
    Utf8Bytes::from(format!("{{\"event\":{name},\"data\":{data}}}"))
}

fn error_data(code: &str, message: &str, event: Option<&str>) -> String {
    json!({ "code": code, "message": message, "event": event }).to_string()
}

/// Checks that a component's `data` is JSON, so a faulty component cannot
/// send a client something it cannot parse.
fn checked_data<'a>(component_event: &str, data: &'a str) -> Option<&'a str> {
    match serde_json::from_str::<&RawValue>(data) {
        Ok(_) => Some(data),
        Err(error) => {
            warn!(event = component_event, cause = %error, "component returned data that is not JSON");
            None
        }
    }
}

impl Session {
    /// Returns the future that runs a session on a native WebSocket until it
    /// ends and then cleans up its presence.
    ///
    /// This is a plain function that returns the session's future, because
    /// an `async fn` would keep its arguments, the WebSocket among them, in
    /// the future for the whole connection, after they were moved out.
    pub fn run_websocket(
        app: Arc<App>,
        socket: WebSocket,
        remote: SocketAddr,
        handshake_token: Option<String>,
        slot: AddressSlot,
    ) -> impl Future<Output = ()> + Send {
        let (sink, stream) = socket.split();
        let inbound = stream
            .map(|item| match item {
                Ok(message) => Inbound::Message(message),
                Err(error) => Inbound::ReadError(error),
            })
            .boxed();
        let spawn_writer = move |frames, abort| tokio::spawn(write_frames(sink, frames, abort));
        let transport = Transport::WebSocket;
        Self::run(
            app,
            transport,
            inbound,
            spawn_writer,
            remote,
            handshake_token,
            slot,
        )
    }

    /// Returns the future that runs a session on any transport: `inbound`
    /// yields what the client sent, and `spawn_writer` starts the task that
    /// sends queued frames.
    ///
    /// The set-up runs when this is called. The returned future keeps only
    /// what the open connection needs, because every open connection keeps
    /// one in memory.
    pub fn run(
        app: Arc<App>,
        transport: Transport,
        mut inbound: BoxStream<'static, Inbound>,
        spawn_writer: impl FnOnce(FrameReceiver, AbortSignal) -> tokio::task::JoinHandle<()>,
        remote: SocketAddr,
        handshake_token: Option<String>,
        slot: AddressSlot,
    ) -> impl Future<Output = ()> + Send {
        let (outgoing, outgoing_rx) = queue::channel(app.config.send_queue_frames);
        let (abort_writer, abort_rx) = watch::channel(None);
        let writer = spawn_writer(outgoing_rx, abort_rx);
        app.metrics.connections.inc();
        let mut session = Session {
            id: uuid::Uuid::now_v7().simple().to_string(),
            remote,
            user_id: None,
            expires_at_ms: 0,
            epoch: 0,
            replaced: false,
            restarting: false,
            closing: None,
            staging: None,
            abort_writer,
            outgoing,
            control: Arc::default(),
            timers: HashMap::new(),
            pending: VecDeque::new(),
            last_activity: Instant::now(),
            budget: FrameBudget::new(app.config.max_events_per_second),
            ack: None,
            transport,
            _slot: slot,
            app,
        };
        debug!(connection_id = %session.id, remote = %remote, "connection opened");
        async move {
            if let Some(token) = handshake_token {
                let data = json!({ "token": token }).to_string();
                session
                    .dispatch("authenticate", data, EventSource::Host)
                    .await;
            }
            let end = match session.closing {
                Some(code) => End::Closed(code),
                None => session.read_loop(&mut inbound).await,
            };
            if matches!(end, End::Closed(_)) && session.transport == Transport::WebSocket {
                // Wait for the client's close frame, so the close handshake
                // finishes before the socket goes: a socket closed with the
                // client's reply unread is reset, and a reset can discard the
                // close frame before the client reads it.
                let handshake = async {
                    while let Some(item) = inbound.next().await {
                        if let Inbound::Message(Message::Close(_)) = item {
                            break;
                        }
                    }
                };
                let _ = tokio::time::timeout(CLOSE_HANDSHAKE_TIMEOUT, handshake).await;
            }
            drop(inbound);
            session.finish(end).await;
            session.app.metrics.connections.dec();
            drop(session);
            let abort = writer.abort_handle();
            if tokio::time::timeout(WRITER_FLUSH_TIMEOUT, writer)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }

    async fn read_loop(&mut self, inbound: &mut BoxStream<'static, Inbound>) -> End {
        let control = self.control.clone();
        let opened = Instant::now();
        // Pings share the one deadline sleep below, because a separate
        // tokio interval would add a timer to every idle connection.
        let ping_interval = self.app.config.ping_interval();
        let mut next_ping = opened + ping_interval;
        let mut shutdown = self.app.shutdown.clone();

        loop {
            let timer_due = self.timers.values().map(|timer| timer.due).min();
            let auth_due = match self.user_id {
                None => Some(opened + self.app.config.auth_timeout()),
                Some(_) => None,
            };
            let expiry_due = match self.user_id {
                Some(_) => Some(instant_at_ms(self.expires_at_ms)),
                None => None,
            };
            let idle_due = match self.transport {
                Transport::WebSocket => {
                    Some(self.last_activity + self.app.config.inactivity_timeout())
                }
                Transport::SocketIo => None,
            };
            // One sleep for all deadlines keeps an idle session's task small.
            let next_due = [timer_due, auth_due, expiry_due, idle_due]
                .into_iter()
                .flatten()
                .fold(next_ping, Instant::min);

            tokio::select! {
                item = inbound.next() => {
                    let Some(item) = item else { return End::ClientGone };
                    match item {
                        Inbound::Message(message) => self.on_message(message).await,
                        Inbound::ReadError(error) => return self.on_read_error(error),
                        Inbound::Event { name, data, ack } => {
                            self.last_activity = Instant::now();
                            self.ack = ack;
                            self.on_client_event(name, data).await;
                            self.answer_ack("null");
                        }
                        Inbound::Closed => return End::ClientGone,
                    }
                }
                instruction = control.recv() => match instruction {
                    Control::Replaced => {
                        self.replaced = true;
                        self.close(close::REPLACED, "replaced by a newer connection");
                    }
                    Control::SendQueueFull => self.drop_slow_consumer(),
                },
                _ = sleep_until(TokioInstant::from_std(next_due)) => {
                    let now = Instant::now();
                    let passed = |due: Option<Instant>| due.is_some_and(|due| due <= now);
                    if passed(auth_due) {
                        self.close(close::POLICY, "authentication timed out");
                    } else if passed(expiry_due) {
                        self.close(close::TOKEN_EXPIRED, "token expired");
                    } else if passed(idle_due) {
                        self.close(close::INACTIVE, "no activity");
                    } else if passed(timer_due) {
                        self.fire_due_timers().await;
                    }
                    if next_ping <= now {
                        let _ = self.outgoing.try_send(Outgoing::Ping);
                        next_ping = now + ping_interval;
                    }
                }
                _ = shutdown.changed() => {
                    self.restarting = true;
                    self.close(close::RESTARTING, "server restarting");
                }
            }
            if let Some(code) = self.closing {
                return End::Closed(code);
            }
        }
    }

    fn on_read_error(&mut self, error: axum::Error) -> End {
        let text = error.to_string();
        let source = error.into_inner();
        let (code, reason) = match source.downcast_ref::<tungstenite::Error>() {
            Some(tungstenite::Error::Capacity(_)) => (close::TOO_LARGE, "frame too large"),
            Some(tungstenite::Error::Utf8(_)) => (close::INVALID_UTF8, "invalid UTF-8"),
            Some(tungstenite::Error::Protocol(_)) => (close::PROTOCOL, "protocol error"),
            _ => {
                debug!(connection_id = %self.id, cause = %text, "socket read failed");
                return End::ClientGone;
            }
        };
        debug!(connection_id = %self.id, cause = %text, code, "closing after a bad frame");
        self.app
            .metrics
            .connection_errors
            .get_or_create(&Metrics::label("reason", reason))
            .inc();
        self.close(code, reason);
        End::Closed(code)
    }

    async fn on_message(&mut self, message: Message) {
        self.last_activity = Instant::now();
        let text = match message {
            Message::Text(text) => Some(text),
            Message::Binary(_) => None,
            Message::Ping(_) | Message::Pong(_) => return,
            Message::Close(_) => {
                self.closing = Some(close::NORMAL);
                return;
            }
        };
        // Every data frame counts, so that invalid ones cannot pass the budget.
        if !self.budget.take() {
            self.reply_error("RATE_LIMITED", "too many frames; slow down", None);
            return;
        }
        let Some(text) = text else {
            self.reply_error(
                "INVALID_FRAME",
                "binary frames are not supported; send JSON text",
                None,
            );
            return;
        };
        let frame: ClientFrame = match serde_json::from_str(text.as_str()) {
            Ok(frame) => frame,
            Err(error) => {
                let message =
                    format!("frame is not a JSON object with a string \"event\": {error}");
                self.reply_error("INVALID_JSON", &message, None);
                return;
            }
        };
        let event = frame.event;
        let data = frame.data.map_or("null", RawValue::get).to_string();
        self.handle_client_event(event, data).await;
    }

    /// Handles a Socket.IO event: the frame budget, then the same checks and
    /// dispatch as a native frame.
    async fn on_client_event(&mut self, event: String, data: String) {
        if !self.budget.take() {
            self.reply_error("RATE_LIMITED", "too many events; slow down", Some(&event));
            return;
        }
        self.handle_client_event(event, data).await;
    }

    async fn handle_client_event(&mut self, event: String, data: String) {
        if event.starts_with('$') || !self.app.manifest().events.contains_key(&event) {
            let message = format!("unknown event {event:?}");
            self.reply_error("UNKNOWN_EVENT", &message, Some(&event));
            return;
        }
        if self.user_id.is_none() && !PUBLIC_EVENTS.contains(&event.as_str()) {
            self.reply_error(
                "UNAUTHENTICATED",
                "authenticate before sending this event",
                Some(&event),
            );
            return;
        }
        self.dispatch(&event, data, EventSource::Client).await;
    }

    fn connection_info(&self) -> ConnectionInfo {
        ConnectionInfo {
            id: self.id.clone(),
            instance_id: self.app.instance_id.clone(),
            user_id: self.user_id.clone(),
            expires_at_ms: self.expires_at_ms,
            remote_addr: self.remote.to_string(),
            now_ms: now_ms(),
        }
    }

    /// Runs an event through its components, then the host events its
    /// effects queued. Returns a boxed future, because the component calls'
    /// state would otherwise make every session's task 1.7 KiB larger.
    fn dispatch<'a>(
        &'a mut self,
        event: &str,
        data: String,
        source: EventSource,
    ) -> futures::future::BoxFuture<'a, ()> {
        self.pending.push_back((event.to_string(), data, source));
        Box::pin(async move {
            while let Some((event, data, source)) = self.pending.pop_front() {
                self.dispatch_one(&event, data, source).await;
                if event == CONNECTED_EVENT {
                    self.release_staged();
                }
            }
            // Most sessions dispatch rarely, so the empty queue frees its buffer.
            self.pending = VecDeque::new();
        })
    }

    async fn dispatch_one(&mut self, event_name: &str, data: String, source: EventSource) {
        let Some(targets) = self.app.manifest().events.get(event_name).cloned() else {
            if source != EventSource::Client {
                debug!(event = event_name, "no component handles this host event");
            }
            return;
        };
        let event = Event {
            name: event_name.to_string(),
            data,
            source,
        };
        for component in &targets {
            let connection = self.connection_info();
            let started = Instant::now();
            let outcome = self
                .app
                .runtime
                .invoke(component, &connection, &event)
                .await;
            let elapsed = started.elapsed();
            let elapsed_us = elapsed.as_micros() as u64;
            let metrics = &self.app.metrics;
            metrics
                .invocation_seconds
                .get_or_create(&Metrics::label("component", component.as_str()))
                .observe(elapsed.as_secs_f64());
            let outcome_label = match &outcome {
                Ok(_) => "ok",
                Err(InvokeError::Rejected(_)) => "rejected",
                Err(InvokeError::Trapped(_)) => "trapped",
                Err(InvokeError::DeadlineExceeded) => "timed_out",
                Err(InvokeError::Unavailable(_)) => "unavailable",
            };
            metrics.event(event_name, outcome_label);
            if matches!(outcome_label, "trapped" | "timed_out") {
                let labels = vec![
                    ("component", component.clone()),
                    ("kind", outcome_label.to_string()),
                ];
                metrics.guest_failures.get_or_create(&labels).inc();
            }
            match outcome {
                Ok(effects) => {
                    debug!(
                        event = event_name,
                        component,
                        elapsed_us,
                        effects = effects.len(),
                        "event handled"
                    );
                    self.apply(event_name, effects).await;
                }
                Err(error) => self.on_invoke_error(event_name, component, source, error),
            }
        }
    }

    fn on_invoke_error(
        &mut self,
        event: &str,
        component: &str,
        source: EventSource,
        error: InvokeError,
    ) {
        let (code, message) = match &error {
            InvokeError::Rejected(rejection) => {
                // A host event has no client to reply to, so only the log shows
                // that its handler failed.
                if source != EventSource::Client {
                    warn!(event, component, connection_id = %self.id, code = %rejection.code, reason = %rejection.message, "handler rejected a host event");
                }
                (rejection.code.clone(), rejection.message.clone())
            }
            InvokeError::Trapped(cause) => {
                warn!(event, component, connection_id = %self.id, cause = %cause, "handler trapped");
                (
                    "HANDLER_FAILED".to_string(),
                    "the event handler failed; the event was not carried out".to_string(),
                )
            }
            InvokeError::DeadlineExceeded => {
                warn!(event, component, connection_id = %self.id, "handler ran past its deadline");
                (
                    "HANDLER_TIMEOUT".to_string(),
                    "the event handler timed out; the event was not carried out".to_string(),
                )
            }
            InvokeError::Unavailable(cause) => {
                warn!(event, component, connection_id = %self.id, cause = %cause, "handler unavailable");
                (
                    "INTERNAL_ERROR".to_string(),
                    "the event could not be handled; retry".to_string(),
                )
            }
        };
        // Host-raised events have no client request to reply to.
        if source == EventSource::Client || event == "authenticate" {
            self.reply_error(&code, &message, Some(event));
        }
    }

    /// Carries out a handler's effects in order.
    async fn apply(&mut self, event: &str, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                Effect::Reply(outbound) => {
                    if outbound.event == "RATE_LIMIT_EXCEEDED" {
                        self.count_rate_limited(event);
                    }
                    if let Some(data) = checked_data(&outbound.event, &outbound.data) {
                        self.reply_event(&outbound.event, data);
                    }
                }
                Effect::Deliver(delivery) => {
                    if delivery.event == "NEW_MESSAGE" && event == "NEW_MESSAGE" {
                        self.app.metrics.messages.inc();
                    }
                    let Some(data) = checked_data(&delivery.event, &delivery.data) else {
                        continue;
                    };
                    let text = frame(&delivery.event, data);
                    if let Err(error) = self.app.backplane.deliver(&delivery.user_id, text).await {
                        warn!(event, user_id = %delivery.user_id, cause = %format!("{error:#}"), "delivery failed");
                    }
                }
                Effect::Broadcast(outbound) => {
                    let Some(data) = checked_data(&outbound.event, &outbound.data) else {
                        continue;
                    };
                    if let Err(error) = self
                        .app
                        .backplane
                        .broadcast(frame(&outbound.event, data))
                        .await
                    {
                        warn!(event, cause = %format!("{error:#}"), "broadcast failed");
                    }
                }
                Effect::Bind(binding) => {
                    let bound = self
                        .bind(
                            event,
                            binding.user_id,
                            binding.expires_at_ms,
                            binding.last_message_id,
                        )
                        .await;
                    if !bound {
                        // The remaining effects (the success reply) would be false.
                        return;
                    }
                }
                Effect::Close(frame) => self.close(frame.code, &frame.reason),
                Effect::StartTimer(timer) => {
                    let due = Instant::now() + Duration::from_millis(timer.delay_ms);
                    let pending = PendingTimer {
                        due,
                        event: timer.event.event,
                        data: timer.event.data,
                        fire_on_close: timer.fire_on_close,
                    };
                    self.timers.insert(timer.key, pending);
                }
                Effect::CancelTimer(cancel) => {
                    if let Some(timer) = self.timers.remove(&cancel.key) {
                        if cancel.fire {
                            self.pending
                                .push_back((timer.event, timer.data, EventSource::Timer));
                        }
                    }
                }
            }
        }
    }

    /// Binds the connection to a user. Returns false when binding failed,
    /// after sending the client an `ERROR`.
    async fn bind(
        &mut self,
        event: &str,
        user_id: String,
        expires_at_ms: u64,
        last_message_id: Option<String>,
    ) -> bool {
        match &self.user_id {
            Some(current) if *current == user_id => {
                self.expires_at_ms = expires_at_ms;
                debug!(connection_id = %self.id, user_id, "token renewed");
                return true;
            }
            Some(current) => {
                warn!(connection_id = %self.id, current = %current, requested = %user_id, "component tried to switch the user of a connection");
                self.reply_error(
                    "UNAUTHORIZED",
                    "a connection cannot switch users",
                    Some(event),
                );
                return false;
            }
            None => {}
        }
        let bound = match self.app.backplane.bind(&user_id, &self.id).await {
            Ok(bound) => bound,
            Err(error) => {
                warn!(connection_id = %self.id, user_id, cause = %format!("{error:#}"), "bind failed");
                self.reply_error(
                    "UNAVAILABLE",
                    "presence store unavailable; retry",
                    Some(event),
                );
                return false;
            }
        };
        let (staged, staged_rx) = queue::channel(self.app.config.send_queue_frames);
        let handle = SessionHandle {
            connection_id: self.id.clone(),
            epoch: bound.epoch,
            outgoing: staged,
            control: self.control.clone(),
        };
        match self.app.registry.insert(&user_id, handle) {
            Insert::Current(Some(previous)) => {
                previous.control.send(Control::Replaced);
            }
            Insert::Current(None) => {}
            Insert::Superseded => {
                info!(connection_id = %self.id, user_id, "a newer connection of the user won the race");
                self.user_id = Some(user_id);
                self.epoch = bound.epoch;
                self.replaced = true;
                self.close(close::REPLACED, "replaced by a newer connection");
                return false;
            }
        }
        self.staging = Some(Staging {
            frames: staged_rx,
            replayed: HashSet::new(),
        });
        info!(connection_id = %self.id, user_id, epoch = bound.epoch, "connection authenticated");
        self.user_id = Some(user_id.clone());
        self.expires_at_ms = expires_at_ms;
        self.epoch = bound.epoch;
        let data = match last_message_id {
            Some(last) => json!({ "userId": user_id, "lastMessageId": last }),
            None => json!({ "userId": user_id }),
        };
        let data = data.to_string();
        self.pending
            .push_back((CONNECTED_EVENT.to_string(), data, EventSource::Host));
        true
    }

    async fn fire_due_timers(&mut self) {
        let now = Instant::now();
        let due: Vec<String> = self
            .timers
            .iter()
            .filter(|(_, timer)| timer.due <= now)
            .map(|(key, _)| key.clone())
            .collect();
        for key in due {
            if let Some(timer) = self.timers.remove(&key) {
                self.dispatch(&timer.event, timer.data, EventSource::Timer)
                    .await;
            }
        }
    }

    fn count_rate_limited(&self, event: &str) {
        self.app
            .metrics
            .rate_limited
            .get_or_create(&Metrics::label("event", event))
            .inc();
    }

    /// Sends `ERROR {code, message, event}` on this connection.
    fn reply_error(&mut self, code: &str, message: &str, event: Option<&str>) {
        if code == "RATE_LIMITED" {
            self.count_rate_limited("frames");
        }
        let data = error_data(code, message, event);
        self.reply_event("ERROR", &data);
    }

    /// Sends an event on this connection. The first one after a Socket.IO
    /// event with a callback also acknowledges that event with its data.
    fn reply_event(&mut self, event: &str, data: &str) {
        self.answer_ack(data);
        self.reply(frame(event, data));
    }

    /// Sends the pending Socket.IO acknowledgement, if any, with `data`
    /// (JSON text).
    fn answer_ack(&mut self, data: &str) {
        let Some(ack) = self.ack.take() else { return };
        match RawValue::from_string(data.to_string()) {
            Ok(raw) => {
                if let Err(error) = ack.send(&raw) {
                    debug!(connection_id = %self.id, cause = %error, "acknowledgement not sent");
                }
            }
            Err(error) => {
                warn!(connection_id = %self.id, cause = %error, "acknowledgement data is not JSON")
            }
        }
    }

    fn reply(&mut self, text: Utf8Bytes) {
        if let Some(staging) = &mut self.staging {
            staging.replayed.insert(frame_hash(text.as_str()));
        }
        self.send_now(text);
    }

    fn send_now(&mut self, text: Utf8Bytes) {
        match self.outgoing.try_send(Outgoing::Text(text)) {
            Ok(()) => {}
            Err(TrySendError::Full) => self.drop_slow_consumer(),
            Err(TrySendError::Closed) => {}
        }
    }

    /// Points live deliveries at the writer again and sends what arrived
    /// while `$connected` handlers ran, minus frames they already replayed.
    fn release_staged(&mut self) {
        let Some(mut staging) = self.staging.take() else {
            return;
        };
        if let Some(user_id) = &self.user_id {
            self.app
                .registry
                .redirect(user_id, &self.id, self.outgoing.clone());
        }
        // Frames sent before the redirect are all in the channel now.
        while let Some(frame) = staging.frames.try_recv() {
            if let Outgoing::Text(text) = frame {
                if !staging.replayed.contains(&frame_hash(text.as_str())) {
                    self.send_now(text);
                }
            }
        }
    }

    /// Closes a client whose send queue is full: the writer stops at once
    /// and tries to send the close frame.
    fn drop_slow_consumer(&mut self) {
        if self.closing.is_some() {
            return;
        }
        warn!(connection_id = %self.id, user_id = ?self.user_id, "send queue full; closing the connection");
        self.closing = Some(close::SEND_QUEUE_FULL);
        let reason = "send queue full; the client reads too slowly".to_string();
        let _ = self
            .abort_writer
            .send(Some((close::SEND_QUEUE_FULL, reason)));
    }

    /// Queues a close frame after what is already queued.
    fn close(&mut self, code: u16, reason: &str) {
        if self.closing.is_some() {
            return;
        }
        self.closing = Some(code);
        let _ = self.outgoing.try_send(Outgoing::Close {
            code,
            reason: reason.to_string(),
        });
    }

    /// Runs close-time timers and clears presence unless a newer connection
    /// replaced this one.
    async fn finish(&mut self, end: End) {
        let code = match end {
            End::ClientGone => None,
            End::Closed(code) => Some(code),
        };
        debug!(connection_id = %self.id, code, "connection closing");
        if let Some(code) = code {
            self.app
                .metrics
                .closes
                .get_or_create(&Metrics::label("code", code.to_string()))
                .inc();
        }
        let Some(user_id) = self.user_id.clone() else {
            return;
        };

        self.release_staged();
        let removed = self.app.registry.remove(&user_id, &self.id);
        let on_close: Vec<PendingTimer> = self
            .timers
            .drain()
            .map(|(_, timer)| timer)
            .filter(|timer| timer.fire_on_close)
            .collect();
        for timer in on_close {
            self.dispatch(&timer.event, timer.data, EventSource::Timer)
                .await;
        }
        if self.replaced || !removed {
            self.app.backplane.forget_user(&user_id).await;
            return;
        }
        if self.restarting {
            // The instance's heartbeat goes away at exit; another instance
            // announces the user offline unless the user reconnects first.
            return;
        }
        match self
            .app
            .backplane
            .unbind(&user_id, &self.id, self.epoch)
            .await
        {
            Ok(true) => {
                let data = json!({ "userId": user_id }).to_string();
                self.dispatch(DISCONNECTED_EVENT, data, EventSource::Host)
                    .await;
            }
            Ok(false) => {}
            Err(error) => {
                warn!(connection_id = %self.id, user_id, cause = %format!("{error:#}"), "failed to clear presence; it expires with its TTL");
            }
        }
        self.app.backplane.unsubscribe_user(&user_id).await;
        info!(connection_id = %self.id, user_id, "connection closed");
    }
}

async fn write_frames(
    mut sink: SplitSink<WebSocket, Message>,
    mut frames: FrameReceiver,
    mut abort: watch::Receiver<Option<(u16, String)>>,
) {
    loop {
        let frame = tokio::select! {
            frame = frames.recv() => frame,
            _ = aborted(&mut abort) => break,
        };
        let Some(frame) = frame else { break };
        let message = match frame {
            Outgoing::Text(text) => Message::Text(text),
            Outgoing::Ping => Message::Ping(Default::default()),
            Outgoing::Close { code, reason } => {
                let close = CloseFrame {
                    code,
                    reason: Utf8Bytes::from(reason),
                };
                let _ = sink.send(Message::Close(Some(close))).await;
                let _ = sink.close().await;
                return;
            }
        };
        let sent = tokio::select! {
            sent = sink.send(message) => sent.is_ok(),
            _ = aborted(&mut abort) => break,
        };
        if !sent {
            return;
        }
    }
    let pending_close = abort.borrow().clone();
    if let Some((code, reason)) = pending_close {
        let close = Message::Close(Some(CloseFrame {
            code,
            reason: Utf8Bytes::from(reason),
        }));
        let _ = tokio::time::timeout(Duration::from_secs(1), sink.send(close)).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
}

/// Resolves once the session signals the writer to abort. A dropped sender
/// is no abort signal, so the writer then drains what is queued.
pub(super) async fn aborted(abort: &mut AbortSignal) {
    if abort.wait_for(Option::is_some).await.is_err() {
        std::future::pending::<()>().await;
    }
}

fn instant_at_ms(at_ms: u64) -> Instant {
    let now = now_ms();
    Instant::now() + Duration::from_millis(at_ms.saturating_sub(now))
}
