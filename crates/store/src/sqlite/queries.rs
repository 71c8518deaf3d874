//! The SQL behind each store call. Functions take a `&Connection` (a read connection or the
//! writer's open transaction) and do no locking of their own.

use std::sync::Arc;

use rusqlite::{Connection, OptionalExtension, params};

use crate::logic::check_device_set;
use crate::*;

fn visibility_from(i: i64) -> Visibility {
    match i {
        1 => Visibility::Contacts,
        2 => Visibility::Nobody,
        _ => Visibility::Everyone,
    }
}

pub fn visibility_to(v: Visibility) -> i64 {
    match v {
        Visibility::Everyone => 0,
        Visibility::Contacts => 1,
        Visibility::Nobody => 2,
    }
}

pub fn create_user(c: &Connection, name: &str, hash: &str, now: i64) -> Result<UserId, StoreError> {
    let r = c.execute(
        "INSERT INTO users (username, password_hash, created_at) VALUES (?1, ?2, ?3)",
        params![name, hash, now],
    );
    match r {
        Ok(_) => Ok(c.last_insert_rowid() as UserId),
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
            last_seen_privacy: visibility_from(r.get(4)?),
        })
    })
    .optional()?)
}

fn user_ref(c: &Connection, id: UserId) -> Result<Option<UserRef>, StoreError> {
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

fn device_ids(c: &Connection, user: UserId) -> Result<Vec<DeviceId>, StoreError> {
    let mut st = c.prepare_cached("SELECT id FROM devices WHERE user_id = ?1 ORDER BY id")?;
    let rows = st.query_map([user as i64], |r| Ok(r.get::<_, i64>(0)? as DeviceId))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Deletes mailbox entries of `device` up to `up_to` and releases the message bodies no device
/// needs any more. Returns the deleted message entries as (conversation_id, seq).
fn delete_mailbox(
    c: &Connection,
    device: DeviceId,
    up_to: u64,
) -> Result<Vec<(i64, u64)>, StoreError> {
    let mut st = c.prepare_cached(
        "DELETE FROM mailbox WHERE device_id = ?1 AND mseq <= ?2 RETURNING kind, conversation_id, seq",
    )?;
    let rows = st.query_map(params![device as i64, up_to as i64], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, i64>(2)? as u64,
        ))
    })?;
    let mut messages = Vec::new();
    for row in rows {
        let (kind, conv, seq) = row?;
        if kind == 1 {
            messages.push((conv, seq));
        }
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
        params![user as i64, visibility_to(v)],
    )?;
    if n == 0 {
        return Err(StoreError::NotFound("user"));
    }
    Ok(())
}

