//! Files being sent (`media_uploads`, migration 3): the bookkeeping that lets a send resume
//! where it stopped. A row is written once the encrypted copy is complete, gets the tus URL
//! when the upload is created and `uploaded` when the object is on the server, and is deleted
//! in the same transaction that puts the message into the outbox.

use rusqlite::{Connection, OptionalExtension, Row, params};
use tern_crypto::media::MediaKey;

use super::{LocalStore, OutboxItem, SavedSession, query};
use crate::error::Error;
use crate::types::StoredMessage;

/// Identifies a source file's content without reading it: canonical path, size, mtime.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct SourceKey {
    pub path: String,
    pub size: u64,
    pub mtime_ns: i64,
}

/// One file being sent. `Debug` leaves the key out.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct PendingUpload {
    pub id: i64,
    pub source: SourceKey,
    /// File name of the encrypted copy in `home/media-tmp/`.
    pub temp_name: String,
    pub media_id: String,
    pub key: MediaKey,
    pub plaintext_sha256: [u8; 32],
    pub size: u64,
    pub encrypted_size: u64,
    /// The tus upload (absolute URL), once created.
    pub upload_url: Option<String>,
    /// The object is on the server and this account holds a reference to it.
    pub uploaded: bool,
    pub created_ms: i64,
}

impl std::fmt::Debug for PendingUpload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingUpload")
            .field("id", &self.id)
            .field("source", &self.source)
            .field("temp_name", &self.temp_name)
            .field("media_id", &self.media_id)
            .field("encrypted_size", &self.encrypted_size)
            .field("upload_url", &self.upload_url)
            .field("uploaded", &self.uploaded)
            .finish_non_exhaustive()
    }
}

const SELECT_UPLOAD: &str = "SELECT id, source_path, source_size, source_mtime_ns, temp_name,
    media_id, media_key, plaintext_sha256, size, encrypted_size, upload_url, uploaded, created_ms
    FROM media_uploads";

/// Rows read at most by [`LocalStore::uploads`]; there are only as many as interrupted sends.
const MAX_LISTED: i64 = 1024;

fn upload_from_row(r: &Row<'_>) -> rusqlite::Result<PendingUpload> {
    let blob32 = |i: usize| -> rusqlite::Result<[u8; 32]> {
        let v: Vec<u8> = r.get(i)?;
        <[u8; 32]>::try_from(v.as_slice()).map_err(|_| {
            rusqlite::Error::FromSqlConversionFailure(
                i,
                rusqlite::types::Type::Blob,
                format!("expected 32 bytes, found {}", v.len()).into(),
            )
        })
    };
    Ok(PendingUpload {
        id: r.get(0)?,
        source: SourceKey {
            path: r.get(1)?,
            size: r.get(2)?,
            mtime_ns: r.get(3)?,
        },
        temp_name: r.get(4)?,
        media_id: r.get(5)?,
        key: MediaKey::from_bytes(blob32(6)?),
        plaintext_sha256: blob32(7)?,
        size: r.get(8)?,
        encrypted_size: r.get(9)?,
        upload_url: r.get(10)?,
        uploaded: r.get(11)?,
        created_ms: r.get(12)?,
    })
}

fn by_id(conn: &Connection, id: i64) -> rusqlite::Result<PendingUpload> {
    conn.query_row(
        &format!("{SELECT_UPLOAD} WHERE id = ?1"),
        [id],
        upload_from_row,
    )
}

impl LocalStore {
    /// The send in progress of this exact file, if any.
    pub fn pending_upload(&self, source: &SourceKey) -> Result<Option<PendingUpload>, Error> {
        let conn = self.lock();
        Ok(conn
            .query_row(
                &format!(
                    "{SELECT_UPLOAD} WHERE source_path = ?1 AND source_size = ?2
                     AND source_mtime_ns = ?3"
                ),
                params![source.path, source.size, source.mtime_ns],
                upload_from_row,
            )
            .optional()?)
    }

    /// Records a finished encrypted copy. `id`, `upload_url` and `uploaded` of `u` are
    /// ignored (a new row starts without an upload). A row for the same source is replaced;
    /// its temp file name is returned so that the caller can delete the file.
    pub fn insert_upload(
        &self,
        u: &PendingUpload,
    ) -> Result<(PendingUpload, Option<String>), Error> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let replaced: Option<String> = tx
            .query_row(
                "DELETE FROM media_uploads WHERE source_path = ?1 AND source_size = ?2
                 AND source_mtime_ns = ?3 RETURNING temp_name",
                params![u.source.path, u.source.size, u.source.mtime_ns],
                |r| r.get(0),
            )
            .optional()?;
        tx.execute(
            "INSERT INTO media_uploads (source_path, source_size, source_mtime_ns, temp_name,
                 media_id, media_key, plaintext_sha256, size, encrypted_size, created_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                u.source.path,
                u.source.size,
                u.source.mtime_ns,
                u.temp_name,
                u.media_id,
                u.key.as_bytes().as_slice(),
                u.plaintext_sha256.as_slice(),
                u.size,
                u.encrypted_size,
                u.created_ms
            ],
        )?;
        let row = by_id(&tx, tx.last_insert_rowid())?;
        tx.commit()?;
        Ok((row, replaced))
    }

    pub fn set_upload_url(&self, id: i64, url: Option<&str>) -> Result<(), Error> {
        let conn = self.lock();
        conn.execute(
            "UPDATE media_uploads SET upload_url = ?1 WHERE id = ?2",
            params![url, id],
        )?;
        Ok(())
    }

    pub fn mark_uploaded(&self, id: i64) -> Result<(), Error> {
        let conn = self.lock();
        conn.execute("UPDATE media_uploads SET uploaded = 1 WHERE id = ?1", [id])?;
        Ok(())
    }

    /// Forgets a send; returns the temp file name to delete, if the row existed.
    pub fn delete_upload(&self, id: i64) -> Result<Option<String>, Error> {
        let conn = self.lock();
        Ok(conn
            .query_row(
                "DELETE FROM media_uploads WHERE id = ?1 RETURNING temp_name",
                [id],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Every send in progress (at most 1024, oldest first).
    pub fn uploads(&self) -> Result<Vec<PendingUpload>, Error> {
        let conn = self.lock();
        let mut stmt = conn.prepare(&format!("{SELECT_UPLOAD} ORDER BY id LIMIT ?1"))?;
        let rows = stmt.query_map([MAX_LISTED], upload_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Puts the message carrying an uploaded file into the outbox and forgets the upload, in
    /// one transaction: a crash leaves either the upload to resume or the message to send.
    pub fn enqueue_uploaded(
        &self,
        me: &SavedSession,
        item: &OutboxItem,
        now_ms: i64,
        upload_id: i64,
    ) -> Result<StoredMessage, Error> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let id = super::insert_outgoing(&tx, me, item, now_ms)?;
        tx.execute("DELETE FROM media_uploads WHERE id = ?1", [upload_id])?;
        let stored = query::message_by_rowid(&tx, id)?;
        tx.commit()?;
        Ok(stored)
    }
}
