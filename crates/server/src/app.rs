//! The composition root: [`AppState::build`] wires the store, delivery hub, clock and services once
//! and hands them down; nothing is looked up globally. [`run`] serves HTTP and WebSocket on a
//! bound listener until `shutdown` fires, then closes sockets and flushes storage.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tern_store::Store;
use tern_store::postgres::{PgStore, redact_url};
use tern_store::sqlite::{SqliteOptions, SqliteStore};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::PasswordHasher;
use crate::config::{BlobBackend, Config, StorageBackend};
use crate::delivery::Hub;
use crate::media::{BlobStore, FileStaging, FsBlobs, Media, Staging};
use crate::net::ConnLimiter;
use crate::push::WebPush;
use crate::ratelimit::{RateLimiter, RateLimits};
use crate::services::accounts::Accounts;
use crate::services::calls::Calls;
use crate::services::groups::Groups;
use crate::services::keys::Keys;
use crate::services::messaging::Messaging;
use crate::services::presence::Presence;
use crate::services::push::Push;
use crate::services::{Clock, SystemClock};

/// Shared state handed to every handler and connection task.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub store: Arc<dyn Store>,
    pub hub: Arc<Hub>,
    pub clock: Arc<dyn Clock>,
    pub accounts: Arc<Accounts>,
    pub keys: Arc<Keys>,
    pub push: Arc<Push>,
    pub calls: Arc<Calls>,
    pub messaging: Arc<Messaging>,
    pub groups: Arc<Groups>,
    pub presence: Arc<Presence>,
    pub media: Arc<Media>,
    pub rate_limits: Arc<dyn RateLimiter>,
    /// Open connections, in all and per address.
    pub connection_limits: Arc<ConnLimiter>,
    pub metrics: PrometheusHandle,
    /// Every WebSocket connection task, so that shutdown can wait for them.
    pub connections: TaskTracker,
    pub shutdown: CancellationToken,
}

/// What differs between a node alone and one of a cluster, and what tests may replace.
pub struct Parts {
    pub hub: Arc<Hub>,
    pub rate_limits: Arc<dyn RateLimiter>,
    pub clock: Arc<dyn Clock>,
    pub blobs: Arc<dyn BlobStore>,
    /// Where incomplete uploads wait.
    pub staging: Arc<dyn Staging>,
    /// Stops everything, the hub's tasks included.
    pub shutdown: CancellationToken,
}

/// The Prometheus recorder. The `metrics` facade has one recorder per process by design; it is
/// installed on first use so that several servers in one test process share it.
fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics stays empty");
            }
            handle
        })
        .clone()
}

/// The configured blob store, and where uploads are staged: the node's disk beside files,
/// the bucket itself beside S3 (so that any node resumes any upload).
fn media_parts(
    config: &Config,
    store: &Arc<dyn Store>,
) -> anyhow::Result<(Arc<dyn BlobStore>, Arc<dyn Staging>)> {
    let on_disk = |blobs: Arc<dyn BlobStore>| -> anyhow::Result<_> {
        let staging = FileStaging::new(config.data_dir.join("uploads"), blobs.clone())?;
        Ok((blobs, Arc::new(staging) as Arc<dyn Staging>))
    };
    match config.media.backend {
        BlobBackend::Fs => on_disk(Arc::new(FsBlobs::new(config.data_dir.join("media"))?)),
        #[cfg(feature = "s3")]
        BlobBackend::S3 => {
            let s3 = crate::media::s3::ObjectStoreBlobs::s3(&config.media.s3)?;
            let staging = s3
                .staging(store.clone())
                .context("the S3 store has no multipart uploads")?;
            Ok((Arc::new(s3), Arc::new(staging)))
        }
        #[cfg(not(feature = "s3"))]
        BlobBackend::S3 => {
            let _ = (store, on_disk);
            anyhow::bail!("media.backend = \"s3\" needs a ternd built with `--features s3`")
        }
    }
}

