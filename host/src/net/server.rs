//! The HTTP server: the WebSocket endpoint, health endpoints and the
//! components' HTTP routes, all on one port.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use http_body_util::BodyExt;
use serde::Deserialize;
use serde_json::json;
use socketioxide::layer::SocketIoLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tracing::{debug, warn};

use super::session::Session;
use crate::app::{App, HandshakeSlot};
use crate::metrics::Metrics;
use crate::runtime::http::MAX_REQUEST_BODY;

/// Read buffer of one WebSocket, which every idle connection keeps. Chat
/// frames are a few hundred bytes, and larger frames take several reads.
const READ_BUFFER_BYTES: usize = 1024;

/// Bytes a WebSocket may have waiting in its write buffer beyond one frame
/// before a send fails; the session's own queue bounds the rest.
const WRITE_BACKLOG_BYTES: usize = 64 * 1024;

pub fn router(app: Arc<App>, socketio: SocketIoLayer) -> Router {
    let origins: Vec<HeaderValue> = app
        .allowed_origins
        .iter()
        .filter_map(|origin| HeaderValue::from_str(origin).ok())
        .collect();
    // Browsers' long-polling requests are cross-origin XHRs, so they need
    // CORS headers; the origin check below rejects what CORS only flags.
    let cors = CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins))
        .allow_credentials(true)
        .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
        .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE]);
    Router::new()
        .route("/ws", get(websocket))
        .route("/health", get(health))
        .route("/livez", get(livez))
        .route("/metrics", get(metrics))
        .fallback(component_route)
        .layer(socketio)
        .layer(middleware::from_fn_with_state(
            app.clone(),
            check_socketio_request,
        ))
        .layer(cors)
        .with_state(app)
}

/// Rejects Socket.IO requests from a browser origin outside
/// `FRONTEND_URLS`; requests without `Origin` (native clients) pass. A
/// request that opens a new session (it names no `sid`) takes a place of
/// its address under `MAX_CONNECTIONS_PER_IP`, which the session keeps.
async fn check_socketio_request(
    State(app): State<Arc<App>>,
    mut request: Request,
    next: middleware::Next,
) -> Response {
    if !request.uri().path().starts_with("/socket.io") {
        return next.run(request).await;
    }
    if let Some(origin) = request.headers().get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or_default();
        if !app.is_origin_allowed(origin) {
            debug!(origin, "socket.io origin rejected");
            count_rejected(&app, "forbidden_origin");
            return json_error(
                StatusCode::FORBIDDEN,
                "FORBIDDEN_ORIGIN",
                "origin is not in FRONTEND_URLS",
            );
        }
    }
    let opens_session = !request
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .any(|pair| pair.starts_with("sid="));
    if opens_session {
        let remote = remote_address(request.extensions());
        let client_ip = client_address(&app, request.headers(), remote);
        let Some(slot) = app.admit(client_ip) else {
            debug!(%remote, "socket.io session over the per-address cap");
            count_rejected(&app, "too_many_connections");
            return json_error(
                StatusCode::TOO_MANY_REQUESTS,
                "TOO_MANY_CONNECTIONS",
                "too many connections from this address",
            );
        };
        request
            .extensions_mut()
            .insert(HandshakeSlot(Arc::new(Mutex::new(Some(slot)))));
    }
    next.run(request).await
}

#[derive(Deserialize)]
struct WebSocketQuery {
    token: Option<String>,
}

fn bearer_token(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))?;
    Some(token.trim().to_string())
}

fn json_error(status: StatusCode, code: &str, message: &str) -> Response {
    (status, Json(json!({ "code": code, "message": message }))).into_response()
}

async fn websocket(
    State(app): State<Arc<App>>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    Query(query): Query<WebSocketQuery>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    // Browsers always send Origin; native clients may not, and are allowed.
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or_default();
        if !app.is_origin_allowed(origin) {
            debug!(%remote, origin, "websocket origin rejected");
            count_rejected(&app, "forbidden_origin");
            return json_error(
                StatusCode::FORBIDDEN,
                "FORBIDDEN_ORIGIN",
                "origin is not in FRONTEND_URLS",
            );
        }
    }
    if *app.shutdown.borrow() {
        return json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "RESTARTING",
            "server is restarting",
        );
    }
    let client_ip = client_address(&app, &headers, remote);
    let Some(slot) = app.admit(client_ip) else {
        count_rejected(&app, "too_many_connections");
        return json_error(
            StatusCode::TOO_MANY_REQUESTS,
            "TOO_MANY_CONNECTIONS",
            "too many connections from this address",
        );
    };
    let token = bearer_token(&headers).or(query.token);
    let max = app.config.max_frame_bytes;
    // tungstenite's default 128 KiB read and write buffers per connection
    // would dominate an idle connection's memory; chat frames are small.
    upgrade
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(0)
        .max_write_buffer_size(max + WRITE_BACKLOG_BYTES)
        .max_frame_size(max)
        .max_message_size(max)
        .on_upgrade(move |socket| Session::run_websocket(app, socket, remote, token, slot))
}

/// Returns the peer address that the server recorded for a request, or
/// 0.0.0.0:0 for a request that did not come through its listener.
pub(super) fn remote_address(extensions: &http::Extensions) -> SocketAddr {
    extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)), |info| info.0)
}

/// Returns the client's IP: the socket's peer, or with
/// `TRUST_FORWARDED_FOR` the last `X-Forwarded-For` entry, which the proxy
/// appended.
pub(super) fn client_address(app: &App, headers: &HeaderMap, remote: SocketAddr) -> IpAddr {
    if !app.config.trust_forwarded_for {
        return remote.ip();
    }
    if let Some(address) = forwarded_address(headers) {
        return address;
    }
    if headers.contains_key("x-forwarded-for") {
        warn!(%remote, "last X-Forwarded-For entry is not an address, so the proxy's address counts; check the proxy's header settings");
    }
    remote.ip()
}

