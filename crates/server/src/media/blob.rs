//! Where media bytes live: the [`BlobStore`] trait and its local-filesystem implementation.
//! Objects are immutable and named by the SHA-256 of their bytes; the metadata (which objects
//! exist, who references them) is in the [`tern_store::Store`], not here.

use std::io::SeekFrom;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::Stream;
use tern_store::MediaHash;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

/// A stream of an object's bytes.
pub type ByteStream = Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>;

/// Read granularity of downloads: large enough to be cheap, small enough to keep memory flat.
pub const READ_CHUNK: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("no such object")]
    NotFound,
    #[error("blob store I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("blob store: {0}")]
    Backend(String),
}

/// Object storage for media. Implementations stream: nothing holds a whole object in memory.
#[async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// Stores the complete, verified file at `staged` as object `id`. The staged file is
    /// consumed (moved, or deleted after copying). Storing an existing id again is harmless.
    async fn put_file(&self, id: &MediaHash, staged: &Path) -> Result<(), BlobError>;

    /// Streams the bytes `range` of object `id` (the caller has checked the range against the
    /// recorded size).
    async fn get(&self, id: &MediaHash, range: Range<u64>) -> Result<ByteStream, BlobError>;

    /// Deletes object `id`; deleting a missing object is not an error.
    async fn delete(&self, id: &MediaHash) -> Result<(), BlobError>;

    /// Whether object `id` exists.
    async fn contains(&self, id: &MediaHash) -> Result<bool, BlobError>;
}

/// Objects as files under a root directory: `ab/cd/abcd…` (two levels of fan-out keep
/// directories small). Puts are renames, so staging must be on the same file system.
#[derive(Debug)]
pub struct FsBlobs {
    root: PathBuf,
}

impl FsBlobs {
    pub fn new(root: PathBuf) -> std::io::Result<FsBlobs> {
        std::fs::create_dir_all(&root)?;
        Ok(FsBlobs { root })
    }

    fn path(&self, id: &MediaHash) -> PathBuf {
        let hex = hex::encode(id);
        self.root.join(&hex[..2]).join(&hex[2..4]).join(hex)
    }
}

#[async_trait]
impl BlobStore for FsBlobs {
    async fn put_file(&self, id: &MediaHash, staged: &Path) -> Result<(), BlobError> {
        let path = self.path(id);
        let dir = path
            .parent()
            .ok_or_else(|| BlobError::Backend("object path has no parent".into()))?
            .to_owned();
        let staged = staged.to_owned();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            std::fs::create_dir_all(&dir)?;
            // The staged file was fsynced by the upload; the rename is made durable by syncing
            // the directory that now names it.
            std::fs::rename(&staged, &path)?;
            std::fs::File::open(&dir)?.sync_all()
        })
        .await
        .map_err(|e| BlobError::Backend(format!("put task failed: {e}")))??;
        Ok(())
    }

    async fn get(&self, id: &MediaHash, range: Range<u64>) -> Result<ByteStream, BlobError> {
        let mut file = match tokio::fs::File::open(self.path(id)).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(BlobError::NotFound),
            Err(e) => return Err(e.into()),
        };
        file.seek(SeekFrom::Start(range.start)).await?;
        let reader = file.take(range.end.saturating_sub(range.start));
        Ok(Box::pin(tokio_util::io::ReaderStream::with_capacity(
            reader, READ_CHUNK,
        )))
    }

    async fn delete(&self, id: &MediaHash) -> Result<(), BlobError> {
        match tokio::fs::remove_file(self.path(id)).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn contains(&self, id: &MediaHash) -> Result<bool, BlobError> {
        Ok(tokio::fs::try_exists(self.path(id)).await?)
    }
}
