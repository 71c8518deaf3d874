//! Where the bytes of an incomplete upload wait: the [`Staging`] trait, and its implementation
//! on the node's own disk ([`FileStaging`]). The S3 backend stages in the bucket instead
//! (`s3::PartStaging`), so that an upload begun through one node resumes through any other.
//!
//! A staging area is written by one request at a time (the media service holds the upload's
//! lease), through an [`Appender`]: what it commits is durable and is the upload's new offset;
//! what it aborts is forgotten. The appender keeps the upload's running SHA-256, so that the
//! object id is known the moment the last byte is committed.

use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use sha2::{Digest, Sha256};
use tern_store::{MediaHash, Store, StoreError, UploadRecord};
use tokio::io::AsyncWriteExt;

use super::blob::{BlobError, BlobStore};
use super::lease::LeaseWatch;

/// Bytes buffered between the request body and a staging file.
const WRITE_BUFFER: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum StagingError {
    #[error(transparent)]
    Blob(#[from] BlobError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("staging I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The upload's recorded state is not what this writer started from.
    #[error("the upload moved under this request")]
    Moved,
}

/// What committing an appender made of the upload.
pub enum Committed {
    /// Durable up to this offset; more bytes are due.
    Partial(u64),
    /// Every byte is in: the upload hashes to `digest`, and its bytes wait in `staged` to be
    /// published as that object (or discarded).
    Complete {
        digest: MediaHash,
        staged: Box<dyn Staged>,
    },
}

/// The staging areas of resumable uploads.
#[async_trait]
pub trait Staging: Send + Sync + 'static {
    /// Prepares an empty area for upload `id`, before its record is written.
    async fn create(&self, id: &str) -> Result<(), StagingError>;

    /// The bytes of `up` durably staged: its offset.
    async fn offset(&self, up: &UploadRecord) -> Result<u64, StagingError>;

    /// Opens `up` for appending at `offset`, its current offset, for the holder of the
    /// upload's lease (`lease`: the appender stops with [`StagingError::Moved`] before any
    /// step it takes once the lease is lost). `atomic`: the request's bytes are kept all or
    /// none (it carries a checksum of the whole body); otherwise whatever was committed (on a
    /// cut-off body, what arrived) is kept.
    async fn open(
        &self,
        up: &UploadRecord,
        offset: u64,
        atomic: bool,
        lease: LeaseWatch,
    ) -> Result<Box<dyn Appender>, StagingError>;

    /// Deletes whatever upload `up` staged. Missing pieces are not an error.
    async fn discard(&self, up: &UploadRecord);

    /// After a completion of `up` that failed (publishing, or recording the object): leaves
    /// the upload resumable. `consumed`: its staged bytes were used up; otherwise they may or
    /// may not have been, and the staging checks. Where they survived the upload resumes at
    /// its offset; where they did not, it starts over at 0 (the client sends it again).
    async fn recover(&self, up: &UploadRecord, consumed: bool) -> Result<(), StagingError>;

    /// Deletes staged bytes older than `min_age` that no upload record names (a crash between
    /// staging and recording, or a failed delete); how many. (Pieces are staged just before
    /// their record is written: only old ones can be orphans.)
    async fn sweep(&self, store: &dyn Store, min_age: Duration) -> Result<usize, StagingError>;
}

/// One request's writes to a staging area.
#[async_trait]
pub trait Appender: Send {
    async fn write(&mut self, chunk: Bytes) -> Result<(), StagingError>;

    /// Makes what was written durable, and the upload's offset.
    async fn commit(self: Box<Self>) -> Result<Committed, StagingError>;

    /// Forgets what this request wrote, as far as it can: a file goes back to where the
    /// request began; a non-atomic appender that already recorded whole parts keeps them.
    async fn abort(self: Box<Self>);
}

/// The complete bytes of an upload, waiting to become an object.
#[async_trait]
pub trait Staged: Send {
    /// Stores the bytes in the blob store as object `digest`, and frees the staging area.
    /// The caller holds the object's lease and found no record of it.
    async fn publish(self: Box<Self>, digest: &MediaHash) -> Result<(), StagingError>;

    /// Frees the staging area (the object exists already, or is not the one expected).
    async fn discard(self: Box<Self>);
}

