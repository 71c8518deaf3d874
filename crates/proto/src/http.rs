//! JSON bodies of the HTTP API (`/v1/...`). Field names are the wire names.

use serde::{Deserialize, Serialize};

use crate::ErrorCode;

/// `POST /v1/accounts`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    pub username: String,
    pub password: String,
}

/// `201` answer to `POST /v1/accounts`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RegisterResponse {
    pub user_id: u64,
    pub username: String,
}

/// `POST /v1/sessions`: log in, creating a new device.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    pub username: String,
    pub password: String,
    /// A human name for the new device ("laptop", "cli@host").
    #[serde(default)]
    pub device_name: String,
}

/// `201` answer to `POST /v1/sessions`. The token is shown once; the server keeps only its hash.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LoginResponse {
    pub user_id: u64,
    pub username: String,
    pub device_id: u64,
    pub token: String,
}

/// One of the caller's own devices (`GET /v1/devices`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeviceInfo {
    pub device_id: u64,
    pub name: String,
    pub created_at_ms: i64,
    pub last_seen_ms: Option<i64>,
    /// True for the device whose token made the request.
    pub current: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DevicesResponse {
    pub devices: Vec<DeviceInfo>,
}

/// `GET /v1/users/{username}/devices`: the ids a `Send` to this user must address.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct UserDevicesResponse {
    pub user_id: u64,
    pub username: String,
    pub devices: Vec<u64>,
}

/// Who may see a user's last seen.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Visibility {
    #[default]
    Everyone,
    /// Users with whom the owner shares a direct conversation.
    Contacts,
    Nobody,
}

impl Visibility {
    pub fn as_str(self) -> &'static str {
        match self {
            Visibility::Everyone => "everyone",
            Visibility::Contacts => "contacts",
            Visibility::Nobody => "nobody",
        }
    }

    pub fn parse(s: &str) -> Option<Visibility> {
        match s {
            "everyone" => Some(Visibility::Everyone),
            "contacts" => Some(Visibility::Contacts),
            "nobody" => Some(Visibility::Nobody),
            _ => None,
        }
    }
}

/// `GET` / `PUT /v1/settings/privacy`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PrivacySettings {
    pub last_seen: Visibility,
}

/// `GET /v1/users/{username}/last-seen`. `visible == false` means the privacy settings (the
/// target's or, reciprocally, the caller's) hide it; then `online` and `last_seen_ms` are empty.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LastSeenResponse {
    pub username: String,
    pub visible: bool,
    pub online: bool,
    pub last_seen_ms: Option<i64>,
}

/// Every HTTP error answer: `{"error": {...}}` with the status of [`ErrorCode::http_status`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorDetail {
    pub code: ErrorCode,
    pub message: String,
    /// Seconds to wait before retrying, with `rate_limited`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_secs: Option<u64>,
}

/// A member's role in a group.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Member,
    Admin,
    /// The creator (or whoever inherited the group when the owner left). Also an admin.
    Owner,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Member => "member",
            Role::Admin => "admin",
            Role::Owner => "owner",
        }
    }

    pub fn is_admin(self) -> bool {
        self != Role::Member
    }
}

/// `POST /v1/groups`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateGroupRequest {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Usernames of the first members besides the creator.
    #[serde(default)]
    pub members: Vec<String>,
    /// Whether every member may add members (default: admins only).
    #[serde(default)]
    pub members_can_add: bool,
}

/// `PATCH /v1/groups/{id}`: change the name and/or the settings (admins only).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct UpdateGroupRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub members_can_add: Option<bool>,
}

/// `POST /v1/groups/{id}/members`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddMembersRequest {
    pub members: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GroupMember {
    pub user_id: u64,
    pub username: String,
    pub role: Role,
    /// The group sequence number of the event that added this member.
    pub joined_seq: u64,
}

/// A group as its members see it (`GET /v1/groups/{id}`, and the answer to every change).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GroupInfo {
    pub group_id: u64,
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub members_can_add: bool,
    pub created_at_ms: i64,
    pub members: Vec<GroupMember>,
    /// The sequence number of the last message or event in the group.
    pub last_seq: u64,
}

/// One line of `GET /v1/groups`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GroupSummary {
    pub group_id: u64,
    pub name: String,
    pub role: Role,
    pub member_count: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GroupsResponse {
    pub groups: Vec<GroupSummary>,
}

/// One member's state for one message, in [`MessageInfo`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MemberReceipt {
    pub user_id: u64,
    pub username: String,
    pub delivered: bool,
    pub read: bool,
}

