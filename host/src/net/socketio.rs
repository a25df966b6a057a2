//! Socket.IO v4 (Engine.IO v4) clients at `/socket.io/`, through
//! `socketioxide`. Each Socket.IO socket runs the same session as a native
//! WebSocket: its events feed the session in arrival order, and the
//! session's frames are emitted back as Socket.IO events.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;
use socketioxide::extract::{AckSender, Event, SocketRef, TryData};
use socketioxide::layer::SocketIoLayer;
use socketioxide::SocketIo;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, warn};

use super::close;
use super::session::{aborted, AbortSignal, Inbound, Session, Transport};
use crate::app::{App, HandshakeSlot};
use crate::delivery::queue::FrameReceiver;
use crate::delivery::registry::Outgoing;

/// Events a Socket.IO socket may have waiting for its session.
const INBOUND_QUEUE: usize = 256;

/// Builds the Socket.IO layer. The connect handler needs the app, which
/// needs the router, so the handler is set with [`attach`] afterwards.
pub fn layer(
    max_payload_bytes: usize,
    ping_interval: Duration,
    send_queue_frames: usize,
) -> (SocketIoLayer, SocketIo) {
    // `max_payload` bounds long-polling bodies only, so the WebSocket
    // transport gets the same bound for its messages and frames.
    //
    // The packet buffer contains what was emitted and the transport has not
    // sent yet. An event can take two packets (its reply and the
    // acknowledgement), and long-polling drains it one request at a time,
    // so it gets room for twice the session's queue.
    SocketIo::builder()
        .max_payload(max_payload_bytes as u64)
        .ws_max_message_size(max_payload_bytes)
        .ws_max_frame_size(max_payload_bytes)
        .ping_interval(ping_interval)
        .max_buffer_size(send_queue_frames * 2)
        .build_layer()
}

/// Registers the connect handler of the default namespace.
pub fn attach(io: &SocketIo, app: Arc<App>) {
    // socketioxide calls a handler synchronously and spawns the future it
    // returns, so work done before the `async` block keeps packet order.
    io.ns(
        "/",
        move |socket: SocketRef, TryData(auth): TryData<Value>| {
            on_connect(app.clone(), socket, auth.ok());
            async {}
        },
    );
}

/// The client's `auth` option, as `socket.io-client` sends it.
#[derive(Deserialize)]
struct Auth {
    token: Option<String>,
}