/// Uploads staged as files in a directory of the node (`data_dir/uploads/<upload id>`) whose
/// length *is* the offset, fsynced before an offset is reported. While a request writes, the
/// offset is what it last made durable (its unsynced bytes are not reported), and a request
/// that ends without committing is cut back to that. The running hash of an upload is kept
/// in memory between requests; after a restart it is recomputed from the file.
pub struct FileStaging {
    dir: PathBuf,
    blobs: Arc<dyn BlobStore>,
    hashes: Arc<Mutex<HashMap<String, (u64, Sha256)>>>,
    writers: Arc<Writers>,
}

/// The request writing each upload now: its generation, and the offset durable so far.
#[derive(Default)]
struct Writers {
    next: AtomicU64,
    now: Mutex<HashMap<String, (u64, u64)>>,
}

impl Writers {
    fn durable(&self, id: &str) -> Option<u64> {
        self.now.lock().ok()?.get(id).map(|&(_, durable)| durable)
    }
}

impl FileStaging {
    pub fn new(dir: PathBuf, blobs: Arc<dyn BlobStore>) -> std::io::Result<FileStaging> {
        std::fs::create_dir_all(&dir)?;
        Ok(FileStaging {
            dir,
            blobs,
            hashes: Arc::default(),
            writers: Arc::default(),
        })
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    fn forget_hash(&self, id: &str) {
        if let Ok(mut h) = self.hashes.lock() {
            h.remove(id);
        }
    }
}

#[async_trait]
impl Staging for FileStaging {
    async fn create(&self, id: &str) -> Result<(), StagingError> {
        tokio::fs::File::create(self.path(id)).await?;
        Ok(())
    }

    async fn offset(&self, up: &UploadRecord) -> Result<u64, StagingError> {
        if let Some(durable) = self.writers.durable(&up.id) {
            return Ok(durable.min(up.length));
        }
        match tokio::fs::metadata(self.path(&up.id)).await {
            Ok(m) => Ok(m.len().min(up.length)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(e.into()),
        }
    }

    async fn open(
        &self,
        up: &UploadRecord,
        offset: u64,
        _atomic: bool,
        lease: LeaseWatch,
    ) -> Result<Box<dyn Appender>, StagingError> {
        let hash = if offset == 0 {
            Some(Sha256::new())
        } else {
            self.hashes
                .lock()
                .ok()
                .and_then(|mut h| h.remove(&up.id))
                .and_then(|(n, h)| (n == offset).then_some(h))
        };
        let path = self.path(&up.id);
        let generation = self.writers.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut now) = self.writers.now.lock() {
            now.insert(up.id.clone(), (generation, offset));
        }
        // From here the rollback guard cuts the file back to `offset` unless a commit disarms
        // it, and stops reporting this writer's offset.
        let rollback = Rollback {
            path: path.clone(),
            id: up.id.clone(),
            offset,
            generation,
            writers: self.writers.clone(),
            armed: true,
        };
        // Created again if a failed completion used the file up (the offset is then 0); cut
        // to `offset`, so bytes a writer never made durable are not built upon.
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .await?;
        file.set_len(offset).await?;
        Ok(Box::new(FileAppender {
            out: tokio::io::BufWriter::with_capacity(WRITE_BUFFER, file),
            rollback,
            lease,
            id: up.id.clone(),
            length: up.length,
            offset,
            written: 0,
            hash,
            hashes: self.hashes.clone(),
            blobs: self.blobs.clone(),
        }))
    }

    async fn discard(&self, up: &UploadRecord) {
        match tokio::fs::remove_file(self.path(&up.id)).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(error = %e, "cannot delete a staged upload"),
        }
        self.forget_hash(&up.id);
    }

    async fn recover(&self, up: &UploadRecord, consumed: bool) -> Result<(), StagingError> {
        let path = self.path(&up.id);
        if consumed || !tokio::fs::try_exists(&path).await? {
            // Published (moved into the blob store) or deleted: start over from an empty file.
            self.forget_hash(&up.id);
            tokio::fs::File::create(&path).await?.sync_all().await?;
        }
        Ok(())
    }

    async fn sweep(&self, store: &dyn Store, min_age: Duration) -> Result<usize, StagingError> {
        let mut dir = tokio::fs::read_dir(&self.dir).await?;
        let mut swept = 0;
        while let Some(entry) = dir.next_entry().await? {
            let name = entry.file_name();
            let Some(id) = name.to_str() else { continue };
            let old = entry
                .metadata()
                .await
                .ok()
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age >= min_age);
            if old && store.upload(id).await?.is_none() {
                let _ = tokio::fs::remove_file(entry.path()).await;
                self.forget_hash(id);
                swept += 1;
            }
        }
        Ok(swept)
    }
}

