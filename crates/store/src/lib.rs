//! Storage for tern, behind messaging-shaped traits.
//!
//! Services never see SQL: they call [`Store`] methods that say what happens in the messenger
//! ("post a message to these devices", "acknowledge a device's mailbox up to n", "mark read").
//! Each method is one transaction, so every invariant below holds after each call, whatever the
//! backend:
//!
//! - a message and the mailbox entries of every device it goes to commit together, or not at all;
//! - `seq` is consecutive per conversation; `mseq` is consecutive per device mailbox;
//! - `(sender_device, client_msg_id)` identifies a post: posting it again returns the first answer;
//! - receipt watermarks only grow;
//! - a removed device has no token, no mailbox and cannot be addressed;
//! - **the cursor contract**: the entries of one device's mailbox become visible to
//!   [`Store::mailbox_after`] in `mseq` order, and once an entry is visible every entry below it
//!   is visible too, however many writers append at once. The gateway follows a mailbox with a
//!   cursor (the highest `mseq` it sent) and fills gaps from the store; an entry that appeared
//!   after one above it would be skipped for good.
//!
//! Backends: [`sqlite::SqliteStore`] (the embedded default: one writer thread, group commit) and
//! [`postgres::PgStore`] (several writers: pool connections and nodes), behind the cargo features
//! `sqlite` and `postgres`, both in the default build. The conformance suite in
//! `tests/conformance.rs` is written against the trait and runs on both.

mod error;
pub mod logic;
#[cfg(feature = "postgres")]
pub mod postgres;
mod records;
#[cfg(feature = "sqlite")]
pub mod sqlite;

pub use error::StoreError;
pub use records::*;

use async_trait::async_trait;

