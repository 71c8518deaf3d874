use sha2::{Digest, Sha256};

use super::*;

const C: usize = CHUNK_SIZE;
const SEALED: usize = CHUNK_SIZE + TAG_LEN;

/// Deterministic, non-repeating test data.
fn data(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_u32;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

fn seal(plain: &[u8]) -> (EncryptedMedia, Vec<u8>) {
    let mut out = Vec::new();
    let e = encrypt(plain, &mut out).expect("encrypt");
    (e, out)
}

fn open(cipher: &[u8], key: &MediaKey, id: Option<&str>) -> Result<Vec<u8>, MediaError> {
    let mut out = Vec::new();
    decrypt(cipher, &mut out, key, id)?;
    Ok(out)
}

/// Where chunk `i` starts in the ciphertext.
fn chunk_at(i: usize) -> usize {
    HEADER_LEN + i * SEALED
}

#[test]
fn round_trips_at_chunk_boundaries() {
    for len in [0, 1, C - 1, C, C + 1, 3 * C + 5] {
        let plain = data(len);
        let (e, cipher) = seal(&plain);
        assert_eq!(e.size, len as u64);
        assert_eq!(e.encrypted_size, cipher.len() as u64, "{len}");
        assert_eq!(encrypted_len(len as u64), cipher.len() as u64, "{len}");
        assert_eq!(e.id_hex, hex::encode(Sha256::digest(&cipher)));
        assert_eq!(e.plaintext_sha256, <[u8; 32]>::from(Sha256::digest(&plain)));
        let mut out = Vec::new();
        let d = decrypt(&cipher[..], &mut out, &e.key, Some(&e.id_hex)).expect("decrypt");
        assert_eq!(out, plain, "{len}");
        assert_eq!(d.size, len as u64);
        assert_eq!(d.plaintext_sha256, e.plaintext_sha256);
    }
}

#[test]
fn layout_is_the_documented_one() {
    let (_, empty) = seal(&[]);
    // An empty file is the header and one tag (the last chunk, empty).
    assert_eq!(empty.len(), HEADER_LEN + TAG_LEN);
    assert_eq!(&empty[..4], b"TRNM");
    assert_eq!(empty[4], 1);
    assert_eq!(&empty[5..9], &65536u32.to_be_bytes());
    assert_eq!(encrypted_len(0), 44);
    assert_eq!(encrypted_len(65536), 28 + 65536 + 16);
    assert_eq!(encrypted_len(65537), 28 + 65537 + 32);
    assert_eq!(encrypted_len(3 * 65536 + 5), 28 + 3 * 65536 + 5 + 64);
    // Exactly one chunk of plaintext is one (last) chunk.
    let (_, one) = seal(&data(C));
    assert_eq!(one.len(), HEADER_LEN + SEALED);
}

#[test]
fn every_file_gets_a_fresh_key_and_nonce() {
    let plain = data(100);
    let (a, ca) = seal(&plain);
    let (b, cb) = seal(&plain);
    assert_ne!(a.key, b.key);
    assert_ne!(ca[9..HEADER_LEN], cb[9..HEADER_LEN]);
    assert_ne!(a.id_hex, b.id_hex);
    assert_eq!(a.plaintext_sha256, b.plaintext_sha256);
}

#[test]
fn key_never_shows_in_debug() {
    let (e, _) = seal(b"secret");
    let key_hex = hex::encode(e.key.as_bytes());
    let shown = format!("{e:?}");
    assert!(shown.contains("redacted"));
    assert!(!shown.contains(&key_hex));
    assert!(!shown.contains(&format!("{:?}", e.key.as_bytes())));
}

#[test]
fn flipped_bytes_are_detected() {
    let plain = data(2 * C + 100);
    let (e, cipher) = seal(&plain);
    let flip = |at: usize| {
        let mut c = cipher.clone();
        c[at] ^= 0x01;
        open(&c, &e.key, None)
    };
    assert!(matches!(flip(0), Err(MediaError::BadMagic)));
    assert!(matches!(flip(4), Err(MediaError::UnsupportedVersion(0))));
    assert!(matches!(flip(7), Err(MediaError::BadChunkSize(_))));
    // The nonce prefix (header, associated data): the first chunk fails.
    assert!(matches!(
        flip(HEADER_LEN - 1),
        Err(MediaError::Tampered { chunk: 0 })
    ));
    // Ciphertext bodies and tags of the first, a middle and the last chunk.
    assert!(matches!(
        flip(HEADER_LEN),
        Err(MediaError::Tampered { chunk: 0 })
    ));
    assert!(matches!(
        flip(chunk_at(1) + C + 3),
        Err(MediaError::Tampered { chunk: 1 })
    ));
    assert!(matches!(
        flip(chunk_at(2) + 50),
        Err(MediaError::Tampered { chunk: 2 })
    ));
    assert!(matches!(
        flip(cipher.len() - 1),
        Err(MediaError::Tampered { chunk: 2 })
    ));
}

#[test]
fn truncation_is_detected() {
    for len in [0, 5, C, 3 * C + 5] {
        let (e, cipher) = seal(&data(len));
        // By one byte: the last chunk fails (or, for an empty file, nothing is left of it
        // but an incomplete tag).
        let short = open(&cipher[..cipher.len() - 1], &e.key, None);
        assert!(
            matches!(
                short,
                Err(MediaError::Tampered { .. } | MediaError::Truncated)
            ),
            "{len}: {short:?}"
        );
        // Header only, and less than a header.
        assert!(matches!(
            open(&cipher[..HEADER_LEN], &e.key, None),
            Err(MediaError::Truncated)
        ));
        assert!(matches!(
            open(&cipher[..10], &e.key, None),
            Err(MediaError::Truncated)
        ));
        assert!(matches!(
            open(&[], &e.key, None),
            Err(MediaError::Truncated)
        ));
    }
    // By a whole chunk: what is left ends with a good chunk that was not sealed as the last.
    let (e, cipher) = seal(&data(3 * C + 5));
    assert!(matches!(
        open(&cipher[..chunk_at(3)], &e.key, None),
        Err(MediaError::Truncated)
    ));
    assert!(matches!(
        open(&cipher[..chunk_at(1)], &e.key, None),
        Err(MediaError::Truncated)
    ));
    // And by the whole last chunk plus one byte.
    assert!(matches!(
        open(&cipher[..chunk_at(3) - 1], &e.key, None),
        Err(MediaError::Tampered { chunk: 2 })
    ));
}

#[test]
fn dropped_and_swapped_chunks_are_detected() {
    let (e, cipher) = seal(&data(3 * C + 5));
    let chunk = |i: usize| &cipher[chunk_at(i)..(chunk_at(i) + SEALED).min(cipher.len())];
    let join = |order: &[usize]| {
        let mut c = cipher[..HEADER_LEN].to_vec();
        for i in order {
            c.extend_from_slice(chunk(*i));
        }
        c
    };
    assert_eq!(join(&[0, 1, 2, 3]), cipher);
    for (order, at) in [
        (&[0, 2, 3][..], 1),    // a middle chunk dropped
        (&[1, 2, 3][..], 0),    // the first dropped
        (&[1, 0, 2, 3][..], 0), // swapped
        (&[0, 2, 1, 3][..], 1),
        (&[0, 1, 3, 2][..], 2),    // the last moved before another
        (&[0, 0, 1, 2, 3][..], 1), // a chunk repeated
    ] {
        let got = open(&join(order), &e.key, None);
        assert!(
            matches!(got, Err(MediaError::Tampered { chunk }) if chunk == at),
            "{order:?}: {got:?}"
        );
    }
}

#[test]
fn trailing_bytes_are_refused() {
    // The last chunk is full: it authenticates as the last, and something follows.
    for len in [0, C, 2 * C] {
        let (e, mut cipher) = seal(&data(len));
        if len == 0 {
            // A short last chunk with bytes after it reads as one longer chunk.
            cipher.extend_from_slice(b"xyz");
            assert!(matches!(
                open(&cipher, &e.key, None),
                Err(MediaError::Tampered { chunk: 0 })
            ));
            continue;
        }
        cipher.push(0);
        let got = open(&cipher, &e.key, None);
        assert!(
            matches!(got, Err(MediaError::TrailingData)),
            "{len}: {got:?}"
        );
    }
    // A partial last chunk followed by junk: that chunk no longer authenticates.
    let (e, mut cipher) = seal(&data(3 * C + 5));
    cipher.extend_from_slice(&[1, 2, 3]);
    assert!(matches!(
        open(&cipher, &e.key, None),
        Err(MediaError::Tampered { chunk: 3 })
    ));
    // A whole sealed chunk appended after the end (from another position of the stream).
    let (e, cipher) = seal(&data(C));
    let mut longer = cipher.clone();
    longer.extend_from_slice(&cipher[HEADER_LEN..]);
    assert!(matches!(
        open(&longer, &e.key, None),
        Err(MediaError::TrailingData)
    ));
}

#[test]
fn wrong_key_and_wrong_id_are_refused() {
    let plain = data(C + 7);
    let (e, cipher) = seal(&plain);
    let (other, _) = seal(&plain);
    assert!(matches!(
        open(&cipher, &other.key, None),
        Err(MediaError::Tampered { chunk: 0 })
    ));
    let wrong = "00".repeat(32);
    match open(&cipher, &e.key, Some(&wrong)) {
        Err(MediaError::IdMismatch { expected, actual }) => {
            assert_eq!(expected, wrong);
            assert_eq!(actual, e.id_hex);
        }
        other => panic!("unexpected {other:?}"),
    }
    // The id is compared case-insensitively (it is hex).
    let upper = e.id_hex.to_ascii_uppercase();
    assert_eq!(open(&cipher, &e.key, Some(&upper)).expect("decrypt"), plain);
}

#[test]
fn keys_are_32_bytes() {
    assert!(matches!(
        MediaKey::from_slice(&[0; 31]),
        Err(MediaError::InvalidKey(31))
    ));
    let k = MediaKey::from_slice(&[7; 32]).expect("key");
    assert_eq!(k, MediaKey::from_bytes([7; 32]));
    assert_eq!(format!("{k:?}"), "MediaKey(<redacted>)");
}

/// A reader that hands out at most `step` bytes per call, to exercise short reads.
struct Trickle<'a> {
    data: &'a [u8],
    step: usize,
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.step.min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

#[test]
fn short_reads_do_not_change_the_chunking() {
    let plain = data(2 * C + 3);
    let mut cipher = Vec::new();
    let e = encrypt(
        Trickle {
            data: &plain,
            step: 1000,
        },
        &mut cipher,
    )
    .expect("encrypt");
    assert_eq!(cipher.len() as u64, encrypted_len(plain.len() as u64));
    let mut out = Vec::new();
    decrypt(
        Trickle {
            data: &cipher,
            step: 777,
        },
        &mut out,
        &e.key,
        Some(&e.id_hex),
    )
    .expect("decrypt");
    assert_eq!(out, plain);
}
