//! The server's configuration: one typed struct with documented defaults. Sources, later ones
//! winning: built-in defaults, an optional TOML file (`--config`, `TERN_CONFIG`), then the
//! environment and flags for the common settings (`--listen`/`TERN_LISTEN`,
//! `--data-dir`/`TERN_DATA_DIR`). Unknown keys in the file are refused.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tern_proto::Limits;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address to listen on; port 0 picks a free port (the log states the bound address).
    pub listen: SocketAddr,
    /// Directory for the SQLite database (`tern.db`), media objects (`media/`) and incomplete
    /// uploads (`uploads/`); created if missing, with either storage backend.
    pub data_dir: PathBuf,
    /// Seconds between batched writes of last-seen times.
    pub last_seen_flush_secs: u64,
    /// Where accounts, messages and the rest of the state are kept: SQLite or PostgreSQL.
    pub storage: StorageConfig,
    /// Every size and count limit.
    pub limits: Limits,
    /// argon2id cost of password hashes and the bounds of the hashing pool.
    pub password_hashing: crate::auth::PasswordHashing,
    /// Connections: how many, from where, and how long a request may take.
    pub connections: ConnectionLimits,
    /// Registrations, logins and sends per address, user or device.
    pub rate_limits: RateLimits,
    /// How much may wait in one device's mailbox.
    pub mailbox: MailboxLimits,
    /// Media: blob store, limits, quotas and retention.
    pub media: MediaConfig,
    /// Several nodes behind a load balancer: Redis and NATS (off by default: one node).
    pub cluster: ClusterConfig,
    /// Push notifications (Web Push, UnifiedPush) for devices that are offline.
    pub push: PushConfig,
    /// Calls: the TURN server clients relay media through.
    pub calls: CallsConfig,
}

/// Calls. `GET /v1/calls/turn` hands out short-lived credentials for a TURN server that
/// shares `turn_secret` (coturn: `use-auth-secret`, `static-auth-secret`); empty: no TURN.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CallsConfig {
    /// The secret shared with the TURN server.
    pub turn_secret: String,
    /// The TURN (and STUN) URIs given to clients, e.g. `"turn:turn.example.org:3478"`,
    /// `"turns:turn.example.org:5349?transport=tcp"`.
    pub turn_uris: Vec<String>,
    /// How long credentials stay valid.
    pub turn_ttl_secs: u64,
}

impl Default for CallsConfig {
    fn default() -> Self {
        CallsConfig {
            turn_secret: String::new(),
            turn_uris: Vec::new(),
            turn_ttl_secs: 3600,
        }
    }
}

impl std::fmt::Debug for CallsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallsConfig")
            .field(
                "turn_secret",
                &if self.turn_secret.is_empty() {
                    ""
                } else {
                    "***"
                },
            )
            .field("turn_uris", &self.turn_uris)
            .field("turn_ttl_secs", &self.turn_ttl_secs)
            .finish()
    }
}

/// Push notifications. The VAPID key is made at first start and kept in the store (so every
/// node of a cluster signs with the same one), unless given here.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PushConfig {
    /// A contact for push services' operators, sent as the VAPID `sub` claim: `mailto:` or an
    /// `https:` URL. Empty: none (some push services refuse requests without one).
    pub subject: String,
    /// Seconds a push service keeps an undelivered push (RFC 8030 `TTL`).
    pub ttl_secs: u64,
    /// Attempts at one push (the first included) on 5xx, 429 and network errors.
    pub max_attempts: u32,
    /// The first retry waits this long, doubling with each, with jitter.
    pub retry_base_ms: u64,
    /// No wait between attempts is longer (a `Retry-After` included).
    pub retry_max_secs: u64,
    /// Seconds one request to a push service may take.
    pub request_timeout_secs: u64,
    /// The VAPID private key: unpadded base64url of its 32 bytes. Empty: made once, kept in
    /// the store.
    pub vapid_private_key: String,
    /// Push service origins subscriptions may name (`"https://push.example"`, or
    /// `"https://*.example"` for its subdomains). Empty: any `https` origin whose host is not
    /// a loopback, private or link-local address.
    pub allowed_origins: Vec<String>,
    /// Also `http` and loopback endpoints (a push service on this machine, as in tests).
    pub allow_insecure_loopback: bool,
    /// At most one push per device in this many milliseconds (a burst of messages wakes a
    /// device once).
    pub coalesce_ms: u64,
    /// How often every node looks in the store for devices still owed a push (after a
    /// restart, a full queue or a failed push service); the first look is one coalescing
    /// window after start.
    pub scan_secs: u64,
    /// Pushes in flight at once, per node.
    pub concurrency: usize,
}

