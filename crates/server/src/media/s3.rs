//! Media in any `object_store` backend; configured for S3-compatible storage (AWS S3, MinIO,
//! Ceph RGW, …) from `[media.s3]` (feature `s3`).
//!
//! On S3, incomplete uploads are staged in the bucket too ([`PartStaging`]), so that any node
//! resumes any upload: each upload is an S3 multipart upload at `uploads/<upload id>` whose
//! parts are 5 MiB; the bytes after the last whole part wait in a small object of their own
//! (`uploads/<upload id>.tail.<random>`) until the next request completes the part. What is
//! staged, and the running SHA-256 (its serialized state), is recorded in the upload's row
//! ([`Store::advance_upload`]) after every part and at the end of every request: the row is
//! the offset. The last request completes the multipart upload and copies it, server-side, to
//! the object's name (`media/<ab>/<id>`); an upload of less than a part is put there at once.
//!
//! Other stores (tests use `object_store`'s local file system) stage on the node's disk; a
//! complete object is then copied up as a multipart upload in 8 MiB parts with a bounded
//! number in flight, so memory stays flat whatever the object's size.

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures_util::{StreamExt, TryStreamExt};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, ObjectStore, ObjectStoreExt, WriteMultipart};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::digest::common::hazmat::{SerializableState, SerializedState};
use sha2::{Digest, Sha256};
use tern_store::{MediaHash, Store, UploadRecord};
use tokio::io::AsyncReadExt;

/// The `object_store` crate this backend is built on, for callers that bring their own store.
pub use object_store;

use super::blob::{BlobError, BlobStore, ByteStream};
use super::lease::LeaseWatch;
use super::staging::{Appender, Committed, Staged, Staging, StagingError};
use crate::config::S3Config;

/// Bytes per multipart part (S3 wants at least 5 MiB for all parts but the last).
const PART: usize = 8 << 20;
/// Parts uploading at once.
const PARTS_IN_FLIGHT: usize = 2;

pub struct ObjectStoreBlobs {
    store: Arc<dyn ObjectStore>,
    multipart: Option<Arc<dyn MultipartStore>>,
}

impl std::fmt::Debug for ObjectStoreBlobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ObjectStoreBlobs({})", self.store)
    }
}

fn backend(e: object_store::Error) -> BlobError {
    match e {
        object_store::Error::NotFound { .. } => BlobError::NotFound,
        e => BlobError::Backend(e.to_string()),
    }
}

fn location(id: &MediaHash) -> ObjectPath {
    let hex = hex::encode(id);
    ObjectPath::from(format!("media/{}/{hex}", &hex[..2]))
}

impl ObjectStoreBlobs {
    /// Any object store (tests use `object_store`'s local file system).
    pub fn new(store: Arc<dyn ObjectStore>) -> ObjectStoreBlobs {
        ObjectStoreBlobs {
            store,
            multipart: None,
        }
    }

    /// Staging in the bucket, for a store that has multipart uploads (S3 has); the upload
    /// rows live in `meta`.
    pub fn staging(&self, meta: Arc<dyn Store>) -> Option<PartStaging> {
        Some(PartStaging {
            store: self.store.clone(),
            multipart: self.multipart.clone()?,
            meta,
        })
    }

    /// An S3-compatible bucket; empty settings fall back to the `AWS_*` environment.
    pub fn s3(c: &S3Config) -> Result<ObjectStoreBlobs, BlobError> {
        // The S3 client's TLS (reqwest over rustls, built without a provider of its own) uses
        // the process default: ring, the one crypto library tern links. Installing is
        // idempotent; an error only says a default is already in place.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut b = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(&c.bucket);
        if !c.region.is_empty() {
            b = b.with_region(&c.region);
        }
        if !c.endpoint.is_empty() {
            b = b.with_endpoint(&c.endpoint);
        }
        if !c.access_key_id.is_empty() {
            b = b.with_access_key_id(&c.access_key_id);
        }
        if !c.secret_access_key.is_empty() {
            b = b.with_secret_access_key(&c.secret_access_key);
        }
        let store = Arc::new(b.with_allow_http(c.allow_http).build().map_err(backend)?);
        Ok(ObjectStoreBlobs {
            store: store.clone(),
            multipart: Some(store),
        })
    }
}

