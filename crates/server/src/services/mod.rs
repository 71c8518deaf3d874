//! Services: the messenger's behaviour on top of the store (truth) and the delivery hub (fast path).
//! They take time from a [`Clock`] so that tests and the decision logic need no OS clock.

pub mod accounts;
pub mod calls;
pub mod groups;
pub mod keys;
pub mod messaging;
pub mod presence;
pub mod push;
pub mod pusher;

/// Milliseconds since the Unix epoch.
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> i64;
}

/// The OS clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
    }
}
