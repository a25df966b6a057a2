//! One client connection: a TCP socket bound to a loopback source address,
//! the WebSocket upgrade, the protocol's authentication handshake, and
//! reading and writing events afterwards.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{timeout_at, Instant};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{header, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{client_async_with_config, WebSocketStream};

use crate::cli::{AuthMode, Protocol};
use crate::target::Target;
use crate::token::TokenMinter;
use crate::wire::{self, ServerFrame};

/// Settings shared by every connection of a run.
pub struct ClientSettings {
    pub protocol: Protocol,
    pub auth: AuthMode,
    pub minter: TokenMinter,
    pub handshake_timeout: Duration,
}

/// Time from the start of a connection attempt to the end of each stage.
#[derive(Debug, Clone, Copy)]
pub struct HandshakeTiming {
    /// TCP connection established.
    pub tcp: Duration,
    /// WebSocket upgrade response received.
    pub upgrade: Duration,
    /// CONNECTION_SUCCESS received.
    pub total: Duration,
}

/// A failed connection attempt: the stage that failed and why.
#[derive(Debug)]
pub struct ConnectError {
    pub stage: &'static str,
    pub detail: String,
}

impl ConnectError {
    fn new(stage: &'static str, detail: impl ToString) -> Self {
        Self {
            stage,
            detail: detail.to_string(),
        }
    }

    /// Returns a short label for tallies: the stage and the cause.
    pub fn label(&self) -> String {
        format!("{}: {}", self.stage, self.detail)
    }
}

/// What one read from the server produced.
#[derive(Debug)]
pub enum Incoming {
    /// A decoded frame (an Engine.IO ping already has its pong).
    Frame(ServerFrame),
    /// The connection ended. The text describes the close, for tallies.
    Closed(String),
}

/// An open, authenticated connection.
pub struct Connection {
    ws: WebSocketStream<TcpStream>,
    protocol: Protocol,
}

const MAX_SERVER_MESSAGE: usize = 1 << 20;

fn websocket_config() -> WebSocketConfig {
    // Small buffers: a run holds up to ~19,000 connections per process, and
    // the default 128 KiB read buffer each would cost gigabytes.
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_message_size(Some(MAX_SERVER_MESSAGE))
        .max_frame_size(Some(MAX_SERVER_MESSAGE))
}

/// Runs `step` unless the handshake deadline passes first.
async fn within<T, E: ToString>(
    deadline: Instant,
    stage: &'static str,
    step: impl Future<Output = Result<T, E>>,
) -> Result<T, ConnectError> {
    match timeout_at(deadline, step).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(ConnectError::new(stage, error)),
        Err(_) => Err(ConnectError::new(stage, "timed out")),
    }
}

/// Opens a connection to `target` from `source` and authenticates it as
/// `user_id`, all within the handshake timeout.
pub async fn connect(
    settings: &ClientSettings,
    target: &Target,
    source: Option<IpAddr>,
    user_id: &str,
) -> Result<(Connection, HandshakeTiming), ConnectError> {
    let started = Instant::now();
    let deadline = started + settings.handshake_timeout;

    let socket = match target.addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|error| ConnectError::new("socket", error))?;
    if let Some(source) = source {
        socket
            .bind(SocketAddr::new(source, 0))
            .map_err(|error| ConnectError::new("bind", error))?;
    }
    let stream = within(deadline, "tcp connect", socket.connect(target.addr)).await?;
    // Chat frames are small and latency matters more than packet count.
    let _ = stream.set_nodelay(true);
    let tcp = started.elapsed();

    let token = settings
        .minter
        .mint(user_id)
        .map_err(|error| ConnectError::new("token", format!("{error:#}")))?;
    let mut request = target
        .endpoint
        .as_str()
        .into_client_request()
        .map_err(|error| ConnectError::new("request", error))?;
    let header_auth = settings.protocol == Protocol::Native && settings.auth == AuthMode::Header;
    if header_auth {
        let value = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|error| ConnectError::new("request", error))?;
        request.headers_mut().insert(header::AUTHORIZATION, value);
    }
    let upgrade = client_async_with_config(request, stream, Some(websocket_config()));
    let (ws, _response) = within(deadline, "websocket upgrade", upgrade).await?;
    let upgrade = started.elapsed();

    let mut connection = Connection {
        ws,
        protocol: settings.protocol,
    };
    let authentication = connection.authenticate(user_id, &token, header_auth);
    within(deadline, "authentication", authentication).await?;
    let timing = HandshakeTiming {
        tcp,
        upgrade,
        total: started.elapsed(),
    };
    Ok((connection, timing))
}

