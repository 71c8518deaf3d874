//! Storing mailbox events: one transaction per batch, then the events worth telling the app.
//!
//! Messages are de-duplicated by (conversation, seq) — `INSERT OR IGNORE` on the unique index —
//! so a batch redelivered after a reconnect emits nothing twice. Receipts are watermarks: each
//! one may raise the reader's own watermark (kept per reader so it is reported once) and the
//! conversation's ticks of my messages, which come from the receipt's `all_*` fields ("every
//! other participant has ..."); in a direct conversation the peer's own watermark is the same
//! thing, which keeps servers that send no `all_*` working.

use prost::Message as _;
use rusqlite::{OptionalExtension, Transaction, params};
use tern_proto::frames::{self, event};

use super::{
    Applied, Conv, Decrypted, Decryptor, LocalStore, crypto, query, raise_watermarks, set_meta,
    upsert_group, upsert_peer,
};
use crate::error::Error;
use crate::types::{DecryptionFailed, Event, ReceiptEvent, ReceiptKind, StoredMessage};

impl LocalStore {
    /// Stores a batch of mailbox events in one transaction. Messages already stored (same
    /// conversation and seq) and receipts that raise no watermark produce no event.
    pub fn apply_events(&self, me: u64, batch: &[frames::Event]) -> Result<Applied, Error> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let mut applied = Applied::default();
        let mut dec = Decryptor::new(&self.key);
        for ev in batch {
            applied.ack_up_to = applied.ack_up_to.max(ev.mailbox_seq);
            let out = match &ev.kind {
                Some(event::Kind::Message(m)) => match apply_message(&tx, &mut dec, me, m)? {
                    Some(stored) => {
                        if let Some(why) = &stored.undecryptable {
                            applied
                                .events
                                .push(Event::DecryptionFailed(DecryptionFailed {
                                    conversation: stored.conversation.clone(),
                                    seq: m.seq,
                                    from: stored.from.clone(),
                                    reason: why.clone(),
                                }));
                        }
                        Some(Event::Message(Box::new(stored)))
                    }
                    None => None,
                },
                Some(event::Kind::Receipt(r)) => apply_receipt(&tx, me, r)?.map(Event::Receipt),
                None => {
                    tracing::warn!(
                        mailbox_seq = ev.mailbox_seq,
                        "event without content, skipped"
                    );
                    None
                }
            };
            applied.events.extend(out);
        }
        let cursor: u64 = tx
            .query_row(
                "SELECT value FROM meta WHERE key = 'mailbox_cursor'",
                [],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or(0);
        set_meta(&tx, "mailbox_cursor", cursor.max(applied.ack_up_to))?;
        applied.one_time_key_used = dec.one_time_key_used;
        dec.finish(&tx)?;
        tx.commit()?;
        Ok(applied)
    }
}

fn apply_message(
    tx: &Transaction<'_>,
    dec: &mut Decryptor<'_>,
    me: u64,
    m: &frames::Message,
) -> Result<Option<StoredMessage>, Error> {
    let Some(conv) = Conv::from_peer(m.conversation.as_ref()) else {
        tracing::warn!(seq = m.seq, "message without a conversation, skipped");
        return Ok(None);
    };
    let system = m.kind == frames::MessageKind::System as i32;
    let change = if system {
        frames::GroupEvent::decode(m.body.as_slice()).ok()
    } else {
        None
    };
    if system && change.is_none() {
        // Kept anyway (it occupies a seq); it reads as an unknown change by its sender.
        tracing::warn!(seq = m.seq, "system message with an undecodable body");
    }
    let conv_name = match conv {
        Conv::Direct(_) => m.peer_username.as_str(),
        // A system message carries the name after the change.
        Conv::Group(_) => change
            .as_ref()
            .map(|c| c.name.as_str())
            .filter(|n| !n.is_empty())
            .unwrap_or(&m.group_name),
    };
    // Already stored (a redelivery): decrypting again would fail, the ratchet has moved on.
    let known: bool = tx
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM messages WHERE conv_kind = ?1 AND conv_id = ?2 AND seq = ?3)
                 OR EXISTS (SELECT 1 FROM hidden_seqs WHERE conv_kind = ?1 AND conv_id = ?2 AND seq = ?3)",
        )?
        .query_row(params![conv.kind(), conv.id(), m.seq], |r| r.get(0))?;
    if known {
        return Ok(None);
    }
    let (body, undecryptable) = if system {
        if let (Some(c), Conv::Group(g)) = (&change, conv)
            && matches!(
                frames::GroupAction::try_from(c.action),
                Ok(frames::GroupAction::Removed | frames::GroupAction::Left)
            )
        {
            // Whoever left must not read what I send next: a new group session.
            crypto::discard_outbound_group(tx, g)?;
        }
        (m.body.clone(), None)
    } else {
        match dec.decrypt(tx, conv, m)? {
            Decrypted::Content(b) => (b, None),
            Decrypted::Hidden => {
                tx.execute(
                    "INSERT OR IGNORE INTO hidden_seqs (conv_kind, conv_id, seq) VALUES (?1, ?2, ?3)",
                    params![conv.kind(), conv.id(), m.seq],
                )?;
                upsert_peer(tx, m.sender_user, &m.sender_username)?;
                return Ok(None);
            }
            Decrypted::Failed(why) => {
                tracing::warn!(seq = m.seq, sender_device = m.sender_device, reason = %why, "cannot decrypt a message");
                (Vec::new(), Some(why))
            }
        }
    };
    let inserted = tx.execute(
        "INSERT OR IGNORE INTO messages (conv_kind, conv_id, conv_name, seq, sender_user,
             sender_username, sender_device, outgoing, system, client_msg_id, body,
             server_ts_ms, created_ms, undecryptable)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?12, ?13)",
        params![
            conv.kind(),
            conv.id(),
            conv_name,
            m.seq,
            m.sender_user,
            m.sender_username,
            m.sender_device,
            // System messages are the server's, whoever acted: no ticks, never "mine".
            m.sender_user == me && !system,
            system,
            m.client_msg_id,
            body,
            m.server_ts_ms,
            undecryptable
        ],
    )?;
    if inserted == 0 {
        return Ok(None);
    }
    let id = tx.last_insert_rowid();
    match conv {
        Conv::Direct(peer) => upsert_peer(tx, peer, &m.peer_username)?,
        Conv::Group(group) => upsert_group(tx, group, conv_name, m.seq)?,
    }
    upsert_peer(tx, m.sender_user, &m.sender_username)?;
    if let Some(c) = &change {
        for u in c.actor.iter().chain(&c.targets) {
            upsert_peer(tx, u.user_id, &u.username)?;
        }
    }
    Ok(Some(query::message_by_rowid(tx, id)?))
}

