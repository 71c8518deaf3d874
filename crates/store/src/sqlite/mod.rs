//! The embedded SQLite backend.
//!
//! One writer thread owns the only write connection and does **group commit**: it takes every
//! write waiting in its queue (up to [`MAX_BATCH`]), runs each inside a savepoint of one
//! transaction, commits once, and only then answers each caller. Durability (`synchronous=FULL`
//! in WAL mode: the commit is fsynced) therefore costs one fsync per batch, not per message, and a
//! caller never hears "done" for something that is not on disk. A write that fails rolls back to
//! its savepoint and fails alone.
//!
//! Reads go to a small pool of read-only connections (WAL lets them run beside the writer) on
//! tokio's blocking threads.

mod accounts;
mod cache;
mod groups;
mod keys;
mod media;
mod messaging;
mod push;
mod schema;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use async_trait::async_trait;
use rusqlite::{Connection, OpenFlags, Transaction};
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::*;
use cache::WriterCache;

/// This backend's name in errors.
const BACKEND: &str = "sqlite";

/// A failure of the SQLite database (or of the data in it).
pub(crate) fn db_error(message: String) -> StoreError {
    StoreError::Database {
        backend: BACKEND,
        message,
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        db_error(e.to_string())
    }
}

/// Most writes committed in one transaction.
pub const MAX_BATCH: usize = 1024;
/// Writes waiting for the writer before callers wait for room.
const WRITE_QUEUE: usize = 8192;

type Completion = Box<dyn FnOnce(Result<(), StoreError>) + Send>;
type WriteOp = Box<dyn FnOnce(&Transaction<'_>, &mut WriterCache) -> (bool, Completion) + Send>;

/// Options for [`SqliteStore::open`].
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// Read connections (concurrent reads).
    pub readers: usize,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions { readers: 4 }
    }
}

pub struct SqliteStore {
    path: PathBuf,
    writes: Mutex<Option<mpsc::Sender<WriteOp>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    readers: Arc<ReadPool>,
}

struct ReadPool {
    permits: Semaphore,
    conns: Mutex<Vec<Connection>>,
}

/// Statements kept prepared per connection. rusqlite's default of 16 is fewer than the store's
/// distinct statements, so the cache thrashed and SQL was parsed again on the hot path (seen in
/// a profile of `tern-bench connect`: `sqlite3RunParser` and friends near the top).
const STATEMENT_CACHE: usize = 256;

