//! The tern client SDK: everything an app needs to be a tern device — accounts and sessions,
//! one connection kept alive, local history, sending with retry, and a stream of events.
//!
//! # Architecture
//!
//! ```text
//!            app (CLI, TUI, tests)
//!                  │  Client (cheap clone handle; async methods)       EventStream (broadcast)
//!   ┌──────────────┼─────────────────────────────┐                          ▲
//!   │ client.rs    │ outbox.rs (send + retry)    │── Event::Sent ───────────┤
//!   │ accounts,    │ e2ee.rs + directory.rs      │── Event::KeysChanged ────┤
//!   │ keys         │ (keys, device lists, Olm,   │                          │
//!   │              │  Megolm, safety numbers)    │                          │
//!   │ connect/close│ groups.rs (group HTTP calls)│                          │
//!   └──────┬───────┴──────────┬──────────────────┘                          │
//!          │ http.rs (reqwest)│ Command{frame, reply} (bounded mpsc)        │
//!          ▼                  ▼                                             │
//!     HTTP /v1/...     connection task (connection/): socket, heartbeat, ───┤ Message, Receipt,
//!                      reconnect with backoff+jitter; Status via watch      │ Connection, Synced
//!                                     │ store batch, then Ack               │
//!                                     ▼                                     │
//!                      store/ (SQLite, WAL): session, history, outbox, ─────┘
//!                      watermarks, mailbox cursor; UNIQUE(conversation, seq);
//!                      crypto state (pickled, encrypted), decrypted in the batch
//! ```
//!
//! - **Conversations** are direct (with a user, named by the peer's username) or groups (named
//!   by the group id in decimal; usernames start with a letter, so the two never collide).
//!   Both share one history, one outbox and one tick rule: the ticks of my messages come from
//!   the receipts' `all_delivered_up_to` / `all_read_up_to` ("every other participant has …").
//!
//! - **Local store** (`store` module, `home/state.db`). The truth for the app:
//!   the session (token and ids), every message (incoming, outgoing, sync copies from my other
//!   devices), the peers' delivered/read watermarks and my read position per conversation,
//!   the outbox (my messages without a `seq` yet) and the mailbox cursor. Ticks are not stored
//!   per message but derived from the watermarks when read, so a receipt is one row update
//!   however many messages it covers. Calls from async code go through `spawn_blocking`.
//! - **Connection task** (`connection` module). One tokio task per [`Client::connect`]. It
//!   loops: open the socket, `Hello`, `Welcome`, then drain the mailbox and stay live. Events
//!   are stored in one transaction per batch, emitted, and only then acknowledged with a
//!   cumulative `Ack` — a client that dies between the two gets them again and de-duplicates
//!   them by (conversation, seq). It pings every `heartbeat_secs` and drops a connection that
//!   is silent for two heartbeats. Lost connections are retried after a delay with full
//!   jitter, from `reconnect_initial` doubling to `reconnect_max`; close code 4001 (token
//!   refused, device removed) and 4004 (version) end the task with
//!   [`ConnectionState::Closed`]. Requests reach the task through a bounded channel with a
//!   oneshot for the answer; a connection lost before the answer drops the oneshot and the
//!   caller retries on the next connection.
//! - **Sending** (`outbox` module). [`Client::send_text`] writes the message to the outbox,
//!   then retries with the same `client_msg_id` until `Sent` (idempotent on the server),
//!   encrypting at every attempt and refreshing device lists on `device_mismatch`.
//!   [`Client::send_group_text`] is the same with one Megolm ciphertext for all member
//!   devices. After every `Welcome`, a watcher tops up the device's published keys and
//!   re-sends whatever is left in the outbox, so a restarted client finishes what it started.
//! - **End-to-end encryption** (`e2ee` module, `store/crypto.rs`, `store/e2ee.rs`; PROTOCOL.md
//!   §9.2): Olm per device for direct messages, Megolm per group and device, key shares over
//!   Olm, rotation when members or devices go; decryption inside the storing transaction;
//!   [`Event::DecryptionFailed`] and [`Event::KeysChanged`]; [`Client::safety_number`] and
//!   [`Client::mark_verified`]. Keys at rest: `home/store.key` or
//!   [`ClientConfig::passphrase`]. There is no plaintext path.
//! - **Bodies** (`content` module). Every message body is a `Content` (PROTOCOL.md §8.5): a
//!   text or a [`MediaRef`]. [`StoredMessage::text`] is always something to show (`[photo.jpg,
//!   1.2 MB image/jpeg] caption` for a file, [`UNSUPPORTED`] for a body this SDK cannot read);
//!   [`StoredMessage::media`] gives the reference itself.
//! - **Media** (`media` module): [`Client::send_file`] encrypts a file (`tern-crypto`), uploads
//!   it with tus (resumable: the encrypted copy, its key and the upload URL are kept in the
//!   local store, so an interrupted send resumes where the server has it) and sends the
//!   message through the outbox; [`Client::download`] fetches (resuming with `Range`),
//!   verifies and decrypts, and writes the output only once everything checked out.
//! - **Groups** (`groups` module): create, list, rename, members, admins, leave, message info
//!   — plain HTTP calls. Membership changes arrive as system messages ([`GroupChange`]) in the
//!   group's history, with a human `text` ("alice added bob").
//! - **Event fan-out** (`events` module). A bounded broadcast channel; any number of
//!   [`EventStream`]s. A subscriber that lags gets [`Event::Lagged`] and can re-read the store.
//!
//! Bounded everywhere: the command queue (64), requests in flight per connection (256), the
//! event channel (1024 per subscriber), event batches (512), frames read (1 MiB); media moves
//! through 64 KiB buffers, never a whole file in memory.
//!
//! # Media
//!
//! ```no_run
//! use std::path::Path;
//! use tern_client::{Client, Progress, Recipient};
//!
//! # async fn demo(alice: Client, bob: Client) -> Result<(), tern_client::Error> {
//! // Alice (connected) sends a photo; `progress` hears encrypting, uploading, sending.
//! let sent = alice
//!     .send_file(&Recipient::user("bob"), Path::new("beach.jpg"), Some("the beach"),
//!         |p: Progress| println!("{} {}/{}", p.phase.as_str(), p.done, p.total))
//!     .await?;
//! // Bob finds the message (from an `Event::Message`, history, or by conversation and seq) ...
//! let msg = bob.find_message("alice", sent.seq)?.expect("synced");
//! let photo = msg.media().expect("a file");
//! println!("{} ({} bytes, {}x{})", photo.file_name, photo.size, photo.width, photo.height);
//! // ... and downloads it; a tampered object is `Error::Media(MediaError::Tampered(_))`.
//! let file = bob.download(&msg, Path::new("beach.jpg"), |_| {}).await?;
//! # let _ = file;
//! # Ok(())
//! # }
//! ```
//!
//! The signatures: `send_file(&Recipient, &Path, Option<&str>, impl Fn(Progress) + Send +
//! Sync) -> Result<SentMessage, Error>`, `download(&StoredMessage, &Path, impl Fn(Progress) +
//! Send + Sync) -> Result<DownloadedFile, Error>` (and `download_media(&MediaRef, ...)`),
//! `find_message(conversation: &str, seq: u64) -> Result<Option<StoredMessage>, Error>`.

