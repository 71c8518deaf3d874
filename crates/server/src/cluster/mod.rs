//! Cluster mode (`[cluster] enabled = true`): the Redis connection directory and the NATS bus
//! that make this node's [`Hub`] one of several. Everything durable stays in the shared
//! PostgreSQL database; these two only make delivery fast (ARCHITECTURE.md, "Cluster").

pub mod nats;
pub mod redis;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::config::ClusterConfig;
use crate::delivery::{ClusterTimings, Hub};

/// How long joining waits for Redis and NATS, and each directory call after.
const TIMEOUT: Duration = Duration::from_secs(5);

/// This node's id: the configured one, else a random one.
pub fn node_id(config: &ClusterConfig) -> Arc<str> {
    if config.node_id.is_empty() {
        Arc::from(format!("n{:016x}", rand::random::<u64>()))
    } else {
        Arc::from(config.node_id.as_str())
    }
}

/// Connects to Redis and NATS and builds the hub of node `node`; its tasks stop with
/// `shutdown`.
pub async fn join(
    config: &ClusterConfig,
    node: Arc<str>,
    shutdown: CancellationToken,
) -> anyhow::Result<Arc<Hub>> {
    let ttl = Duration::from_secs(config.directory_ttl_secs);
    let redis_url = tern_store::postgres::redact_url(&config.redis_url);
    let nats_url = tern_store::postgres::redact_url(&config.nats_url);
    let directory = redis::RedisDirectory::connect(
        &config.redis_url,
        node.clone(),
        &config.prefix,
        ttl,
        TIMEOUT,
    )
    .await
    .with_context(|| format!("cannot reach Redis at {redis_url}"))?;
    let (bus, inbox) = nats::NatsBus::connect(&config.nats_url, &node, &config.prefix, TIMEOUT)
        .await
        .with_context(|| format!("cannot reach NATS at {nats_url}"))?;
    tracing::info!(node = %node, redis = %redis_url, nats = %nats_url, prefix = %config.prefix, "joined the cluster");
    Ok(Hub::cluster(
        node,
        Arc::new(directory),
        Arc::new(bus),
        inbox,
        ClusterTimings {
            entry_ttl: ttl,
            recheck: Duration::from_secs(config.recheck_secs),
        },
        shutdown,
    ))
}
