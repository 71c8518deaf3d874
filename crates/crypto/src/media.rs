//! Media encryption (PROTOCOL.md §8.4).
//!
//! ```text
//! "TRNM" | version (1) | chunk size (u32 BE, 65536) | nonce prefix (19 bytes)
//!        | chunk 0 | chunk 1 | ... | last chunk
//! ```
//!
//! A fresh random 32-byte key and nonce prefix per file; XChaCha20-Poly1305 in RustCrypto's
//! STREAM (`EncryptorBE32`: nonce = prefix | u32 BE counter | last-chunk flag). Every chunk
//! but the last holds exactly [`CHUNK_SIZE`] plaintext bytes plus a 16-byte tag; the last
//! holds `0..=CHUNK_SIZE` bytes and is sealed as the last, so an empty file is the header and
//! one tag. The 28-byte header is the associated data of every chunk. The media id is the
//! lowercase hex SHA-256 of all the ciphertext, header included.
//!
//! Both directions stream: memory is two chunk buffers whatever the file size.

use std::io::{self, Read, Write};

use aead_stream::{EncryptorBE32, NewStream, StreamBE32, StreamPrimitive};
use chacha20poly1305::XChaCha20Poly1305;
use chacha20poly1305::aead::array::Array;
use chacha20poly1305::aead::{Generate, Key};
use sha2::{Digest, Sha256};

pub const MAGIC: [u8; 4] = *b"TRNM";
pub const FORMAT_VERSION: u8 = 1;
/// Plaintext bytes per chunk (every chunk but the last is exactly this long).
pub const CHUNK_SIZE: usize = 64 * 1024;
pub const TAG_LEN: usize = 16;
pub const KEY_LEN: usize = 32;
pub const NONCE_PREFIX_LEN: usize = 19;
/// Magic, version, chunk size, nonce prefix.
pub const HEADER_LEN: usize = 4 + 1 + 4 + NONCE_PREFIX_LEN;

const CHUNK_SIZE_U32: u32 = CHUNK_SIZE as u32;
const SEALED_CHUNK: usize = CHUNK_SIZE + TAG_LEN;

/// Why a file could not be encrypted or decrypted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MediaError {
    /// Reading the input or writing the output failed.
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    /// The system's random number generator failed.
    #[error("no randomness available: {0}")]
    Random(String),
    #[error("not a tern media file (bad magic)")]
    BadMagic,
    #[error("media format version {0} is not supported")]
    UnsupportedVersion(u8),
    #[error("chunk size {0} is not supported (expected {CHUNK_SIZE})")]
    BadChunkSize(u32),
    /// The ciphertext ends before its last chunk (cut short, or the last chunk dropped).
    #[error("media is truncated")]
    Truncated,
    /// A chunk failed authentication: altered, reordered, dropped, or the wrong key.
    #[error("media chunk {chunk} failed authentication (tampered, or the wrong key)")]
    Tampered { chunk: u64 },
    /// Bytes follow the chunk sealed as the last one.
    #[error("unexpected data after the last chunk")]
    TrailingData,
    /// The ciphertext does not hash to the expected media id.
    #[error("media hashes to {actual}, expected {expected}")]
    IdMismatch { expected: String, actual: String },
    /// A key of the wrong length.
    #[error("a media key is {KEY_LEN} bytes, got {0}")]
    InvalidKey(usize),
    /// More chunks than the 32-bit STREAM counter allows (256 TiB).
    #[error("file too large to encrypt")]
    TooLarge,
}

/// A 32-byte media key. `Debug` does not print it.
#[derive(Clone, PartialEq, Eq)]
pub struct MediaKey([u8; KEY_LEN]);

impl MediaKey {
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> MediaKey {
        MediaKey(bytes)
    }

    /// A key from a slice (e.g. `MediaRef.key`); [`MediaError::InvalidKey`] unless 32 bytes.
    pub fn from_slice(bytes: &[u8]) -> Result<MediaKey, MediaError> {
        <[u8; KEY_LEN]>::try_from(bytes)
            .map(MediaKey)
            .map_err(|_| MediaError::InvalidKey(bytes.len()))
    }

    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    fn aead_key(&self) -> Key<XChaCha20Poly1305> {
        Array(self.0)
    }
}

impl std::fmt::Debug for MediaKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MediaKey(<redacted>)")
    }
}