impl AppState {
    /// Opens the configured store (SQLite in `config.data_dir`, or PostgreSQL; either is
    /// migrated to the latest schema) and builds the single-node state.
    pub async fn build(config: Config) -> anyhow::Result<AppState> {
        config.validate()?;
        // Media and incomplete uploads live in the data directory with either backend.
        std::fs::create_dir_all(&config.data_dir).with_context(|| {
            format!(
                "cannot create the data directory {}",
                config.data_dir.display()
            )
        })?;
        let store = open_store(&config).await?;
        let (blobs, staging) = media_parts(&config, &store)?;
        let shutdown = CancellationToken::new();
        let (hub, rate_limits): (Arc<Hub>, Arc<dyn RateLimiter>) = if config.cluster.enabled {
            let node = crate::cluster::node_id(&config.cluster);
            let joined =
                crate::cluster::join(&config.cluster, &config.rate_limits, node, shutdown.clone())
                    .await?;
            (joined.hub, joined.rate_limits)
        } else {
            (
                Arc::new(Hub::single_node()),
                Arc::new(RateLimits::new(&config.rate_limits)),
            )
        };
        AppState::with_parts(
            config,
            store,
            Parts {
                hub,
                rate_limits,
                clock: Arc::new(SystemClock),
                blobs,
                staging,
                shutdown,
            },
        )
        .await
    }

    /// Builds the state from given parts (another store, hub, rate limits or clock).
    pub async fn with_parts(
        config: Config,
        store: Arc<dyn Store>,
        parts: Parts,
    ) -> anyhow::Result<AppState> {
        config.validate()?;
        let Parts {
            hub,
            rate_limits,
            clock,
            blobs,
            staging,
            shutdown,
        } = parts;
        let messaging = Arc::new(Messaging::new(
            store.clone(),
            hub.clone(),
            clock.clone(),
            rate_limits.clone(),
            config.limits.clone(),
            tern_store::MailboxLimit {
                max_entries: config.mailbox.max_entries,
                max_bytes: config.mailbox.max_bytes,
            },
        ));
        let decoy_hash: Arc<str> = Arc::from(
            crate::auth::decoy_hash(&config.password_hashing).map_err(anyhow::Error::msg)?,
        );
        let passwords =
            Arc::new(PasswordHasher::start(&config.password_hashing).map_err(anyhow::Error::msg)?);
        let accounts = Arc::new(Accounts::new(
            store.clone(),
            hub.clone(),
            clock.clone(),
            passwords,
            rate_limits.clone(),
            decoy_hash,
            config.limits.clone(),
        ));
        let keys = Arc::new(Keys::new(store.clone(), config.limits.clone()));
        let push = Arc::new(Push::new(store.clone(), clock.clone(), &config.push).await?);
        let sender = WebPush::new(push.vapid(), &config.push).map_err(anyhow::Error::msg)?;
        crate::services::pusher::start(
            store.clone(),
            hub.clone(),
            clock.clone(),
            Arc::new(sender),
            &config.push,
            shutdown.clone(),
        );
        let calls = Arc::new(Calls::new(
            config.calls.clone(),
            clock.clone(),
            rate_limits.clone(),
        ));
        let descriptors = crate::net::descriptor_limit();
        let max_connections = crate::net::total_bound(config.connections.max_total, descriptors);
        tracing::info!(
            descriptors = descriptors.map_or(-1, |n| n as i64),
            max_connections,
            max_per_address = config.connections.max_per_address,
            "connection limits"
        );
        let connection_limits =
            ConnLimiter::new(max_connections, config.connections.max_per_address);
        let groups = Arc::new(Groups::new(
            store.clone(),
            hub.clone(),
            clock.clone(),
            config.limits.clone(),
        ));
        let presence = Arc::new(Presence::new(store.clone(), hub.clone(), clock.clone()));
        let media = Arc::new(Media::new(
            store.clone(),
            blobs,
            staging,
            clock.clone(),
            config.media.clone(),
        ));
        Ok(AppState {
            accounts,
            keys,
            push,
            calls,
            rate_limits,
            connection_limits,
            config: Arc::new(config),
            store,
            hub,
            clock,
            messaging,
            groups,
            presence,
            media,
            metrics: prometheus(),
            connections: TaskTracker::new(),
            shutdown,
        })
    }
}

/// The SQLite database file of `config`.
fn sqlite_path(config: &Config) -> PathBuf {
    config.data_dir.join("tern.db")
}

