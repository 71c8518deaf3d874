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

pub type GroupId = u64;

/// Where a message lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Conversation {
    /// Between two users (`lo.id <= hi.id`; equal for a note to self).
    Direct { lo: UserRef, hi: UserRef },
    /// A group, with its name at the time of reading.
    Group { id: GroupId, name: String },
}

/// Who a message is posted to, or which conversation is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    User(UserId),
    Group(GroupId),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    /// Written by a user; the body is opaque.
    User,
    /// Written by the server: a group event (`tern_proto::frames::GroupEvent`, encoded).
    System,
}

pub use tern_proto::http::Role;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberRecord {
    pub user: UserRef,
    pub role: Role,
    pub joined_seq: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupRecord {
    pub id: GroupId,
    pub name: String,
    pub description: String,
    pub members_can_add: bool,
    pub created_at_ms: i64,
    pub last_seq: u64,
    /// Ordered by joining, then user id.
    pub members: Vec<MemberRecord>,
}

impl GroupRecord {
    pub fn role_of(&self, user: UserId) -> Option<Role> {
        self.members
            .iter()
            .find(|m| m.user.id == user)
            .map(|m| m.role)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSummaryRecord {
    pub id: GroupId,
    pub name: String,
    pub role: Role,
    pub member_count: u64,
}

/// A group to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewGroup {
    pub creator: DeviceAuth,
    pub name: String,
    pub description: String,
    /// The first members besides the creator (the creator is ignored if listed).
    pub members: Vec<UserId>,
    pub members_can_add: bool,
    pub max_members: usize,
    pub now_ms: i64,
}

/// A change to a group, by one of its members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupOp {
    Add(Vec<UserId>),
    Remove(UserId),
    Leave,
    Promote(UserId),
    Demote(UserId),
    Update {
        name: Option<String>,
        description: Option<String>,
        members_can_add: Option<bool>,
    },
}

/// The result of creating or changing a group: its new state and the system messages' mailbox
/// entries to hand to connected devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupChange {
    pub group: GroupRecord,
    pub deliveries: Vec<Delivery>,
}

/// Delivery state of one message for one member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberReceiptRecord {
    pub user: UserRef,
    pub delivered: bool,
    pub read: bool,
}

/// WhatsApp's "message info": who has a group message, for its sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageInfoRecord {
    pub group: GroupId,
    pub seq: u64,
    pub sender: UserId,
    pub members: Vec<MemberReceiptRecord>,
}

/// One addressed device of a post, with an optional body of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressedDevice {
    pub device: DeviceId,
    pub body: Option<Vec<u8>>,
}

/// The most a device's mailbox may hold: entries, and the bytes of their bodies (a per-device
/// body if the entry has one, else the message's shared body; receipts count 0 bytes). Checked
/// in the transaction that posts a user message, against the mailbox as it is after the post.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MailboxLimit {
    pub max_entries: u64,
    pub max_bytes: u64,
}

impl MailboxLimit {
    /// No bound.
    pub const UNLIMITED: MailboxLimit = MailboxLimit {
        max_entries: u64::MAX,
        max_bytes: u64::MAX,
    };
}

/// A message to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMessage {
    pub sender: DeviceAuth,
    /// A user (the devices must be addressed exactly) or a group (`devices` empty: the store
    /// fans out to every member device; or exactly every member device but the sender's, some
    /// with bodies of their own, as end-to-end encrypted groups send).
    pub to: Target,
    pub client_msg_id: String,
    pub body: Vec<u8>,
    pub devices: Vec<AddressedDevice>,
    pub now_ms: i64,
    /// The bound every recipient device's mailbox must stay within after this post, else
    /// [`crate::StoreError::MailboxFull`] and nothing is stored. Receipts and group system
    /// events are not bounded by it, only user messages.
    pub mailbox: MailboxLimit,
}

impl NewMessage {
    /// The stored message this post becomes in `conversation` at `seq`.
    pub fn record(&self, conversation: Conversation, seq: u64) -> MessageRecord {
        MessageRecord {
            conversation,
            seq,
            kind: MessageKind::User,
            sender_user: self.sender.user_id,
            sender_username: self.sender.username.clone(),
            sender_device: self.sender.device_id,
            client_msg_id: self.client_msg_id.clone(),
            server_ts_ms: self.now_ms,
            body: Arc::from(&self.body[..]),
        }
    }
}

/// A stored message as a device receives it. Shared (`Arc`) between the deliveries of one post.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageRecord {
    pub conversation: Conversation,
    pub seq: u64,
    pub kind: MessageKind,
    pub sender_user: UserId,
    pub sender_username: String,
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
    pub reader_username: String,
    pub kind: ReceiptKind,
    pub up_to_seq: u64,
    /// The receiving user's ticks: every other participant has delivered / read up to here.
    pub all_delivered_up_to: u64,
    pub all_read_up_to: u64,
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

