//! A minimal WebSocket client written against RFC 6455 directly, for tests
//! that need a peer which never sends pongs or never reads. tungstenite sends a pong for
//! every ping it reads. Once the server has closed the socket, writing that
//! pong fails with a broken pipe before tungstenite returns the buffered
//! close frame, so [`crate::Client`] cannot show how an idle connection ends.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

/// Fixed masking key; masking only has to be present, not secret, here.
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// What the server sent until the connection ended.
#[derive(Debug, Default)]
pub struct Transcript {
    /// Payloads of the text frames, in order.
    pub texts: Vec<String>,
    /// Number of pings received; none got a pong.
    pub pings: usize,
    /// Code of the close frame, if one with a code arrived.
    pub close_code: Option<u16>,
    /// Whether a close frame arrived at all.
    pub closed: bool,
    /// Text frames that arrived after the close frame (only
    /// [`RawClient::read_for`] reads past it).
    pub texts_after_close: Vec<String>,
}

/// A connection that sends only the frames the test passes to it.
pub struct RawClient {
    stream: TcpStream,
    /// Bytes read past the handshake response or a parsed frame.
    buffer: Vec<u8>,
}

impl RawClient {
    /// Connects to `ws://127.0.0.1:PORT/ws` and completes the handshake.
    pub async fn connect(port: u16) -> RawClient {
        let connect = TcpStream::connect(("127.0.0.1", port));
        let stream = tokio::time::timeout(Duration::from_secs(10), connect)
            .await
            .expect("TCP connect timed out after 10 s")
            .unwrap_or_else(|error| panic!("TCP connect to port {port} failed: {error}"));
        RawClient::handshake(stream, port).await
    }

    /// Connects like [`RawClient::connect`], with the socket's receive
    /// buffer (`SO_RCVBUF`) set to `bytes` before connecting. Linux then
    /// stops autotuning that buffer, so a client that never reads makes the
    /// server's writes stall after a known amount of data instead of after
    /// up to `net.ipv4.tcp_rmem` bytes.
    pub async fn connect_with_receive_buffer(port: u16, bytes: u32) -> RawClient {
        let socket = TcpSocket::new_v4().expect("failed to create a TCP socket");
        socket
            .set_recv_buffer_size(bytes)
            .unwrap_or_else(|error| panic!("failed to set SO_RCVBUF to {bytes}: {error}"));
        let address = SocketAddr::from(([127, 0, 0, 1], port));
        let stream = tokio::time::timeout(Duration::from_secs(10), socket.connect(address))
            .await
            .expect("TCP connect timed out after 10 s")
            .unwrap_or_else(|error| panic!("TCP connect to port {port} failed: {error}"));
        RawClient::handshake(stream, port).await
    }

