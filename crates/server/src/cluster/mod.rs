//! Cluster mode (`[cluster] enabled = true`): the Redis connection directory, the NATS bus and
//! the Redis rate limits that make this node one of several. Everything durable stays in the
//! shared PostgreSQL database; these only make delivery fast and the limits shared
//! (ARCHITECTURE.md, "Cluster mode").

pub mod nats;
pub mod ratelimit;
pub mod redis;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::config::{ClusterConfig, RateLimits};
use crate::delivery::{ClusterTimings, Hub};
use crate::ratelimit::RateLimiter;

/// How long joining waits for Redis and NATS, and each Redis call after.
const TIMEOUT: Duration = Duration::from_secs(5);

/// This node's id: the configured one, else a random one.
pub fn node_id(config: &ClusterConfig) -> Arc<str> {
    if config.node_id.is_empty() {
        Arc::from(format!("n{:016x}", rand::random::<u64>()))
    } else {
        Arc::from(config.node_id.as_str())
    }
}

/// What a node of a cluster shares with the others.
pub struct Joined {
    pub hub: Arc<Hub>,
    pub rate_limits: Arc<dyn RateLimiter>,
}

/// Connects to Redis and NATS and builds the hub of node `node` and the shared rate limits;
/// the hub's tasks stop with `shutdown`.
pub async fn join(
    config: &ClusterConfig,
    limits: &RateLimits,
    node: Arc<str>,
    shutdown: CancellationToken,
) -> anyhow::Result<Joined> {
    let ttl = Duration::from_secs(config.directory_ttl_secs);
    let redis_url = tern_store::postgres::redact_url(&config.redis_url);
    let nats_url = tern_store::postgres::redact_url(&config.nats_url);
    let conn = redis::connect(&config.redis_url, TIMEOUT)
        .await
        .with_context(|| format!("cannot reach Redis at {redis_url}"))?;
    let directory = redis::RedisDirectory::new(conn.clone(), node.clone(), &config.prefix, ttl);
    let rate_limits = Arc::new(ratelimit::RedisRateLimits::new(
        conn,
        &config.prefix,
        limits,
    ));
    let (bus, inbox) = nats::NatsBus::connect(&config.nats_url, &node, &config.prefix, TIMEOUT)
        .await
        .with_context(|| format!("cannot reach NATS at {nats_url}"))?;
    tracing::info!(node = %node, redis = %redis_url, nats = %nats_url, prefix = %config.prefix, "joined the cluster");
    let hub = Hub::cluster(
        node,
        Arc::new(directory),
        Arc::new(bus),
        inbox,
        ClusterTimings {
            entry_ttl: ttl,
            recheck: Duration::from_secs(config.recheck_secs),
        },
        shutdown,
    );
    Ok(Joined { hub, rate_limits })
}