#[async_trait]
impl BlobStore for ObjectStoreBlobs {
    async fn put_file(&self, id: &MediaHash, staged: &Path) -> Result<(), BlobError> {
        let mut file = tokio::fs::File::open(staged).await?;
        let size = file.metadata().await?.len();
        if size < PART as u64 {
            // One request; a multipart upload needs at least one part and S3 parts 5 MiB.
            let mut bytes = Vec::with_capacity(size as usize);
            file.read_to_end(&mut bytes).await?;
            self.store
                .put(&location(id), bytes.into())
                .await
                .map_err(backend)?;
            tokio::fs::remove_file(staged).await?;
            return Ok(());
        }
        let upload = self
            .store
            .put_multipart(&location(id))
            .await
            .map_err(backend)?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            writer
                .wait_for_capacity(PARTS_IN_FLIGHT)
                .await
                .map_err(backend)?;
            writer.write(&buf[..n]);
        }
        writer.finish().await.map_err(backend)?;
        tokio::fs::remove_file(staged).await?;
        Ok(())
    }

    async fn get(&self, id: &MediaHash, range: Range<u64>) -> Result<ByteStream, BlobError> {
        if range.is_empty() {
            return Ok(Box::pin(futures_util::stream::empty()));
        }
        let got = self
            .store
            .get_opts(&location(id), GetOptions::new().with_range(Some(range)))
            .await
            .map_err(backend)?;
        Ok(Box::pin(
            got.into_stream()
                .map_err(|e| std::io::Error::other(e.to_string()))
                .boxed(),
        ))
    }

    async fn delete(&self, id: &MediaHash) -> Result<(), BlobError> {
        match self.store.delete(&location(id)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(backend(e)),
        }
    }

    async fn contains(&self, id: &MediaHash) -> Result<bool, BlobError> {
        match self.store.head(&location(id)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(backend(e)),
        }
    }
}

/// Bytes per staged part: S3's least for all parts but the last.
pub const STAGED_PART: usize = 5 << 20;

/// Staged pieces one sweep looks at, at most.
const SWEEP_LIMIT: usize = 100_000;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn staging_location(upload: &str) -> ObjectPath {
    ObjectPath::from(format!("uploads/{upload}"))
}

fn store_error(e: object_store::Error) -> StagingError {
    StagingError::Blob(backend(e))
}

/// What an upload's row says of its staged bytes (JSON in `uploads.staging`).
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct PartState {
    /// The S3 multipart upload, once the first whole part went up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    multipart: Option<String>,
    /// The parts' content ids (ETags), in order; each is [`STAGED_PART`] bytes.
    #[serde(default)]
    parts: Vec<String>,
    /// The object holding the bytes after the last whole part, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tail: Option<String>,
    /// The serialized SHA-256 state of every received byte, in hex.
    hash: String,
}

impl PartState {
    fn parse(up: &UploadRecord) -> Result<PartState, StagingError> {
        match &up.staging {
            None => Ok(PartState {
                hash: encode_hash(&Sha256::new()),
                ..PartState::default()
            }),
            Some(raw) => serde_json::from_slice(raw).map_err(|e| {
                StagingError::Blob(BlobError::Backend(format!(
                    "upload {} has an unreadable staging state: {e}",
                    up.id
                )))
            }),
        }
    }

    fn hasher(&self) -> Result<Sha256, StagingError> {
        let bad = || StagingError::Blob(BlobError::Backend("a bad staged hash state".into()));
        let raw = hex::decode(&self.hash).map_err(|_| bad())?;
        let state = SerializedState::<Sha256>::try_from(raw.as_slice()).map_err(|_| bad())?;
        Sha256::deserialize(&state).map_err(|_| bad())
    }
}

fn encode_hash(h: &Sha256) -> String {
    hex::encode(h.serialize().as_slice())
}

/// Uploads staged in the bucket (see the module's documentation).
pub struct PartStaging {
    store: Arc<dyn ObjectStore>,
    multipart: Arc<dyn MultipartStore>,
    meta: Arc<dyn Store>,
}

impl PartStaging {
    async fn delete_quietly(&self, path: &ObjectPath) {
        match self.store.delete(path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => tracing::warn!(error = %e, "cannot delete a staged piece"),
        }
    }
}

#[async_trait]
impl Staging for PartStaging {
    async fn create(&self, _id: &str) -> Result<(), StagingError> {
        // Nothing until the first byte: the multipart upload starts with the first part.
        Ok(())
    }

    async fn offset(&self, up: &UploadRecord) -> Result<u64, StagingError> {
        Ok(up.received.min(up.length))
    }