impl Default for PushConfig {
    fn default() -> Self {
        PushConfig {
            subject: String::new(),
            ttl_secs: 86_400,
            max_attempts: 5,
            retry_base_ms: 500,
            retry_max_secs: 60,
            request_timeout_secs: 10,
            vapid_private_key: String::new(),
            allowed_origins: Vec::new(),
            allow_insecure_loopback: false,
            coalesce_ms: 3_000,
            scan_secs: 60,
            concurrency: 64,
        }
    }
}

impl std::fmt::Debug for PushConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushConfig")
            .field("subject", &self.subject)
            .field("ttl_secs", &self.ttl_secs)
            .field("max_attempts", &self.max_attempts)
            .field("retry_base_ms", &self.retry_base_ms)
            .field("retry_max_secs", &self.retry_max_secs)
            .field("request_timeout_secs", &self.request_timeout_secs)
            .field(
                "vapid_private_key",
                &if self.vapid_private_key.is_empty() {
                    ""
                } else {
                    "***"
                },
            )
            .field("allowed_origins", &self.allowed_origins)
            .field("allow_insecure_loopback", &self.allow_insecure_loopback)
            .field("coalesce_ms", &self.coalesce_ms)
            .field("scan_secs", &self.scan_secs)
            .field("concurrency", &self.concurrency)
            .finish()
    }
}

/// Cluster mode: this node is one of several sharing one PostgreSQL database, with a
/// connection directory in Redis and signals between nodes over NATS (ARCHITECTURE.md).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Off: the node is alone and needs neither Redis nor NATS.
    pub enabled: bool,
    /// This node's id, unique in the cluster (letters, digits, `-` and `_`, at most 64);
    /// empty: a random one at every start (entries of an old id expire by themselves).
    pub node_id: String,
    /// `redis://host:6379` (or `rediss://`, `redis://:password@host`). Never logged whole.
    pub redis_url: String,
    /// `nats://host:4222`, or several separated by commas.
    pub nats_url: String,
    /// The prefix of every Redis key and NATS subject, so that clusters can share servers.
    pub prefix: String,
    /// Seconds a directory entry lives without renewal (renewed every third of it), so that a
    /// crashed node's connections are forgotten by then.
    pub directory_ttl_secs: u64,
    /// Seconds between re-reads of every connection's mailbox, for wake-ups lost on the way.
    pub recheck_secs: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            enabled: false,
            node_id: String::new(),
            redis_url: "redis://127.0.0.1:6379".into(),
            nats_url: "nats://127.0.0.1:4222".into(),
            prefix: "tern".into(),
            directory_ttl_secs: 30,
            recheck_secs: 60,
        }
    }
}

impl std::fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("enabled", &self.enabled)
            .field("node_id", &self.node_id)
            .field(
                "redis_url",
                &tern_store::postgres::redact_url(&self.redis_url),
            )
            .field(
                "nats_url",
                &tern_store::postgres::redact_url(&self.nats_url),
            )
            .field("prefix", &self.prefix)
            .field("directory_ttl_secs", &self.directory_ttl_secs)
            .field("recheck_secs", &self.recheck_secs)
            .finish()
    }
}

/// Whether `s` is a usable node id or prefix: 1 to 64 of letters, digits, `-` and `_` (they
/// go into Redis keys and NATS subjects).
pub fn valid_cluster_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Bounds on connections, so that no one can exhaust the server's file descriptors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectionLimits {
    /// Open connections in all; 0: the process's descriptor limit minus a reserve (a tenth,
    /// at least 64) for the database, media files and the listener. The log states the figure.
    pub max_total: usize,
    /// Open connections from one IPv4 address or one IPv6 /64; 0: no limit. Behind a proxy
    /// every connection comes from the proxy: limit there and set 0 here.
    pub max_per_address: usize,
    /// Proxies in front (addresses or networks, e.g. `["127.0.0.1", "10.0.0.0/8"]`) whose
    /// `X-Forwarded-For` names the client for the per-address rate limits: the rightmost
    /// entry that is not itself one of them. Empty (the default): the peer is the client, and
    /// the header is ignored.
    pub trusted_proxies: Vec<String>,
    /// Seconds a client has to send a request's headers (also between keep-alive requests).
    pub header_timeout_secs: u64,
    /// Seconds an API request may take, its body included (media transfers excepted).
    pub request_timeout_secs: u64,
    /// Seconds a media upload's body may stall before the request is cut.
    pub body_idle_secs: u64,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_total: 0,
            max_per_address: 256,
            trusted_proxies: Vec::new(),
            header_timeout_secs: 10,
            request_timeout_secs: 30,
            body_idle_secs: 30,
        }
    }
}

