//! Wire types of tern, shared by the server, the SDK and any other client. No I/O.
//!
//! - [`frames`]: the protobuf frames exchanged on the WebSocket (`/v1/ws`), one frame per binary
//!   WebSocket message. Hand-written `prost` structs; `PROTOCOL.md` shows the same schema as
//!   `.proto` text for implementers in other languages.
//! - [`content`]: message bodies between SDKs (`Content`: a text or a media reference).
//! - [`e2ee`]: the end-to-end encryption envelopes those bodies travel in, and their payloads.
//! - [`http`]: the JSON bodies of the HTTP API under `/v1/`.
//! - [`error`]: the one list of error codes used on the socket and over HTTP alike.
//! - [`limits`]: protocol constants and the default limits every size is checked against.
//! - [`validate`]: pure checks of user input (usernames, passwords, frames) shared by both ends.

pub mod content;
pub mod e2ee;
pub mod error;
pub mod frames;
pub mod http;
pub mod limits;
pub mod validate;

pub use error::ErrorCode;
pub use limits::{Limits, PROTOCOL_VERSION};
