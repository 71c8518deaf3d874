//! The SDK's public data: what apps receive (events, stored messages, ticks) and the session.
//! These are plain values, serialisable so that a CLI or an app bridge can print them as JSON.

use std::fmt;
use std::time::Duration;

use serde::Serialize;
use tern_proto::content::MediaRef;

use crate::group_event::GroupChange;

/// The logged-in identity of this profile (the token stays inside the SDK).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Session {
    pub user_id: u64,
    pub username: String,
    pub device_id: u64,
    pub server: String,
}

/// Delivery state of one of my messages: the WhatsApp ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Tick {
    /// In the local outbox, not yet acknowledged by the server (a clock).
    Pending,
    /// Durably stored by the server (one tick).
    Sent,
    /// Stored by a device of the recipient (two ticks).
    Delivered,
    /// Read by the recipient (blue ticks).
    Read,
    /// The server refused it for good (e.g. `forbidden`); it will not be retried.
    Failed,
}

impl Tick {
    pub fn as_str(self) -> &'static str {
        match self {
            Tick::Pending => "pending",
            Tick::Sent => "sent",
            Tick::Delivered => "delivered",
            Tick::Read => "read",
            Tick::Failed => "failed",
        }
    }

    /// The tick for an outgoing message, from its sequence number and the conversation's
    /// watermarks (direct: the peer's; group: what every other member has). A read watermark
    /// implies delivered (PROTOCOL.md §4.4).
    pub(crate) fn derive(
        seq: Option<u64>,
        failed: bool,
        delivered_up_to: u64,
        read_up_to: u64,
    ) -> Tick {
        match seq {
            _ if failed => Tick::Failed,
            None => Tick::Pending,
            Some(s) if s <= read_up_to => Tick::Read,
            Some(s) if s <= delivered_up_to => Tick::Delivered,
            Some(_) => Tick::Sent,
        }
    }
}

impl fmt::Display for Tick {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A message as kept in the local history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoredMessage {
    /// The conversation: the peer's username for a direct one (my own username for notes to
    /// self), the group id in decimal for a group (usernames start with a letter, so the two
    /// never collide).
    pub conversation: String,
    /// The peer's user id in a direct conversation; 0 in a group.
    pub peer_user: u64,
    /// The group id, for a group message.
    pub group: Option<u64>,
    /// The group's name as last seen, for a group message (`None` until this device has seen
    /// it: a group message sent before any sync or `group_info`).
    pub group_name: Option<String>,
    /// Position in the conversation; `None` while the message waits in the outbox.
    pub seq: Option<u64>,
    /// Sender's username.
    pub from: String,
    pub sender_user: u64,
    /// Sent by me (from this device or, as a sync copy, from another of my devices).
    pub outgoing: bool,
    pub client_msg_id: String,
    /// The message as text: a text message's text; for a file, `[photo.jpg, 1.2 MB
    /// image/jpeg]` and its caption (see [`media`](StoredMessage::media)); for a system
    /// message, the change as a sentence; for a body this SDK cannot read,
    /// `[unsupported message]`.
    pub text: String,
    /// For a system message (a group membership or settings change), the decoded change
    /// (`GroupAction::Unknown` if this SDK cannot read it).
    /// System messages are never `outgoing` and have no ticks.
    pub system: Option<GroupChange>,
    /// The raw body: an encoded `Content` (or, for a system message, a `GroupEvent`).
    #[serde(skip)]
    pub body: Vec<u8>,
    /// Server timestamp (ms); `None` while pending.
    pub sent_at_ms: Option<i64>,
    /// For outgoing messages, the ticks; `None` for incoming ones.
    pub status: Option<Tick>,
    /// Why this received message could not be decrypted (its `text` then says so too).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub undecryptable: Option<String>,
}

impl StoredMessage {
    pub fn is_system(&self) -> bool {
        self.system.is_some()
    }

    /// The file this message carries, if it is a media message: what
    /// [`Client::download`](crate::Client::download) fetches. Its `key` decrypts the file;
    /// do not log it.
    pub fn media(&self) -> Option<MediaRef> {
        if self.is_system() {
            return None;
        }
        crate::content::media(&self.body)
    }
}

/// The outcome of a successful send: the single tick.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SentMessage {
    /// The peer's username, or the group id in decimal (as [`StoredMessage::conversation`]).
    pub conversation: String,
    /// The group id, for a group message.
    pub group: Option<u64>,
    pub client_msg_id: String,
    pub seq: u64,
    pub server_ts_ms: i64,
}

/// Which watermark a receipt moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReceiptKind {
    Delivered,
    Read,
}

impl ReceiptKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ReceiptKind::Delivered => "delivered",
            ReceiptKind::Read => "read",
        }
    }
}

