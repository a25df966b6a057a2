//! The registry of this instance's authenticated connections, by user.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use axum::extract::ws::Utf8Bytes;
use tokio::sync::mpsc;

/// A frame queued for a client's writer task.
#[derive(Debug, Clone)]
pub enum Outgoing {
    Text(Utf8Bytes),
    Ping,
    Close { code: u16, reason: String },
}

/// An instruction for a session's own loop, not its writer.
#[derive(Debug, Clone)]
pub enum Control {
    /// A newer connection of the same user took over.
    Replaced,
    /// The client does not read fast enough; its queue is full.
    SendQueueFull,
}

/// Handles on one live session.
#[derive(Debug, Clone)]
pub struct SessionHandle {
    pub connection_id: String,
    /// Bind epoch from Redis; a higher epoch is a newer connection.
    pub epoch: u64,
    pub outgoing: mpsc::Sender<Outgoing>,
    pub control: mpsc::UnboundedSender<Control>,
}

impl SessionHandle {
    /// Queues a frame, or signals the session to close when its queue is
    /// full. Returns false when the session is gone or full.
    pub fn send(&self, frame: Utf8Bytes) -> bool {
        match self.outgoing.try_send(Outgoing::Text(frame)) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                let _ = self.control.send(Control::SendQueueFull);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

/// How long a replacement notice for a user with no local connection is
/// kept, for a bind on this instance whose registration has not landed yet.
const REPLACEMENT_MEMORY: Duration = Duration::from_secs(30);

/// Outcome of registering a connection.
pub enum Insert {
    /// Registered; the older local connection it replaced, if any.
    Current(Option<SessionHandle>),
    /// A newer connection of the user exists (here or on another instance),
    /// so this one must close.
    Superseded,
}

#[derive(Default)]
struct Users {
    sessions: HashMap<String, SessionHandle>,
    /// Highest epoch announced by a replacement notice that found no local
    /// connection, with when it arrived.
    replaced: HashMap<String, (u64, Instant)>,
}

#[derive(Default)]
pub struct Registry {
    users: RwLock<Users>,
}

impl Registry {
    /// Sends a frame to the user's local connection. Returns false when the
    /// user has no connection on this instance.
    pub fn send_to_user(&self, user_id: &str, frame: &Utf8Bytes) -> bool {
        let users = self.users.read().expect("registry lock poisoned");
        match users.sessions.get(user_id) {
            Some(session) => {
                session.send(frame.clone());
                true
            }
            None => false,
        }
    }

    /// Sends a frame to every authenticated local connection.
    pub fn send_to_all(&self, frame: &Utf8Bytes) {
        let users = self.users.read().expect("registry lock poisoned");
        for session in users.sessions.values() {
            session.send(frame.clone());
        }
    }

    /// Registers the user's current connection, unless a newer one (by
    /// epoch) is already known.
    pub fn insert(&self, user_id: &str, session: SessionHandle) -> Insert {
        let mut users = self.users.write().expect("registry lock poisoned");
        if let Some((epoch, _)) = users.replaced.get(user_id) {
            if *epoch > session.epoch {
                return Insert::Superseded;
            }
        }
        if let Some(existing) = users.sessions.get(user_id) {
            if existing.epoch > session.epoch {
                return Insert::Superseded;
            }
        }
        let previous = users.sessions.insert(user_id.to_string(), session.clone());
        Insert::Current(previous.filter(|old| old.connection_id != session.connection_id))
    }

    /// Replaces the queue a user's frames go to, for the same connection.
    pub fn redirect(&self, user_id: &str, connection_id: &str, outgoing: mpsc::Sender<Outgoing>) {
        let mut users = self.users.write().expect("registry lock poisoned");
        if let Some(session) = users.sessions.get_mut(user_id) {
            if session.connection_id == connection_id {
                session.outgoing = outgoing;
            }
        }
    }

    /// Removes the user's entry if it is still `connection_id`. Returns
    /// whether it was removed.
    pub fn remove(&self, user_id: &str, connection_id: &str) -> bool {
        let mut users = self.users.write().expect("registry lock poisoned");
        if users
            .sessions
            .get(user_id)
            .is_some_and(|session| session.connection_id == connection_id)
        {
            users.sessions.remove(user_id);
            true
        } else {
            false
        }
    }

    /// Handles a replacement notice: removes and returns the user's local
    /// connection if its epoch is older than `epoch`. With no local
    /// connection, remembers the epoch for a registration still on its way.
    pub fn replace_older(&self, user_id: &str, epoch: u64) -> Option<SessionHandle> {
        let mut users = self.users.write().expect("registry lock poisoned");
        match users.sessions.get(user_id) {
            Some(session) if session.epoch < epoch => users.sessions.remove(user_id),
            Some(_) => None,
            None => {
                let now = Instant::now();
                users
                    .replaced
                    .retain(|_, (_, at)| now.duration_since(*at) < REPLACEMENT_MEMORY);
                users.replaced.insert(user_id.to_string(), (epoch, now));
                None
            }
        }
    }

    pub fn contains(&self, user_id: &str) -> bool {
        self.users
            .read()
            .expect("registry lock poisoned")
            .sessions
            .contains_key(user_id)
    }

    /// Returns (user id, connection id, epoch) of every local connection.
    pub fn snapshot(&self) -> Vec<(String, String, u64)> {
        let users = self.users.read().expect("registry lock poisoned");
        users
            .sessions
            .iter()
            .map(|(user, session)| (user.clone(), session.connection_id.clone(), session.epoch))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.users
            .read()
            .expect("registry lock poisoned")
            .sessions
            .len()
    }
}