impl Connection {
    /// Runs the protocol's handshake after the upgrade and waits for
    /// CONNECTION_SUCCESS.
    async fn authenticate(
        &mut self,
        user_id: &str,
        token: &str,
        header_auth: bool,
    ) -> Result<(), String> {
        if self.protocol == Protocol::Socketio {
            self.wait_for(|frame| matches!(frame, ServerFrame::EngineOpen(_)))
                .await?;
            self.send_text(wire::SOCKET_CONNECT.to_string())
                .await
                .map_err(|error| format!("sending the Socket.IO connect failed: {error}"))?;
            self.wait_for(|frame| matches!(frame, ServerFrame::SocketConnect))
                .await?;
        }
        if !header_auth {
            let data = json!({ "userId": user_id, "token": token });
            self.send_event("authenticate", &data)
                .await
                .map_err(|error| format!("sending authenticate failed: {error}"))?;
        }
        self.wait_for(|frame| {
            matches!(frame, ServerFrame::Event { name, .. } if name == "CONNECTION_SUCCESS")
        })
        .await
    }

    /// Reads frames until one matches; an ERROR event, a connect error or
    /// the end of the connection fails the wait.
    async fn wait_for(&mut self, matches: impl Fn(&ServerFrame) -> bool) -> Result<(), String> {
        loop {
            match self.recv().await {
                Incoming::Frame(frame) if matches(&frame) => return Ok(()),
                Incoming::Frame(ServerFrame::Event { name, data }) if name == "ERROR" => {
                    let code = data.get("code").and_then(Value::as_str).unwrap_or("?");
                    return Err(format!("ERROR {code}"));
                }
                Incoming::Frame(ServerFrame::SocketConnectError(data)) => {
                    return Err(format!("Socket.IO connect error {data}"));
                }
                Incoming::Frame(_) => {}
                Incoming::Closed(reason) => return Err(reason),
            }
        }
    }

    /// Sends one event in the protocol's frame format.
    pub async fn send_event(&mut self, name: &str, data: &Value) -> Result<(), WsError> {
        self.send_text(wire::encode_event(self.protocol, name, data))
            .await
    }

    async fn send_text(&mut self, text: String) -> Result<(), WsError> {
        self.ws.send(Message::text(text)).await
    }

    /// Waits for the next WebSocket message. Cancel-safe, so it can sit in
    /// a `select!` next to timers; pass its output to [`Connection::handle`].
    pub async fn next_message(&mut self) -> Option<Result<Message, WsError>> {
        self.ws.next().await
    }

    /// Decodes one message from [`Connection::next_message`] and sends the
    /// pong for an Engine.IO ping. An Engine.IO close or Socket.IO
    /// disconnect counts as the end of the connection. (tungstenite sends
    /// the pongs for WebSocket pings on the next read or write.)
    pub async fn handle(&mut self, message: Option<Result<Message, WsError>>) -> Incoming {
        let message = match message {
            None => return Incoming::Closed("closed without a close frame".to_string()),
            Some(Err(error)) => return Incoming::Closed(format!("read failed: {error}")),
            Some(Ok(message)) => message,
        };
        match message {
            Message::Text(text) => {
                let frame = wire::decode_frame(self.protocol, text.as_str());
                match frame {
                    ServerFrame::EnginePing => {
                        if let Err(error) = self.send_text(wire::ENGINE_PONG.to_string()).await {
                            return Incoming::Closed(format!("sending a pong failed: {error}"));
                        }
                        Incoming::Frame(ServerFrame::EnginePing)
                    }
                    ServerFrame::Disconnect => Incoming::Closed("Socket.IO disconnect".to_string()),
                    frame => Incoming::Frame(frame),
                }
            }
            Message::Close(Some(close)) => {
                Incoming::Closed(format!("close {} {}", u16::from(close.code), close.reason))
            }
            Message::Close(None) => Incoming::Closed("close without a code".to_string()),
            Message::Binary(_) => Incoming::Frame(ServerFrame::Malformed("binary frame".into())),
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {
                Incoming::Frame(ServerFrame::Ignored)
            }
        }
    }

    /// Reads and decodes the next message.
    pub async fn recv(&mut self) -> Incoming {
        let message = self.next_message().await;
        self.handle(message).await
    }

    /// Sends a close frame and waits briefly for the server's reply.
    pub async fn close(mut self) {
        let deadline = Instant::now() + Duration::from_secs(2);
        let _ = timeout_at(deadline, self.ws.close(None)).await;
        let _ = timeout_at(deadline, async {
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
    }
}
