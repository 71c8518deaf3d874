//! Media metadata: objects, references with their expiry, incomplete uploads.

use deadpool_postgres::GenericClient;

use super::{RowExt, db_error, execute, id, query, query_one, query_opt};
use crate::*;

fn hash_from(v: Vec<u8>) -> Result<MediaHash, StoreError> {
    MediaHash::try_from(v.as_slice())
        .map_err(|_| db_error("a media id in the database is not 32 bytes".into()))
}

/// Serialises the quota-charging writes of one user (an advisory lock keyed by the user id,
/// held until commit), so that two concurrent uploads cannot both pass the quota check.
async fn lock_quota<C: GenericClient>(c: &C, user: UserId) -> Result<(), StoreError> {
    query_one(c, "SELECT pg_advisory_xact_lock($1)", &[&id(user)]).await?;
    Ok(())
}

/// Bytes the user holds at `now`: live references plus incomplete uploads.
async fn quota_used<C: GenericClient>(c: &C, user: UserId, now_ms: i64) -> Result<u64, StoreError> {
    let r = query_one(
        c,
        "SELECT (SELECT COALESCE(SUM(m.size), 0)::BIGINT FROM media_refs r
                 JOIN media m ON m.id = r.media_id
                 WHERE r.user_id = $1 AND r.expires_at > $2),
                (SELECT COALESCE(SUM(length), 0)::BIGINT FROM uploads
                 WHERE user_id = $1 AND media_id IS NULL AND expires_at > $2)",
        &[&id(user), &now_ms],
    )
    .await?;
    Ok(r.col::<i64>(0)? as u64 + r.col::<i64>(1)? as u64)
}

async fn check_quota<C: GenericClient>(
    c: &C,
    user: UserId,
    wanted: u64,
    now_ms: i64,
    limits: MediaLimits,
) -> Result<(), StoreError> {
    let used = quota_used(c, user, now_ms).await?;
    if used.saturating_add(wanted) > limits.quota_bytes {
        return Err(StoreError::QuotaExceeded {
            used,
            wanted,
            quota: limits.quota_bytes,
        });
    }
    Ok(())
}

pub async fn create_upload<C: GenericClient>(
    c: &C,
    u: &NewUpload,
    limits: MediaLimits,
) -> Result<(), StoreError> {
    lock_quota(c, u.user).await?;
    let open: i64 = query_one(
        c,
        "SELECT COUNT(*) FROM uploads WHERE user_id = $1 AND media_id IS NULL AND expires_at > $2",
        &[&id(u.user), &u.now_ms],
    )
    .await?
    .col(0)?;
    if open as usize >= limits.max_uploads {
        return Err(StoreError::UploadLimit(limits.max_uploads));
    }
    check_quota(c, u.user, u.length, u.now_ms, limits).await?;
    let expected: Option<&[u8]> = u.expected.as_ref().map(|h| h.as_slice());
    execute(
        c,
        "INSERT INTO uploads (id, user_id, length, expected, created_at, expires_at)
         VALUES ($1, $2, $3, $4, $5, $6)",
        &[
            &u.id,
            &id(u.user),
            &id(u.length),
            &expected,
            &u.now_ms,
            &u.expires_at_ms,
        ],
    )
    .await?;
    Ok(())
}

fn upload_from(id: &str, r: &tokio_postgres::Row) -> Result<UploadRecord, StoreError> {
    Ok(UploadRecord {
        id: id.to_owned(),
        user: r.col::<i64>(0)? as UserId,
        length: r.col::<i64>(1)? as u64,
        expected: r.col::<Option<Vec<u8>>>(2)?.map(hash_from).transpose()?,
        created_at_ms: r.col(3)?,
        expires_at_ms: r.col(4)?,
        media: r.col::<Option<Vec<u8>>>(5)?.map(hash_from).transpose()?,
        received: r.col::<i64>(6)? as u64,
        staging: r.col(7)?,
    })
}

pub async fn upload<C: GenericClient>(c: &C, id: &str) -> Result<Option<UploadRecord>, StoreError> {
    query_opt(
        c,
        "SELECT user_id, length, expected, created_at, expires_at, media_id, received, staging
         FROM uploads WHERE id = $1",
        &[&id],
    )
    .await?
    .map(|r| upload_from(id, &r))
    .transpose()
}