/// The outcome of [`encrypt`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncryptedMedia {
    pub key: MediaKey,
    /// Lowercase hex SHA-256 of every ciphertext byte written: the media id.
    pub id_hex: String,
    pub plaintext_sha256: [u8; 32],
    /// Plaintext bytes read.
    pub size: u64,
    /// Ciphertext bytes written (= [`encrypted_len`]`(size)`).
    pub encrypted_size: u64,
}

/// The outcome of [`decrypt`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecryptedMedia {
    pub plaintext_sha256: [u8; 32],
    /// Plaintext bytes written.
    pub size: u64,
}

/// The ciphertext length of a plaintext of `plaintext_len` bytes: header, plaintext, and one
/// tag per chunk (at least one: an empty file still has its last chunk).
pub fn encrypted_len(plaintext_len: u64) -> u64 {
    let chunk = CHUNK_SIZE as u64;
    let chunks = plaintext_len.div_ceil(chunk).max(1);
    HEADER_LEN as u64 + plaintext_len + chunks * TAG_LEN as u64
}

fn header(nonce_prefix: &[u8; NONCE_PREFIX_LEN]) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(&MAGIC);
    h[4] = FORMAT_VERSION;
    h[5..9].copy_from_slice(&CHUNK_SIZE_U32.to_be_bytes());
    h[9..].copy_from_slice(nonce_prefix);
    h
}

/// Reads until `buf` holds `want` bytes or the input ends; returns how many it holds.
fn fill(reader: &mut dyn Read, buf: &mut Vec<u8>, want: usize) -> io::Result<usize> {
    buf.clear();
    // `read_to_end` retries on `Interrupted`; `take` bounds it to one chunk.
    reader.take(want as u64).read_to_end(buf)
}

/// Writes and hashes the ciphertext.
struct HashingWriter<W> {
    inner: W,
    hash: Sha256,
    written: u64,
}

impl<W: Write> HashingWriter<W> {
    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.inner.write_all(bytes)?;
        self.hash.update(bytes);
        self.written += bytes.len() as u64;
        Ok(())
    }
}

/// Encrypts everything `reader` yields into `writer` under a fresh random key and nonce
/// prefix, in [`CHUNK_SIZE`] chunks. `writer` is flushed at the end.
pub fn encrypt<R: Read, W: Write>(
    mut reader: R,
    mut writer: W,
) -> Result<EncryptedMedia, MediaError> {
    encrypt_dyn(&mut reader, &mut writer)
}

/// The work of [`encrypt`], not generic: compiled (and optimised) once, here, rather than in
/// every caller.
fn encrypt_dyn(
    reader: &mut dyn Read,
    writer: &mut dyn Write,
) -> Result<EncryptedMedia, MediaError> {
    let key =
        Key::<XChaCha20Poly1305>::try_generate().map_err(|e| MediaError::Random(e.to_string()))?;
    let prefix =
        <[u8; NONCE_PREFIX_LEN]>::try_generate().map_err(|e| MediaError::Random(e.to_string()))?;
    let header = header(&prefix);
    let mut encryptor = EncryptorBE32::<XChaCha20Poly1305>::new(&key, &Array::from(prefix));
    let mut out = HashingWriter {
        inner: writer,
        hash: Sha256::new(),
        written: 0,
    };
    let mut plain_hash = Sha256::new();
    let mut size = 0u64;
    out.put(&header)?;

    // One chunk of lookahead: a chunk is the last when nothing follows it.
    let mut current = Vec::with_capacity(SEALED_CHUNK);
    let mut next = Vec::with_capacity(SEALED_CHUNK);
    fill(reader, &mut current, CHUNK_SIZE)?;
    loop {
        plain_hash.update(&current);
        size += current.len() as u64;
        let last = current.len() < CHUNK_SIZE || fill(reader, &mut next, CHUNK_SIZE)? == 0;
        if last {
            encryptor
                .encrypt_last_in_place(&header, &mut current)
                .map_err(|_| MediaError::TooLarge)?;
            out.put(&current)?;
            break;
        }
        encryptor
            .encrypt_next_in_place(&header, &mut current)
            .map_err(|_| MediaError::TooLarge)?;
        out.put(&current)?;
        std::mem::swap(&mut current, &mut next);
    }
    out.inner.flush()?;
    Ok(EncryptedMedia {
        key: MediaKey(key.0),
        id_hex: hex::encode(out.hash.finalize()),
        plaintext_sha256: plain_hash.finalize().into(),
        size,
        encrypted_size: out.written,
    })
}

