//! The rate limits shared by every node, in Redis: the same buckets as [`RateLimits`] (module
//! docs of [`crate::ratelimit`]), each a GCRA state (the "theoretical arrival time") in one key
//! with a TTL, changed by a Lua script with Redis's own clock. Keys of one address, username or
//! device share a hash slot (`{a…}`, `{n…}`, `{d…}`). Known addresses (a successful login)
//! are keys with a 30-day TTL.
//!
//! When Redis does not answer, the node falls back to its own [`RateLimits`]: the limits still
//! hold, per node, until Redis is back.

use std::net::IpAddr;
use std::time::Duration;

use async_trait::async_trait;
use redis::Script;
use redis::aio::ConnectionManager;
use tern_store::{DeviceId, UserId};

use crate::config::RateLimits as Config;
use crate::net::address_key;
use crate::ratelimit::{Limited, RateLimiter, RateLimits, TRUSTED_FOR, counted};

/// `gcra(key, interval_ms, burst, want)` → `{allowed, wait_ms}`: as many of `want` tokens as the
/// bucket holds (a bucket of `burst` tokens refilled one every `interval_ms`).
const GCRA: &str = r"
local function gcra(key, interval, burst, want)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then tat = now end
  local room = math.floor((now + interval * burst - tat) / interval + 1e-6)
  local allowed = math.max(0, math.min(want, room))
  tat = tat + allowed * interval
  if allowed > 0 then
    redis.call('SET', key, string.format('%.3f', tat), 'PX', math.ceil(tat - now) + 1)
  end
  local wait = 0
  if allowed < want then
    wait = math.max(1, math.ceil(tat + interval - (now + interval * burst)))
  end
  return {allowed, wait}
end
";

/// KEYS: bucket. ARGV: interval ms, burst, want.
const TAKE: &str = r"
return gcra(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]))
";

/// KEYS: the (username, address) bucket, the username's bucket, the known-address key.
/// ARGV: the pair's interval and burst, the username's interval and burst (interval 0: no
/// limit). Returns the wait in ms, 0 when allowed.
const LOGIN: &str = r"
local pi, pb, ui, ub = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if pi > 0 then
  local r = gcra(KEYS[1], pi, pb, 1)
  if r[1] == 0 then return r[2] end
end
if ui > 0 and redis.call('EXISTS', KEYS[3]) == 0 then
  local r = gcra(KEYS[2], ui, ub, 1)
  if r[1] == 0 then return r[2] end
end
return 0
";

/// A bucket: one token every `interval_ms`, `burst` at most. `None`: no limit.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    interval_ms: f64,
    burst: u32,
}

impl Bucket {
    fn per(n: u32, period: Duration) -> Option<Bucket> {
        (n > 0).then(|| Bucket {
            interval_ms: period.as_secs_f64() * 1000.0 / f64::from(n),
            burst: n,
        })
    }

    /// As a pair of script arguments; (0, 0) for no limit.
    fn args(b: Option<Bucket>) -> (f64, u32) {
        b.map_or((0.0, 0), |b| (b.interval_ms, b.burst))
    }
}

pub struct RedisRateLimits {
    conn: ConnectionManager,
    prefix: String,
    registrations: Option<Bucket>,
    login_address: Option<Bucket>,
    login_pair: Option<Bucket>,
    login_user: Option<Bucket>,
    sends: Option<Bucket>,
    turn: Option<Bucket>,
    take: Script,
    login: Script,
    /// What holds while Redis does not answer.
    fallback: RateLimits,
}

fn ms(wait: i64) -> Duration {
    Duration::from_millis(wait.max(1) as u64)
}

impl RedisRateLimits {
    pub fn new(conn: ConnectionManager, prefix: &str, c: &Config) -> RedisRateLimits {
        let minute = Duration::from_secs(60);
        let hour = Duration::from_secs(3600);
        let sends = (c.sends_per_second > 0).then(|| Bucket {
            interval_ms: 1000.0 / f64::from(c.sends_per_second),
            burst: if c.send_burst > 0 {
                c.send_burst
            } else {
                c.sends_per_second
            },
        });
        RedisRateLimits {
            conn,
            prefix: prefix.to_owned(),
            registrations: Bucket::per(c.registrations_per_hour_per_address, hour),
            login_address: Bucket::per(c.logins_per_minute_per_address, minute),
            login_pair: Bucket::per(c.logins_per_minute_per_user_and_address, minute),
            login_user: Bucket::per(c.logins_per_hour_per_user, hour),
            sends,
            turn: Bucket::per(c.turn_per_hour_per_user, hour),
            take: Script::new(&format!("{GCRA}{TAKE}")),
            login: Script::new(&format!("{GCRA}{LOGIN}")),
            fallback: RateLimits::new(c),
        }
    }

