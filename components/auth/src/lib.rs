//! Nexus Chat auth component.
//!
//! It handles the `authenticate` event, which binds a connection to the
//! user of an HS256 token, and serves `GET /auth/verify`.

use nexus_guest::jwt::{self, Claims, TokenError};
use nexus_guest::{fields, http, payload, time, Error, ErrorCode};
use spin_sdk::http::Request;

/// Bindings of the `nexus:chat` `event-handler` world and the export of the
/// typed handler.
#[allow(unsafe_code)]
mod bindings {
    wit_bindgen::generate!({
        world: "event-handler",
        path: "../../wit",
    });

    use super::Auth;
    export!(Auth);
}

use bindings::exports::nexus::chat::handler::Guest;
use bindings::exports::nexus::chat::types::{
    Binding, CloseFrame, Connection, Effect, Event, EventSource, HandlerError, Outbound,
};

/// WebSocket close code for a policy violation (RFC 6455), used when a
/// connection fails to authenticate.
const CLOSE_POLICY_VIOLATION: u16 = 1008;

struct Auth;

impl Guest for Auth {
    fn handle(conn: Connection, event: Event) -> Result<Vec<Effect>, HandlerError> {
        let result = match event.name.as_str() {
            "authenticate" => authenticate(&conn, &event),
            other => Err(Error::unknown_event("auth", other)),
        };
        result.map_err(handler_error)
    }
}

fn handler_error(error: Error) -> HandlerError {
    HandlerError {
        code: error.code.as_str().to_owned(),
        message: error.message,
    }
}

/// Handles `authenticate`.
///
/// From the client the data is `{userId, token, lastMessageId?}`. From the
/// host, when the token came with the handshake, it is `{token}`, and the
/// user is the token's subject. A rejected token on a connection that is
/// not authenticated yet gets an `ERROR` reply and a close with 1008. On an
/// authenticated connection (a renewal) the handler returns the error
/// instead, so the connection keeps its current authentication.
fn authenticate(conn: &Connection, event: &Event) -> Result<Vec<Effect>, Error> {
    let data = fields::parse_object(&event.data)?;
    let mut last_message_id = None;
    let claimed_user = match event.source {
        EventSource::Client => {
            let user_id = fields::user_id(&data, "userId")?;
            if let Some(last) = fields::optional_string(&data, "lastMessageId")? {
                fields::check_message_id("lastMessageId", last)?;
                last_message_id = Some(last.to_owned());
            }
            Some(user_id)
        }
        EventSource::Host => None,
        EventSource::Timer => {
            return Err(Error::new(
                ErrorCode::UnknownEvent,
                "authenticate is not a timer event",
            ))
        }
    };
    let token = fields::optional_string(&data, "token")?.unwrap_or_default();
    let secret = jwt::secret_from_settings()?;

    let verified = jwt::verify(token, secret.as_bytes()).and_then(|claims| {
        jwt::check_subject(&claims, claimed_user, conn.user_id.as_deref())?;
        Ok(claims)
    });
    match verified {
        Ok(claims) => accept(conn, &claims, last_message_id),
        Err(reason) => reject(conn, &reason),
    }
}

/// Binds the connection and replies `CONNECTION_SUCCESS`. The host passes
/// `last_message_id` on to `$connected`, whose message handler replays
/// what came after it.
fn accept(
    conn: &Connection,
    claims: &Claims,
    last_message_id: Option<String>,
) -> Result<Vec<Effect>, Error> {
    let expires_at_ms = claims.expires_at_ms();
    let expires_at = format_expiry(claims)?;
    let success =
        payload::connection_success(&claims.sub, &conn.id, &conn.instance_id, &expires_at);
    Ok(vec![
        Effect::Bind(Binding {
            user_id: claims.sub.clone(),
            expires_at_ms,
            last_message_id,
        }),
        Effect::Reply(Outbound {
            event: "CONNECTION_SUCCESS".to_owned(),
            data: success,
        }),
    ])
}

/// Formats the token expiry as RFC 3339. `jwt::verify` caps `exp` at the
/// year 9999, so the error is not expected.
fn format_expiry(claims: &Claims) -> Result<String, Error> {
    time::rfc3339_from_ms(claims.expires_at_ms())
        .ok_or_else(|| Error::internal("token expiry could not be formatted"))
}

fn reject(conn: &Connection, reason: &TokenError) -> Result<Vec<Effect>, Error> {
    let error = Error::from(reason.clone());
    if conn.user_id.is_some() {
        return Err(error);
    }
    Ok(vec![
        Effect::Reply(Outbound {
            event: "ERROR".to_owned(),
            data: payload::error_event(error.code.as_str(), &error.message, "authenticate"),
        }),
        Effect::Close(CloseFrame {
            code: CLOSE_POLICY_VIOLATION,
            reason: "authentication failed".to_owned(),
        }),
    ])
}

/// Export of `wasi:http/incoming-handler` for the component's HTTP route.
#[allow(unsafe_code)]
mod http_export {
    use spin_sdk::http::{Request, Response};
    use spin_sdk::http_component;

    /// Serves `GET /auth/verify`: `{userId, expiresAt}` for a valid bearer
    /// token, otherwise 401 `{code, message}`.
    #[http_component]
    fn handle_http(request: Request) -> Response {
        nexus_guest::http::respond(super::verify_route(&request))
    }
}

fn verify_route(request: &Request) -> Result<serde_json::Value, Error> {
    if request.path() != "/auth/verify" {
        return Err(http::not_found(request.path()));
    }
    http::require_get(request)?;
    let claims = http::authorize(request)?;
    let expires_at = format_expiry(&claims)?;
    Ok(serde_json::json!({"userId": claims.sub, "expiresAt": expires_at}))
}
