//! The media service (PROTOCOL.md §8): content-addressed objects, resumable uploads, quotas,
//! references and garbage collection. Bytes stream through in bounded chunks both ways; the
//! metadata is in the [`Store`], the bytes in a [`BlobStore`].
//!
//! Uploads (tus and whole-object `PUT` alike) are appended to a staging file
//! (`data_dir/uploads/<upload id>`) whose length *is* the upload offset, fsynced before an offset
//! is reported, so an interrupted upload resumes where its bytes end. The running SHA-256 of an
//! upload is kept in memory between requests; after a restart it is recomputed from the file.
//! Completion verifies the hash, moves the file into the blob store and records the object and
//! the uploader's reference.
//!
//! An object's record is written after its bytes and deleted before them, and both steps hold
//! the object's lock, so a record never names missing bytes (a crash can leave orphaned bytes,
//! never a dangling record).

pub mod blob;
pub mod range;
#[cfg(feature = "s3")]
pub mod s3;

use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use rand::RngCore;
use sha2::{Digest, Sha256};
use tern_proto::ErrorCode;
use tern_store::{MediaGrant, MediaHash, MediaLimits, MediaRecord, NewUpload, Store, UploadRecord};
use tokio::io::AsyncWriteExt;

use crate::config::MediaConfig;
use crate::error::ApiError;
use crate::services::Clock;
pub use blob::{BlobError, BlobStore, ByteStream, FsBlobs};

/// Bytes buffered between the request body and the staging file.
const WRITE_BUFFER: usize = 256 * 1024;
/// Garbage handled per store round trip.
const GC_BATCH: usize = 256;
/// Object locks (striped by id).
const LOCKS: usize = 64;

/// A checksum of one `PATCH` body (tus `Upload-Checksum`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checksum {
    Sha1(Vec<u8>),
    Sha256(Vec<u8>),
}

/// What an append did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    pub offset: u64,
    /// Set by the append that completed the upload.
    pub completed: Option<MediaGrant>,
}

/// The state of an upload between requests, in memory.
#[derive(Default)]
struct Live {
    busy: bool,
    /// The SHA-256 of the first `hashed` bytes of the staging file.
    hash: Option<(u64, Sha256)>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GcReport {
    pub uploads: usize,
    pub objects: usize,
}

pub struct Media {
    store: Arc<dyn Store>,
    blobs: Arc<dyn BlobStore>,
    clock: Arc<dyn Clock>,
    config: MediaConfig,
    staging: PathBuf,
    live: Mutex<HashMap<String, Live>>,
    locks: Vec<tokio::sync::Mutex<()>>,
}

/// Parses a media id: 64 lowercase or uppercase hex characters.
pub fn parse_id(s: &str) -> Result<MediaHash, ApiError> {
    let mut id = [0u8; 32];
    if s.len() != 64 || hex::decode_to_slice(s, &mut id).is_err() {
        return Err(ApiError::bad_request(
            "a media id is the 64 hex characters of a SHA-256",
        ));
    }
    Ok(id)
}

fn io_error(e: std::io::Error) -> ApiError {
    tracing::error!(error = %e, "media I/O failed");
    ApiError::new(ErrorCode::Internal, "storage failure; retry later")
}

fn blob_error(e: BlobError) -> ApiError {
    match e {
        BlobError::NotFound => ApiError::new(ErrorCode::NotFound, "media not found"),
        e => {
            tracing::error!(error = %e, "blob store failed");
            ApiError::new(ErrorCode::Internal, "storage failure; retry later")
        }
    }
}

/// Marks an upload busy for the life of the guard.
struct Busy<'a> {
    media: &'a Media,
    id: String,
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        if let Ok(mut live) = self.media.live.lock()
            && let Some(l) = live.get_mut(&self.id)
        {
            l.busy = false;
        }
    }
}

/// Truncates the staging file back to where a request started unless disarmed: a request
/// with a checksum keeps nothing of a body that was cut off or did not match.
struct Rollback {
    path: PathBuf,
    offset: u64,
    armed: bool,
}

