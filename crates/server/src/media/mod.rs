//! The media service (PROTOCOL.md §8): content-addressed objects, resumable uploads, quotas,
//! references and garbage collection. Bytes stream through in bounded chunks both ways; the
//! metadata is in the [`Store`], the bytes in a [`BlobStore`], and incomplete uploads in a
//! [`Staging`] area: files on the node's disk, or the S3 bucket itself (so that an upload
//! begun through one node resumes through any other).
//!
//! Uploads (tus and whole-object `PUT` alike) are appended by one request at a time: the
//! request holds the upload's lease (`u:<id>`) in the store, whichever node it reached. Its
//! committed bytes are durable before an offset is reported, so an interrupted upload
//! resumes where they end. Completion verifies the hash, publishes the bytes as the object
//! and records the object and the uploader's reference.
//!
//! An object's record is written after its bytes and deleted before them, and both steps hold
//! the object's lease (`m:<id>`), so a record never names missing bytes (a crash can leave
//! orphaned bytes, never a dangling record). Garbage collection holds the lease `gc`: one node
//! collects at a time.

pub mod blob;
pub mod lease;
pub mod range;
#[cfg(feature = "s3")]
pub mod s3;
pub mod staging;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use rand::RngCore;
use sha2::{Digest, Sha256};
use tern_proto::ErrorCode;
use tern_store::{MediaGrant, MediaHash, MediaLimits, MediaRecord, NewUpload, Store, UploadRecord};

use crate::config::MediaConfig;
use crate::error::ApiError;
use crate::services::Clock;
pub use blob::{BlobError, BlobStore, ByteStream, FsBlobs};
use lease::{Lease, Leases};
use staging::{Committed, Staged};
pub use staging::{FileStaging, Staging, StagingError};

/// Garbage handled per store round trip.
const GC_BATCH: usize = 256;
/// How long a completing upload waits for another holder of its object's lease.
const OBJECT_PATIENCE: Duration = Duration::from_secs(10);

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

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GcReport {
    pub uploads: usize,
    pub objects: usize,
    /// Another node (or an earlier pass still running) held the collection's lease: this
    /// pass did nothing.
    pub skipped: bool,
}

pub struct Media {
    store: Arc<dyn Store>,
    blobs: Arc<dyn BlobStore>,
    staging: Arc<dyn Staging>,
    clock: Arc<dyn Clock>,
    config: MediaConfig,
    leases: Leases,
    /// Requests writing to uploads at once (each buffers up to a staging part).
    writers: tokio::sync::Semaphore,
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

fn unavailable(what: &str, e: impl std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "{what} failed");
    ApiError::busy("storage failure; retry later", 1)
}

fn blob_error(e: BlobError) -> ApiError {
    match e {
        BlobError::NotFound => ApiError::new(ErrorCode::NotFound, "media not found"),
        e => unavailable("blob store", e),
    }
}

fn staging_error(e: StagingError) -> ApiError {
    match e {
        StagingError::Store(e) => e.into(),
        StagingError::Moved => ApiError::new(
            ErrorCode::Conflict,
            "the upload moved under this request; HEAD it and resume",
        ),
        e => unavailable("upload staging", e),
    }
}

/// How old an unnamed staged piece must be before garbage collection deletes it.
const STAGING_ORPHAN_AGE: Duration = Duration::from_secs(3600);

fn busy() -> ApiError {
    ApiError {
        retry_after: Some(Duration::from_secs(1)),
        ..ApiError::new(
            ErrorCode::Conflict,
            "another request is writing to this upload; retry",
        )
    }
}

/// Most of a refused request's body read and dropped before the answer goes out.
const DRAIN_BYTES: usize = 8 << 20;
/// The longest a refused request's body is read for.
const DRAIN_TIME: Duration = Duration::from_secs(2);

/// Reads what is left of a refused request's body, within bounds, before the answer: a server
/// that closes a connection with unread bytes resets it, and the client (or the proxy in
/// front, which then answers 502) sees the reset instead of the answer.
async fn drain<S, E>(body: &mut S)
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
{
    let _ = tokio::time::timeout(DRAIN_TIME, async {
        let mut read = 0;
        while let Some(Ok(chunk)) = body.next().await {
            read += chunk.len();
            if read > DRAIN_BYTES {
                break;
            }
        }
    })
    .await;
}

/// Counts a request writing upload bytes (`tern_media_upload_writers`) while it lives.
struct Writing;

impl Writing {
    fn new() -> Writing {
        metrics::gauge!("tern_media_upload_writers").increment(1.0);
        Writing
    }
}

impl Drop for Writing {
    fn drop(&mut self) {
        metrics::gauge!("tern_media_upload_writers").decrement(1.0);
    }
}