    async fn handshake(mut stream: TcpStream, port: u16) -> RawClient {
        let request = format!(
            "GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: bmV4dXMtcmF3LWNsaWVudA==\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .expect("failed to send the handshake request");

        let mut buffer = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        let header_end = loop {
            if let Some(end) = buffer.windows(4).position(|window| window == b"\r\n\r\n") {
                break end + 4;
            }
            let mut chunk = [0u8; 1024];
            let read = tokio::time::timeout_at(deadline, stream.read(&mut chunk))
                .await
                .expect("handshake response timed out after 10 s")
                .expect("failed to read the handshake response");
            assert!(read > 0, "connection closed during the handshake");
            buffer.extend_from_slice(&chunk[..read]);
        };
        let head = String::from_utf8_lossy(&buffer[..header_end]).to_string();
        assert!(
            head.starts_with("HTTP/1.1 101"),
            "handshake not accepted: {head}"
        );
        buffer.drain(..header_end);
        RawClient { stream, buffer }
    }

    /// Sends one masked text frame.
    pub async fn send_text(&mut self, text: &str) {
        let payload = text.as_bytes();
        let mut frame = vec![0x81];
        match payload.len() {
            len @ 0..=125 => frame.push(0x80 | u8::try_from(len).unwrap_or(125)),
            len @ 126..=0xffff => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_be_bytes());
            }
            len => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&u64::try_from(len).unwrap_or(u64::MAX).to_be_bytes());
            }
        }
        frame.extend_from_slice(&MASK);
        frame.extend(
            payload
                .iter()
                .enumerate()
                .map(|(index, byte)| byte ^ MASK[index % 4]),
        );
        self.stream
            .write_all(&frame)
            .await
            .expect("failed to send a frame");
    }

    /// Reads frames, sending nothing back, until the server closes the
    /// connection. Panics when `timeout` passes first.
    pub async fn read_until_closed(&mut self, timeout: Duration) -> Transcript {
        let deadline = Instant::now() + timeout;
        let mut transcript = Transcript::default();
        loop {
            while let Some((opcode, payload)) = self.parse_frame() {
                match opcode {
                    0x1 => transcript
                        .texts
                        .push(String::from_utf8_lossy(&payload).to_string()),
                    0x8 => {
                        transcript.closed = true;
                        if payload.len() >= 2 {
                            transcript.close_code =
                                Some(u16::from_be_bytes([payload[0], payload[1]]));
                        }
                        return transcript;
                    }
                    0x9 => transcript.pings += 1,
                    _ => {}
                }
            }
            let mut chunk = [0u8; 4096];
            let read = match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => panic!(
                    "connection still open after {timeout:?}; received so far: {transcript:?}"
                ),
                Ok(Err(_)) | Ok(Ok(0)) => return transcript,
                Ok(Ok(read)) => read,
            };
            self.buffer.extend_from_slice(&chunk[..read]);
        }
    }

    /// Reads frames, sending nothing back, until the server ends the TCP
    /// connection or `duration` passes. Unlike [`RawClient::read_until_closed`]
    /// it goes on reading after a close frame, and text frames that follow
    /// one go to [`Transcript::texts_after_close`].
    pub async fn read_for(&mut self, duration: Duration) -> Transcript {
        let deadline = Instant::now() + duration;
        let mut transcript = Transcript::default();
        loop {
            while let Some((opcode, payload)) = self.parse_frame() {
                match opcode {
                    0x1 => {
                        let text = String::from_utf8_lossy(&payload).to_string();
                        if transcript.closed {
                            transcript.texts_after_close.push(text);
                        } else {
                            transcript.texts.push(text);
                        }
                    }
                    0x8 if !transcript.closed => {
                        transcript.closed = true;
                        if payload.len() >= 2 {
                            transcript.close_code =
                                Some(u16::from_be_bytes([payload[0], payload[1]]));
                        }
                    }
                    0x9 => transcript.pings += 1,
                    _ => {}
                }
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) | Ok(Err(_)) | Ok(Ok(0)) => return transcript,
                Ok(Ok(read)) => self.buffer.extend_from_slice(&chunk[..read]),
            }
        }
    }

    /// Removes one complete frame from the buffer and returns its opcode
    /// and payload, or `None` when the buffer contains no complete frame.
    fn parse_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        let buffer = &self.buffer;
        if buffer.len() < 2 {
            return None;
        }
        let opcode = buffer[0] & 0x0f;
        let masked = buffer[1] & 0x80 != 0;
        let (length, mut offset) = match buffer[1] & 0x7f {
            126 => {
                if buffer.len() < 4 {
                    return None;
                }
                (usize::from(u16::from_be_bytes([buffer[2], buffer[3]])), 4)
            }
            127 => {
                if buffer.len() < 10 {
                    return None;
                }
                let mut bytes = [0u8; 8];
                bytes.copy_from_slice(&buffer[2..10]);
                (
                    usize::try_from(u64::from_be_bytes(bytes)).unwrap_or(usize::MAX),
                    10,
                )
            }
            short => (usize::from(short), 2),
        };
        let mask = if masked {
            if buffer.len() < offset + 4 {
                return None;
            }
            let key = [
                buffer[offset],
                buffer[offset + 1],
                buffer[offset + 2],
                buffer[offset + 3],
            ];
            offset += 4;
            Some(key)
        } else {
            None
        };
        if buffer.len() < offset.saturating_add(length) {
            return None;
        }
        let mut payload = buffer[offset..offset + length].to_vec();
        if let Some(key) = mask {
            for (index, byte) in payload.iter_mut().enumerate() {
                *byte ^= key[index % 4];
            }
        }
        self.buffer.drain(..offset + length);
        Some((opcode, payload))
    }
}
