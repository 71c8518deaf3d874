//! Accounts, devices, privacy and last seen.

use deadpool_postgres::GenericClient;

use super::{RowExt, execute, id, is_unique_violation, pg, query, query_opt};
use crate::logic::MAX_ID;
use crate::*;

pub async fn create_user<C: GenericClient>(
    c: &C,
    name: &str,
    hash: &str,
    now: i64,
) -> Result<UserId, StoreError> {
    let st = c
        .prepare_cached(
            "INSERT INTO users (username, password_hash, created_at) VALUES ($1, $2, $3)
             RETURNING id",
        )
        .await
        .map_err(pg)?;
    match c.query_one(&st, &[&name, &hash, &now]).await {
        Ok(row) => {
            let user = row.col::<i64>(0)? as UserId;
            if user > MAX_ID {
                return Err(StoreError::Invalid("no more user ids".into()));
            }
            Ok(user)
        }
        Err(e) if is_unique_violation(&e) => Err(StoreError::UsernameTaken),
        Err(e) => Err(pg(e)),
    }
}

pub async fn user_by_name<C: GenericClient>(
    c: &C,
    name: &str,
) -> Result<Option<UserRecord>, StoreError> {
    let Some(r) = query_opt(
        c,
        "SELECT id, username, password_hash, last_seen, last_seen_privacy FROM users
         WHERE username = $1",
        &[&name],
    )
    .await?
    else {
        return Ok(None);
    };
    Ok(Some(UserRecord {
        id: r.col::<i64>(0)? as UserId,
        username: r.col(1)?,
        password_hash: r.col(2)?,
        last_seen_ms: r.col(3)?,
        last_seen_privacy: logic::visibility_from_code(r.col::<i16>(4)?.into()),
    }))
}

pub(super) async fn user_ref<C: GenericClient>(
    c: &C,
    user: UserId,
) -> Result<Option<UserRef>, StoreError> {
    Ok(
        query_opt(c, "SELECT username FROM users WHERE id = $1", &[&id(user)])
            .await?
            .map(|r| r.col::<String>(0))
            .transpose()?
            .map(|username| UserRef { id: user, username }),
    )
}

/// Locks the user's row (per-user bounds are checked under it); `NotFound("user")` if none.
pub(super) async fn lock_user<C: GenericClient>(c: &C, user: UserId) -> Result<(), StoreError> {
    query_opt(
        c,
        "SELECT 1 FROM users WHERE id = $1 FOR UPDATE",
        &[&id(user)],
    )
    .await?
    .map(|_| ())
    .ok_or(StoreError::NotFound("user"))
}

pub async fn create_device<C: GenericClient>(
    c: &C,
    user: UserId,
    name: &str,
    token_hash: &[u8],
    max: usize,
    now: i64,
) -> Result<DeviceId, StoreError> {
    lock_user(c, user).await?;
    let count: i64 = query_opt(
        c,
        "SELECT COUNT(*) FROM devices WHERE user_id = $1",
        &[&id(user)],
    )
    .await?
    .map(|r| r.col(0))
    .transpose()?
    .unwrap_or(0);
    if count as usize >= max {
        return Err(StoreError::DeviceLimit(max));
    }
    let row = query_opt(
        c,
        "INSERT INTO devices (user_id, name, token_hash, created_at) VALUES ($1, $2, $3, $4)
         RETURNING id",
        &[&id(user), &name, &token_hash, &now],
    )
    .await?
    .ok_or_else(|| super::db_error("a device insert returned nothing".into()))?;
    let device: i64 = row.col(0)?;
    execute(
        c,
        "INSERT INTO mailbox_heads (device_id) VALUES ($1)",
        &[&device],
    )
    .await?;
    Ok(device as DeviceId)
}

