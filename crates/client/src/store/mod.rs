//! The local state of a profile, in one SQLite file (`home/state.db`, WAL).
//!
//! Why SQLite: a restarted client must keep its token, its mailbox cursor, its history, the ticks
//! of what it sent and the messages it has not managed to send yet. The store is also where
//! de-duplication happens: a UNIQUE index on (conversation, seq) makes a message re-delivered
//! after a reconnect a no-op, so the SDK emits each message once however often it arrives.
//!
//! The calls are synchronous; async code runs them through [`LocalStore::run`], which moves them
//! to tokio's blocking pool. Events are stored in one transaction per batch and only then
//! acknowledged to the server (durable before acknowledged).

mod schema;
#[cfg(test)]
mod tests;

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::{Connection, OptionalExtension, Row, Transaction, params};
use tern_proto::frames::{self, event, peer};

use crate::error::Error;
use crate::types::{Event, ReceiptEvent, ReceiptKind, SentMessage, StoredMessage, Tick};

/// The saved login, token included (never logged, never leaves the SDK).
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct SavedSession {
    pub server: String,
    pub user_id: u64,
    pub username: String,
    pub device_id: u64,
    pub token: String,
}

impl std::fmt::Debug for SavedSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SavedSession")
            .field("user_id", &self.user_id)
            .field("device_id", &self.device_id)
            .finish_non_exhaustive()
    }
}

/// A message waiting in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OutboxItem {
    pub peer_user: u64,
    pub peer_username: String,
    pub client_msg_id: String,
    pub body: Vec<u8>,
}

/// What a batch of mailbox events did to the store.
#[derive(Debug, Default)]
pub(crate) struct Applied {
    /// Events to emit, in mailbox order (duplicates and stale receipts left out).
    pub events: Vec<Event>,
    /// Highest mailbox_seq in the batch: what to acknowledge.
    pub ack_up_to: u64,
}

/// Handle to the profile database; cheap to clone.
#[derive(Clone)]
pub(crate) struct LocalStore {
    conn: Arc<Mutex<Connection>>,
}

const SELECT_MESSAGE: &str = "SELECT m.peer_username, m.peer_user, m.seq, m.sender_username,
    m.sender_user, m.outgoing, m.client_msg_id, m.body, m.server_ts_ms, m.failed IS NOT NULL,
    COALESCE(w.delivered_up_to, 0), COALESCE(w.read_up_to, 0)
    FROM messages m LEFT JOIN watermarks w ON w.peer_user = m.peer_user";

