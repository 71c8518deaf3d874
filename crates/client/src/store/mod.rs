//! The local state of a profile, in one SQLite file (`home/state.db`, WAL).
//!
//! Why SQLite: a restarted client must keep its token, its mailbox cursor, its history, the ticks
//! of what it sent and the messages it has not managed to send yet. The store is also where
//! de-duplication happens: a UNIQUE index on (conversation, seq) makes a message re-delivered
//! after a reconnect a no-op, so the SDK emits each message once however often it arrives.
//!
//! A conversation is named by [`Conv`]: the direct one with a user, or a group. Both live in
//! the same tables, keyed by `(conv_kind, conv_id)`, so de-duplication, ticks and read
//! positions work the same for both.
//!
//! The calls are synchronous; async code runs them through [`LocalStore::run`], which moves them
//! to tokio's blocking pool. Events are stored in one transaction per batch and only then
//! acknowledged to the server (durable before acknowledged).
//!
//! - `apply.rs`: storing mailbox events (messages, receipts).
//! - `query.rs`: reading history, ticks and read positions.
//! - `uploads.rs`: files being sent, so that an interrupted send resumes.

mod apply;
pub(crate) mod crypto;
mod e2ee;
mod query;
mod schema;
#[cfg(test)]
mod tests;
mod uploads;

pub(crate) use e2ee::{Decrypted, Decryptor, senders};
pub(crate) use query::ConvName;
pub(crate) use uploads::{PendingUpload, SourceKey};

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::{Connection, OptionalExtension, params};
use tern_proto::frames::{self, peer};

use crate::error::Error;
use crate::types::{Event, SentMessage, StoredMessage};
use tern_crypto::pickle::PickleKey;

/// Reads `home/store.key`, creating it (32 random bytes, readable by the owner only) if missing.
fn key_file(home: &Path) -> Result<PickleKey, Error> {
    let path = home.join(KEY_FILE);
    let io = |e: std::io::Error| Error::Store(format!("key file {}: {e}", path.display()));
    match std::fs::read(&path) {
        Ok(bytes) => Ok(PickleKey::from_bytes(&bytes)?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = PickleKey::generate();
            let tmp = home.join(format!(
                "{KEY_FILE}.{}.tmp",
                hex::encode(rand::random::<[u8; 8]>())
            ));
            {
                use std::io::Write as _;
                let mut opts = std::fs::OpenOptions::new();
                opts.write(true).create(true).truncate(true);
                #[cfg(unix)]
                {
                    use std::os::unix::fs::OpenOptionsExt as _;
                    opts.mode(0o600);
                }
                let mut f = opts.open(&tmp).map_err(io)?;
                f.write_all(key.as_bytes()).map_err(io)?;
                f.sync_all().map_err(io)?;
            }
            // Exclusive: if another process created the key file meanwhile, its key wins.
            let linked = std::fs::hard_link(&tmp, &path);
            let _ = std::fs::remove_file(&tmp);
            match linked {
                Ok(()) => Ok(key),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    Ok(PickleKey::from_bytes(&std::fs::read(&path).map_err(io)?)?)
                }
                Err(e) => Err(io(e)),
            }
        }
        Err(e) => Err(io(e)),
    }
}

/// A conversation, as the local store keys it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Conv {
    /// The direct conversation with this user (myself for notes to self).
    Direct(u64),
    /// The group with this id.
    Group(u64),
}

impl Conv {
    const DIRECT: i64 = 0;
    const GROUP: i64 = 1;

    pub fn kind(self) -> i64 {
        match self {
            Conv::Direct(_) => Conv::DIRECT,
            Conv::Group(_) => Conv::GROUP,
        }
    }

    pub fn id(self) -> u64 {
        match self {
            Conv::Direct(id) | Conv::Group(id) => id,
        }
    }

    fn from_row(kind: i64, id: u64) -> Conv {
        if kind == Conv::GROUP {
            Conv::Group(id)
        } else {
            Conv::Direct(id)
        }
    }