pub fn are_contacts(c: &Connection, a: UserId, b: UserId) -> Result<bool, StoreError> {
    let (lo, hi) = (a.min(b), a.max(b));
    Ok(
        c.prepare_cached("SELECT 1 FROM conversations WHERE user_lo = ?1 AND user_hi = ?2")?
            .exists(params![lo as i64, hi as i64])?,
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

fn conversation_by_id(c: &Connection, id: i64) -> Result<Conversation, StoreError> {
    let (lo, hi): (i64, i64) = c
        .prepare_cached("SELECT user_lo, user_hi FROM conversations WHERE id = ?1")?
        .query_row([id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?
        .ok_or(StoreError::NotFound("conversation"))?;
    let lo = user_ref(c, lo as UserId)?.ok_or(StoreError::NotFound("user"))?;
    let hi = user_ref(c, hi as UserId)?.ok_or(StoreError::NotFound("user"))?;
    Ok(Conversation { lo, hi })
}

/// A mailbox row to append (see the `mailbox` table for the meaning of `kind` and `seq`).
struct NewEntry<'a> {
    kind: i64,
    conv: i64,
    seq: u64,
    reader: Option<UserId>,
    body: Option<&'a [u8]>,
    ts: i64,
}

/// Appends one entry to a device's mailbox and returns its sequence number.
fn append(c: &Connection, device: DeviceId, e: NewEntry<'_>) -> Result<u64, StoreError> {
    let NewEntry {
        kind,
        conv,
        seq,
        reader,
        body,
        ts,
    } = e;
    let mseq: i64 = c
        .prepare_cached(
            "UPDATE devices SET next_mseq = next_mseq + 1 WHERE id = ?1 RETURNING next_mseq - 1",
        )?
        .query_row([device as i64], |r| r.get(0))?;
    c.prepare_cached(
        "INSERT INTO mailbox (device_id, mseq, kind, conversation_id, seq, reader, body, ts)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
        device as i64,
        mseq,
        kind,
        conv,
        seq as i64,
        reader.map(|r| r as i64),
        body,
        ts
    ])?;
    Ok(mseq as u64)
}

pub fn post_message(c: &Connection, p: &NewMessage) -> Result<PostOutcome, StoreError> {
    if let Some((seq, ts)) = c
        .prepare_cached(
            "SELECT seq, server_ts FROM messages WHERE sender_device = ?1 AND client_msg_id = ?2",
        )?
        .query_row(params![p.sender.device_id as i64, p.client_msg_id], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)?))
        })
        .optional()?
    {
        return Ok(PostOutcome::Duplicate {
            seq,
            server_ts_ms: ts,
        });
    }
    let sender = UserRef {
        id: p.sender.user_id,
        username: p.sender.username.clone(),
    };
    let recipient = user_ref(c, p.recipient)?.ok_or(StoreError::NotFound("recipient"))?;

    // The addressed set must be exactly: every device of the recipient and every other device
    // of the sender (for a note to self, the two coincide).
    let recipient_devices = device_ids(c, recipient.id)?;
    let mut expected = recipient_devices.clone();
    if recipient.id != sender.id {
        expected.extend(device_ids(c, sender.id)?);
    }
    expected.retain(|d| *d != p.sender.device_id);
    let addressed: Vec<DeviceId> = p.devices.iter().map(|d| d.device).collect();
    check_device_set(&expected, &addressed)?;

    let (lo, hi) = if sender.id <= recipient.id {
        (sender, recipient)
    } else {
        (recipient, sender)
    };
    let conv_id: i64 = c
        .prepare_cached(
            "INSERT INTO conversations (user_lo, user_hi) VALUES (?1, ?2)
             ON CONFLICT (user_lo, user_hi) DO UPDATE SET next_seq = next_seq
             RETURNING id",
        )?
        .query_row(params![lo.id as i64, hi.id as i64], |r| r.get(0))?;
    let seq: i64 = c
        .prepare_cached(
            "UPDATE conversations SET next_seq = next_seq + 1 WHERE id = ?1 RETURNING next_seq - 1",
        )?
        .query_row([conv_id], |r| r.get(0))?;
    let seq = seq as u64;

    let shared_used = p.devices.iter().any(|d| d.body.is_none());
    c.prepare_cached(
        "INSERT INTO messages (conversation_id, seq, sender_user, sender_device, client_msg_id, server_ts, body, pending)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
        conv_id,
        seq as i64,
        p.sender.user_id as i64,
        p.sender.device_id as i64,
        p.client_msg_id,
        p.now_ms,
        if shared_used && !p.devices.is_empty() { Some(&p.body[..]) } else { None },
        p.devices.len() as i64
    ])?;

    let conversation = Conversation { lo, hi };
    let shared = Arc::new(MessageRecord {
        conversation,
        seq,
        sender_user: p.sender.user_id,
        sender_device: p.sender.device_id,
        client_msg_id: p.client_msg_id.clone(),
        server_ts_ms: p.now_ms,
        body: Arc::from(&p.body[..]),
    });
    let mut deliveries = Vec::with_capacity(p.devices.len());
    for d in &p.devices {
        let mseq = append(
            c,
            d.device,
            NewEntry {
                kind: 1,
                conv: conv_id,
                seq,
                reader: None,
                body: d.body.as_deref(),
                ts: p.now_ms,
            },
        )?;
        let record = match &d.body {
            None => shared.clone(),
            Some(own) => Arc::new(MessageRecord {
                body: Arc::from(&own[..]),
                ..(*shared).clone()
            }),
        };
        let user = if recipient_devices.contains(&d.device) {
            p.recipient
        } else {
            p.sender.user_id
        };
        deliveries.push(Delivery {
            device: d.device,
            user,
            entry: MailboxEntry {
                mseq,
                item: MailboxItem::Message(record),
            },
        });
    }
    Ok(PostOutcome::Stored {
        seq,
        server_ts_ms: p.now_ms,
        deliveries,
    })
}

