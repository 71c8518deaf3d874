//! Rate limits on what strangers and accounts can make the server do: sign-ups per address,
//! login attempts, sends per device. Each is a keyed token bucket (`governor`); a refusal
//! carries how long to wait. Idle keys are forgotten by [`RateLimits::housekeeping`], so the
//! limiters stay bounded however many addresses or usernames are tried.
//!
//! Logins are limited without handing out lockouts (SECURITY.md, "Abuse"). A per-username
//! limit alone lets anyone lock a known user out by failing on purpose; a per-address limit
//! alone lets a botnet guess one user's password from many addresses. So, as the OWASP
//! guidance on device cookies suggests:
//! - per (username, address): a few attempts a minute — guessing from one place is slow;
//! - per address: a few dozen a minute whatever the usernames — one host cannot spray;
//! - per username, an hourly budget shared by every address that has *not* logged in to
//!   this user successfully in the last 30 days. When a distributed attack exhausts it,
//!   new places are refused for a while, but the user's own known addresses are not: they
//!   never touch that budget.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter as Governor};
use tern_store::{DeviceId, UserId};

use crate::config::RateLimits as Config;
use crate::net::address_key;

/// How long a successful login makes an address known for that user.
pub const TRUSTED_FOR: Duration = Duration::from_secs(30 * 24 * 3600);
/// Most (username, address) pairs remembered as known; the oldest half goes when full.
const TRUSTED_MAX: usize = 100_000;

struct Keyed<K: Hash + Eq + Clone>(Option<DefaultKeyedRateLimiter<K>>);

impl<K: Hash + Eq + Clone> Keyed<K> {
    fn new(quota: Option<Quota>) -> Self {
        Keyed(quota.map(Governor::keyed))
    }

    /// `Err(wait)` when the key has no token left.
    fn check(&self, key: &K) -> Result<(), Duration> {
        let Some(limiter) = &self.0 else {
            return Ok(());
        };
        limiter
            .check_key(key)
            .map_err(|n| n.wait_time_from(DefaultClock::default().now()))
    }

    fn forget_idle(&self) {
        if let Some(l) = &self.0 {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }
}

fn quota(n: u32, per: Duration) -> Option<Quota> {
    let n = NonZeroU32::new(n)?;
    Quota::with_period(per / n.get()).map(|q| q.allow_burst(n))
}

/// The rate limits as services use them: [`RateLimits`] on one node, or shared by every node
/// through Redis ([`crate::cluster::ratelimit`]). A refusal carries how long to wait.
#[async_trait]
pub trait RateLimiter: Send + Sync + 'static {
    /// A sign-up from `ip`.
    async fn registration(&self, ip: IpAddr) -> Result<(), Duration>;
    /// A login attempt for `username` from `ip` (module docs).
    async fn login(&self, username: &str, ip: IpAddr) -> Result<(), Duration>;
    /// `ip` logged in to `username`: it no longer draws on the username's shared budget.
    async fn login_succeeded(&self, username: &str, ip: IpAddr);
    /// Of `n` messages `device` sends now, how many it may (the first ones), and when fewer
    /// than `n`, how long until the next.
    async fn sends(&self, device: DeviceId, n: usize) -> (usize, Option<Duration>);
    /// TURN credentials for `user`.
    async fn turn(&self, user: UserId) -> Result<(), Duration>;
    /// Forgets idle state kept in this process (every minute).
    fn housekeeping(&self);
}

/// What was refused, for the error message and the metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limited {
    Registration,
    Login,
    Send,
    Turn,
}

/// Every rate limit of the server.
pub struct RateLimits {
    registrations: Keyed<IpAddr>,
    login_address: Keyed<IpAddr>,
    login_pair: Keyed<(String, IpAddr)>,
    login_user: Keyed<String>,
    sends: Keyed<DeviceId>,
    turn: Keyed<UserId>,
    trusted: Mutex<HashMap<(String, IpAddr), Instant>>,
}

impl RateLimits {
    pub fn new(c: &Config) -> RateLimits {
        let minute = Duration::from_secs(60);
        let hour = Duration::from_secs(3600);
        let sends = NonZeroU32::new(c.sends_per_second).map(|rate| {
            let burst = NonZeroU32::new(c.send_burst).unwrap_or(rate);
            Quota::per_second(rate).allow_burst(burst)
        });
        RateLimits {
            registrations: Keyed::new(quota(c.registrations_per_hour_per_address, hour)),
            login_address: Keyed::new(quota(c.logins_per_minute_per_address, minute)),
            login_pair: Keyed::new(quota(c.logins_per_minute_per_user_and_address, minute)),
            login_user: Keyed::new(quota(c.logins_per_hour_per_user, hour)),
            sends: Keyed::new(sends),
            turn: Keyed::new(quota(c.turn_per_hour_per_user, hour)),
            trusted: Mutex::new(HashMap::new()),
        }
    }

