//! The bookkeeping of files being sent: what a process killed mid-upload finds again.

use tern_crypto::media::MediaKey;
use tern_proto::content::{Content, MediaRef};

use super::{BOB, open, session};
use crate::store::{Conv, LocalStore, OutboxItem, PendingUpload, SavedSession, SourceKey};
use crate::types::Tick;

fn source(path: &str) -> SourceKey {
    SourceKey {
        path: path.into(),
        size: 3_000_000,
        mtime_ns: 1_700_000_000_123_456_789,
    }
}

fn encrypted(path: &str, temp: &str) -> PendingUpload {
    PendingUpload {
        id: 0,
        source: source(path),
        temp_name: temp.into(),
        media_id: "ab".repeat(32),
        key: MediaKey::from_bytes([7; 32]),
        plaintext_sha256: [9; 32],
        size: 3_000_000,
        encrypted_size: 3_000_000 + 28 + 46 * 16,
        upload_url: Some("ignored on insert".into()),
        uploaded: true,
        created_ms: 1234,
    }
}

#[test]
fn an_interrupted_send_is_found_again_after_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = "http://127.0.0.1:1/v1/uploads/u1";
    let id = {
        let store = open(&dir);
        let (row, replaced) = store
            .insert_upload(&encrypted("/home/a/photo.jpg", "t1.trnm"))
            .expect("insert");
        assert_eq!(replaced, None);
        // A new row starts without an upload.
        assert_eq!((row.upload_url.as_deref(), row.uploaded), (None, false));
        store.set_upload_url(row.id, Some(url)).expect("url");
        row.id
    };
    // The process died at 90%: a new one finds the same copy, key and upload.
    let store = LocalStore::open(dir.path()).expect("reopen");
    let row = store
        .pending_upload(&source("/home/a/photo.jpg"))
        .expect("query")
        .expect("found");
    assert_eq!(row.id, id);
    assert_eq!(row.temp_name, "t1.trnm");
    assert_eq!(row.key, MediaKey::from_bytes([7; 32]));
    assert_eq!(row.plaintext_sha256, [9; 32]);
    assert_eq!(row.upload_url.as_deref(), Some(url));
    assert!(!row.uploaded);
    assert_eq!(row.created_ms, 1234);
    store.mark_uploaded(id).expect("uploaded");
    assert!(store.uploads().expect("list")[0].uploaded);

    // The same path with another size or mtime is another file.
    let edited = SourceKey {
        mtime_ns: 1,
        ..source("/home/a/photo.jpg")
    };
    assert_eq!(store.pending_upload(&edited).expect("query"), None);
    assert_eq!(
        store
            .pending_upload(&source("/home/a/other.jpg"))
            .expect("query"),
        None
    );
}

#[test]
fn encrypting_the_same_file_again_replaces_the_old_copy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    let (first, _) = store
        .insert_upload(&encrypted("/f", "old.trnm"))
        .expect("insert");
    store.set_upload_url(first.id, Some("u")).expect("url");
    let (second, replaced) = store
        .insert_upload(&encrypted("/f", "new.trnm"))
        .expect("insert again");
    assert_eq!(
        replaced.as_deref(),
        Some("old.trnm"),
        "the caller deletes it"
    );
    assert_eq!(second.temp_name, "new.trnm");
    assert_eq!(
        second.upload_url, None,
        "the new copy has another id: a new upload"
    );
    assert_eq!(store.uploads().expect("list"), vec![second.clone()]);
    assert_eq!(
        store.delete_upload(second.id).expect("delete").as_deref(),
        Some("new.trnm")
    );
    assert_eq!(store.delete_upload(second.id).expect("delete again"), None);
    assert!(store.uploads().expect("list").is_empty());
}

#[test]
fn the_message_replaces_the_upload_in_one_transaction() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    let (row, _) = store
        .insert_upload(&encrypted("/photo.jpg", "t.trnm"))
        .expect("insert");
    let media = MediaRef {
        id: row.media_id.clone(),
        key: row.key.as_bytes().to_vec(),
        file_name: "photo.jpg".into(),
        mime_type: "image/jpeg".into(),
        size: row.size,
        ..Default::default()
    };
    let item = OutboxItem {
        conv: Conv::Direct(BOB),
        conv_name: "bob".into(),
        client_msg_id: "m1".into(),
        body: Content::media(media.clone()).encode_body(),
    };
    let me = session();
    let stored = store
        .enqueue_uploaded(&me, &item, 5, row.id)
        .expect("enqueue");
    assert_eq!(stored.status, Some(Tick::Pending));
    assert_eq!(stored.text, "[photo.jpg, 3.0 MB image/jpeg]");
    assert_eq!(stored.media(), Some(media));
    assert!(store.uploads().expect("list").is_empty());
    assert_eq!(
        store.outbox(me.device_id).expect("outbox"),
        vec![item.clone()]
    );

    // A failing enqueue (same client_msg_id) keeps the upload to resume.
    let (again, _) = store
        .insert_upload(&encrypted("/photo.jpg", "t2.trnm"))
        .expect("insert");
    assert!(store.enqueue_uploaded(&me, &item, 6, again.id).is_err());
    assert_eq!(store.uploads().expect("list"), vec![again]);
}

#[test]
fn another_account_does_not_inherit_uploads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    let (row, _) = store
        .insert_upload(&encrypted("/f", "t.trnm"))
        .expect("insert");
    store.set_upload_url(row.id, Some("u")).expect("url");
    store.mark_uploaded(row.id).expect("uploaded");
    // The same account logging in again keeps them.
    store.save_session(&session()).expect("same account");
    assert!(store.uploads().expect("list")[0].uploaded);
    let other = SavedSession {
        user_id: 99,
        username: "carol".into(),
        ..session()
    };
    store.save_session(&other).expect("other account");
    let rows = store.uploads().expect("list");
    // The encrypted copy is still good; the server-side state belonged to the other account.
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0].upload_url.as_deref(), rows[0].uploaded),
        (None, false)
    );
}

#[test]
fn debug_output_leaves_the_key_out() {
    let shown = format!("{:?}", encrypted("/f", "t.trnm"));
    assert!(shown.contains("t.trnm"));
    assert!(!shown.contains("key"), "{shown}");
    assert!(!shown.contains("[7, 7"), "{shown}");
}