fn apply_receipt(
    tx: &Transaction<'_>,
    me: u64,
    r: &frames::Receipt,
) -> rusqlite::Result<Option<ReceiptEvent>> {
    let Some(conv) = Conv::from_peer(r.conversation.as_ref()) else {
        tracing::warn!("receipt without a conversation, skipped");
        return Ok(None);
    };
    let kind = match frames::ReceiptKind::try_from(r.kind) {
        Ok(frames::ReceiptKind::Delivered) => ReceiptKind::Delivered,
        Ok(frames::ReceiptKind::Read) => ReceiptKind::Read,
        _ => {
            tracing::warn!(kind = r.kind, "receipt of unknown kind, skipped");
            return Ok(None);
        }
    };
    if let Conv::Direct(peer) = conv {
        upsert_peer(tx, peer, &r.peer_username)?;
    }
    upsert_peer(tx, r.reader_user, &r.reader_username)?;
    let up = r.up_to_seq;
    let read = kind == ReceiptKind::Read;

    // The reader's own watermark (a read implies delivered).
    let reader_raised = raise_reader(tx, conv, r.reader_user, up, if read { up } else { 0 })?;

    // My ticks. In a direct conversation the peer's watermark is the same thing as all_*;
    // for a note to self the peer is me, and both rules below apply.
    let (mut delivered, mut read_all) = (r.all_delivered_up_to, r.all_read_up_to);
    if conv == Conv::Direct(r.reader_user) {
        delivered = delivered.max(up);
        if read {
            read_all = read_all.max(up);
        }
    }
    // My own read position, moved by another of my devices.
    let my_read = if r.reader_user == me && read { up } else { 0 };
    let (bd, br, bmy) = raise_watermarks(tx, conv, delivered, read_all, my_read)?;
    let raised = reader_raised || delivered > bd || read_all > br || my_read > bmy;
    if !raised {
        return Ok(None);
    }
    // Someone else's receipt that covers none of my messages (only hidden ones: group key
    // shares) is recorded but not worth telling the app. A message still pending counts: its
    // `Sent` may be recorded just after the receipt that covers it.
    if r.reader_user != me {
        let covers_mine: bool = tx
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM messages WHERE conv_kind = ?1 AND conv_id = ?2
                     AND outgoing = 1 AND (seq IS NULL OR seq <= ?3))",
            )?
            .query_row(params![conv.kind(), conv.id(), up], |r| r.get(0))?;
        if !covers_mine {
            return Ok(None);
        }
    }
    Ok(Some(ReceiptEvent {
        conversation: conv.public_name(&r.peer_username),
        peer_user: match conv {
            Conv::Direct(p) => p,
            Conv::Group(_) => 0,
        },
        group: conv.group(),
        reader: r.reader_username.clone(),
        reader_user: r.reader_user,
        kind,
        up_to_seq: up,
        server_ts_ms: r.server_ts_ms,
        all_delivered_up_to: bd.max(delivered),
        all_read_up_to: br.max(read_all),
    }))
}

/// Raises one reader's watermarks in a conversation; whether either rose.
fn raise_reader(
    tx: &Transaction<'_>,
    conv: Conv,
    reader: u64,
    delivered: u64,
    read: u64,
) -> rusqlite::Result<bool> {
    let (bd, br): (u64, u64) = tx
        .query_row(
            "SELECT delivered_up_to, read_up_to FROM reader_watermarks
             WHERE conv_kind = ?1 AND conv_id = ?2 AND reader_user = ?3",
            params![conv.kind(), conv.id(), reader],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?
        .unwrap_or((0, 0));
    if delivered <= bd && read <= br {
        return Ok(false);
    }
    tx.execute(
        "INSERT INTO reader_watermarks (conv_kind, conv_id, reader_user, delivered_up_to, read_up_to)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (conv_kind, conv_id, reader_user) DO UPDATE SET
             delivered_up_to = MAX(delivered_up_to, excluded.delivered_up_to),
             read_up_to = MAX(read_up_to, excluded.read_up_to)",
        params![conv.kind(), conv.id(), reader, delivered.max(bd), read.max(br)],
    )?;
    Ok(true)
}