/// Rates per address, user or device. A refusal is `rate_limited` with a retry-after. 0 turns
/// a limit off.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimits {
    /// Accounts created per client address (IPv4, or IPv6 /64) per hour.
    pub registrations_per_hour_per_address: u32,
    /// Login attempts per client address per minute, whatever the usernames.
    pub logins_per_minute_per_address: u32,
    /// Login attempts per (username, address) per minute.
    pub logins_per_minute_per_user_and_address: u32,
    /// Login attempts per username per hour from addresses that have not logged in to it
    /// successfully in the last 30 days (so that no one can lock a user out; SECURITY.md).
    pub logins_per_hour_per_user: u32,
    /// Messages one device may send per second, sustained.
    pub sends_per_second: u32,
    /// Messages one device may send at once before the sustained rate applies.
    pub send_burst: u32,
    /// TURN credentials (`GET /v1/calls/turn`) one user may fetch per hour.
    pub turn_per_hour_per_user: u32,
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits {
            registrations_per_hour_per_address: 10,
            logins_per_minute_per_address: 30,
            logins_per_minute_per_user_and_address: 10,
            logins_per_hour_per_user: 100,
            sends_per_second: 20,
            send_burst: 1024,
            turn_per_hour_per_user: 120,
        }
    }
}

/// Bounds on what waits for one device. A message that would exceed them is refused with
/// `mailbox_full` (nothing acknowledged is ever dropped to make room); receipts and group
/// events still get through.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MailboxLimits {
    pub max_entries: u64,
    pub max_bytes: u64,
}

impl Default for MailboxLimits {
    fn default() -> Self {
        MailboxLimits {
            max_entries: 100_000,
            max_bytes: 256 << 20,
        }
    }
}

/// Which database keeps the server's state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageBackend {
    /// An embedded SQLite database, `data_dir/tern.db` (the default; one node).
    #[default]
    Sqlite,
    /// A PostgreSQL database (see `[storage.postgres]`), which several nodes may share.
    Postgres,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    pub backend: StorageBackend,
    pub sqlite: SqliteConfig,
    pub postgres: PostgresConfig,
}

/// The embedded SQLite store (`storage.backend = "sqlite"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SqliteConfig {
    /// Read connections (reads at once); writes go through one connection.
    pub readers: usize,
}

impl Default for SqliteConfig {
    fn default() -> Self {
        SqliteConfig { readers: 4 }
    }
}

/// The PostgreSQL store (`storage.backend = "postgres"`). Tables are created (migrated) at
/// start and by `ternd migrate`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// A libpq-style URL, `postgres://user:password@host:5432/dbname`, or a key=value string
    /// (`host=... user=... password=...`). Required with the postgres backend. Its password
    /// never appears in logs or errors.
    pub url: String,
    /// Connections in the pool.
    pub pool_size: usize,
    /// Seconds any statement (or lock wait) may take on the server.
    pub statement_timeout_secs: u64,
    /// Seconds to wait for a connection: opening one, or a free one from the pool.
    pub connect_timeout_secs: u64,
    /// The schema tern's tables live in, created if missing (lowercase letters, digits and
    /// `_`); empty: the server's default `search_path` (normally `public`).
    pub schema: String,
    /// How this node's connections name themselves (`application_name` in
    /// `pg_stat_activity`): give each node its own, to tell which holds which connection.
    pub application_name: String,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            url: String::new(),
            pool_size: 16,
            statement_timeout_secs: 10,
            connect_timeout_secs: 5,
            schema: String::new(),
            application_name: "ternd".to_owned(),
        }
    }
}