impl Drop for Rollback {
    fn drop(&mut self) {
        if self.armed
            && let Ok(f) = std::fs::OpenOptions::new().write(true).open(&self.path)
        {
            let _ = f.set_len(self.offset).and_then(|()| f.sync_data());
        }
    }
}

impl Media {
    pub fn new(
        store: Arc<dyn Store>,
        blobs: Arc<dyn BlobStore>,
        clock: Arc<dyn Clock>,
        config: MediaConfig,
        staging: PathBuf,
    ) -> std::io::Result<Media> {
        std::fs::create_dir_all(&staging)?;
        Ok(Media {
            store,
            blobs,
            clock,
            config,
            staging,
            live: Mutex::new(HashMap::new()),
            locks: (0..LOCKS).map(|_| tokio::sync::Mutex::new(())).collect(),
        })
    }

    pub fn config(&self) -> &MediaConfig {
        &self.config
    }

    fn limits(&self) -> MediaLimits {
        MediaLimits {
            quota_bytes: self.config.quota_bytes,
            max_uploads: self.config.max_uploads_per_user,
        }
    }

    fn retention_end(&self, now: i64) -> i64 {
        now.saturating_add((self.config.retention_days as i64).saturating_mul(86_400_000))
    }

    fn staged(&self, upload: &str) -> PathBuf {
        self.staging.join(upload)
    }

    fn lock_of(&self, id: &MediaHash) -> &tokio::sync::Mutex<()> {
        &self.locks[id[0] as usize % self.locks.len()]
    }

    // --- objects ---

    pub async fn object(&self, id: MediaHash) -> Result<MediaRecord, ApiError> {
        self.store
            .media(id)
            .await?
            .ok_or_else(|| ApiError::new(ErrorCode::NotFound, "media not found"))
    }

    /// Streams `range` of an object whose record the caller has read.
    pub async fn read(
        &self,
        id: &MediaHash,
        range: std::ops::Range<u64>,
    ) -> Result<ByteStream, ApiError> {
        let stream = self.blobs.get(id, range).await.map_err(blob_error)?;
        Ok(Box::pin(stream.inspect(|chunk| {
            if let Ok(c) = chunk {
                metrics::counter!("tern_media_download_bytes_total").increment(c.len() as u64);
            }
        })))
    }

    /// Gives `user` a reference to an existing object; `None` if it does not exist.
    pub async fn claim(&self, user: u64, id: MediaHash) -> Result<Option<MediaGrant>, ApiError> {
        let now = self.clock.now_ms();
        Ok(self
            .store
            .claim_media(id, user, self.retention_end(now), now, self.limits())
            .await?)
    }

    pub async fn drop_ref(&self, user: u64, id: MediaHash) -> Result<(), ApiError> {
        if self.store.drop_media_ref(id, user).await? {
            Ok(())
        } else {
            Err(ApiError::new(
                ErrorCode::NotFound,
                "you hold no reference to this media",
            ))
        }
    }