/// Everything the server stores. Implementations must be cheap to share (`Arc<dyn Store>`).
#[async_trait]
pub trait Store: Send + Sync + 'static {
    // --- accounts and devices ---

    /// Creates a user. [`StoreError::UsernameTaken`] if the (lowercased) name exists.
    async fn create_user(
        &self,
        username: &str,
        password_hash: &str,
        now_ms: i64,
    ) -> Result<UserId, StoreError>;

    async fn user_by_name(&self, username: &str) -> Result<Option<UserRecord>, StoreError>;

    /// Creates a device with the hash of its access token. [`StoreError::DeviceLimit`] if the user
    /// already has `max_devices`.
    async fn create_device(
        &self,
        user: UserId,
        name: &str,
        token_hash: &[u8],
        max_devices: usize,
        now_ms: i64,
    ) -> Result<DeviceId, StoreError>;

    /// The device (and its user) that holds the token with this hash.
    async fn device_by_token(&self, token_hash: &[u8]) -> Result<Option<DeviceAuth>, StoreError>;

    /// The user's devices, ordered by id.
    async fn list_devices(&self, user: UserId) -> Result<Vec<DeviceRecord>, StoreError>;

    /// Removes a device of `user`: its token, its mailbox. `NotFound` if it is not theirs.
    async fn remove_device(&self, user: UserId, device: DeviceId) -> Result<(), StoreError>;

    async fn set_last_seen_privacy(&self, user: UserId, v: Visibility) -> Result<(), StoreError>;

    /// Whether the two users share a direct conversation.
    async fn are_contacts(&self, a: UserId, b: UserId) -> Result<bool, StoreError>;

    /// Persists a batch of last-seen times (the newest wins), in one transaction.
    async fn save_last_seen(&self, batch: Vec<LastSeenUpdate>) -> Result<(), StoreError>;

    // --- messaging ---

    /// Stores a message and its mailbox entries in one transaction. To a user: after checking
    /// that `post.devices` is exactly the recipient's devices plus the sender's other devices.
    /// To a group: after checking membership; every member device but the sending one gets an
    /// entry referencing the one stored body.
    async fn post_message(&self, post: NewMessage) -> Result<PostOutcome, StoreError> {
        self.post_messages(vec![post])
            .await?
            .pop()
            .unwrap_or(Err(StoreError::Database {
                backend: "store",
                message: "no outcome for a post".into(),
            }))
    }

    /// Stores several posts in order, each as if by `post_message`: one outcome per post, and a
    /// refused post changes nothing and does not affect the others. This is how one device's
    /// pipelined sends reach the store together. Both backends commit them in one transaction
    /// with the posts of other calls made meanwhile (group commit): SQLite's writer thread,
    /// PostgreSQL's writer tasks. A failure of that transaction (`Err` of the call, or the same
    /// error for each post) stores none of them.
    async fn post_messages(
        &self,
        posts: Vec<NewMessage>,
    ) -> Result<Vec<Result<PostOutcome, StoreError>>, StoreError>;

    /// Up to `limit` entries of a device's mailbox with `mseq > after`, in order.
    async fn mailbox_after(
        &self,
        device: DeviceId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<MailboxEntry>, StoreError>;

    /// Removes a device's mailbox entries up to `up_to` and advances the user's delivered
    /// watermarks; returns the receipt entries this produced for other devices.
    async fn ack(
        &self,
        who: DeviceAuth,
        up_to: u64,
        now_ms: i64,
    ) -> Result<Vec<Delivery>, StoreError>;

    /// Advances `who`'s read watermark in a conversation; returns the receipt entries for the
    /// senders of the newly read messages (in a direct conversation: the peer) and for `who`'s
    /// other devices (none if the watermark did not grow).
    async fn mark_read(
        &self,
        who: DeviceAuth,
        conversation: Target,
        up_to_seq: u64,
        now_ms: i64,
    ) -> Result<Vec<Delivery>, StoreError>;

    // --- groups ---

    /// Creates a group owned by `creator` with `members` (the creator is added if missing),
    /// and its `CREATED` system message. [`StoreError::GroupFull`] past `max_members`.
    async fn create_group(&self, group: NewGroup) -> Result<GroupChange, StoreError>;

    /// Applies a change by a member, after checking its rights (`logic::authorize`), and writes
    /// one system message per change into the group's sequence. Non-members get
    /// `NotFound("group")`.
    async fn change_group(
        &self,
        actor: DeviceAuth,
        group: GroupId,
        op: GroupOp,
        max_members: usize,
        now_ms: i64,
    ) -> Result<GroupChange, StoreError>;

    async fn group(&self, group: GroupId) -> Result<Option<GroupRecord>, StoreError>;

    /// The user's groups (at most `limit`).
    async fn groups_of(
        &self,
        user: UserId,
        limit: usize,
    ) -> Result<Vec<GroupSummaryRecord>, StoreError>;

    /// Who has message `seq` of a group delivered and read.
    async fn message_info(
        &self,
        group: GroupId,
        seq: u64,
    ) -> Result<Option<MessageInfoRecord>, StoreError>;

    // --- media (metadata only; the bytes live in the server's blob store) ---

    /// Reserves an incomplete upload of `length` bytes for its user, after checking the user's
    /// quota ([`StoreError::QuotaExceeded`]: referenced objects plus incomplete uploads) and
    /// count of incomplete uploads ([`StoreError::UploadLimit`]).
    async fn create_upload(&self, upload: NewUpload, limits: MediaLimits)
    -> Result<(), StoreError>;

    async fn upload(&self, id: &str) -> Result<Option<UploadRecord>, StoreError>;

    /// Records a completed upload: the object (if new), the uploader's reference (renewed to
    /// `ref_expires_at_ms` if it had one) and the upload's result, in one transaction. The upload
    /// no longer counts towards the quota as incomplete; the object does, through the reference.
    async fn finish_upload(
        &self,
        id: &str,
        media: MediaHash,
        size: u64,
        ref_expires_at_ms: i64,
        now_ms: i64,
    ) -> Result<MediaGrant, StoreError>;

    /// Forgets an upload (terminated, expired or failed). Whether it existed.
    async fn delete_upload(&self, id: &str) -> Result<bool, StoreError>;

    async fn media(&self, id: MediaHash) -> Result<Option<MediaRecord>, StoreError>;

    /// Gives `user` a reference to an existing object until `expires_at_ms` (renewing a live
    /// one), charging the quota only if it held none. `None` if the object does not exist.
    async fn claim_media(
        &self,
        id: MediaHash,
        user: UserId,
        expires_at_ms: i64,
        now_ms: i64,
        limits: MediaLimits,
    ) -> Result<Option<MediaGrant>, StoreError>;

    /// Drops `user`'s reference. Whether it had one.
    async fn drop_media_ref(&self, id: MediaHash, user: UserId) -> Result<bool, StoreError>;

    /// Garbage, oldest first, at most `limit` of each: uploads past their expiry, and objects no
    /// live reference holds.
    async fn media_garbage(&self, now_ms: i64, limit: usize) -> Result<MediaGarbage, StoreError>;

    /// Deletes an object's record if no live reference holds it (anymore); whether it did. The
    /// caller deletes the bytes only after this said yes.
    async fn forget_media(&self, id: MediaHash, now_ms: i64) -> Result<bool, StoreError>;

    /// Records that incomplete upload `id` now holds `to` bytes staged as `staging` (opaque to
    /// the store: where the bytes are and the running hash), if it still holds `from`. Whether
    /// it did: `false` means the upload is gone, complete, or was moved by another writer.
    async fn advance_upload(
        &self,
        id: &str,
        from: u64,
        to: u64,
        staging: Vec<u8>,
    ) -> Result<bool, StoreError>;

    // --- leases: exclusion between the processes sharing this store ---

    /// Takes lease `name` for `holder` until `until_ms` if it is free at `now_ms` (never taken,
    /// given up, or expired) or already `holder`'s (a renewal). Whether `holder` holds it now.
    /// A holder that dies holds its leases until they expire.
    async fn take_lease(
        &self,
        name: &str,
        holder: &str,
        now_ms: i64,
        until_ms: i64,
    ) -> Result<bool, StoreError>;

    /// Extends lease `name` to `until_ms` if `holder` holds it and it has not expired at
    /// `now_ms`; whether it did. Never takes a lease that was given up, expired or taken by
    /// another: a holder that stalled past its lease learns it lost it.
    async fn renew_lease(
        &self,
        name: &str,
        holder: &str,
        now_ms: i64,
        until_ms: i64,
    ) -> Result<bool, StoreError>;

    /// Gives lease `name` up if `holder` holds it.
    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError>;

    /// Deletes the leases that expired before `now_ms` (their holders died); how many.
    async fn forget_expired_leases(&self, now_ms: i64) -> Result<usize, StoreError>;

    // --- push ---

    /// Sets (or replaces) the push subscription of `device`; `NotFound("device")` if there is
    /// no such device.
    async fn set_push_subscription(
        &self,
        device: DeviceId,
        subscription: PushSubscription,
    ) -> Result<(), StoreError>;

    /// The push subscription of `device`, if it has one.
    async fn push_subscription(
        &self,
        device: DeviceId,
    ) -> Result<Option<PushSubscription>, StoreError>;

    /// Removes the push subscription of `device`; whether there was one. `endpoint`: only if
    /// it is still that one (a push service said it is gone, and the device may have
    /// registered a new one since).
    async fn remove_push_subscription(
        &self,
        device: DeviceId,
        endpoint: Option<&str>,
    ) -> Result<bool, StoreError>;

    /// The secret named `name`, made by the first caller: `candidate` is stored if there is
    /// none yet, and whichever value is stored is returned, the same to every process.
    async fn server_secret(&self, name: &str, candidate: Vec<u8>) -> Result<Vec<u8>, StoreError>;

    /// Claims the right to push each of `devices` now, by the rule of
    /// [`logic::push_decision`]; the answers are in the order of `devices`. A
    /// [`PushClaim::Send`] is recorded before it is returned (no other process gets the same
    /// push) and must be settled with [`Store::settle_push`].
    async fn claim_pushes(
        &self,
        devices: Vec<DeviceId>,
        now_ms: i64,
        rules: PushRules,
    ) -> Result<Vec<PushClaim>, StoreError>;

    /// Settles claims, each `(device, mseq, sent)`: the claim that announced `mseq` (nothing
    /// if a newer claim replaced it) is `sent` when the push service took the push (or refused
    /// it for good); otherwise it is released, and the next message or scan may claim again.
    async fn settle_pushes(&self, settles: Vec<(DeviceId, u64, bool)>) -> Result<(), StoreError>;

    /// Devices with a subscription that the rule may owe a push (whether they are connected
    /// is not known here), in id order after `after`, at most `limit`.
    async fn push_candidates(
        &self,
        now_ms: i64,
        rules: PushRules,
        after: DeviceId,
        limit: usize,
    ) -> Result<Vec<(UserId, DeviceId)>, StoreError>;

    // --- key directory (public keys for end-to-end encryption, stored opaquely) ---

    /// Publishes a device's keys in one transaction: identity keys (once; different ones later
    /// are [`StoreError::IdentityKeysChanged`]), one-time keys (an id already stored is kept as
    /// it is; more than `max_one_time_keys` unclaimed is [`StoreError::KeyLimit`]), and the
    /// fallback key (replacing the previous one). One-time and fallback keys need identity keys.
    async fn publish_keys(
        &self,
        device: DeviceId,
        keys: KeyUpload,
        max_one_time_keys: usize,
    ) -> Result<KeyCountRecord, StoreError>;

    async fn key_counts(&self, device: DeviceId) -> Result<KeyCountRecord, StoreError>;

    /// Every current device of the user, ordered by id, with its identity keys if published.
    async fn device_keys(&self, user: UserId) -> Result<Vec<DeviceKeysRecord>, StoreError>;

    /// Claims one key per device, atomically: a one-time key is handed out once and deleted;
    /// a device with none left gives its fallback key (kept, and marked used). Devices with
    /// no keys, or that do not exist, are left out.
    async fn claim_keys(&self, devices: Vec<DeviceId>)
    -> Result<Vec<ClaimedKeyRecord>, StoreError>;

    /// A cheap round trip, for readiness checks.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Flushes and closes; later calls fail with [`StoreError::Closed`].
    async fn close(&self);
}
