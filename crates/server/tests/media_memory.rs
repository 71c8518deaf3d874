//! Constant memory: a large upload and download stream through the real `ternd` binary without
//! growing its peak resident memory by more than a few MiB. The bound is generous (this is a
//! check of the shape, not a benchmark; `tern-bench media` measures 2 GiB).

mod common;

use common::*;
use futures_util::StreamExt;

const SIZE: u64 = 256 << 20;
const CHUNK: usize = 256 * 1024;

/// Peak resident memory of a process, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("proc status")
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

fn chunk(i: u64) -> bytes::Bytes {
    let mut x = (i as u32).wrapping_mul(2_654_435_761) | 1;
    let v: Vec<u8> = (0..CHUNK)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    v.into()
}

async fn upload(http: &reqwest::Client, base: &str, token: &str, size: u64) -> String {
    let created = http
        .post(format!("{base}/v1/uploads"))
        .bearer_auth(token)
        .header("Tus-Resumable", "1.0.0")
        .header("Upload-Length", size.to_string())
        .send()
        .await
        .expect("create");
    assert_eq!(created.status(), 201);
    let path = created.headers()["location"]
        .to_str()
        .expect("location")
        .to_owned();
    let chunks = size / CHUNK as u64;
    let body = futures_util::stream::iter(0..chunks).map(|i| Ok::<_, std::io::Error>(chunk(i)));
    let done = http
        .patch(format!("{base}{path}"))
        .bearer_auth(token)
        .header("Tus-Resumable", "1.0.0")
        .header("Content-Type", "application/offset+octet-stream")
        .header("Upload-Offset", "0")
        .header("Content-Length", size.to_string())
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .expect("patch");
    assert_eq!(done.status(), 204);
    done.headers()["tern-media-id"]
        .to_str()
        .expect("id")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_upload_and_download_stream_in_constant_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = spawn_ternd(dir.path());
    let base = format!("http://{}", server.addr);
    let (_, _, token) = http_for(server.addr).account("alice").await;
    let http = reqwest::Client::new();

    // Warm up every path once, then measure.
    let small = upload(&http, &base, &token, 4 * CHUNK as u64).await;
    let r = http
        .get(format!("{base}/v1/media/{small}"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("get");
    assert_eq!(r.bytes().await.expect("body").len(), 4 * CHUNK);
    let before = peak_rss_kib(server.child.id());

    let id = upload(&http, &base, &token, SIZE).await;
    let mut stream = http
        .get(format!("{base}/v1/media/{id}"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("download")
        .bytes_stream();
    let mut received = 0u64;
    while let Some(c) = stream.next().await {
        received += c.expect("chunk").len() as u64;
    }
    assert_eq!(received, SIZE);
    let after = peak_rss_kib(server.child.id());
    let grown_mib = (after.saturating_sub(before)) as f64 / 1024.0;
    eprintln!("peak RSS {before} KiB -> {after} KiB (+{grown_mib:.1} MiB) for 256 MiB up and down");
    assert!(
        grown_mib < 24.0,
        "a 256 MiB stream grew the server's peak memory by {grown_mib:.1} MiB"
    );
}
