//! Numbered schema migrations, applied in order inside one transaction each, tracked with
//! `PRAGMA user_version`. A migration is never edited once released; add a new one instead.

use rusqlite::{Connection, Transaction, params};
use tern_proto::content::Content;

/// Migration `i` brings the schema from version `i` to `i + 1`.
pub(super) const MIGRATIONS: &[&str] = &[
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
    // 2: groups. A conversation is now named by (conv_kind, conv_id): kind 0 is the direct
    // conversation with user conv_id, kind 1 is group conv_id. SQLite cannot change a table's
    // columns or unique keys in place, so messages and watermarks are rebuilt (rows keep their
    // ids, so history order is unchanged).
    r#"
    CREATE TABLE messages_v2 (
        id              INTEGER PRIMARY KEY,
        conv_kind       INTEGER NOT NULL,   -- 0: direct, 1: group
        conv_id         INTEGER NOT NULL,   -- the peer's user id, or the group id
        conv_name       TEXT    NOT NULL,   -- the peer's username, or the group's name then
        seq             INTEGER,
        sender_user     INTEGER NOT NULL,
        sender_username TEXT    NOT NULL,
        sender_device   INTEGER NOT NULL,
        outgoing        INTEGER NOT NULL,
        system          INTEGER NOT NULL DEFAULT 0,  -- body is an encoded GroupEvent
        client_msg_id   TEXT    NOT NULL,
        body            BLOB    NOT NULL,
        server_ts_ms    INTEGER,
        created_ms      INTEGER NOT NULL,
        failed          TEXT
    );
    INSERT INTO messages_v2 (id, conv_kind, conv_id, conv_name, seq, sender_user,
        sender_username, sender_device, outgoing, system, client_msg_id, body, server_ts_ms,
        created_ms, failed)
    SELECT id, 0, peer_user, peer_username, seq, sender_user, sender_username, sender_device,
        outgoing, 0, client_msg_id, body, server_ts_ms, created_ms, failed FROM messages;
    DROP TABLE messages;
    ALTER TABLE messages_v2 RENAME TO messages;
    -- De-duplication: a message is stored once per (conversation, seq) ...
    CREATE UNIQUE INDEX messages_conv_seq ON messages (conv_kind, conv_id, seq);
    -- ... and a client_msg_id once per sending device (the server's idempotency key).
    CREATE UNIQUE INDEX messages_sender_id ON messages (sender_device, client_msg_id);
    CREATE INDEX messages_outbox ON messages (sender_device) WHERE seq IS NULL;
    CREATE INDEX messages_conv_name ON messages (conv_kind, conv_name);

    -- Per conversation: my ticks (direct: the peer's watermarks; group: what every other
    -- member has, the receipts' all_* fields) and my own read position.
    CREATE TABLE watermarks_v2 (
        conv_kind       INTEGER NOT NULL,
        conv_id         INTEGER NOT NULL,
        delivered_up_to INTEGER NOT NULL DEFAULT 0,
        read_up_to      INTEGER NOT NULL DEFAULT 0,
        my_read_up_to   INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (conv_kind, conv_id)
    );
    INSERT INTO watermarks_v2 (conv_kind, conv_id, delivered_up_to, read_up_to, my_read_up_to)
    SELECT 0, peer_user, delivered_up_to, read_up_to, my_read_up_to FROM watermarks;
    DROP TABLE watermarks;
    ALTER TABLE watermarks_v2 RENAME TO watermarks;

    -- Per conversation and reader: the watermarks of each participant, so that a receipt is
    -- reported once even when it does not move my ticks (one member of many read).
    CREATE TABLE reader_watermarks (
        conv_kind       INTEGER NOT NULL,
        conv_id         INTEGER NOT NULL,
        reader_user     INTEGER NOT NULL,
        delivered_up_to INTEGER NOT NULL DEFAULT 0,
        read_up_to      INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (conv_kind, conv_id, reader_user)
    );

    -- Names of the groups seen in events or fetched, to name conversations offline, with
    -- the group seq they were current at (a stale answer never restores an old name).
    CREATE TABLE groups (
        group_id INTEGER PRIMARY KEY,
        name     TEXT    NOT NULL,
        name_seq INTEGER NOT NULL DEFAULT 0
    );
    "#,
    // 3: media. Message bodies become `Content` (PROTOCOL.md §8.5): the text bodies stored so
    // far are re-encoded by `reencode_bodies` in the same transaction. Files being sent are
    // tracked so that a send interrupted at any point resumes where it stopped: the source
    // file (path, size, mtime), its encrypted copy under `home/media-tmp/` with its key and
    // hashes, and the tus upload's URL once created.
    r#"
    CREATE TABLE media_uploads (
        id               INTEGER PRIMARY KEY,
        source_path      TEXT    NOT NULL,
        source_size      INTEGER NOT NULL,
        source_mtime_ns  INTEGER NOT NULL,
        temp_name        TEXT    NOT NULL UNIQUE,  -- file name in home/media-tmp
        media_id         TEXT    NOT NULL,         -- hex SHA-256 of the ciphertext
        media_key        BLOB    NOT NULL,
        plaintext_sha256 BLOB    NOT NULL,
        size             INTEGER NOT NULL,
        encrypted_size   INTEGER NOT NULL,
        upload_url       TEXT,                     -- the tus upload, once created
        uploaded         INTEGER NOT NULL DEFAULT 0, -- the object is on the server, referenced
        created_ms       INTEGER NOT NULL,
        UNIQUE (source_path, source_size, source_mtime_ns)
    );
    "#,
    // 4: end-to-end encryption (PROTOCOL.md §9). Every secret is a vodozemac pickle encrypted
    // with the profile's pickle key (a passphrase through argon2id, or home/store.key); the
    // other columns are public keys and ids.
    r#"
    -- Small binary values: 'kdf_salt' (passphrase profiles), 'published' (identity published).
    CREATE TABLE crypto_meta (
        key   TEXT PRIMARY KEY,
        value BLOB NOT NULL
    );
    -- This device's Olm account.
    CREATE TABLE crypto_account (
        id        INTEGER PRIMARY KEY CHECK (id = 1),
        user_id   INTEGER NOT NULL,
        device_id INTEGER NOT NULL,
        pickle    TEXT    NOT NULL
    );
    -- Identity keys of other devices (and my own other devices), each checked against its
    -- self-signature. current = 0: no longer listed by the server (kept, so that what such a
    -- device sent before it was removed can still be decrypted; never encrypted for).
    CREATE TABLE device_keys (
        user_id    INTEGER NOT NULL,
        device_id  INTEGER NOT NULL,
        curve25519 TEXT    NOT NULL,
        ed25519    TEXT    NOT NULL,
        signature  TEXT    NOT NULL,
        current    INTEGER NOT NULL DEFAULT 1,
        PRIMARY KEY (user_id, device_id)
    );
    -- Users whose device keys I have seen (trust on first use) and, once compared, verified:
    -- the sorted Ed25519 keys at that time. A change of keys is reported; a verified user whose
    -- keys change is no longer verified.
    CREATE TABLE key_trust (
        user_id       INTEGER PRIMARY KEY,
        seen_keys     TEXT NOT NULL,
        verified_keys TEXT
    );
    -- Olm sessions with other devices, by the peer device's Curve25519 key.
    CREATE TABLE olm_sessions (
        session_id   TEXT PRIMARY KEY,
        user_id      INTEGER NOT NULL,
        device_id    INTEGER NOT NULL,
        sender_key   TEXT    NOT NULL,
        pickle       TEXT    NOT NULL,
        last_used_ms INTEGER NOT NULL
    );
    CREATE INDEX olm_sessions_key ON olm_sessions (sender_key, last_used_ms);
    -- Devices whose message I could not decrypt: the next message to them starts a new session.
    CREATE TABLE olm_wedged (device_id INTEGER PRIMARY KEY);
    -- Sessions ever created from a pre-key message: the same pre-key message again (a replay,
    -- which a fallback key would otherwise accept) is refused.
    CREATE TABLE olm_inbound_created (session_id TEXT PRIMARY KEY);
    -- My outbound Megolm session per group, and the devices it has been shared with.
    CREATE TABLE megolm_outbound (
        group_id   INTEGER PRIMARY KEY,
        session_id TEXT    NOT NULL,
        pickle     TEXT    NOT NULL,
        created_ms INTEGER NOT NULL
    );
    CREATE TABLE megolm_shared (
        group_id   INTEGER NOT NULL,
        session_id TEXT    NOT NULL,
        device_id  INTEGER NOT NULL,
        PRIMARY KEY (group_id, session_id, device_id)
    );
    -- Inbound Megolm sessions, bound to the group and sending device they were received for.
    CREATE TABLE megolm_inbound (
        sender_key    TEXT    NOT NULL,
        session_id    TEXT    NOT NULL,
        group_id      INTEGER NOT NULL,
        sender_user   INTEGER NOT NULL,
        sender_device INTEGER NOT NULL,
        pickle        TEXT    NOT NULL,
        PRIMARY KEY (sender_key, session_id)
    );
    -- Message indexes decrypted per inbound session, with the seq they came with: the same
    -- index again under another seq is a replay.
    CREATE TABLE megolm_seen (
        session_id TEXT    NOT NULL,
        idx        INTEGER NOT NULL,
        conv_id    INTEGER NOT NULL,
        seq        INTEGER NOT NULL,
        PRIMARY KEY (session_id, idx)
    );
    -- Messages received but not shown (key shares, and fillers for devices that already had
    -- the key), so that a redelivery is recognised.
    CREATE TABLE hidden_seqs (
        conv_kind INTEGER NOT NULL,
        conv_id   INTEGER NOT NULL,
        seq       INTEGER NOT NULL,
        PRIMARY KEY (conv_kind, conv_id, seq)
    );
    -- Why a received message could not be decrypted (its body is then empty).
    ALTER TABLE messages ADD COLUMN undecryptable TEXT;
    "#,
];

/// Runs after migration `i`'s SQL, in its transaction: data changes SQL cannot express.
fn after(i: usize, tx: &Transaction<'_>) -> rusqlite::Result<()> {
    match i {
        2 => reencode_bodies(tx),
        _ => Ok(()),
    }
}

/// Bodies stored before version 3 are plain UTF-8 text; they become `Content::text`. In
/// batches, so that a long history is never all in memory.
fn reencode_bodies(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    const BATCH: i64 = 512;
    let mut select = tx.prepare(
        "SELECT id, body FROM messages WHERE system = 0 AND id > ?1 ORDER BY id LIMIT ?2",
    )?;
    let mut update = tx.prepare("UPDATE messages SET body = ?1 WHERE id = ?2")?;
    let mut after_id = 0i64;
    loop {
        let rows: Vec<(i64, Vec<u8>)> = select
            .query_map(params![after_id, BATCH], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        let Some((last, _)) = rows.last() else {
            return Ok(());
        };
        after_id = *last;
        for (id, body) in rows {
            let content = Content::text(String::from_utf8_lossy(&body));
            update.execute(params![content.encode_body(), id])?;
        }
    }
}

pub(super) fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let current: usize = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        after(i, &tx)?;
        tx.pragma_update(None, "user_version", i + 1)?;
        tx.commit()?;
    }
    Ok(())
}
