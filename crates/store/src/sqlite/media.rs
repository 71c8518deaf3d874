//! Media metadata: objects, references with their expiry, incomplete uploads.

use rusqlite::{Connection, OptionalExtension, params};

use super::db_error;
use crate::*;

fn hash_from(v: Vec<u8>) -> Result<MediaHash, StoreError> {
    MediaHash::try_from(v.as_slice())
        .map_err(|_| db_error("a media id in the database is not 32 bytes".into()))
}

/// Bytes the user holds at `now`: live references plus incomplete uploads.
fn quota_used(c: &Connection, user: UserId, now_ms: i64) -> Result<u64, StoreError> {
    let refs: i64 = c
        .prepare_cached(
            "SELECT COALESCE(SUM(m.size), 0) FROM media_refs r JOIN media m ON m.id = r.media_id
             WHERE r.user_id = ?1 AND r.expires_at > ?2",
        )?
        .query_row(params![user as i64, now_ms], |r| r.get(0))?;
    let uploads: i64 = c
        .prepare_cached(
            "SELECT COALESCE(SUM(length), 0) FROM uploads
             WHERE user_id = ?1 AND media_id IS NULL AND expires_at > ?2",
        )?
        .query_row(params![user as i64, now_ms], |r| r.get(0))?;
    Ok(refs as u64 + uploads as u64)
}

fn check_quota(
    c: &Connection,
    user: UserId,
    wanted: u64,
    now_ms: i64,
    limits: MediaLimits,
) -> Result<(), StoreError> {
    let used = quota_used(c, user, now_ms)?;
    if used.saturating_add(wanted) > limits.quota_bytes {
        return Err(StoreError::QuotaExceeded {
            used,
            wanted,
            quota: limits.quota_bytes,
        });
    }
    Ok(())
}

pub fn create_upload(c: &Connection, u: &NewUpload, limits: MediaLimits) -> Result<(), StoreError> {
    let open: i64 = c
        .prepare_cached(
            "SELECT COUNT(*) FROM uploads WHERE user_id = ?1 AND media_id IS NULL AND expires_at > ?2",
        )?
        .query_row(params![u.user as i64, u.now_ms], |r| r.get(0))?;
    if open as usize >= limits.max_uploads {
        return Err(StoreError::UploadLimit(limits.max_uploads));
    }
    check_quota(c, u.user, u.length, u.now_ms, limits)?;
    c.prepare_cached(
        "INSERT INTO uploads (id, user_id, length, expected, created_at, expires_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        u.id,
        u.user as i64,
        u.length as i64,
        u.expected.as_ref().map(|h| h.as_slice()),
        u.now_ms,
        u.expires_at_ms
    ])?;
    Ok(())
}

pub fn upload(c: &Connection, id: &str) -> Result<Option<UploadRecord>, StoreError> {
    let row = c
        .prepare_cached(
            "SELECT user_id, length, expected, created_at, expires_at, media_id, received, staging
             FROM uploads WHERE id = ?1",
        )?
        .query_row([id], |r| {
            Ok((
                (
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, Option<Vec<u8>>>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                ),
                r.get::<_, Option<Vec<u8>>>(5)?,
                r.get::<_, i64>(6)?,
                r.get::<_, Option<Vec<u8>>>(7)?,
            ))
        })
        .optional()?;
    let Some(((user, length, expected, created, expires), media, received, staging)) = row else {
        return Ok(None);
    };
    Ok(Some(UploadRecord {
        id: id.to_owned(),
        user: user as UserId,
        length: length as u64,
        expected: expected.map(hash_from).transpose()?,
        created_at_ms: created,
        expires_at_ms: expires,
        media: media.map(hash_from).transpose()?,
        received: received as u64,
        staging,
    }))
}

pub fn advance_upload(
    c: &Connection,
    id: &str,
    from: u64,
    to: u64,
    staging: &[u8],
) -> Result<bool, StoreError> {
    Ok(c.prepare_cached(
        "UPDATE uploads SET received = ?3, staging = ?4
         WHERE id = ?1 AND received = ?2 AND media_id IS NULL",
    )?
    .execute(params![id, from as i64, to as i64, staging])?
        == 1)
}

pub fn take_lease(
    c: &Connection,
    name: &str,
    holder: &str,
    now_ms: i64,
    until_ms: i64,
) -> Result<bool, StoreError> {
    Ok(c.prepare_cached(
        "INSERT INTO leases (name, holder, until_ms) VALUES (?1, ?2, ?4)
         ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, until_ms = excluded.until_ms
         WHERE leases.until_ms <= ?3 OR leases.holder = excluded.holder",
    )?
    .execute(params![name, holder, now_ms, until_ms])?
        == 1)
}

pub fn renew_lease(
    c: &Connection,
    name: &str,
    holder: &str,
    now_ms: i64,
    until_ms: i64,
) -> Result<bool, StoreError> {
    Ok(c.prepare_cached(
        "UPDATE leases SET until_ms = ?4 WHERE name = ?1 AND holder = ?2 AND until_ms > ?3",
    )?
    .execute(params![name, holder, now_ms, until_ms])?
        == 1)
}

pub fn release_lease(c: &Connection, name: &str, holder: &str) -> Result<(), StoreError> {
    c.prepare_cached("DELETE FROM leases WHERE name = ?1 AND holder = ?2")?
        .execute([name, holder])?;
    Ok(())
}