/// Inserts the object if new and gives `user` a reference lasting at least until `expires`.
async fn reference<C: GenericClient>(
    c: &C,
    media: &MediaHash,
    size: u64,
    user: UserId,
    expires: i64,
    now_ms: i64,
) -> Result<MediaGrant, StoreError> {
    let created = execute(
        c,
        "INSERT INTO media (id, size, created_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        &[&media.as_slice(), &id(size), &now_ms],
    )
    .await?
        == 1;
    let expires_at_ms: i64 = query_one(
        c,
        "INSERT INTO media_refs (media_id, user_id, expires_at) VALUES ($1, $2, $3)
         ON CONFLICT (user_id, media_id)
         DO UPDATE SET expires_at = GREATEST(media_refs.expires_at, EXCLUDED.expires_at)
         RETURNING expires_at",
        &[&media.as_slice(), &id(user), &expires],
    )
    .await?
    .col(0)?;
    Ok(MediaGrant {
        id: *media,
        size,
        expires_at_ms,
        created,
    })
}

pub async fn finish_upload<C: GenericClient>(
    c: &C,
    upload_id: &str,
    media: &MediaHash,
    size: u64,
    ref_expires: i64,
    now_ms: i64,
) -> Result<MediaGrant, StoreError> {
    // The upload's row, locked: two completions of one upload cannot both pass the check.
    let Some(row) = query_opt(
        c,
        "SELECT user_id, length, expected, created_at, expires_at, media_id, received, staging
         FROM uploads WHERE id = $1 FOR UPDATE",
        &[&upload_id],
    )
    .await?
    else {
        return Err(StoreError::NotFound("upload"));
    };
    let up = upload_from(upload_id, &row)?;
    logic::check_upload_completion(&up, media, size)?;
    // An existing object keeps its recorded size: it is the same bytes. Its row is locked
    // (KEY SHARE, as the reference's foreign key check would) so that `forget_media` cannot
    // delete it between here and the reference; an object being forgotten right now is waited
    // for, and then found gone (and stored anew).
    let size = query_opt(
        c,
        "SELECT size FROM media WHERE id = $1 FOR KEY SHARE",
        &[&media.as_slice()],
    )
    .await?
    .map(|r| r.col::<i64>(0))
    .transpose()?
    .map_or(size, |s| s as u64);
    let grant = reference(c, media, size, up.user, ref_expires, now_ms).await?;
    execute(
        c,
        "UPDATE uploads SET media_id = $2 WHERE id = $1",
        &[&upload_id, &media.as_slice()],
    )
    .await?;
    Ok(grant)
}

pub async fn delete_upload<C: GenericClient>(c: &C, id: &str) -> Result<bool, StoreError> {
    Ok(execute(c, "DELETE FROM uploads WHERE id = $1", &[&id]).await? == 1)
}

pub async fn media<C: GenericClient>(
    c: &C,
    media: &MediaHash,
) -> Result<Option<MediaRecord>, StoreError> {
    query_opt(
        c,
        "SELECT size, created_at FROM media WHERE id = $1",
        &[&media.as_slice()],
    )
    .await?
    .map(|r| {
        Ok(MediaRecord {
            id: *media,
            size: r.col::<i64>(0)? as u64,
            created_at_ms: r.col(1)?,
        })
    })
    .transpose()
}

pub async fn claim_media<C: GenericClient>(
    c: &C,
    hash: &MediaHash,
    user: UserId,
    expires: i64,
    now_ms: i64,
    limits: MediaLimits,
) -> Result<Option<MediaGrant>, StoreError> {
    lock_quota(c, user).await?;
    // The object's row, locked (see `finish_upload`): one being forgotten now is waited for and
    // then found gone, and once locked it stays until the reference is committed.
    let Some(m) = query_opt(
        c,
        "SELECT size FROM media WHERE id = $1 FOR KEY SHARE",
        &[&hash.as_slice()],
    )
    .await?
    .map(|r| r.col::<i64>(0))
    .transpose()?
    else {
        return Ok(None);
    };
    let size = m as u64;
    let holds: bool = query_one(
        c,
        "SELECT EXISTS (SELECT 1 FROM media_refs
                        WHERE user_id = $1 AND media_id = $2 AND expires_at > $3)",
        &[&id(user), &hash.as_slice(), &now_ms],
    )
    .await?
    .col(0)?;
    if !holds {
        check_quota(c, user, size, now_ms, limits).await?;
    }
    reference(c, hash, size, user, expires, now_ms)
        .await
        .map(Some)
}