    /// `PUT`: the whole object in one request of `length` bytes (`None`: a chunked body, which
    /// is refused). An existing object is claimed without reading the body.
    pub async fn put<S, E>(
        &self,
        user: u64,
        id: MediaHash,
        length: Option<u64>,
        body: S,
    ) -> Result<MediaGrant, ApiError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        if let Some(grant) = self.claim(user, id).await? {
            return Ok(grant);
        }
        let length = length.ok_or_else(|| {
            ApiError::new(
                ErrorCode::LengthRequired,
                "a media upload needs Content-Length",
            )
        })?;
        let upload = self.create_upload(user, length, Some(id)).await?;
        let result = self.append(user, &upload.id, 0, body, None).await;
        match result {
            Ok(Appended {
                completed: Some(grant),
                ..
            }) => {
                // Nobody resumes a PUT: its upload record has served its purpose.
                if let Err(e) = self.store.delete_upload(&upload.id).await {
                    tracing::warn!(error = %e, "cannot delete a finished upload record");
                }
                Ok(grant)
            }
            Ok(_) => {
                self.discard(&upload.id).await;
                Err(ApiError::bad_request(
                    "the body ended before Content-Length bytes",
                ))
            }
            Err(e) => {
                self.discard(&upload.id).await;
                Err(e)
            }
        }
    }

    // --- resumable uploads ---

    pub async fn create_upload(
        &self,
        user: u64,
        length: u64,
        expected: Option<MediaHash>,
    ) -> Result<UploadRecord, ApiError> {
        if length > self.config.max_object_bytes {
            return Err(ApiError::new(
                ErrorCode::TooLarge,
                format!(
                    "media objects are at most {} bytes",
                    self.config.max_object_bytes
                ),
            ));
        }
        let mut raw = [0u8; 16];
        rand::rng().fill_bytes(&mut raw);
        let id = hex::encode(raw);
        let now = self.clock.now_ms();
        let expires =
            now.saturating_add((self.config.upload_expiry_hours as i64).saturating_mul(3_600_000));
        // The file first: a row without a file would read as offset 0, a file without a row is
        // swept as garbage.
        tokio::fs::File::create(self.staged(&id))
            .await
            .map_err(io_error)?;
        let new = NewUpload {
            id: id.clone(),
            user,
            length,
            expected,
            now_ms: now,
            expires_at_ms: expires,
        };
        if let Err(e) = self.store.create_upload(new, self.limits()).await {
            let _ = tokio::fs::remove_file(self.staged(&id)).await;
            return Err(e.into());
        }
        Ok(UploadRecord {
            id,
            user,
            length,
            expected,
            created_at_ms: now,
            expires_at_ms: expires,
            media: None,
        })
    }

    /// An upload of `user` and its offset (bytes durably received).
    pub async fn upload(&self, user: u64, id: &str) -> Result<(UploadRecord, u64), ApiError> {
        let not_found = || ApiError::new(ErrorCode::NotFound, "upload not found");
        if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(not_found());
        }
        let up = self.store.upload(id).await?.ok_or_else(not_found)?;
        if up.user != user || up.expires_at_ms <= self.clock.now_ms() {
            return Err(not_found());
        }
        if up.media.is_some() {
            return Ok((up.clone(), up.length));
        }
        let offset = match tokio::fs::metadata(self.staged(id)).await {
            Ok(m) => m.len().min(up.length),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(io_error(e)),
        };
        Ok((up, offset))
    }

    /// Appends a request body at `offset` (which must be the current offset); completes the
    /// upload when its last byte arrives.
    pub async fn append<S, E>(
        &self,
        user: u64,
        id: &str,
        offset: u64,
        mut body: S,
        checksum: Option<Checksum>,
    ) -> Result<Appended, ApiError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let (up, current) = self.upload(user, id).await?;
        let _busy = self.claim_busy(id)?;
        if up.media.is_some() {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                "the upload is already complete",
            ));
        }
        if offset != current {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                format!("Upload-Offset is {current}, not {offset}"),
            ));
        }
        let path = self.staged(id);
        let mut hash = self.take_hash(id, offset);
        let mut rollback = Rollback {
            path: path.clone(),
            offset,
            armed: checksum.is_some(),
        };
        let file = tokio::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .await
            .map_err(io_error)?;
        let mut out = tokio::io::BufWriter::with_capacity(WRITE_BUFFER, file);
        let mut sha1 = matches!(checksum, Some(Checksum::Sha1(_))).then(sha1::Sha1::new);
        let mut sha256 = matches!(checksum, Some(Checksum::Sha256(_))).then(Sha256::new);
        let room = up.length - offset;
        let mut written = 0u64;
        let mut cut_off = None;
        while let Some(chunk) = body.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    cut_off = Some(e.to_string());
                    break;
                }
            };
            if written + chunk.len() as u64 > room {
                // Let every write land before the rollback truncates behind it.
                let _ = out.flush().await;
                rollback.armed = true;
                return Err(ApiError::new(
                    ErrorCode::TooLarge,
                    format!("the body goes past Upload-Length ({})", up.length),
                ));
            }
            if let Some(h) = sha1.as_mut() {
                h.update(&chunk);
            }
            if let Some(h) = sha256.as_mut() {
                h.update(&chunk);
            }
            if let Some((_, h)) = hash.as_mut() {
                h.update(&chunk);
            }
            out.write_all(&chunk).await.map_err(io_error)?;
            written += chunk.len() as u64;
            metrics::counter!("tern_media_upload_bytes_total").increment(chunk.len() as u64);
        }
        out.flush().await.map_err(io_error)?;
        out.get_ref().sync_data().await.map_err(io_error)?;
        if let Some(reason) = cut_off {
            // Keep what arrived (unless a checksum covers the whole body): that is the resume.
            tracing::debug!(upload = id, %reason, written, "upload request cut off");
            if !rollback.armed {
                self.put_hash(id, hash.map(|(n, h)| (n + written, h)));
            }
            return Err(ApiError::bad_request(
                "the request body was cut off; HEAD the upload and resume",
            ));
        }
        let matches = match (&checksum, sha1, sha256) {
            (Some(Checksum::Sha1(want)), Some(h), _) => h.finalize().as_slice() == want.as_slice(),
            (Some(Checksum::Sha256(want)), _, Some(h)) => {
                h.finalize().as_slice() == want.as_slice()
            }
            _ => true,
        };
        if !matches {
            return Err(ApiError::new(
                ErrorCode::ChecksumMismatch,
                "Upload-Checksum does not match the body; it was discarded",
            ));
        }
        rollback.armed = false;
        let offset = offset + written;
        if offset < up.length {
            self.put_hash(id, hash.map(|(n, h)| (n + written, h)));
            return Ok(Appended {
                offset,
                completed: None,
            });
        }
        let digest = match hash {
            Some((_, h)) => h.finalize().into(),
            None => hash_file(path.clone()).await?,
        };
        let grant = self.complete(&up, digest, path).await?;
        Ok(Appended {
            offset,
            completed: Some(grant),
        })
    }

    async fn complete(
        &self,
        up: &UploadRecord,
        digest: MediaHash,
        staged: PathBuf,
    ) -> Result<MediaGrant, ApiError> {
        if let Some(expected) = up.expected
            && expected != digest
        {
            self.discard(&up.id).await;
            return Err(ApiError::new(
                ErrorCode::ChecksumMismatch,
                format!(
                    "the upload hashes to {}, not {}; it was discarded",
                    hex::encode(digest),
                    hex::encode(expected)
                ),
            ));
        }
        let _object = self.lock_of(&digest).lock().await;
        if self.store.media(digest).await?.is_some() {
            let _ = tokio::fs::remove_file(&staged).await;
        } else {
            self.blobs
                .put_file(&digest, &staged)
                .await
                .map_err(blob_error)?;
        }
        let now = self.clock.now_ms();
        let grant = self
            .store
            .finish_upload(&up.id, digest, up.length, self.retention_end(now), now)
            .await?;
        self.forget_live(&up.id);
        metrics::counter!("tern_media_objects_stored_total").increment(u64::from(grant.created));
        Ok(grant)
    }

    /// Terminates an upload of `user` (tus termination).
    pub async fn terminate(&self, user: u64, id: &str) -> Result<(), ApiError> {
        self.upload(user, id).await?;
        let _busy = self.claim_busy(id)?;
        self.discard(id).await;
        Ok(())
    }

    /// Forgets an upload: its row, its staging file, its live state.
    async fn discard(&self, id: &str) {
        if let Err(e) = self.store.delete_upload(id).await {
            tracing::warn!(error = %e, "cannot delete an upload record");
        }
        match tokio::fs::remove_file(self.staged(id)).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(error = %e, "cannot delete a staged upload"),
        }
        self.forget_live(id);
    }

    fn claim_busy(&self, id: &str) -> Result<Busy<'_>, ApiError> {
        let mut live = self
            .live
            .lock()
            .map_err(|_| ApiError::new(ErrorCode::Internal, "upload state poisoned"))?;
        let l = live.entry(id.to_owned()).or_default();
        if l.busy {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                "another request is writing to this upload; retry",
            ));
        }
        l.busy = true;
        Ok(Busy {
            media: self,
            id: id.to_owned(),
        })
    }

    /// The running hash if it covers exactly the first `offset` bytes.
    fn take_hash(&self, id: &str, offset: u64) -> Option<(u64, Sha256)> {
        if offset == 0 {
            return Some((0, Sha256::new()));
        }
        let mut live = self.live.lock().ok()?;
        match live.get_mut(id)?.hash.take() {
            Some((n, h)) if n == offset => Some((n, h)),
            _ => None,
        }
    }

    fn put_hash(&self, id: &str, hash: Option<(u64, Sha256)>) {
        if let Ok(mut live) = self.live.lock()
            && let Some(l) = live.get_mut(id)
        {
            l.hash = hash;
        }
    }

    fn forget_live(&self, id: &str) {
        if let Ok(mut live) = self.live.lock() {
            live.remove(id);
        }
    }

    fn is_busy(&self, id: &str) -> bool {
        self.live
            .lock()
            .map(|l| l.get(id).is_some_and(|l| l.busy))
            .unwrap_or(true)
    }

    // --- garbage collection ---

    /// Deletes expired uploads and objects that no live reference holds, in batches.
    pub async fn collect_garbage(&self, now_ms: i64) -> Result<GcReport, ApiError> {
        let mut report = GcReport::default();
        loop {
            let garbage = self.store.media_garbage(now_ms, GC_BATCH).await?;
            let (uploads, objects) = (garbage.expired_uploads.len(), garbage.unreferenced.len());
            for id in garbage.expired_uploads {
                if !self.is_busy(&id) {
                    self.discard(&id).await;
                    report.uploads += 1;
                }
            }
            for id in garbage.unreferenced {
                let _object = self.lock_of(&id).lock().await;
                if self.store.forget_media(id, now_ms).await? {
                    self.blobs.delete(&id).await.map_err(blob_error)?;
                    report.objects += 1;
                }
            }
            if uploads < GC_BATCH && objects < GC_BATCH {
                break;
            }
        }
        report.uploads += self.sweep_staging().await?;
        metrics::counter!("tern_media_gc_uploads_total").increment(report.uploads as u64);
        metrics::counter!("tern_media_gc_objects_total").increment(report.objects as u64);
        Ok(report)
    }
}

