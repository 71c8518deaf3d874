//! The blob store conformance suite: what every `BlobStore` must do, run on the local file
//! system always, on `object_store` (over its local file system) with the `s3` feature, and on a
//! real S3-compatible server when `TERN_TEST_S3_ENDPOINT` names one (`.ci/run` starts one).

mod common;

use std::path::Path;

use futures_util::StreamExt;
use tern_server::media::{BlobError, BlobStore, FsBlobs};

fn bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u32)
                .wrapping_mul(2_654_435_761)
                .wrapping_add(u32::from(seed)) as u8
                ^ (i >> 11) as u8
        })
        .collect()
}

async fn read(b: &dyn BlobStore, id: &[u8; 32], range: std::ops::Range<u64>) -> Vec<u8> {
    let mut s = b.get(id, range).await.expect("get");
    let mut out = Vec::new();
    while let Some(c) = s.next().await {
        out.extend_from_slice(&c.expect("chunk"));
    }
    out
}

async fn conformance(b: &dyn BlobStore, staging: &Path) {
    // Sizes: empty, small, and past one 8 MiB multipart part.
    for (len, seed) in [(0usize, 1u8), (1000, 2), ((8 << 20) + 12_345, 3)] {
        let data = bytes(len, seed);
        let mut id = [0u8; 32];
        id[0] = seed;
        id[31] = 0xab;
        let staged = staging.join(format!("upload-{seed}"));
        std::fs::write(&staged, &data).expect("stage");
        assert!(!b.contains(&id).await.expect("contains"));
        b.put_file(&id, &staged).await.expect("put");
        assert!(!staged.exists(), "the staged file is consumed");
        assert!(b.contains(&id).await.expect("contains"));
        assert_eq!(read(b, &id, 0..len as u64).await, data, "{len} bytes");
        if len > 0 {
            let (a, z) = (len as u64 / 3, len as u64 - 1);
            assert_eq!(read(b, &id, a..z).await, data[a as usize..z as usize]);
            assert_eq!(read(b, &id, z..z + 1).await, data[z as usize..]);
        }
        b.delete(&id).await.expect("delete");
        b.delete(&id).await.expect("deleting again is fine");
        assert!(!b.contains(&id).await.expect("contains"));
        assert!(matches!(b.get(&id, 0..1).await, Err(BlobError::NotFound)));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fs_blobs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let blobs = FsBlobs::new(dir.path().join("media")).expect("fs blobs");
    conformance(&blobs, dir.path()).await;
}

#[cfg(feature = "s3")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_store_blobs_on_a_local_file_system() {
    use std::sync::Arc;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(dir.path().join("objects")).expect("mkdir");
    let fs = tern_server::media::s3::object_store::local::LocalFileSystem::new_with_prefix(
        dir.path().join("objects"),
    )
    .expect("local");
    let blobs = tern_server::media::s3::ObjectStoreBlobs::new(Arc::new(fs));
    conformance(&blobs, dir.path()).await;
}

#[cfg(feature = "s3")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_blobs() {
    let Some(config) = common::s3_bucket("blobs").await else {
        eprintln!("TERN_TEST_S3_ENDPOINT is not set: skipping the S3 backend");
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let blobs = tern_server::media::s3::ObjectStoreBlobs::s3(&config).expect("s3");
    conformance(&blobs, dir.path()).await;
}