impl PostgresConfig {
    /// The options of [`tern_store::postgres::PgStore::open`].
    pub fn options(&self) -> tern_store::postgres::PgOptions {
        tern_store::postgres::PgOptions {
            url: self.url.clone(),
            pool_size: self.pool_size,
            statement_timeout: std::time::Duration::from_secs(self.statement_timeout_secs),
            connect_timeout: std::time::Duration::from_secs(self.connect_timeout_secs),
            schema: (!self.schema.is_empty()).then(|| self.schema.clone()),
            application_name: self.application_name.clone(),
        }
    }
}

impl std::fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &tern_store::postgres::redact_url(&self.url))
            .field("pool_size", &self.pool_size)
            .field("statement_timeout_secs", &self.statement_timeout_secs)
            .field("connect_timeout_secs", &self.connect_timeout_secs)
            .field("schema", &self.schema)
            .field("application_name", &self.application_name)
            .finish()
    }
}

/// Where media objects are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlobBackend {
    /// Files under `data_dir/media` (the default).
    Fs,
    /// An S3-compatible object store (see `[media.s3]`); needs a build with the `s3` feature.
    S3,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MediaConfig {
    pub backend: BlobBackend,
    /// Largest object, in bytes.
    pub max_object_bytes: u64,
    /// Bytes one user may hold: the objects it references plus its incomplete uploads.
    pub quota_bytes: u64,
    /// Incomplete uploads one user may have at once.
    pub max_uploads_per_user: usize,
    /// Requests writing upload bytes at once on this node; more are refused (503) to be
    /// retried. Each buffers up to 256 KiB on the file system backend, 5 MiB on S3.
    pub max_concurrent_writes: usize,
    /// Days an upload or a claim keeps an object referenced.
    pub retention_days: u64,
    /// Hours an incomplete resumable upload is kept.
    pub upload_expiry_hours: u64,
    /// Seconds between garbage collections.
    pub gc_interval_secs: u64,
    pub s3: S3Config,
}

impl Default for MediaConfig {
    fn default() -> Self {
        MediaConfig {
            backend: BlobBackend::Fs,
            max_object_bytes: 2 << 30,
            quota_bytes: 10 << 30,
            max_uploads_per_user: 16,
            max_concurrent_writes: 64,
            retention_days: 30,
            upload_expiry_hours: 24,
            gc_interval_secs: 3600,
            s3: S3Config::default(),
        }
    }
}