    /// Takes up to `want` tokens of `bucket` at `key`: (allowed, wait ms).
    async fn take(
        &self,
        key: String,
        bucket: Bucket,
        want: usize,
    ) -> redis::RedisResult<(usize, i64)> {
        let (allowed, wait): (i64, i64) = self
            .take
            .key(key)
            .arg(bucket.interval_ms)
            .arg(bucket.burst)
            .arg(want)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok((allowed.max(0) as usize, wait))
    }

    /// One token of `bucket` at `key` (no bucket: no limit); `fallback` when Redis does not
    /// answer.
    async fn one(
        &self,
        key: String,
        bucket: Option<Bucket>,
        what: Limited,
        fallback: impl FnOnce() -> Result<(), Duration>,
    ) -> Result<(), Duration> {
        let Some(bucket) = bucket else {
            return Ok(());
        };
        match self.take(key, bucket, 1).await {
            Ok((1, _)) => Ok(()),
            Ok((_, wait)) => {
                counted(what);
                Err(ms(wait))
            }
            Err(e) => {
                Self::unavailable(&e);
                fallback()
            }
        }
    }

    fn unavailable(e: &redis::RedisError) {
        metrics::counter!("tern_directory_errors_total", "op" => "rate_limit").increment(1);
        tracing::warn!(error = %e, "shared rate limits unavailable; limiting on this node alone");
    }
}

#[async_trait]
impl RateLimiter for RedisRateLimits {
    async fn registration(&self, ip: IpAddr) -> Result<(), Duration> {
        let key = format!("{}:{{a{}}}:reg", self.prefix, address_key(ip));
        self.one(key, self.registrations, Limited::Registration, || {
            self.fallback.registration(ip)
        })
        .await
    }

    async fn login(&self, username: &str, ip: IpAddr) -> Result<(), Duration> {
        let ip = address_key(ip);
        let outcome = async {
            if let Some(bucket) = self.login_address {
                let key = format!("{}:{{a{ip}}}:login", self.prefix);
                if let (0, wait) = self.take(key, bucket, 1).await? {
                    return Ok(wait);
                }
            }
            let (pi, pb) = Bucket::args(self.login_pair);
            let (ui, ub) = Bucket::args(self.login_user);
            let slot = format!("{}:{{n{username}}}", self.prefix);
            self.login
                .key(format!("{slot}:pair:{ip}"))
                .key(format!("{slot}:user"))
                .key(format!("{slot}:known:{ip}"))
                .arg(pi)
                .arg(pb)
                .arg(ui)
                .arg(ub)
                .invoke_async::<i64>(&mut self.conn.clone())
                .await
        }
        .await;
        match outcome {
            Ok(0) => Ok(()),
            Ok(wait) => {
                counted(Limited::Login);
                Err(ms(wait))
            }
            Err(e) => {
                Self::unavailable(&e);
                self.fallback.login(username, ip)
            }
        }
    }

    async fn login_succeeded(&self, username: &str, ip: IpAddr) {
        let key = format!("{}:{{n{username}}}:known:{}", self.prefix, address_key(ip));
        let written: redis::RedisResult<()> = redis::cmd("SET")
            .arg(key)
            .arg(1)
            .arg("PX")
            .arg(TRUSTED_FOR.as_millis() as u64)
            .query_async(&mut self.conn.clone())
            .await;
        if let Err(e) = written {
            Self::unavailable(&e);
        }
        self.fallback.login_succeeded(username, ip);
    }

