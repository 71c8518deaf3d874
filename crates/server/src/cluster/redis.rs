//! The connection directory in Redis.
//!
//! Keys (all of one user in one hash slot, `{u<id>}`, so that a Redis Cluster can take them):
//!
//! - `<prefix>:{u<user>}:d:<device>` → `"<node> <conn>"`, the connection holding the device,
//!   with a TTL of `directory_ttl_secs`, renewed every third of it by the holding node;
//! - `<prefix>:{u<user>}:on`, a sorted set of the user's connected devices scored by when
//!   their entry expires (what "online" reads: no scan of device keys);
//! - `<prefix>:{u<user>}:seen`, when a connection of the user last closed (a day's TTL), for
//!   last seen before the closing node's batched write reaches the database.
//!
//! Each change is one Lua script, so that it is atomic and compares before it writes: a node
//! only ever releases or renews its own entry, never one a newer connection took over. Time is
//! Redis's own (`TIME`), so that nodes' clocks do not matter.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Script, Value};
use tern_store::{DeviceId, UserId};

use crate::delivery::directory::{Directory, DirectoryError, Elsewhere, Held, Holder, Renewal};

/// Most commands in one pipeline of a renewal or a look-up.
const PIPELINE: usize = 1024;
/// How long a last-seen note outlives its connection: long after the batched write.
const SEEN_TTL_MS: u64 = 24 * 3600 * 1000;

/// KEYS: device, online set. ARGV: holder, ttl ms, device id. Returns the previous holder.
const CLAIM: &str = r"
local old = redis.call('GET', KEYS[1])
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return old
";

/// KEYS: device, online set, seen. ARGV: holder, device id, at ms, seen ttl ms.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], ARGV[2])
end
local seen = tonumber(redis.call('GET', KEYS[3]) or '0')
if tonumber(ARGV[3]) > seen then
  redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[4])
end
return 1
";

/// KEYS: device, online set. ARGV: holder, ttl ms, device id. 1: renewed; 2: written again
/// (Redis had lost it); 0: another connection holds the device now.
const RENEW: &str = r"
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] then
  return 0
end
local renewed = cur and 1 or 2
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return renewed
";

