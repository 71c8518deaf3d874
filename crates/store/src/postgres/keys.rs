//! The key directory: identity, one-time and fallback keys of devices, stored as opaque text.

use deadpool_postgres::GenericClient;

use super::{RowExt, execute, id, query, query_one, query_opt};
use crate::*;

async fn identity<C: GenericClient>(
    c: &C,
    device: DeviceId,
) -> Result<Option<IdentityKeysRecord>, StoreError> {
    let Some(r) = query_opt(
        c,
        "SELECT curve25519, ed25519, signature FROM device_keys WHERE device_id = $1",
        &[&id(device)],
    )
    .await?
    else {
        return Ok(None);
    };
    Ok(Some(IdentityKeysRecord {
        curve25519: r.col(0)?,
        ed25519: r.col(1)?,
        signature: r.col(2)?,
    }))
}

pub async fn key_counts<C: GenericClient>(
    c: &C,
    device: DeviceId,
) -> Result<KeyCountRecord, StoreError> {
    let r = query_one(
        c,
        "SELECT (SELECT COUNT(*) FROM one_time_keys WHERE device_id = $1),
                COALESCE((SELECT fallback_used FROM device_keys WHERE device_id = $1), false)",
        &[&id(device)],
    )
    .await?;
    Ok(KeyCountRecord {
        one_time_keys: r.col::<i64>(0)? as u64,
        fallback_key_used: r.col(1)?,
    })
}

pub async fn publish_keys<C: GenericClient>(
    c: &C,
    device: DeviceId,
    keys: &KeyUpload,
    max_one_time_keys: usize,
) -> Result<KeyCountRecord, StoreError> {
    // The device's row first: publishes of one device are serialised, so the count below is
    // exact.
    if query_opt(
        c,
        "SELECT 1 FROM devices WHERE id = $1 FOR UPDATE",
        &[&id(device)],
    )
    .await?
    .is_none()
    {
        return Err(StoreError::NotFound("device"));
    }
    let current = identity(c, device).await?;
    match (&current, &keys.identity) {
        (Some(have), Some(new)) if have != new => return Err(StoreError::IdentityKeysChanged),
        (None, Some(new)) => {
            execute(
                c,
                "INSERT INTO device_keys (device_id, curve25519, ed25519, signature)
                 VALUES ($1, $2, $3, $4)",
                &[&id(device), &new.curve25519, &new.ed25519, &new.signature],
            )
            .await?;
        }
        (None, None) if !keys.one_time_keys.is_empty() || keys.fallback_key.is_some() => {
            return Err(StoreError::Invalid(
                "publish identity keys before one-time or fallback keys".into(),
            ));
        }
        _ => {}
    }
    if !keys.one_time_keys.is_empty() {
        let ids: Vec<&str> = keys.one_time_keys.iter().map(|k| k.id.as_str()).collect();
        let values: Vec<&str> = keys.one_time_keys.iter().map(|k| k.key.as_str()).collect();
        let sigs: Vec<&str> = keys
            .one_time_keys
            .iter()
            .map(|k| k.signature.as_str())
            .collect();
        // An id already stored keeps its key (the first one in the upload wins among repeats).
        execute(
            c,
            "INSERT INTO one_time_keys (device_id, key_id, key, signature)
             SELECT DISTINCT ON (k) $1::BIGINT, k, v, s FROM UNNEST($2::TEXT[], $3::TEXT[], $4::TEXT[])
                    WITH ORDINALITY AS a(k, v, s, n)
             ORDER BY k, n
             ON CONFLICT (device_id, key_id) DO NOTHING",
            &[&id(device), &ids, &values, &sigs],
        )
        .await?;
    }
    if let Some(f) = &keys.fallback_key {
        execute(
            c,
            "UPDATE device_keys SET fallback_id = $2, fallback_key = $3, fallback_signature = $4,
                    fallback_used = false
             WHERE device_id = $1",
            &[&id(device), &f.id, &f.key, &f.signature],
        )
        .await?;
    }
    let counts = key_counts(c, device).await?;
    if counts.one_time_keys as usize > max_one_time_keys {
        // The transaction is not committed: the whole upload is undone.
        return Err(StoreError::KeyLimit(max_one_time_keys));
    }
    Ok(counts)
}

pub async fn device_keys<C: GenericClient>(
    c: &C,
    user: UserId,
) -> Result<Vec<DeviceKeysRecord>, StoreError> {
    query(
        c,
        "SELECT d.id, k.curve25519, k.ed25519, k.signature FROM devices d
         LEFT JOIN device_keys k ON k.device_id = d.id WHERE d.user_id = $1 ORDER BY d.id",
        &[&id(user)],
    )
    .await?
    .iter()
    .map(|r| {
        let curve: Option<String> = r.col(1)?;
        Ok(DeviceKeysRecord {
            device: r.col::<i64>(0)? as DeviceId,
            identity: match curve {
                Some(curve25519) => Some(IdentityKeysRecord {
                    curve25519,
                    ed25519: r.col(2)?,
                    signature: r.col(3)?,
                }),
                None => None,
            },
        })
    })
    .collect()
}

fn signed(r: &tokio_postgres::Row) -> Result<SignedKeyRecord, StoreError> {
    Ok(SignedKeyRecord {
        id: r.col(0)?,
        key: r.col(1)?,
        signature: r.col(2)?,
    })
}

pub async fn claim_keys<C: GenericClient>(
    c: &C,
    devices: &[DeviceId],
) -> Result<Vec<ClaimedKeyRecord>, StoreError> {
    let mut out = Vec::with_capacity(devices.len());
    for &device in devices {
        let Some(user) = query_opt(
            c,
            "SELECT user_id FROM devices WHERE id = $1",
            &[&id(device)],
        )
        .await?
        else {
            continue;
        };
        let user = user.col::<i64>(0)? as UserId;
        // SKIP LOCKED: a key another claim has taken (and not yet committed) is passed over,
        // so concurrent claimers never receive the same one-time key, and do not queue.
        let otk = query_opt(
            c,
            "DELETE FROM one_time_keys WHERE device_id = $1 AND key_id =
               (SELECT key_id FROM one_time_keys WHERE device_id = $1 ORDER BY key_id LIMIT 1
                FOR UPDATE SKIP LOCKED)
             RETURNING key_id, key, signature",
            &[&id(device)],
        )
        .await?;
        let (key, fallback) = match otk {
            Some(r) => (signed(&r)?, false),
            None => {
                let fb = query_opt(
                    c,
                    "UPDATE device_keys SET fallback_used = true
                     WHERE device_id = $1 AND fallback_key IS NOT NULL
                     RETURNING fallback_id, fallback_key, fallback_signature",
                    &[&id(device)],
                )
                .await?;
                match fb {
                    Some(r) => (signed(&r)?, true),
                    None => continue,
                }
            }
        };
        out.push(ClaimedKeyRecord {
            user,
            device,
            key,
            fallback,
        });
    }
    Ok(out)
}
