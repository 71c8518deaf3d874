//! The PostgreSQL backend: the durable store shared by several `ternd` nodes.
//!
//! A deadpool pool of tokio-postgres connections; every write method is one transaction at
//! READ COMMITTED, made exact under concurrent writers by taking row locks in a fixed order
//! before reading what the write depends on:
//!
//! - a conversation's row (`conversations`, its `next_seq`) is locked before its membership is
//!   read, so a post and a membership change of one group are serialised, and a member removed
//!   before a post's `seq` was taken never receives it;
//! - a device's mailbox head (`mailbox_heads`, its `next_mseq` and totals) is locked by every
//!   append and acknowledgement. Appends to one device therefore commit in `mseq` order: the
//!   transaction holding `next_mseq = n` must commit (or roll back, undoing the increment)
//!   before another can take `n + 1`. That is the cursor contract of [`crate::Store`]: once an
//!   entry is visible, every entry below it is visible.
//! - the writes that check a per-user bound lock the user first: its row for the device count,
//!   an advisory lock keyed by its id for the media quota;
//! - a media object's row is share-locked by a claim or completed upload until its reference
//!   commits, and garbage collection skips locked objects (`FOR UPDATE SKIP LOCKED`) instead of
//!   deleting one a reference is being added to.
//!
//! Posts and acknowledgements are written in batches (group commit): the requests of every
//! connection queue for a few writer tasks ([`writer`]), and each batch is one transaction of
//! set-based statements ([`batched`]). Every writer takes its row locks in one order, written
//! there, so that overlapping transactions queue instead of deadlocking.
//!
//! A transaction that loses a deadlock or a serialisation check is run again from the start
//! (at most [`MAX_ATTEMPTS`] times, then [`StoreError::Contended`]); so is one that found the
//! devices it addresses changed under it. Lost connections and timeouts are
//! [`StoreError::Unavailable`]: the transaction did not commit, and the pool replaces the
//! connection by itself.

mod accounts;
mod batched;
mod groups;
mod keys;
mod media;
mod messaging;
mod push;
mod schema;
mod writer;

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{
    GenericClient, Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime,
};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{FromSql, ToSql};
use tokio_postgres::{NoTls, Row};

use crate::*;

/// This backend's name in errors.
const BACKEND: &str = "postgres";

/// Times a transaction is run before a conflict is reported as [`StoreError::Contended`].
pub const MAX_ATTEMPTS: u32 = 8;

/// Options for [`PgStore::open`].
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// A libpq-style URL (`postgres://user:password@host:5432/db`) or key=value string.
    pub url: String,
    /// Connections in the pool.
    pub pool_size: usize,
    /// Longest any statement may run (server side, `statement_timeout`).
    pub statement_timeout: Duration,
    /// Longest to wait for a connection: opening one, or a free one from the pool.
    pub connect_timeout: Duration,
    /// The schema tern's tables live in (created if missing; a plain lowercase identifier);
    /// `None`: the server's default `search_path` (normally `public`).
    pub schema: Option<String>,
    /// How the connections name themselves (`pg_stat_activity.application_name`): a node id
    /// tells an operator which node holds which connection.
    pub application_name: String,
}

impl PgOptions {
    pub fn new(url: impl Into<String>) -> PgOptions {
        PgOptions {
            url: url.into(),
            pool_size: 16,
            statement_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            schema: None,
            application_name: "ternd".into(),
        }
    }
}