impl Media {
    /// Deletes staging files that no upload record names (a crash between creating the file
    /// and recording the upload, or a failed delete), once they are older than an hour.
    async fn sweep_staging(&self) -> Result<usize, ApiError> {
        let mut dir = tokio::fs::read_dir(&self.staging).await.map_err(io_error)?;
        let mut swept = 0;
        while let Some(entry) = dir.next_entry().await.map_err(io_error)? {
            let name = entry.file_name();
            let Some(id) = name.to_str() else { continue };
            let old = entry
                .metadata()
                .await
                .ok()
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age.as_secs() > 3600);
            if old && !self.is_busy(id) && self.store.upload(id).await?.is_none() {
                let _ = tokio::fs::remove_file(entry.path()).await;
                swept += 1;
            }
        }
        Ok(swept)
    }
}

/// SHA-256 of a file, read in 1 MiB pieces on a blocking thread.
async fn hash_file(path: PathBuf) -> Result<MediaHash, ApiError> {
    tokio::task::spawn_blocking(move || -> std::io::Result<MediaHash> {
        let mut f = std::fs::File::open(path)?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                return Ok(h.finalize().into());
            }
            h.update(&buf[..n]);
        }
    })
    .await
    .map_err(|e| ApiError::new(ErrorCode::Internal, format!("hash task failed: {e}")))?
    .map_err(io_error)
}