/// A media object's id: the SHA-256 of its bytes.
pub type MediaHash = [u8; 32];

/// Quota settings passed with the media calls that may charge a user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MediaLimits {
    /// Bytes a user may hold: referenced objects plus incomplete uploads.
    pub quota_bytes: u64,
    /// Incomplete uploads a user may have at once.
    pub max_uploads: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewUpload {
    /// Random, unguessable (it is part of the upload's URL).
    pub id: String,
    pub user: UserId,
    pub length: u64,
    /// The object id the bytes must hash to, if the client declared it.
    pub expected: Option<MediaHash>,
    pub now_ms: i64,
    pub expires_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadRecord {
    pub id: String,
    pub user: UserId,
    pub length: u64,
    pub expected: Option<MediaHash>,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
    /// Set once the upload completed.
    pub media: Option<MediaHash>,
    /// Bytes durably staged, as last recorded by [`crate::Store::advance_upload`] (a server
    /// that stages uploads on its own disk knows its offset from there and leaves this 0).
    pub received: u64,
    /// How the received bytes are staged, opaque to the store (see `advance_upload`).
    pub staging: Option<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaRecord {
    pub id: MediaHash,
    pub size: u64,
    pub created_at_ms: i64,
}

/// A user's reference to an object, as granted by an upload or a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaGrant {
    pub id: MediaHash,
    pub size: u64,
    pub expires_at_ms: i64,
    /// Whether this call stored the object (false: it existed already).
    pub created: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MediaGarbage {
    pub expired_uploads: Vec<String>,
    pub unreferenced: Vec<MediaHash>,
}

/// A device's identity keys, stored opaquely (the server never interprets keys).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityKeysRecord {
    pub curve25519: String,
    pub ed25519: String,
    pub signature: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedKeyRecord {
    pub id: String,
    pub key: String,
    pub signature: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyUpload {
    pub identity: Option<IdentityKeysRecord>,
    pub one_time_keys: Vec<SignedKeyRecord>,
    pub fallback_key: Option<SignedKeyRecord>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyCountRecord {
    pub one_time_keys: u64,
    pub fallback_key_used: bool,
}

/// A device's Web Push subscription (RFC 8030 endpoint, RFC 8291 keys), as the device gave it.
#[derive(Clone, PartialEq, Eq)]
pub struct PushSubscription {
    pub endpoint: String,
    /// The device's P-256 public key, uncompressed (65 bytes).
    pub p256dh: Vec<u8>,
    /// The authentication secret (16 bytes).
    pub auth: Vec<u8>,
    pub updated_ms: i64,
    /// When the subscription lapses (a browser's `expirationTime`): no push after it.
    pub expires_ms: Option<i64>,
}

impl std::fmt::Debug for PushSubscription {
    // The endpoint is a capability (whoever knows it can wake the device): not for logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushSubscription")
            .field("endpoint", &"***")
            .field("updated_ms", &self.updated_ms)
            .finish_non_exhaustive()
    }
}

/// When a device may be woken by a push again (PROTOCOL.md §10). Times in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PushRules {
    /// At most one push per device per window.
    pub window_ms: i64,
    /// A push the push service took, answered by no connection, counts as lost after this
    /// (the push service's TTL): another may be sent.
    pub unanswered_ms: i64,
    /// A claimed push its sender never settled counts as abandoned after this (the sender
    /// died mid-way): it may be claimed again.
    pub abandoned_ms: i64,
}

/// What a device's last push was, as the store keeps it beside its subscription.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PushState {
    /// The newest message entry the last push announced; `None` once a failed push is
    /// released (or before the first).
    pub pushed_mseq: Option<u64>,
    /// When the last push was claimed.
    pub pushed_ms: Option<i64>,
    /// Whether the push service took it.
    pub confirmed: bool,
}

/// The answer to [`crate::Store::claim_push`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushClaim {
    /// Nothing to send: no subscription, no message waiting, or the last push is still
    /// unanswered (the device has not collected what it announced).
    Nothing,
    /// Too soon after the last push: ask again at `at_ms`.
    NotBefore { at_ms: i64 },
    /// Claimed: wake `subscription` (announcing `waiting` messages), then settle `mseq`.
    /// `since_ms`: when the oldest message no earlier push announced arrived (for the
    /// message-to-push delay; `None` when this push repeats one counted as lost).
    Send {
        subscription: PushSubscription,
        mseq: u64,
        waiting: u32,
        since_ms: Option<i64>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceKeysRecord {
    pub device: DeviceId,
    pub identity: Option<IdentityKeysRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimedKeyRecord {
    pub user: UserId,
    pub device: DeviceId,
    pub key: SignedKeyRecord,
    pub fallback: bool,
}
