//! The registry of this instance's authenticated connections, by user.

use std::collections::HashMap;
use std::sync::RwLock;

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
    /// Queues a frame, or tells the session to close when its queue is full.
    /// Returns false when the session is gone or full.
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

#[derive(Default)]
pub struct Registry {
    users: RwLock<HashMap<String, SessionHandle>>,
}

impl Registry {
    /// Sends a frame to the user's local connection. Returns false when the
    /// user has no connection on this instance.
    pub fn send_to_user(&self, user_id: &str, frame: &Utf8Bytes) -> bool {
        let users = self.users.read().expect("registry lock poisoned");
        match users.get(user_id) {
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
        for session in users.values() {
            session.send(frame.clone());
        }
    }

    /// Registers the user's current connection and returns the one it
    /// replaces, if that was a different connection.
    pub fn insert(&self, user_id: &str, session: SessionHandle) -> Option<SessionHandle> {
        let mut users = self.users.write().expect("registry lock poisoned");
        let previous = users.insert(user_id.to_string(), session.clone());
        previous.filter(|old| old.connection_id != session.connection_id)
    }

    /// Removes the user's entry if it is still `connection_id`. Returns
    /// whether it was removed.
    pub fn remove(&self, user_id: &str, connection_id: &str) -> bool {
        let mut users = self.users.write().expect("registry lock poisoned");
        if users
            .get(user_id)
            .is_some_and(|session| session.connection_id == connection_id)
        {
            users.remove(user_id);
            true
        } else {
            false
        }
    }

    /// Removes and returns the user's local connection if its epoch is
    /// older than `epoch`.
    pub fn remove_older(&self, user_id: &str, epoch: u64) -> Option<SessionHandle> {
        let mut users = self.users.write().expect("registry lock poisoned");
        if users
            .get(user_id)
            .is_some_and(|session| session.epoch < epoch)
        {
            users.remove(user_id)
        } else {
            None
        }
    }

    pub fn contains(&self, user_id: &str) -> bool {
        self.users
            .read()
            .expect("registry lock poisoned")
            .contains_key(user_id)
    }

    /// Returns (user id, connection id, epoch) of every local connection.
    pub fn snapshot(&self) -> Vec<(String, String, u64)> {
        let users = self.users.read().expect("registry lock poisoned");
        users
            .iter()
            .map(|(user, session)| (user.clone(), session.connection_id.clone(), session.epoch))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.users.read().expect("registry lock poisoned").len()
    }
}