/// Decrypts a ciphertext from `reader` into `writer`, verifying every chunk as it goes and,
/// if `expected_id_hex` is given, that the whole ciphertext hashes to it.
///
/// Plaintext reaches `writer` chunk by chunk before the end is verified: on any error, the
/// caller must discard what was written (decrypt to a temporary file, rename on success).
pub fn decrypt<R: Read, W: Write>(
    mut reader: R,
    mut writer: W,
    key: &MediaKey,
    expected_id_hex: Option<&str>,
) -> Result<DecryptedMedia, MediaError> {
    decrypt_dyn(&mut reader, &mut writer, key, expected_id_hex)
}

/// The work of [`decrypt`], not generic (see [`encrypt_dyn`]).
fn decrypt_dyn(
    reader: &mut dyn Read,
    writer: &mut dyn Write,
    key: &MediaKey,
    expected_id_hex: Option<&str>,
) -> Result<DecryptedMedia, MediaError> {
    let mut cipher_hash = Sha256::new();
    let mut header = Vec::with_capacity(HEADER_LEN);
    if fill(reader, &mut header, HEADER_LEN)? < HEADER_LEN {
        return Err(if header.len() >= 4 && header[..4] != MAGIC {
            MediaError::BadMagic
        } else {
            MediaError::Truncated
        });
    }
    cipher_hash.update(&header);
    if header[..4] != MAGIC {
        return Err(MediaError::BadMagic);
    }
    if header[4] != FORMAT_VERSION {
        return Err(MediaError::UnsupportedVersion(header[4]));
    }
    let chunk_size = u32::from_be_bytes([header[5], header[6], header[7], header[8]]);
    if chunk_size != CHUNK_SIZE_U32 {
        return Err(MediaError::BadChunkSize(chunk_size));
    }
    let mut prefix = [0u8; NONCE_PREFIX_LEN];
    prefix.copy_from_slice(&header[9..]);
    let stream = StreamBE32::<XChaCha20Poly1305>::new(&key.aead_key(), &Array::from(prefix));

    let mut plain_hash = Sha256::new();
    let mut size = 0u64;
    let mut current = Vec::with_capacity(SEALED_CHUNK);
    let mut next = Vec::with_capacity(SEALED_CHUNK);
    fill(reader, &mut current, SEALED_CHUNK)?;
    let mut position: u32 = 0;
    loop {
        let chunk = u64::from(position);
        if current.len() < TAG_LEN {
            return Err(MediaError::Truncated);
        }
        cipher_hash.update(&current);
        // A full chunk followed by more data is not the last; anything else must be.
        let followed = current.len() == SEALED_CHUNK && fill(reader, &mut next, SEALED_CHUNK)? > 0;
        if followed {
            if stream
                .decrypt_in_place(position, false, &header, &mut current)
                .is_err()
            {
                // Sealed as the last, yet more follows: bytes appended after the end.
                return Err(
                    if stream
                        .decrypt_in_place(position, true, &header, &mut current)
                        .is_ok()
                    {
                        MediaError::TrailingData
                    } else {
                        MediaError::Tampered { chunk }
                    },
                );
            }
        } else if stream
            .decrypt_in_place(position, true, &header, &mut current)
            .is_err()
        {
            // A good chunk that is not the last: the ones after it are missing. (The buffer
            // is untouched by a failed attempt, so it can be tried again.)
            return Err(
                if stream
                    .decrypt_in_place(position, false, &header, &mut current)
                    .is_ok()
                {
                    MediaError::Truncated
                } else {
                    MediaError::Tampered { chunk }
                },
            );
        }
        writer.write_all(&current)?;
        plain_hash.update(&current);
        size += current.len() as u64;
        if !followed {
            break;
        }
        position = position.checked_add(1).ok_or(MediaError::TooLarge)?;
        std::mem::swap(&mut current, &mut next);
    }
    writer.flush()?;
    let actual = hex::encode(cipher_hash.finalize());
    if let Some(expected) = expected_id_hex
        && !expected.eq_ignore_ascii_case(&actual)
    {
        return Err(MediaError::IdMismatch {
            expected: expected.to_owned(),
            actual,
        });
    }
    Ok(DecryptedMedia {
        plaintext_sha256: plain_hash.finalize().into(),
        size,
    })
}

#[cfg(test)]
mod tests;
