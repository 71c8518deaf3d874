//! Media end to end through the SDK and the real server: photo-, audio- and video-sized files
//! encrypted, uploaded, announced, downloaded, verified and decrypted, to a user and to a group;
//! a tampered object is detected by the receiver and nothing is written; the server never holds
//! a plaintext byte of a file.

mod common;

use std::path::Path;
use std::time::Duration;

use common::TestServer;
use common::sdk::{self, Device};
use tern_client::{Error, Event, MediaError, Phase, Progress, Recipient, StoredMessage};

const WAIT: Duration = Duration::from_secs(60);

/// A new account's first device, online.
async fn online(srv: &TestServer, name: &str) -> Device {
    let d = sdk::register(&srv.url(), name).await;
    sdk::online(&d).await;
    d
}

/// Pseudo-random bytes (incompressible, like real media).
fn bytes(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// The next media message on `d`'s event stream.
async fn next_media(events: &mut tern_client::EventStream) -> StoredMessage {
    tokio::time::timeout(WAIT, async {
        loop {
            if let Event::Message(m) = events.next().await.expect("events")
                && !m.outgoing
                && m.media().is_some()
            {
                return *m;
            }
        }
    })
    .await
    .expect("a media message in time")
}

fn no_progress(_: Progress) {}

/// Every regular file under `dir`, read whole.
fn files_under(dir: &Path, out: &mut Vec<Vec<u8>>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            files_under(&p, out);
        } else if let Ok(b) = std::fs::read(&p) {
            out.push(b);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn photos_audio_and_video_reach_users_and_groups_intact() {
    let srv = TestServer::start().await;
    let alice = online(&srv, "alice").await;
    let bob = online(&srv, "bob").await;
    let carol = online(&srv, "carol").await;
    let mut bob_events = bob.client.events();
    let mut carol_events = carol.client.events();
    let dir = tempfile::tempdir().expect("files");

    // A photo (a real PNG: it gets a thumbnail and its dimensions).
    let photo = dir.path().join("beach.png");
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/photo.png"),
        &photo,
    )
    .expect("photo");
    let phases = std::sync::Mutex::new(Vec::new());
    alice
        .client
        .send_file(&Recipient::user("bob"), &photo, Some("the beach"), |p| {
            phases.lock().expect("lock").push(p.phase)
        })
        .await
        .expect("send photo");
    let seen = phases.into_inner().expect("phases");
    for phase in [Phase::Encrypting, Phase::Uploading, Phase::Sending] {
        assert!(seen.contains(&phase), "{phase:?} reported: {seen:?}");
    }
    let msg = next_media(&mut bob_events).await;
    let media = msg.media().expect("media");
    assert_eq!(
        (
            media.mime_type.as_str(),
            media.file_name.as_str(),
            media.caption.as_str()
        ),
        ("image/png", "beach.png", "the beach")
    );
    assert_eq!((media.width, media.height), (40, 30));
    assert!(!media.thumbnail.is_empty() && media.thumbnail.len() < 8 * 1024);
    let out = bob.home.path().join("got.png");
    let got = bob
        .client
        .download(&msg, &out, no_progress)
        .await
        .expect("download photo");
    assert_eq!(got.size, 472);
    assert_eq!(
        std::fs::read(&out).expect("read"),
        std::fs::read(&photo).expect("read")
    );

    // Audio-sized to a user, video-sized to a group.
    let group = alice
        .client
        .create_group("trip", &["bob", "carol"], false)
        .await
        .expect("group");
    for (name, len, to) in [
        ("voice.ogg", 3 * 1024 * 1024 + 11, Recipient::user("bob")),
        (
            "clip.mp4",
            24 * 1024 * 1024 + 5,
            Recipient::group(group.group_id),
        ),
    ] {
        let path = dir.path().join(name);
        let data = bytes(len, len as u32);
        std::fs::write(&path, &data).expect("write");
        alice
            .client
            .send_file(&to, &path, None, no_progress)
            .await
            .expect("send");
        let (receiver, events) = match to {
            Recipient::User(_) => (&bob, &mut bob_events),
            Recipient::Group(_) => (&carol, &mut carol_events),
        };
        let msg = next_media(events).await;
        assert_eq!(msg.media().expect("media").size, len as u64);
        let out = receiver.home.path().join(name);
        let last = std::sync::Mutex::new(None);
        receiver
            .client
            .download(&msg, &out, |p| {
                *last.lock().expect("lock") = Some(p);
            })
            .await
            .expect("download");
        let last = last.into_inner().expect("lock").expect("progress reported");
        assert_eq!(last.done, last.total);
        assert!(std::fs::read(&out).expect("read") == data, "{name} intact");

        // The server holds ciphertext only: no stored object contains the file's bytes.
        let mut stored = Vec::new();
        files_under(&srv.dir.path().join("media"), &mut stored);
        let probe = &data[data.len() / 2..data.len() / 2 + 64];
        assert!(
            stored.iter().all(|s| !s.windows(64).any(|w| w == probe)),
            "plaintext of {name} found on the server"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_object_is_refused_and_nothing_is_written() {
    let srv = TestServer::start().await;
    let alice = online(&srv, "alice").await;
    let bob = online(&srv, "bob").await;
    let mut events = bob.client.events();
    let path = alice.home.path().join("doc.bin");
    std::fs::write(&path, bytes(200_000, 7)).expect("write");
    alice
        .client
        .send_file(&Recipient::user("bob"), &path, None, no_progress)
        .await
        .expect("send");
    let msg = next_media(&mut events).await;
    let id = msg.media().expect("media").id;

    // Flip one byte of the stored object, as a malicious or broken server might.
    let object = srv
        .dir
        .path()
        .join("media")
        .join(&id[..2])
        .join(&id[2..4])
        .join(&id);
    let mut stored = std::fs::read(&object).expect("object");
    stored[100_000] ^= 0x40;
    std::fs::write(&object, &stored).expect("tamper");

    let out = bob.home.path().join("doc.bin");
    let err = bob
        .client
        .download(&msg, &out, no_progress)
        .await
        .expect_err("tampering is detected");
    assert!(
        matches!(err, Error::Media(MediaError::Tampered(_))),
        "{err:?}"
    );
    assert!(!out.exists(), "no output from a tampered download");
}