pub fn forget_expired_leases(c: &Connection, now_ms: i64) -> Result<usize, StoreError> {
    Ok(c.prepare_cached("DELETE FROM leases WHERE until_ms < ?1")?
        .execute([now_ms])?)
}

/// Inserts the object if new and gives `user` a reference lasting at least until `expires`.
/// Returns (size, the reference's expiry, whether the object was created).
fn reference(
    c: &Connection,
    id: &MediaHash,
    size: u64,
    user: UserId,
    expires: i64,
    now_ms: i64,
) -> Result<MediaGrant, StoreError> {
    let created = c
        .prepare_cached("INSERT OR IGNORE INTO media (id, size, created_at) VALUES (?1, ?2, ?3)")?
        .execute(params![id.as_slice(), size as i64, now_ms])?
        == 1;
    let expires_at_ms: i64 = c
        .prepare_cached(
            "INSERT INTO media_refs (media_id, user_id, expires_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (user_id, media_id) DO UPDATE SET expires_at = MAX(expires_at, excluded.expires_at)
             RETURNING expires_at",
        )?
        .query_row(params![id.as_slice(), user as i64, expires], |r| r.get(0))?;
    Ok(MediaGrant {
        id: *id,
        size,
        expires_at_ms,
        created,
    })
}

pub fn finish_upload(
    c: &Connection,
    id: &str,
    media: &MediaHash,
    size: u64,
    ref_expires: i64,
    now_ms: i64,
) -> Result<MediaGrant, StoreError> {
    let Some(up) = upload(c, id)? else {
        return Err(StoreError::NotFound("upload"));
    };
    logic::check_upload_completion(&up, media, size)?;
    // An existing object keeps its recorded size: it is the same bytes.
    let size = c
        .prepare_cached("SELECT size FROM media WHERE id = ?1")?
        .query_row([media.as_slice()], |r| r.get::<_, i64>(0))
        .optional()?
        .map_or(size, |s| s as u64);
    let grant = reference(c, media, size, up.user, ref_expires, now_ms)?;
    c.prepare_cached("UPDATE uploads SET media_id = ?2 WHERE id = ?1")?
        .execute(params![id, media.as_slice()])?;
    Ok(grant)
}

pub fn delete_upload(c: &Connection, id: &str) -> Result<bool, StoreError> {
    Ok(c.prepare_cached("DELETE FROM uploads WHERE id = ?1")?
        .execute([id])?
        == 1)
}

pub fn media(c: &Connection, id: &MediaHash) -> Result<Option<MediaRecord>, StoreError> {
    Ok(
        c.prepare_cached("SELECT size, created_at FROM media WHERE id = ?1")?
            .query_row([id.as_slice()], |r| {
                Ok(MediaRecord {
                    id: *id,
                    size: r.get::<_, i64>(0)? as u64,
                    created_at_ms: r.get(1)?,
                })
            })
            .optional()?,
    )
}

pub fn claim_media(
    c: &Connection,
    id: &MediaHash,
    user: UserId,
    expires: i64,
    now_ms: i64,
    limits: MediaLimits,
) -> Result<Option<MediaGrant>, StoreError> {
    let Some(m) = media(c, id)? else {
        return Ok(None);
    };
    let holds: bool = c
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM media_refs WHERE user_id = ?1 AND media_id = ?2 AND expires_at > ?3)",
        )?
        .query_row(params![user as i64, id.as_slice(), now_ms], |r| r.get(0))?;
    if !holds {
        check_quota(c, user, m.size, now_ms, limits)?;
    }
    reference(c, id, m.size, user, expires, now_ms).map(Some)
}

pub fn drop_media_ref(c: &Connection, id: &MediaHash, user: UserId) -> Result<bool, StoreError> {
    Ok(
        c.prepare_cached("DELETE FROM media_refs WHERE user_id = ?1 AND media_id = ?2")?
            .execute(params![user as i64, id.as_slice()])?
            == 1,
    )
}

pub fn media_garbage(
    c: &Connection,
    now_ms: i64,
    limit: usize,
) -> Result<MediaGarbage, StoreError> {
    let expired_uploads = c
        .prepare_cached(
            "SELECT id FROM uploads WHERE expires_at <= ?1 ORDER BY expires_at LIMIT ?2",
        )?
        .query_map(params![now_ms, limit as i64], |r| r.get::<_, String>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    let unreferenced = c
        .prepare_cached(
            "SELECT m.id FROM media m WHERE NOT EXISTS
               (SELECT 1 FROM media_refs r WHERE r.media_id = m.id AND r.expires_at > ?1)
             ORDER BY m.created_at LIMIT ?2",
        )?
        .query_map(params![now_ms, limit as i64], |r| r.get::<_, Vec<u8>>(0))?
        .map(|r| r.map_err(StoreError::from).and_then(hash_from))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(MediaGarbage {
        expired_uploads,
        unreferenced,
    })
}

pub fn forget_media(c: &Connection, id: &MediaHash, now_ms: i64) -> Result<bool, StoreError> {
    // References go with the object (ON DELETE CASCADE); only dead ones can be left.
    Ok(c.prepare_cached(
        "DELETE FROM media WHERE id = ?1 AND NOT EXISTS
           (SELECT 1 FROM media_refs r WHERE r.media_id = ?1 AND r.expires_at > ?2)",
    )?
    .execute(params![id.as_slice(), now_ms])?
        == 1)
}
