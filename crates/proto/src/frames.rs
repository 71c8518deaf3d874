//! Socket frames. Every WebSocket binary message is exactly one [`ClientFrame`] (client to server)
//! or one [`ServerFrame`] (server to client), protobuf-encoded.
//!
//! A client request carries a non-zero `request_id`; the server's answer (`Sent`, `Done`, `Pong`
//! or `Error`) echoes it. Server-initiated frames (`Event`, `Synced`) have `request_id == 0`;
//! an `Event` carries the device's mailbox sequence number, which the client acknowledges
//! cumulatively with `Ack`.

use prost::Message as _;

/// Client to server.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ClientFrame {
    #[prost(uint64, tag = "1")]
    pub request_id: u64,
    #[prost(oneof = "client_frame::Kind", tags = "2, 3, 4, 5, 6")]
    pub kind: Option<client_frame::Kind>,
}

pub mod client_frame {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Kind {
        #[prost(message, tag = "2")]
        Hello(super::Hello),
        #[prost(message, tag = "3")]
        Send(super::Send),
        #[prost(message, tag = "4")]
        Ack(super::Ack),
        #[prost(message, tag = "5")]
        Read(super::Read),
        #[prost(message, tag = "6")]
        Ping(super::Ping),
    }
}

/// Server to client.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ServerFrame {
    #[prost(uint64, tag = "1")]
    pub request_id: u64,
    #[prost(oneof = "server_frame::Kind", tags = "2, 3, 4, 5, 6, 7, 8")]
    pub kind: Option<server_frame::Kind>,
}

pub mod server_frame {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Kind {
        #[prost(message, tag = "2")]
        Welcome(super::Welcome),
        #[prost(message, tag = "3")]
        Sent(super::Sent),
        #[prost(message, tag = "4")]
        Done(super::Done),
        #[prost(message, tag = "5")]
        Pong(super::Pong),
        #[prost(message, tag = "6")]
        Error(super::Error),
        #[prost(message, tag = "7")]
        Event(super::Event),
        #[prost(message, tag = "8")]
        Synced(super::Synced),
    }
}

/// The first frame on a connection: protocol version and the device's access token.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Hello {
    #[prost(uint32, tag = "1")]
    pub protocol_version: u32,
    #[prost(string, tag = "2")]
    pub token: String,
}

/// The answer to a good `Hello`. After it the server drains the device's mailbox and then sends
/// `Synced`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Welcome {
    #[prost(uint32, tag = "1")]
    pub protocol_version: u32,
    #[prost(uint64, tag = "2")]
    pub user_id: u64,
    #[prost(string, tag = "3")]
    pub username: String,
    #[prost(uint64, tag = "4")]
    pub device_id: u64,
    #[prost(int64, tag = "5")]
    pub server_time_ms: i64,
    #[prost(uint32, tag = "6")]
    pub heartbeat_secs: u32,
    #[prost(uint32, tag = "7")]
    pub max_frame_bytes: u32,
    #[prost(uint32, tag = "8")]
    pub max_body_bytes: u32,
}

/// Who a conversation is with, as seen by the device receiving the frame. A direct conversation
/// is named by the other user's id (for a device of user A, the chat with B is `user = B`).
#[derive(Clone, PartialEq, Eq, Hash, prost::Message)]
pub struct Peer {
    #[prost(oneof = "peer::Kind", tags = "1, 2")]
    pub kind: Option<peer::Kind>,
}

pub mod peer {
    #[derive(Clone, Copy, PartialEq, Eq, Hash, prost::Oneof)]
    pub enum Kind {
        /// The direct conversation with this user.
        #[prost(uint64, tag = "1")]
        User(u64),
        /// The group with this id.
        #[prost(uint64, tag = "2")]
        Group(u64),
    }
}

impl Peer {
    pub fn user(id: u64) -> Peer {
        Peer {
            kind: Some(peer::Kind::User(id)),
        }
    }

    pub fn group(id: u64) -> Peer {
        Peer {
            kind: Some(peer::Kind::Group(id)),
        }
    }
}

/// One addressed device of a `Send`, with an optional body of its own (end-to-end encryption
/// encrypts separately for each device). Without one, the device gets `Send.body`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DeviceBody {
    #[prost(uint64, tag = "1")]
    pub device_id: u64,
    #[prost(bytes = "vec", optional, tag = "2")]
    pub body: Option<Vec<u8>>,
}

