//! What end-to-end cryptography can fail with. Every failure is a value: a bad key, signature
//! or ciphertext from the network never panics.

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CryptoError {
    #[error("malformed {0}")]
    Malformed(&'static str),
    #[error("the signature of {0} does not verify")]
    BadSignature(&'static str),
    #[error("cannot create an Olm session: {0}")]
    Session(String),
    #[error("cannot decrypt: {0}")]
    Decrypt(String),
    #[error("cannot encrypt: {0}")]
    Encrypt(String),
    #[error(
        "the group message is from before this device received the session (index {index}, first known {first_known})"
    )]
    UnknownMessageIndex { index: u32, first_known: u32 },
    #[error("cannot unpickle {0}: wrong key or corrupted state")]
    Unpickle(&'static str),
    #[error("key derivation failed: {0}")]
    Kdf(String),
}
