//! `ternd`, the tern server, as a library: the binary in `main.rs` only parses flags and calls
//! [`run`]; tests start the same [`run`] on `127.0.0.1:0`.
//!
//! Layers, bottom to top:
//! - [`config`]: the one typed configuration (defaults, TOML file, environment, flags).
//! - [`error`]: the one place where failures become wire error codes and HTTP statuses.
//! - [`auth`]: password hashing (a bounded pool) and access tokens.
//! - [`ratelimit`]: sign-ups, logins and sends per address, user or device.
//! - [`net`]: the listener: connection bounds per address and in total, header timeouts.
//! - [`delivery`]: which connection holds which device (here and, through a directory, on
//!   other nodes), and the live hand-off of mailbox entries.
//! - [`cluster`]: the Redis directory and the NATS bus of cluster mode.
//! - [`services`]: messaging (send, ack, read) and presence (last seen), on top of the store
//!   and the delivery hub.
//! - [`media`]: media objects and resumable uploads: blob store, quotas, garbage collection.
//! - [`http`]: the JSON API under `/v1`, health and metrics.
//! - [`gateway`]: the WebSocket endpoint, one task per connection.
//! - [`app`]: the composition root that builds [`app::AppState`] and [`run`], the entry point.

pub mod app;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod delivery;
pub mod error;
pub mod gateway;
pub mod http;
pub mod media;
pub mod net;
pub mod push;
pub mod ratelimit;
pub mod services;

pub use app::{AppState, run};
pub use config::Config;
