//! A profile written by schema version 1 (direct conversations only) opens with its history,
//! ticks, read position and outbox intact.

use rusqlite::{Connection, params};

use super::{BOB, session};
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
    // Opening again is a no-op.
    drop(store);
    let store = LocalStore::open(dir.path()).expect("reopen");
    assert_eq!(store.history("bob", 10).expect("history").len(), 4);
}