impl Media {
    pub fn new(
        store: Arc<dyn Store>,
        blobs: Arc<dyn BlobStore>,
        staging: Arc<dyn Staging>,
        clock: Arc<dyn Clock>,
        config: MediaConfig,
    ) -> Media {
        Media {
            leases: Leases::new(store.clone(), clock.clone()),
            writers: tokio::sync::Semaphore::new(config.max_concurrent_writes),
            store,
            blobs,
            staging,
            clock,
            config,
        }
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

    async fn upload_lease(&self, id: &str) -> Result<Option<Lease>, ApiError> {
        Ok(self.leases.try_take(format!("u:{id}")).await?)
    }

    async fn object_lease(
        &self,
        id: &MediaHash,
        patience: Duration,
    ) -> Result<Option<Lease>, ApiError> {
        Ok(self
            .leases
            .take(format!("m:{}", hex::encode(id)), patience)
            .await?)
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
        let mut body = body.fuse();
        let created = match length {
            None => Err(ApiError::new(
                ErrorCode::LengthRequired,
                "a media upload needs Content-Length",
            )),
            Some(length) => self.create_upload(user, length, Some(id)).await,
        };
        let upload = match created {
            Ok(upload) => upload,
            Err(e) => {
                drain(&mut body).await;
                return Err(e);
            }
        };
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
                self.discard(&upload).await;
                Err(ApiError::bad_request(
                    "the body ended before Content-Length bytes",
                ))
            }
            Err(e) => {
                self.discard(&upload).await;
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
        // The staging area first: a row without one reads as offset 0, one without a row is
        // swept as garbage.
        self.staging.create(&id).await.map_err(staging_error)?;
        let new = NewUpload {
            id: id.clone(),
            user,
            length,
            expected,
            now_ms: now,
            expires_at_ms: expires,
        };
        let up = UploadRecord {
            id: id.clone(),
            user,
            length,
            expected,
            created_at_ms: now,
            expires_at_ms: expires,
            media: None,
            received: 0,
            staging: None,
        };
        if let Err(e) = self.store.create_upload(new, self.limits()).await {
            self.staging.discard(&up).await;
            return Err(e.into());
        }
        Ok(up)
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
        let offset = self.staging.offset(&up).await.map_err(staging_error)?;
        Ok((up, offset))
    }

    /// Appends a request body at `offset` (which must be the current offset); completes the
    /// upload when its last byte arrives.
    pub async fn append<S, E>(
        &self,
        user: u64,
        id: &str,
        offset: u64,
        body: S,
        checksum: Option<Checksum>,
    ) -> Result<Appended, ApiError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        // Fused: the drain must not poll a body that has already ended.
        let mut body = body.fuse();
        let result = self.append_to(user, id, offset, &mut body, checksum).await;
        if result.is_err() {
            drain(&mut body).await;
        }
        result
    }