pub async fn device_by_token<C: GenericClient>(
    c: &C,
    hash: &[u8],
) -> Result<Option<DeviceAuth>, StoreError> {
    let Some(r) = query_opt(
        c,
        "SELECT d.id, d.user_id, u.username FROM devices d JOIN users u ON u.id = d.user_id
         WHERE d.token_hash = $1",
        &[&hash],
    )
    .await?
    else {
        return Ok(None);
    };
    Ok(Some(DeviceAuth {
        device_id: r.col::<i64>(0)? as DeviceId,
        user_id: r.col::<i64>(1)? as UserId,
        username: r.col(2)?,
    }))
}

pub async fn list_devices<C: GenericClient>(
    c: &C,
    user: UserId,
) -> Result<Vec<DeviceRecord>, StoreError> {
    query(
        c,
        "SELECT id, name, created_at, last_seen FROM devices WHERE user_id = $1 ORDER BY id",
        &[&id(user)],
    )
    .await?
    .iter()
    .map(|r| {
        Ok(DeviceRecord {
            id: r.col::<i64>(0)? as DeviceId,
            name: r.col(1)?,
            created_at_ms: r.col(2)?,
            last_seen_ms: r.col(3)?,
        })
    })
    .collect()
}

pub(super) async fn device_ids<C: GenericClient>(
    c: &C,
    user: UserId,
) -> Result<Vec<DeviceId>, StoreError> {
    query(
        c,
        "SELECT id FROM devices WHERE user_id = $1 ORDER BY id",
        &[&id(user)],
    )
    .await?
    .iter()
    .map(|r| Ok(r.col::<i64>(0)? as DeviceId))
    .collect()
}

/// Deletes mailbox entries of `device` up to `up_to` and releases the bodies of messages no
/// mailbox entry refers to any more ([`release_bodies`]). Returns the deleted message entries as (conversation_id,
/// seq), and the count and bytes of all deleted entries: the caller takes those off the
/// device's totals (after locking its head in order with any others, see `messaging`).
///
pub(super) async fn delete_mailbox<C: GenericClient>(
    c: &C,
    device: DeviceId,
    up_to: u64,
) -> Result<(Vec<(i64, u64)>, i64, i64), StoreError> {
    let rows = query(
        c,
        "DELETE FROM mailbox WHERE device_id = $1 AND mseq <= $2
         RETURNING kind, conversation_id, seq, size",
        &[&id(device), &id(up_to)],
    )
    .await?;
    let mut messages = Vec::new();
    let (mut entries, mut bytes) = (0i64, 0i64);
    for r in &rows {
        let kind: i16 = r.col(0)?;
        entries += 1;
        bytes += r.col::<i64>(3)?;
        if kind == 1 {
            messages.push((r.col::<i64>(1)?, r.col::<i64>(2)? as u64));
        }
    }
    release_bodies(c, &messages).await?;
    Ok((messages, entries, bytes))
}

/// Releases the bodies of these messages (conversation_id, seq) that no mailbox entry refers
/// to any more, exactly: their rows are locked first (in key order), and the check runs in a
/// statement of its own after the lock is granted. Of two transactions deleting the last two
/// entries of a message, the second to take the lock checks after the first committed and
/// sees both entries gone.
pub(super) async fn release_bodies<C: GenericClient>(
    c: &C,
    messages: &[(i64, u64)],
) -> Result<(), StoreError> {
    if messages.is_empty() {
        return Ok(());
    }
    let convs: Vec<i64> = messages.iter().map(|m| m.0).collect();
    let seqs: Vec<i64> = messages.iter().map(|m| id(m.1)).collect();
    let locked = query(
        c,
        "SELECT g.conversation_id, g.seq
         FROM UNNEST($1::BIGINT[], $2::BIGINT[]) AS a(conversation_id, seq)
         JOIN messages g ON g.conversation_id = a.conversation_id AND g.seq = a.seq
         WHERE g.body IS NOT NULL
         ORDER BY g.conversation_id, g.seq FOR UPDATE OF g",
        &[&convs, &seqs],
    )
    .await?;
    if locked.is_empty() {
        return Ok(());
    }
    let convs: Vec<i64> = locked.iter().map(|r| r.col(0)).collect::<Result<_, _>>()?;
    let seqs: Vec<i64> = locked.iter().map(|r| r.col(1)).collect::<Result<_, _>>()?;
    execute(
        c,
        "UPDATE messages g SET body = NULL
         FROM UNNEST($1::BIGINT[], $2::BIGINT[]) AS a(conversation_id, seq)
         WHERE g.conversation_id = a.conversation_id AND g.seq = a.seq
           AND NOT EXISTS (SELECT 1 FROM mailbox m WHERE m.kind = 1
                           AND m.conversation_id = a.conversation_id AND m.seq = a.seq)",
        &[&convs, &seqs],
    )
    .await?;
    Ok(())
}

