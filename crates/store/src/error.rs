use crate::{DeviceId, UserId};

/// What a store call can fail with. Domain outcomes first, then infrastructure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("username is taken")]
    UsernameTaken,
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("the limit of {0} devices is reached")]
    DeviceLimit(usize),
    #[error("addressed devices do not match: missing {missing:?}, extra {extra:?}")]
    DeviceMismatch {
        missing: Vec<DeviceId>,
        extra: Vec<DeviceId>,
    },
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("not allowed: {0}")]
    Forbidden(String),
    #[error("the group is full ({0} members)")]
    GroupFull(usize),
    #[error("media quota exceeded: {used} of {quota} bytes in use, {wanted} more wanted")]
    QuotaExceeded { used: u64, wanted: u64, quota: u64 },
    #[error("the limit of {0} incomplete uploads is reached")]
    UploadLimit(usize),
    #[error("the device's identity keys are already set to different keys")]
    IdentityKeysChanged,
    #[error("the limit of {0} unclaimed one-time keys per device is reached")]
    KeyLimit(usize),
    #[error("the mailbox of a device of user {user} is full")]
    MailboxFull { user: UserId, device: DeviceId },
    /// The database failed in a way a retry will not mend (or found data it cannot read).
    /// `backend` names it: "sqlite", "postgres".
    #[error("{backend} error: {message}")]
    Database {
        backend: &'static str,
        message: String,
    },
    /// The database cannot be reached now (connection lost, no connection free in time, a
    /// statement timed out, writes kept conflicting): nothing was written; retry later.
    #[error("{backend} unavailable: {message}")]
    Unavailable {
        backend: &'static str,
        message: String,
    },
    /// Concurrent writes kept conflicting (deadlocks, serialisation failures) and the backend
    /// gave up retrying: nothing was written; retry later.
    #[error("{backend}: concurrent writes kept conflicting")]
    Contended { backend: &'static str },
    #[error("the store is closed")]
    Closed,
}
