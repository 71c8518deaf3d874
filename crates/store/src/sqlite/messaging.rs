//! Posting, mailboxes, acknowledgements and read receipts, for direct and group conversations.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use rusqlite::{Connection, OptionalExtension, params};

use super::accounts::{delete_mailbox, device_ids, user_ref};
use super::cache::WriterCache;
use super::db_error;
use crate::logic::{check_device_set, direct_conversation_id};
use crate::*;

pub const KIND_GROUP: i64 = 1;
const MSG_USER: i64 = 0;
const MSG_SYSTEM: i64 = 1;
/// Mailbox entry kinds.
const ENTRY_MESSAGE: i64 = 1;
const ENTRY_DELIVERED: i64 = 2;
const ENTRY_READ: i64 = 3;

/// A conversation row, resolved.
pub struct ConvRow {
    pub id: i64,
    pub conversation: Conversation,
    pub next_seq: u64,
}

/// Loads a conversation by id, with the names clients need.
pub fn conversation_by_id(c: &Connection, id: i64) -> Result<ConvRow, StoreError> {
    let row: (i64, Option<i64>, Option<i64>, i64, Option<String>) = c
        .prepare_cached(
            "SELECT c.kind, c.user_lo, c.user_hi, c.next_seq, g.name FROM conversations c
             LEFT JOIN groups g ON g.conversation_id = c.id WHERE c.id = ?1",
        )?
        .query_row([id], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .optional()?
        .ok_or(StoreError::NotFound("conversation"))?;
    let conversation = match row {
        (KIND_GROUP, _, _, _, name) => Conversation::Group {
            id: id as GroupId,
            name: name.unwrap_or_default(),
        },
        (_, Some(lo), Some(hi), _, _) => Conversation::Direct {
            lo: user_ref(c, lo as UserId)?.ok_or(StoreError::NotFound("user"))?,
            hi: user_ref(c, hi as UserId)?.ok_or(StoreError::NotFound("user"))?,
        },
        _ => {
            return Err(db_error(format!("conversation {id} is malformed")));
        }
    };
    Ok(ConvRow {
        id,
        conversation,
        next_seq: row.3 as u64,
    })
}

/// The id of the direct conversation between two users, if they have one (computed from the
/// pair, `logic::direct_conversation_id`; migration 5 renumbered older ones).
fn direct_id(c: &Connection, a: UserId, b: UserId) -> Result<Option<i64>, StoreError> {
    let id = direct_conversation_id(a, b) as i64;
    Ok(
        c.prepare_cached("SELECT 1 FROM conversations WHERE id = ?1")?
            .exists([id])?
            .then_some(id),
    )
}

/// The group conversation `group`, if `user` is a member of it; `NotFound("group")` otherwise,
/// so that non-members learn nothing about it.
pub fn member_group(
    c: &Connection,
    cache: Option<&mut WriterCache>,
    group: GroupId,
    user: UserId,
) -> Result<i64, StoreError> {
    let conv = group as i64;
    let is_member = match cache {
        Some(cache) => {
            let kind: Option<i64> = c
                .prepare_cached("SELECT kind FROM conversations WHERE id = ?1")?
                .query_row([conv], |r| r.get(0))
                .optional()?;
            kind == Some(KIND_GROUP) && cache.fanout(c, conv)?.is_member(user)
        }
        None => c
            .prepare_cached("SELECT 1 FROM members WHERE conversation_id = ?1 AND user_id = ?2")?
            .exists(params![conv, user as i64])?,
    };
    if is_member {
        Ok(conv)
    } else {
        Err(StoreError::NotFound("group"))
    }
}

/// Takes the conversation's next sequence number.
pub fn next_seq(c: &Connection, conv: i64) -> Result<u64, StoreError> {
    let seq: i64 = c
        .prepare_cached(
            "UPDATE conversations SET next_seq = next_seq + 1 WHERE id = ?1 RETURNING next_seq - 1",
        )?
        .query_row([conv], |r| r.get(0))?;
    Ok(seq as u64)
}

/// A mailbox row to append (see the `mailbox` table for the meaning of `kind` and `seq`).
struct NewEntry<'a> {
    kind: i64,
    conv: i64,
    seq: u64,
    reader: Option<UserId>,
    body: Option<&'a [u8]>,
    all: Option<(u64, u64)>,
    ts: i64,
    /// The bytes this entry counts for in the device's mailbox bound.
    size: u64,
}