    async fn open(
        &self,
        up: &UploadRecord,
        offset: u64,
        atomic: bool,
        lease: LeaseWatch,
    ) -> Result<Box<dyn Appender>, StagingError> {
        if offset != up.received {
            return Err(StagingError::Moved);
        }
        let state = PartState::parse(up)?;
        let hash = state.hasher()?;
        let mut buffer = BytesMut::new();
        if let Some(tail) = &state.tail {
            let got = self
                .store
                .get(&ObjectPath::from(tail.as_str()))
                .await
                .map_err(store_error)?;
            buffer.extend_from_slice(&got.bytes().await.map_err(store_error)?);
        }
        let whole = (state.parts.len() * STAGED_PART) as u64;
        if whole + buffer.len() as u64 != offset {
            return Err(StagingError::Blob(BlobError::Backend(format!(
                "upload {} stages {} bytes, its row says {offset}",
                up.id,
                whole + buffer.len() as u64
            ))));
        }
        Ok(Box::new(PartAppender {
            staging: PartStaging {
                store: self.store.clone(),
                multipart: self.multipart.clone(),
                meta: self.meta.clone(),
            },
            id: up.id.clone(),
            length: up.length,
            atomic,
            recorded: offset,
            hashed: buffer.len(),
            buffer,
            hash,
            obsolete: Vec::new(),
            unrecorded_tail: None,
            created_multipart: false,
            lease,
            state,
        }))
    }

    async fn discard(&self, up: &UploadRecord) {
        let Ok(state) = PartState::parse(up) else {
            return;
        };
        if let Some(m) = &state.multipart
            && let Err(e) = self
                .multipart
                .abort_multipart(&staging_location(&up.id), m)
                .await
        {
            tracing::warn!(error = %e, "cannot abort a staged multipart upload");
        }
        if let Some(tail) = &state.tail {
            self.delete_quietly(&ObjectPath::from(tail.as_str())).await;
        }
        // A completed multipart upload not yet copied to its object (a crash in between).
        self.delete_quietly(&staging_location(&up.id)).await;
    }

    async fn recover(&self, up: &UploadRecord, consumed: bool) -> Result<(), StagingError> {
        let Some(latest) = self.meta.upload(&up.id).await? else {
            return Ok(());
        };
        if latest.media.is_some() {
            return Ok(());
        }
        // A multipart upload once completed is gone as such: its object is the evidence.
        let completed = match self.store.head(&staging_location(&up.id)).await {
            Ok(_) => true,
            Err(object_store::Error::NotFound { .. }) => false,
            Err(e) => return Err(store_error(e)),
        };
        if !consumed && !completed {
            return Ok(());
        }
        self.discard(&latest).await;
        let fresh = PartState {
            hash: encode_hash(&Sha256::new()),
            ..PartState::default()
        };
        let raw = serde_json::to_vec(&fresh)
            .map_err(|e| StagingError::Blob(BlobError::Backend(e.to_string())))?;
        if !self
            .meta
            .advance_upload(&up.id, latest.received, 0, raw)
            .await?
        {
            return Err(StagingError::Moved);
        }
        Ok(())
    }

    async fn sweep(&self, store: &dyn Store, min_age: Duration) -> Result<usize, StagingError> {
        // Tails put by a request that failed before recording them, or whose deletion failed,
        // and completed multipart uploads whose upload is gone: old pieces that no upload row
        // names. (A multipart upload never recorded is invisible here: that is
        // for the bucket's lifecycle rule, which aborts incomplete multipart uploads.)
        let cutoff = now_ms() - min_age.as_millis() as i64;
        let mut listed = self.store.list(Some(&ObjectPath::from("uploads")));
        let (mut seen, mut swept) = (0usize, 0usize);
        while let Some(meta) = listed.next().await {
            let meta = meta.map_err(store_error)?;
            seen += 1;
            if seen > SWEEP_LIMIT {
                break;
            }
            if meta.last_modified.timestamp_millis() > cutoff {
                continue;
            }
            let name = meta.location.as_ref().to_owned();
            let Some(rest) = name.strip_prefix("uploads/") else {
                continue;
            };
            let id = rest.split_once(".tail.").map_or(rest, |(id, _)| id);
            let named = match store.upload(id).await? {
                None => false,
                Some(up) if up.media.is_some() => false,
                // The completed multipart object of a live upload is for `recover`.
                Some(_) if id == rest => true,
                Some(up) => PartState::parse(&up)
                    .is_ok_and(|state| state.tail.as_deref() == Some(name.as_str())),
            };
            if !named {
                self.delete_quietly(&meta.location).await;
                swept += 1;
            }
        }
        Ok(swept)
    }
}