fn configure(conn: &Connection) -> Result<(), StoreError> {
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(())
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and brings its schema up to date.
    pub fn open(path: &Path, opts: SqliteOptions) -> Result<SqliteStore, StoreError> {
        let mut conn = Connection::open(path)?;
        configure(&conn)?;
        schema::migrate(&mut conn)?;
        let mut readers = Vec::with_capacity(opts.readers);
        for _ in 0..opts.readers.max(1) {
            let r = Connection::open_with_flags(
                path,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )?;
            r.busy_timeout(std::time::Duration::from_secs(5))?;
            r.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
            readers.push(r);
        }
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let writer = std::thread::Builder::new()
            .name("tern-sqlite-writer".into())
            .spawn(move || writer_loop(conn, rx))
            .map_err(|e| db_error(format!("cannot start writer thread: {e}")))?;
        Ok(SqliteStore {
            path: path.to_owned(),
            writes: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
            readers: Arc::new(ReadPool {
                permits: Semaphore::new(readers.len()),
                conns: Mutex::new(readers),
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` inside the writer's next batch; answers after the batch committed.
    async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>, &mut WriterCache) -> Result<T, StoreError> + Send + 'static,
    {
        let sender = self
            .writes
            .lock()
            .map_err(|_| StoreError::Closed)?
            .clone()
            .ok_or(StoreError::Closed)?;
        let (done_tx, done_rx) = oneshot::channel();
        let op: WriteOp = Box::new(move |txn, cache| {
            let result = f(txn, cache);
            let ok = result.is_ok();
            let completion: Completion = Box::new(move |commit| {
                let _ = done_tx.send(commit.and(result));
            });
            (ok, completion)
        });
        sender.send(op).await.map_err(|_| StoreError::Closed)?;
        done_rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Runs `f` on a read connection on a blocking thread.
    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let pool = self.readers.clone();
        let _permit = pool
            .permits
            .acquire()
            .await
            .map_err(|_| StoreError::Closed)?;
        let pool2 = pool.clone();
        tokio::task::spawn_blocking(move || {
            let conn = pool2
                .conns
                .lock()
                .map_err(|_| StoreError::Closed)?
                .pop()
                .ok_or(StoreError::Closed)?;
            let result = f(&conn);
            if let Ok(mut conns) = pool2.conns.lock() {
                conns.push(conn);
            }
            result
        })
        .await
        .map_err(|e| db_error(format!("read task failed: {e}")))?
    }
}

fn writer_loop(mut conn: Connection, mut rx: mpsc::Receiver<WriteOp>) {
    let mut batch: Vec<WriteOp> = Vec::with_capacity(MAX_BATCH);
    let mut cache = WriterCache::default();
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let started = std::time::Instant::now();
        let (commit, completions) = run_batch(&mut conn, &mut cache, &mut batch);
        if commit.is_err() {
            // The cache may hold state of the rolled-back batch.
            cache.clear();
        }
        metrics::histogram!("tern_store_commit_batch_size").record(completions.len() as f64);
        metrics::histogram!("tern_store_commit_seconds").record(started.elapsed().as_secs_f64());
        for done in completions {
            done(commit.clone());
        }
    }
    // The queue closed: checkpoint the WAL so the database file is complete on its own.
    if let Err(e) = conn.pragma_update(None, "wal_checkpoint", "TRUNCATE") {
        tracing::warn!(error = %e, "WAL checkpoint at close failed");
    }
}

fn run_batch(
    conn: &mut Connection,
    cache: &mut WriterCache,
    batch: &mut Vec<WriteOp>,
) -> (Result<(), StoreError>, Vec<Completion>) {
    let mut completions = Vec::with_capacity(batch.len());
    let txn = match conn.transaction() {
        Ok(t) => t,
        Err(e) => {
            let err = StoreError::from(e);
            tracing::error!(error = %err, "cannot begin a transaction");
            // The callers' closures never ran; dropping them fails each caller's request.
            batch.clear();
            return (Err(err), completions);
        }
    };
    for op in batch.drain(..) {
        if let Err(e) = txn.execute_batch("SAVEPOINT op") {
            tracing::error!(error = %e, "savepoint failed");
        }
        let (ok, done) = op(&txn, cache);
        let end = if ok {
            "RELEASE op"
        } else {
            // A failed write may have loaded state that it then rolled back.
            cache.clear();
            "ROLLBACK TO op; RELEASE op"
        };
        if let Err(e) = txn.execute_batch(end) {
            tracing::error!(error = %e, "savepoint release failed");
        }
        completions.push(done);
    }
    let commit = txn.commit().map_err(StoreError::from);
    if let Err(e) = &commit {
        tracing::error!(error = %e, "group commit failed");
    }
    (commit, completions)
}

#[async_trait]
impl Store for SqliteStore {
    async fn create_user(
        &self,
        username: &str,
        hash: &str,
        now: i64,
    ) -> Result<UserId, StoreError> {
        let (u, h) = (username.to_owned(), hash.to_owned());
        self.write(move |t, _| accounts::create_user(t, &u, &h, now))
            .await
    }

    async fn user_by_name(&self, username: &str) -> Result<Option<UserRecord>, StoreError> {
        let u = username.to_owned();
        self.read(move |c| accounts::user_by_name(c, &u)).await
    }

    async fn create_device(
        &self,
        user: UserId,
        name: &str,
        token_hash: &[u8],
        max_devices: usize,
        now: i64,
    ) -> Result<DeviceId, StoreError> {
        let (n, h) = (name.to_owned(), token_hash.to_owned());
        self.write(move |t, cache| {
            cache.clear();
            accounts::create_device(t, user, &n, &h, max_devices, now)
        })
        .await
    }

    async fn device_by_token(&self, token_hash: &[u8]) -> Result<Option<DeviceAuth>, StoreError> {
        let h = token_hash.to_owned();
        self.read(move |c| accounts::device_by_token(c, &h)).await
    }

    async fn list_devices(&self, user: UserId) -> Result<Vec<DeviceRecord>, StoreError> {
        self.read(move |c| accounts::list_devices(c, user)).await
    }

    async fn remove_device(&self, user: UserId, device: DeviceId) -> Result<(), StoreError> {
        self.write(move |t, cache| {
            cache.clear();
            accounts::remove_device(t, user, device)
        })
        .await
    }

    async fn set_last_seen_privacy(&self, user: UserId, v: Visibility) -> Result<(), StoreError> {
        self.write(move |t, _| accounts::set_privacy(t, user, v))
            .await
    }

    async fn are_contacts(&self, a: UserId, b: UserId) -> Result<bool, StoreError> {
        self.read(move |c| accounts::are_contacts(c, a, b)).await
    }

    async fn save_last_seen(&self, batch: Vec<LastSeenUpdate>) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        self.write(move |t, _| accounts::save_last_seen(t, &batch))
            .await
    }

    async fn post_messages(
        &self,
        posts: Vec<NewMessage>,
    ) -> Result<Vec<Result<PostOutcome, StoreError>>, StoreError> {
        self.write(move |t, cache| {
            let mut out = Vec::with_capacity(posts.len());
            for post in &posts {
                t.execute_batch("SAVEPOINT post")?;
                let r = messaging::post_message(t, cache, post);
                if r.is_ok() {
                    t.execute_batch("RELEASE post")?;
                } else {
                    cache.clear();
                    t.execute_batch("ROLLBACK TO post; RELEASE post")?;
                }
                out.push(r);
            }
            Ok(out)
        })
        .await
    }

    async fn mailbox_after(
        &self,
        device: DeviceId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<MailboxEntry>, StoreError> {
        self.read(move |c| messaging::mailbox_after(c, device, after, limit))
            .await
    }

    async fn ack(
        &self,
        who: DeviceAuth,
        up_to: u64,
        now: i64,
    ) -> Result<Vec<Delivery>, StoreError> {
        self.write(move |t, _| messaging::ack(t, &who, up_to, now))
            .await
    }

    async fn mark_read(
        &self,
        who: DeviceAuth,
        conversation: Target,
        up_to_seq: u64,
        now: i64,
    ) -> Result<Vec<Delivery>, StoreError> {
        self.write(move |t, _| messaging::mark_read(t, &who, conversation, up_to_seq, now))
            .await
    }

    async fn create_group(&self, group: NewGroup) -> Result<GroupChange, StoreError> {
        self.write(move |t, cache| groups::create_group(t, cache, group))
            .await
    }

    async fn change_group(
        &self,
        actor: DeviceAuth,
        group: GroupId,
        op: GroupOp,
        max_members: usize,
        now: i64,
    ) -> Result<GroupChange, StoreError> {
        self.write(move |t, cache| {
            groups::change_group(t, cache, &actor, group, op, max_members, now)
        })
        .await
    }

    async fn group(&self, group: GroupId) -> Result<Option<GroupRecord>, StoreError> {
        self.read(move |c| groups::group(c, group)).await
    }

    async fn groups_of(
        &self,
        user: UserId,
        limit: usize,
    ) -> Result<Vec<GroupSummaryRecord>, StoreError> {
        self.read(move |c| groups::groups_of(c, user, limit)).await
    }

    async fn message_info(
        &self,
        group: GroupId,
        seq: u64,
    ) -> Result<Option<MessageInfoRecord>, StoreError> {
        self.read(move |c| groups::message_info(c, group, seq))
            .await
    }

    async fn create_upload(
        &self,
        upload: NewUpload,
        limits: MediaLimits,
    ) -> Result<(), StoreError> {
        self.write(move |t, _| media::create_upload(t, &upload, limits))
            .await
    }

    async fn upload(&self, id: &str) -> Result<Option<UploadRecord>, StoreError> {
        let id = id.to_owned();
        self.read(move |c| media::upload(c, &id)).await
    }

    async fn finish_upload(
        &self,
        id: &str,
        media: MediaHash,
        size: u64,
        ref_expires_at_ms: i64,
        now_ms: i64,
    ) -> Result<MediaGrant, StoreError> {
        let id = id.to_owned();
        self.write(move |t, _| {
            media::finish_upload(t, &id, &media, size, ref_expires_at_ms, now_ms)
        })
        .await
    }

    async fn delete_upload(&self, id: &str) -> Result<bool, StoreError> {
        let id = id.to_owned();
        self.write(move |t, _| media::delete_upload(t, &id)).await
    }

    async fn media(&self, id: MediaHash) -> Result<Option<MediaRecord>, StoreError> {
        self.read(move |c| media::media(c, &id)).await
    }

    async fn claim_media(
        &self,
        id: MediaHash,
        user: UserId,
        expires_at_ms: i64,
        now_ms: i64,
        limits: MediaLimits,
    ) -> Result<Option<MediaGrant>, StoreError> {
        self.write(move |t, _| media::claim_media(t, &id, user, expires_at_ms, now_ms, limits))
            .await
    }

    async fn drop_media_ref(&self, id: MediaHash, user: UserId) -> Result<bool, StoreError> {
        self.write(move |t, _| media::drop_media_ref(t, &id, user))
            .await
    }

    async fn media_garbage(&self, now_ms: i64, limit: usize) -> Result<MediaGarbage, StoreError> {
        self.read(move |c| media::media_garbage(c, now_ms, limit))
            .await
    }

    async fn forget_media(&self, id: MediaHash, now_ms: i64) -> Result<bool, StoreError> {
        self.write(move |t, _| media::forget_media(t, &id, now_ms))
            .await
    }

    async fn advance_upload(
        &self,
        id: &str,
        from: u64,
        to: u64,
        staging: Vec<u8>,
    ) -> Result<bool, StoreError> {
        let id = id.to_owned();
        self.write(move |t, _| media::advance_upload(t, &id, from, to, &staging))
            .await
    }

    async fn take_lease(
        &self,
        name: &str,
        holder: &str,
        now_ms: i64,
        until_ms: i64,
    ) -> Result<bool, StoreError> {
        let (name, holder) = (name.to_owned(), holder.to_owned());
        self.write(move |t, _| media::take_lease(t, &name, &holder, now_ms, until_ms))
            .await
    }

    async fn renew_lease(
        &self,
        name: &str,
        holder: &str,
        now_ms: i64,
        until_ms: i64,
    ) -> Result<bool, StoreError> {
        let (name, holder) = (name.to_owned(), holder.to_owned());
        self.write(move |t, _| media::renew_lease(t, &name, &holder, now_ms, until_ms))
            .await
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        let (name, holder) = (name.to_owned(), holder.to_owned());
        self.write(move |t, _| media::release_lease(t, &name, &holder))
            .await
    }

    async fn forget_expired_leases(&self, now_ms: i64) -> Result<usize, StoreError> {
        self.write(move |t, _| media::forget_expired_leases(t, now_ms))
            .await
    }

    async fn set_push_subscription(
        &self,
        device: DeviceId,
        subscription: PushSubscription,
    ) -> Result<(), StoreError> {
        self.write(move |t, _| push::set_push_subscription(t, device, &subscription))
            .await
    }

    async fn push_subscription(
        &self,
        device: DeviceId,
    ) -> Result<Option<PushSubscription>, StoreError> {
        self.read(move |c| push::push_subscription(c, device)).await
    }

    async fn remove_push_subscription(
        &self,
        device: DeviceId,
        endpoint: Option<&str>,
    ) -> Result<bool, StoreError> {
        let endpoint = endpoint.map(str::to_owned);
        self.write(move |t, _| push::remove_push_subscription(t, device, endpoint.as_deref()))
            .await
    }

    async fn server_secret(&self, name: &str, candidate: Vec<u8>) -> Result<Vec<u8>, StoreError> {
        let name = name.to_owned();
        self.write(move |t, _| push::server_secret(t, &name, &candidate))
            .await
    }

    async fn claim_pushes(
        &self,
        devices: Vec<DeviceId>,
        now_ms: i64,
        rules: PushRules,
    ) -> Result<Vec<PushClaim>, StoreError> {
        // On the writer: each read and the claim it decides are one transaction. (Checking
        // for a subscription on a reader first was measured: it saves the writer a visit for
        // devices without one, but costs a thread hand-off more for those with one, the
        // common case of an offline phone.)
        self.write(move |t, _| {
            devices
                .iter()
                .map(|&d| push::claim_push(t, d, now_ms, &rules))
                .collect()
        })
        .await
    }

    async fn settle_pushes(&self, settles: Vec<(DeviceId, u64, bool)>) -> Result<(), StoreError> {
        self.write(move |t, _| {
            settles
                .iter()
                .try_for_each(|&(d, mseq, sent)| push::settle_push(t, d, mseq, sent))
        })
        .await
    }

    async fn push_candidates(
        &self,
        now_ms: i64,
        rules: PushRules,
        after: DeviceId,
        limit: usize,
    ) -> Result<Vec<(UserId, DeviceId)>, StoreError> {
        self.read(move |c| push::push_candidates(c, now_ms, &rules, after, limit))
            .await
    }

    async fn publish_keys(
        &self,
        device: DeviceId,
        keys: KeyUpload,
        max_one_time_keys: usize,
    ) -> Result<KeyCountRecord, StoreError> {
        self.write(move |t, _| keys::publish_keys(t, device, &keys, max_one_time_keys))
            .await
    }

    async fn key_counts(&self, device: DeviceId) -> Result<KeyCountRecord, StoreError> {
        self.read(move |c| keys::key_counts(c, device)).await
    }

    async fn device_keys(&self, user: UserId) -> Result<Vec<DeviceKeysRecord>, StoreError> {
        self.read(move |c| keys::device_keys(c, user)).await
    }

    async fn claim_keys(
        &self,
        devices: Vec<DeviceId>,
    ) -> Result<Vec<ClaimedKeyRecord>, StoreError> {
        self.write(move |t, _| keys::claim_keys(t, &devices)).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.read(|c| {
            Ok(c.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))
                .map(|_| ())?)
        })
        .await
    }

    async fn close(&self) {
        // Dropping the only sender ends the writer loop once the queue is empty.
        let sender = self.writes.lock().ok().and_then(|mut w| w.take());
        drop(sender);
        let handle = self.writer.lock().ok().and_then(|mut w| w.take());
        if let Some(h) = handle {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
        if let Ok(mut conns) = self.readers.conns.lock() {
            conns.clear();
        }
        self.readers.permits.close();
    }
}