/// An appended entry's sequence number and the device's mailbox totals with it.
struct Appended {
    mseq: u64,
    entries: u64,
    bytes: u64,
}

impl Appended {
    fn exceeds(&self, limit: MailboxLimit) -> bool {
        self.entries > limit.max_entries || self.bytes > limit.max_bytes
    }
}

/// Appends one entry to a device's mailbox, counting it in the device's totals.
fn append(c: &Connection, device: DeviceId, e: NewEntry<'_>) -> Result<Appended, StoreError> {
    let (mseq, entries, bytes): (i64, i64, i64) = c
        .prepare_cached(
            "UPDATE devices SET next_mseq = next_mseq + 1, mailbox_entries = mailbox_entries + 1,
                    mailbox_bytes = mailbox_bytes + ?2
             WHERE id = ?1 RETURNING next_mseq - 1, mailbox_entries, mailbox_bytes",
        )?
        .query_row(params![device as i64, e.size as i64], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })?;
    c.prepare_cached(
        "INSERT INTO mailbox (device_id, mseq, kind, conversation_id, seq, reader, body, all_delivered, all_read, ts, size)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
    )?
    .execute(params![
        device as i64,
        mseq,
        e.kind,
        e.conv,
        e.seq as i64,
        e.reader.map(|r| r as i64),
        e.body,
        e.all.map(|a| a.0 as i64),
        e.all.map(|a| a.1 as i64),
        e.ts,
        e.size as i64
    ])?;
    Ok(Appended {
        mseq: mseq as u64,
        entries: entries as u64,
        bytes: bytes as u64,
    })
}