/// Appends a receipt to every device of `to_user` (except `skip`), returning the deliveries.
fn send_receipt(
    c: &Connection,
    to_user: UserId,
    skip: Option<DeviceId>,
    conv_id: i64,
    record: Arc<ReceiptRecord>,
    out: &mut Vec<Delivery>,
) -> Result<(), StoreError> {
    let kind = match record.kind {
        ReceiptKind::Delivered => 2,
        ReceiptKind::Read => 3,
    };
    for device in device_ids(c, to_user)? {
        if Some(device) == skip {
            continue;
        }
        let entry = NewEntry {
            kind,
            conv: conv_id,
            seq: record.up_to_seq,
            reader: Some(record.reader),
            body: None,
            ts: record.ts_ms,
        };
        let mseq = append(c, device, entry)?;
        out.push(Delivery {
            device,
            user: to_user,
            entry: MailboxEntry {
                mseq,
                item: MailboxItem::Receipt(record.clone()),
            },
        });
    }
    Ok(())
}

/// Raises a watermark if `up_to` is above it; returns whether it grew.
fn raise_watermark(
    c: &Connection,
    conv: i64,
    reader: UserId,
    kind: ReceiptKind,
    up_to: u64,
) -> Result<bool, StoreError> {
    c.prepare_cached(
        "INSERT INTO receipts (conversation_id, reader) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
    )?
    .execute(params![conv, reader as i64])?;
    let sql = match kind {
        ReceiptKind::Delivered => {
            "UPDATE receipts SET delivered_up_to = ?3 WHERE conversation_id = ?1 AND reader = ?2 AND delivered_up_to < ?3"
        }
        ReceiptKind::Read => {
            "UPDATE receipts SET read_up_to = ?3, delivered_up_to = MAX(delivered_up_to, ?3) WHERE conversation_id = ?1 AND reader = ?2 AND read_up_to < ?3"
        }
    };
    Ok(c.prepare_cached(sql)?
        .execute(params![conv, reader as i64, up_to as i64])?
        > 0)
}

pub fn ack(
    c: &Connection,
    who: &DeviceAuth,
    up_to: u64,
    now: i64,
) -> Result<Vec<Delivery>, StoreError> {
    let acked = delete_mailbox(c, who.device_id, up_to)?;
    // Highest acknowledged seq per conversation among messages *to* this user.
    let mut highest: Vec<(i64, u64)> = Vec::new();
    let mut sender_of = c.prepare_cached(
        "SELECT sender_user FROM messages WHERE conversation_id = ?1 AND seq = ?2",
    )?;
    for (conv, seq) in acked {
        let sender: Option<i64> = sender_of
            .query_row(params![conv, seq as i64], |r| r.get(0))
            .optional()?;
        if sender.is_none() || sender == Some(who.user_id as i64) {
            continue;
        }
        match highest.iter_mut().find(|(c, _)| *c == conv) {
            Some((_, s)) => *s = (*s).max(seq),
            None => highest.push((conv, seq)),
        }
    }
    let mut out = Vec::new();
    for (conv_id, seq) in highest {
        if !raise_watermark(c, conv_id, who.user_id, ReceiptKind::Delivered, seq)? {
            continue;
        }
        let conversation = conversation_by_id(c, conv_id)?;
        let peer = conversation.peer_of(who.user_id).id;
        let record = Arc::new(ReceiptRecord {
            conversation,
            reader: who.user_id,
            kind: ReceiptKind::Delivered,
            up_to_seq: seq,
            ts_ms: now,
        });
        send_receipt(c, peer, None, conv_id, record, &mut out)?;
    }
    Ok(out)
}

