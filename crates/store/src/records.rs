//! Plain records passed in and out of the [`crate::Store`] trait.

use std::sync::Arc;

pub type UserId = u64;
pub type DeviceId = u64;

pub use tern_proto::http::Visibility;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    pub id: UserId,
    pub username: String,
    pub password_hash: String,
    pub last_seen_ms: Option<i64>,
    pub last_seen_privacy: Visibility,
}

/// Who a valid token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceAuth {
    pub device_id: DeviceId,
    pub user_id: UserId,
    pub username: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRecord {
    pub id: DeviceId,
    pub name: String,
    pub created_at_ms: i64,
    pub last_seen_ms: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LastSeenUpdate {
    pub user: UserId,
    pub device: DeviceId,
    pub at_ms: i64,
}

/// A user as referenced from a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRef {
    pub id: UserId,
    pub username: String,
}

/// A direct conversation between two users (`lo.id <= hi.id`; equal for a note to self).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversation {
    pub lo: UserRef,
    pub hi: UserRef,
}

impl Conversation {
    /// The other participant, as seen by `me`.
    pub fn peer_of(&self, me: UserId) -> &UserRef {
        if self.lo.id == me { &self.hi } else { &self.lo }
    }

    pub fn user(&self, id: UserId) -> Option<&UserRef> {
        [&self.lo, &self.hi].into_iter().find(|u| u.id == id)
    }
}

/// One addressed device of a post, with an optional body of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressedDevice {
    pub device: DeviceId,
    pub body: Option<Vec<u8>>,
}

/// A message to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMessage {
    pub sender: DeviceAuth,
    pub recipient: UserId,
    pub client_msg_id: String,
    pub body: Vec<u8>,
    pub devices: Vec<AddressedDevice>,
    pub now_ms: i64,
}

/// A stored message as a device receives it. Shared (`Arc`) between the deliveries of one post.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageRecord {
    pub conversation: Conversation,
    pub seq: u64,
    pub sender_user: UserId,
    pub sender_device: DeviceId,
    pub client_msg_id: String,
    pub server_ts_ms: i64,
    pub body: Arc<[u8]>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiptKind {
    Delivered,
    Read,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiptRecord {
    pub conversation: Conversation,
    pub reader: UserId,
    pub kind: ReceiptKind,
    pub up_to_seq: u64,
    pub ts_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MailboxItem {
    Message(Arc<MessageRecord>),
    Receipt(Arc<ReceiptRecord>),
}

/// One entry of a device's mailbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailboxEntry {
    pub mseq: u64,
    pub item: MailboxItem,
}

/// A new mailbox entry for a device, to be pushed live if the device is connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub device: DeviceId,
    pub user: UserId,
    pub entry: MailboxEntry,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PostOutcome {
    /// Newly stored; `deliveries` are the new mailbox entries, in commit order.
    Stored {
        seq: u64,
        server_ts_ms: i64,
        deliveries: Vec<Delivery>,
    },
    /// The same `(sender device, client_msg_id)` was stored before: its original answer.
    Duplicate { seq: u64, server_ts_ms: i64 },
}
