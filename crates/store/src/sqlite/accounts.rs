//! Accounts, devices, privacy and last seen. Functions take a `&Connection` (a read connection
//! or the writer's open transaction) and do no locking of their own.

use rusqlite::{Connection, OptionalExtension, params};

use crate::*;

pub fn create_user(c: &Connection, name: &str, hash: &str, now: i64) -> Result<UserId, StoreError> {
    let r = c.execute(
        "INSERT INTO users (username, password_hash, created_at) VALUES (?1, ?2, ?3)",
        params![name, hash, now],
    );
    match r {
        Ok(_) => {
            let user = c.last_insert_rowid() as UserId;
            if user > crate::logic::MAX_ID {
                // The direct conversation ids are built from two user ids of 32 bits each.
                return Err(StoreError::Invalid("no more user ids".into()));
            }
            Ok(user)
        }
        Err(rusqlite::Error::SqliteFailure(e, _))
            if e.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            Err(StoreError::UsernameTaken)
        }
        Err(e) => Err(e.into()),
    }
}

pub fn user_by_name(c: &Connection, name: &str) -> Result<Option<UserRecord>, StoreError> {
    Ok(c.prepare_cached(
        "SELECT id, username, password_hash, last_seen, last_seen_privacy FROM users WHERE username = ?1",
    )?
    .query_row([name], |r| {
        Ok(UserRecord {
            id: r.get::<_, i64>(0)? as UserId,
            username: r.get(1)?,
            password_hash: r.get(2)?,
            last_seen_ms: r.get(3)?,
            last_seen_privacy: logic::visibility_from_code(r.get(4)?),
        })
    })
    .optional()?)
}

pub(super) fn user_ref(c: &Connection, id: UserId) -> Result<Option<UserRef>, StoreError> {
    Ok(
        c.prepare_cached("SELECT username FROM users WHERE id = ?1")?
            .query_row([id as i64], |r| r.get::<_, String>(0))
            .optional()?
            .map(|username| UserRef { id, username }),
    )
}

pub fn create_device(
    c: &Connection,
    user: UserId,
    name: &str,
    token_hash: &[u8],
    max: usize,
    now: i64,
) -> Result<DeviceId, StoreError> {
    let count: i64 = c.query_row(
        "SELECT COUNT(*) FROM devices WHERE user_id = ?1",
        [user as i64],
        |r| r.get(0),
    )?;
    if count as usize >= max {
        return Err(StoreError::DeviceLimit(max));
    }
    if user_ref(c, user)?.is_none() {
        return Err(StoreError::NotFound("user"));
    }
    c.execute(
        "INSERT INTO devices (user_id, name, token_hash, created_at) VALUES (?1, ?2, ?3, ?4)",
        params![user as i64, name, token_hash, now],
    )?;
    Ok(c.last_insert_rowid() as DeviceId)
}

pub fn device_by_token(c: &Connection, hash: &[u8]) -> Result<Option<DeviceAuth>, StoreError> {
    Ok(c.prepare_cached(
        "SELECT d.id, d.user_id, u.username FROM devices d JOIN users u ON u.id = d.user_id
         WHERE d.token_hash = ?1",
    )?
    .query_row([hash], |r| {
        Ok(DeviceAuth {
            device_id: r.get::<_, i64>(0)? as DeviceId,
            user_id: r.get::<_, i64>(1)? as UserId,
            username: r.get(2)?,
        })
    })
    .optional()?)
}

