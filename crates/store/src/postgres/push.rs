//! Push subscriptions, one per device, and the server's own secrets.

use deadpool_postgres::GenericClient;

use super::{RowExt, execute, id, query_one, query_opt};
use crate::*;

pub async fn set_push_subscription<C: GenericClient>(
    c: &C,
    device: DeviceId,
    s: &PushSubscription,
) -> Result<(), StoreError> {
    // The device row is locked, so a removal racing with this waits or is waited for.
    if query_opt(
        c,
        "SELECT 1 FROM devices WHERE id = $1 FOR SHARE",
        &[&id(device)],
    )
    .await?
    .is_none()
    {
        return Err(StoreError::NotFound("device"));
    }
    execute(
        c,
        "INSERT INTO push_subscriptions (device_id, endpoint, p256dh, auth, updated_ms)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (device_id) DO UPDATE SET endpoint = EXCLUDED.endpoint,
             p256dh = EXCLUDED.p256dh, auth = EXCLUDED.auth, updated_ms = EXCLUDED.updated_ms",
        &[&id(device), &s.endpoint, &s.p256dh, &s.auth, &s.updated_ms],
    )
    .await?;
    Ok(())
}

pub async fn push_subscription<C: GenericClient>(
    c: &C,
    device: DeviceId,
) -> Result<Option<PushSubscription>, StoreError> {
    let Some(r) = query_opt(
        c,
        "SELECT endpoint, p256dh, auth, updated_ms FROM push_subscriptions WHERE device_id = $1",
        &[&id(device)],
    )
    .await?
    else {
        return Ok(None);
    };
    Ok(Some(PushSubscription {
        endpoint: r.col(0)?,
        p256dh: r.col(1)?,
        auth: r.col(2)?,
        updated_ms: r.col(3)?,
    }))
}

pub async fn remove_push_subscription<C: GenericClient>(
    c: &C,
    device: DeviceId,
    endpoint: Option<&str>,
) -> Result<bool, StoreError> {
    Ok(execute(
        c,
        "DELETE FROM push_subscriptions WHERE device_id = $1 AND ($2::TEXT IS NULL OR endpoint = $2)",
        &[&id(device), &endpoint],
    )
    .await?
        == 1)
}

pub async fn server_secret<C: GenericClient>(
    c: &C,
    name: &str,
    candidate: &[u8],
) -> Result<Vec<u8>, StoreError> {
    execute(
        c,
        "INSERT INTO server_secrets (name, value) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        &[&name, &candidate],
    )
    .await?;
    query_one(
        c,
        "SELECT value FROM server_secrets WHERE name = $1",
        &[&name],
    )
    .await?
    .col(0)
}