/// A receipt that raised a watermark: the reader's own, or my ticks (stale or repeated
/// receipts are not emitted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReceiptEvent {
    /// The peer's username, or the group id in decimal (as [`StoredMessage::conversation`]).
    pub conversation: String,
    /// The peer's user id in a direct conversation; 0 in a group.
    pub peer_user: u64,
    /// The group id, for a group conversation.
    pub group: Option<u64>,
    /// Who delivered/read: the peer or a group member, or me (one of my other devices read
    /// the conversation).
    pub reader: String,
    pub reader_user: u64,
    pub kind: ReceiptKind,
    pub up_to_seq: u64,
    pub server_ts_ms: i64,
    /// The ticks of my messages in the conversation after this receipt: every other
    /// participant has delivered / read up to these sequence numbers.
    pub all_delivered_up_to: u64,
    pub all_read_up_to: u64,
}

/// Why the connection task stopped for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CloseReason {
    /// `connect` has not been called (or the task ended and was not restarted).
    NotStarted,
    /// `close` was called.
    ClientClosed,
    /// `logout` was called.
    LoggedOut,
    /// The token was refused or the device was removed (close code 4001): log in again.
    Unauthorized,
    /// The server does not speak this protocol version (close code 4004).
    UnsupportedVersion,
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CloseReason::NotStarted => "not started",
            CloseReason::ClientClosed => "closed by the client",
            CloseReason::LoggedOut => "logged out",
            CloseReason::Unauthorized => "unauthorized (token refused or device removed)",
            CloseReason::UnsupportedVersion => "unsupported protocol version",
        })
    }
}

/// The state of the connection task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ConnectionState {
    /// Opening the socket and saying `Hello`.
    Connecting,
    /// `Welcome` received; the mailbox is draining or drained.
    Connected,
    /// Lost; the next attempt starts after `retry_in`.
    Disconnected {
        #[serde(rename = "retry_in_ms", serialize_with = "as_millis")]
        retry_in: Duration,
    },
    /// Stopped for good; see the reason.
    Closed { reason: CloseReason },
}

impl ConnectionState {
    pub fn is_closed(&self) -> bool {
        matches!(self, ConnectionState::Closed { .. })
    }
}

fn as_millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// What the SDK tells an app, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A new message (incoming, or a sync copy of one I sent from another device), emitted once
    /// per (conversation, seq) after it is stored locally, in seq order within a conversation.
    /// Boxed: a message is ten times the size of the other events, and every subscriber's
    /// buffer holds up to 1024 events.
    Message(Box<StoredMessage>),
    /// A peer's delivered/read watermark, or my own read position from another device, rose.
    Receipt(ReceiptEvent),
    /// One of my messages from the outbox got its tick (also for `send_text` callers).
    Sent(SentMessage),
    /// The connection changed state.
    Connection(ConnectionState),
    /// The current connection drained the mailbox: everything waiting is stored and acknowledged.
    Synced,
    /// This subscriber fell behind and missed this many events; the local store has them.
    Lagged(u64),
    /// Something went wrong that the SDK handles itself (reported for visibility only).
    Error(String),
    /// A contact's (or my own account's) device keys changed since last seen: a device was
    /// added, removed or replaced. Apps show a warning; loudly if `was_verified`.
    KeysChanged(KeysChanged),
    /// A received message could not be decrypted. It is in the history with
    /// [`StoredMessage::undecryptable`] set; the SDK starts a new session with the sender.
    DecryptionFailed(DecryptionFailed),
}

/// See [`Event::KeysChanged`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeysChanged {
    pub user_id: u64,
    pub username: String,
    /// The user had been verified (safety number compared) with the old keys; the mark is
    /// gone now.
    pub was_verified: bool,
}

/// See [`Event::DecryptionFailed`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DecryptionFailed {
    pub conversation: String,
    pub seq: u64,
    pub from: String,
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_follow_the_watermarks() {
        // (seq, failed, delivered, read) -> tick
        let cases = [
            (None, false, 5, 5, Tick::Pending),
            (None, true, 0, 0, Tick::Failed),
            (Some(3), false, 0, 0, Tick::Sent),
            (Some(3), false, 2, 0, Tick::Sent),
            (Some(3), false, 3, 0, Tick::Delivered),
            (Some(3), false, 9, 2, Tick::Delivered),
            (Some(3), false, 3, 3, Tick::Read),
            // Read implies delivered even if no delivered receipt came.
            (Some(3), false, 0, 4, Tick::Read),
        ];
        for (seq, failed, d, r, want) in cases {
            assert_eq!(
                Tick::derive(seq, failed, d, r),
                want,
                "{seq:?} {failed} {d} {r}"
            );
        }
    }

    #[test]
    fn tick_serialises_lowercase() {
        let json = serde_json::to_string(&[Tick::Pending, Tick::Read]).expect("json");
        assert_eq!(json, r#"["pending","read"]"#);
    }
}