impl LocalStore {
    /// Opens (creating if needed) `home/state.db` and brings its schema up to date.
    pub fn open(home: &Path) -> Result<LocalStore, Error> {
        std::fs::create_dir_all(home)
            .map_err(|e| Error::Store(format!("cannot create {}: {e}", home.display())))?;
        let mut conn = Connection::open(home.join("state.db"))?;
        // WAL + synchronous=FULL: a committed batch survives a crash of the process or the
        // machine, which is what lets us acknowledge it to the server.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", true)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        schema::migrate(&mut conn)?;
        Ok(LocalStore {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite consistent (transactions roll back on
        // drop), so a poisoned lock is safe to keep using.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the blocking pool: SQLite calls may fsync and must not stall the runtime.
    pub async fn run<R, F>(&self, f: F) -> Result<R, Error>
    where
        F: FnOnce(&LocalStore) -> Result<R, Error> + Send + 'static,
        R: Send + 'static,
    {
        let store = self.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| Error::Store(format!("store task failed: {e}")))?
    }

    // ---- session -------------------------------------------------------------------------

    pub fn load_session(&self) -> Result<Option<SavedSession>, Error> {
        let conn = self.lock();
        let s = conn
            .query_row(
                "SELECT server, user_id, username, device_id, token FROM session WHERE id = 1",
                [],
                |r| {
                    Ok(SavedSession {
                        server: r.get(0)?,
                        user_id: r.get(1)?,
                        username: r.get(2)?,
                        device_id: r.get(3)?,
                        token: r.get(4)?,
                    })
                },
            )
            .optional()?;
        Ok(s)
    }

    /// Saves a new login. A new device starts with an empty mailbox, so the cursor restarts;
    /// if the profile belonged to another account, its local history is dropped.
    pub fn save_session(&self, s: &SavedSession) -> Result<(), Error> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let owner: Option<u64> = tx
            .query_row("SELECT value FROM meta WHERE key = 'owner_user'", [], |r| {
                r.get(0)
            })
            .optional()?;
        if owner.is_some_and(|o| o != s.user_id) {
            tx.execute_batch("DELETE FROM messages; DELETE FROM watermarks; DELETE FROM peers;")?;
        }
        tx.execute(
            "INSERT OR REPLACE INTO session (id, server, user_id, username, device_id, token)
             VALUES (1, ?1, ?2, ?3, ?4, ?5)",
            params![s.server, s.user_id, s.username, s.device_id, s.token],
        )?;
        set_meta(&tx, "owner_user", s.user_id)?;
        set_meta(&tx, "mailbox_cursor", 0)?;
        upsert_peer(&tx, s.user_id, &s.username)?;
        tx.commit()?;
        Ok(())
    }

    /// Forgets the login. Messages still in the outbox were addressed from the removed device
    /// and can never be sent: they are marked failed.
    pub fn clear_session(&self) -> Result<(), Error> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        tx.execute(
            "UPDATE messages SET failed = 'logged out' WHERE seq IS NULL AND failed IS NULL",
            [],
        )?;
        tx.execute("DELETE FROM session", [])?;
        set_meta(&tx, "mailbox_cursor", 0)?;
        tx.commit()?;
        Ok(())
    }

    /// The highest mailbox_seq stored (and so acknowledged or about to be).
    pub fn mailbox_cursor(&self) -> Result<u64, Error> {
        let conn = self.lock();
        let v: Option<u64> = conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'mailbox_cursor'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        Ok(v.unwrap_or(0))
    }

    // ---- peers ---------------------------------------------------------------------------

    pub fn remember_peer(&self, user_id: u64, username: &str) -> Result<(), Error> {
        let conn = self.lock();
        upsert_peer(&conn, user_id, username)?;
        Ok(())
    }

    pub fn peer_id(&self, username: &str) -> Result<Option<u64>, Error> {
        let conn = self.lock();
        let id = conn
            .query_row(
                "SELECT user_id FROM peers WHERE username = ?1",
                [username],
                |r| r.get(0),
            )
            .optional()?;
        Ok(id)
    }

    // ---- outbox --------------------------------------------------------------------------

    /// Puts a message of mine into the outbox (and the history, as pending).
    pub fn enqueue(
        &self,
        me: &SavedSession,
        item: &OutboxItem,
        now_ms: i64,
    ) -> Result<StoredMessage, Error> {
        let conn = self.lock();
        conn.execute(
            "INSERT INTO messages (peer_user, peer_username, seq, sender_user, sender_username,
                 sender_device, outgoing, client_msg_id, body, server_ts_ms, created_ms)
             VALUES (?1, ?2, NULL, ?3, ?4, ?5, 1, ?6, ?7, NULL, ?8)",
            params![
                item.peer_user,
                item.peer_username,
                me.user_id,
                me.username,
                me.device_id,
                item.client_msg_id,
                item.body,
                now_ms
            ],
        )?;
        let id = conn.last_insert_rowid();
        Ok(message_by_rowid(&conn, id)?)
    }

