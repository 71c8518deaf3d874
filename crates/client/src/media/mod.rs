//! Media (PROTOCOL.md §8): sending files and downloading them.
//!
//! **Sending** ([`Client::send_file`]): the file is encrypted with `tern-crypto` into
//! `home/media-tmp/` (a fresh key per file), then uploaded unless the server already has the
//! object (`HEAD`, then a claim): tus, in 4 MiB `PATCH`es streamed from disk, each with its
//! SHA-256. A failed `PATCH` is resumed from the offset the server reports, with backoff. The
//! encrypted copy, its key and the upload URL are recorded in the local store as soon as they
//! exist, so a process killed at 90% resumes at 90% when the same file (same path, size and
//! modification time) is sent again. Then the message — `Content::media` with the key, the
//! hashes and, for JPEG/PNG, a thumbnail — goes through the outbox like a text, in the
//! transaction that forgets the upload, and the encrypted copy is deleted.
//!
//! **Downloading** ([`Client::download`]): the ciphertext is fetched into
//! `home/media-tmp/<id>.part`, resuming a partial file with `Range`; it must hash to the id,
//! authenticate chunk by chunk and decrypt to the plaintext hash and size the message names.
//! Plaintext goes to a temporary file beside the output and is renamed into place only then,
//! so a failed or tampered download never leaves a plaintext file.

mod files;
mod kind;
mod tus;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt as _;
use reqwest::StatusCode;
use serde::Serialize;
use tern_crypto::media::MediaKey;
use tern_proto::ErrorCode;
use tern_proto::content::{Content, MediaRef};
use tokio::io::AsyncWriteExt as _;
use tokio::sync::{Notify, watch};

pub use kind::THUMBNAIL_SIDE;
pub(crate) use tus::MediaHttp;

use crate::backoff::Backoff;
use crate::client::{Client, lock};
use crate::content::sanitize_file_name;
use crate::error::Error;
use crate::outbox::new_client_msg_id;
use crate::store::{ConvName, OutboxItem, PendingUpload, SavedSession, SourceKey};
use crate::types::{SentMessage, StoredMessage};
use files::{Expected, Tick};

/// Bytes per tus `PATCH`.
const UPLOAD_CHUNK: u64 = 4 * 1024 * 1024;
/// Failed attempts in a row, without progress, before an upload or download gives up (it
/// resumes from where it stopped when called again).
const MAX_ATTEMPTS: u32 = 8;
/// The profile's directory for encrypted copies and partial downloads.
const TEMP_DIR: &str = "media-tmp";
/// Unfinished sends and downloads are forgotten after this long.
const STALE_AFTER: Duration = Duration::from_secs(7 * 24 * 3600);
/// An encrypted copy the store does not know is removed once unmodified for this long (a
/// copy being written is never that old).
const ORPHAN_AFTER: Duration = Duration::from_secs(600);
/// Directory entries looked at per sweep.
const MAX_SWEEP: usize = 4096;
/// How often progress is reported while a request streams.
const PROGRESS_EVERY: Duration = Duration::from_millis(200);
/// Bound on a download whose message does not say its size (2 GiB objects, plus overhead).
const MAX_UNSIZED_DOWNLOAD: u64 = 2 * 1024 * 1024 * 1024 + 1024 * 1024;

/// Where a file goes: the direct conversation with a user (by username), or a group.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Recipient {
    User(String),
    Group(u64),
}

impl Recipient {
    pub fn user(username: impl Into<String>) -> Recipient {
        Recipient::User(username.into())
    }

    pub fn group(group_id: u64) -> Recipient {
        Recipient::Group(group_id)
    }
}

/// What a transfer is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Reading and encrypting the file (`done`/`total`: plaintext bytes).
    Encrypting,
    /// Uploading the ciphertext (`done`/`total`: bytes the server has, or has been sent).
    Uploading,
    /// Sending the message that carries the file (0 of 1, then 1 of 1).
    Sending,
    /// Fetching the ciphertext (`done`/`total`: bytes).
    Downloading,
    /// Verifying and decrypting it (`done`/`total`: ciphertext bytes).
    Decrypting,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Encrypting => "encrypting",
            Phase::Uploading => "uploading",
            Phase::Sending => "sending",
            Phase::Downloading => "downloading",
            Phase::Decrypting => "decrypting",
        }
    }
}

/// A progress report of [`Client::send_file`] or [`Client::download`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Progress {
    pub phase: Phase,
    pub done: u64,
    pub total: u64,
}