/// Stores a message row and the mailbox entries of `to` (device, owning user, own body).
/// `MailboxFull` if a device's mailbox is past `limit` with its entry; the caller's savepoint
/// then undoes the whole post.
fn store_message(
    c: &Connection,
    conv_id: i64,
    record: MessageRecord,
    to: &[(DeviceId, UserId, Option<Vec<u8>>)],
    limit: MailboxLimit,
) -> Result<Vec<Delivery>, StoreError> {
    let shared_used = to.iter().any(|d| d.2.is_none());
    c.prepare_cached(
        "INSERT INTO messages (conversation_id, seq, kind, sender_user, sender_device, client_msg_id, server_ts, body, pending)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?
    .execute(params![
        conv_id,
        record.seq as i64,
        if record.kind == MessageKind::System { MSG_SYSTEM } else { MSG_USER },
        record.sender_user as i64,
        record.sender_device as i64,
        record.client_msg_id,
        record.server_ts_ms,
        if shared_used { Some(&record.body[..]) } else { None },
        to.len() as i64
    ])?;
    let shared = Arc::new(record);
    let mut deliveries = Vec::with_capacity(to.len());
    for (device, user, own) in to {
        let entry = NewEntry {
            kind: ENTRY_MESSAGE,
            conv: conv_id,
            seq: shared.seq,
            reader: None,
            body: own.as_deref(),
            all: None,
            ts: shared.server_ts_ms,
            size: own.as_ref().map_or(shared.body.len(), |b| b.len()) as u64,
        };
        let appended = append(c, *device, entry)?;
        if appended.exceeds(limit) {
            return Err(StoreError::MailboxFull {
                user: *user,
                device: *device,
            });
        }
        let mseq = appended.mseq;
        let item = match own {
            None => shared.clone(),
            Some(b) => Arc::new(MessageRecord {
                body: Arc::from(&b[..]),
                ..(*shared).clone()
            }),
        };
        deliveries.push(Delivery {
            device: *device,
            user: *user,
            entry: MailboxEntry {
                mseq,
                item: MailboxItem::Message(item),
            },
        });
    }
    Ok(deliveries)
}

/// Fans a group message out to every member device except `skip`, within `limit`.
pub fn fan_out_group(
    c: &Connection,
    cache: &mut WriterCache,
    conv_id: i64,
    record: MessageRecord,
    skip: DeviceId,
    limit: MailboxLimit,
) -> Result<Vec<Delivery>, StoreError> {
    let fanout = cache.fanout(c, conv_id)?;
    let to: Vec<(DeviceId, UserId, Option<Vec<u8>>)> = fanout
        .devices()
        .filter(|(_, d)| *d != skip)
        .map(|(u, d)| (d, u, None))
        .collect();
    store_message(c, conv_id, record, &to, limit)
}

/// Stores a server-written group event in the group's sequence.
pub fn post_system(
    c: &Connection,
    cache: &mut WriterCache,
    conv_id: i64,
    actor: &DeviceAuth,
    name: &str,
    body: Vec<u8>,
    now: i64,
) -> Result<(u64, Vec<Delivery>), StoreError> {
    let seq = next_seq(c, conv_id)?;
    let record = MessageRecord {
        conversation: Conversation::Group {
            id: conv_id as GroupId,
            name: name.to_owned(),
        },
        seq,
        kind: MessageKind::System,
        sender_user: actor.user_id,
        sender_username: actor.username.clone(),
        sender_device: actor.device_id,
        client_msg_id: format!("system:{conv_id}:{seq}"),
        server_ts_ms: now,
        body: Arc::from(body),
    };
    // The actor's own devices get the event too: it is part of the group's history. Events are
    // not bounded by mailbox limits (a member must learn of its own removal), only counted.
    let deliveries = fan_out_group(c, cache, conv_id, record, 0, MailboxLimit::UNLIMITED)?;
    Ok((seq, deliveries))
}

pub fn post_message(
    c: &Connection,
    cache: &mut WriterCache,
    p: &NewMessage,
) -> Result<PostOutcome, StoreError> {
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
    let (seq, deliveries) = match p.to {
        Target::Group(group) => {
            let conv_id = member_group(c, Some(cache), group, sender.id)?;
            // Addressed (end-to-end encrypted groups): exactly every member device but the
            // sender's, like a direct message; checked before anything is written.
            let addressed = if p.devices.is_empty() {
                None
            } else {
                let to: Vec<(DeviceId, UserId)> = cache
                    .fanout(c, conv_id)?
                    .devices()
                    .filter(|(_, d)| *d != p.sender.device_id)
                    .map(|(u, d)| (d, u))
                    .collect();
                let expected: Vec<DeviceId> = to.iter().map(|t| t.0).collect();
                let got: Vec<DeviceId> = p.devices.iter().map(|d| d.device).collect();
                check_device_set(&expected, &got)?;
                Some(to)
            };
            let name: String = c
                .prepare_cached("SELECT name FROM groups WHERE conversation_id = ?1")?
                .query_row([conv_id], |r| r.get(0))?;
            let seq = next_seq(c, conv_id)?;
            let record = p.record(Conversation::Group { id: group, name }, seq);
            let deliveries = match addressed {
                None => fan_out_group(c, cache, conv_id, record, p.sender.device_id, p.mailbox)?,
                Some(to) => {
                    let mut own: BTreeMap<DeviceId, Option<Vec<u8>>> = p
                        .devices
                        .iter()
                        .map(|a| (a.device, a.body.clone()))
                        .collect();
                    let to: Vec<_> = to
                        .into_iter()
                        .map(|(d, u)| (d, u, own.remove(&d).flatten()))
                        .collect();
                    store_message(c, conv_id, record, &to, p.mailbox)?
                }
            };
            (seq, deliveries)
        }
        Target::User(recipient) => {
            let recipient = user_ref(c, recipient)?.ok_or(StoreError::NotFound("recipient"))?;
            // The addressed set must be exactly: every device of the recipient and every other
            // device of the sender (for a note to self, the two coincide).
            let recipient_devices = device_ids(c, recipient.id)?;
            let mut expected = recipient_devices.clone();
            if recipient.id != sender.id {
                expected.extend(device_ids(c, sender.id)?);
            }
            expected.retain(|d| *d != p.sender.device_id);
            let addressed: Vec<DeviceId> = p.devices.iter().map(|d| d.device).collect();
            check_device_set(&expected, &addressed)?;
            let (lo, hi) = if sender.id <= recipient.id {
                (sender.clone(), recipient.clone())
            } else {
                (recipient.clone(), sender.clone())
            };
            let conv_id = direct_conversation_id(lo.id, hi.id) as i64;
            c.prepare_cached(
                "INSERT INTO conversations (id, kind, user_lo, user_hi) VALUES (?1, 0, ?2, ?3)
                 ON CONFLICT (id) DO NOTHING",
            )?
            .execute(params![conv_id, lo.id as i64, hi.id as i64])?;
            let seq = next_seq(c, conv_id)?;
            let to: Vec<_> = p
                .devices
                .iter()
                .map(|d| {
                    let user = if recipient_devices.contains(&d.device) {
                        recipient.id
                    } else {
                        sender.id
                    };
                    (d.device, user, d.body.clone())
                })
                .collect();
            let deliveries = store_message(
                c,
                conv_id,
                p.record(Conversation::Direct { lo, hi }, seq),
                &to,
                p.mailbox,
            )?;
            (seq, deliveries)
        }
    };
    Ok(PostOutcome::Stored {
        seq,
        server_ts_ms: p.now_ms,
        deliveries,
    })
}

/// The ticks of `target`'s own messages: what every other participant has delivered and read.
pub fn aggregate(c: &Connection, conv: &ConvRow, target: UserId) -> Result<(u64, u64), StoreError> {
    let row: (Option<i64>, Option<i64>) = match &conv.conversation {
        Conversation::Direct { lo, hi } => {
            let other = if lo.id == target { hi.id } else { lo.id };
            c.prepare_cached("SELECT delivered_up_to, read_up_to FROM receipts WHERE conversation_id = ?1 AND reader = ?2")?
                .query_row(params![conv.id, other as i64], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?
                .unwrap_or((Some(0), Some(0)))
        }
        Conversation::Group { .. } => c
            .prepare_cached(
                "SELECT MIN(MAX(COALESCE(r.delivered_up_to, 0), m.joined_seq - 1)), MIN(MAX(COALESCE(r.read_up_to, 0), m.joined_seq - 1))
                 FROM members m LEFT JOIN receipts r ON r.conversation_id = m.conversation_id AND r.reader = m.user_id
                 WHERE m.conversation_id = ?1 AND m.user_id != ?2",
            )?
            .query_row(params![conv.id, target as i64], |r| Ok((r.get(0)?, r.get(1)?)))?,
    };
    // Alone in a group: everyone else (nobody) has everything.
    let last = conv.next_seq.saturating_sub(1);
    Ok((
        row.0.map_or(last, |v| v as u64),
        row.1.map_or(last, |v| v as u64),
    ))
}

/// Sends a receipt to every device of `to_user` (except `skip`).
fn send_receipt(
    c: &Connection,
    conv: &ConvRow,
    to_user: UserId,
    skip: Option<DeviceId>,
    base: &ReceiptRecord,
    out: &mut Vec<Delivery>,
) -> Result<(), StoreError> {
    let (all_d, all_r) = aggregate(c, conv, to_user)?;
    let record = Arc::new(ReceiptRecord {
        all_delivered_up_to: all_d,
        all_read_up_to: all_r,
        ..base.clone()
    });
    let kind = match record.kind {
        ReceiptKind::Delivered => ENTRY_DELIVERED,
        ReceiptKind::Read => ENTRY_READ,
    };
    for device in device_ids(c, to_user)? {
        if Some(device) == skip {
            continue;
        }
        let entry = NewEntry {
            kind,
            conv: conv.id,
            seq: record.up_to_seq,
            reader: Some(record.reader),
            body: None,
            all: Some((all_d, all_r)),
            ts: record.ts_ms,
            size: 0,
        };
        // Receipts are counted but never refused: they are how senders learn of delivery.
        let mseq = append(c, device, entry)?.mseq;
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

/// Raises a watermark if `up_to` is above it; returns the previous value if it grew.
fn raise_watermark(
    c: &Connection,
    conv: i64,
    reader: UserId,
    kind: ReceiptKind,
    up_to: u64,
) -> Result<Option<u64>, StoreError> {
    c.prepare_cached(
        "INSERT INTO receipts (conversation_id, reader) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
    )?
    .execute(params![conv, reader as i64])?;
    let (sql_get, sql_set) = match kind {
        ReceiptKind::Delivered => (
            "SELECT delivered_up_to FROM receipts WHERE conversation_id = ?1 AND reader = ?2",
            "UPDATE receipts SET delivered_up_to = ?3 WHERE conversation_id = ?1 AND reader = ?2",
        ),
        ReceiptKind::Read => (
            "SELECT read_up_to FROM receipts WHERE conversation_id = ?1 AND reader = ?2",
            "UPDATE receipts SET read_up_to = ?3, delivered_up_to = MAX(delivered_up_to, ?3) WHERE conversation_id = ?1 AND reader = ?2",
        ),
    };
    let old: i64 = c
        .prepare_cached(sql_get)?
        .query_row(params![conv, reader as i64], |r| r.get(0))?;
    if old as u64 >= up_to {
        return Ok(None);
    }
    c.prepare_cached(sql_set)?
        .execute(params![conv, reader as i64, up_to as i64])?;
    Ok(Some(old as u64))
}

pub fn ack(
    c: &Connection,
    who: &DeviceAuth,
    up_to: u64,
    now: i64,
) -> Result<Vec<Delivery>, StoreError> {
    let acked = delete_mailbox(c, who.device_id, up_to)?;
    // Per conversation: the highest acknowledged seq and the senders of acknowledged user
    // messages (other than me): they get the delivered receipt.
    let mut per_conv: BTreeMap<i64, (u64, BTreeSet<UserId>)> = BTreeMap::new();
    let mut sender_of = c.prepare_cached(
        "SELECT sender_user, kind FROM messages WHERE conversation_id = ?1 AND seq = ?2",
    )?;
    for (conv, seq) in acked {
        let Some((sender, kind)) = sender_of
            .query_row(params![conv, seq as i64], |r| {
                Ok((r.get::<_, i64>(0)? as UserId, r.get::<_, i64>(1)?))
            })
            .optional()?
        else {
            continue;
        };
        let e = per_conv.entry(conv).or_default();
        e.0 = e.0.max(seq);
        if sender != who.user_id && kind == MSG_USER {
            e.1.insert(sender);
        }
    }
    let mut out = Vec::new();
    for (conv_id, (seq, senders)) in per_conv {
        if raise_watermark(c, conv_id, who.user_id, ReceiptKind::Delivered, seq)?.is_none()
            || senders.is_empty()
        {
            continue;
        }
        let conv = conversation_by_id(c, conv_id)?;
        let base = ReceiptRecord {
            conversation: conv.conversation.clone(),
            reader: who.user_id,
            reader_username: who.username.clone(),
            kind: ReceiptKind::Delivered,
            up_to_seq: seq,
            all_delivered_up_to: 0,
            all_read_up_to: 0,
            ts_ms: now,
        };
        for sender in senders {
            send_receipt(c, &conv, sender, None, &base, &mut out)?;
        }
    }
    Ok(out)
}

pub fn mark_read(
    c: &Connection,
    who: &DeviceAuth,
    target: Target,
    up_to: u64,
    now: i64,
) -> Result<Vec<Delivery>, StoreError> {
    let conv_id = match target {
        Target::User(peer) => {
            direct_id(c, who.user_id, peer)?.ok_or(StoreError::NotFound("conversation"))?
        }
        Target::Group(group) => member_group(c, None, group, who.user_id)?,
    };
    let conv = conversation_by_id(c, conv_id)?;
    if up_to >= conv.next_seq {
        return Err(StoreError::Invalid(format!(
            "up_to_seq {up_to} is beyond the last message ({})",
            conv.next_seq - 1
        )));
    }
    let mut out = Vec::new();
    let Some(old) = raise_watermark(c, conv_id, who.user_id, ReceiptKind::Read, up_to)? else {
        return Ok(out);
    };
    // The senders of the messages this read covers hear of it.
    let mut st = c.prepare_cached(
        "SELECT DISTINCT sender_user FROM messages
         WHERE conversation_id = ?1 AND seq > ?2 AND seq <= ?3 AND kind = 0 AND sender_user != ?4",
    )?;
    let senders: Vec<UserId> = st
        .query_map(
            params![conv_id, old as i64, up_to as i64, who.user_id as i64],
            |r| Ok(r.get::<_, i64>(0)? as UserId),
        )?
        .collect::<Result<_, _>>()?;
    let base = ReceiptRecord {
        conversation: conv.conversation.clone(),
        reader: who.user_id,
        reader_username: who.username.clone(),
        kind: ReceiptKind::Read,
        up_to_seq: up_to,
        all_delivered_up_to: 0,
        all_read_up_to: 0,
        ts_ms: now,
    };
    for sender in senders {
        send_receipt(c, &conv, sender, None, &base, &mut out)?;
    }
    send_receipt(c, &conv, who.user_id, Some(who.device_id), &base, &mut out)?;
    Ok(out)
}

pub fn mailbox_after(
    c: &Connection,
    device: DeviceId,
    after: u64,
    limit: usize,
) -> Result<Vec<MailboxEntry>, StoreError> {
    let mut st = c.prepare_cached(
        "SELECT m.mseq, m.kind, m.conversation_id, m.seq, m.reader, ur.username, m.ts, m.all_delivered, m.all_read,
                COALESCE(m.body, g.body), g.kind, g.sender_user, us.username, g.sender_device, g.client_msg_id, g.server_ts,
                c.kind, c.user_lo, ulo.username, c.user_hi, uhi.username, grp.name
         FROM mailbox m
         JOIN conversations c ON c.id = m.conversation_id
         LEFT JOIN users ulo ON ulo.id = c.user_lo
         LEFT JOIN users uhi ON uhi.id = c.user_hi
         LEFT JOIN groups grp ON grp.conversation_id = c.id
         LEFT JOIN messages g ON m.kind = 1 AND g.conversation_id = m.conversation_id AND g.seq = m.seq
         LEFT JOIN users us ON us.id = g.sender_user
         LEFT JOIN users ur ON ur.id = m.reader
         WHERE m.device_id = ?1 AND m.mseq > ?2
         ORDER BY m.mseq LIMIT ?3",
    )?;
    let rows = st.query_map(params![device as i64, after as i64, limit as i64], |r| {
        let conv_id: i64 = r.get(2)?;
        let conversation = if r.get::<_, i64>(16)? == KIND_GROUP {
            Conversation::Group {
                id: conv_id as GroupId,
                name: r.get::<_, Option<String>>(21)?.unwrap_or_default(),
            }
        } else {
            let user = |id: usize, name: usize| -> rusqlite::Result<UserRef> {
                Ok(UserRef {
                    id: r.get::<_, Option<i64>>(id)?.unwrap_or_default() as UserId,
                    username: r.get::<_, Option<String>>(name)?.unwrap_or_default(),
                })
            };
            Conversation::Direct {
                lo: user(17, 18)?,
                hi: user(19, 20)?,
            }
        };
        let mseq = r.get::<_, i64>(0)? as u64;
        let kind: i64 = r.get(1)?;
        let seq = r.get::<_, i64>(3)? as u64;
        let item = if kind == ENTRY_MESSAGE {
            let body: Option<Vec<u8>> = r.get(9)?;
            MailboxItem::Message(Arc::new(MessageRecord {
                conversation,
                seq,
                kind: if r.get::<_, Option<i64>>(10)? == Some(MSG_SYSTEM) {
                    MessageKind::System
                } else {
                    MessageKind::User
                },
                sender_user: r.get::<_, Option<i64>>(11)?.unwrap_or_default() as UserId,
                sender_username: r.get::<_, Option<String>>(12)?.unwrap_or_default(),
                sender_device: r.get::<_, Option<i64>>(13)?.unwrap_or_default() as DeviceId,
                client_msg_id: r.get::<_, Option<String>>(14)?.unwrap_or_default(),
                server_ts_ms: r.get::<_, Option<i64>>(15)?.unwrap_or_default(),
                body: Arc::from(body.unwrap_or_default()),
            }))
        } else {
            MailboxItem::Receipt(Arc::new(ReceiptRecord {
                conversation,
                reader: r.get::<_, Option<i64>>(4)?.unwrap_or_default() as UserId,
                reader_username: r.get::<_, Option<String>>(5)?.unwrap_or_default(),
                kind: if kind == ENTRY_DELIVERED {
                    ReceiptKind::Delivered
                } else {
                    ReceiptKind::Read
                },
                up_to_seq: seq,
                all_delivered_up_to: r.get::<_, Option<i64>>(7)?.unwrap_or_default() as u64,
                all_read_up_to: r.get::<_, Option<i64>>(8)?.unwrap_or_default() as u64,
                ts_ms: r.get(6)?,
            }))
        };
        Ok(MailboxEntry { mseq, item })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}