/// Whether `s` may be used as a schema name as it is: lowercase letters, digits and `_`, not
/// starting with a digit, at most 63 bytes.
pub fn valid_schema_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && !s.starts_with(|c: char| c.is_ascii_digit())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// `url` with its password replaced, for logs and errors.
pub fn redact_url(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        let (authority, tail) = match rest.find(['/', '?']) {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if let Some((userinfo, host)) = authority.rsplit_once('@')
            && let Some((user, _password)) = userinfo.split_once(':')
        {
            return format!("{scheme}://{user}:***@{host}{tail}");
        }
        return url.to_owned();
    }
    // key=value form: hide the value of `password`.
    url.split_whitespace()
        .map(|kv| match kv.split_once('=') {
            Some(("password", _)) => "password=***".to_owned(),
            _ => kv.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

pub(crate) fn db_error(message: String) -> StoreError {
    StoreError::Database {
        backend: BACKEND,
        message,
    }
}

fn unavailable(message: String) -> StoreError {
    StoreError::Unavailable {
        backend: BACKEND,
        message,
    }
}

/// Classifies a driver error: conflicts are retried, lost connections and timeouts are
/// `Unavailable`, the rest is a database error.
pub(crate) fn pg(e: tokio_postgres::Error) -> StoreError {
    let Some(code) = e.code() else {
        // No SQLSTATE: the connection failed or closed.
        return unavailable(e.to_string());
    };
    if *code == SqlState::T_R_DEADLOCK_DETECTED || *code == SqlState::T_R_SERIALIZATION_FAILURE {
        return StoreError::Contended { backend: BACKEND };
    }
    let class = &code.code()[..2];
    // 08: connection exception; 53: insufficient resources; 57: operator intervention
    // (statement timeout, admin shutdown, cannot connect now); a lock waited for past
    // `lock_timeout`.
    if matches!(class, "08" | "53" | "57") || *code == SqlState::LOCK_NOT_AVAILABLE {
        return unavailable(e.to_string());
    }
    let message = match e.as_db_error() {
        Some(d) => format!("{} ({})", d.message(), code.code()),
        None => e.to_string(),
    };
    db_error(message)
}

fn pool_error(e: PoolError) -> StoreError {
    match e {
        PoolError::Closed => StoreError::Closed,
        PoolError::Backend(e) => pg(e),
        other => unavailable(other.to_string()),
    }
}

/// Whether the error is a unique violation (of any constraint).
fn is_unique_violation(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::UNIQUE_VIOLATION)
}

/// Typed column access that reports a mismatch as an error instead of panicking.
pub(crate) trait RowExt {
    fn col<'a, T: FromSql<'a>>(&'a self, i: usize) -> Result<T, StoreError>;
}

impl RowExt for Row {
    fn col<'a, T: FromSql<'a>>(&'a self, i: usize) -> Result<T, StoreError> {
        self.try_get(i)
            .map_err(|e| db_error(format!("column {i}: {e}")))
    }
}

pub(crate) type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

/// Runs a prepared (and per-connection cached) statement; its rows.
pub(crate) async fn query<C: GenericClient>(
    c: &C,
    sql: &str,
    params: Params<'_>,
) -> Result<Vec<Row>, StoreError> {
    let st = c.prepare_cached(sql).await.map_err(pg)?;
    c.query(&st, params).await.map_err(pg)
}

/// At most one row.
pub(crate) async fn query_opt<C: GenericClient>(
    c: &C,
    sql: &str,
    params: Params<'_>,
) -> Result<Option<Row>, StoreError> {
    let st = c.prepare_cached(sql).await.map_err(pg)?;
    c.query_opt(&st, params).await.map_err(pg)
}

/// Exactly one row.
pub(crate) async fn query_one<C: GenericClient>(
    c: &C,
    sql: &str,
    params: Params<'_>,
) -> Result<Row, StoreError> {
    let st = c.prepare_cached(sql).await.map_err(pg)?;
    c.query_one(&st, params).await.map_err(pg)
}

/// The number of rows changed.
pub(crate) async fn execute<C: GenericClient>(
    c: &C,
    sql: &str,
    params: Params<'_>,
) -> Result<u64, StoreError> {
    let st = c.prepare_cached(sql).await.map_err(pg)?;
    c.execute(&st, params).await.map_err(pg)
}

/// Ids are `u64` in records and `BIGINT` (signed) in the database.
pub(crate) fn id(v: u64) -> i64 {
    v as i64
}

/// The pool, as the writer tasks share it.
#[derive(Clone)]
struct Db {
    pool: Pool,
}

impl Db {
    async fn client(&self) -> Result<deadpool_postgres::Client, StoreError> {
        self.pool.get().await.map_err(pool_error)
    }
}

/// Posts of one call, and their outcomes.
type PostWriter = writer::Writer<Vec<NewMessage>, Vec<Result<PostOutcome, StoreError>>>;

/// Most posts (and, separately, acknowledgements) written in one transaction.
const MAX_BATCH: usize = 256;

pub struct PgStore {
    db: Db,
    url: String,
    schema: Option<String>,
    posts: PostWriter,
    acks: writer::Writer<batched::AckRequest, Vec<Delivery>>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").field("url", &self.url).finish()
    }
}

/// Runs `$body` (which uses the transaction `$t` and evaluates to a `Result`) in a
/// transaction of `$store`, committing on success; runs it again from the start after a
/// conflict ([`StoreError::Contended`]), at most [`MAX_ATTEMPTS`] times.
macro_rules! transaction {
    ($store:expr, |$t:ident| $body:expr) => {{
        let mut attempt = 1u32;
        loop {
            let mut client = $store.client().await?;
            let result: Result<_, StoreError> = async {
                let $t = client.transaction().await.map_err(pg)?;
                let value = $body?;
                $t.commit().await.map_err(pg)?;
                Ok(value)
            }
            .await;
            match result {
                Err(StoreError::Contended { .. }) if attempt < MAX_ATTEMPTS => {
                    metrics::counter!("tern_store_retries_total", "backend" => BACKEND)
                        .increment(1);
                    // Let the winner finish; spread the retries of several losers.
                    // Each RandomState has fresh keys: losers in one process draw different waits.
                    let jitter = std::hash::BuildHasher::hash_one(
                        &std::collections::hash_map::RandomState::new(),
                        attempt,
                    ) % 4;
                    tokio::time::sleep(Duration::from_millis(
                        (1u64 << attempt.min(6)) + jitter,
                    ))
                    .await;
                    attempt += 1;
                }
                other => break other,
            }
        }
    }};
}

impl PgStore {
    /// Connects, checks that the database answers, and brings its schema up to date.
    pub async fn open(opts: PgOptions) -> Result<PgStore, StoreError> {
        let store = PgStore::connect(opts)?;
        let mut client = store.client().await.map_err(|e| match e {
            StoreError::Unavailable { message, .. } => unavailable(format!(
                "cannot connect to {}: {message}",
                redact_url(&store.url)
            )),
            other => other,
        })?;
        schema::migrate(&mut client, store.schema.as_deref()).await?;
        Ok(store)
    }

    /// Builds the pool without connecting (connections open on first use) and starts the
    /// writer tasks (so it must be called inside a Tokio runtime).
    pub fn connect(opts: PgOptions) -> Result<PgStore, StoreError> {
        let redacted = redact_url(&opts.url);
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(db_error(
                "the PostgreSQL store needs a Tokio runtime to start its writers".into(),
            ));
        }
        let mut config = tokio_postgres::Config::from_str(&opts.url)
            .map_err(|e| StoreError::Invalid(format!("invalid PostgreSQL URL {redacted}: {e}")))?;
        let mut options = format!(
            "-c statement_timeout={ms} -c lock_timeout={ms}",
            ms = opts.statement_timeout.as_millis()
        );
        if let Some(schema) = &opts.schema {
            if !valid_schema_name(schema) {
                return Err(StoreError::Invalid(format!(
                    "PostgreSQL schema {schema:?}: use lowercase letters, digits and _"
                )));
            }
            options.push_str(&format!(" -c search_path={schema}"));
        }
        config
            .application_name(&opts.application_name)
            .connect_timeout(opts.connect_timeout)
            .options(options);
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(opts.pool_size.max(1))
            .wait_timeout(Some(opts.connect_timeout))
            .create_timeout(Some(opts.connect_timeout))
            .recycle_timeout(Some(opts.connect_timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| db_error(format!("cannot build the connection pool: {e}")))?;
        let db = Db { pool };
        // Each writer holds one pooled connection while it writes a batch; a quarter of the
        // pool for posts and a quarter for acknowledgements leaves half for everything else.
        let writers = (opts.pool_size / 4).clamp(1, 4);
        let posts = {
            let db = db.clone();
            writer::Writer::start(
                "posts",
                writers,
                4 * MAX_BATCH,
                MAX_BATCH,
                |calls: &Vec<NewMessage>| calls.len(),
                move |calls| write_posts(db.clone(), calls),
            )
        };
        let acks = {
            let db = db.clone();
            writer::Writer::start(
                "acks",
                writers,
                4 * MAX_BATCH,
                MAX_BATCH,
                |_| 1,
                move |acks| write_acks(db.clone(), acks),
            )
        };
        Ok(PgStore {
            db,
            url: redacted,
            schema: opts.schema,
            posts,
            acks,
        })
    }

    /// Applies the pending migrations and says how many there were.
    pub async fn migrate(&self) -> Result<usize, StoreError> {
        let mut client = self.client().await?;
        schema::migrate(&mut client, self.schema.as_deref()).await
    }

    /// The URL, password redacted.
    pub fn url(&self) -> &str {
        &self.url
    }

    async fn client(&self) -> Result<deadpool_postgres::Client, StoreError> {
        self.db.client().await
    }
}

/// Writes the posts of several calls in one transaction; each call's outcomes.
async fn write_posts(
    db: Db,
    calls: Vec<Vec<NewMessage>>,
) -> Result<Vec<Result<Vec<Result<PostOutcome, StoreError>>, StoreError>>, StoreError> {
    let posts: Vec<&NewMessage> = calls.iter().flatten().collect();
    let mut outcomes = transaction!(db, |t| batched::post_batch(&t, &posts).await)?.into_iter();
    Ok(calls
        .iter()
        .map(|call| Ok(outcomes.by_ref().take(call.len()).collect()))
        .collect())
}

/// Writes several acknowledgements in one transaction; the receipts of each.
async fn write_acks(
    db: Db,
    acks: Vec<batched::AckRequest>,
) -> Result<Vec<Result<Vec<Delivery>, StoreError>>, StoreError> {
    let requests: Vec<&batched::AckRequest> = acks.iter().collect();
    let receipts = transaction!(db, |t| batched::ack_batch(&t, &requests).await)?;
    Ok(receipts.into_iter().map(Ok).collect())
}

#[async_trait]
impl Store for PgStore {
    async fn create_user(
        &self,
        username: &str,
        hash: &str,
        now: i64,
    ) -> Result<UserId, StoreError> {
        transaction!(self, |t| accounts::create_user(&t, username, hash, now)
            .await)
    }

    async fn user_by_name(&self, username: &str) -> Result<Option<UserRecord>, StoreError> {
        accounts::user_by_name(&self.client().await?, username).await
    }

    async fn create_device(
        &self,
        user: UserId,
        name: &str,
        token_hash: &[u8],
        max_devices: usize,
        now: i64,
    ) -> Result<DeviceId, StoreError> {
        transaction!(self, |t| accounts::create_device(
            &t,
            user,
            name,
            token_hash,
            max_devices,
            now
        )
        .await)
    }

    async fn device_by_token(&self, token_hash: &[u8]) -> Result<Option<DeviceAuth>, StoreError> {
        accounts::device_by_token(&self.client().await?, token_hash).await
    }

    async fn list_devices(&self, user: UserId) -> Result<Vec<DeviceRecord>, StoreError> {
        accounts::list_devices(&self.client().await?, user).await
    }

    async fn remove_device(&self, user: UserId, device: DeviceId) -> Result<(), StoreError> {
        transaction!(self, |t| accounts::remove_device(&t, user, device).await)
    }

    async fn set_last_seen_privacy(&self, user: UserId, v: Visibility) -> Result<(), StoreError> {
        accounts::set_privacy(&self.client().await?, user, v).await
    }

    async fn are_contacts(&self, a: UserId, b: UserId) -> Result<bool, StoreError> {
        accounts::are_contacts(&self.client().await?, a, b).await
    }

    async fn save_last_seen(&self, batch: Vec<LastSeenUpdate>) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        // Several rows locked in one statement: a concurrent batch may deadlock with it.
        transaction!(self, |t| accounts::save_last_seen(&t, &batch).await)
    }

    async fn post_messages(
        &self,
        posts: Vec<NewMessage>,
    ) -> Result<Vec<Result<PostOutcome, StoreError>>, StoreError> {
        // With the posts of every other call that queued meanwhile, in one transaction.
        self.posts.call(posts).await
    }

    async fn mailbox_after(
        &self,
        device: DeviceId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<MailboxEntry>, StoreError> {
        messaging::mailbox_after(&self.client().await?, device, after, limit).await
    }

    async fn ack(
        &self,
        who: DeviceAuth,
        up_to: u64,
        now: i64,
    ) -> Result<Vec<Delivery>, StoreError> {
        self.acks
            .call(batched::AckRequest {
                who,
                up_to,
                now_ms: now,
            })
            .await
    }

    async fn mark_read(
        &self,
        who: DeviceAuth,
        conversation: Target,
        up_to_seq: u64,
        now: i64,
    ) -> Result<Vec<Delivery>, StoreError> {
        transaction!(self, |t| messaging::mark_read(
            &t,
            &who,
            conversation,
            up_to_seq,
            now
        )
        .await)
    }

    async fn create_group(&self, group: NewGroup) -> Result<GroupChange, StoreError> {
        transaction!(self, |t| groups::create_group(&t, &group).await)
    }

    async fn change_group(
        &self,
        actor: DeviceAuth,
        group: GroupId,
        op: GroupOp,
        max_members: usize,
        now: i64,
    ) -> Result<GroupChange, StoreError> {
        transaction!(self, |t| groups::change_group(
            &t,
            &actor,
            group,
            &op,
            max_members,
            now
        )
        .await)
    }

    async fn group(&self, group: GroupId) -> Result<Option<GroupRecord>, StoreError> {
        groups::group(&self.client().await?, group).await
    }

    async fn groups_of(
        &self,
        user: UserId,
        limit: usize,
    ) -> Result<Vec<GroupSummaryRecord>, StoreError> {
        groups::groups_of(&self.client().await?, user, limit).await
    }

    async fn message_info(
        &self,
        group: GroupId,
        seq: u64,
    ) -> Result<Option<MessageInfoRecord>, StoreError> {
        groups::message_info(&self.client().await?, group, seq).await
    }

    async fn create_upload(
        &self,
        upload: NewUpload,
        limits: MediaLimits,
    ) -> Result<(), StoreError> {
        transaction!(self, |t| media::create_upload(&t, &upload, limits).await)
    }

    async fn upload(&self, id: &str) -> Result<Option<UploadRecord>, StoreError> {
        media::upload(&self.client().await?, id).await
    }

    async fn finish_upload(
        &self,
        id: &str,
        media: MediaHash,
        size: u64,
        ref_expires_at_ms: i64,
        now_ms: i64,
    ) -> Result<MediaGrant, StoreError> {
        transaction!(self, |t| media::finish_upload(
            &t,
            id,
            &media,
            size,
            ref_expires_at_ms,
            now_ms
        )
        .await)
    }

    async fn delete_upload(&self, id: &str) -> Result<bool, StoreError> {
        media::delete_upload(&self.client().await?, id).await
    }

    async fn media(&self, id: MediaHash) -> Result<Option<MediaRecord>, StoreError> {
        media::media(&self.client().await?, &id).await
    }

    async fn claim_media(
        &self,
        id: MediaHash,
        user: UserId,
        expires_at_ms: i64,
        now_ms: i64,
        limits: MediaLimits,
    ) -> Result<Option<MediaGrant>, StoreError> {
        transaction!(self, |t| media::claim_media(
            &t,
            &id,
            user,
            expires_at_ms,
            now_ms,
            limits
        )
        .await)
    }

    async fn drop_media_ref(&self, id: MediaHash, user: UserId) -> Result<bool, StoreError> {
        media::drop_media_ref(&self.client().await?, &id, user).await
    }

    async fn media_garbage(&self, now_ms: i64, limit: usize) -> Result<MediaGarbage, StoreError> {
        media::media_garbage(&self.client().await?, now_ms, limit).await
    }

    async fn forget_media(&self, id: MediaHash, now_ms: i64) -> Result<bool, StoreError> {
        media::forget_media(&self.client().await?, &id, now_ms).await
    }

    async fn advance_upload(
        &self,
        id: &str,
        from: u64,
        to: u64,
        staging: Vec<u8>,
    ) -> Result<bool, StoreError> {
        media::advance_upload(&self.client().await?, id, from, to, &staging).await
    }

    async fn take_lease(
        &self,
        name: &str,
        holder: &str,
        now_ms: i64,
        until_ms: i64,
    ) -> Result<bool, StoreError> {
        media::take_lease(&self.client().await?, name, holder, now_ms, until_ms).await
    }

    async fn renew_lease(
        &self,
        name: &str,
        holder: &str,
        now_ms: i64,
        until_ms: i64,
    ) -> Result<bool, StoreError> {
        media::renew_lease(&self.client().await?, name, holder, now_ms, until_ms).await
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        media::release_lease(&self.client().await?, name, holder).await
    }

    async fn forget_expired_leases(&self, now_ms: i64) -> Result<usize, StoreError> {
        media::forget_expired_leases(&self.client().await?, now_ms).await
    }

    async fn set_push_subscription(
        &self,
        device: DeviceId,
        subscription: PushSubscription,
    ) -> Result<(), StoreError> {
        transaction!(self, |t| push::set_push_subscription(
            &t,
            device,
            &subscription
        )
        .await)
    }

    async fn push_subscription(
        &self,
        device: DeviceId,
    ) -> Result<Option<PushSubscription>, StoreError> {
        push::push_subscription(&self.client().await?, device).await
    }

    async fn remove_push_subscription(
        &self,
        device: DeviceId,
        endpoint: Option<&str>,
    ) -> Result<bool, StoreError> {
        push::remove_push_subscription(&self.client().await?, device, endpoint).await
    }

    async fn server_secret(&self, name: &str, candidate: Vec<u8>) -> Result<Vec<u8>, StoreError> {
        push::server_secret(&self.client().await?, name, &candidate).await
    }

    async fn claim_pushes(
        &self,
        devices: Vec<DeviceId>,
        now_ms: i64,
        rules: PushRules,
    ) -> Result<Vec<PushClaim>, StoreError> {
        transaction!(self, |t| push::claim_pushes(&t, &devices, now_ms, &rules)
            .await)
    }

    async fn settle_pushes(&self, settles: Vec<(DeviceId, u64, bool)>) -> Result<(), StoreError> {
        transaction!(self, |t| push::settle_pushes(&t, &settles).await)
    }

    async fn push_candidates(
        &self,
        now_ms: i64,
        rules: PushRules,
        after: DeviceId,
        limit: usize,
    ) -> Result<Vec<(UserId, DeviceId)>, StoreError> {
        push::push_candidates(&self.client().await?, now_ms, &rules, after, limit).await
    }

    async fn publish_keys(
        &self,
        device: DeviceId,
        keys: KeyUpload,
        max_one_time_keys: usize,
    ) -> Result<KeyCountRecord, StoreError> {
        transaction!(self, |t| keys::publish_keys(
            &t,
            device,
            &keys,
            max_one_time_keys
        )
        .await)
    }

    async fn key_counts(&self, device: DeviceId) -> Result<KeyCountRecord, StoreError> {
        keys::key_counts(&self.client().await?, device).await
    }

    async fn device_keys(&self, user: UserId) -> Result<Vec<DeviceKeysRecord>, StoreError> {
        keys::device_keys(&self.client().await?, user).await
    }

    async fn claim_keys(
        &self,
        devices: Vec<DeviceId>,
    ) -> Result<Vec<ClaimedKeyRecord>, StoreError> {
        transaction!(self, |t| keys::claim_keys(&t, &devices).await)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        query_one(&self.client().await?, "SELECT 1", &[])
            .await
            .map(|_| ())
    }

    async fn close(&self) {
        self.db.pool.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        let cases = [
            (
                "postgres://tern:s3cret@db:5432/tern",
                "postgres://tern:***@db:5432/tern",
            ),
            (
                "postgresql://tern:p@ss@db/tern?sslmode=disable",
                "postgresql://tern:***@db/tern?sslmode=disable",
            ),
            ("postgres://db/tern", "postgres://db/tern"),
            (
                "postgres://tern@127.0.0.1/test",
                "postgres://tern@127.0.0.1/test",
            ),
            (
                "host=db user=tern password=s3cret dbname=tern",
                "host=db user=tern password=*** dbname=tern",
            ),
        ];
        for (url, want) in cases {
            assert_eq!(redact_url(url), want, "{url}");
        }
    }
}