/// `GET /v1/groups/{id}/messages/{seq}`: WhatsApp's message info, for the message's sender.
/// Lists the current members who were in the group when the message was sent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MessageInfo {
    pub group_id: u64,
    pub seq: u64,
    pub members: Vec<MemberReceipt>,
    pub delivered_to_all: bool,
    pub read_by_all: bool,
}

/// `PUT /v1/media/{id}` and `POST /v1/media/{id}/claim`: the object and the caller's reference.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MediaObject {
    /// Lowercase hex SHA-256 of the object's bytes.
    pub id: String,
    pub size: u64,
    /// When the caller's reference lapses unless renewed by another claim.
    pub expires_at_ms: u64,
}

// --- key directory (end-to-end encryption; the server stores public keys, opaquely) ---

/// A device's long-term identity keys (unpadded base64, as vodozemac prints them) and the
/// device's Ed25519 signature binding them to its user and device ids (PROTOCOL.md §9).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityKeys {
    pub curve25519: String,
    pub ed25519: String,
    pub signature: String,
}

/// A one-time or fallback Curve25519 key, signed with the device's Ed25519 key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedKey {
    pub id: String,
    pub key: String,
    pub signature: String,
}

/// `PUT /v1/keys`: publish the calling device's keys. Every part is optional; identity keys
/// can be set once and never change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysUpload {
    #[serde(default)]
    pub identity: Option<IdentityKeys>,
    #[serde(default)]
    pub one_time_keys: Vec<SignedKey>,
    #[serde(default)]
    pub fallback_key: Option<SignedKey>,
}

/// `GET`/`PUT /v1/keys`: how many one-time keys of the calling device wait unclaimed, and
/// whether its fallback key has been handed out since it was last replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyCounts {
    pub one_time_keys: u64,
    pub fallback_key_used: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceKeys {
    pub device_id: u64,
    /// `None` for a device that has not published keys yet (it cannot receive encrypted
    /// messages until it does).
    pub identity: Option<IdentityKeys>,
}

/// `GET /v1/users/{username}/keys`: every current device of the user with its identity keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserKeys {
    pub user_id: u64,
    pub username: String,
    pub devices: Vec<DeviceKeys>,
}

/// `GET /v1/groups/{id}/keys`: every member of the group with its devices' identity keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupKeys {
    pub group_id: u64,
    pub members: Vec<UserKeys>,
}

/// `POST /v1/keys/claim`: one key per listed device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimRequest {
    pub devices: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimedKey {
    pub user_id: u64,
    pub device_id: u64,
    pub key: SignedKey,
    /// The device had no one-time key left: this is its fallback key (not consumed).
    pub fallback: bool,
}

/// Devices with no keys at all (or that do not exist) are left out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimResponse {
    pub keys: Vec<ClaimedKey>,
}

/// `PUT /v1/devices/{id}/push`: the device's Web Push subscription, in the shape of a browser's
/// `PushSubscription.toJSON()` (UnifiedPush distributors give the same three values).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PushSubscriptionRequest {
    /// The push service URL the server posts to (RFC 8030).
    pub endpoint: String,
    /// Milliseconds since the epoch when the subscription lapses, if the browser says.
    #[serde(
        default,
        rename = "expirationTime",
        skip_serializing_if = "Option::is_none"
    )]
    pub expiration_time: Option<u64>,
    pub keys: PushKeys,
}

/// The subscription's keys for RFC 8291 message encryption, unpadded base64url.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PushKeys {
    /// The device's P-256 public key, uncompressed (65 bytes).
    pub p256dh: String,
    /// The authentication secret (16 bytes).
    pub auth: String,
}

/// `GET`/`PUT /v1/devices/{id}/push`: what the server keeps of the subscription (the endpoint
/// itself is not repeated: it is a capability).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PushSubscriptionResponse {
    /// The push service's origin (`scheme://host[:port]`).
    pub origin: String,
    pub updated_at_ms: i64,
}

/// `GET /v1/push/vapid`: the server's VAPID public key (a browser's `applicationServerKey`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VapidResponse {
    /// Uncompressed P-256 point, unpadded base64url.
    pub public_key: String,
}

/// `GET /v1/calls/turn`: credentials for the TURN server, in the TURN REST API's shape
/// (`username` = expiry in Unix seconds `:` user id, `password` = base64 of the HMAC-SHA1 of
/// the username under the secret the TURN server shares), valid `ttl` seconds, for `uris`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TurnCredentials {
    pub username: String,
    pub password: String,
    pub ttl: u64,
    pub uris: Vec<String>,
}
