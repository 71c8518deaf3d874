//! Numbered schema migrations, applied in order inside one transaction each, tracked with
//! `PRAGMA user_version`. A migration is never edited once released; add a new one instead.

use rusqlite::Connection;

/// Migration `i` brings the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: the initial schema.
    r#"
    -- The one saved login of this profile.
    CREATE TABLE session (
        id        INTEGER PRIMARY KEY CHECK (id = 1),
        server    TEXT    NOT NULL,
        user_id   INTEGER NOT NULL,
        username  TEXT    NOT NULL,
        device_id INTEGER NOT NULL,
        token     TEXT    NOT NULL
    );
    -- Small counters: 'mailbox_cursor' (last stored mailbox_seq), 'owner_user'.
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    );
    -- Usernames of users seen in events or looked up, to name conversations offline.
    CREATE TABLE peers (
        user_id  INTEGER PRIMARY KEY,
        username TEXT NOT NULL UNIQUE
    );
    -- History, incoming and outgoing. seq IS NULL: still in this device's outbox.
    CREATE TABLE messages (
        id              INTEGER PRIMARY KEY,
        peer_user       INTEGER NOT NULL,
        peer_username   TEXT    NOT NULL,
        seq             INTEGER,
        sender_user     INTEGER NOT NULL,
        sender_username TEXT    NOT NULL,
        sender_device   INTEGER NOT NULL,
        outgoing        INTEGER NOT NULL,
        client_msg_id   TEXT    NOT NULL,
        body            BLOB    NOT NULL,
        server_ts_ms    INTEGER,
        created_ms      INTEGER NOT NULL,
        failed          TEXT
    );
    -- De-duplication: a message is stored once per (conversation, seq) ...
    CREATE UNIQUE INDEX messages_conv_seq ON messages (peer_user, seq);
    -- ... and a client_msg_id once per sending device (the server's idempotency key).
    CREATE UNIQUE INDEX messages_sender_id ON messages (sender_device, client_msg_id);
    CREATE INDEX messages_outbox ON messages (sender_device) WHERE seq IS NULL;
    -- Per conversation: the peer's watermarks over my messages and my own read position.
    CREATE TABLE watermarks (
        peer_user       INTEGER PRIMARY KEY,
        delivered_up_to INTEGER NOT NULL DEFAULT 0,
        read_up_to      INTEGER NOT NULL DEFAULT 0,
        my_read_up_to   INTEGER NOT NULL DEFAULT 0
    );
    "#,
];

pub(super) fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let current: usize = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i + 1)?;
        tx.commit()?;
    }
    Ok(())
}
