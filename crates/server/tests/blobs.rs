//! The blob store conformance suite: what every `BlobStore` must do, run on the local file
//! system always, on `object_store` (over its local file system) with the `s3` feature, and on a
//! real S3-compatible server when `TERN_TEST_S3_ENDPOINT` names one (`.ci/run` starts one).
//! Then the same for upload staging (`Staging`): on the node's disk, and in an S3 bucket.

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

// --- upload staging ---

use std::sync::Arc;

use tern_server::media::Staging;
use tern_server::media::lease::LeaseWatch;
use tern_server::media::staging::Committed;
use tern_store::{MediaLimits, NewUpload, Store};

/// A store with one user, in `dir`.
async fn upload_store(dir: &Path) -> (Arc<dyn Store>, u64) {
    let store: Arc<dyn Store> = Arc::new(
        tern_store::sqlite::SqliteStore::open(&dir.join("tern.db"), Default::default())
            .expect("store"),
    );
    let user = store.create_user("alice", "hash", 1).await.expect("user");
    (store, user)
}

async fn offset(staging: &dyn Staging, store: &dyn Store, id: &str) -> u64 {
    let up = store.upload(id).await.expect("read").expect("upload");
    staging.offset(&up).await.expect("offset")
}

/// Writes `data` at `at` in 1 MiB chunks through one appender and commits it.
async fn append(
    staging: &dyn Staging,
    store: &dyn Store,
    id: &str,
    at: u64,
    data: &[u8],
) -> Committed {
    let up = store.upload(id).await.expect("read").expect("upload");
    let mut w = staging
        .open(&up, at, false, LeaseWatch::default())
        .await
        .expect("open");
    for chunk in data.chunks(1 << 20) {
        w.write(bytes::Bytes::copy_from_slice(chunk))
            .await
            .expect("write");
    }
    w.commit().await.expect("commit")
}

/// Staged pieces planted behind a staging's back, as a crash or a failed delete leaves them.
#[async_trait::async_trait]
trait Orphans: Sync {
    /// Pieces no upload row names, for the live upload `live` and for an upload `gone` that
    /// has no row.
    fn names(&self, live: &str, gone: &str) -> Vec<String>;
    async fn plant(&self, name: &str);
    async fn exists(&self, name: &str) -> bool;
}

