//! Event fan-out: one bounded `tokio::sync::broadcast` channel (capacity [`EVENT_CAPACITY`])
//! that the connection task and the senders publish to and any number of subscribers read.
//!
//! Why broadcast: several parts of an app (a chat view, a notifier, a test) may listen at once,
//! and a slow one must not hold up the connection task or grow memory. A subscriber that falls
//! more than the capacity behind gets [`Event::Lagged`] with the number it missed; nothing is
//! lost for good, because every message and watermark is in the local store
//! ([`Client::history`](crate::Client::history), [`Client::sent_status`](crate::Client::sent_status)).
//!
//! Subscribe *before* `connect` to see the mailbox drained by the first connection.

use tokio::sync::broadcast;

use crate::types::Event;

/// Events buffered per subscriber before it lags.
pub const EVENT_CAPACITY: usize = 1024;

/// A subscription to the client's events, from the moment it was created.
pub struct EventStream {
    rx: broadcast::Receiver<Event>,
}

impl std::fmt::Debug for EventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStream")
            .field("queued", &self.rx.len())
            .finish()
    }
}

impl EventStream {
    pub(crate) fn new(rx: broadcast::Receiver<Event>) -> EventStream {
        EventStream { rx }
    }

    /// The next event; `None` once every `Client` handle is gone.
    pub async fn next(&mut self) -> Option<Event> {
        match self.rx.recv().await {
            Ok(e) => Some(e),
            Err(broadcast::error::RecvError::Lagged(n)) => Some(Event::Lagged(n)),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }

    /// The next event if one is already queued.
    pub fn try_next(&mut self) -> Option<Event> {
        match self.rx.try_recv() {
            Ok(e) => Some(e),
            Err(broadcast::error::TryRecvError::Lagged(n)) => Some(Event::Lagged(n)),
            Err(_) => None,
        }
    }
}