/// A downloaded, verified and decrypted file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DownloadedFile {
    pub path: PathBuf,
    /// Plaintext bytes.
    pub size: u64,
    pub media_id: String,
    pub mime_type: String,
    /// The sender's file name, sanitised (see [`sanitize_file_name`]).
    pub file_name: Option<String>,
}

/// Why a file could not be sent or downloaded, beyond network and server errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MediaError {
    /// The message has no media to download.
    #[error("the message carries no media")]
    NotMedia,
    /// The message's media reference is malformed (id, key).
    #[error("invalid media reference: {0}")]
    BadReference(String),
    /// A local file could not be read or written.
    #[error("{}: {error}", path.display())]
    File {
        path: PathBuf,
        error: std::io::Error,
    },
    /// The file changed while it was being encrypted; nothing was sent.
    #[error("the file changed while it was being read; nothing was sent")]
    SourceChanged,
    /// The downloaded media is not what the message names: altered, truncated, or encrypted
    /// under another key. Nothing was written.
    #[error("downloaded media failed verification (tampered or corrupt): {0}")]
    Tampered(String),
    /// The encrypted copy kept for a resumable send does not hash to its id (a disk error);
    /// it was discarded, and sending again starts over.
    #[error("the encrypted copy of the file is corrupt; it was discarded, send again")]
    CorruptCopy,
    #[error("encryption failed: {0}")]
    Crypto(tern_crypto::media::MediaError),
}

impl MediaError {
    pub fn code_str(&self) -> &'static str {
        match self {
            MediaError::NotMedia => "not_media",
            MediaError::BadReference(_) => "bad_media_reference",
            MediaError::File { .. } => "file",
            MediaError::SourceChanged => "file_changed",
            MediaError::Tampered(_) => "tampered",
            MediaError::CorruptCopy => "corrupt_copy",
            MediaError::Crypto(_) => "crypto",
        }
    }
}

/// Keys (a source file, a media id) with a transfer in progress in this process: a second
/// transfer of the same key waits for the first.
#[derive(Default)]
pub(crate) struct Busy {
    keys: Mutex<HashSet<String>>,
    released: Notify,
}

struct BusyGuard<'a> {
    busy: &'a Busy,
    key: String,
}

impl Busy {
    async fn acquire(&self, key: String) -> BusyGuard<'_> {
        loop {
            let notified = self.released.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if lock(&self.keys).insert(key.clone()) {
                return BusyGuard { busy: self, key };
            }
            notified.await;
        }
    }

    fn held(&self) -> Vec<String> {
        lock(&self.keys).iter().cloned().collect()
    }
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        lock(&self.busy.keys).remove(&self.key);
        self.busy.released.notify_waiters();
    }
}

/// Failed attempts in a row, with backoff between them.
struct Attempts {
    backoff: Backoff,
    failures: u32,
}

impl Attempts {
    fn new(client: &Client) -> Attempts {
        Attempts {
            backoff: Backoff::new(
                client.inner.config.reconnect_initial,
                client.inner.config.reconnect_max,
            ),
            failures: 0,
        }
    }

    /// Waits before the next attempt, or gives up with `e`.
    async fn failed(&mut self, e: Error) -> Result<(), Error> {
        self.failures += 1;
        if self.failures >= MAX_ATTEMPTS {
            return Err(e);
        }
        tracing::debug!(error = %e, attempt = self.failures, "media transfer failed; retrying");
        tokio::time::sleep(self.backoff.next_delay()).await;
        Ok(())
    }

    fn progressed(&mut self) {
        self.failures = 0;
        self.backoff.reset();
    }
}

/// Runs blocking file work on tokio's blocking pool, relaying its progress to `progress`.
/// Dropping the returned future cancels the work at its next read.
async fn blocking<T, P>(
    phase: Phase,
    total: u64,
    progress: &P,
    work: impl FnOnce(&Tick) -> Result<T, Error> + Send + 'static,
) -> Result<T, Error>
where
    T: Send + 'static,
    P: Fn(Progress) + Sync,
{
    let (tx, mut rx) = watch::channel(0u64);
    let mut task = tokio::task::spawn_blocking(move || work(&Tick(tx)));
    let joined = loop {
        tokio::select! {
            r = &mut task => break r,
            changed = rx.changed() => match changed {
                Ok(()) => {
                    let done = *rx.borrow_and_update();
                    progress(Progress { phase, done, total });
                }
                Err(_) => break (&mut task).await,
            },
        }
    };
    joined.map_err(|e| Error::Store(format!("media task failed: {e}")))?
}

