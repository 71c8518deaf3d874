//! Push subscriptions, one per device, and the server's own secrets.

use rusqlite::{Connection, OptionalExtension, params};

use crate::*;

pub fn set_push_subscription(
    c: &Connection,
    device: DeviceId,
    s: &PushSubscription,
) -> Result<(), StoreError> {
    let exists = c
        .query_row(
            "SELECT 1 FROM devices WHERE id = ?1",
            [device as i64],
            |_| Ok(()),
        )
        .optional()?;
    if exists.is_none() {
        return Err(StoreError::NotFound("device"));
    }
    c.prepare_cached(
        "INSERT INTO push_subscriptions (device_id, endpoint, p256dh, auth, updated_ms)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (device_id) DO UPDATE SET endpoint = excluded.endpoint,
             p256dh = excluded.p256dh, auth = excluded.auth, updated_ms = excluded.updated_ms",
    )?
    .execute(params![
        device as i64,
        s.endpoint,
        s.p256dh,
        s.auth,
        s.updated_ms
    ])?;
    Ok(())
}

pub fn push_subscription(
    c: &Connection,
    device: DeviceId,
) -> Result<Option<PushSubscription>, StoreError> {
    Ok(c.prepare_cached(
        "SELECT endpoint, p256dh, auth, updated_ms FROM push_subscriptions WHERE device_id = ?1",
    )?
    .query_row([device as i64], |r| {
        Ok(PushSubscription {
            endpoint: r.get(0)?,
            p256dh: r.get(1)?,
            auth: r.get(2)?,
            updated_ms: r.get(3)?,
        })
    })
    .optional()?)
}

pub fn remove_push_subscription(
    c: &Connection,
    device: DeviceId,
    endpoint: Option<&str>,
) -> Result<bool, StoreError> {
    Ok(c.prepare_cached(
        "DELETE FROM push_subscriptions WHERE device_id = ?1 AND (?2 IS NULL OR endpoint = ?2)",
    )?
    .execute(params![device as i64, endpoint])?
        == 1)
}

pub fn server_secret(c: &Connection, name: &str, candidate: &[u8]) -> Result<Vec<u8>, StoreError> {
    c.prepare_cached(
        "INSERT INTO server_secrets (name, value) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
    )?
    .execute(params![name, candidate])?;
    Ok(
        c.prepare_cached("SELECT value FROM server_secrets WHERE name = ?1")?
            .query_row([name], |r| r.get(0))?,
    )
}