/// What every staging must do: offsets are what was committed, and nothing else (aborted,
/// atomic or dropped requests leave no trace); old pieces no row names are swept, the live
/// ones kept; a complete upload hashes to its bytes and publishes them; and after a
/// completion that used the bytes up, `recover` starts the upload over at 0 rather than
/// leaving it stuck.
async fn staging_conformance(
    staging: &dyn Staging,
    blobs: &dyn BlobStore,
    store: &dyn Store,
    user: u64,
    orphans: &dyn Orphans,
) {
    use sha2::Digest;
    // Two 5 MiB parts on S3 and a tail.
    let data = bytes((11 << 20) + 5, 7);
    let digest: [u8; 32] = sha2::Sha256::digest(&data).into();
    let id = format!("up{:016x}", rand::random::<u64>());
    staging.create(&id).await.expect("create");
    store
        .create_upload(
            NewUpload {
                id: id.clone(),
                user,
                length: data.len() as u64,
                expected: None,
                now_ms: 1,
                expires_at_ms: i64::MAX / 2,
            },
            MediaLimits {
                quota_bytes: 1 << 30,
                max_uploads: 4,
            },
        )
        .await
        .expect("upload");
    assert_eq!(offset(staging, store, &id).await, 0);

    let first = 6 << 20;
    assert!(matches!(
        append(staging, store, &id, 0, &data[..first]).await,
        Committed::Partial(n) if n == first as u64
    ));
    assert_eq!(offset(staging, store, &id).await, first as u64);

    // An aborted atomic request, and one dropped mid-way, change nothing.
    let up = store.upload(&id).await.expect("read").expect("upload");
    let mut w = staging
        .open(&up, first as u64, true, LeaseWatch::default())
        .await
        .expect("open");
    w.write(bytes::Bytes::copy_from_slice(
        &data[first..first + (5 << 20)],
    ))
    .await
    .expect("write");
    w.abort().await;
    assert_eq!(offset(staging, store, &id).await, first as u64, "aborted");
    let mut w = staging
        .open(&up, first as u64, false, LeaseWatch::default())
        .await
        .expect("open");
    w.write(bytes::Bytes::copy_from_slice(&data[first..first + 100]))
        .await
        .expect("write");
    drop(w);
    assert_eq!(offset(staging, store, &id).await, first as u64, "dropped");

    // Sweeping: the orphans go, the live upload's pieces stay (it completes below).
    let planted = orphans.names(&id, &format!("gone{:016x}", rand::random::<u64>()));
    for name in &planted {
        orphans.plant(name).await;
        assert!(orphans.exists(name).await, "{name} planted");
    }
    let swept = staging
        .sweep(store, std::time::Duration::ZERO)
        .await
        .expect("sweep");
    assert!(swept >= planted.len(), "{swept} swept of {planted:?}");
    for name in &planted {
        assert!(!orphans.exists(name).await, "{name} swept");
    }
    assert_eq!(offset(staging, store, &id).await, first as u64, "kept");

    // The rest completes it.
    let Committed::Complete {
        digest: got,
        staged,
    } = append(staging, store, &id, first as u64, &data[first..]).await
    else {
        panic!("complete");
    };
    assert_eq!(got, digest);
    // Completion failing before the bytes are used: the upload stays where it was.
    let up = store.upload(&id).await.expect("read").expect("upload");
    staging.recover(&up, false).await.expect("recover");
    staged.publish(&digest).await.expect("publish");
    assert_eq!(read(blobs, &digest, 0..data.len() as u64).await, data);

    // Recording the object failed after publishing: the upload starts over, and completes.
    let up = store.upload(&id).await.expect("read").expect("upload");
    staging.recover(&up, true).await.expect("recover");
    assert_eq!(offset(staging, store, &id).await, 0, "starts over");
    let Committed::Complete {
        digest: again,
        staged,
    } = append(staging, store, &id, 0, &data).await
    else {
        panic!("complete again");
    };
    assert_eq!(again, digest);
    staged.discard().await;
    let up = store.upload(&id).await.expect("read").expect("upload");
    staging.discard(&up).await;
    blobs.delete(&digest).await.expect("delete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_staging() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, user) = upload_store(dir.path()).await;
    let blobs: Arc<dyn BlobStore> =
        Arc::new(FsBlobs::new(dir.path().join("media")).expect("blobs"));
    let staging = tern_server::media::FileStaging::new(dir.path().join("uploads"), blobs.clone())
        .expect("staging");
    struct Files(std::path::PathBuf);
    #[async_trait::async_trait]
    impl Orphans for Files {
        fn names(&self, _live: &str, gone: &str) -> Vec<String> {
            vec![gone.to_owned()]
        }
        async fn plant(&self, name: &str) {
            std::fs::write(self.0.join(name), b"orphan").expect("plant");
        }
        async fn exists(&self, name: &str) -> bool {
            self.0.join(name).exists()
        }
    }
    let orphans = Files(dir.path().join("uploads"));
    staging_conformance(&staging, &*blobs, &*store, user, &orphans).await;
}

#[cfg(feature = "s3")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_part_staging() {
    let Some(config) = common::s3_bucket("staging").await else {
        eprintln!("TERN_TEST_S3_ENDPOINT is not set: skipping S3 staging");
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, user) = upload_store(dir.path()).await;
    let blobs = tern_server::media::s3::ObjectStoreBlobs::s3(&config).expect("s3");
    let staging = blobs.staging(store.clone()).expect("multipart staging");
    /// Objects in the test's bucket, by unsigned requests: moto takes unsigned puts and
    /// listings (not unsigned reads of objects).
    struct Objects(String);
    #[async_trait::async_trait]
    impl Orphans for Objects {
        fn names(&self, live: &str, gone: &str) -> Vec<String> {
            // A stale tail of the live upload, a tail and a completed multipart object of one
            // whose row is gone.
            vec![
                format!("{live}.tail.00ff00ff00ff00ff"),
                format!("{gone}.tail.0123456789abcdef"),
                gone.to_owned(),
            ]
        }
        async fn plant(&self, name: &str) {
            let s = reqwest::Client::new()
                .put(format!("{}/uploads/{name}", self.0))
                .body(b"orphan".to_vec())
                .send()
                .await
                .expect("S3 put")
                .status();
            assert_eq!(s, 200, "plant {name}");
        }
        async fn exists(&self, name: &str) -> bool {
            let listing = reqwest::Client::new()
                .get(format!("{}?list-type=2&prefix=uploads/{name}", self.0))
                .send()
                .await
                .expect("S3 listing")
                .text()
                .await
                .expect("listing");
            listing.contains(&format!("<Key>uploads/{name}</Key>"))
        }
    }
    let orphans = Objects(format!("{}/{}", config.endpoint, config.bucket));
    staging_conformance(&staging, &blobs, &*store, user, &orphans).await;
}