struct PartAppender {
    staging: PartStaging,
    id: String,
    length: u64,
    atomic: bool,
    /// The offset the row records (for the compare-and-set of the next record).
    recorded: u64,
    state: PartState,
    /// The bytes after the last whole part: the old tail, then this request's.
    buffer: BytesMut,
    /// How many bytes at the start of `buffer` `hash` covers already.
    hashed: usize,
    /// The SHA-256 of every byte before `buffer`, and of its first `hashed` bytes.
    hash: Sha256,
    /// Tail objects to delete once a record no longer names them.
    obsolete: Vec<String>,
    /// A tail this request put and has not recorded yet (deleted if it never is).
    unrecorded_tail: Option<String>,
    /// This request began the multipart upload and has not recorded it yet.
    created_multipart: bool,
    /// The upload's lease: every step to the bucket or the row is taken only while it holds.
    lease: LeaseWatch,
}

impl PartAppender {
    fn offset(&self) -> u64 {
        (self.state.parts.len() * STAGED_PART + self.buffer.len()) as u64
    }

    fn hash_buffer(&mut self, upto: usize) {
        if upto > self.hashed {
            self.hash.update(&self.buffer[self.hashed..upto]);
            self.hashed = upto;
        }
    }

    fn still_held(&self) -> Result<(), StagingError> {
        if self.lease.lost() {
            Err(StagingError::Moved)
        } else {
            Ok(())
        }
    }

    /// Forgets what this request staged and never recorded.
    async fn forget_unrecorded(&mut self) {
        if let Some(tail) = self.unrecorded_tail.take() {
            self.staging
                .delete_quietly(&ObjectPath::from(tail.as_str()))
                .await;
        }
        // A multipart upload this request began and never recorded is nobody's.
        if self.created_multipart
            && let Some(m) = &self.state.multipart
            && let Err(e) = self
                .staging
                .multipart
                .abort_multipart(&staging_location(&self.id), m)
                .await
        {
            tracing::warn!(error = %e, "cannot abort a staged multipart upload");
        }
        self.created_multipart = false;
    }

    /// Puts the buffer up as the new tail, and records it.
    async fn persist_tail(&mut self) -> Result<(), StagingError> {
        if self.buffer.is_empty() {
            self.obsolete.extend(self.state.tail.take());
        } else {
            self.still_held()?;
            let end = self.buffer.len();
            self.hash_buffer(end);
            let mut raw = [0u8; 8];
            rand::rng().fill_bytes(&mut raw);
            let name = format!("uploads/{}.tail.{}", self.id, hex::encode(raw));
            // The appender ends with this commit: the buffer is not needed after.
            let bytes = std::mem::take(&mut self.buffer).freeze();
            self.unrecorded_tail = Some(name.clone());
            self.staging
                .store
                .put(&ObjectPath::from(name.as_str()), bytes.into())
                .await
                .map_err(store_error)?;
            self.obsolete.extend(self.state.tail.replace(name));
            self.hashed = end;
            return self.record_with_tail(end).await;
        }
        self.record_with_tail(0).await
    }

    async fn multipart_id(&mut self) -> Result<String, StagingError> {
        if let Some(m) = &self.state.multipart {
            return Ok(m.clone());
        }
        let m = self
            .staging
            .multipart
            .create_multipart(&staging_location(&self.id))
            .await
            .map_err(store_error)?;
        self.state.multipart = Some(m.clone());
        self.created_multipart = true;
        Ok(m)
    }

    /// Sends the first [`STAGED_PART`] bytes of the buffer up as the next part.
    async fn flush_part(&mut self) -> Result<(), StagingError> {
        self.still_held()?;
        self.hash_buffer(STAGED_PART);
        let m = self.multipart_id().await?;
        let part = self.buffer.split_to(STAGED_PART).freeze();
        self.hashed = 0;
        let id = self
            .staging
            .multipart
            .put_part(
                &staging_location(&self.id),
                &m,
                self.state.parts.len(),
                part.into(),
            )
            .await
            .map_err(store_error)?;
        self.state.parts.push(id.content_id);
        // The old tail is inside this part now.
        self.obsolete.extend(self.state.tail.take());
        if !self.atomic {
            let tail = if self.state.tail.is_some() {
                self.buffer.len()
            } else {
                0
            };
            self.record_with_tail(tail).await?;
        }
        Ok(())
    }