/// Post a message. To a user: `devices` must list exactly the recipient's current devices plus
/// the sender's own other devices; otherwise the answer is `Error{DEVICE_MISMATCH}` with the
/// missing and extra ids. To a group: `devices` empty (the server fans the one body out to every
/// member device), or exactly every member device but the sending one, checked like a direct
/// message, each optionally with its own body. Retrying with the same `client_msg_id` is safe
/// (idempotent).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Send {
    #[prost(string, tag = "1")]
    pub client_msg_id: String,
    #[prost(message, optional, tag = "2")]
    pub to: Option<Peer>,
    #[prost(bytes = "vec", tag = "3")]
    pub body: Vec<u8>,
    #[prost(message, repeated, tag = "4")]
    pub devices: Vec<DeviceBody>,
}

/// The single tick: the message is durably stored with sequence number `seq` in its conversation.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Sent {
    #[prost(string, tag = "1")]
    pub client_msg_id: String,
    #[prost(uint64, tag = "2")]
    pub seq: u64,
    #[prost(int64, tag = "3")]
    pub server_ts_ms: i64,
}

/// Cumulative acknowledgement: every event with `mailbox_seq <= up_to` has been stored by the
/// client and may leave the server.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Ack {
    #[prost(uint64, tag = "1")]
    pub up_to: u64,
}

/// The user has read the conversation up to and including `up_to_seq`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Read {
    #[prost(message, optional, tag = "1")]
    pub conversation: Option<Peer>,
    #[prost(uint64, tag = "2")]
    pub up_to_seq: u64,
}

/// The application heartbeat. It keeps the connection alive and updates last seen.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Ping {
    #[prost(int64, tag = "1")]
    pub client_time_ms: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Pong {
    #[prost(int64, tag = "1")]
    pub server_time_ms: i64,
}

/// A request succeeded and has nothing more to say (`Ack`, `Read`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Done {}

/// A request failed. `code` is an [`crate::ErrorCode`] as a number. For `DEVICE_MISMATCH`,
/// `missing_devices` and `extra_devices` say how the addressed set differs from the current one.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Error {
    #[prost(int32, tag = "1")]
    pub code: i32,
    #[prost(string, tag = "2")]
    pub message: String,
    #[prost(uint64, repeated, tag = "3")]
    pub missing_devices: Vec<u64>,
    #[prost(uint64, repeated, tag = "4")]
    pub extra_devices: Vec<u64>,
    /// With `rate_limited` and `mailbox_full`: milliseconds to wait before retrying (0: not
    /// said).
    #[prost(uint64, tag = "5")]
    pub retry_after_ms: u64,
}

/// Something from the device's mailbox. Acknowledge it with `Ack{up_to: mailbox_seq}`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    #[prost(uint64, tag = "1")]
    pub mailbox_seq: u64,
    #[prost(oneof = "event::Kind", tags = "2, 3")]
    pub kind: Option<event::Kind>,
}

pub mod event {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Kind {
        #[prost(message, tag = "2")]
        Message(super::Message),
        #[prost(message, tag = "3")]
        Receipt(super::Receipt),
    }
}

