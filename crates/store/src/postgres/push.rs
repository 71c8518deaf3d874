//! Push subscriptions, one per device, and the server's own secrets.

use deadpool_postgres::GenericClient;

use super::{RowExt, execute, id, query, query_one, query_opt};
use crate::logic::{PushDecision, push_claim, push_decision};
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
        "INSERT INTO push_subscriptions (device_id, endpoint, p256dh, auth, updated_ms, expires_ms)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (device_id) DO UPDATE SET endpoint = EXCLUDED.endpoint,
             p256dh = EXCLUDED.p256dh, auth = EXCLUDED.auth, updated_ms = EXCLUDED.updated_ms,
             expires_ms = EXCLUDED.expires_ms,
             pushed_mseq = CASE WHEN push_subscriptions.endpoint = EXCLUDED.endpoint
                 THEN push_subscriptions.pushed_mseq END",
        &[
            &id(device),
            &s.endpoint,
            &s.p256dh,
            &s.auth,
            &s.updated_ms,
            &s.expires_ms,
        ],
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
        "SELECT endpoint, p256dh, auth, updated_ms, expires_ms FROM push_subscriptions
         WHERE device_id = $1",
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
        expires_ms: r.col(4)?,
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

/// In a transaction: each subscription row stays locked until its claim is recorded, so two
/// nodes deciding at once take turns; rows are locked in device order, so they cannot
/// deadlock.
pub async fn claim_pushes<C: GenericClient>(
    c: &C,
    devices: &[DeviceId],
    now_ms: i64,
    rules: &PushRules,
) -> Result<Vec<PushClaim>, StoreError> {
    let mut order: Vec<usize> = (0..devices.len()).collect();
    order.sort_by_key(|&i| devices[i]);
    let mut claims = vec![PushClaim::Nothing; devices.len()];
    for i in order {
        claims[i] = claim_push(c, devices[i], now_ms, rules).await?;
    }
    Ok(claims)
}

async fn claim_push<C: GenericClient>(
    c: &C,
    device: DeviceId,
    now_ms: i64,
    rules: &PushRules,
) -> Result<PushClaim, StoreError> {
    let Some(r) = query_opt(
        c,
        "SELECT endpoint, p256dh, auth, updated_ms, pushed_mseq, pushed_ms, push_confirmed,
             expires_ms
         FROM push_subscriptions WHERE device_id = $1 FOR UPDATE",
        &[&id(device)],
    )
    .await?
    else {
        return Ok(PushClaim::Nothing);
    };
    let subscription = PushSubscription {
        endpoint: r.col(0)?,
        p256dh: r.col(1)?,
        auth: r.col(2)?,
        updated_ms: r.col(3)?,
        expires_ms: r.col(7)?,
    };
    let last = PushState {
        pushed_mseq: r.col::<Option<i64>>(4)?.map(|m| m as u64),
        pushed_ms: r.col(5)?,
        confirmed: r.col(6)?,
    };
    if subscription.expires_ms.is_some_and(|t| t <= now_ms) {
        return Ok(PushClaim::Nothing);
    }
    let m = query_one(
        c,
        "SELECT count(*) FILTER (WHERE kind = 1), max(mseq) FILTER (WHERE kind = 1), min(mseq),
             min(ts) FILTER (WHERE kind = 1 AND mseq > $2)
         FROM mailbox WHERE device_id = $1",
        &[&id(device), &id(last.pushed_mseq.unwrap_or(0))],
    )
    .await?;
    let since_ms: Option<i64> = m.col(3)?;
    let waiting: i64 = m.col(0)?;
    let newest: Option<i64> = m.col(1)?;
    let oldest: Option<i64> = m.col(2)?;
    let decision = push_decision(
        &last,
        newest.map(|m| m as u64),
        oldest.map(|m| m as u64),
        now_ms,
        rules,
    );
    if let PushDecision::Send(mseq) = decision {
        execute(
            c,
            "UPDATE push_subscriptions SET pushed_mseq = $2, pushed_ms = $3, push_confirmed = FALSE
             WHERE device_id = $1",
            &[&id(device), &id(mseq), &now_ms],
        )
        .await?;
    }
    Ok(push_claim(decision, subscription, waiting, since_ms))
}

/// In device order, like claims, so that concurrent transactions cannot deadlock.
pub async fn settle_pushes<C: GenericClient>(
    c: &C,
    settles: &[(DeviceId, u64, bool)],
) -> Result<(), StoreError> {
    let mut sorted = settles.to_vec();
    sorted.sort_unstable();
    for (device, mseq, sent) in sorted {
        settle_push(c, device, mseq, sent).await?;
    }
    Ok(())
}

async fn settle_push<C: GenericClient>(
    c: &C,
    device: DeviceId,
    mseq: u64,
    sent: bool,
) -> Result<(), StoreError> {
    let sql = if sent {
        "UPDATE push_subscriptions SET push_confirmed = TRUE
         WHERE device_id = $1 AND pushed_mseq = $2"
    } else {
        "UPDATE push_subscriptions SET pushed_mseq = NULL, push_confirmed = FALSE
         WHERE device_id = $1 AND pushed_mseq = $2"
    };
    execute(c, sql, &[&id(device), &id(mseq)]).await?;
    Ok(())
}

/// The rule of [`push_decision`] without the window, over every subscription.
pub async fn push_candidates<C: GenericClient>(
    c: &C,
    now_ms: i64,
    rules: &PushRules,
    after: DeviceId,
    limit: usize,
) -> Result<Vec<(UserId, DeviceId)>, StoreError> {
    let rows = query(
        c,
        "SELECT d.user_id, s.device_id FROM push_subscriptions s JOIN devices d ON d.id = s.device_id
         WHERE s.device_id > $1
           AND (s.expires_ms IS NULL OR s.expires_ms > $2)
           AND EXISTS (SELECT 1 FROM mailbox m WHERE m.device_id = s.device_id AND m.kind = 1)
           AND (s.pushed_mseq IS NULL
                OR NOT EXISTS (SELECT 1 FROM mailbox m WHERE m.device_id = s.device_id
                               AND m.mseq <= s.pushed_mseq)
                OR s.pushed_ms <= $2 - CASE WHEN s.push_confirmed THEN $3::BIGINT ELSE $4::BIGINT END)
         ORDER BY s.device_id LIMIT $5",
        &[
            &id(after),
            &now_ms,
            &rules.unanswered_ms,
            &rules.abandoned_ms,
            &(limit as i64),
        ],
    )
    .await?;
    rows.iter()
        .map(|r| Ok((r.col::<i64>(0)? as u64, r.col::<i64>(1)? as u64)))
        .collect()
}