/// Returns the address in the last entry of the last `X-Forwarded-For`
/// header, written with or without a port (`192.0.2.7:4711`,
/// `[2001:db8::7]:4711`).
///
/// Only that entry comes from the proxy, because the client writes the
/// entries before it. So a missing or invalid last entry gives `None`, and
/// the caller counts the proxy's address instead of an earlier entry.
fn forwarded_address(headers: &HeaderMap) -> Option<IpAddr> {
    let header = headers.get_all("x-forwarded-for").iter().next_back()?;
    let entry = header.to_str().ok()?.rsplit(',').next()?.trim();
    entry
        .parse::<IpAddr>()
        .or_else(|_| entry.parse::<SocketAddr>().map(|address| address.ip()))
        .ok()
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let metrics = &app.metrics;
    metrics.authenticated_users.set(app.registry.len() as i64);
    let status = app.postgres.status();
    metrics
        .postgres_pool
        .get_or_create(&Metrics::label("state", "size"))
        .set(status.size as i64);
    metrics
        .postgres_pool
        .get_or_create(&Metrics::label("state", "available"))
        .set(status.available as i64);
    let content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    ([(header::CONTENT_TYPE, content_type)], metrics.render()).into_response()
}

fn count_rejected(app: &App, reason: &'static str) {
    app.metrics
        .connection_errors
        .get_or_create(&Metrics::label("reason", reason))
        .inc();
}

async fn livez() -> impl IntoResponse {
    Json(json!({ "status": "ok" }))
}

async fn health(State(app): State<Arc<App>>) -> Response {
    let redis = app.backplane.ping().await;
    let postgres = postgres_ready(&app).await;
    let components: Vec<_> = app
        .runtime
        .components()
        .iter()
        .map(|component| {
            json!({
                "id": component.id,
                "digest": component.digest,
                "generation": component.generation,
                "loadedAt": component.loaded_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                "status": "ok",
            })
        })
        .collect();
    let ready = redis && postgres;
    let body = json!({
        "status": if ready { "ok" } else { "degraded" },
        "instanceId": app.instance_id,
        "redis": if redis { "ok" } else { "unreachable" },
        "postgres": if postgres { "ok" } else { "unreachable" },
        "connections": app.registry.len(),
        "components": components,
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn postgres_ready(app: &App) -> bool {
    let check = async {
        let client = app.postgres.get().await.ok()?;
        client.simple_query("SELECT 1").await.ok()
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), check).await,
        Ok(Some(_))
    )
}

/// Serves `spin.toml`'s HTTP routes through the owning component.
async fn component_route(State(app): State<Arc<App>>, request: Request) -> Response {
    let path = request.uri().path().to_string();
    let manifest = app.manifest();
    let Some(route) = manifest.route_for(&path) else {
        return json_error(StatusCode::NOT_FOUND, "NOT_FOUND", "no such route");
    };
    // wasi:http gives the component the request's authority, which HTTP/1.1
    // takes from the Host header.
    let has_authority = request.uri().authority().is_some()
        || request
            .headers()
            .get(http::header::HOST)
            .is_some_and(|host| !host.is_empty());
    if !has_authority {
        return json_error(
            StatusCode::BAD_REQUEST,
            "BAD_REQUEST",
            "the request has no Host header; send one",
        );
    }
    let component = route.component.clone();
    let (parts, body) = request.into_parts();
    let body = match http_body_util::Limited::new(body, MAX_REQUEST_BODY)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return json_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "BODY_TOO_LARGE",
                "request body is too large",
            )
        }
    };
    let request = http::Request::from_parts(parts, body);
    match app.runtime.serve_http(&component, request).await {
        Ok(response) => {
            let (parts, body) = response.into_parts();
            Response::from_parts(parts, Body::new(body))
        }
        Err(error) => {
            warn!(component, path, cause = %format!("{error:#}"), "component route failed");
            json_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "INTERNAL_ERROR",
                "the route's component failed",
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forwarded(values: &[&str]) -> Option<IpAddr> {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(
                "x-forwarded-for",
                value.parse().expect("a valid header value"),
            );
        }
        forwarded_address(&headers)
    }

    fn ip(text: &str) -> Option<IpAddr> {
        Some(text.parse().expect("a valid address"))
    }

    #[test]
    fn forwarded_last_entry() {
        assert_eq!(forwarded(&["192.0.2.7"]), ip("192.0.2.7"));
        assert_eq!(forwarded(&["198.51.100.1, 192.0.2.7"]), ip("192.0.2.7"));
        assert_eq!(forwarded(&["198.51.100.1,192.0.2.7 "]), ip("192.0.2.7"));
        assert_eq!(forwarded(&["198.51.100.1", "192.0.2.7"]), ip("192.0.2.7"));
        assert_eq!(forwarded(&["2001:db8::7"]), ip("2001:db8::7"));
    }

    #[test]
    fn forwarded_entry_with_port() {
        assert_eq!(
            forwarded(&["198.51.100.1, 192.0.2.7:4711"]),
            ip("192.0.2.7")
        );
        assert_eq!(forwarded(&["[2001:db8::7]:4711"]), ip("2001:db8::7"));
    }

    #[test]
    fn forwarded_invalid_last_entry() {
        assert_eq!(forwarded(&["198.51.100.1, unknown"]), None);
        assert_eq!(forwarded(&["198.51.100.1, "]), None);
        assert_eq!(forwarded(&["198.51.100.1", "garbage"]), None);
        assert_eq!(forwarded(&[]), None);
    }
}
