//! Media over HTTP (PROTOCOL.md §8) against the real server: whole-object uploads, de-duplication,
//! range and conditional downloads, hash and size checks, quotas, authentication, resumable tus
//! uploads (interrupted, resumed across a restart, checksummed, terminated), garbage collection.

mod common;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use common::media::{Api, blob, id_of};
use common::*;
use reqwest::StatusCode;
use sha2::{Digest, Sha256};

fn staged_files(server: &TestServer) -> usize {
    std::fs::read_dir(server.dir.path().join("uploads"))
        .expect("uploads dir")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_head_get_round_trip_and_deduplication() {
    let server = TestServer::start().await;
    let alice = Api::new(&server, "alice").await;
    let bob = Api::new(&server, "bob").await;
    for (len, seed) in [(0usize, 1u8), (1, 2), (65_536, 3), (3 * 1024 * 1024 + 7, 4)] {
        let bytes = blob(len, seed);
        let id = id_of(&bytes);
        assert_eq!(alice.head(&id).await, StatusCode::NOT_FOUND);
        let (s, v) = alice.put(&id, bytes.clone()).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        assert_eq!(
            (v["id"].as_str(), v["size"].as_u64()),
            (Some(&*id), Some(len as u64))
        );
        let head = alice
            .req(reqwest::Method::HEAD, &format!("/v1/media/{id}"))
            .send()
            .await
            .expect("head");
        assert_eq!(head.status(), StatusCode::OK);
        assert_eq!(head.headers()["content-length"], len.to_string().as_str());
        assert_eq!(head.headers()["etag"], format!("\"{id}\"").as_str());
        // Anyone authenticated may download; the bytes are exactly what was uploaded.
        let got = bob.get(&id, &[]).await;
        assert_eq!(got.status(), StatusCode::OK);
        assert_eq!(got.bytes().await.expect("body").as_ref(), bytes.as_slice());
        // The same bytes again: answered from what exists, without reading the body.
        let (s, v) = bob.put(&id, b"not even the same bytes".to_vec()).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["size"].as_u64(), Some(len as u64));
        let claim = bob
            .req(reqwest::Method::POST, &format!("/v1/media/{id}/claim"))
            .send()
            .await
            .expect("claim");
        assert_eq!(claim.status(), StatusCode::OK);
    }
    let missing = id_of(b"never uploaded");
    let claim = bob
        .req(reqwest::Method::POST, &format!("/v1/media/{missing}/claim"))
        .send()
        .await
        .expect("claim");
    assert_eq!(claim.status(), StatusCode::NOT_FOUND);
    assert_eq!(staged_files(&server), 0, "nothing left in staging");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_and_conditional_requests() {
    let server = TestServer::start().await;
    let alice = Api::new(&server, "alice").await;
    let bytes = blob(10_000, 7);
    let id = id_of(&bytes);
    assert_eq!(alice.put(&id, bytes.clone()).await.0, StatusCode::CREATED);
    let etag = format!("\"{id}\"");

    for (range, want) in [
        ("bytes=10-19", 10..20),
        ("bytes=9990-", 9990..10_000),
        ("bytes=-100", 9900..10_000),
        ("bytes=9000-20000", 9000..10_000),
    ] {
        let r = alice.get(&id, &[("Range", range)]).await;
        assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(
            r.headers()["content-range"],
            format!("bytes {}-{}/10000", want.start, want.end - 1).as_str()
        );
        assert_eq!(r.bytes().await.expect("body").as_ref(), &bytes[want]);
    }
    let r = alice.get(&id, &[("Range", "bytes=10000-")]).await;
    assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(r.headers()["content-range"], "bytes */10000");
    // Several ranges: the whole object.
    let r = alice.get(&id, &[("Range", "bytes=0-1,5-6")]).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.bytes().await.expect("body").len(), 10_000);

    let r = alice.get(&id, &[("If-None-Match", &etag)]).await;
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    assert!(r.bytes().await.expect("body").is_empty());
    let r = alice.get(&id, &[("If-None-Match", "\"other\"")]).await;
    assert_eq!(r.status(), StatusCode::OK);
    // If-Range: the range only applies to the same entity.
    let r = alice
        .get(&id, &[("Range", "bytes=0-9"), ("If-Range", &etag)])
        .await;
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    let r = alice
        .get(&id, &[("Range", "bytes=0-9"), ("If-Range", "\"other\"")])
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.bytes().await.expect("body").len(), 10_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_uploads_are_refused_and_change_nothing() {
    let server = TestServer::start_with(|c| {
        c.media.max_object_bytes = 100_000;
        c.media.quota_bytes = 250_000;
        c.media.max_uploads_per_user = 2;
    })
    .await;
    let alice = Api::new(&server, "alice").await;
    let bytes = blob(50_000, 9);
    let id = id_of(&bytes);

    // The hash is checked: nothing is kept of a mismatch.
    let wrong = id_of(b"something else");
    let (s, v) = alice.put(&wrong, bytes.clone()).await;
    assert_eq!(s.as_u16(), 460, "{v}");
    assert_eq!(v["error"]["code"], "checksum_mismatch");
    assert_eq!(alice.head(&wrong).await, StatusCode::NOT_FOUND);
    assert_eq!(alice.head(&id).await, StatusCode::NOT_FOUND);
    assert_eq!(staged_files(&server), 0);

    // Malformed ids, unauthenticated calls.
    assert_eq!(
        alice.put("abc", bytes.clone()).await.0,
        StatusCode::BAD_REQUEST
    );
    let anon = reqwest::Client::new();
    for (m, path) in [
        (reqwest::Method::HEAD, format!("/v1/media/{id}")),
        (reqwest::Method::GET, format!("/v1/media/{id}")),
        (reqwest::Method::PUT, format!("/v1/media/{id}")),
        (reqwest::Method::POST, format!("/v1/media/{id}/claim")),
    ] {
        let r = anon
            .request(m.clone(), format!("{}{path}", server.url()))
            .send()
            .await
            .expect("anon");
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{m} {path}");
    }
    let r = anon
        .post(format!("{}/v1/uploads", server.url()))
        .header("Tus-Resumable", "1.0.0")
        .header("Upload-Length", "10")
        .send()
        .await
        .expect("anon tus");
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    // Size limit and quota, decided on the declared length before any byte is stored.
    let big = blob(100_001, 1);
    let (s, v) = alice.put(&id_of(&big), big).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, Some("too_large"))
    );
    let r = alice
        .tus(reqwest::Method::POST, "/v1/uploads")
        .header("Upload-Length", "100001")
        .send()
        .await
        .expect("tus");
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    for seed in 0..4 {
        let b = blob(60_000, 100 + seed);
        assert_eq!(alice.put(&id_of(&b), b).await.0, StatusCode::CREATED);
    }
    let b = blob(60_000, 200);
    let (s, v) = alice.put(&id_of(&b), b).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, Some("quota_exceeded")),
        "{v}"
    );
    assert_eq!(staged_files(&server), 0);
    // Dropping a reference gives the quota back.
    let first = id_of(&blob(60_000, 100));
    let r = alice
        .req(reqwest::Method::DELETE, &format!("/v1/media/{first}"))
        .send()
        .await
        .expect("drop");
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let b = blob(60_000, 200);
    assert_eq!(alice.put(&id_of(&b), b).await.0, StatusCode::CREATED);

    // A PUT needs its length up front.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = vec![Ok(vec![1, 2, 3])];
    let r = alice
        .req(
            reqwest::Method::PUT,
            &format!("/v1/media/{}", id_of(&[1, 2, 3])),
        )
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .expect("chunked put");
    assert_eq!(r.status(), StatusCode::LENGTH_REQUIRED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tus_upload_interrupted_at_90_percent_resumes_there_across_a_restart() {
    let server = TestServer::start().await;
    let alice = Api::new(&server, "alice").await;
    let bob = Api::new(&server, "bob").await;

    let opts = alice
        .req(reqwest::Method::OPTIONS, "/v1/uploads")
        .send()
        .await
        .expect("options");
    assert_eq!(opts.status(), StatusCode::NO_CONTENT);
    assert_eq!(opts.headers()["tus-version"], "1.0.0");
    assert_eq!(opts.headers()["tus-resumable"], "1.0.0");
    let ext = opts.headers()["tus-extension"].to_str().expect("ext");
    for e in ["creation", "termination", "checksum", "expiration"] {
        assert!(ext.contains(e), "{ext}");
    }
    // Without Tus-Resumable: 412.
    let r = alice
        .req(reqwest::Method::POST, "/v1/uploads")
        .header("Upload-Length", "10")
        .send()
        .await
        .expect("no tus header");
    assert_eq!(r.status(), StatusCode::PRECONDITION_FAILED);

    let bytes = blob(1_000_000, 42);
    let id = id_of(&bytes);
    let path = alice.create(bytes.len(), Some(&id)).await;
    assert_eq!(alice.offset(&path).await, (StatusCode::OK, 0));
    // Other users cannot see it.
    assert_eq!(bob.offset(&path).await.0, StatusCode::NOT_FOUND);

    // A request cut off after 90% of the bytes: the server keeps what arrived.
    let cut = 900_000;
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = vec![
        Ok(bytes[..cut / 2].to_vec()),
        Ok(bytes[cut / 2..cut].to_vec()),
        Err(std::io::Error::other("the network went away")),
    ];
    let r = alice
        .tus(reqwest::Method::PATCH, &path)
        .header("Content-Type", "application/offset+octet-stream")
        .header("Upload-Offset", "0")
        .header("Content-Length", bytes.len().to_string())
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await;
    assert!(r.is_err() || !r.expect("response").status().is_success());
    let mut offset = 0;
    for _ in 0..50 {
        offset = alice.offset(&path).await.1;
        if offset == cut as u64 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(offset, cut as u64, "resumes at 90%");

    // The server restarts in between (the running hash is gone and is recomputed).
    let dir = server.stop().await;
    let server = TestServer::start_in(dir, |_| {}).await;
    let alice = Api {
        base: server.url(),
        ..alice
    };
    assert_eq!(alice.offset(&path).await, (StatusCode::OK, cut as u64));
    // A wrong offset is refused; a wrong checksum discards the chunk.
    let r = alice.patch(&path, 0, bytes[..10].to_vec()).await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    let r = alice
        .tus(reqwest::Method::PATCH, &path)
        .header("Content-Type", "application/offset+octet-stream")
        .header("Upload-Offset", cut.to_string())
        .header(
            "Upload-Checksum",
            format!("sha256 {}", B64.encode(Sha256::digest(b"x"))),
        )
        .body(bytes[cut..].to_vec())
        .send()
        .await
        .expect("bad checksum");
    assert_eq!(r.status().as_u16(), 460);
    assert_eq!(alice.offset(&path).await.1, cut as u64);
    // The rest, with a good checksum, completes it.
    let r = alice
        .tus(reqwest::Method::PATCH, &path)
        .header("Content-Type", "application/offset+octet-stream")
        .header("Upload-Offset", cut.to_string())
        .header(
            "Upload-Checksum",
            format!("sha1 {}", B64.encode(sha1::Sha1::digest(&bytes[cut..]))),
        )
        .body(bytes[cut..].to_vec())
        .send()
        .await
        .expect("rest");
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(r.headers()["upload-offset"], "1000000");
    assert_eq!(r.headers()["tern-media-id"], id.as_str());
    let head = alice
        .tus(reqwest::Method::HEAD, &path)
        .send()
        .await
        .expect("head");
    assert_eq!(head.headers()["tern-media-id"], id.as_str());
    let got = alice.get(&id, &[]).await;
    assert_eq!(got.bytes().await.expect("body").as_ref(), bytes.as_slice());
    assert_eq!(staged_files(&server), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tus_chunks_termination_and_declared_hash() {
    let server = TestServer::start_with(|c| c.media.max_uploads_per_user = 2).await;
    let alice = Api::new(&server, "alice").await;
    let bytes = blob(300_000, 5);
    let id = id_of(&bytes);

    // Without a declared hash: the id is whatever the bytes hash to.
    let path = alice.create(bytes.len(), None).await;
    for (i, chunk) in bytes.chunks(70_000).enumerate() {
        let r = alice.patch(&path, i * 70_000, chunk.to_vec()).await;
        assert_eq!(r.status(), StatusCode::NO_CONTENT);
    }
    assert_eq!(alice.get(&id, &[]).await.status(), StatusCode::OK);

    // A body past Upload-Length is refused whole.
    let path = alice.create(10, None).await;
    let r = alice.patch(&path, 0, vec![0; 11]).await;
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(alice.offset(&path).await.1, 0);

    // Termination frees the upload and its count.
    let other = alice.create(10, None).await;
    assert_eq!(
        alice
            .tus(reqwest::Method::POST, "/v1/uploads")
            .header("Upload-Length", "10")
            .send()
            .await
            .expect("third")
            .status(),
        StatusCode::CONFLICT,
        "two incomplete uploads at most"
    );
    for p in [&path, &other] {
        let r = alice
            .tus(reqwest::Method::DELETE, p)
            .send()
            .await
            .expect("delete");
        assert_eq!(r.status(), StatusCode::NO_CONTENT);
        assert_eq!(alice.offset(p).await.0, StatusCode::NOT_FOUND);
    }
    assert_eq!(staged_files(&server), 0);

    // A declared hash that the bytes do not match: refused at the end, nothing kept.
    let liar = id_of(b"declared");
    let path = alice.create(bytes.len(), Some(&liar)).await;
    let r = alice.patch(&path, 0, bytes.clone()).await;
    assert_eq!(r.status().as_u16(), 460);
    assert_eq!(alice.offset(&path).await.0, StatusCode::NOT_FOUND);
    assert_eq!(alice.head(&liar).await, StatusCode::NOT_FOUND);
    assert_eq!(staged_files(&server), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_collection_removes_unreferenced_media_and_expired_uploads() {
    let server = TestServer::start().await;
    let alice = Api::new(&server, "alice").await;
    let bob = Api::new(&server, "bob").await;
    let kept = blob(1000, 1);
    let dropped = blob(1000, 2);
    for b in [&kept, &dropped] {
        assert_eq!(alice.put(&id_of(b), b.clone()).await.0, StatusCode::CREATED);
    }
    let open = alice.create(100, None).await;
    assert_eq!(
        alice.patch(&open, 0, vec![1; 50]).await.status(),
        StatusCode::NO_CONTENT
    );
    let media_files = || walk(&server.dir.path().join("media"));
    assert_eq!(media_files(), 2);

    // A staging file that no upload names (as after a crash): swept once it is an hour old.
    let stray = server
        .dir
        .path()
        .join("uploads")
        .join("0123456789abcdef0123456789abcdef");
    let fresh = server
        .dir
        .path()
        .join("uploads")
        .join("fedcba9876543210fedcba9876543210");
    for f in [&stray, &fresh] {
        std::fs::write(f, b"leftover").expect("stray");
    }
    std::fs::File::options()
        .write(true)
        .open(&stray)
        .expect("open")
        .set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(7200))
        .expect("mtime");

    let media = &server.state.media;
    let now = tern_server::services::Clock::now_ms(&tern_server::services::SystemClock);
    let report = media.collect_garbage(now).await.expect("gc");
    assert_eq!(
        (report.uploads, report.objects),
        (1, 0),
        "only the old stray file goes"
    );
    assert!(!stray.exists() && fresh.exists());
    std::fs::remove_file(&fresh).expect("rm");

    // Alice drops one reference: that object goes at the next collection.
    let r = alice
        .req(
            reqwest::Method::DELETE,
            &format!("/v1/media/{}", id_of(&dropped)),
        )
        .send()
        .await
        .expect("drop");
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let report = media.collect_garbage(now).await.expect("gc");
    assert_eq!((report.uploads, report.objects), (0, 1));
    assert_eq!(alice.head(&id_of(&dropped)).await, StatusCode::NOT_FOUND);
    assert_eq!(media_files(), 1);

    // Incomplete uploads expire after a day; references after 30 days (a claim is one too).
    let day = 86_400_000;
    let claim = bob
        .req(
            reqwest::Method::POST,
            &format!("/v1/media/{}/claim", id_of(&kept)),
        )
        .send()
        .await
        .expect("claim");
    assert_eq!(claim.status(), StatusCode::OK);
    let report = media.collect_garbage(now + 2 * day).await.expect("gc");
    assert_eq!((report.uploads, report.objects), (1, 0));
    assert_eq!(staged_files(&server), 0);
    assert_eq!(alice.offset(&open).await.0, StatusCode::NOT_FOUND);
    let report = media.collect_garbage(now + 29 * day).await.expect("gc");
    assert_eq!((report.uploads, report.objects), (0, 0));
    assert_eq!(alice.head(&id_of(&kept)).await, StatusCode::OK);
    let report = media.collect_garbage(now + 31 * day).await.expect("gc");
    assert_eq!((report.uploads, report.objects), (0, 1));
    assert_eq!(media_files(), 0);
}

fn walk(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| {
                    if e.path().is_dir() {
                        walk(&e.path())
                    } else {
                        1
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

/// The whole media path on an S3-compatible server (`--features s3`, `TERN_TEST_S3_ENDPOINT`).
#[cfg(feature = "s3")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn media_on_s3() {
    let Some(s3) = s3_bucket("media").await else {
        eprintln!("TERN_TEST_S3_ENDPOINT is not set: skipping media on S3");
        return;
    };
    let server = TestServer::start_with(|c| {
        c.media.backend = tern_server::config::BlobBackend::S3;
        c.media.s3 = s3;
    })
    .await;
    let alice = Api::new(&server, "alice").await;
    // Past one multipart part, through tus in two requests.
    let bytes = blob((9 << 20) + 5, 3);
    let id = id_of(&bytes);
    let path = alice.create(bytes.len(), Some(&id)).await;
    let half = bytes.len() / 2;
    assert_eq!(
        alice.patch(&path, 0, bytes[..half].to_vec()).await.status(),
        StatusCode::NO_CONTENT
    );
    let r = alice.patch(&path, half, bytes[half..].to_vec()).await;
    assert_eq!(r.headers()["tern-media-id"], id.as_str());
    assert_eq!(
        walk(&server.dir.path().join("media")),
        0,
        "nothing on local disk"
    );
    let r = alice.get(&id, &[("Range", "bytes=100-199")]).await;
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.bytes().await.expect("body").as_ref(), &bytes[100..200]);
    let r = alice.get(&id, &[]).await;
    assert_eq!(r.bytes().await.expect("body").as_ref(), bytes.as_slice());
    let small = blob(10, 4);
    assert_eq!(
        alice.put(&id_of(&small), small.clone()).await.0,
        StatusCode::CREATED
    );
    assert_eq!(
        alice
            .get(&id_of(&small), &[])
            .await
            .bytes()
            .await
            .expect("body")
            .as_ref(),
        small.as_slice()
    );

    let now = tern_server::services::Clock::now_ms(&tern_server::services::SystemClock);
    let report = server
        .state
        .media
        .collect_garbage(now + 31 * 86_400_000)
        .await
        .expect("gc");
    assert_eq!(report.objects, 2);
    assert_eq!(alice.head(&id).await, StatusCode::NOT_FOUND);
}
