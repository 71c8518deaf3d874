//! Client-side cryptography for tern. The server never depends on this crate.
//!
//! - [`media`]: encryption of media files before upload (PROTOCOL.md §8.4): XChaCha20-Poly1305
//!   in the STREAM construction, 64 KiB chunks, streamed through `std::io::Read`/`Write` in
//!   constant memory.

//! - [`olm`]: a device's Olm account (identity, one-time and fallback keys, all signed over
//!   statements naming the user and device) and pairwise sessions.
//! - [`megolm`]: group sessions, outbound with a rotation policy and inbound.
//! - [`safety`]: safety numbers for comparing identities out of band.
//! - [`pickle`]: the key that encrypts account and session state at rest (a key file or a
//!   passphrase through argon2id).
//!
//! Olm and Megolm are vodozemac's (audited); tern adds no cryptographic construction of its
//! own, only the signed statements and the plumbing around them.

mod error;
pub mod media;
pub mod megolm;
pub mod olm;
pub mod pickle;
pub mod safety;

pub use error::CryptoError;
