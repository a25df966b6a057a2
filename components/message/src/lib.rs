//! Nexus Chat message component.
//!
//! It handles `NEW_MESSAGE`: validation, deduplication by
//! `clientMessageId`, the per-user rate limit, storage in Postgres and
//! delivery. It also serves the message history at `GET /messages/{peerId}`.

use nexus_guest::messages::{self, HistoryQuery, StoredMessage};
use nexus_guest::presence::typing_timer_key;
use nexus_guest::rate_limit::FixedWindow;
use nexus_guest::send::{self, Admission};
use nexus_guest::storage::{self, integer, text};
use nexus_guest::{fields, http, payload, settings, Error};
use spin_sdk::http::Request;
use spin_sdk::pg3::{self, ParameterValue};
use spin_sdk::redis::{self, RedisResult};

/// Bindings of the `nexus:chat` `event-handler` world and the export of the
/// typed handler.
#[allow(unsafe_code)]
mod bindings {
    wit_bindgen::generate!({
        world: "event-handler",
        path: "../../wit",
    });

    use super::Message;
    export!(Message);
}

use bindings::exports::nexus::chat::handler::Guest;
use bindings::exports::nexus::chat::types::{
    Connection, Delivery, Effect, Event, EventSource, HandlerError, Outbound, TimerCancel,
};

/// Lifetime of the marker that makes `!fault:trap-after-store` trap only on
/// the first attempt, in seconds.
const FAULT_MARKER_TTL_S: u64 = 600;

struct Message;

impl Guest for Message {
    fn handle(conn: Connection, event: Event) -> Result<Vec<Effect>, HandlerError> {
        let result = match event.name.as_str() {
            "NEW_MESSAGE" => new_message(&conn, &event),
            "$connected" if event.source == EventSource::Host => catch_up(&event),
            other => Err(Error::unknown_event("message", other)),
        };
        result.map_err(|error| HandlerError {
            code: error.code.as_str().to_owned(),
            message: error.message,
        })
    }
}

/// Handles `NEW_MESSAGE {receiverId, content, clientMessageId?}` from the
/// connection's user.
///
/// One Redis script checks the dedup key, the rate limit and whether the
/// receiver is connected. A repeated `clientMessageId` whose id is in the
/// dedup key gets the original `MESSAGE_SENT` and nothing else. Otherwise
/// the message counts against the rate limit and is stored (or, on a
/// unique-key conflict, the stored row is read back). A second script then
/// records the conversation partners and writes the dedup key last. The
/// stored message is then delivered: a repeat whose earlier attempt stored
/// the row but failed before returning had its effects discarded by the
/// host, so delivering now delivers it once.
fn new_message(conn: &Connection, event: &Event) -> Result<Vec<Effect>, Error> {
    let sender = conn.user_id.as_deref().ok_or_else(Error::unauthenticated)?;
    let data = fields::parse_object(&event.data)?;
    let receiver = fields::receiver_id(&data, sender)?;
    let max_content_bytes = settings::get_u64("max_content_bytes", 1)?;
    let content = fields::content(&data, max_content_bytes)?;
    let client_message_id = fields::client_message_id(&data)?;

    let fault = Fault::requested(content)?;
    match fault {
        Some(Fault::Trap) => panic!("fault injection: trap before any I/O"),
        Some(Fault::Spin) => spin_forever(),
        Some(Fault::TrapAfterStore) | None => {}
    }

    let redis = storage::open_redis()?;
    let window = message_window(sender)?;
    let dedup_key = client_message_id.map(|id| send::dedup_key(sender, id));
    let mut admission = send::admit(&redis, &window, receiver, dedup_key.as_deref())?;
    if let Admission::Duplicate { message_id } = &admission {
        if let Some(original) = find_duplicate(sender, message_id)? {
            return Ok(vec![reply("MESSAGE_SENT", original.message_sent_data())]);
        }
        // The dedup key points at no message of this sender, so the
        // message is new after all.
        admission = send::admit(&redis, &window, receiver, None)?;
    }
    let receiver_online = match admission {
        Admission::Allowed { receiver_online } => receiver_online,
        Admission::Limited { retry_after_s } => {
            let data = payload::rate_limit_exceeded(
                "message rate limit exceeded",
                retry_after_s,
                "NEW_MESSAGE",
            );
            return Ok(vec![reply("RATE_LIMIT_EXCEEDED", data)]);
        }
        Admission::Duplicate { .. } => {
            return Err(Error::internal(
                "the message admission check returned a duplicate without a dedup key",
            ))
        }
    };

    let db = storage::open_postgres()?;
    let message = store(
        &db,
        sender,
        receiver,
        content,
        client_message_id,
        !receiver_online,
    )?;

    if fault == Some(Fault::TrapAfterStore)
        && first_fault_attempt(&redis, sender, client_message_id)?
    {
        panic!("fault injection: trap after the message was stored");
    }

    send::record(
        &redis,
        &message.sender_id,
        &message.receiver_id,
        &message.id,
        message.client_message_id.as_deref(),
        settings::get_u64("dedup_ttl_s", 1)?,
    )?;

    Ok(vec![
        Effect::Deliver(Delivery {
            user_id: message.receiver_id.clone(),
            event: "NEW_MESSAGE".to_owned(),
            data: message.new_message_data(),
        }),
        reply("MESSAGE_SENT", message.message_sent_data()),
        // Clears the sender's typing indicator at the receiver.
        Effect::CancelTimer(TimerCancel {
            key: typing_timer_key(&message.receiver_id),
            fire: true,
        }),
    ])
}