    async fn sends(&self, device: DeviceId, n: usize) -> (usize, Option<Duration>) {
        let Some(bucket) = self.sends else {
            return (n, None);
        };
        if n == 0 {
            return (0, None);
        }
        let key = format!("{}:{{d{device}}}:send", self.prefix);
        match self.take(key, bucket, n).await {
            Ok((allowed, _)) if allowed >= n => (n, None),
            Ok((allowed, wait)) => {
                counted(Limited::Send);
                (allowed, Some(ms(wait)))
            }
            Err(e) => {
                Self::unavailable(&e);
                RateLimiter::sends(&self.fallback, device, n).await
            }
        }
    }

    async fn turn(&self, user: UserId) -> Result<(), Duration> {
        let key = format!("{}:{{u{user}}}:turn", self.prefix);
        self.one(key, self.turn, Limited::Turn, || self.fallback.turn(user))
            .await
    }

    fn housekeeping(&self) {
        self.fallback.forget_idle();
    }
}

/// The scenarios of [`crate::ratelimit::scenarios`] on the machine's Redis
/// (`TERN_TEST_REDIS`; skipped, saying so, without it), each under a prefix of its own.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::ratelimit::scenarios;

    async fn limits() -> Option<(RedisRateLimits, Cleanup)> {
        let Ok(url) = std::env::var("TERN_TEST_REDIS") else {
            eprintln!("skipped: the Redis rate limit tests need TERN_TEST_REDIS (.ci/run sets it)");
            return None;
        };
        let conn = super::super::redis::connect(&url, Duration::from_secs(5))
            .await
            .expect("Redis answers");
        let prefix = format!("t{:016x}", rand::random::<u64>());
        let limits = RedisRateLimits::new(conn.clone(), &prefix, &scenarios::config());
        Some((limits, Cleanup { conn, prefix }))
    }

    /// Deletes a test's keys (call at the end).
    struct Cleanup {
        conn: ConnectionManager,
        prefix: String,
    }

    impl Cleanup {
        async fn run(mut self) {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{}:*", self.prefix))
                .query_async(&mut self.conn)
                .await
                .expect("keys");
            if !keys.is_empty() {
                redis::cmd("DEL")
                    .arg(keys)
                    .query_async::<()>(&mut self.conn)
                    .await
                    .expect("del");
            }
        }
    }

    #[tokio::test]
    async fn redis_registrations_per_address_and_per_64() {
        let Some((l, cleanup)) = limits().await else {
            return;
        };
        scenarios::registrations_per_address_and_per_64(&l).await;
        cleanup.run().await;
    }

    #[tokio::test]
    async fn redis_failing_on_purpose_does_not_lock_the_user_out() {
        let Some((l, cleanup)) = limits().await else {
            return;
        };
        scenarios::failing_on_purpose_does_not_lock_the_user_out(&l).await;
        cleanup.run().await;
    }

    #[tokio::test]
    async fn redis_one_address_cannot_spray_usernames() {
        let Some((l, cleanup)) = limits().await else {
            return;
        };
        scenarios::one_address_cannot_spray_usernames(&l).await;
        cleanup.run().await;
    }

    #[tokio::test]
    async fn redis_sends_have_a_burst_then_a_rate() {
        let Some((l, cleanup)) = limits().await else {
            return;
        };
        scenarios::sends_have_a_burst_then_a_rate(&l).await;
        cleanup.run().await;
    }

    #[tokio::test]
    async fn redis_turn_credentials_per_user() {
        let Some((l, cleanup)) = limits().await else {
            return;
        };
        scenarios::turn_credentials_per_user(&l).await;
        cleanup.run().await;
    }

    #[tokio::test]
    async fn redis_limits_are_shared_by_nodes() {
        let Some((a, cleanup)) = limits().await else {
            return;
        };
        // A second node: its own connection, the same prefix.
        let url = std::env::var("TERN_TEST_REDIS").expect("set");
        let conn = super::super::redis::connect(&url, Duration::from_secs(5))
            .await
            .expect("Redis answers");
        let b = RedisRateLimits::new(conn, &cleanup.prefix, &scenarios::config());
        let ip: IpAddr = "10.9.9.9".parse().expect("ip");
        assert!(a.registration(ip).await.is_ok());
        assert!(b.registration(ip).await.is_ok());
        assert!(
            a.registration(ip).await.is_err(),
            "two an hour, across nodes"
        );
        assert!(b.registration(ip).await.is_err());
        cleanup.run().await;
    }
}
