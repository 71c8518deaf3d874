//! An independent tus client (Python `tuspy`) uploads to ternd, stopping at 90% and resuming
//! with a fresh uploader from the server's offset. Runs when `TERN_TUSPY_PYTHON` names a Python
//! with tuspy installed (`.ci/run` creates one in `target/py` from `.ci/requirements-test.txt`);
//! otherwise it says so and passes.

mod common;

use common::*;
use sha2::{Digest, Sha256};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tuspy_uploads_and_resumes() {
    let Ok(python) = std::env::var("TERN_TUSPY_PYTHON") else {
        eprintln!("TERN_TUSPY_PYTHON is not set: skipping the tuspy interoperability test");
        return;
    };
    let server = TestServer::start().await;
    let (_, _, token) = server.http().account("alice").await;
    let bytes: Vec<u8> = (0..1_500_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let id = hex::encode(Sha256::digest(&bytes));
    let file = server.dir.path().join("photo.jpg");
    std::fs::write(&file, &bytes).expect("write");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/tus_upload.py");

    let url = server.url();
    let out = tokio::process::Command::new(&python)
        .arg(script)
        .args([&url, &token])
        .arg(&file)
        .arg(&id)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(std::time::Duration::from_secs(60), out)
        .await
        .expect("tuspy finishes within a minute")
        .expect("run python");
    assert!(
        out.status.success(),
        "tuspy failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("one JSON line from the script");
    let stop = bytes.len() as u64 * 9 / 10;
    assert!(report["stopped_at"].as_u64().expect("stopped_at") >= stop);
    assert!(report["stopped_at"].as_u64() < Some(bytes.len() as u64));
    assert_eq!(
        report["resumed_from"], report["stopped_at"],
        "the server's offset is where the first uploader stopped"
    );
    assert_eq!(report["final_offset"].as_u64(), Some(bytes.len() as u64));

    let got = reqwest::Client::new()
        .get(format!("{url}/v1/media/{id}"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("download");
    assert_eq!(got.status(), 200);
    assert_eq!(got.bytes().await.expect("body").as_ref(), bytes.as_slice());
}