/// Ends a request's writing: unless a commit disarmed it, truncates the staging file back to
/// where the request started. Only while the request is still the upload's writer: one that
/// lost its lease leaves the file to the next.
struct Rollback {
    path: PathBuf,
    id: String,
    offset: u64,
    generation: u64,
    writers: Arc<Writers>,
    armed: bool,
}

impl Rollback {
    /// Records `durable` as the writer's offset; whether it is still the upload's writer.
    fn advance(&mut self, durable: u64) -> bool {
        let Ok(mut now) = self.writers.now.lock() else {
            return false;
        };
        match now.get_mut(&self.id) {
            Some(entry) if entry.0 == self.generation => {
                entry.1 = durable;
                self.offset = durable;
                true
            }
            _ => false,
        }
    }
}

impl Drop for Rollback {
    fn drop(&mut self) {
        let Ok(mut now) = self.writers.now.lock() else {
            return;
        };
        if now.get(&self.id).is_none_or(|e| e.0 != self.generation) {
            return;
        }
        if self.armed
            && let Ok(f) = std::fs::OpenOptions::new().write(true).open(&self.path)
        {
            let _ = f.set_len(self.offset).and_then(|()| f.sync_data());
        }
        now.remove(&self.id);
    }
}

struct FileAppender {
    out: tokio::io::BufWriter<tokio::fs::File>,
    rollback: Rollback,
    lease: LeaseWatch,
    id: String,
    length: u64,
    offset: u64,
    written: u64,
    /// The SHA-256 of the first `offset + written` bytes, unless it was lost (a restart).
    hash: Option<Sha256>,
    hashes: Arc<Mutex<HashMap<String, (u64, Sha256)>>>,
    blobs: Arc<dyn BlobStore>,
}

#[async_trait]
impl Appender for FileAppender {
    async fn write(&mut self, chunk: Bytes) -> Result<(), StagingError> {
        if self.lease.lost() {
            return Err(StagingError::Moved);
        }
        if let Some(h) = self.hash.as_mut() {
            h.update(&chunk);
        }
        self.out.write_all(&chunk).await?;
        self.written += chunk.len() as u64;
        Ok(())
    }

    async fn commit(mut self: Box<Self>) -> Result<Committed, StagingError> {
        self.out.flush().await?;
        self.out.get_ref().sync_data().await?;
        let offset = self.offset + self.written;
        if self.lease.lost() || !self.rollback.advance(offset) {
            return Err(StagingError::Moved);
        }
        self.rollback.armed = false;
        if offset < self.length {
            if let (Some(h), Ok(mut hashes)) = (self.hash.take(), self.hashes.lock()) {
                hashes.insert(self.id.clone(), (offset, h));
            }
            return Ok(Committed::Partial(offset));
        }
        let path = self.rollback.path.clone();
        let digest = match self.hash.take() {
            Some(h) => h.finalize().into(),
            None => hash_file(path.clone()).await?,
        };
        Ok(Committed::Complete {
            digest,
            staged: Box::new(StagedFile {
                path,
                blobs: self.blobs.clone(),
            }),
        })
    }

    async fn abort(mut self: Box<Self>) {
        // Let every write land before the rollback truncates behind it.
        let _ = self.out.flush().await;
        self.rollback.armed = true;
    }
}

struct StagedFile {
    path: PathBuf,
    blobs: Arc<dyn BlobStore>,
}

#[async_trait]
impl Staged for StagedFile {
    async fn publish(self: Box<Self>, digest: &MediaHash) -> Result<(), StagingError> {
        Ok(self.blobs.put_file(digest, &self.path).await?)
    }

    async fn discard(self: Box<Self>) {
        let _ = tokio::fs::remove_file(&self.path).await;
    }
}

/// SHA-256 of a file, read in 1 MiB pieces on a blocking thread.
async fn hash_file(path: PathBuf) -> Result<MediaHash, StagingError> {
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
    .map_err(|e| std::io::Error::other(format!("hash task failed: {e}")))?
    .map_err(StagingError::Io)
}
