//! The blocking half of media: reading and writing files (with `tern-crypto` in between) on
//! tokio's blocking pool, reporting progress through a `watch` channel. Buffers are 64 KiB;
//! nothing holds a whole file.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use tern_crypto::media::{self as crypto, DecryptedMedia, EncryptedMedia, MediaKey};
use tokio::sync::watch;

use super::MediaError;
use super::kind::{self, ImageInfo};
use crate::error::Error;
use crate::store::SourceKey;

const BUF: usize = 64 * 1024;
/// Progress is published at most once per this many bytes.
const REPORT_EVERY: u64 = 256 * 1024;

/// Progress from a blocking task; also tells it when nobody waits for it any more.
pub(crate) struct Tick(pub watch::Sender<u64>);

impl Tick {
    fn set(&self, done: u64) {
        self.0.send_replace(done);
    }

    /// The caller's future was dropped: stop.
    fn cancelled(&self) -> bool {
        self.0.is_closed()
    }
}

/// A reader that counts what passes through it into a [`Tick`], and fails once cancelled.
struct Counted<'a, R> {
    inner: R,
    tick: &'a Tick,
    done: u64,
    reported: u64,
}

impl<'a, R> Counted<'a, R> {
    fn new(inner: R, tick: &'a Tick) -> Self {
        Counted {
            inner,
            tick,
            done: 0,
            reported: 0,
        }
    }
}

impl<R: Read> Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.tick.cancelled() {
            // Not `Interrupted`: that one would be retried.
            return Err(io::Error::other("cancelled"));
        }
        let n = self.inner.read(buf)?;
        self.done += n as u64;
        if self.done - self.reported >= REPORT_EVERY || n == 0 {
            self.reported = self.done;
            self.tick.set(self.done);
        }
        Ok(n)
    }
}

fn file_error(path: &Path, error: io::Error) -> Error {
    Error::Media(MediaError::File {
        path: path.to_owned(),
        error,
    })
}

/// What identifies a source file's content without reading it.
pub(crate) fn source_key(path: &Path) -> Result<SourceKey, Error> {
    let canonical = fs::canonicalize(path).map_err(|e| file_error(path, e))?;
    let meta = fs::metadata(&canonical).map_err(|e| file_error(path, e))?;
    if !meta.is_file() {
        return Err(Error::Invalid(format!("{} is not a file", path.display())));
    }
    let mtime_ns = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .and_then(|d| i64::try_from(d.as_nanos()).ok())
        .unwrap_or(0);
    Ok(SourceKey {
        path: canonical.to_string_lossy().into_owned(),
        size: meta.len(),
        mtime_ns,
    })
}

/// The MIME type and, for images, dimensions and thumbnail of a file.
pub(crate) fn inspect(path: &Path, file_name: &str) -> Result<(String, Option<ImageInfo>), Error> {
    let mut f = File::open(path).map_err(|e| file_error(path, e))?;
    let size = f.metadata().map_err(|e| file_error(path, e))?.len();
    let mut head = Vec::with_capacity(16);
    (&mut f)
        .take(16)
        .read_to_end(&mut head)
        .map_err(|e| file_error(path, e))?;
    let mime = kind::mime_type(&head, file_name);
    f.rewind().map_err(|e| file_error(path, e))?;
    Ok((mime.to_owned(), kind::image_info(f, mime, size)))
}

/// Encrypts `source` into a new file `dest` (fsynced), reporting plaintext bytes read.
pub(crate) fn encrypt_file(
    source: &Path,
    dest: &Path,
    tick: &Tick,
) -> Result<EncryptedMedia, Error> {
    let input = File::open(source).map_err(|e| file_error(source, e))?;
    let output = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dest)
        .map_err(|e| file_error(dest, e))?;
    let result = (|| {
        let reader = Counted::new(BufReader::with_capacity(BUF, input), tick);
        let mut writer = BufWriter::with_capacity(BUF, output);
        let enc = crypto::encrypt(reader, &mut writer).map_err(|e| match e {
            crypto::MediaError::Io(io) => file_error(source, io),
            other => Error::Media(MediaError::Crypto(other)),
        })?;
        let file = writer
            .into_inner()
            .map_err(|e| file_error(dest, e.into_error()))?;
        file.sync_all().map_err(|e| file_error(dest, e))?;
        Ok(enc)
    })();
    if result.is_err() {
        let _ = fs::remove_file(dest);
    }
    result
}