fn handshake_token(socket: &SocketRef, auth: Option<Value>) -> Option<String> {
    if let Some(token) = auth
        .and_then(|auth| serde_json::from_value::<Auth>(auth).ok())
        .and_then(|auth| auth.token)
    {
        return Some(token);
    }
    let parts = socket.req_parts();
    if let Some(token) = parts
        .headers
        .get(http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
    {
        return Some(token.trim().to_string());
    }
    parts.uri.query().and_then(|query| {
        query.split('&').find_map(|pair| {
            let (name, value) = pair.split_once('=')?;
            (name == "token").then(|| value.to_string())
        })
    })
}

fn on_connect(app: Arc<App>, socket: SocketRef, auth: Option<Value>) {
    let remote = super::server::remote_address(&socket.req_parts().extensions);
    // The handshake request took the session's place under the per-address
    // cap. A socket that finds no place there (a second namespace) takes a
    // new one.
    let handshake_slot = socket
        .req_parts()
        .extensions
        .get::<HandshakeSlot>()
        .and_then(|handshake| handshake.0.lock().expect("lock poisoned").take());
    let client_ip = super::server::client_address(&app, &socket.req_parts().headers, remote);
    let Some(slot) = handshake_slot.or_else(|| app.admit(client_ip)) else {
        debug!(%remote, "socket.io connection over the per-address cap");
        let _ = socket.emit(
            "ERROR",
            &serde_json::json!({
                "code": "TOO_MANY_CONNECTIONS",
                "message": "too many connections from this address",
                "event": null,
            }),
        );
        let _ = socket.disconnect();
        return;
    };
    let token = handshake_token(&socket, auth);

    // Handlers run inline as packets arrive, so `try_send` keeps the
    // client's order. A full queue gets an ERROR to the client instead of
    // blocking.
    let (inbound_tx, inbound_rx) = mpsc::channel(INBOUND_QUEUE);
    let closed_tx = inbound_tx.clone();
    socket.on_fallback(
        move |socket: SocketRef,
              Event(name): Event,
              TryData(data): TryData<Option<Value>>,
              ack: AckSender| {
            // An event sent without data fails to decode and counts as
            // `null`, as on /ws. A binary attachment decodes as a
            // placeholder object, so field checks name the field it is in.
            let data = match data {
                Ok(Some(value)) => value.to_string(),
                Ok(None) | Err(_) => "null".to_string(),
            };
            let event = Inbound::Event {
                name,
                data,
                ack: Some(ack),
            };
            if let Err(full) = inbound_tx.try_send(event) {
                reject_overflow(&socket, full.into_inner());
            }
            async {}
        },
    );
    let writer_socket = socket.clone();
    let inbound = ReceiverStream::new(inbound_rx).boxed();
    tokio::spawn(async move {
        let spawn_writer =
            move |frames, abort| tokio::spawn(write_events(writer_socket, frames, abort));
        let transport = Transport::SocketIo;
        Session::run(app, transport, inbound, spawn_writer, remote, token, slot).await;
    });
    // The writer keeps the socket, and with it the fallback handler's
    // sender, alive, so the disconnect has to end the session explicitly.
    socket.on_disconnect(move |socket: SocketRef| async move {
        debug!(sid = %socket.id, "socket.io client disconnected");
        let _ = closed_tx.send(Inbound::Closed).await;
    });
}

/// Rejects an event that found the session's queue full: the client gets
/// `ERROR RATE_LIMITED`, and its acknowledgement callback gets the same
/// data, so no callback is left waiting.
fn reject_overflow(socket: &SocketRef, event: Inbound) {
    let (name, ack) = match event {
        Inbound::Event { name, ack, .. } => (name, ack),
        _ => return,
    };
    let error = serde_json::json!({
        "code": "RATE_LIMITED",
        "message": "too many events waiting; slow down",
        "event": name,
    });
    if let Some(ack) = ack {
        if let Err(cause) = ack.send(&error) {
            debug!(sid = %socket.id, cause = %cause, "rate-limit acknowledgement not sent");
        }
    }
    if let Err(cause) = socket.emit("ERROR", &error) {
        debug!(sid = %socket.id, cause = %cause, "rate-limit error not sent");
    }
}

/// A queued native frame, split back into the Socket.IO event and data.
#[derive(Deserialize)]
struct QueuedFrame<'a> {
    event: &'a str,
    #[serde(borrow)]
    data: &'a RawValue,
}

/// Emits queued frames as Socket.IO events until the session closes.
async fn write_events(socket: SocketRef, mut frames: FrameReceiver, mut abort: AbortSignal) {
    loop {
        let frame = tokio::select! {
            frame = frames.recv() => frame,
            _ = aborted(&mut abort) => {
                let _ = socket.clone().disconnect();
                return;
            }
        };
        let Some(frame) = frame else { break };
        match frame {
            Outgoing::Text(text) => {
                let Ok(queued) = serde_json::from_str::<QueuedFrame>(text.as_str()) else {
                    warn!("dropped a queued frame that is not an event");
                    continue;
                };
                if let Err(error) = socket.emit(queued.event, queued.data) {
                    debug!(sid = %socket.id, cause = %error, "socket.io emit failed; closing");
                    let _ = socket.clone().disconnect();
                    return;
                }
            }
            // Engine.IO runs its own heartbeat.
            Outgoing::Ping => {}
            Outgoing::Close { code, reason } => {
                debug!(sid = %socket.id, code, reason, "closing socket.io client");
                // A restart ends the process and with it the transport,
                // which makes clients reconnect; a Socket.IO disconnect
                // packet would tell them not to.
                if code != close::RESTARTING {
                    let _ = socket.clone().disconnect();
                }
                return;
            }
        }
    }
    let _ = socket.clone().disconnect();
}
