//! Client-side cryptography for tern. The server never depends on this crate.
