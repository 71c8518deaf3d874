//! A profile written by schema version 1 (direct conversations only) opens with its history,
//! ticks, read position and outbox intact.

use rusqlite::{Connection, params};

use super::{BOB, session, text_body};
use crate::store::schema::MIGRATIONS;
use crate::store::{Conv, LocalStore};
use crate::types::Tick;

#[test]
fn version_1_profiles_are_migrated() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let conn = Connection::open(dir.path().join("state.db")).expect("open v1");
        conn.execute_batch(MIGRATIONS[0]).expect("v1 schema");
        conn.pragma_update(None, "user_version", 1)
            .expect("version");
        conn.execute_batch(
            "INSERT INTO meta (key, value) VALUES ('owner_user', 1), ('mailbox_cursor', 7);
             INSERT INTO peers (user_id, username) VALUES (1, 'alice'), (2, 'bob');
             INSERT INTO session (id, server, user_id, username, device_id, token)
                 VALUES (1, 'http://127.0.0.1:1', 1, 'alice', 10, 'secret');
             INSERT INTO watermarks (peer_user, delivered_up_to, read_up_to, my_read_up_to)
                 VALUES (2, 2, 1, 3);",
        )
        .expect("v1 rows");
        let rows: [(Option<u64>, u64, bool, &str); 4] = [
            (Some(1), 1, true, "mine, read"),
            (Some(2), 1, true, "mine, delivered"),
            (Some(3), 2, false, "his"),
            (None, 1, true, "pending"),
        ];
        for (i, (seq, sender, outgoing, text)) in rows.iter().enumerate() {
            conn.execute(
                "INSERT INTO messages (peer_user, peer_username, seq, sender_user,
                     sender_username, sender_device, outgoing, client_msg_id, body,
                     server_ts_ms, created_ms)
                 VALUES (2, 'bob', ?1, ?2, ?3, 10, ?4, ?5, ?6, 1, 1)",
                params![
                    seq,
                    sender,
                    if *sender == 1 { "alice" } else { "bob" },
                    outgoing,
                    format!("c{i}"),
                    text.as_bytes()
                ],
            )
            .expect("v1 message");
        }
    }
    let store = LocalStore::open(dir.path()).expect("migrate");
    assert_eq!(store.load_session().expect("session"), Some(session()));
    assert_eq!(store.mailbox_cursor().expect("cursor"), 7);
    let history = store.history("bob", 10).expect("history");
    let view: Vec<_> = history
        .iter()
        .map(|m| (m.seq, m.text.as_str(), m.status, m.group))
        .collect();
    assert_eq!(
        view,
        [
            (Some(1), "mine, read", Some(Tick::Read), None),
            (Some(2), "mine, delivered", Some(Tick::Delivered), None),
            (Some(3), "his", None, None),
            (None, "pending", Some(Tick::Pending), None),
        ]
    );
    assert_eq!(
        store.read_position(Conv::Direct(BOB)).expect("pos"),
        (Some(3), 3)
    );
    let outbox = store.outbox(10).expect("outbox");
    assert_eq!(outbox.len(), 1);
    assert_eq!(outbox[0].conv, Conv::Direct(BOB));
    assert_eq!(outbox[0].conv_name, "bob");
    // Bodies were re-encoded as Content, so the outbox sends what every SDK reads.
    assert_eq!(outbox[0].body, text_body("pending"));
    // Opening again is a no-op.
    drop(store);
    let store = LocalStore::open(dir.path()).expect("reopen");
    assert_eq!(store.history("bob", 10).expect("history").len(), 4);
}

/// Version 2 (groups) to 3 (Content bodies): user bodies are re-encoded, system bodies (an
/// encoded GroupEvent written by the server) are left alone.
#[test]
fn version_2_bodies_become_content() {
    let dir = tempfile::tempdir().expect("tempdir");
    let system_body = vec![0x08, 0x01, 0x22, 0x03, b'F', b'a', b'm'];
    {
        let mut conn = Connection::open(dir.path().join("state.db")).expect("open v2");
        for sql in &MIGRATIONS[..2] {
            conn.execute_batch(sql).expect("schema");
        }
        conn.pragma_update(None, "user_version", 2)
            .expect("version");
        let tx = conn.transaction().expect("tx");
        // More rows than one re-encoding batch.
        for seq in 1..=1200u64 {
            tx.execute(
                "INSERT INTO messages (conv_kind, conv_id, conv_name, seq, sender_user,
                     sender_username, sender_device, outgoing, system, client_msg_id, body,
                     server_ts_ms, created_ms)
                 VALUES (0, 2, 'bob', ?1, 2, 'bob', 20, 0, 0, ?2, ?3, 1, 1)",
                params![seq, format!("c{seq}"), format!("text {seq}").as_bytes()],
            )
            .expect("message");
        }
        tx.execute(
            "INSERT INTO messages (conv_kind, conv_id, conv_name, seq, sender_user,
                 sender_username, sender_device, outgoing, system, client_msg_id, body,
                 server_ts_ms, created_ms)
             VALUES (1, 5, 'Fam', 1, 2, 'bob', 0, 0, 1, '', ?1, 1, 1)",
            params![system_body],
        )
        .expect("system message");
        tx.commit().expect("commit");
    }
    let store = LocalStore::open(dir.path()).expect("migrate");
    let history = store.history("bob", 2000).expect("history");
    assert_eq!(history.len(), 1200);
    for (i, m) in history.iter().enumerate() {
        assert_eq!(m.text, format!("text {}", i + 1));
        assert_eq!(m.body, text_body(&m.text));
    }
    let group = store.conversation(Conv::Group(5), 10).expect("group");
    assert_eq!(group[0].body, system_body, "system bodies are untouched");
    assert!(group[0].is_system());
}