/// A media id: 64 lowercase hex characters (it goes into URL paths and file names).
fn check_id(id: &str) -> Result<(), Error> {
    if id.len() == 64 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(())
    } else {
        Err(Error::Media(MediaError::BadReference(format!(
            "media id {id:?} is not 64 lowercase hex characters"
        ))))
    }
}

impl Client {
    fn media_dir(&self) -> PathBuf {
        self.inner.config.home.join(TEMP_DIR)
    }

    /// Sends a file to a user or a group and returns the message's tick, like
    /// [`send_text`](Client::send_text). `progress` hears about each phase (encrypting,
    /// uploading, sending). Calling it again for the same file (same path, size and
    /// modification time) after an interruption resumes the upload where the server has it.
    /// Needs a running connection task (`connect`).
    ///
    /// Errors: [`Error::Invalid`] (not a file, caption too long for a message),
    /// [`Error::Media`] (the file cannot be read, changed while read), [`Error::Server`]
    /// (`quota_exceeded`, `too_large`, … and the refusals of `send_text`),
    /// [`Error::Network`] once retries are exhausted (sending again resumes).
    pub async fn send_file(
        &self,
        to: &Recipient,
        path: &Path,
        caption: Option<&str>,
        progress: impl Fn(Progress) + Send + Sync,
    ) -> Result<SentMessage, Error> {
        let session = self.saved_session()?;
        self.check_running()?;
        let caption = caption.map(str::trim).unwrap_or_default().to_owned();
        let file_name = path
            .file_name()
            .and_then(|n| sanitize_file_name(&n.to_string_lossy()))
            .unwrap_or_else(|| "file".to_owned());
        let template = MediaRef {
            id: "0".repeat(64),
            key: vec![0; 32],
            plaintext_sha256: vec![0; 32],
            size: u64::MAX,
            encrypted_size: u64::MAX,
            mime_type: "application/octet-stream".into(),
            file_name: file_name.clone(),
            width: u32::MAX,
            height: u32::MAX,
            caption: caption.clone(),
            ..Default::default()
        };
        self.check_body_len(Content::media(template).encode_body().len())
            .map_err(|_| Error::Invalid("the caption or file name is too long".into()))?;
        let (conv, conv_name) = self.conversation(&session, to).await?;

        let source_path = path.to_owned();
        let source = tokio::task::spawn_blocking(move || files::source_key(&source_path))
            .await
            .map_err(|e| Error::Store(format!("media task failed: {e}")))??;
        let _busy = self
            .inner
            .media_busy
            .acquire(format!("send:{}", source.path))
            .await;
        self.prune_uploads(&session).await;

        let (inspect_path, name) = (PathBuf::from(&source.path), file_name.clone());
        let (mime_type, image) =
            tokio::task::spawn_blocking(move || files::inspect(&inspect_path, &name))
                .await
                .map_err(|e| Error::Store(format!("media task failed: {e}")))??;
        let mut row = self.encrypted_copy(&source, &progress).await?;
        let temp = self.media_dir().join(&row.temp_name);
        if let Err(e) = self
            .upload(&session.token, &mut row, &temp, &progress)
            .await
        {
            // Keep what can resume; drop what never will.
            if !e.is_transient() {
                self.forget_upload(&session, &row).await;
            }
            return Err(e);
        }

        let image = image.unwrap_or_default();
        let mut media = MediaRef {
            id: row.media_id.clone(),
            key: row.key.as_bytes().to_vec(),
            plaintext_sha256: row.plaintext_sha256.to_vec(),
            size: row.size,
            encrypted_size: row.encrypted_size,
            mime_type,
            file_name,
            thumbnail: image.thumbnail,
            width: image.width,
            height: image.height,
            caption,
        };
        let mut body = Content::media(media.clone()).encode_body();
        if self.check_body_len(body.len()).is_err() {
            media.thumbnail.clear();
            body = Content::media(media).encode_body();
            self.check_body_len(body.len())?;
        }
        progress(Progress {
            phase: Phase::Sending,
            done: 0,
            total: 1,
        });
        let item = OutboxItem {
            conv,
            conv_name,
            client_msg_id: new_client_msg_id(),
            body,
        };
        let (me, it, upload_id) = (session.clone(), item.clone(), row.id);
        self.inner
            .store
            .run(move |s| s.enqueue_uploaded(&me, &it, crate::connection::now_ms(), upload_id))
            .await?;
        remove_file(&temp).await;
        let sent = self.deliver_enqueued(&session, &item).await?;
        progress(Progress {
            phase: Phase::Sending,
            done: 1,
            total: 1,
        });
        Ok(sent)
    }