/// The SHA-256 of `len` bytes of `path` from `offset` (a tus chunk's checksum).
pub(crate) fn hash_range(path: &Path, offset: u64, len: u64) -> Result<[u8; 32], Error> {
    let mut f = File::open(path).map_err(|e| file_error(path, e))?;
    f.seek(SeekFrom::Start(offset))
        .map_err(|e| file_error(path, e))?;
    let mut reader = f.take(len);
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; BUF];
    let mut read = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(file_error(path, e)),
        };
        hash.update(&buf[..n]);
        read += n as u64;
    }
    if read != len {
        return Err(file_error(
            path,
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "encrypted copy is shorter than recorded",
            ),
        ));
    }
    Ok(hash.finalize().into())
}

/// What [`decrypt_file`] checks beyond the ciphertext itself.
pub(crate) struct Expected {
    pub id: String,
    pub key: MediaKey,
    /// From the message; empty if the sender left it out.
    pub plaintext_sha256: Vec<u8>,
    pub size: u64,
}

/// Decrypts `part` into `out`, through a temporary file beside `out` that is renamed only once
/// everything verified: the ciphertext hashes to the id, every chunk authenticates, and the
/// plaintext matches the message's hash and size. Reports ciphertext bytes read. On failure
/// no plaintext is left behind.
pub(crate) fn decrypt_file(
    part: &Path,
    out: &Path,
    expected: &Expected,
    tick: &Tick,
) -> Result<DecryptedMedia, Error> {
    let tmp = temp_beside(out)?;
    let input = File::open(part).map_err(|e| file_error(part, e))?;
    let output = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|e| file_error(&tmp, e))?;
    let result = (|| {
        let reader = Counted::new(BufReader::with_capacity(BUF, input), tick);
        let mut writer = BufWriter::with_capacity(BUF, output);
        let dec = crypto::decrypt(reader, &mut writer, &expected.key, Some(&expected.id)).map_err(
            |e| match e {
                crypto::MediaError::Io(io) => file_error(&tmp, io),
                other => Error::Media(MediaError::Tampered(other.to_string())),
            },
        )?;
        if !expected.plaintext_sha256.is_empty()
            && (expected.plaintext_sha256 != dec.plaintext_sha256 || expected.size != dec.size)
        {
            return Err(Error::Media(MediaError::Tampered(
                "the decrypted file does not match the hash and size in the message".into(),
            )));
        }
        let file = writer
            .into_inner()
            .map_err(|e| file_error(&tmp, e.into_error()))?;
        file.sync_all().map_err(|e| file_error(&tmp, e))?;
        fs::rename(&tmp, out).map_err(|e| file_error(out, e))?;
        Ok(dec)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// A fresh hidden file name in `path`'s directory (a rename from it is atomic).
fn temp_beside(path: &Path) -> Result<PathBuf, Error> {
    let name = path
        .file_name()
        .ok_or_else(|| Error::Invalid(format!("{} is not a file path", path.display())))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let tag = hex::encode(rand::random::<[u8; 6]>());
    Ok(dir.join(format!(".{}.{tag}.tern-tmp", name.to_string_lossy())))
}

/// Removes files in `dir` with extension `ext` not in `keep` and unmodified for `older_than`
/// (a file being written is never that old). At most `max` entries are looked at.
pub(crate) fn sweep(dir: &Path, ext: &str, keep: &[String], older_than: Duration, max: usize) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let now = SystemTime::now();
    for entry in entries.flatten().take(max) {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some(ext) {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        if keep.contains(&name) {
            continue;
        }
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| now.duration_since(t).ok())
            .is_some_and(|age| age >= older_than);
        if old {
            tracing::debug!(file = %path.display(), "removing a stale media file");
            let _ = fs::remove_file(&path);
        }
    }
}

/// The length of a file, 0 if it does not exist.
pub(crate) fn len_or_zero(path: &Path) -> Result<u64, Error> {
    match fs::metadata(path) {
        Ok(m) => Ok(m.len()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(file_error(path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tick() -> (Tick, watch::Receiver<u64>) {
        let (tx, rx) = watch::channel(0);
        (Tick(tx), rx)
    }

    #[test]
    fn encrypted_copies_decrypt_to_the_original_through_a_temp_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let source = dir.path().join("in.bin");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        fs::write(&source, &data).expect("write");
        let (t, rx) = tick();
        let enc_path = dir.path().join("x.trnm");
        let enc = encrypt_file(&source, &enc_path, &t).expect("encrypt");
        assert_eq!(*rx.borrow(), data.len() as u64, "progress reached the end");
        assert_eq!(len_or_zero(&enc_path).expect("len"), enc.encrypted_size);

        let out = dir.path().join("out.bin");
        let expected = Expected {
            id: enc.id_hex.clone(),
            key: enc.key.clone(),
            plaintext_sha256: enc.plaintext_sha256.to_vec(),
            size: enc.size,
        };
        let dec = decrypt_file(&enc_path, &out, &expected, &t).expect("decrypt");
        assert_eq!(dec.size, data.len() as u64);
        assert_eq!(fs::read(&out).expect("read"), data);
        let names: Vec<_> = fs::read_dir(dir.path())
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert!(!names.iter().any(|n| n.ends_with(".tern-tmp")), "{names:?}");

        // The chunk checksum of a range is the SHA-256 of those bytes.
        let cipher = fs::read(&enc_path).expect("read");
        let want: [u8; 32] = Sha256::digest(&cipher[100..5000]).into();
        assert_eq!(hash_range(&enc_path, 100, 4900).expect("hash"), want);
        assert!(hash_range(&enc_path, cipher.len() as u64 - 10, 20).is_err());
    }

    #[test]
    fn a_tampered_download_leaves_no_plaintext() {
        let dir = tempfile::tempdir().expect("tempdir");
        let source = dir.path().join("in.bin");
        fs::write(&source, vec![42u8; 100_000]).expect("write");
        let (t, _rx) = tick();
        let enc_path = dir.path().join("x.trnm");
        let enc = encrypt_file(&source, &enc_path, &t).expect("encrypt");
        let good = Expected {
            id: enc.id_hex.clone(),
            key: enc.key.clone(),
            plaintext_sha256: enc.plaintext_sha256.to_vec(),
            size: enc.size,
        };
        let out = dir.path().join("out.bin");

        // A flipped byte late in the file: the first chunk was already written to the temp.
        let mut bytes = fs::read(&enc_path).expect("read");
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        let bad = dir.path().join("bad.trnm");
        fs::write(&bad, &bytes).expect("write");
        let cases: [(&Path, Expected); 3] = [
            (&bad, good_clone(&good)),
            // Right ciphertext, but the message claims other plaintext.
            (
                &enc_path,
                Expected {
                    plaintext_sha256: vec![0; 32],
                    ..good_clone(&good)
                },
            ),
            // Right ciphertext, another id.
            (
                &enc_path,
                Expected {
                    id: "00".repeat(32),
                    ..good_clone(&good)
                },
            ),
        ];
        for (part, expected) in cases {
            match decrypt_file(part, &out, &expected, &t) {
                Err(Error::Media(MediaError::Tampered(_))) => {}
                other => panic!("unexpected {other:?}"),
            }
            let left: Vec<_> = fs::read_dir(dir.path())
                .expect("dir")
                .map(|e| e.expect("entry").file_name())
                .collect();
            assert_eq!(left.len(), 3, "only in, x and bad remain: {left:?}");
            assert!(!out.exists());
        }
    }

    fn good_clone(e: &Expected) -> Expected {
        Expected {
            id: e.id.clone(),
            key: e.key.clone(),
            plaintext_sha256: e.plaintext_sha256.clone(),
            size: e.size,
        }
    }

    #[test]
    fn a_dropped_caller_cancels_the_work() {
        let dir = tempfile::tempdir().expect("tempdir");
        let source = dir.path().join("in.bin");
        fs::write(&source, vec![1u8; 1_000_000]).expect("write");
        let (t, rx) = tick();
        drop(rx);
        let dest = dir.path().join("x.trnm");
        assert!(encrypt_file(&source, &dest, &t).is_err());
        assert!(!dest.exists(), "a cancelled copy is removed");
    }

    #[test]
    fn sweeping_spares_known_and_recent_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        for name in ["keep.trnm", "orphan.trnm", "other.part"] {
            fs::write(dir.path().join(name), b"x").expect("write");
        }
        sweep(
            dir.path(),
            "trnm",
            &["keep.trnm".into()],
            Duration::from_secs(3600),
            100,
        );
        assert!(dir.path().join("orphan.trnm").exists(), "recent files stay");
        sweep(
            dir.path(),
            "trnm",
            &["keep.trnm".into()],
            Duration::ZERO,
            100,
        );
        assert!(!dir.path().join("orphan.trnm").exists());
        assert!(dir.path().join("keep.trnm").exists());
        assert!(dir.path().join("other.part").exists(), "other kinds stay");
    }

    #[test]
    fn sources_are_keyed_by_canonical_path_size_and_mtime() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.txt");
        fs::write(&path, b"hello").expect("write");
        let k = source_key(&path).expect("key");
        assert_eq!(k.size, 5);
        let via_dots = dir.path().join(".").join("a.txt");
        assert_eq!(source_key(&via_dots).expect("key"), k);
        assert!(source_key(dir.path()).is_err(), "a directory is not a file");
        assert!(matches!(
            source_key(&dir.path().join("missing")),
            Err(Error::Media(MediaError::File { .. }))
        ));
    }
}