pub fn mark_read(
    c: &Connection,
    who: &DeviceAuth,
    peer: UserId,
    up_to: u64,
    now: i64,
) -> Result<Vec<Delivery>, StoreError> {
    let (lo, hi) = (who.user_id.min(peer), who.user_id.max(peer));
    let conv: Option<(i64, i64)> = c
        .prepare_cached(
            "SELECT id, next_seq FROM conversations WHERE user_lo = ?1 AND user_hi = ?2",
        )?
        .query_row(params![lo as i64, hi as i64], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()?;
    let (conv_id, next_seq) = conv.ok_or(StoreError::NotFound("conversation"))?;
    if up_to >= next_seq as u64 {
        return Err(StoreError::Invalid(format!(
            "up_to_seq {up_to} is beyond the last message ({})",
            next_seq - 1
        )));
    }
    let mut out = Vec::new();
    if !raise_watermark(c, conv_id, who.user_id, ReceiptKind::Read, up_to)? {
        return Ok(out);
    }
    let conversation = conversation_by_id(c, conv_id)?;
    let record = Arc::new(ReceiptRecord {
        conversation,
        reader: who.user_id,
        kind: ReceiptKind::Read,
        up_to_seq: up_to,
        ts_ms: now,
    });
    if peer != who.user_id {
        send_receipt(c, peer, None, conv_id, record.clone(), &mut out)?;
    }
    send_receipt(
        c,
        who.user_id,
        Some(who.device_id),
        conv_id,
        record,
        &mut out,
    )?;
    Ok(out)
}

pub fn mailbox_after(
    c: &Connection,
    device: DeviceId,
    after: u64,
    limit: usize,
) -> Result<Vec<MailboxEntry>, StoreError> {
    let mut st = c.prepare_cached(
        "SELECT m.mseq, m.kind, m.conversation_id, m.seq, m.reader, m.ts,
                COALESCE(m.body, g.body), g.sender_user, g.sender_device, g.client_msg_id, g.server_ts,
                c.user_lo, ulo.username, c.user_hi, uhi.username
         FROM mailbox m
         JOIN conversations c ON c.id = m.conversation_id
         JOIN users ulo ON ulo.id = c.user_lo
         JOIN users uhi ON uhi.id = c.user_hi
         LEFT JOIN messages g ON m.kind = 1 AND g.conversation_id = m.conversation_id AND g.seq = m.seq
         WHERE m.device_id = ?1 AND m.mseq > ?2
         ORDER BY m.mseq LIMIT ?3",
    )?;
    let rows = st.query_map(params![device as i64, after as i64, limit as i64], |r| {
        let conversation = Conversation {
            lo: UserRef {
                id: r.get::<_, i64>(11)? as UserId,
                username: r.get(12)?,
            },
            hi: UserRef {
                id: r.get::<_, i64>(13)? as UserId,
                username: r.get(14)?,
            },
        };
        let mseq = r.get::<_, i64>(0)? as u64;
        let kind: i64 = r.get(1)?;
        let seq = r.get::<_, i64>(3)? as u64;
        let item = if kind == 1 {
            let body: Option<Vec<u8>> = r.get(6)?;
            MailboxItem::Message(Arc::new(MessageRecord {
                conversation,
                seq,
                sender_user: r.get::<_, i64>(7)? as UserId,
                sender_device: r.get::<_, i64>(8)? as DeviceId,
                client_msg_id: r.get(9)?,
                server_ts_ms: r.get(10)?,
                body: Arc::from(body.unwrap_or_default()),
            }))
        } else {
            MailboxItem::Receipt(Arc::new(ReceiptRecord {
                conversation,
                reader: r.get::<_, Option<i64>>(4)?.unwrap_or_default() as UserId,
                kind: if kind == 2 {
                    ReceiptKind::Delivered
                } else {
                    ReceiptKind::Read
                },
                up_to_seq: seq,
                ts_ms: r.get(5)?,
            }))
        };
        Ok(MailboxEntry { mseq, item })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}
