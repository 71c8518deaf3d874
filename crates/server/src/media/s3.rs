//! Media in any `object_store` backend; configured for S3-compatible storage (AWS S3, MinIO,
//! Ceph RGW, …) from `[media.s3]` (feature `s3`).
//!
//! Uploads are staged on local disk by the media service (tus needs appendable files); a
//! complete, verified object is then copied up as a multipart upload in 8 MiB parts with a
//! bounded number in flight, so memory stays flat whatever the object's size.

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use futures_util::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, ObjectStore, ObjectStoreExt, WriteMultipart};
use tern_store::MediaHash;
use tokio::io::AsyncReadExt;

/// The `object_store` crate this backend is built on, for callers that bring their own store.
pub use object_store;

use super::blob::{BlobError, BlobStore, ByteStream};
use crate::config::S3Config;

/// Bytes per multipart part (S3 wants at least 5 MiB for all parts but the last).
const PART: usize = 8 << 20;
/// Parts uploading at once.
const PARTS_IN_FLIGHT: usize = 2;

pub struct ObjectStoreBlobs {
    store: Arc<dyn ObjectStore>,
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
        ObjectStoreBlobs { store }
    }

    /// An S3-compatible bucket; empty settings fall back to the `AWS_*` environment.
    pub fn s3(c: &S3Config) -> Result<ObjectStoreBlobs, BlobError> {
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
        let store = b.with_allow_http(c.allow_http).build().map_err(backend)?;
        Ok(ObjectStoreBlobs::new(Arc::new(store)))
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