mod backoff;
mod client;
mod config;
mod connection;
mod content;
mod directory;
mod e2ee;
mod error;
mod events;
mod group_event;
mod groups;
mod http;
mod media;
mod outbox;
mod push;
mod store;
mod types;

pub use client::Client;
pub use config::ClientConfig;
pub use content::{UNSUPPORTED, describe as describe_media, human_size, sanitize_file_name};
pub use e2ee::{ONE_TIME_KEY_TARGET, SafetyNumber};
pub use error::Error;
pub use events::{EVENT_CAPACITY, EventStream};
pub use group_event::{GroupAction, GroupChange, GroupUser};
pub use media::{DownloadedFile, MediaError, Phase, Progress, Recipient, THUMBNAIL_SIDE};
pub use push::{MAX_PUSH_BODY, PushRegistration, PushWake};
pub use tern_proto::ErrorCode;
pub use tern_proto::content::MediaRef;
pub use tern_proto::http::{
    DeviceInfo, GroupInfo, GroupMember, GroupSummary, LastSeenResponse, MemberReceipt, MessageInfo,
    PrivacySettings, PushKeys, Role, TurnCredentials, Visibility,
};
pub use types::{
    CloseReason, ConnectionState, DecryptionFailed, Event, KeysChanged, ReceiptEvent, ReceiptKind,
    SentMessage, Session, StoredMessage, Tick,
};