    fn refused(what: Limited, r: Result<(), Duration>) -> Result<(), Duration> {
        if r.is_err() {
            counted(what);
        }
        r
    }

    /// A sign-up from `ip`.
    pub fn registration(&self, ip: IpAddr) -> Result<(), Duration> {
        Self::refused(
            Limited::Registration,
            self.registrations.check(&address_key(ip)),
        )
    }

    /// A login attempt for `username` from `ip` (module docs).
    pub fn login(&self, username: &str, ip: IpAddr) -> Result<(), Duration> {
        let ip = address_key(ip);
        let r = self
            .login_address
            .check(&ip)
            .and_then(|()| self.login_pair.check(&(username.to_owned(), ip)))
            .and_then(|()| {
                if self.is_trusted(username, ip) {
                    Ok(())
                } else {
                    self.login_user.check(&username.to_owned())
                }
            });
        Self::refused(Limited::Login, r)
    }

    /// Remembers that `ip` logged in to `username`: it no longer draws on the username's
    /// shared budget.
    pub fn login_succeeded(&self, username: &str, ip: IpAddr) {
        let Ok(mut t) = self.trusted.lock() else {
            return;
        };
        if t.len() >= TRUSTED_MAX {
            let mut ages: Vec<Instant> = t.values().copied().collect();
            ages.sort_unstable();
            let cut = ages[ages.len() / 2];
            t.retain(|_, at| *at > cut);
        }
        t.insert((username.to_owned(), address_key(ip)), Instant::now());
    }

    fn is_trusted(&self, username: &str, ip: IpAddr) -> bool {
        self.trusted.lock().is_ok_and(|t| {
            t.get(&(username.to_owned(), ip))
                .is_some_and(|at| at.elapsed() < TRUSTED_FOR)
        })
    }

    /// One message sent by `device`.
    pub fn send(&self, device: DeviceId) -> Result<(), Duration> {
        Self::refused(Limited::Send, self.sends.check(&device))
    }

    /// TURN credentials for `user`.
    pub fn turn(&self, user: UserId) -> Result<(), Duration> {
        Self::refused(Limited::Turn, self.turn.check(&user))
    }

    /// Forgets keys whose buckets are full again, and expired known addresses.
    pub fn forget_idle(&self) {
        self.registrations.forget_idle();
        self.login_address.forget_idle();
        self.login_pair.forget_idle();
        self.login_user.forget_idle();
        self.sends.forget_idle();
        self.turn.forget_idle();
        if let Ok(mut t) = self.trusted.lock() {
            t.retain(|_, at| at.elapsed() < TRUSTED_FOR);
            t.shrink_to_fit();
        }
    }
}

/// Counts a refusal (`tern_rate_limited_total{what}`).
pub fn counted(what: Limited) {
    let name = match what {
        Limited::Registration => "registration",
        Limited::Login => "login",
        Limited::Send => "send",
        Limited::Turn => "turn",
    };
    metrics::counter!("tern_rate_limited_total", "what" => name).increment(1);
}

#[async_trait]
impl RateLimiter for RateLimits {
    async fn registration(&self, ip: IpAddr) -> Result<(), Duration> {
        RateLimits::registration(self, ip)
    }

    async fn login(&self, username: &str, ip: IpAddr) -> Result<(), Duration> {
        RateLimits::login(self, username, ip)
    }

    async fn login_succeeded(&self, username: &str, ip: IpAddr) {
        RateLimits::login_succeeded(self, username, ip)
    }

    async fn sends(&self, device: DeviceId, n: usize) -> (usize, Option<Duration>) {
        for i in 0..n {
            if let Err(wait) = self.send(device) {
                return (i, Some(wait));
            }
        }
        (n, None)
    }

    async fn turn(&self, user: UserId) -> Result<(), Duration> {
        RateLimits::turn(self, user)
    }

    fn housekeeping(&self) {
        self.forget_idle();
    }
}

/// The behaviour every [`RateLimiter`] must show, run on [`RateLimits`] here and on the Redis
/// limits in `cluster::ratelimit`, with the quotas of [`scenarios::config`].
#[cfg(test)]
pub(crate) mod scenarios {
    use super::*;

