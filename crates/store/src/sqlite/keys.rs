//! The key directory: identity, one-time and fallback keys of devices, stored as opaque text.

use rusqlite::{Connection, OptionalExtension, params};

use crate::*;

fn identity(c: &Connection, device: DeviceId) -> Result<Option<IdentityKeysRecord>, StoreError> {
    Ok(c.prepare_cached(
        "SELECT curve25519, ed25519, signature FROM device_keys WHERE device_id = ?1",
    )?
    .query_row([device as i64], |r| {
        Ok(IdentityKeysRecord {
            curve25519: r.get(0)?,
            ed25519: r.get(1)?,
            signature: r.get(2)?,
        })
    })
    .optional()?)
}

pub fn key_counts(c: &Connection, device: DeviceId) -> Result<KeyCountRecord, StoreError> {
    let one_time_keys: i64 = c
        .prepare_cached("SELECT COUNT(*) FROM one_time_keys WHERE device_id = ?1")?
        .query_row([device as i64], |r| r.get(0))?;
    let fallback_key_used: bool = c
        .prepare_cached("SELECT fallback_used FROM device_keys WHERE device_id = ?1")?
        .query_row([device as i64], |r| r.get(0))
        .optional()?
        .unwrap_or(false);
    Ok(KeyCountRecord {
        one_time_keys: one_time_keys as u64,
        fallback_key_used,
    })
}

pub fn publish_keys(
    c: &Connection,
    device: DeviceId,
    keys: &KeyUpload,
    max_one_time_keys: usize,
) -> Result<KeyCountRecord, StoreError> {
    let exists: bool = c
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM devices WHERE id = ?1)")?
        .query_row([device as i64], |r| r.get(0))?;
    if !exists {
        return Err(StoreError::NotFound("device"));
    }
    let current = identity(c, device)?;
    match (&current, &keys.identity) {
        (Some(have), Some(new)) if have != new => return Err(StoreError::IdentityKeysChanged),
        (None, Some(new)) => {
            c.prepare_cached(
                "INSERT INTO device_keys (device_id, curve25519, ed25519, signature) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![device as i64, new.curve25519, new.ed25519, new.signature])?;
        }
        (None, None) if !keys.one_time_keys.is_empty() || keys.fallback_key.is_some() => {
            return Err(StoreError::Invalid(
                "publish identity keys before one-time or fallback keys".into(),
            ));
        }
        _ => {}
    }
    let mut insert = c.prepare_cached(
        "INSERT OR IGNORE INTO one_time_keys (device_id, key_id, key, signature) VALUES (?1, ?2, ?3, ?4)",
    )?;
    for k in &keys.one_time_keys {
        insert.execute(params![device as i64, k.id, k.key, k.signature])?;
    }
    if let Some(f) = &keys.fallback_key {
        c.prepare_cached(
            "UPDATE device_keys SET fallback_id = ?2, fallback_key = ?3, fallback_signature = ?4,
             fallback_used = 0 WHERE device_id = ?1",
        )?
        .execute(params![device as i64, f.id, f.key, f.signature])?;
    }
    let counts = key_counts(c, device)?;
    if counts.one_time_keys as usize > max_one_time_keys {
        // The savepoint rolls the whole upload back.
        return Err(StoreError::KeyLimit(max_one_time_keys));
    }
    Ok(counts)
}

pub fn device_keys(c: &Connection, user: UserId) -> Result<Vec<DeviceKeysRecord>, StoreError> {
    let mut st = c.prepare_cached(
        "SELECT d.id, k.curve25519, k.ed25519, k.signature FROM devices d
         LEFT JOIN device_keys k ON k.device_id = d.id WHERE d.user_id = ?1 ORDER BY d.id",
    )?;
    let rows = st.query_map([user as i64], |r| {
        let curve: Option<String> = r.get(1)?;
        Ok(DeviceKeysRecord {
            device: r.get::<_, i64>(0)? as DeviceId,
            identity: match curve {
                Some(curve25519) => Some(IdentityKeysRecord {
                    curve25519,
                    ed25519: r.get(2)?,
                    signature: r.get(3)?,
                }),
                None => None,
            },
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn claim_keys(
    c: &Connection,
    devices: &[DeviceId],
) -> Result<Vec<ClaimedKeyRecord>, StoreError> {
    let mut out = Vec::with_capacity(devices.len());
    for &device in devices {
        let Some(user) = c
            .prepare_cached("SELECT user_id FROM devices WHERE id = ?1")?
            .query_row([device as i64], |r| r.get::<_, i64>(0))
            .optional()?
        else {
            continue;
        };
        let otk = c
            .prepare_cached(
                "DELETE FROM one_time_keys WHERE device_id = ?1 AND key_id =
                   (SELECT key_id FROM one_time_keys WHERE device_id = ?1 ORDER BY key_id LIMIT 1)
                 RETURNING key_id, key, signature",
            )?
            .query_row([device as i64], |r| {
                Ok(SignedKeyRecord {
                    id: r.get(0)?,
                    key: r.get(1)?,
                    signature: r.get(2)?,
                })
            })
            .optional()?;
        let (key, fallback) = match otk {
            Some(k) => (k, false),
            None => {
                let fb = c
                    .prepare_cached(
                        "UPDATE device_keys SET fallback_used = 1
                         WHERE device_id = ?1 AND fallback_key IS NOT NULL
                         RETURNING fallback_id, fallback_key, fallback_signature",
                    )?
                    .query_row([device as i64], |r| {
                        Ok(SignedKeyRecord {
                            id: r.get(0)?,
                            key: r.get(1)?,
                            signature: r.get(2)?,
                        })
                    })
                    .optional()?;
                match fb {
                    Some(k) => (k, true),
                    None => continue,
                }
            }
        };
        out.push(ClaimedKeyRecord {
            user: user as UserId,
            device,
            key,
            fallback,
        });
    }
    Ok(out)
}