pub async fn remove_device<C: GenericClient>(
    c: &C,
    user: UserId,
    device: DeviceId,
) -> Result<(), StoreError> {
    // The device's row first: a post addressing it holds its mailbox head, so the mailbox is
    // emptied only after such a post committed, and later posts find the device gone.
    let owner: Option<i64> = query_opt(
        c,
        "SELECT user_id FROM devices WHERE id = $1 FOR UPDATE",
        &[&id(device)],
    )
    .await?
    .map(|r| r.col(0))
    .transpose()?;
    if owner != Some(id(user)) {
        return Err(StoreError::NotFound("device"));
    }
    // Then its mailbox head, in a statement of its own: it waits for posts in flight to this
    // device, and the delete below (a new statement, a new snapshot) sees their entries.
    query_opt(
        c,
        "SELECT 1 FROM mailbox_heads WHERE device_id = $1 FOR UPDATE",
        &[&id(device)],
    )
    .await?;
    delete_mailbox(c, device, u64::MAX >> 1).await?;
    // Its head and keys go with it (ON DELETE CASCADE).
    execute(c, "DELETE FROM devices WHERE id = $1", &[&id(device)]).await?;
    Ok(())
}

pub async fn set_privacy<C: GenericClient>(
    c: &C,
    user: UserId,
    v: Visibility,
) -> Result<(), StoreError> {
    let n = execute(
        c,
        "UPDATE users SET last_seen_privacy = $2 WHERE id = $1",
        &[&id(user), &logic::visibility_code(v)],
    )
    .await?;
    if n == 0 {
        return Err(StoreError::NotFound("user"));
    }
    Ok(())
}

pub async fn are_contacts<C: GenericClient>(
    c: &C,
    a: UserId,
    b: UserId,
) -> Result<bool, StoreError> {
    let conv = logic::direct_conversation_id(a, b) as i64;
    Ok(
        query_opt(c, "SELECT 1 FROM conversations WHERE id = $1", &[&conv])
            .await?
            .is_some(),
    )
}

/// One statement per table for the whole batch; the newest time wins.
pub async fn save_last_seen<C: GenericClient>(
    c: &C,
    batch: &[LastSeenUpdate],
) -> Result<(), StoreError> {
    let users: Vec<i64> = batch.iter().map(|u| id(u.user)).collect();
    let devices: Vec<i64> = batch.iter().map(|u| id(u.device)).collect();
    let at: Vec<i64> = batch.iter().map(|u| u.at_ms).collect();
    execute(
        c,
        "UPDATE users u SET last_seen = GREATEST(COALESCE(u.last_seen, 0), a.at)
         FROM (SELECT id, MAX(at) AS at FROM UNNEST($1::BIGINT[], $2::BIGINT[]) AS x(id, at)
               GROUP BY id) a
         WHERE u.id = a.id",
        &[&users, &at],
    )
    .await?;
    execute(
        c,
        "UPDATE devices d SET last_seen = GREATEST(COALESCE(d.last_seen, 0), a.at)
         FROM (SELECT id, MAX(at) AS at FROM UNNEST($1::BIGINT[], $2::BIGINT[]) AS x(id, at)
               GROUP BY id) a
         WHERE d.id = a.id",
        &[&devices, &at],
    )
    .await?;
    Ok(())
}