    pub fn config() -> Config {
        Config {
            registrations_per_hour_per_address: 2,
            logins_per_minute_per_address: 6,
            logins_per_minute_per_user_and_address: 3,
            logins_per_hour_per_user: 4,
            sends_per_second: 1,
            send_burst: 3,
            turn_per_hour_per_user: 2,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    pub async fn registrations_per_address_and_per_64(l: &dyn RateLimiter) {
        assert!(l.registration(ip("10.0.0.1")).await.is_ok());
        assert!(l.registration(ip("10.0.0.1")).await.is_ok());
        let wait = l
            .registration(ip("10.0.0.1"))
            .await
            .expect_err("third in an hour");
        assert!(wait > Duration::from_secs(60), "{wait:?}");
        assert!(
            l.registration(ip("10.0.0.2")).await.is_ok(),
            "another address"
        );
        assert!(l.registration(ip("2001:db8::1")).await.is_ok());
        assert!(l.registration(ip("2001:db8::2")).await.is_ok());
        assert!(l.registration(ip("2001:db8::3")).await.is_err(), "same /64");
    }

    pub async fn failing_on_purpose_does_not_lock_the_user_out(l: &dyn RateLimiter) {
        // The user logs in from home once.
        assert!(l.login("alice", ip("10.0.0.1")).await.is_ok());
        l.login_succeeded("alice", ip("10.0.0.1")).await;
        // An attacker tries from many addresses: each pair would get 3, but together they
        // share the username's budget of 4, of which home's first login (not yet known then)
        // spent one.
        let mut refused = 0;
        for i in 0..20 {
            let a = ip(&format!("192.0.2.{i}"));
            for _ in 0..3 {
                if l.login("alice", a).await.is_err() {
                    refused += 1;
                }
            }
        }
        assert_eq!(refused, 60 - 3, "only the shared budget got through");
        // Home still gets in, until its own pair budget is spent.
        assert!(l.login("alice", ip("10.0.0.1")).await.is_ok());
        assert!(l.login("alice", ip("10.0.0.1")).await.is_ok());
        assert!(
            l.login("alice", ip("10.0.0.1")).await.is_err(),
            "3 a minute per pair"
        );
        // Another user is not affected by alice's attack from the same addresses.
        assert!(l.login("bob", ip("192.0.2.1")).await.is_ok());
    }

    pub async fn one_address_cannot_spray_usernames(l: &dyn RateLimiter) {
        let a = ip("198.51.100.9");
        let mut ok = 0;
        for i in 0..20 {
            if l.login(&format!("user{i}"), a).await.is_ok() {
                ok += 1;
            }
        }
        assert_eq!(ok, 6);
    }

    pub async fn turn_credentials_per_user(l: &dyn RateLimiter) {
        assert!(l.turn(5).await.is_ok());
        assert!(l.turn(5).await.is_ok());
        let wait = l.turn(5).await.expect_err("third in an hour");
        assert!(wait > Duration::from_secs(60), "{wait:?}");
        assert!(l.turn(6).await.is_ok(), "per user");
    }

    pub async fn sends_have_a_burst_then_a_rate(l: &dyn RateLimiter) {
        assert_eq!(l.sends(7, 2).await, (2, None));
        let (allowed, wait) = l.sends(7, 5).await;
        assert_eq!(allowed, 1, "the burst of 3 is spent");
        let wait = wait.expect("a wait");
        assert!(wait <= Duration::from_secs(1), "{wait:?}");
        assert_eq!(l.sends(7, 1).await.0, 0);
        assert_eq!(l.sends(8, 1).await, (1, None), "per device");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[tokio::test]
    async fn registrations_per_address_and_per_64() {
        scenarios::registrations_per_address_and_per_64(&RateLimits::new(&scenarios::config()))
            .await;
    }

    #[tokio::test]
    async fn failing_on_purpose_does_not_lock_the_user_out() {
        let l = RateLimits::new(&scenarios::config());
        scenarios::failing_on_purpose_does_not_lock_the_user_out(&l).await;
    }

    #[tokio::test]
    async fn one_address_cannot_spray_usernames() {
        scenarios::one_address_cannot_spray_usernames(&RateLimits::new(&scenarios::config())).await;
    }

    #[tokio::test]
    async fn sends_have_a_burst_then_a_rate() {
        scenarios::sends_have_a_burst_then_a_rate(&RateLimits::new(&scenarios::config())).await;
    }

    #[tokio::test]
    async fn turn_credentials_per_user() {
        scenarios::turn_credentials_per_user(&RateLimits::new(&scenarios::config())).await;
    }

    #[test]
    fn limits_of_zero_are_off() {
        let off = RateLimits::new(&Config {
            sends_per_second: 0,
            registrations_per_hour_per_address: 0,
            ..Config::default()
        });
        assert!(
            (0..10_000).all(|_| off.send(7).is_ok() && off.registration(ip("10.0.0.1")).is_ok())
        );
    }
}