    pub fn from_peer(p: Option<&frames::Peer>) -> Option<Conv> {
        match p?.kind? {
            peer::Kind::User(id) => Some(Conv::Direct(id)),
            peer::Kind::Group(id) => Some(Conv::Group(id)),
        }
    }

    pub fn to_peer(self) -> frames::Peer {
        match self {
            Conv::Direct(id) => frames::Peer::user(id),
            Conv::Group(id) => frames::Peer::group(id),
        }
    }

    pub fn group(self) -> Option<u64> {
        match self {
            Conv::Group(id) => Some(id),
            Conv::Direct(_) => None,
        }
    }

    /// The public name of the conversation: the peer's username, or the group id in decimal.
    pub fn public_name(self, peer_username: &str) -> String {
        match self {
            Conv::Direct(_) => peer_username.to_owned(),
            Conv::Group(id) => id.to_string(),
        }
    }
}

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
    pub conv: Conv,
    /// The peer's username, or the group's name as known when the message was written.
    pub conv_name: String,
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
    /// A pre-key message used one of my one-time keys: publish more.
    pub one_time_key_used: bool,
}

/// Handle to the profile database; cheap to clone.
#[derive(Clone)]
pub(crate) struct LocalStore {
    conn: Arc<Mutex<Connection>>,
    /// Encrypts the end-to-end encryption state at rest (`crypto.rs`).
    key: Arc<PickleKey>,
}

/// Where, among the sealed secrets, the push keys are (and the label they are sealed under).
const PUSH_RECEIVER: &str = "push_receiver";

/// The name of the key file that protects a profile's keys when no passphrase is set.
pub(crate) const KEY_FILE: &str = "store.key";

impl LocalStore {
    /// Opens (creating if needed) `home/state.db` and brings its schema up to date. The
    /// encryption state is protected with `passphrase` (argon2id, with a salt kept in the
    /// database) or, without one, with a random key in `home/store.key` (created, mode 0600).
    /// A wrong passphrase or key file is refused here, before anything else happens.
    pub fn open_protected(home: &Path, passphrase: Option<&str>) -> Result<LocalStore, Error> {
        let mut store = match passphrase {
            // The key is derived below; nothing is encrypted with this placeholder.
            Some(_) => LocalStore::open_with(home, PickleKey::generate())?,
            None => LocalStore::open(home)?,
        };
        if let Some(p) = passphrase {
            let salt = {
                let conn = store.lock();
                match crypto::meta_blob(&conn, "kdf_salt")? {
                    Some(s) => s,
                    None => {
                        let has_account: bool = conn.query_row(
                            "SELECT EXISTS (SELECT 1 FROM crypto_account)",
                            [],
                            |r| r.get(0),
                        )?;
                        if has_account {
                            return Err(Error::Crypto(
                                "this profile is protected by its key file, not a passphrase"
                                    .into(),
                            ));
                        }
                        let s = PickleKey::new_salt().to_vec();
                        crypto::set_meta_blob(&conn, "kdf_salt", &s)?;
                        s
                    }
                }
            };
            store.key = Arc::new(PickleKey::from_passphrase(p, &salt)?);
        }
        let conn = store.lock();
        if crypto::meta_blob(&conn, "kdf_salt")?.is_some() && passphrase.is_none() {
            return Err(Error::Crypto(
                "this profile is protected by a passphrase; give it (TERN_PASSPHRASE)".into(),
            ));
        }
        if let Err(e) = crypto::load_account(&conn, &store.key) {
            return Err(Error::Crypto(format!(
                "cannot open the profile's keys (wrong passphrase or key file?): {e}"
            )));
        }
        drop(conn);
        Ok(store)
    }

    /// Opens (creating if needed) `home/state.db` with the key file, and brings its schema up
    /// to date.
    pub fn open(home: &Path) -> Result<LocalStore, Error> {
        std::fs::create_dir_all(home)
            .map_err(|e| Error::Store(format!("cannot create {}: {e}", home.display())))?;
        let key = key_file(home)?;
        LocalStore::open_with(home, key)
    }