/// Opens the configured store, applying pending migrations.
async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    let storage = &config.storage;
    match storage.backend {
        StorageBackend::Sqlite => {
            let db = sqlite_path(config);
            tracing::info!(backend = "sqlite", path = %db.display(), "opening the store");
            let store = SqliteStore::open(
                &db,
                SqliteOptions {
                    readers: storage.sqlite.readers,
                },
            )
            .with_context(|| format!("cannot open the SQLite database {}", db.display()))?;
            Ok(Arc::new(store))
        }
        StorageBackend::Postgres => {
            let url = redact_url(&storage.postgres.url);
            tracing::info!(
                backend = "postgres",
                url = %url,
                schema = %storage.postgres.schema,
                pool_size = storage.postgres.pool_size,
                "opening the store"
            );
            // Its errors name the URL (redacted) when the database cannot be reached.
            let store = PgStore::open(storage.postgres.options())
                .await
                .with_context(|| format!("cannot open the PostgreSQL store {url}"))?;
            Ok(Arc::new(store))
        }
    }
}

/// `ternd migrate`: brings the configured store's schema up to date; one line saying what was
/// done, e.g. `postgres postgres://tern:***@db/tern: applied 1 migration, schema at the latest
/// version`.
pub async fn migrate(config: &Config) -> anyhow::Result<String> {
    config.validate()?;
    let storage = &config.storage;
    match storage.backend {
        StorageBackend::Sqlite => {
            std::fs::create_dir_all(&config.data_dir).with_context(|| {
                format!(
                    "cannot create the data directory {}",
                    config.data_dir.display()
                )
            })?;
            let db = sqlite_path(config);
            // Opening applies the pending migrations.
            let store = SqliteStore::open(&db, SqliteOptions { readers: 1 })
                .with_context(|| format!("cannot open the SQLite database {}", db.display()))?;
            store.close().await;
            Ok(format!(
                "sqlite {}: schema at the latest version",
                db.display()
            ))
        }
        StorageBackend::Postgres => {
            let url = redact_url(&storage.postgres.url);
            let store = PgStore::connect(storage.postgres.options())
                .with_context(|| format!("cannot open the PostgreSQL store {url}"))?;
            let applied = store
                .migrate()
                .await
                .with_context(|| format!("cannot migrate the PostgreSQL store {url}"))?;
            store.close().await;
            let schema = match storage.postgres.schema.as_str() {
                "" => String::new(),
                s => format!(" (schema {s})"),
            };
            let done = match applied {
                0 => "nothing to apply".to_owned(),
                1 => "applied 1 migration".to_owned(),
                n => format!("applied {n} migrations"),
            };
            Ok(format!(
                "postgres {url}{schema}: {done}, schema at the latest version"
            ))
        }
    }
}

/// Serves until `shutdown` is cancelled, then: stops accepting, closes every WebSocket with
/// 1001 (going away), waits for connection tasks, flushes last seen and closes the store.
pub async fn run(
    listener: TcpListener,
    state: AppState,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "ternd listening");
    let flusher = tokio::spawn(state.presence.clone().run_flusher(
        Duration::from_secs(state.config.last_seen_flush_secs),
        state.shutdown.clone(),
    ));
    let housekeeping = tokio::spawn(housekeeping(state.clone()));

    // Connection tasks watch the state's own token; tie it to the caller's.
    let stop = state.shutdown.clone();
    let caller = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = caller.cancelled() => stop.cancel(),
            _ = stop.cancelled() => {}
        }
    });
    let app = crate::http::router(state.clone());
    crate::net::serve(
        listener,
        app,
        &state.config.connections,
        state.connection_limits.clone(),
        state.shutdown.clone(),
    )
    .await;
    state.shutdown.cancel();
    state.connections.close();
    if tokio::time::timeout(Duration::from_secs(10), state.connections.wait())
        .await
        .is_err()
    {
        tracing::warn!("some connections did not close within 10 s");
    }
    let _ = flusher.await;
    housekeeping.abort();
    state.presence.flush().await;
    state.store.close().await;
    tracing::info!("ternd stopped");
    Ok(())
}

/// Periodic upkeep: forget idle rate-limiter keys so the limiters stay bounded; collect media
/// garbage every `media.gc_interval_secs` (and once at start).
async fn housekeeping(state: AppState) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    let gc_every = Duration::from_secs(state.config.media.gc_interval_secs);
    let mut last_gc: Option<tokio::time::Instant> = None;
    loop {
        tick.tick().await;
        if last_gc.is_none_or(|t| t.elapsed() >= gc_every) {
            last_gc = Some(tokio::time::Instant::now());
            match state.media.collect_garbage(state.clock.now_ms()).await {
                Ok(r) if r.uploads + r.objects > 0 => {
                    tracing::info!(uploads = r.uploads, objects = r.objects, "media collected");
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e.message, "media collection failed"),
            }
        }
        state.rate_limits.housekeeping();
    }
}