fn reply(event: &str, data: String) -> Effect {
    Effect::Reply(Outbound {
        event: event.to_owned(),
        data,
    })
}

/// Returns the message `message_id` if `sender` sent it.
///
/// Checks the dedup key's id against Postgres with the sender, because ids
/// that contain `:` can make two users' dedup keys equal. An id that is
/// not a stored message of the sender counts as absent.
fn find_duplicate(sender: &str, message_id: &str) -> Result<Option<StoredMessage>, Error> {
    if !fields::is_message_id(message_id) || message_id.parse::<i64>().is_err() {
        eprintln!(
            "a dedup key of sender {sender} contains an invalid message id, so it is ignored"
        );
        return Ok(None);
    }
    let db = storage::open_postgres()?;
    let parameters = [
        ParameterValue::Str(message_id.to_owned()),
        ParameterValue::Str(sender.to_owned()),
    ];
    let rows = db
        .query(messages::SELECT_BY_ID_SQL, &parameters)
        .map_err(|error| storage::postgres_error("SELECT", &error))?;
    rows.rows
        .first()
        .map(|row| StoredMessage::from_row(row))
        .transpose()
}

fn message_window(sender: &str) -> Result<FixedWindow<'_>, Error> {
    Ok(FixedWindow {
        kind: "msg",
        user_id: sender,
        limit: settings::get_u64("message_rate_limit", 0)?,
        window_s: settings::get_u64("message_rate_window_s", 1)?,
        block_s: settings::get_u64("message_block_s", 1)?,
    })
}

/// Inserts the message, or on a `(sender_id, client_message_id)` conflict
/// reads back the row stored by an earlier attempt, with its original
/// receiver and content.
fn store(
    db: &pg3::Connection,
    sender: &str,
    receiver: &str,
    content: &str,
    client_message_id: Option<&str>,
    receiver_offline: bool,
) -> Result<StoredMessage, Error> {
    let parameters = [
        ParameterValue::Str(sender.to_owned()),
        ParameterValue::Str(receiver.to_owned()),
        ParameterValue::Str(content.to_owned()),
        messages::text_parameter(client_message_id),
        ParameterValue::Str(receiver_offline.to_string()),
    ];
    let inserted = db
        .query(messages::INSERT_SQL, &parameters)
        .map_err(|error| storage::postgres_error("INSERT", &error))?;
    if let Some(row) = inserted.rows.first() {
        let (id, created_at) = messages::inserted_row(row)?;
        return Ok(StoredMessage {
            id,
            sender_id: sender.to_owned(),
            receiver_id: receiver.to_owned(),
            content: content.to_owned(),
            created_at,
            client_message_id: client_message_id.map(str::to_owned),
        });
    }

    // Only a client message id can conflict, because NULLs never do.
    let client_message_id =
        client_message_id.ok_or_else(|| Error::internal("storing the message returned no row"))?;
    let parameters = [
        ParameterValue::Str(sender.to_owned()),
        ParameterValue::Str(client_message_id.to_owned()),
    ];
    let existing = db
        .query(messages::SELECT_BY_CLIENT_ID_SQL, &parameters)
        .map_err(|error| storage::postgres_error("SELECT", &error))?;
    let row = existing.rows.first().ok_or_else(|| {
        Error::internal("message conflicted on clientMessageId but no stored row was found")
    })?;
    StoredMessage::from_row(row)
}

