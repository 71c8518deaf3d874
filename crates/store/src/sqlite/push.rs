//! Push subscriptions, one per device, and the server's own secrets.

use rusqlite::{Connection, OptionalExtension, params};

use crate::logic::{PushDecision, push_claim, push_decision};
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
        "INSERT INTO push_subscriptions (device_id, endpoint, p256dh, auth, updated_ms, expires_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (device_id) DO UPDATE SET endpoint = excluded.endpoint,
             p256dh = excluded.p256dh, auth = excluded.auth, updated_ms = excluded.updated_ms,
             expires_ms = excluded.expires_ms,
             pushed_mseq = CASE WHEN push_subscriptions.endpoint = excluded.endpoint
                 THEN push_subscriptions.pushed_mseq END",
    )?
    .execute(params![
        device as i64,
        s.endpoint,
        s.p256dh,
        s.auth,
        s.updated_ms,
        s.expires_ms
    ])?;
    Ok(())
}

pub fn push_subscription(
    c: &Connection,
    device: DeviceId,
) -> Result<Option<PushSubscription>, StoreError> {
    Ok(c.prepare_cached(
        "SELECT endpoint, p256dh, auth, updated_ms, expires_ms FROM push_subscriptions
         WHERE device_id = ?1",
    )?
    .query_row([device as i64], |r| {
        Ok(PushSubscription {
            endpoint: r.get(0)?,
            p256dh: r.get(1)?,
            auth: r.get(2)?,
            updated_ms: r.get(3)?,
            expires_ms: r.get(4)?,
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

pub fn claim_push(
    c: &Connection,
    device: DeviceId,
    now_ms: i64,
    rules: &PushRules,
) -> Result<PushClaim, StoreError> {
    let row = c
        .prepare_cached(
            "SELECT endpoint, p256dh, auth, updated_ms, pushed_mseq, pushed_ms, push_confirmed,
                 expires_ms
             FROM push_subscriptions WHERE device_id = ?1",
        )?
        .query_row([device as i64], |r| {
            Ok((
                PushSubscription {
                    endpoint: r.get(0)?,
                    p256dh: r.get(1)?,
                    auth: r.get(2)?,
                    updated_ms: r.get(3)?,
                    expires_ms: r.get(7)?,
                },
                PushState {
                    pushed_mseq: r.get::<_, Option<i64>>(4)?.map(|m| m as u64),
                    pushed_ms: r.get(5)?,
                    confirmed: r.get(6)?,
                },
            ))
        })
        .optional()?;
    let Some((subscription, last)) = row else {
        return Ok(PushClaim::Nothing);
    };
    if subscription.expires_ms.is_some_and(|t| t <= now_ms) {
        return Ok(PushClaim::Nothing);
    }
    let (waiting, newest): (i64, Option<i64>) = c
        .prepare_cached(
            "SELECT count(*), max(mseq) FROM mailbox WHERE device_id = ?1 AND kind = 1",
        )?
        .query_row([device as i64], |r| Ok((r.get(0)?, r.get(1)?)))?;
    let oldest: Option<i64> = c
        .prepare_cached("SELECT min(mseq) FROM mailbox WHERE device_id = ?1")?
        .query_row([device as i64], |r| r.get(0))?;
    let decision = push_decision(
        &last,
        newest.map(|m| m as u64),
        oldest.map(|m| m as u64),
        now_ms,
        rules,
    );
    let mut since_ms = None;
    if let PushDecision::Send(mseq) = decision {
        since_ms = c
            .prepare_cached(
                "SELECT min(ts) FROM mailbox WHERE device_id = ?1 AND kind = 1 AND mseq > ?2",
            )?
            .query_row(
                params![device as i64, last.pushed_mseq.unwrap_or(0) as i64],
                |r| r.get(0),
            )?;
        c.prepare_cached(
            "UPDATE push_subscriptions SET pushed_mseq = ?2, pushed_ms = ?3, push_confirmed = 0
             WHERE device_id = ?1",
        )?
        .execute(params![device as i64, mseq as i64, now_ms])?;
    }
    Ok(push_claim(decision, subscription, waiting, since_ms))
}

pub fn settle_push(
    c: &Connection,
    device: DeviceId,
    mseq: u64,
    sent: bool,
) -> Result<(), StoreError> {
    let sql = if sent {
        "UPDATE push_subscriptions SET push_confirmed = 1 WHERE device_id = ?1 AND pushed_mseq = ?2"
    } else {
        "UPDATE push_subscriptions SET pushed_mseq = NULL, push_confirmed = 0
         WHERE device_id = ?1 AND pushed_mseq = ?2"
    };
    c.prepare_cached(sql)?
        .execute(params![device as i64, mseq as i64])?;
    Ok(())
}

/// The rule of [`push_decision`] without the window, over every subscription.
pub fn push_candidates(
    c: &Connection,
    now_ms: i64,
    rules: &PushRules,
    after: DeviceId,
    limit: usize,
) -> Result<Vec<(UserId, DeviceId)>, StoreError> {
    let mut st = c.prepare_cached(
        "SELECT d.user_id, s.device_id FROM push_subscriptions s JOIN devices d ON d.id = s.device_id
         WHERE s.device_id > ?1
           AND (s.expires_ms IS NULL OR s.expires_ms > ?2)
           AND EXISTS (SELECT 1 FROM mailbox m WHERE m.device_id = s.device_id AND m.kind = 1)
           AND (s.pushed_mseq IS NULL
                OR NOT EXISTS (SELECT 1 FROM mailbox m WHERE m.device_id = s.device_id
                               AND m.mseq <= s.pushed_mseq)
                OR s.pushed_ms <= ?2 - CASE WHEN s.push_confirmed THEN ?3 ELSE ?4 END)
         ORDER BY s.device_id LIMIT ?5",
    )?;
    let rows = st.query_map(
        params![
            after as i64,
            now_ms,
            rules.unanswered_ms,
            rules.abandoned_ms,
            limit as i64
        ],
        |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
    )?;
    Ok(rows.collect::<Result<_, _>>()?)
}