    async fn append_to<S, E>(
        &self,
        user: u64,
        id: &str,
        offset: u64,
        body: &mut S,
        checksum: Option<Checksum>,
    ) -> Result<Appended, ApiError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        self.upload(user, id).await?;
        let _permit = self
            .writers
            .try_acquire()
            .map_err(|_| ApiError::busy("too many uploads are being written to; retry", 1))?;
        let lease = self.upload_lease(id).await?.ok_or_else(busy)?;
        let _writing = Writing::new();
        // Read again under the lease: the previous writer may have moved it.
        let (up, current) = self.upload(user, id).await?;
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
        let mut out = self
            .staging
            .open(&up, offset, checksum.is_some(), lease.watch())
            .await
            .map_err(staging_error)?;
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
            if lease.lost() {
                out.abort().await;
                return Err(busy());
            }
            if written + chunk.len() as u64 > room {
                out.abort().await;
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
            let n = chunk.len() as u64;
            if let Err(e) = out.write(chunk).await {
                out.abort().await;
                return Err(staging_error(e));
            }
            written += n;
            metrics::counter!("tern_media_upload_bytes_total").increment(n);
        }
        if let Some(reason) = cut_off {
            // Keep what arrived (unless a checksum covers the whole body): that is the resume.
            tracing::debug!(upload = id, %reason, written, "upload request cut off");
            if checksum.is_some() {
                out.abort().await;
            } else {
                out.commit().await.map_err(staging_error)?;
            }
            lease.release().await;
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
            out.abort().await;
            lease.release().await;
            return Err(ApiError::new(
                ErrorCode::ChecksumMismatch,
                "Upload-Checksum does not match the body; it was discarded",
            ));
        }
        let result = match out.commit().await.map_err(staging_error)? {
            Committed::Partial(offset) => Ok(Appended {
                offset,
                completed: None,
            }),
            Committed::Complete { digest, staged } => self
                .complete(&up, digest, staged, &lease)
                .await
                .map(|grant| Appended {
                    offset: up.length,
                    completed: Some(grant),
                }),
        };
        lease.release().await;
        result
    }

    /// Makes the complete upload `up` its object. Where this fails halfway the upload is left
    /// resumable (`Staging::recover`): from its offset if the staged bytes survived, else from
    /// 0; never stuck.
    async fn complete(
        &self,
        up: &UploadRecord,
        digest: MediaHash,
        staged: Box<dyn Staged>,
        upload: &Lease,
    ) -> Result<MediaGrant, ApiError> {
        if let Some(expected) = up.expected
            && expected != digest
        {
            staged.discard().await;
            self.discard(up).await;
            return Err(ApiError::new(
                ErrorCode::ChecksumMismatch,
                format!(
                    "the upload hashes to {}, not {}; it was discarded",
                    hex::encode(digest),
                    hex::encode(expected)
                ),
            ));
        }
        let object = self
            .object_lease(&digest, OBJECT_PATIENCE)
            .await?
            .ok_or_else(|| {
                ApiError::busy(
                    "the object is being stored or collected elsewhere; retry",
                    1,
                )
            })?;
        if upload.lost() || object.lost() {
            return Err(busy());
        }
        let stored = match self.store.media(digest).await {
            Ok(Some(_)) => {
                staged.discard().await;
                Ok(())
            }
            Ok(None) => staged.publish(&digest).await.map_err(staging_error),
            Err(e) => Err(e.into()),
        };
        if let Err(e) = stored {
            object.release().await;
            self.recover(up, false).await;
            return Err(e);
        }
        let now = self.clock.now_ms();
        let grant = self
            .store
            .finish_upload(&up.id, digest, up.length, self.retention_end(now), now)
            .await;
        object.release().await;
        let grant = match grant {
            Ok(grant) => grant,
            Err(e) => {
                self.recover(up, true).await;
                return Err(e.into());
            }
        };
        metrics::counter!("tern_media_objects_stored_total").increment(u64::from(grant.created));
        Ok(grant)
    }

    /// Leaves `up` resumable after a failed completion (see [`Staging::recover`]).
    async fn recover(&self, up: &UploadRecord, consumed: bool) {
        if let Err(e) = self.staging.recover(up, consumed).await {
            tracing::warn!(upload = %up.id, error = %e, "cannot make a failed upload resumable");
        }
    }

    /// Terminates an upload of `user` (tus termination).
    pub async fn terminate(&self, user: u64, id: &str) -> Result<(), ApiError> {
        let (up, _) = self.upload(user, id).await?;
        let lease = self.upload_lease(id).await?.ok_or_else(busy)?;
        self.discard(&up).await;
        lease.release().await;
        Ok(())
    }

    /// Forgets an upload: its row, then its staged bytes (as the row last described them).
    async fn discard(&self, up: &UploadRecord) {
        let latest = match self.store.upload(&up.id).await {
            Ok(Some(latest)) => latest,
            _ => up.clone(),
        };
        if let Err(e) = self.store.delete_upload(&up.id).await {
            tracing::warn!(error = %e, "cannot delete an upload record");
        }
        self.staging.discard(&latest).await;
    }

    // --- garbage collection ---

    /// Deletes expired uploads and objects that no live reference holds, in batches, unless
    /// another node is collecting (then the report says `skipped`).
    pub async fn collect_garbage(&self, now_ms: i64) -> Result<GcReport, ApiError> {
        let Some(gc) = self.leases.try_take("gc".into()).await? else {
            metrics::counter!("tern_media_gc_skipped_total").increment(1);
            return Ok(GcReport {
                skipped: true,
                ..GcReport::default()
            });
        };
        let result = self.collect(now_ms, &gc).await;
        gc.release().await;
        result
    }

    async fn collect(&self, now_ms: i64, gc: &Lease) -> Result<GcReport, ApiError> {
        let mut report = GcReport::default();
        loop {
            let garbage = self.store.media_garbage(now_ms, GC_BATCH).await?;
            let (uploads, objects) = (garbage.expired_uploads.len(), garbage.unreferenced.len());
            let before = report;
            for id in garbage.expired_uploads {
                // One being written to is left for the next pass.
                if let (Some(lease), Some(up)) =
                    (self.upload_lease(&id).await?, self.store.upload(&id).await?)
                {
                    self.discard(&up).await;
                    lease.release().await;
                    report.uploads += 1;
                }
            }
            for id in garbage.unreferenced {
                let Some(lease) = self.object_lease(&id, Duration::ZERO).await? else {
                    continue;
                };
                let forgotten = self.store.forget_media(id, now_ms).await;
                let deleted = match forgotten {
                    Ok(true) => self
                        .blobs
                        .delete(&id)
                        .await
                        .map_err(blob_error)
                        .map(|()| true),
                    Ok(false) => Ok(false),
                    Err(e) => Err(e.into()),
                };
                lease.release().await;
                report.objects += usize::from(deleted?);
            }
            let stuck = report == before;
            if (uploads < GC_BATCH && objects < GC_BATCH) || stuck || gc.lost() {
                break;
            }
        }
        report.uploads += self
            .staging
            .sweep(&*self.store, STAGING_ORPHAN_AGE)
            .await
            .map_err(staging_error)?;
        if let Err(e) = self.leases.forget_expired().await {
            tracing::warn!(error = %e, "cannot delete expired leases");
        }
        metrics::counter!("tern_media_gc_uploads_total").increment(report.uploads as u64);
        metrics::counter!("tern_media_gc_objects_total").increment(report.objects as u64);
        Ok(report)
    }
}
