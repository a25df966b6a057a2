//! The bounded queue of frames between a session (and the deliveries to
//! its user) and the session's writer task.
//!
//! Most connections sit idle, and tokio's bounded channel allocates its
//! first block of 32 slots (about 1.3 KiB for `Outgoing`) when it is
//! created. This queue allocates its buffer on the first frame instead, and
//! frees a large buffer again once the writer has drained it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use super::registry::Outgoing;

/// A buffer with more slots than this is freed once it is empty, so a burst
/// (a catch-up replay, say) does not keep its memory on an idle connection.
const KEEP_SLOTS: usize = 16;

/// Reason that [`FrameSender::try_send`] did not queue a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrySendError {
    /// The queue is at its capacity.
    Full,
    /// The receiver is gone.
    Closed,
}

#[derive(Debug)]
struct State {
    frames: VecDeque<Outgoing>,
    capacity: usize,
    senders: usize,
    receiver_alive: bool,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// Wakes the receiver after a frame is queued or the last sender is
    /// dropped.
    ready: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // No code panics while holding the lock, but a poisoned queue
        // still contains valid frames.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Creates a queue for at most `capacity` frames (at least 1).
pub fn channel(capacity: usize) -> (FrameSender, FrameReceiver) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            frames: VecDeque::new(),
            capacity: capacity.max(1),
            senders: 1,
            receiver_alive: true,
        }),
        ready: Notify::new(),
    });
    (FrameSender(shared.clone()), FrameReceiver(shared))
}

/// The sending side; clones share the queue.
#[derive(Debug)]
pub struct FrameSender(Arc<Shared>);

impl FrameSender {
    /// Queues a frame without waiting.
    pub fn try_send(&self, frame: Outgoing) -> Result<(), TrySendError> {
        {
            let mut state = self.0.lock();
            if !state.receiver_alive {
                return Err(TrySendError::Closed);
            }
            if state.frames.len() >= state.capacity {
                return Err(TrySendError::Full);
            }
            state.frames.push_back(frame);
        }
        // notify_one stores a permit when the receiver is not waiting yet,
        // so the frame is seen on its next wait.
        self.0.ready.notify_one();
        Ok(())
    }
}

impl Clone for FrameSender {
    fn clone(&self) -> Self {
        self.0.lock().senders += 1;
        FrameSender(self.0.clone())
    }
}

impl Drop for FrameSender {
    fn drop(&mut self) {
        let last = {
            let mut state = self.0.lock();
            state.senders -= 1;
            state.senders == 0
        };
        if last {
            self.0.ready.notify_one();
        }
    }
}

/// The receiving side, owned by the writer task.
#[derive(Debug)]
pub struct FrameReceiver(Arc<Shared>);

impl FrameReceiver {
    /// Waits for the next frame. Returns `None` once every sender is
    /// dropped and the queue is empty. Cancel-safe: a frame is taken only
    /// in the poll that returns it.
    pub async fn recv(&mut self) -> Option<Outgoing> {
        loop {
            {
                let mut state = self.0.lock();
                if let Some(frame) = take_front(&mut state) {
                    return Some(frame);
                }
                if state.senders == 0 {
                    return None;
                }
            }
            self.0.ready.notified().await;
        }
    }

    /// Takes the next frame if one is queued.
    pub fn try_recv(&mut self) -> Option<Outgoing> {
        take_front(&mut self.0.lock())
    }
}

impl Drop for FrameReceiver {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.receiver_alive = false;
        state.frames = VecDeque::new();
    }
}

fn take_front(state: &mut State) -> Option<Outgoing> {
    let frame = state.frames.pop_front()?;
    if state.frames.is_empty() && state.frames.capacity() > KEEP_SLOTS {
        state.frames = VecDeque::new();
    }
    Some(frame)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn text(value: &'static str) -> Outgoing {
        Outgoing::Text(value.into())
    }

    fn text_of(frame: Option<Outgoing>) -> Option<String> {
        match frame {
            Some(Outgoing::Text(text)) => Some(text.as_str().to_owned()),
            _ => None,
        }
    }

    #[tokio::test]
    async fn frames_arrive_in_order() {
        let (sender, mut receiver) = channel(4);
        sender.try_send(text("a")).expect("queue has room");
        sender.try_send(text("b")).expect("queue has room");
        assert_eq!(text_of(receiver.recv().await).as_deref(), Some("a"));
        assert_eq!(text_of(receiver.recv().await).as_deref(), Some("b"));
    }

    #[test]
    fn full_queue_rejects_frame() {
        let (sender, mut receiver) = channel(2);
        assert_eq!(sender.try_send(text("a")), Ok(()));
        assert_eq!(sender.try_send(text("b")), Ok(()));
        assert_eq!(sender.try_send(text("c")), Err(TrySendError::Full));
        assert_eq!(text_of(receiver.try_recv()).as_deref(), Some("a"));
        assert_eq!(sender.try_send(text("c")), Ok(()));
    }

    #[test]
    fn dropped_receiver_closes_queue() {
        let (sender, receiver) = channel(2);
        drop(receiver);
        assert_eq!(sender.try_send(text("a")), Err(TrySendError::Closed));
    }

    #[tokio::test]
    async fn recv_ends_after_last_sender() {
        let (sender, mut receiver) = channel(4);
        let clone = sender.clone();
        sender.try_send(text("a")).expect("queue has room");
        drop(sender);
        let waiting = tokio::spawn(async move {
            let first = text_of(receiver.recv().await);
            let second = receiver.recv().await;
            (first, second.is_none())
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "recv ended while a clone was alive");
        drop(clone);
        let (first, ended) = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("recv did not end after the last sender was dropped")
            .expect("receiver task panicked");
        assert_eq!(first.as_deref(), Some("a"));
        assert!(ended);
    }

    #[tokio::test]
    async fn waiting_receiver_wakes_on_send() {
        let (sender, mut receiver) = channel(4);
        let waiting = tokio::spawn(async move { text_of(receiver.recv().await) });
        tokio::time::sleep(Duration::from_millis(20)).await;
        sender.try_send(text("late")).expect("queue has room");
        let frame = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("receiver did not wake")
            .expect("receiver task panicked");
        assert_eq!(frame.as_deref(), Some("late"));
    }

    #[test]
    fn drained_burst_frees_buffer() {
        let (sender, mut receiver) = channel(100);
        for _ in 0..64 {
            sender.try_send(Outgoing::Ping).expect("queue has room");
        }
        while receiver.try_recv().is_some() {}
        assert_eq!(receiver.0.lock().frames.capacity(), 0);
    }
}