pub async fn drop_media_ref<C: GenericClient>(
    c: &C,
    media: &MediaHash,
    user: UserId,
) -> Result<bool, StoreError> {
    Ok(execute(
        c,
        "DELETE FROM media_refs WHERE user_id = $1 AND media_id = $2",
        &[&id(user), &media.as_slice()],
    )
    .await?
        == 1)
}

pub async fn media_garbage<C: GenericClient>(
    c: &C,
    now_ms: i64,
    limit: usize,
) -> Result<MediaGarbage, StoreError> {
    let expired_uploads = query(
        c,
        "SELECT id FROM uploads WHERE expires_at <= $1 ORDER BY expires_at LIMIT $2",
        &[&now_ms, &(limit as i64)],
    )
    .await?
    .iter()
    .map(|r| r.col::<String>(0))
    .collect::<Result<Vec<_>, _>>()?;
    let unreferenced = query(
        c,
        "SELECT m.id FROM media m WHERE NOT EXISTS
           (SELECT 1 FROM media_refs r WHERE r.media_id = m.id AND r.expires_at > $1)
         ORDER BY m.created_at LIMIT $2",
        &[&now_ms, &(limit as i64)],
    )
    .await?
    .iter()
    .map(|r| r.col::<Vec<u8>>(0).and_then(hash_from))
    .collect::<Result<Vec<_>, _>>()?;
    Ok(MediaGarbage {
        expired_uploads,
        unreferenced,
    })
}

pub async fn forget_media<C: GenericClient>(
    c: &C,
    media: &MediaHash,
    now_ms: i64,
) -> Result<bool, StoreError> {
    // References go with the object (ON DELETE CASCADE); only dead ones can be left.
    //
    // SKIP LOCKED: an object whose row a claim or a completed upload holds locked (its
    // reference not yet committed, so invisible to the NOT EXISTS below) is not forgotten this
    // time. Waiting for the lock instead would not help: the DELETE would go ahead once it is
    // released, with the check evaluated before, and take the new reference with it.
    Ok(execute(
        c,
        "DELETE FROM media
         WHERE id = (SELECT id FROM media WHERE id = $1 FOR UPDATE SKIP LOCKED)
           AND NOT EXISTS
             (SELECT 1 FROM media_refs r WHERE r.media_id = $1 AND r.expires_at > $2)",
        &[&media.as_slice(), &now_ms],
    )
    .await?
        == 1)
}

pub async fn advance_upload<C: GenericClient>(
    c: &C,
    upload_id: &str,
    from: u64,
    to: u64,
    staging: &[u8],
) -> Result<bool, StoreError> {
    Ok(execute(
        c,
        "UPDATE uploads SET received = $3, staging = $4
         WHERE id = $1 AND received = $2 AND media_id IS NULL",
        &[&upload_id, &id(from), &id(to), &staging],
    )
    .await?
        == 1)
}

pub async fn take_lease<C: GenericClient>(
    c: &C,
    name: &str,
    holder: &str,
    now_ms: i64,
    until_ms: i64,
) -> Result<bool, StoreError> {
    // The conflicting row is locked by the upsert, so two takers of one free lease serialise
    // and the second sees the first's holder.
    Ok(execute(
        c,
        "INSERT INTO leases (name, holder, until_ms) VALUES ($1, $2, $4)
         ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, until_ms = EXCLUDED.until_ms
         WHERE leases.until_ms <= $3 OR leases.holder = EXCLUDED.holder",
        &[&name, &holder, &now_ms, &until_ms],
    )
    .await?
        == 1)
}

pub async fn renew_lease<C: GenericClient>(
    c: &C,
    name: &str,
    holder: &str,
    now_ms: i64,
    until_ms: i64,
) -> Result<bool, StoreError> {
    Ok(execute(
        c,
        "UPDATE leases SET until_ms = $4 WHERE name = $1 AND holder = $2 AND until_ms > $3",
        &[&name, &holder, &now_ms, &until_ms],
    )
    .await?
        == 1)
}

pub async fn release_lease<C: GenericClient>(
    c: &C,
    name: &str,
    holder: &str,
) -> Result<(), StoreError> {
    execute(
        c,
        "DELETE FROM leases WHERE name = $1 AND holder = $2",
        &[&name, &holder],
    )
    .await?;
    Ok(())
}

pub async fn forget_expired_leases<C: GenericClient>(
    c: &C,
    now_ms: i64,
) -> Result<usize, StoreError> {
    Ok(execute(c, "DELETE FROM leases WHERE until_ms < $1", &[&now_ms]).await? as usize)
}