/// KEYS: online set, seen. Returns {devices online, seen or false}.
const PRESENCE: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
return {redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf'), redis.call('GET', KEYS[2])}
";

pub struct RedisDirectory {
    conn: ConnectionManager,
    node: Arc<str>,
    prefix: String,
    ttl_ms: u64,
    claim: Script,
    release: Script,
    renew: Script,
    presence: Script,
}

fn failed(e: redis::RedisError) -> DirectoryError {
    DirectoryError(e.to_string())
}

/// Connects (failing if Redis does not answer within `timeout`); the connection is re-made by
/// itself when lost, calls failing meanwhile. One multiplexed connection serves the directory
/// and the rate limits of a node.
pub async fn connect(url: &str, timeout: Duration) -> redis::RedisResult<ConnectionManager> {
    let client = redis::Client::open(url)?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_max_delay(Duration::from_secs(2));
    client.get_connection_manager_with_config(config).await
}

impl RedisDirectory {
    pub fn new(conn: ConnectionManager, node: Arc<str>, prefix: &str, ttl: Duration) -> Self {
        RedisDirectory {
            conn,
            node,
            prefix: prefix.to_owned(),
            ttl_ms: ttl.as_millis() as u64,
            claim: Script::new(CLAIM),
            release: Script::new(RELEASE),
            renew: Script::new(RENEW),
            presence: Script::new(PRESENCE),
        }
    }

    fn device_key(&self, user: UserId, device: DeviceId) -> String {
        format!("{}:{{u{user}}}:d:{device}", self.prefix)
    }

    fn online_key(&self, user: UserId) -> String {
        format!("{}:{{u{user}}}:on", self.prefix)
    }

    fn seen_key(&self, user: UserId) -> String {
        format!("{}:{{u{user}}}:seen", self.prefix)
    }

    fn holder(&self, conn: u64) -> String {
        format!("{} {conn}", self.node)
    }
}

/// `"<node> <conn>"` back into a holder; `None` for anything else.
fn parse_holder(s: &str) -> Option<Holder> {
    let (node, conn) = s.split_once(' ')?;
    Some(Holder {
        node: Arc::from(node),
        conn: conn.parse().ok()?,
    })
}

#[async_trait]
impl Directory for RedisDirectory {
    async fn claim(&self, held: Held) -> Result<Option<Holder>, DirectoryError> {
        let old: Option<String> = self
            .claim
            .key(self.device_key(held.user, held.device))
            .key(self.online_key(held.user))
            .arg(self.holder(held.conn))
            .arg(self.ttl_ms)
            .arg(held.device)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(failed)?;
        Ok(old
            .as_deref()
            .and_then(parse_holder)
            .filter(|h| !(h.node == self.node && h.conn == held.conn)))
    }

    async fn release(&self, held: Held, at_ms: i64) -> Result<(), DirectoryError> {
        let _: i64 = self
            .release
            .key(self.device_key(held.user, held.device))
            .key(self.online_key(held.user))
            .key(self.seen_key(held.user))
            .arg(self.holder(held.conn))
            .arg(held.device)
            .arg(at_ms)
            .arg(SEEN_TTL_MS)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(failed)?;
        Ok(())
    }

    async fn refresh(&self, held: &[Held]) -> Result<Renewal, DirectoryError> {
        let mut renewal = Renewal::default();
        for chunk in held.chunks(PIPELINE) {
            let mut pipe = redis::pipe();
            // Loading is idempotent; after a Redis restart the script cache is empty.
            pipe.load_script(&self.renew).ignore();
            for h in chunk {
                pipe.invoke_script(
                    self.renew
                        .key(self.device_key(h.user, h.device))
                        .key(self.online_key(h.user))
                        .arg(self.holder(h.conn))
                        .arg(self.ttl_ms)
                        .arg(h.device),
                );
            }
            let renewed: Vec<i64> = pipe
                .query_async(&mut self.conn.clone())
                .await
                .map_err(failed)?;
            for (h, r) in chunk.iter().zip(renewed) {
                match r {
                    0 => renewal.lost.push(*h),
                    2 => renewal.restored.push(*h),
                    _ => {}
                }
            }
        }
        Ok(renewal)
    }

    async fn locate(
        &self,
        devices: &[(UserId, DeviceId)],
    ) -> Result<Vec<Option<Holder>>, DirectoryError> {
        let mut found = Vec::with_capacity(devices.len());
        for chunk in devices.chunks(PIPELINE) {
            let mut pipe = redis::pipe();
            for &(user, device) in chunk {
                pipe.get(self.device_key(user, device));
            }
            let values: Vec<Option<String>> = pipe
                .query_async(&mut self.conn.clone())
                .await
                .map_err(failed)?;
            found.extend(values.iter().map(|v| v.as_deref().and_then(parse_holder)));
        }
        Ok(found)
    }

    async fn elsewhere(&self, user: UserId) -> Result<Elsewhere, DirectoryError> {
        let (online, seen): (i64, Option<String>) = self
            .presence
            .key(self.online_key(user))
            .key(self.seen_key(user))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(failed)?;
        Ok(Elsewhere {
            online: online > 0,
            last_seen_ms: seen.and_then(|s| s.parse().ok()),
        })
    }

    async fn ping(&self) -> Result<(), DirectoryError> {
        let pong: Value = redis::cmd("PING")
            .query_async(&mut self.conn.clone())
            .await
            .map_err(failed)?;
        match pong {
            Value::SimpleString(_) | Value::BulkString(_) => Ok(()),
            other => Err(DirectoryError(format!(
                "unexpected answer to PING: {other:?}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holders_parse_back() {
        assert_eq!(
            parse_holder("node-a 42"),
            Some(Holder {
                node: Arc::from("node-a"),
                conn: 42
            })
        );
        assert_eq!(parse_holder("node-a"), None);
        assert_eq!(parse_holder("node-a x"), None);
    }
}