    fn open_with(home: &Path, key: PickleKey) -> Result<LocalStore, Error> {
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
            key: Arc::new(key),
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
            tx.execute_batch(
                "DELETE FROM messages; DELETE FROM watermarks; DELETE FROM reader_watermarks;
                 DELETE FROM peers; DELETE FROM groups; DELETE FROM hidden_seqs;
                 DELETE FROM key_trust; DELETE FROM device_keys;
                 UPDATE media_uploads SET upload_url = NULL, uploaded = 0;",
            )?;
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
        // The device is gone, and its push subscription with it.
        tx.execute("DELETE FROM crypto_meta WHERE key = ?1", [PUSH_RECEIVER])?;
        set_meta(&tx, "mailbox_cursor", 0)?;
        tx.commit()?;
        Ok(())
    }

    // ---- push ----------------------------------------------------------------------------

    /// Keeps (or, with `None`, forgets) the keys this device decrypts its pushes with,
    /// sealed with the profile's key.
    pub fn set_push_receiver(&self, r: Option<&tern_webpush::Receiver>) -> Result<(), Error> {
        let conn = self.lock();
        match r {
            Some(r) => {
                let plain = [r.secret_bytes(), r.auth().to_vec()].concat();
                let sealed = self.key.seal(PUSH_RECEIVER, &plain)?;
                crypto::set_meta_blob(&conn, PUSH_RECEIVER, &sealed)
            }
            None => {
                conn.execute("DELETE FROM crypto_meta WHERE key = ?1", [PUSH_RECEIVER])?;
                Ok(())
            }
        }
    }