    /// The encrypted copy of `source`: the one recorded by an interrupted send if it is
    /// intact, else a new one (fresh key).
    async fn encrypted_copy(
        &self,
        source: &SourceKey,
        progress: &(impl Fn(Progress) + Sync),
    ) -> Result<PendingUpload, Error> {
        let dir = self.media_dir();
        let key = source.clone();
        if let Some(row) = self
            .inner
            .store
            .run(move |s| s.pending_upload(&key))
            .await?
        {
            let temp = dir.join(&row.temp_name);
            if files::len_or_zero(&temp)? == row.encrypted_size {
                progress(Progress {
                    phase: Phase::Encrypting,
                    done: row.size,
                    total: row.size,
                });
                return Ok(row);
            }
            tracing::info!(file = %source.path, "the encrypted copy is gone; encrypting again");
            let id = row.id;
            self.inner.store.run(move |s| s.delete_upload(id)).await?;
            remove_file(&temp).await;
        }

        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| files_error(&dir, e))?;
        let temp_name = format!("{}.trnm", hex::encode(rand::random::<[u8; 16]>()));
        let temp = dir.join(&temp_name);
        let (src, dest) = (PathBuf::from(&source.path), temp.clone());
        let enc = blocking(Phase::Encrypting, source.size, progress, move |tick| {
            files::encrypt_file(&src, &dest, tick)
        })
        .await?;
        let src = PathBuf::from(&source.path);
        let after = tokio::task::spawn_blocking(move || files::source_key(&src))
            .await
            .map_err(|e| Error::Store(format!("media task failed: {e}")))?;
        if after.ok().as_ref() != Some(source) || enc.size != source.size {
            remove_file(&temp).await;
            return Err(Error::Media(MediaError::SourceChanged));
        }
        let row = PendingUpload {
            id: 0,
            source: source.clone(),
            temp_name,
            media_id: enc.id_hex,
            key: enc.key,
            plaintext_sha256: enc.plaintext_sha256,
            size: enc.size,
            encrypted_size: enc.encrypted_size,
            upload_url: None,
            uploaded: false,
            created_ms: crate::connection::now_ms(),
        };
        let (row, replaced) = self.inner.store.run(move |s| s.insert_upload(&row)).await?;
        if let Some(old) = replaced {
            remove_file(&dir.join(old)).await;
        }
        Ok(row)
    }

    /// Gets the object onto the server with a reference for this account: a claim if it
    /// is there already, else the tus upload, resumed where the server has it.
    async fn upload(
        &self,
        token: &str,
        row: &mut PendingUpload,
        temp: &Path,
        progress: &(impl Fn(Progress) + Sync),
    ) -> Result<(), Error> {
        let total = row.encrypted_size;
        let report = |done: u64| {
            progress(Progress {
                phase: Phase::Uploading,
                done,
                total,
            })
        };
        if row.uploaded {
            report(total);
            return Ok(());
        }
        let http = &self.inner.media_http;
        let mut attempts = Attempts::new(self);
        // Set when a PATCH was refused as damaged: if the upload is then gone, the server
        // discarded all of it because the whole did not hash to the id.
        let mut checksum_refused = false;
        'upload: loop {
            if row.upload_url.is_none() {
                // Forwarded, or sent before: the object may be there already.
                match http.head_media(token, &row.media_id).await {
                    Ok(Some(_)) => match http.claim(token, &row.media_id).await {
                        Ok(_) => {
                            let media_id = row.media_id.clone();
                            return self.uploaded(row, &media_id, report).await;
                        }
                        // Collected between the two calls: upload it after all.
                        Err(e) if e.code() == Some(ErrorCode::NotFound) => {}
                        Err(e) if tus::retryable(&e) => {
                            attempts.failed(e).await?;
                            continue;
                        }
                        Err(e) => return Err(e),
                    },
                    Ok(None) => {}
                    Err(e) if tus::retryable(&e) => {
                        attempts.failed(e).await?;
                        continue;
                    }
                    Err(e) => return Err(e),
                }
                match http.create_upload(token, total, &row.media_id).await {
                    Ok(url) => {
                        let (id, u) = (row.id, url.clone());
                        self.inner
                            .store
                            .run(move |s| s.set_upload_url(id, Some(&u)))
                            .await?;
                        row.upload_url = Some(url);
                    }
                    Err(e) if tus::retryable(&e) => {
                        attempts.failed(e).await?;
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            }
            let Some(url) = row.upload_url.clone() else {
                continue;
            };
            let state = match http.upload_state(token, &url).await {
                Ok(Some(s)) if s.length == total => s,
                Ok(found) => {
                    if found.is_none() && checksum_refused {
                        return Err(Error::Media(MediaError::CorruptCopy));
                    }
                    // Expired, or not ours any more: start a new upload.
                    let id = row.id;
                    self.inner
                        .store
                        .run(move |s| s.set_upload_url(id, None))
                        .await?;
                    row.upload_url = None;
                    attempts
                        .failed(Error::Network("the upload is gone on the server".into()))
                        .await?;
                    continue;
                }
                Err(e) if tus::retryable(&e) => {
                    attempts.failed(e).await?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            if let Some(media_id) = state.media_id {
                return self.uploaded(row, &media_id, report).await;
            }
            let mut offset = state.offset;
            report(offset);
            while offset < total {
                let len = UPLOAD_CHUNK.min(total - offset);
                let path = temp.to_owned();
                let digest =
                    tokio::task::spawn_blocking(move || files::hash_range(&path, offset, len))
                        .await
                        .map_err(|e| Error::Store(format!("media task failed: {e}")))??;
                let sent = Arc::new(AtomicU64::new(0));
                let patch = http.patch(token, &url, temp, offset, len, &digest, sent.clone());
                tokio::pin!(patch);
                let mut ticker = tokio::time::interval(PROGRESS_EVERY);
                let result = loop {
                    tokio::select! {
                        r = &mut patch => break r,
                        _ = ticker.tick() => report(offset + sent.load(Ordering::Relaxed).min(len)),
                    }
                };
                match result {
                    Ok(p) if p.offset > offset && p.offset <= total => {
                        offset = p.offset;
                        attempts.progressed();
                        checksum_refused = false;
                        report(offset);
                        if let Some(media_id) = p.media_id {
                            return self.uploaded(row, &media_id, report).await;
                        }
                    }
                    Ok(p) => {
                        let e = Error::Protocol(format!(
                            "PATCH at {offset} answered with offset {}",
                            p.offset
                        ));
                        attempts.failed(e).await?;
                        continue 'upload;
                    }
                    Err(e) if tus::retryable(&e) || e.code() == Some(ErrorCode::NotFound) => {
                        checksum_refused = e.code() == Some(ErrorCode::ChecksumMismatch);
                        // Ask the server where it stands, then go on from there.
                        attempts.failed(e).await?;
                        continue 'upload;
                    }
                    Err(e) => return Err(e),
                }
            }
            // Every byte is there, yet no id was named (that answer was lost): ask again.
            attempts
                .failed(Error::Protocol("upload complete without a media id".into()))
                .await?;
        }
    }

    /// Records that the object is on the server.
    async fn uploaded(
        &self,
        row: &mut PendingUpload,
        media_id: &str,
        report: impl Fn(u64),
    ) -> Result<(), Error> {
        if media_id != row.media_id {
            return Err(Error::Protocol(format!(
                "the server stored the upload as {media_id}, not {}",
                row.media_id
            )));
        }
        let id = row.id;
        self.inner.store.run(move |s| s.mark_uploaded(id)).await?;
        row.uploaded = true;
        report(row.encrypted_size);
        Ok(())
    }

    /// Drops a send that cannot resume: its row, its encrypted copy, its tus upload.
    async fn forget_upload(&self, session: &SavedSession, row: &PendingUpload) {
        let id = row.id;
        match self.inner.store.run(move |s| s.delete_upload(id)).await {
            Ok(Some(temp)) => remove_file(&self.media_dir().join(temp)).await,
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "cannot forget an upload"),
        }
        if let Some(url) = &row.upload_url
            && let Err(e) = self
                .inner
                .media_http
                .delete_upload(&session.token, url)
                .await
        {
            tracing::debug!(error = %e, "cannot delete an abandoned upload");
        }
    }

    /// Forgets sends that cannot resume any more (their file changed, or they are older
    /// than a week) and removes encrypted copies and partial downloads nobody needs. Best
    /// effort: failures are logged.
    async fn prune_uploads(&self, session: &SavedSession) {
        let rows = match self.inner.store.run(|s| s.uploads()).await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list uploads");
                return;
            }
        };
        let busy = self.inner.media_busy.held();
        let now = crate::connection::now_ms();
        let stale_ms = i64::try_from(STALE_AFTER.as_millis()).unwrap_or(i64::MAX);
        let mut keep = Vec::new();
        for row in rows {
            if busy.contains(&format!("send:{}", row.source.path)) {
                keep.push(row.temp_name);
                continue;
            }
            let path = PathBuf::from(&row.source.path);
            let current = tokio::task::spawn_blocking(move || files::source_key(&path).ok())
                .await
                .ok()
                .flatten();
            if current.as_ref() == Some(&row.source) && now - row.created_ms < stale_ms {
                keep.push(row.temp_name);
                continue;
            }
            tracing::info!(file = %row.source.path, "forgetting an unfinished send");
            self.forget_upload(session, &row).await;
        }
        let dir = self.media_dir();
        let _ = tokio::task::spawn_blocking(move || {
            files::sweep(&dir, "trnm", &keep, ORPHAN_AFTER, MAX_SWEEP);
            files::sweep(&dir, "part", &[], STALE_AFTER, MAX_SWEEP);
        })
        .await;
    }

    /// A stored message by conversation and seq: `conversation` is a username or a group id
    /// in decimal, as in [`StoredMessage::conversation`]. Local.
    pub fn find_message(
        &self,
        conversation: &str,
        seq: u64,
    ) -> Result<Option<StoredMessage>, Error> {
        let conversation = conversation.trim();
        match conversation.parse::<u64>() {
            Ok(group) => self.inner.store.message_at(ConvName::Group(group), seq),
            Err(_) => {
                let name = crate::client::normalize_username(conversation)?;
                self.inner.store.message_at(ConvName::Direct(&name), seq)
            }
        }
    }

    /// Downloads the file of a media message to `out` (replacing it), verified and
    /// decrypted. `progress` hears about downloading and decrypting. An interrupted download
    /// resumes when called again.
    ///
    /// Errors: [`Error::Media`] with [`MediaError::NotMedia`] for a message without media,
    /// [`MediaError::Tampered`] if the bytes are not what the message names (nothing is
    /// written), [`MediaError::File`] if `out` cannot be written; [`Error::Server`]
    /// `not_found` if the object is gone; [`Error::Network`] once retries are exhausted.
    pub async fn download(
        &self,
        message: &StoredMessage,
        out: &Path,
        progress: impl Fn(Progress) + Send + Sync,
    ) -> Result<DownloadedFile, Error> {
        let media = message.media().ok_or(Error::Media(MediaError::NotMedia))?;
        self.download_media(&media, out, progress).await
    }

    /// [`download`](Client::download) for a media reference on its own.
    pub async fn download_media(
        &self,
        media: &MediaRef,
        out: &Path,
        progress: impl Fn(Progress) + Send + Sync,
    ) -> Result<DownloadedFile, Error> {
        let session = self.saved_session()?;
        check_id(&media.id)?;
        let key = MediaKey::from_slice(&media.key)
            .map_err(|e| Error::Media(MediaError::BadReference(e.to_string())))?;
        if out.file_name().is_none() {
            return Err(Error::Invalid(format!(
                "{} is not a file path",
                out.display()
            )));
        }
        let _busy = self
            .inner
            .media_busy
            .acquire(format!("download:{}", media.id))
            .await;
        let dir = self.media_dir();
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| files_error(&dir, e))?;
        let part = dir.join(format!("{}.part", media.id));
        let expected_len = (media.encrypted_size > 0).then_some(media.encrypted_size);
        let total = self
            .fetch(&session.token, &media.id, &part, expected_len, &progress)
            .await?;

        let expected = Expected {
            id: media.id.clone(),
            key,
            plaintext_sha256: media.plaintext_sha256.clone(),
            size: media.size,
        };
        let (from, to) = (part.clone(), out.to_owned());
        let result = blocking(Phase::Decrypting, total, &progress, move |tick| {
            files::decrypt_file(&from, &to, &expected, tick)
        })
        .await;
        match result {
            Ok(dec) => {
                remove_file(&part).await;
                progress(Progress {
                    phase: Phase::Decrypting,
                    done: total,
                    total,
                });
                Ok(DownloadedFile {
                    path: out.to_owned(),
                    size: dec.size,
                    media_id: media.id.clone(),
                    mime_type: media.mime_type.clone(),
                    file_name: sanitize_file_name(&media.file_name),
                })
            }
            Err(e) => {
                // Bytes that fail verification are no use for a resume.
                if matches!(e, Error::Media(MediaError::Tampered(_))) {
                    remove_file(&part).await;
                }
                Err(e)
            }
        }
    }

    /// Fetches the ciphertext into `part`, resuming what is there; returns its length.
    async fn fetch(
        &self,
        token: &str,
        id: &str,
        part: &Path,
        expected: Option<u64>,
        progress: &(impl Fn(Progress) + Sync),
    ) -> Result<u64, Error> {
        let http = &self.inner.media_http;
        let limit = expected.unwrap_or(MAX_UNSIZED_DOWNLOAD);
        let mut attempts = Attempts::new(self);
        loop {
            let have = files::len_or_zero(part)?;
            if expected == Some(have) {
                progress(Progress {
                    phase: Phase::Downloading,
                    done: have,
                    total: have,
                });
                return Ok(have);
            }
            if have > limit {
                truncate(part).await?;
                continue;
            }
            let resp = match http.get(token, id, have).await {
                Ok(r) => r,
                Err(e) if e.is_transient() => {
                    attempts.failed(e).await?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let mut written = match resp.status() {
                StatusCode::PARTIAL_CONTENT if tus::range_start(&resp) == Some(have) => have,
                StatusCode::OK => 0,
                // 416 (the part is longer than the object) or a range we did not ask for.
                status => {
                    truncate(part).await?;
                    attempts
                        .failed(Error::Protocol(format!(
                            "HTTP {status} to a download from byte {have}"
                        )))
                        .await?;
                    continue;
                }
            };
            let total = expected.unwrap_or_else(|| written + resp.content_length().unwrap_or(0));
            progress(Progress {
                phase: Phase::Downloading,
                done: written,
                total,
            });
            let mut file = tokio::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .append(written > 0)
                .truncate(written == 0)
                .open(part)
                .await
                .map_err(|e| files_error(part, e))?;
            let mut stream = resp.bytes_stream();
            let mut last_report = std::time::Instant::now();
            let mut broken = None;
            while let Some(chunk) = stream.next().await {
                let bytes = match chunk {
                    Ok(b) => b,
                    Err(e) => {
                        broken = Some(Error::from(e));
                        break;
                    }
                };
                if written + bytes.len() as u64 > limit {
                    drop(file);
                    truncate(part).await?;
                    return Err(Error::Media(MediaError::Tampered(format!(
                        "the server sent more than the {limit} bytes the message names"
                    ))));
                }
                file.write_all(&bytes)
                    .await
                    .map_err(|e| files_error(part, e))?;
                written += bytes.len() as u64;
                if last_report.elapsed() >= PROGRESS_EVERY {
                    last_report = std::time::Instant::now();
                    progress(Progress {
                        phase: Phase::Downloading,
                        done: written,
                        total,
                    });
                }
            }
            file.flush().await.map_err(|e| files_error(part, e))?;
            file.sync_data().await.map_err(|e| files_error(part, e))?;
            if written > have {
                attempts.progressed();
            }
            if let Some(e) = broken {
                attempts.failed(e).await?;
                continue;
            }
            match expected {
                Some(n) if written < n => {
                    attempts
                        .failed(Error::Network(format!(
                            "download ended at {written} of {n} bytes"
                        )))
                        .await?;
                }
                _ => {
                    progress(Progress {
                        phase: Phase::Downloading,
                        done: written,
                        total: written,
                    });
                    return Ok(written);
                }
            }
        }
    }
}

fn files_error(path: &Path, error: std::io::Error) -> Error {
    Error::Media(MediaError::File {
        path: path.to_owned(),
        error,
    })
}

async fn truncate(path: &Path) -> Result<(), Error> {
    tokio::fs::write(path, b"")
        .await
        .map_err(|e| files_error(path, e))
}

/// Removes a temporary file; one already gone is fine.
async fn remove_file(path: &Path) {
    if let Err(e) = tokio::fs::remove_file(path).await
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(file = %path.display(), error = %e, "cannot remove a temporary file");
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod transfer_tests;