/// Handles `$connected {userId, lastMessageId?}`: replays to the new
/// connection the messages to the user that came after `lastMessageId`, or,
/// for a client that names none, the messages stored while the user was
/// offline. At most `catchup_max` messages are replayed, oldest first; the
/// rest stay readable through the history route.
///
/// The host keeps live deliveries back until this handler returns and then
/// drops live copies of the replayed frames, so each message arrives once
/// and in order.
fn catch_up(event: &Event) -> Result<Vec<Effect>, Error> {
    let data = fields::parse_object(&event.data)?;
    let user = fields::user_id(&data, "userId")?;
    let last_message_id = fields::optional_string(&data, "lastMessageId")?;
    let limit = settings::get_u64("catchup_max", 1)?.to_string();

    let db = storage::open_postgres()?;
    let rows = match last_message_id {
        Some(last) => {
            fields::check_message_id("lastMessageId", last)?;
            let parameters = [
                ParameterValue::Str(user.to_owned()),
                ParameterValue::Str(last.to_owned()),
                ParameterValue::Str(limit),
            ];
            db.query(messages::CATCH_UP_AFTER_SQL, &parameters)
        }
        None => {
            let parameters = [
                ParameterValue::Str(user.to_owned()),
                ParameterValue::Str(limit),
            ];
            db.query(messages::CATCH_UP_PENDING_SQL, &parameters)
        }
    }
    .map_err(|error| storage::postgres_error("SELECT", &error))?;
    let replayed = rows
        .rows
        .iter()
        .map(|row| StoredMessage::from_row(row))
        .collect::<Result<Vec<_>, Error>>()?;

    if let Some(newest) = replayed.last() {
        let parameters = [
            ParameterValue::Str(user.to_owned()),
            ParameterValue::Str(newest.id.clone()),
        ];
        db.execute(messages::CLEAR_PENDING_SQL, &parameters)
            .map_err(|error| storage::postgres_error("UPDATE", &error))?;
    }
    Ok(replayed
        .iter()
        .map(|message| reply("NEW_MESSAGE", message.new_message_data()))
        .collect())
}

/// Faults for the test suite, requested by the whole message content and
/// active only while the `fault_injection` setting is `on` (the default is
/// `off`, and then such content is an ordinary message):
///
/// - `!fault:trap` panics before any Redis or Postgres I/O.
/// - `!fault:spin` loops forever, so the host's per-event deadline has to
///   stop it.
/// - `!fault:trap-after-store` panics after the message is stored and
///   before the dedup key is written, only on the first attempt for its
///   `(sender, clientMessageId)`. The first attempt is the one whose
///   `SET nexus:fault:{sender}:{cmid} 1 NX EX 600` succeeds. Without a
///   `clientMessageId` every attempt panics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Trap,
    Spin,
    TrapAfterStore,
}

impl Fault {
    /// Returns the fault that `content` requests, if fault injection is on.
    fn requested(content: &str) -> Result<Option<Fault>, Error> {
        let fault = match content {
            "!fault:trap" => Fault::Trap,
            "!fault:spin" => Fault::Spin,
            "!fault:trap-after-store" => Fault::TrapAfterStore,
            _ => return Ok(None),
        };
        let enabled = settings::get_switch("fault_injection")?;
        Ok(enabled.then_some(fault))
    }
}

fn spin_forever() -> ! {
    let mut spins: u64 = 0;
    loop {
        spins = std::hint::black_box(spins.wrapping_add(1));
    }
}

/// Reports whether this is the first `!fault:trap-after-store` attempt for
/// `(sender, client_message_id)`.
fn first_fault_attempt(
    redis: &redis::Connection,
    sender: &str,
    client_message_id: Option<&str>,
) -> Result<bool, Error> {
    let Some(client_message_id) = client_message_id else {
        return Ok(true);
    };
    let arguments = [
        text(&format!("nexus:fault:{sender}:{client_message_id}")),
        text("1"),
        text("NX"),
        text("EX"),
        integer(FAULT_MARKER_TTL_S),
    ];
    let reply = storage::execute(redis, "SET", &arguments)?;
    Ok(!matches!(reply.as_slice(), [] | [RedisResult::Nil]))
}

/// Export of `wasi:http/incoming-handler` for the component's HTTP route.
#[allow(unsafe_code)]
mod http_export {
    use spin_sdk::http::{Request, Response};
    use spin_sdk::http_component;

    /// Serves `GET /messages/{peerId}?before=ID&after=ID&limit=N`: the
    /// conversation between the bearer token's user and `peerId`, newest first,
    /// or oldest first when `after` is given (see
    /// [`messages::history_page`] for `nextBefore`).
    #[http_component]
    fn handle_http(request: Request) -> Response {
        nexus_guest::http::respond(super::history_route(&request))
    }
}

fn history_route(request: &Request) -> Result<serde_json::Value, Error> {
    let peer = http::path_segment(request.path(), "/messages/")?;
    http::require_get(request)?;
    let claims = http::authorize(request)?;
    fields::check_id("peerId", &peer)?;
    let page_max = settings::get_u64("history_page_max", 1)?;
    let query = HistoryQuery::parse(request.query(), page_max)?;

    let db = storage::open_postgres()?;
    let rows = db
        .query(query.sql(), &query.parameters(&claims.sub, &peer))
        .map_err(|error| storage::postgres_error("SELECT", &error))?;
    let page = rows
        .rows
        .iter()
        .map(|row| StoredMessage::from_row(row))
        .collect::<Result<Vec<_>, Error>>()?;
    Ok(messages::history_page(page, &query))
}