/// An S3-compatible bucket. Empty strings are taken from the standard `AWS_*` environment
/// variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT`).
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Config {
    pub bucket: String,
    pub region: String,
    /// e.g. `http://127.0.0.1:9000` for a local S3-compatible server; empty for AWS.
    pub endpoint: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    /// Allow a plain-HTTP endpoint (local servers only).
    pub allow_http: bool,
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field("allow_http", &self.allow_http)
            .finish()
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 7070)),
            data_dir: PathBuf::from("tern-data"),
            last_seen_flush_secs: 5,
            storage: StorageConfig::default(),
            limits: Limits::default(),
            password_hashing: crate::auth::PasswordHashing::default(),
            connections: ConnectionLimits::default(),
            rate_limits: RateLimits::default(),
            mailbox: MailboxLimits::default(),
            media: MediaConfig::default(),
            cluster: ClusterConfig::default(),
            push: PushConfig::default(),
            calls: CallsConfig::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Reads a TOML file over the defaults.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_toml(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })
    }

    pub fn from_toml(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Applies `key=value` overrides, keys as dotted paths (`limits.max_frame_bytes`). Values
    /// are TOML (`5`, `"text"`, `true`); a bare word is taken as a string. Unknown keys and
    /// values of the wrong type are refused.
    pub fn with_overrides<'a>(
        self,
        overrides: impl IntoIterator<Item = (String, &'a str)>,
    ) -> Result<Config, ConfigError> {
        let mut root =
            toml::Value::try_from(&self).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        for (key, raw) in overrides {
            let mut node = &mut root;
            for part in key.split('.') {
                node = node
                    .get_mut(part)
                    .ok_or_else(|| ConfigError::Invalid(format!("unknown setting {key:?}")))?;
            }
            let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or_else(|| toml::Value::String(raw.to_owned()));
            if std::mem::discriminant(node) != std::mem::discriminant(&value) {
                return Err(ConfigError::Invalid(format!(
                    "{key}: expected a {}, got {raw:?}",
                    node.type_str()
                )));
            }
            *node = value;
        }
        root.try_into()
            .map_err(|e: toml::de::Error| ConfigError::Invalid(e.to_string()))
    }

    /// Overrides from the environment: `TERN_SET_<KEY>` with `__` for a dot, e.g.
    /// `TERN_SET_LIMITS__MAX_FRAME_BYTES=131072`.
    pub fn env_overrides(vars: impl Iterator<Item = (String, String)>) -> Vec<(String, String)> {
        vars.filter_map(|(k, v)| {
            let key = k
                .strip_prefix("TERN_SET_")?
                .to_ascii_lowercase()
                .replace("__", ".");
            Some((key, v))
        })
        .collect()
    }

    /// Checks values that would make the server misbehave.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        if l.max_frame_bytes < 1024 {
            return bad("limits.max_frame_bytes must be at least 1024");
        }
        if l.max_body_bytes == 0 || l.max_body_bytes >= l.max_frame_bytes {
            return bad("limits.max_body_bytes must be positive and below max_frame_bytes");
        }
        if l.max_devices_per_user == 0 || l.outbound_queue == 0 || l.max_group_members < 2 {
            return bad(
                "limits.max_devices_per_user and limits.outbound_queue must be positive, limits.max_group_members at least 2",
            );
        }
        if l.send_timeout_secs == 0 || l.handshake_timeout_secs == 0 {
            return bad(
                "limits.send_timeout_secs and limits.handshake_timeout_secs must be positive",
            );
        }
        if l.heartbeat_secs == 0 || l.idle_timeout_secs <= l.heartbeat_secs {
            return bad("limits.idle_timeout_secs must exceed limits.heartbeat_secs (> 0)");
        }
        let h = &self.password_hashing;
        if let Err(e) = h.params() {
            return Err(ConfigError::Invalid(format!("password_hashing: {e}")));
        }
        if h.max_waiting == 0 || h.memory_budget_mib == 0 {
            return bad("password_hashing.max_waiting and memory_budget_mib must be positive");
        }
        let c = &self.connections;
        if c.header_timeout_secs == 0 || c.request_timeout_secs == 0 || c.body_idle_secs == 0 {
            return bad(
                "connections.header_timeout_secs, request_timeout_secs and body_idle_secs must be positive",
            );
        }
        if let Err(e) = crate::push::EndpointPolicy::new(&self.push) {
            return Err(ConfigError::Invalid(format!("push: {e}")));
        }
        let p = &self.push;
        if p.max_attempts == 0 || p.request_timeout_secs == 0 || p.ttl_secs > 28 * 86_400 {
            return bad(
                "push.max_attempts and push.request_timeout_secs must be positive, push.ttl_secs at most 28 days",
            );
        }
        if p.scan_secs == 0 || p.concurrency == 0 || p.concurrency > 4096 {
            return bad("push.scan_secs must be positive, push.concurrency between 1 and 4096");
        }
        if p.coalesce_ms > 3_600_000
            || p.max_attempts > 20
            || p.request_timeout_secs > 300
            || p.retry_max_secs > 3600
            || p.retry_base_ms > 60_000
        {
            return bad(
                "push: coalesce_ms at most an hour, max_attempts at most 20, request_timeout_secs at most 300, retry_max_secs at most 3600, retry_base_ms at most 60000",
            );
        }
        if !(p.subject.is_empty()
            || p.subject.starts_with("mailto:")
            || p.subject.starts_with("https://"))
        {
            return bad("push.subject is a mailto: or https: URL");
        }
        let calls = &self.calls;
        if !calls.turn_secret.is_empty() {
            if calls.turn_uris.is_empty() || calls.turn_uris.len() > 16 {
                return bad("calls.turn_uris: 1 to 16 URIs when calls.turn_secret is set");
            }
            if let Some(u) = calls.turn_uris.iter().find(|u| {
                !(u.starts_with("turn:") || u.starts_with("turns:") || u.starts_with("stun:"))
                    || u.len() > 256
            }) {
                return Err(ConfigError::Invalid(format!(
                    "calls.turn_uris: {u:?} is not a turn:, turns: or stun: URI"
                )));
            }
        }
        if !(60..=86_400).contains(&calls.turn_ttl_secs) {
            return bad("calls.turn_ttl_secs is between 60 and 86400");
        }
        if c.trusted_proxies.len() > 64 {
            return bad("connections.trusted_proxies holds at most 64 entries");
        }
        if let Err(e) = crate::net::TrustedProxies::parse(&c.trusted_proxies) {
            return Err(ConfigError::Invalid(format!(
                "connections.trusted_proxies: {e}"
            )));
        }
        if self.rate_limits.sends_per_second > 0 && self.rate_limits.send_burst == 0 {
            return bad("rate_limits.send_burst must be positive when sends are limited");
        }
        if self.mailbox.max_entries == 0 || self.mailbox.max_bytes < l.max_body_bytes as u64 {
            return bad(
                "mailbox.max_entries must be positive and mailbox.max_bytes at least limits.max_body_bytes",
            );
        }
        if self.last_seen_flush_secs == 0 {
            return bad("last_seen_flush_secs must be positive");
        }
        let st = &self.storage;
        if st.sqlite.readers == 0 {
            return bad("storage.sqlite.readers must be positive");
        }
        if st.backend == StorageBackend::Postgres {
            let p = &st.postgres;
            if p.url.is_empty() {
                return bad("storage.postgres.url is required with storage.backend = \"postgres\"");
            }
            if p.pool_size == 0 || p.statement_timeout_secs == 0 || p.connect_timeout_secs == 0 {
                return bad(
                    "storage.postgres.pool_size, statement_timeout_secs and connect_timeout_secs must be positive",
                );
            }
            if !p.schema.is_empty() && !tern_store::postgres::valid_schema_name(&p.schema) {
                return Err(ConfigError::Invalid(format!(
                    "storage.postgres.schema {:?}: use lowercase letters, digits and _ (not a digit first, at most 63), or empty for the default",
                    p.schema
                )));
            }
            let name = &p.application_name;
            if name.is_empty() || name.len() > 63 || !name.bytes().all(|b| b.is_ascii_graphic()) {
                return bad(
                    "storage.postgres.application_name must be 1 to 63 printable ASCII characters, no spaces",
                );
            }
        }
        let m = &self.media;
        if m.max_object_bytes == 0 || m.quota_bytes < m.max_object_bytes {
            return bad("media.max_object_bytes must be positive and at most media.quota_bytes");
        }
        if m.max_uploads_per_user == 0
            || m.max_concurrent_writes == 0
            || m.retention_days == 0
            || m.upload_expiry_hours == 0
            || m.gc_interval_secs == 0
        {
            return bad(
                "media.max_uploads_per_user, max_concurrent_writes, retention_days, upload_expiry_hours and gc_interval_secs must be positive",
            );
        }
        if m.backend == BlobBackend::S3 && m.s3.bucket.is_empty() {
            return bad("media.s3.bucket is required with media.backend = \"s3\"");
        }
        if m.backend == BlobBackend::S3 && m.max_object_bytes > 5 << 30 {
            // A completed upload becomes its object by one server-side copy (S3: 5 GiB at most).
            return bad("media.max_object_bytes is at most 5 GiB with media.backend = \"s3\"");
        }
        let c = &self.cluster;
        if c.enabled {
            if st.backend != StorageBackend::Postgres {
                return bad(
                    "cluster.enabled needs storage.backend = \"postgres\": the nodes share one database",
                );
            }
            if m.backend != BlobBackend::S3 {
                return bad(
                    "cluster.enabled needs media.backend = \"s3\": every node serves every object and resumes every upload",
                );
            }
            if c.redis_url.is_empty() || c.nats_url.is_empty() {
                return bad("cluster.redis_url and cluster.nats_url are required in cluster mode");
            }
            if !c.node_id.is_empty() && !valid_cluster_name(&c.node_id) {
                return bad("cluster.node_id: 1 to 64 letters, digits, - and _ (or empty: random)");
            }
            if !valid_cluster_name(&c.prefix) {
                return bad("cluster.prefix: 1 to 64 letters, digits, - and _");
            }
            if c.directory_ttl_secs < 3 || c.recheck_secs == 0 {
                return bad(
                    "cluster.directory_ttl_secs must be at least 3 and cluster.recheck_secs positive",
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_file_is_the_defaults() {
        let text = include_str!("../../../ternd.example.toml");
        assert_eq!(Config::from_toml(text).expect("parses"), Config::default());
        Config::default().validate().expect("defaults are valid");
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(Config::from_toml("listn = \"127.0.0.1:1\"").is_err());
        assert!(Config::from_toml("[limits]\nmax_frame = 5").is_err());
        assert!(Config::from_toml("sqlite_readers = 4").is_err());
        assert!(Config::from_toml("[storage.postgres]\nuri = \"postgres://db/tern\"").is_err());
        assert!(Config::from_toml("[storage]\nbackend = \"mysql\"").is_err());
    }

    #[test]
    fn cluster_settings_are_checked() {
        let s3 = "[media]\nbackend = \"s3\"\n[media.s3]\nbucket = \"tern\"\n";
        let pg = format!(
            "{s3}[storage]\nbackend = \"postgres\"\n[storage.postgres]\nurl = \"postgres://db/tern\"\n"
        );
        let ok = Config::from_toml(&format!("{pg}[cluster]\nenabled = true\nnode_id = \"a-1\""))
            .expect("parses");
        assert!(ok.validate().is_ok(), "{:?}", ok.validate());
        for bad in [
            // the nodes must share a database
            format!("{s3}[cluster]\nenabled = true"),
            // and its objects and uploads
            "[storage]\nbackend = \"postgres\"\n[storage.postgres]\nurl = \"postgres://db/tern\"\n[cluster]\nenabled = true".to_owned(),
            format!("{pg}[cluster]\nenabled = true\nnode_id = \"a.b\""),
            format!("{pg}[cluster]\nenabled = true\nprefix = \"\""),
            format!("{pg}[cluster]\nenabled = true\nredis_url = \"\""),
            format!("{pg}[cluster]\nenabled = true\ndirectory_ttl_secs = 1"),
        ] {
            let c = Config::from_toml(&bad).expect("parses");
            assert!(c.validate().is_err(), "{bad}");
        }
        assert!(
            Config::from_toml("[cluster]\nnode = \"a\"").is_err(),
            "unknown key"
        );
        let shown = format!(
            "{:?}",
            Config::from_toml(&format!(
                "{pg}[cluster]\nredis_url = \"redis://:hunter2@r:6379\""
            ))
            .expect("parses")
            .cluster
        );
        assert!(!shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn trusted_proxies_are_checked() {
        let c = Config::from_toml(
            "[connections]\ntrusted_proxies = [\"127.0.0.1\", \"10.0.0.0/8\", \"::1\"]",
        )
        .expect("parses");
        c.validate().expect("valid");
        for bad in ["[\"localhost\"]", "[\"10.0.0.0/33\"]", "[\"\"]"] {
            let c = Config::from_toml(&format!("[connections]\ntrusted_proxies = {bad}"))
                .expect("parses");
            assert!(c.validate().is_err(), "{bad}");
        }
    }

    #[test]
    fn storage_settings() {
        let c = Config::from_toml("[storage]\nbackend = \"postgres\"").expect("parses");
        assert_eq!(c.storage.backend, StorageBackend::Postgres);
        assert!(c.validate().is_err(), "postgres needs a url");
        let c = Config::from_toml(
            "[storage]\nbackend = \"postgres\"\n[storage.postgres]\nurl = \"postgres://tern:pw@db/tern\"\nschema = \"tern_a\"",
        )
        .expect("parses");
        c.validate().expect("valid");
        let o = c.storage.postgres.options();
        assert_eq!(o.schema.as_deref(), Some("tern_a"));
        assert_eq!(o.pool_size, 16);
        assert_eq!(o.statement_timeout, std::time::Duration::from_secs(10));
        assert_eq!(o.application_name, "ternd");
        assert_eq!(Config::default().storage.postgres.options().schema, None);
        let debug = format!("{c:?}");
        assert!(!debug.contains("pw@"), "the password is redacted: {debug}");
        assert!(debug.contains("postgres://tern:***@db/tern"), "{debug}");
        for (key, value) in [
            ("storage.postgres.schema", "Bad-Name"),
            ("storage.postgres.pool_size", "0"),
            ("storage.postgres.statement_timeout_secs", "0"),
            ("storage.postgres.connect_timeout_secs", "0"),
            ("storage.postgres.application_name", "\"\""),
            ("storage.postgres.application_name", "\"two words\""),
        ] {
            let c = c
                .clone()
                .with_overrides([(key.to_owned(), value)])
                .expect("applies");
            assert!(c.validate().is_err(), "{key}={value}");
        }
        // Without the postgres backend its section is not checked.
        let c = Config::default()
            .with_overrides([("storage.postgres.pool_size".to_owned(), "0")])
            .expect("applies");
        c.validate().expect("sqlite ignores [storage.postgres]");
        let c = Config::default()
            .with_overrides([("storage.sqlite.readers".to_owned(), "0")])
            .expect("applies");
        assert!(c.validate().is_err());
        let c = Config::default()
            .with_overrides([
                ("storage.backend".to_owned(), "postgres"),
                (
                    "storage.postgres.url".to_owned(),
                    "postgres://root@127.0.0.1:5432/test",
                ),
            ])
            .expect("applies");
        assert_eq!(c.storage.backend, StorageBackend::Postgres);
        assert_eq!(
            c.storage.postgres.url,
            "postgres://root@127.0.0.1:5432/test"
        );
        c.validate().expect("valid");
    }

    #[test]
    fn push_and_calls_settings_out_of_range_are_refused() {
        for (key, value) in [
            ("push.max_attempts", "0"),
            ("push.max_attempts", "21"),
            ("push.request_timeout_secs", "0"),
            ("push.request_timeout_secs", "301"),
            ("push.retry_max_secs", "3601"),
            ("push.retry_base_ms", "60001"),
            ("push.coalesce_ms", "3600001"),
            ("push.ttl_secs", "2419201"),
            ("push.scan_secs", "0"),
            ("push.concurrency", "0"),
            ("push.concurrency", "4097"),
            ("push.subject", "\"ops@example.org\""),
            ("push.allowed_origins", "[\"https://push.example/path\"]"),
            ("calls.turn_ttl_secs", "59"),
            ("calls.turn_ttl_secs", "86401"),
        ] {
            let c = Config::default()
                .with_overrides([(key.to_owned(), value)])
                .expect("applies");
            assert!(c.validate().is_err(), "{key}={value}");
        }
        let turn = |uris: &str| {
            Config::default()
                .with_overrides([
                    ("calls.turn_secret".to_owned(), "\"s\""),
                    ("calls.turn_uris".to_owned(), uris),
                ])
                .expect("applies")
                .validate()
        };
        assert!(turn("[]").is_err(), "a secret needs URIs");
        assert!(turn("[\"http://turn.example\"]").is_err());
        assert!(turn("[\"turn:turn.example:3478\", \"stun:turn.example\"]").is_ok());
        let secret = Config {
            calls: CallsConfig {
                turn_secret: "hunter2".into(),
                ..CallsConfig::default()
            },
            ..Config::default()
        };
        assert!(!format!("{secret:?}").contains("hunter2"), "redacted");
    }

    #[test]
    fn partial_file_keeps_other_defaults() {
        let c = Config::from_toml("[limits]\nmax_body_bytes = 1000").expect("parses");
        assert_eq!(c.limits.max_body_bytes, 1000);
        assert_eq!(c.listen, Config::default().listen);
    }

    #[test]
    fn overrides_by_dotted_key() {
        let c = Config::default()
            .with_overrides([
                ("limits.max_body_bytes".to_owned(), "1000"),
                ("listen".to_owned(), "\"127.0.0.1:9\""),
                ("data_dir".to_owned(), "/tmp/x"),
            ])
            .expect("applies");
        assert_eq!(c.limits.max_body_bytes, 1000);
        assert_eq!(c.listen.port(), 9);
        assert_eq!(c.data_dir, PathBuf::from("/tmp/x"));
        let bad = [
            ("limits.nope", "1"),
            ("limits.max_body_bytes", "lots"),
            ("nope", "1"),
        ];
        for (k, v) in bad {
            assert!(
                Config::default()
                    .with_overrides([(k.to_owned(), v)])
                    .is_err(),
                "{k}={v}"
            );
        }
        let env = Config::env_overrides(
            [
                ("TERN_SET_LIMITS__OUTBOUND_QUEUE".to_owned(), "9".to_owned()),
                ("TERN_LOG".to_owned(), "x".to_owned()),
            ]
            .into_iter(),
        );
        assert_eq!(
            env,
            vec![("limits.outbound_queue".to_owned(), "9".to_owned())]
        );
    }

    #[test]
    fn invalid_values_are_refused() {
        let mut c = Config::default();
        c.limits.max_body_bytes = c.limits.max_frame_bytes;
        assert!(c.validate().is_err());
        let mut c = Config::default();
        c.limits.idle_timeout_secs = 1;
        assert!(c.validate().is_err());
    }
}