/// A message in a conversation, delivered to a recipient device or, as a copy, to the sender's
/// other devices.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Message {
    #[prost(message, optional, tag = "1")]
    pub conversation: Option<Peer>,
    /// For a direct conversation: the other user's username.
    #[prost(string, tag = "2")]
    pub peer_username: String,
    #[prost(uint64, tag = "3")]
    pub seq: u64,
    #[prost(uint64, tag = "4")]
    pub sender_user: u64,
    #[prost(string, tag = "5")]
    pub sender_username: String,
    #[prost(uint64, tag = "6")]
    pub sender_device: u64,
    #[prost(string, tag = "7")]
    pub client_msg_id: String,
    #[prost(int64, tag = "8")]
    pub server_ts_ms: i64,
    /// For `kind == USER` the sender's opaque bytes; for `kind == SYSTEM` an encoded
    /// [`GroupEvent`] written by the server.
    #[prost(bytes = "vec", tag = "9")]
    pub body: Vec<u8>,
    #[prost(enumeration = "MessageKind", tag = "10")]
    pub kind: i32,
    /// For a group: its name when the message was delivered.
    #[prost(string, tag = "11")]
    pub group_name: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum MessageKind {
    /// Written by a user; the server never parses the body.
    User = 0,
    /// A group membership or settings change, written by the server; the body is a
    /// [`GroupEvent`].
    System = 1,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum GroupAction {
    Unspecified = 0,
    Created = 1,
    Added = 2,
    Removed = 3,
    Left = 4,
    Promoted = 5,
    Demoted = 6,
    Renamed = 7,
    SettingsChanged = 8,
    Described = 9,
}

/// A user named in a [`GroupEvent`].
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct UserRef {
    #[prost(uint64, tag = "1")]
    pub user_id: u64,
    #[prost(string, tag = "2")]
    pub username: String,
}

/// The body of a system message: who changed what in the group. Every member sees the same
/// sequence of these, so each knows who was in the group at every point of its history.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct GroupEvent {
    #[prost(enumeration = "GroupAction", tag = "1")]
    pub action: i32,
    #[prost(message, optional, tag = "2")]
    pub actor: Option<UserRef>,
    /// The members added, removed, promoted or demoted (the actor itself for `LEFT`).
    #[prost(message, repeated, tag = "3")]
    pub targets: Vec<UserRef>,
    /// The group's name after the event.
    #[prost(string, tag = "4")]
    pub name: String,
    /// Whether every member may add members, after the event.
    #[prost(bool, tag = "5")]
    pub members_can_add: bool,
    /// The group's description after the event.
    #[prost(string, tag = "6")]
    pub description: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum ReceiptKind {
    Unspecified = 0,
    /// A device of `reader_user` has stored the messages up to `up_to_seq`.
    Delivered = 1,
    /// `reader_user` has read the messages up to `up_to_seq`.
    Read = 2,
}

/// A watermark: `reader_user` has the conversation's messages up to `up_to_seq` delivered (or
/// read). Watermarks only grow; a client keeps the largest it has seen. `all_*` say what every
/// other participant has, which is what the sender's ticks show.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Receipt {
    #[prost(message, optional, tag = "1")]
    pub conversation: Option<Peer>,
    #[prost(string, tag = "2")]
    pub peer_username: String,
    #[prost(uint64, tag = "3")]
    pub reader_user: u64,
    #[prost(string, tag = "4")]
    pub reader_username: String,
    #[prost(enumeration = "ReceiptKind", tag = "5")]
    pub kind: i32,
    #[prost(uint64, tag = "6")]
    pub up_to_seq: u64,
    #[prost(int64, tag = "7")]
    pub server_ts_ms: i64,
    /// The ticks of the receiving user's own messages in this conversation: every other member
    /// (in a direct conversation: the peer) has delivered / read up to these sequence numbers.
    #[prost(uint64, tag = "8")]
    pub all_delivered_up_to: u64,
    #[prost(uint64, tag = "9")]
    pub all_read_up_to: u64,
}

/// The mailbox has been drained: every event stored before the connection was established has
/// been sent (`up_to` is the last mailbox sequence sent). Later events arrive live.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Synced {
    #[prost(uint64, tag = "1")]
    pub up_to: u64,
}

/// Why a frame could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("frame of {size} bytes exceeds the limit of {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("malformed frame: {0}")]
    Malformed(#[from] prost::DecodeError),
    #[error("frame has no content")]
    Empty,
}

impl ClientFrame {
    /// Decodes one client frame, refusing frames over `limit` bytes and frames without content.
    pub fn decode_frame(buf: &[u8], limit: usize) -> Result<ClientFrame, DecodeError> {
        if buf.len() > limit {
            return Err(DecodeError::TooLarge {
                size: buf.len(),
                limit,
            });
        }
        let frame = ClientFrame::decode(buf)?;
        if frame.kind.is_none() {
            return Err(DecodeError::Empty);
        }
        Ok(frame)
    }
}

impl ServerFrame {
    /// Decodes one server frame (client side). The server is trusted for sizes only up to
    /// `limit` bytes.
    pub fn decode_frame(buf: &[u8], limit: usize) -> Result<ServerFrame, DecodeError> {
        if buf.len() > limit {
            return Err(DecodeError::TooLarge {
                size: buf.len(),
                limit,
            });
        }
        let frame = ServerFrame::decode(buf)?;
        if frame.kind.is_none() {
            return Err(DecodeError::Empty);
        }
        Ok(frame)
    }

    pub fn error(request_id: u64, code: crate::ErrorCode, message: impl Into<String>) -> Self {
        ServerFrame {
            request_id,
            kind: Some(server_frame::Kind::Error(Error {
                code: code as i32,
                message: message.into(),
                missing_devices: Vec::new(),
                extra_devices: Vec::new(),
                retry_after_ms: 0,
            })),
        }
    }
}