    /// This device's unsent messages, oldest first.
    pub fn outbox(&self, device_id: u64) -> Result<Vec<OutboxItem>, Error> {
        let conn = self.lock();
        let mut stmt = conn.prepare(
            "SELECT peer_user, peer_username, client_msg_id, body FROM messages
             WHERE sender_device = ?1 AND seq IS NULL AND failed IS NULL ORDER BY id",
        )?;
        let rows = stmt.query_map([device_id], |r| {
            Ok(OutboxItem {
                peer_user: r.get(0)?,
                peer_username: r.get(1)?,
                client_msg_id: r.get(2)?,
                body: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Records the server's `Sent`. Idempotent: a repeated `Sent` changes nothing.
    pub fn mark_sent(
        &self,
        device_id: u64,
        sent: &SentMessage,
        peer_user: u64,
    ) -> Result<(), Error> {
        let conn = self.lock();
        let n = conn.execute(
            "UPDATE messages SET seq = ?1, server_ts_ms = ?2, failed = NULL
             WHERE sender_device = ?3 AND client_msg_id = ?4 AND peer_user = ?5",
            params![
                sent.seq,
                sent.server_ts_ms,
                device_id,
                sent.client_msg_id,
                peer_user
            ],
        )?;
        if n == 0 {
            return Err(Error::Store(format!(
                "no outbox entry for {}",
                sent.client_msg_id
            )));
        }
        Ok(())
    }

    /// Takes a message out of the outbox for good after a permanent refusal.
    pub fn mark_failed(
        &self,
        device_id: u64,
        client_msg_id: &str,
        reason: &str,
    ) -> Result<(), Error> {
        let conn = self.lock();
        conn.execute(
            "UPDATE messages SET failed = ?1 WHERE sender_device = ?2 AND client_msg_id = ?3 AND seq IS NULL",
            params![reason, device_id, client_msg_id],
        )?;
        Ok(())
    }

    // ---- incoming events -----------------------------------------------------------------

    /// Stores a batch of mailbox events in one transaction. Messages already stored (same
    /// conversation and seq) and receipts that raise no watermark produce no event.
    pub fn apply_events(&self, me: u64, batch: &[frames::Event]) -> Result<Applied, Error> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let mut applied = Applied::default();
        for ev in batch {
            applied.ack_up_to = applied.ack_up_to.max(ev.mailbox_seq);
            let out = match &ev.kind {
                Some(event::Kind::Message(m)) => apply_message(&tx, me, m)?.map(Event::Message),
                Some(event::Kind::Receipt(r)) => apply_receipt(&tx, me, r)?.map(Event::Receipt),
                None => {
                    tracing::warn!(
                        mailbox_seq = ev.mailbox_seq,
                        "event without content, skipped"
                    );
                    None
                }
            };
            applied.events.extend(out);
        }
        let cursor: u64 = tx
            .query_row(
                "SELECT value FROM meta WHERE key = 'mailbox_cursor'",
                [],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or(0);
        set_meta(&tx, "mailbox_cursor", cursor.max(applied.ack_up_to))?;
        tx.commit()?;
        Ok(applied)
    }

    // ---- reading -------------------------------------------------------------------------

    /// The last `limit` messages of the conversation with `username`, oldest first (pending
    /// ones last).
    pub fn history(&self, username: &str, limit: usize) -> Result<Vec<StoredMessage>, Error> {
        let conn = self.lock();
        let sql = format!(
            "{SELECT_MESSAGE} WHERE m.peer_username = ?1
             ORDER BY m.seq IS NULL DESC, m.seq DESC, m.id DESC LIMIT ?2"
        );
        let mut stmt = conn.prepare(&sql)?;
        let rows = stmt.query_map(params![username, limit_param(limit)], message_from_row)?;
        let mut out: Vec<StoredMessage> = rows.collect::<Result<_, _>>()?;
        out.reverse();
        Ok(out)
    }

    /// My last `limit` outgoing messages (from any of my devices), oldest first, with ticks.
    pub fn sent_status(&self, limit: usize) -> Result<Vec<StoredMessage>, Error> {
        let conn = self.lock();
        let sql = format!("{SELECT_MESSAGE} WHERE m.outgoing = 1 ORDER BY m.id DESC LIMIT ?1");
        let mut stmt = conn.prepare(&sql)?;
        let rows = stmt.query_map(params![limit_param(limit)], message_from_row)?;
        let mut out: Vec<StoredMessage> = rows.collect::<Result<_, _>>()?;
        out.reverse();
        Ok(out)
    }

    /// The highest seq of a message from the peer, and how far I have read.
    pub fn read_position(&self, peer_user: u64) -> Result<(Option<u64>, u64), Error> {
        let conn = self.lock();
        let latest: Option<u64> = conn.query_row(
            "SELECT MAX(seq) FROM messages WHERE peer_user = ?1 AND outgoing = 0",
            [peer_user],
            |r| r.get(0),
        )?;
        let read: Option<u64> = conn
            .query_row(
                "SELECT my_read_up_to FROM watermarks WHERE peer_user = ?1",
                [peer_user],
                |r| r.get(0),
            )
            .optional()?;
        Ok((latest, read.unwrap_or(0)))
    }

    pub fn set_my_read(&self, peer_user: u64, up_to: u64) -> Result<(), Error> {
        let conn = self.lock();
        raise_watermarks(&conn, peer_user, 0, 0, up_to)?;
        Ok(())
    }
}

fn limit_param(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

fn set_meta(conn: &Connection, key: &str, value: u64) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?1, ?2)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        params![key, value],
    )?;
    Ok(())
}

fn upsert_peer(conn: &Connection, user_id: u64, username: &str) -> rusqlite::Result<()> {
    if username.is_empty() {
        return Ok(());
    }
    // A username belongs to one user; drop a stale mapping before recording the new one.
    conn.execute(
        "DELETE FROM peers WHERE username = ?1 AND user_id <> ?2",
        params![username, user_id],
    )?;
    conn.execute(
        "INSERT INTO peers (user_id, username) VALUES (?1, ?2)
         ON CONFLICT (user_id) DO UPDATE SET username = excluded.username",
        params![user_id, username],
    )?;
    Ok(())
}

/// Raises (never lowers) a conversation's watermarks. Returns the (delivered, read, my_read)
/// values before the update.
fn raise_watermarks(
    conn: &Connection,
    peer_user: u64,
    delivered: u64,
    read: u64,
    my_read: u64,
) -> rusqlite::Result<(u64, u64, u64)> {
    let before = conn
        .query_row(
            "SELECT delivered_up_to, read_up_to, my_read_up_to FROM watermarks WHERE peer_user = ?1",
            [peer_user],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?
        .unwrap_or((0, 0, 0));
    conn.execute(
        "INSERT INTO watermarks (peer_user, delivered_up_to, read_up_to, my_read_up_to)
         VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (peer_user) DO UPDATE SET
             delivered_up_to = MAX(delivered_up_to, excluded.delivered_up_to),
             read_up_to = MAX(read_up_to, excluded.read_up_to),
             my_read_up_to = MAX(my_read_up_to, excluded.my_read_up_to)",
        params![peer_user, delivered, read, my_read],
    )?;
    Ok(before)
}

fn peer_user_of(conversation: Option<&frames::Peer>) -> Option<u64> {
    match conversation?.kind? {
        peer::Kind::User(id) => Some(id),
    }
}

fn apply_message(
    tx: &Transaction<'_>,
    me: u64,
    m: &frames::Message,
) -> rusqlite::Result<Option<StoredMessage>> {
    let Some(peer_user) = peer_user_of(m.conversation.as_ref()) else {
        tracing::warn!(seq = m.seq, "message without a conversation, skipped");
        return Ok(None);
    };
    upsert_peer(tx, peer_user, &m.peer_username)?;
    upsert_peer(tx, m.sender_user, &m.sender_username)?;
    let inserted = tx.execute(
        "INSERT OR IGNORE INTO messages (peer_user, peer_username, seq, sender_user,
             sender_username, sender_device, outgoing, client_msg_id, body, server_ts_ms, created_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?10)",
        params![
            peer_user,
            m.peer_username,
            m.seq,
            m.sender_user,
            m.sender_username,
            m.sender_device,
            m.sender_user == me,
            m.client_msg_id,
            m.body,
            m.server_ts_ms
        ],
    )?;
    if inserted == 0 {
        return Ok(None);
    }
    message_by_rowid(tx, tx.last_insert_rowid()).map(Some)
}

fn apply_receipt(
    tx: &Transaction<'_>,
    me: u64,
    r: &frames::Receipt,
) -> rusqlite::Result<Option<ReceiptEvent>> {
    let Some(peer_user) = peer_user_of(r.conversation.as_ref()) else {
        tracing::warn!("receipt without a conversation, skipped");
        return Ok(None);
    };
    let kind = match frames::ReceiptKind::try_from(r.kind) {
        Ok(frames::ReceiptKind::Delivered) => ReceiptKind::Delivered,
        Ok(frames::ReceiptKind::Read) => ReceiptKind::Read,
        _ => {
            tracing::warn!(kind = r.kind, "receipt of unknown kind, skipped");
            return Ok(None);
        }
    };
    upsert_peer(tx, peer_user, &r.peer_username)?;
    upsert_peer(tx, r.reader_user, &r.reader_username)?;
    let up = r.up_to_seq;
    // The peer's watermarks over my messages; a read implies delivered. For a note to self the
    // peer is me, and both rules apply.
    let (mut d, mut rd, mut my) = (0, 0, 0);
    if r.reader_user == peer_user {
        d = up;
        if kind == ReceiptKind::Read {
            rd = up;
        }
    }
    if r.reader_user == me && kind == ReceiptKind::Read {
        my = up;
    }
    let (bd, br, bmy) = raise_watermarks(tx, peer_user, d, rd, my)?;
    let raised = d > bd || rd > br || my > bmy;
    if !raised {
        return Ok(None);
    }
    Ok(Some(ReceiptEvent {
        conversation: r.peer_username.clone(),
        peer_user,
        reader: r.reader_username.clone(),
        reader_user: r.reader_user,
        kind,
        up_to_seq: up,
        server_ts_ms: r.server_ts_ms,
    }))
}

fn message_by_rowid(conn: &Connection, id: i64) -> rusqlite::Result<StoredMessage> {
    conn.query_row(
        &format!("{SELECT_MESSAGE} WHERE m.id = ?1"),
        [id],
        message_from_row,
    )
}

fn message_from_row(r: &Row<'_>) -> rusqlite::Result<StoredMessage> {
    let seq: Option<u64> = r.get(2)?;
    let outgoing: bool = r.get(5)?;
    let body: Vec<u8> = r.get(7)?;
    let failed: bool = r.get(9)?;
    let delivered: u64 = r.get(10)?;
    let read: u64 = r.get(11)?;
    let status = outgoing.then(|| Tick::derive(seq, failed, delivered, read));
    Ok(StoredMessage {
        conversation: r.get(0)?,
        peer_user: r.get(1)?,
        seq,
        from: r.get(3)?,
        sender_user: r.get(4)?,
        outgoing,
        client_msg_id: r.get(6)?,
        text: String::from_utf8_lossy(&body).into_owned(),
        body,
        sent_at_ms: r.get(8)?,
        status,
    })
}
