//! One module per scenario. Each creates its own accounts on the target (names prefixed with the
//! scenario and a run id, so that runs against one server do not collide), measures, and
//! returns its result as JSON plus a human summary.

pub mod connect;
pub mod drain;
pub mod fanout;
pub mod latency;
pub mod media;
pub mod push;
pub mod throughput;

/// A short id making this run's usernames unique.
pub fn run_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{:x}", nanos % 0xfffff)
}
