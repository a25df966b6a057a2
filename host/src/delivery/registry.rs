//! The registry of this instance's authenticated connections, by user.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::extract::ws::Utf8Bytes;
use tokio::sync::Notify;

use super::queue::{FrameSender, TrySendError};

/// A frame queued for a client's writer task.
#[derive(Debug, Clone)]
pub enum Outgoing {
    Text(Utf8Bytes),
    Ping,
    Close { code: u16, reason: String },
}

/// An instruction for a session's own loop, not its writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// A newer connection of the same user took over.
    Replaced,
    /// The client does not read fast enough; its queue is full.
    SendQueueFull,
}

impl Control {
    const ALL: [Control; 2] = [Control::Replaced, Control::SendQueueFull];

    fn bit(self) -> u8 {
        match self {
            Control::Replaced => 1,
            Control::SendQueueFull => 2,
        }
    }
}

/// Instructions that other tasks leave for one session, as flags. Repeats
/// before the session looks count once, which is all either instruction
/// needs, and flags cost an idle connection far less than a channel.
#[derive(Debug, Default)]
pub struct ControlSignal {
    pending: AtomicU8,
    notify: Notify,
}

impl ControlSignal {
    pub fn send(&self, control: Control) {
        self.pending.fetch_or(control.bit(), Ordering::AcqRel);
        self.notify.notify_one();
    }

    /// Waits for the next instruction. `Replaced` comes first when both are
    /// pending.
    pub async fn recv(&self) -> Control {
        loop {
            for control in Control::ALL {
                let before = self.pending.fetch_and(!control.bit(), Ordering::AcqRel);
                if before & control.bit() != 0 {
                    return control;
                }
            }
            // notify_one stores a permit when no task is waiting, so a send
            // between the check above and this wait is not lost.
            self.notify.notified().await;
        }
    }
}

/// Handles on one live session.
#[derive(Debug, Clone)]
pub struct SessionHandle {
    pub connection_id: String,
    /// Bind epoch from Redis; a higher epoch is a newer connection.
    pub epoch: u64,
    pub outgoing: FrameSender,
    pub control: Arc<ControlSignal>,
}

impl SessionHandle {
    /// Queues a frame, or signals the session to close when its queue is
    /// full. Returns false when the session is gone or full.
    pub fn send(&self, frame: Utf8Bytes) -> bool {
        match self.outgoing.try_send(Outgoing::Text(frame)) {
            Ok(()) => true,
            Err(TrySendError::Full) => {
                self.control.send(Control::SendQueueFull);
                false
            }
            Err(TrySendError::Closed) => false,
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
    pub fn redirect(&self, user_id: &str, connection_id: &str, outgoing: FrameSender) {
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

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{Control, ControlSignal};

    #[tokio::test]
    async fn control_signal_keeps_early_sends() {
        let signal = ControlSignal::default();
        signal.send(Control::SendQueueFull);
        signal.send(Control::SendQueueFull);
        signal.send(Control::Replaced);
        assert_eq!(signal.recv().await, Control::Replaced);
        assert_eq!(signal.recv().await, Control::SendQueueFull);
        let nothing = tokio::time::timeout(Duration::from_millis(50), signal.recv()).await;
        assert!(
            nothing.is_err(),
            "a repeated instruction was delivered twice"
        );
    }

    #[tokio::test]
    async fn control_signal_wakes_waiting_session() {
        let signal = std::sync::Arc::new(ControlSignal::default());
        let waiter = tokio::spawn({
            let signal = signal.clone();
            async move { signal.recv().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        signal.send(Control::Replaced);
        let received = tokio::time::timeout(Duration::from_secs(2), waiter).await;
        assert_eq!(
            received
                .expect("waiter not woken")
                .expect("waiter panicked"),
            Control::Replaced
        );
    }
}
