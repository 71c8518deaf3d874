//! Numbered migrations, applied in order inside one transaction each; `PRAGMA user_version`
//! records how many have been applied. Never edit a released migration: add the next one.

use rusqlite::Connection;

use super::db_error;
use crate::StoreError;

const MIGRATIONS: &[&str] = &[
    // 1: accounts, devices, conversations (direct and group), groups and members, messages,
    //    mailboxes, receipts.
    r#"
    CREATE TABLE users (
        id                 INTEGER PRIMARY KEY,
        username           TEXT NOT NULL UNIQUE,
        password_hash      TEXT NOT NULL,
        created_at         INTEGER NOT NULL,
        last_seen          INTEGER,
        last_seen_privacy  INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE devices (
        id          INTEGER PRIMARY KEY,
        user_id     INTEGER NOT NULL REFERENCES users(id),
        name        TEXT NOT NULL,
        token_hash  BLOB NOT NULL UNIQUE,
        created_at  INTEGER NOT NULL,
        last_seen   INTEGER,
        next_mseq   INTEGER NOT NULL DEFAULT 1
    );
    CREATE INDEX devices_by_user ON devices(user_id);
    -- kind 0 = direct, identified by its ordered pair of users; kind 1 = group (no pair; its id
    -- is the group id).
    CREATE TABLE conversations (
        id        INTEGER PRIMARY KEY,
        kind      INTEGER NOT NULL DEFAULT 0,
        user_lo   INTEGER REFERENCES users(id),
        user_hi   INTEGER REFERENCES users(id),
        next_seq  INTEGER NOT NULL DEFAULT 1,
        UNIQUE (user_lo, user_hi)
    );
    CREATE INDEX conversations_by_hi ON conversations(user_hi);
    CREATE TABLE groups (
        conversation_id  INTEGER PRIMARY KEY REFERENCES conversations(id),
        name             TEXT NOT NULL,
        description      TEXT NOT NULL DEFAULT '',
        members_can_add  INTEGER NOT NULL DEFAULT 0,
        created_at       INTEGER NOT NULL
    );
    -- role 0 = member, 1 = admin, 2 = owner; joined_seq = the group seq of the event that
    -- added the member (a member sees nothing before it). Leaving deletes the row; the group's
    -- system messages keep the history.
    CREATE TABLE members (
        conversation_id  INTEGER NOT NULL,
        user_id          INTEGER NOT NULL REFERENCES users(id),
        role             INTEGER NOT NULL,
        joined_seq       INTEGER NOT NULL,
        PRIMARY KEY (conversation_id, user_id)
    ) WITHOUT ROWID;
    CREATE INDEX members_by_user ON members(user_id);
    -- body is NULL once every addressed device has acknowledged (pending = 0): the server keeps
    -- the metadata for idempotent retries, not the content.
    -- kind 0 = a user's message (opaque body), 1 = a system message (an encoded GroupEvent).
    CREATE TABLE messages (
        conversation_id  INTEGER NOT NULL,
        seq              INTEGER NOT NULL,
        kind             INTEGER NOT NULL DEFAULT 0,
        sender_user      INTEGER NOT NULL,
        sender_device    INTEGER NOT NULL,
        client_msg_id    TEXT NOT NULL,
        server_ts        INTEGER NOT NULL,
        body             BLOB,
        pending          INTEGER NOT NULL,
        PRIMARY KEY (conversation_id, seq),
        UNIQUE (sender_device, client_msg_id)
    ) WITHOUT ROWID;
    -- kind 1 = message (seq = message seq, body = per-device body or NULL),
    -- kind 2 = delivered receipt, 3 = read receipt (seq = watermark, reader = reading user,
    -- all_delivered / all_read = the receiving user's ticks at that moment).
    CREATE TABLE mailbox (
        device_id        INTEGER NOT NULL,
        mseq             INTEGER NOT NULL,
        kind             INTEGER NOT NULL,
        conversation_id  INTEGER NOT NULL,
        seq              INTEGER NOT NULL,
        reader           INTEGER,
        body             BLOB,
        all_delivered    INTEGER,
        all_read         INTEGER,
        ts               INTEGER NOT NULL,
        PRIMARY KEY (device_id, mseq)
    ) WITHOUT ROWID;
    CREATE TABLE receipts (
        conversation_id  INTEGER NOT NULL,
        reader           INTEGER NOT NULL,
        delivered_up_to  INTEGER NOT NULL DEFAULT 0,
        read_up_to       INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (conversation_id, reader)
    ) WITHOUT ROWID;
    "#,
    // 2: media metadata. The bytes live in the server's blob store; these rows say which
    //    objects exist, who references them until when, and the incomplete uploads.
    r#"
    CREATE TABLE media (
        id          BLOB PRIMARY KEY,
        size        INTEGER NOT NULL,
        created_at  INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE media_refs (
        media_id    BLOB NOT NULL REFERENCES media(id) ON DELETE CASCADE,
        user_id     INTEGER NOT NULL,
        expires_at  INTEGER NOT NULL,
        PRIMARY KEY (user_id, media_id)
    ) WITHOUT ROWID;
    CREATE INDEX media_refs_by_media ON media_refs (media_id, expires_at);
    CREATE TABLE uploads (
        id          TEXT PRIMARY KEY,
        user_id     INTEGER NOT NULL,
        length      INTEGER NOT NULL,
        expected    BLOB,
        created_at  INTEGER NOT NULL,
        expires_at  INTEGER NOT NULL,
        media_id    BLOB
    ) WITHOUT ROWID;
    CREATE INDEX uploads_by_user ON uploads (user_id) WHERE media_id IS NULL;
    CREATE INDEX uploads_by_expiry ON uploads (expires_at);
    "#,
    // 3: the key directory: identity and fallback keys per device, one-time keys.
    r#"
    CREATE TABLE device_keys (
        device_id           INTEGER PRIMARY KEY REFERENCES devices(id) ON DELETE CASCADE,
        curve25519          TEXT NOT NULL,
        ed25519             TEXT NOT NULL,
        signature           TEXT NOT NULL,
        fallback_id         TEXT,
        fallback_key        TEXT,
        fallback_signature  TEXT,
        fallback_used       INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE one_time_keys (
        device_id   INTEGER NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
        key_id      TEXT NOT NULL,
        key         TEXT NOT NULL,
        signature   TEXT NOT NULL,
        PRIMARY KEY (device_id, key_id)
    ) WITHOUT ROWID;
    "#,
    // 4: mailbox bounds. Each mailbox row records the bytes it counts for (its own body, else
    //    the message's shared body; 0 for receipts); each device keeps the count and byte sum of
    //    its mailbox, maintained by every append and delete. Back-filled from existing rows.
    r#"
    ALTER TABLE devices ADD COLUMN mailbox_entries INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE devices ADD COLUMN mailbox_bytes INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE mailbox ADD COLUMN size INTEGER NOT NULL DEFAULT 0;
    UPDATE mailbox SET size = COALESCE(
        length(CAST(body AS BLOB)),
        (SELECT length(CAST(g.body AS BLOB)) FROM messages g
         WHERE g.conversation_id = mailbox.conversation_id AND g.seq = mailbox.seq),
        0)
    WHERE kind = 1;
    UPDATE devices SET
        mailbox_entries = (SELECT COUNT(*) FROM mailbox m WHERE m.device_id = devices.id),
        mailbox_bytes = (SELECT COALESCE(SUM(m.size), 0) FROM mailbox m WHERE m.device_id = devices.id);
    "#,
    // 5: direct conversations get the id computed from their pair of users,
    //    `logic::direct_conversation_id` = user_lo << 32 | user_hi (>= 2^32), so that any node
    //    knows it without a lookup. Old ids were small rowids (< 2^32), so the new ones collide
    //    with none of them; every table naming a conversation follows. Group ids do not change.
    r#"
    CREATE TEMP TABLE conv_renumber AS
        SELECT id AS old, (user_lo << 32) | user_hi AS new FROM conversations WHERE kind = 0;
    UPDATE messages SET conversation_id =
        (SELECT new FROM conv_renumber WHERE old = messages.conversation_id)
        WHERE conversation_id IN (SELECT old FROM conv_renumber);
    UPDATE mailbox SET conversation_id =
        (SELECT new FROM conv_renumber WHERE old = mailbox.conversation_id)
        WHERE conversation_id IN (SELECT old FROM conv_renumber);
    UPDATE receipts SET conversation_id =
        (SELECT new FROM conv_renumber WHERE old = receipts.conversation_id)
        WHERE conversation_id IN (SELECT old FROM conv_renumber);
    UPDATE conversations SET id = (user_lo << 32) | user_hi WHERE kind = 0;
    DROP TABLE conv_renumber;
    "#,
    // 6: resumable uploads whose bytes are staged outside the node (how many are durable and
    //    how they are staged, in the row), and leases: exclusion between the processes
    //    sharing the store (an upload's writer, an object's publication, garbage collection).
    r#"
    ALTER TABLE uploads ADD COLUMN received INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE uploads ADD COLUMN staging BLOB;
    CREATE TABLE leases (
        name        TEXT PRIMARY KEY,
        holder      TEXT NOT NULL,
        until_ms    INTEGER NOT NULL
    ) WITHOUT ROWID;
    "#,
    // 7: push: each device's Web Push subscription (gone with the device) with what its last
    //    push announced, when, and whether it was sent (PushState), and secrets the
    //    server makes once and keeps (the VAPID key), shared by every process of the store.
    r#"
    CREATE TABLE push_subscriptions (
        device_id   INTEGER PRIMARY KEY REFERENCES devices(id) ON DELETE CASCADE,
        endpoint    TEXT NOT NULL,
        p256dh      BLOB NOT NULL,
        auth        BLOB NOT NULL,
        updated_ms  INTEGER NOT NULL,
        expires_ms  INTEGER,
        pushed_mseq INTEGER,
        pushed_ms   INTEGER,
        push_confirmed INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE server_secrets (
        name        TEXT PRIMARY KEY,
        value       BLOB NOT NULL
    ) WITHOUT ROWID;
    "#,
];

/// Brings the database to the latest schema.
pub fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let current: usize =
        conn.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))? as usize;
    if current > MIGRATIONS.len() {
        return Err(db_error(format!(
            "database schema version {current} is newer than this server ({})",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
        tracing::info!(version = i + 1, "applied migration");
    }
    Ok(())
}