pub fn list_devices(c: &Connection, user: UserId) -> Result<Vec<DeviceRecord>, StoreError> {
    let mut st = c.prepare_cached(
        "SELECT id, name, created_at, last_seen FROM devices WHERE user_id = ?1 ORDER BY id",
    )?;
    let rows = st.query_map([user as i64], |r| {
        Ok(DeviceRecord {
            id: r.get::<_, i64>(0)? as DeviceId,
            name: r.get(1)?,
            created_at_ms: r.get(2)?,
            last_seen_ms: r.get(3)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub(super) fn device_ids(c: &Connection, user: UserId) -> Result<Vec<DeviceId>, StoreError> {
    let mut st = c.prepare_cached("SELECT id FROM devices WHERE user_id = ?1 ORDER BY id")?;
    let rows = st.query_map([user as i64], |r| Ok(r.get::<_, i64>(0)? as DeviceId))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Deletes mailbox entries of `device` up to `up_to`, takes them off the device's mailbox
/// totals and releases the message bodies no device needs any more. Returns the deleted message
/// entries as (conversation_id, seq).
pub(super) fn delete_mailbox(
    c: &Connection,
    device: DeviceId,
    up_to: u64,
) -> Result<Vec<(i64, u64)>, StoreError> {
    let mut st = c.prepare_cached(
        "DELETE FROM mailbox WHERE device_id = ?1 AND mseq <= ?2 RETURNING kind, conversation_id, seq, size",
    )?;
    let rows = st.query_map(params![device as i64, up_to as i64], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, i64>(2)? as u64,
            r.get::<_, i64>(3)?,
        ))
    })?;
    let mut messages = Vec::new();
    let (mut entries, mut bytes) = (0i64, 0i64);
    for row in rows {
        let (kind, conv, seq, size) = row?;
        entries += 1;
        bytes += size;
        if kind == 1 {
            messages.push((conv, seq));
        }
    }
    if entries > 0 {
        c.prepare_cached(
            "UPDATE devices SET mailbox_entries = mailbox_entries - ?2,
                    mailbox_bytes = mailbox_bytes - ?3
             WHERE id = ?1",
        )?
        .execute(params![device as i64, entries, bytes])?;
    }
    let mut release = c.prepare_cached(
        "UPDATE messages SET pending = pending - 1,
                body = CASE WHEN pending <= 1 THEN NULL ELSE body END
         WHERE conversation_id = ?1 AND seq = ?2",
    )?;
    for (conv, seq) in &messages {
        release.execute(params![conv, *seq as i64])?;
    }
    Ok(messages)
}

pub fn remove_device(c: &Connection, user: UserId, device: DeviceId) -> Result<(), StoreError> {
    let owner: Option<i64> = c
        .query_row(
            "SELECT user_id FROM devices WHERE id = ?1",
            [device as i64],
            |r| r.get(0),
        )
        .optional()?;
    if owner != Some(user as i64) {
        return Err(StoreError::NotFound("device"));
    }
    delete_mailbox(c, device, u64::MAX >> 1)?;
    c.execute("DELETE FROM devices WHERE id = ?1", [device as i64])?;
    Ok(())
}

pub fn set_privacy(c: &Connection, user: UserId, v: Visibility) -> Result<(), StoreError> {
    let n = c.execute(
        "UPDATE users SET last_seen_privacy = ?2 WHERE id = ?1",
        params![user as i64, logic::visibility_code(v) as i64],
    )?;
    if n == 0 {
        return Err(StoreError::NotFound("user"));
    }
    Ok(())
}

pub fn are_contacts(c: &Connection, a: UserId, b: UserId) -> Result<bool, StoreError> {
    let id = crate::logic::direct_conversation_id(a, b) as i64;
    Ok(
        c.prepare_cached("SELECT 1 FROM conversations WHERE id = ?1")?
            .exists([id])?,
    )
}

pub fn save_last_seen(c: &Connection, batch: &[LastSeenUpdate]) -> Result<(), StoreError> {
    let mut u = c.prepare_cached(
        "UPDATE users SET last_seen = MAX(COALESCE(last_seen, 0), ?2) WHERE id = ?1",
    )?;
    let mut d = c.prepare_cached(
        "UPDATE devices SET last_seen = MAX(COALESCE(last_seen, 0), ?2) WHERE id = ?1",
    )?;
    for up in batch {
        u.execute(params![up.user as i64, up.at_ms])?;
        d.execute(params![up.device as i64, up.at_ms])?;
    }
    Ok(())
}