    /// The keys this device decrypts its pushes with, if it made them.
    pub fn push_receiver(&self) -> Result<Option<tern_webpush::Receiver>, Error> {
        let conn = self.lock();
        let Some(sealed) = crypto::meta_blob(&conn, PUSH_RECEIVER)? else {
            return Ok(None);
        };
        let plain = self.key.open(PUSH_RECEIVER, &sealed)?;
        if plain.len() != 48 {
            return Err(Error::Crypto("the stored push keys are malformed".into()));
        }
        let (secret, auth) = plain.split_at(32);
        tern_webpush::Receiver::from_parts(secret, auth)
            .map(Some)
            .map_err(|e| Error::Crypto(format!("the stored push keys: {e}")))
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

    // ---- peers and groups ----------------------------------------------------------------

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

    /// Records a group fetched over HTTP: its name as of `as_of_seq`, and its members' names.
    pub fn remember_group(
        &self,
        group_id: u64,
        name: &str,
        as_of_seq: u64,
        members: &[(u64, &str)],
    ) -> Result<(), Error> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        upsert_group(&tx, group_id, name, as_of_seq)?;
        for (id, username) in members {
            upsert_peer(&tx, *id, username)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The group's name as last seen, if it was ever seen.
    pub fn group_name(&self, group_id: u64) -> Result<Option<String>, Error> {
        let conn = self.lock();
        let name = conn
            .query_row(
                "SELECT name FROM groups WHERE group_id = ?1",
                [group_id],
                |r| r.get(0),
            )
            .optional()?;
        Ok(name)
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
        let id = insert_outgoing(&conn, me, item, now_ms)?;
        Ok(query::message_by_rowid(&conn, id)?)
    }

    /// This device's unsent messages, oldest first.
    pub fn outbox(&self, device_id: u64) -> Result<Vec<OutboxItem>, Error> {
        let conn = self.lock();
        let mut stmt = conn.prepare(
            "SELECT conv_kind, conv_id, conv_name, client_msg_id, body FROM messages
             WHERE sender_device = ?1 AND seq IS NULL AND failed IS NULL ORDER BY id",
        )?;
        let rows = stmt.query_map([device_id], |r| {
            Ok(OutboxItem {
                conv: Conv::from_row(r.get(0)?, r.get(1)?),
                conv_name: r.get(2)?,
                client_msg_id: r.get(3)?,
                body: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Records the server's `Sent`. Idempotent: a repeated `Sent` changes nothing.
    pub fn mark_sent(&self, device_id: u64, sent: &SentMessage, conv: Conv) -> Result<(), Error> {
        let conn = self.lock();
        let n = conn.execute(
            "UPDATE messages SET seq = ?1, server_ts_ms = ?2, failed = NULL
             WHERE sender_device = ?3 AND client_msg_id = ?4 AND conv_kind = ?5 AND conv_id = ?6",
            params![
                sent.seq,
                sent.server_ts_ms,
                device_id,
                sent.client_msg_id,
                conv.kind(),
                conv.id()
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

    pub fn set_my_read(&self, conv: Conv, up_to: u64) -> Result<(), Error> {
        let conn = self.lock();
        raise_watermarks(&conn, conv, 0, 0, up_to)?;
        Ok(())
    }
}

/// Inserts a pending message of mine; returns its row id.
fn insert_outgoing(
    conn: &Connection,
    me: &SavedSession,
    item: &OutboxItem,
    now_ms: i64,
) -> rusqlite::Result<i64> {
    conn.execute(
        "INSERT INTO messages (conv_kind, conv_id, conv_name, seq, sender_user,
             sender_username, sender_device, outgoing, client_msg_id, body, server_ts_ms,
             created_ms)
         VALUES (?1, ?2, ?3, NULL, ?4, ?5, ?6, 1, ?7, ?8, NULL, ?9)",
        params![
            item.conv.kind(),
            item.conv.id(),
            item.conv_name,
            me.user_id,
            me.username,
            me.device_id,
            item.client_msg_id,
            item.body,
            now_ms
        ],
    )?;
    Ok(conn.last_insert_rowid())
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
    // No write when nothing changed (this runs for every device list a send looks at).
    conn.execute(
        "INSERT INTO peers (user_id, username) VALUES (?1, ?2)
         ON CONFLICT (user_id) DO UPDATE SET username = excluded.username
         WHERE username <> excluded.username",
        params![user_id, username],
    )?;
    Ok(())
}

/// Records a group's name as of group sequence number `as_of_seq`. Names only move forward in
/// the group's sequence, so a late duplicate or a stale fetch never restores an old name.
fn upsert_group(
    conn: &Connection,
    group_id: u64,
    name: &str,
    as_of_seq: u64,
) -> rusqlite::Result<()> {
    if name.is_empty() {
        return Ok(());
    }
    conn.execute(
        "INSERT INTO groups (group_id, name, name_seq) VALUES (?1, ?2, ?3)
         ON CONFLICT (group_id) DO UPDATE SET name = excluded.name, name_seq = excluded.name_seq
         WHERE excluded.name_seq >= groups.name_seq",
        params![group_id, name, as_of_seq],
    )?;
    Ok(())
}

/// Raises (never lowers) a conversation's watermarks: my ticks (delivered, read) and my own
/// read position. Returns the values before the update.
fn raise_watermarks(
    conn: &Connection,
    conv: Conv,
    delivered: u64,
    read: u64,
    my_read: u64,
) -> rusqlite::Result<(u64, u64, u64)> {
    let before = conn
        .query_row(
            "SELECT delivered_up_to, read_up_to, my_read_up_to FROM watermarks
             WHERE conv_kind = ?1 AND conv_id = ?2",
            params![conv.kind(), conv.id()],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?
        .unwrap_or((0, 0, 0));
    conn.execute(
        "INSERT INTO watermarks (conv_kind, conv_id, delivered_up_to, read_up_to, my_read_up_to)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (conv_kind, conv_id) DO UPDATE SET
             delivered_up_to = MAX(delivered_up_to, excluded.delivered_up_to),
             read_up_to = MAX(read_up_to, excluded.read_up_to),
             my_read_up_to = MAX(my_read_up_to, excluded.my_read_up_to)",
        params![conv.kind(), conv.id(), delivered, read, my_read],
    )?;
    Ok(before)
}