    /// Writes the row: the parts, the tail of `tail` bytes (the whole buffer, when there is
    /// one), and the hash of exactly those bytes.
    async fn record_with_tail(&mut self, tail: usize) -> Result<(), StagingError> {
        self.still_held()?;
        debug_assert_eq!(
            self.hashed, tail,
            "the hash covers exactly the durable bytes"
        );
        let durable = (self.state.parts.len() * STAGED_PART + tail) as u64;
        self.state.hash = encode_hash(&self.hash);
        let raw = serde_json::to_vec(&self.state)
            .map_err(|e| StagingError::Blob(BlobError::Backend(e.to_string())))?;
        if !self
            .staging
            .meta
            .advance_upload(&self.id, self.recorded, durable, raw)
            .await?
        {
            return Err(StagingError::Moved);
        }
        self.recorded = durable;
        self.created_multipart = false;
        self.unrecorded_tail = None;
        for tail in std::mem::take(&mut self.obsolete) {
            self.staging
                .delete_quietly(&ObjectPath::from(tail.as_str()))
                .await;
        }
        Ok(())
    }
}

#[async_trait]
impl Appender for PartAppender {
    async fn write(&mut self, chunk: Bytes) -> Result<(), StagingError> {
        self.buffer.extend_from_slice(&chunk);
        while self.buffer.len() >= STAGED_PART {
            self.flush_part().await?;
        }
        Ok(())
    }

    async fn commit(mut self: Box<Self>) -> Result<Committed, StagingError> {
        let offset = self.offset();
        if offset == self.length {
            let end = self.buffer.len();
            self.hash_buffer(end);
            let digest: MediaHash = self.hash.clone().finalize().into();
            let mut tails = std::mem::take(&mut self.obsolete);
            tails.extend(self.state.tail.take());
            return Ok(Committed::Complete {
                digest,
                staged: Box::new(StagedParts {
                    staging: self.staging,
                    id: self.id,
                    multipart: self.state.multipart,
                    parts: self.state.parts,
                    last: self.buffer.freeze(),
                    tails,
                }),
            });
        }
        if self.recorded == offset && self.hashed == self.buffer.len() {
            // Nothing new (an empty body).
            return Ok(Committed::Partial(offset));
        }
        match self.persist_tail().await {
            Ok(()) => Ok(Committed::Partial(offset)),
            Err(e) => {
                self.forget_unrecorded().await;
                Err(e)
            }
        }
    }

    async fn abort(mut self: Box<Self>) {
        // What was recorded stays; parts sent since are replaced by the next writer's.
        self.forget_unrecorded().await;
    }
}

/// A complete upload in the bucket: its parts and the bytes after them.
struct StagedParts {
    staging: PartStaging,
    id: String,
    multipart: Option<String>,
    parts: Vec<String>,
    last: Bytes,
    tails: Vec<String>,
}

#[async_trait]
impl Staged for StagedParts {
    async fn publish(self: Box<Self>, digest: &MediaHash) -> Result<(), StagingError> {
        let dest = location(digest);
        let store = &self.staging.store;
        match &self.multipart {
            None => {
                // Less than a part: the whole object is in memory.
                store
                    .put(&dest, self.last.clone().into())
                    .await
                    .map_err(store_error)?;
            }
            Some(m) => {
                let path = staging_location(&self.id);
                let mut parts: Vec<PartId> = self
                    .parts
                    .iter()
                    .map(|p| PartId {
                        content_id: p.clone(),
                    })
                    .collect();
                if !self.last.is_empty() {
                    let idx = parts.len();
                    parts.push(
                        self.staging
                            .multipart
                            .put_part(&path, m, idx, self.last.clone().into())
                            .await
                            .map_err(store_error)?,
                    );
                }
                self.staging
                    .multipart
                    .complete_multipart(&path, m, parts)
                    .await
                    .map_err(store_error)?;
                store.copy(&path, &dest).await.map_err(store_error)?;
                self.staging.delete_quietly(&path).await;
            }
        }
        for tail in &self.tails {
            self.staging
                .delete_quietly(&ObjectPath::from(tail.as_str()))
                .await;
        }
        Ok(())
    }

    async fn discard(self: Box<Self>) {
        if let Some(m) = &self.multipart
            && let Err(e) = self
                .staging
                .multipart
                .abort_multipart(&staging_location(&self.id), m)
                .await
        {
            tracing::warn!(error = %e, "cannot abort a staged multipart upload");
        }
        for tail in &self.tails {
            self.staging
                .delete_quietly(&ObjectPath::from(tail.as_str()))
                .await;
        }
    }
}
