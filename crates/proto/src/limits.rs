//! Protocol constants and default limits. The server reads its effective limits from its
//! configuration (defaults below); clients may learn them from the `Welcome` frame.

use serde::{Deserialize, Serialize};

/// Version of the socket protocol. A `Hello` with another version is refused with
/// [`crate::ErrorCode::UnsupportedVersion`].
pub const PROTOCOL_VERSION: u32 = 1;

/// Longest `client_msg_id` in bytes.
pub const MAX_CLIENT_MSG_ID_BYTES: usize = 64;
/// Username length bounds (bytes; usernames are ASCII).
pub const USERNAME_MIN: usize = 3;
pub const USERNAME_MAX: usize = 32;
/// Password length bounds (bytes). The upper bound keeps argon2 input bounded.
pub const PASSWORD_MIN: usize = 8;
pub const PASSWORD_MAX: usize = 1024;
/// Longest device name in bytes.
pub const DEVICE_NAME_MAX: usize = 64;
/// Longest group name in bytes.
pub const GROUP_NAME_MAX: usize = 100;
/// Longest group description in bytes.
pub const GROUP_DESCRIPTION_MAX: usize = 512;

/// Limits a server enforces. Every size the server accepts is bounded by one of these.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest WebSocket frame (and message) the server reads, in bytes.
    pub max_frame_bytes: usize,
    /// Largest message body (shared or per device), in bytes.
    pub max_body_bytes: usize,
    /// Most devices one user may have at once.
    pub max_devices_per_user: usize,
    /// Envelopes queued for one connection before it is closed as a slow consumer.
    pub outbound_queue: usize,
    /// Largest HTTP request body, in bytes.
    pub max_http_body_bytes: usize,
    /// Seconds between client heartbeats the server asks for in `Welcome`.
    pub heartbeat_secs: u32,
    /// Seconds of silence after which the server closes a connection.
    pub idle_timeout_secs: u32,
    /// Seconds a new connection has to send `Hello`.
    pub handshake_timeout_secs: u32,
    /// Seconds one frame may take to be written to a client before the connection is dropped
    /// (a client that stops reading must not hold a connection task forever).
    pub send_timeout_secs: u32,
    /// Most members of one group.
    pub max_group_members: usize,
    /// One-time keys a device may have published and unclaimed at once (and per upload).
    pub max_one_time_keys: usize,
    /// Devices whose keys one `POST /v1/keys/claim` may claim.
    pub max_key_claims: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_bytes: 64 * 1024,
            max_body_bytes: 16 * 1024,
            max_devices_per_user: 16,
            outbound_queue: 1024,
            max_http_body_bytes: 64 * 1024,
            heartbeat_secs: 25,
            idle_timeout_secs: 75,
            handshake_timeout_secs: 10,
            send_timeout_secs: 10,
            max_group_members: 1024,
            max_one_time_keys: 100,
            max_key_claims: 256,
        }
    }
}
