//! The upload and download loops against a scripted in-memory media server that breaks a
//! `PATCH` or a `GET` halfway, ignores ranges, or already has the object.

use std::collections::HashMap;
use std::sync::Mutex;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use sha2::{Digest, Sha256};

use super::*;
use crate::config::ClientConfig;

#[derive(Default)]
struct Fake {
    objects: HashMap<String, Vec<u8>>,
    /// upload id → (length, expected id, bytes, completed id)
    uploads: HashMap<String, (u64, String, Vec<u8>, Option<String>)>,
    /// The next PATCH keeps this many bytes of its body, then fails.
    break_patch_after: Option<usize>,
    /// The next GET sends this many bytes, then breaks the connection.
    break_get_after: Option<usize>,
    /// GETs answer 200 with everything, whatever the range.
    ignore_range: bool,
    /// What was asked: "PATCH 0", "GET from 1234", "claim", …
    log: Vec<String>,
}

type Shared = Arc<Mutex<Fake>>;

fn header<'a>(h: &'a HeaderMap, name: &str) -> &'a str {
    h.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

async fn handle(State(fake): State<Shared>, req: Request) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let headers = req.headers().clone();
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (method, parts.as_slice()) {
        (Method::HEAD, ["v1", "media", id]) => match lock(&fake).objects.get(*id) {
            Some(o) => ([("content-length", o.len().to_string())], "").into_response(),
            None => StatusCode::NOT_FOUND.into_response(),
        },
        (Method::POST, ["v1", "media", id, "claim"]) => {
            let mut f = lock(&fake);
            f.log.push("claim".into());
            match f.objects.get(*id) {
                Some(o) => axum::Json(serde_json::json!({
                    "id": id, "size": o.len(), "expires_at_ms": 1
                }))
                .into_response(),
                None => StatusCode::NOT_FOUND.into_response(),
            }
        }
        (Method::POST, ["v1", "uploads"]) => {
            let length: u64 = header(&headers, "upload-length").parse().unwrap_or(0);
            let meta = header(&headers, "upload-metadata");
            let expected = meta
                .strip_prefix("sha256 ")
                .and_then(|b| B64.decode(b).ok())
                .and_then(|b| String::from_utf8(b).ok())
                .unwrap_or_default();
            let mut f = lock(&fake);
            let id = format!("u{}", f.uploads.len() + 1);
            f.log.push(format!("create {id}"));
            f.uploads
                .insert(id.clone(), (length, expected, Vec::new(), None));
            (
                StatusCode::CREATED,
                [("location", format!("/v1/uploads/{id}"))],
            )
                .into_response()
        }
        (Method::HEAD, ["v1", "uploads", id]) => match lock(&fake).uploads.get(*id) {
            Some((length, _, data, done)) => {
                let mut h = vec![
                    ("upload-offset", data.len().to_string()),
                    ("upload-length", length.to_string()),
                ];
                if let Some(m) = done {
                    h.push(("tern-media-id", m.clone()));
                }
                let mut resp = StatusCode::OK.into_response();
                for (k, v) in h {
                    if let Ok(v) = v.parse() {
                        resp.headers_mut().insert(k, v);
                    }
                }
                resp
            }
            None => StatusCode::NOT_FOUND.into_response(),
        },
        (Method::PATCH, ["v1", "uploads", id]) => patch(&fake, id, &headers, req).await,
        (Method::GET, ["v1", "media", id]) => get(&fake, id, &headers),
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn patch(fake: &Shared, id: &str, headers: &HeaderMap, req: Request) -> Response {
    let offset: usize = header(headers, "upload-offset")
        .parse()
        .unwrap_or(usize::MAX);
    let (current, limit) = {
        let mut f = lock(fake);
        f.log.push(format!("PATCH {offset}"));
        let Some(up) = f.uploads.get(id) else {
            return StatusCode::NOT_FOUND.into_response();
        };
        (up.2.len(), f.break_patch_after.take())
    };
    if offset != current {
        return StatusCode::CONFLICT.into_response();
    }
    let mut body = req.into_body().into_data_stream();
    let mut got = Vec::new();
    while let Some(Ok(chunk)) = body.next().await {
        got.extend_from_slice(&chunk);
        if let Some(n) = limit
            && got.len() >= n
        {
            // Keep what arrived before the break, like the real server.
            got.truncate(n);
            lock(fake)
                .uploads
                .entry(id.to_owned())
                .and_modify(|u| u.2.extend(&got));
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
    }
    let want = B64
        .decode(header(headers, "upload-checksum").trim_start_matches("sha256 "))
        .unwrap_or_default();
    if Sha256::digest(&got).as_slice() != want.as_slice() {
        return StatusCode::from_u16(460)
            .unwrap_or(StatusCode::BAD_REQUEST)
            .into_response();
    }
    let mut f = lock(fake);
    let Some((length, expected, data, done)) = f.uploads.get_mut(id) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    data.extend_from_slice(&got);
    let mut resp = StatusCode::NO_CONTENT.into_response();
    if let Ok(v) = data.len().to_string().parse() {
        resp.headers_mut().insert("upload-offset", v);
    }
    if data.len() as u64 == *length {
        let media_id = hex::encode(Sha256::digest(&data[..]));
        assert_eq!(&media_id, expected, "the client declared the right id");
        *done = Some(media_id.clone());
        if let Ok(v) = media_id.parse() {
            resp.headers_mut().insert("tern-media-id", v);
        }
        let object = data.clone();
        f.objects.insert(media_id, object);
    }
    resp
}

fn get(fake: &Shared, id: &str, headers: &HeaderMap) -> Response {
    let mut f = lock(fake);
    let from: usize = header(headers, "range")
        .strip_prefix("bytes=")
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    f.log.push(format!("GET from {from}"));
    let Some(object) = f.objects.get(id).cloned() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let (status, start) = if from == 0 || f.ignore_range {
        (StatusCode::OK, 0)
    } else if from >= object.len() {
        return StatusCode::RANGE_NOT_SATISFIABLE.into_response();
    } else {
        (StatusCode::PARTIAL_CONTENT, from)
    };
    let rest = Bytes::from(object[start..].to_vec());
    let body = match f.break_get_after.take() {
        Some(n) => {
            let first: Result<Bytes, std::io::Error> = Ok(rest.slice(..n.min(rest.len())));
            // The break comes a moment later, so that what came before it is on the wire.
            let broken = futures_util::stream::once(async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                Err(std::io::Error::other("connection lost"))
            });
            Body::from_stream(futures_util::stream::iter([first]).chain(broken))
        }
        None => Body::from(rest.clone()),
    };
    let mut resp = (status, body).into_response();
    if status == StatusCode::PARTIAL_CONTENT
        && let Ok(v) = format!("bytes {start}-{}/{}", object.len() - 1, object.len()).parse()
    {
        resp.headers_mut().insert("content-range", v);
    }
    resp
}

struct Setup {
    client: Client,
    fake: Shared,
    _home: tempfile::TempDir,
}

async fn setup() -> Setup {
    let fake: Shared = Arc::default();
    let app = axum::Router::new()
        .fallback(handle)
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    let home = tempfile::tempdir().expect("home");
    let mut config = ClientConfig::new(format!("http://{addr}"), home.path());
    config.reconnect_initial = Duration::from_millis(1);
    config.reconnect_max = Duration::from_millis(5);
    let client = Client::open(config).expect("open");
    Setup {
        client,
        fake,
        _home: home,
    }
}

/// Encrypts `len` bytes into the profile's temp directory and records the send.
async fn encrypted(client: &Client, len: usize) -> (PendingUpload, PathBuf) {
    let dir = client.media_dir();
    std::fs::create_dir_all(&dir).expect("dir");
    let source = dir.join("source.bin");
    let data: Vec<u8> = (0..len).map(|i| (i * 31 % 253) as u8).collect();
    std::fs::write(&source, &data).expect("write");
    let key = files::source_key(&source).expect("key");
    let row = client.encrypted_copy(&key, &|_| {}).await.expect("encrypt");
    let temp = dir.join(&row.temp_name);
    (row, temp)
}

#[tokio::test]
async fn a_broken_patch_resumes_from_the_servers_offset() {
    let s = setup().await;
    let (mut row, temp) = encrypted(&s.client, 6 * 1024 * 1024 + 17).await;
    lock(&s.fake).break_patch_after = Some(1024 * 1024 + 3);
    let reports = Mutex::new(Vec::new());
    s.client
        .upload("tok", &mut row, &temp, &|p: Progress| {
            lock(&reports).push(p.done);
        })
        .await
        .expect("upload");
    let f = lock(&s.fake);
    assert_eq!(
        f.objects.get(&row.media_id),
        Some(&std::fs::read(&temp).expect("read")),
        "the server has the whole ciphertext"
    );
    let chunk = UPLOAD_CHUNK;
    assert_eq!(
        f.log,
        [
            "create u1".to_owned(),
            "PATCH 0".into(),
            // Broken after 1 MiB + 3; the HEAD said where to go on.
            format!("PATCH {}", 1024 * 1024 + 3),
            format!("PATCH {}", 1024 * 1024 + 3 + chunk),
        ]
    );
    let reports = lock(&reports).clone();
    assert_eq!(reports.last(), Some(&row.encrypted_size));
    assert!(row.uploaded);
    // Recorded: a restart would not upload again.
    let stored = s.client.inner.store.uploads().expect("uploads");
    assert!(stored[0].uploaded);
    assert_eq!(
        stored[0].upload_url.as_deref(),
        Some(format!("{}/v1/uploads/u1", s.client.inner.config.base_url()).as_str())
    );
}

#[tokio::test]
async fn an_upload_resumes_after_a_restart_and_an_existing_object_is_claimed() {
    let s = setup().await;
    let (mut row, temp) = encrypted(&s.client, 100_000).await;
    // A first process created the upload, sent 40,000 bytes, and died.
    let cipher = std::fs::read(&temp).expect("read");
    lock(&s.fake).uploads.insert(
        "u9".into(),
        (
            cipher.len() as u64,
            row.media_id.clone(),
            cipher[..40_000].to_vec(),
            None,
        ),
    );
    let url = format!("{}/v1/uploads/u9", s.client.inner.config.base_url());
    s.client
        .inner
        .store
        .set_upload_url(row.id, Some(&url))
        .expect("url");
    row.upload_url = Some(url);
    s.client
        .upload("tok", &mut row, &temp, &|_| {})
        .await
        .expect("upload");
    assert_eq!(lock(&s.fake).log, ["PATCH 40000"]);
    assert_eq!(lock(&s.fake).objects.get(&row.media_id), Some(&cipher));

    // The same object again (forwarded, or sent twice): a claim, no upload.
    lock(&s.fake).log.clear();
    let mut again = PendingUpload {
        upload_url: None,
        uploaded: false,
        ..row.clone()
    };
    s.client
        .upload("tok", &mut again, &temp, &|_| {})
        .await
        .expect("claim");
    assert_eq!(lock(&s.fake).log, ["claim"]);
    assert!(again.uploaded);
}

#[tokio::test]
async fn downloads_resume_with_a_range_and_survive_a_server_ignoring_it() {
    let s = setup().await;
    let (row, temp) = encrypted(&s.client, 300_000).await;
    let cipher = std::fs::read(&temp).expect("read");
    lock(&s.fake)
        .objects
        .insert(row.media_id.clone(), cipher.clone());
    let part = s.client.media_dir().join("dl.part");

    // Broken after 100,000 bytes: the retry asks for the rest.
    lock(&s.fake).break_get_after = Some(100_000);
    let n = s
        .client
        .fetch(
            "tok",
            &row.media_id,
            &part,
            Some(row.encrypted_size),
            &|_| {},
        )
        .await
        .expect("fetch");
    assert_eq!(n, row.encrypted_size);
    assert_eq!(std::fs::read(&part).expect("read"), cipher);
    assert_eq!(lock(&s.fake).log, ["GET from 0", "GET from 100000"]);

    // A partial file, and a server that answers 200 to the range: start over.
    std::fs::write(&part, &cipher[..5000]).expect("write");
    {
        let mut f = lock(&s.fake);
        f.log.clear();
        f.ignore_range = true;
    }
    s.client
        .fetch(
            "tok",
            &row.media_id,
            &part,
            Some(row.encrypted_size),
            &|_| {},
        )
        .await
        .expect("fetch");
    assert_eq!(std::fs::read(&part).expect("read"), cipher);
    assert_eq!(lock(&s.fake).log, ["GET from 5000"]);

    // A part longer than the object (416): dropped, fetched again.
    let mut longer = cipher.clone();
    longer.extend_from_slice(b"junk");
    std::fs::write(&part, &longer).expect("write");
    {
        let mut f = lock(&s.fake);
        f.log.clear();
        f.ignore_range = false;
    }
    s.client
        .fetch("tok", &row.media_id, &part, None, &|_| {})
        .await
        .expect("fetch");
    assert_eq!(std::fs::read(&part).expect("read"), cipher);
    assert_eq!(
        lock(&s.fake).log,
        [
            format!("GET from {}", cipher.len() + 4),
            "GET from 0".into()
        ]
    );

    // More bytes than the message names: refused, nothing kept.
    std::fs::remove_file(&part).expect("remove");
    let err = s
        .client
        .fetch("tok", &row.media_id, &part, Some(1000), &|_| {})
        .await;
    assert!(
        matches!(err, Err(Error::Media(MediaError::Tampered(_)))),
        "{err:?}"
    );
    assert_eq!(files::len_or_zero(&part).expect("len"), 0);
}
