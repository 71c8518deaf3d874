//! Posting, mailboxes, acknowledgements and read receipts, for direct and group conversations.
//!
//! Every mailbox append goes through [`Appends`]: the entries of one step (a post's fan-out,
//! an acknowledgement's receipts) are collected, then the mailbox heads of all their devices
//! are locked in one statement in ascending device order, advanced, and the entries inserted
//! in one statement. Three round trips for any number of recipients, and two transactions that
//! append to overlapping device sets take the locks in the same order, so they queue instead of
//! deadlocking.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use deadpool_postgres::GenericClient;

use super::accounts::delete_mailbox;
use super::{RowExt, execute, id, is_unique_violation, pg, query, query_opt};
use crate::logic::{check_device_set, direct_conversation_id};
use crate::*;

pub const KIND_DIRECT: i16 = 0;
pub const KIND_GROUP: i16 = 1;
const MSG_USER: i16 = 0;
const MSG_SYSTEM: i16 = 1;
/// Mailbox entry kinds.
const ENTRY_MESSAGE: i16 = 1;
const ENTRY_DELIVERED: i16 = 2;
const ENTRY_READ: i16 = 3;

/// A conversation row, resolved.
pub struct ConvRow {
    pub id: i64,
    pub conversation: Conversation,
    pub next_seq: u64,
}

/// Loads a conversation by id, with the names clients need.
pub async fn conversation_by_id<C: GenericClient>(c: &C, conv: i64) -> Result<ConvRow, StoreError> {
    let r = query_opt(
        c,
        "SELECT c.kind, c.user_lo, ulo.username, c.user_hi, uhi.username, c.next_seq, g.name
         FROM conversations c
         LEFT JOIN users ulo ON ulo.id = c.user_lo
         LEFT JOIN users uhi ON uhi.id = c.user_hi
         LEFT JOIN groups g ON g.conversation_id = c.id
         WHERE c.id = $1",
        &[&conv],
    )
    .await?
    .ok_or(StoreError::NotFound("conversation"))?;
    let kind: i16 = r.col(0)?;
    let conversation = if kind == KIND_GROUP {
        Conversation::Group {
            id: conv as GroupId,
            name: r.col::<Option<String>>(6)?.unwrap_or_default(),
        }
    } else {
        let user = |i: usize| -> Result<UserRef, StoreError> {
            Ok(UserRef {
                id: r.col::<Option<i64>>(i)?.unwrap_or_default() as UserId,
                username: r.col::<Option<String>>(i + 1)?.unwrap_or_default(),
            })
        };
        Conversation::Direct {
            lo: user(1)?,
            hi: user(3)?,
        }
    };
    Ok(ConvRow {
        id: conv,
        conversation,
        next_seq: r.col::<i64>(5)? as u64,
    })
}

/// A group's members (sorted by user id) with their devices, as the transaction sees them now.
pub(super) async fn fanout<C: GenericClient>(
    c: &C,
    conv: i64,
) -> Result<Vec<(UserId, Vec<DeviceId>)>, StoreError> {
    let rows = query(
        c,
        "SELECT m.user_id, d.id FROM members m LEFT JOIN devices d ON d.user_id = m.user_id
         WHERE m.conversation_id = $1 ORDER BY m.user_id, d.id",
        &[&conv],
    )
    .await?;
    let mut members: Vec<(UserId, Vec<DeviceId>)> = Vec::new();
    for r in &rows {
        let user = r.col::<i64>(0)? as UserId;
        if members.last().map(|(u, _)| *u) != Some(user) {
            members.push((user, Vec::new()));
        }
        if let (Some(d), Some((_, ds))) = (r.col::<Option<i64>>(1)?, members.last_mut()) {
            ds.push(d as DeviceId);
        }
    }
    Ok(members)
}

fn devices_of(
    members: &[(UserId, Vec<DeviceId>)],
) -> impl Iterator<Item = (UserId, DeviceId)> + '_ {
    members
        .iter()
        .flat_map(|(u, ds)| ds.iter().map(move |d| (*u, *d)))
}

/// Whether `user` is a member of the group conversation `group`; `NotFound("group")` if not,
/// so that non-members learn nothing about it.
pub async fn member_group<C: GenericClient>(
    c: &C,
    group: GroupId,
    user: UserId,
) -> Result<i64, StoreError> {
    let conv = id(group);
    query_opt(
        c,
        "SELECT 1 FROM members WHERE conversation_id = $1 AND user_id = $2",
        &[&conv, &id(user)],
    )
    .await?
    .map(|_| conv)
    .ok_or(StoreError::NotFound("group"))
}

/// Takes the conversation's next sequence number, locking its row until commit.
pub(super) async fn next_seq<C: GenericClient>(c: &C, conv: i64) -> Result<u64, StoreError> {
    let r = query_opt(
        c,
        "UPDATE conversations SET next_seq = next_seq + 1 WHERE id = $1 RETURNING next_seq - 1",
        &[&conv],
    )
    .await?
    .ok_or(StoreError::NotFound("conversation"))?;
    Ok(r.col::<i64>(0)? as u64)
}

/// A mailbox row to append (see the `mailbox` table for the meaning of `kind` and `seq`).
struct NewEntry {
    device: DeviceId,
    user: UserId,
    kind: i16,
    conv: i64,
    seq: u64,
    reader: Option<UserId>,
    body: Option<Vec<u8>>,
    all: Option<(u64, u64)>,
    ts: i64,
    /// The bytes this entry counts for in the device's mailbox bound.
    size: u64,
    item: MailboxItem,
}

/// Mailbox entries collected for one flush; see the module docs.
#[derive(Default)]
struct Appends {
    entries: Vec<NewEntry>,
    /// Devices whose heads the caller changes after the flush: locked in the same order.
    also_lock: Vec<DeviceId>,
}

impl Appends {
    /// Appends every collected entry; returns their deliveries in collection order.
    /// `MailboxFull` if `limit` is given and a device's mailbox is past it with its entries
    /// (the caller's savepoint then undoes the whole step).
    async fn flush<C: GenericClient>(
        self,
        c: &C,
        limit: Option<MailboxLimit>,
    ) -> Result<Vec<Delivery>, StoreError> {
        let mut per_device: BTreeMap<DeviceId, (i64, i64)> = BTreeMap::new();
        for e in &self.entries {
            let d = per_device.entry(e.device).or_default();
            d.0 += 1;
            d.1 += e.size as i64;
        }
        let mut locked: BTreeSet<DeviceId> = per_device.keys().copied().collect();
        locked.extend(self.also_lock.iter().copied());
        if locked.len() > 1 {
            let devices: Vec<i64> = locked.iter().map(|d| id(*d)).collect();
            let rows = query(
                c,
                "SELECT device_id FROM mailbox_heads WHERE device_id = ANY($1)
                 ORDER BY device_id FOR UPDATE",
                &[&devices],
            )
            .await?;
            if rows.len() != devices.len() {
                // A device was removed since the caller read the device list: start over.
                return Err(StoreError::Contended {
                    backend: "postgres",
                });
            }
        }
        if per_device.is_empty() {
            return Ok(Vec::new());
        }
        let devices: Vec<i64> = per_device.keys().map(|d| id(*d)).collect();
        let counts: Vec<i64> = per_device.values().map(|v| v.0).collect();
        let sizes: Vec<i64> = per_device.values().map(|v| v.1).collect();
        let rows = query(
            c,
            "UPDATE mailbox_heads h SET next_mseq = h.next_mseq + a.n, entries = h.entries + a.n,
                    bytes = h.bytes + a.b
             FROM UNNEST($1::BIGINT[], $2::BIGINT[], $3::BIGINT[]) AS a(device_id, n, b)
             WHERE h.device_id = a.device_id
             RETURNING h.device_id, h.next_mseq - a.n, h.entries, h.bytes",
            &[&devices, &counts, &sizes],
        )
        .await?;
        if rows.len() != devices.len() {
            return Err(StoreError::Contended {
                backend: "postgres",
            });
        }
        let mut next: BTreeMap<DeviceId, u64> = BTreeMap::new();
        for r in &rows {
            let device = r.col::<i64>(0)? as DeviceId;
            let (entries, bytes) = (r.col::<i64>(2)? as u64, r.col::<i64>(3)? as u64);
            if let Some(l) = limit
                && (entries > l.max_entries || bytes > l.max_bytes)
            {
                let user = self
                    .entries
                    .iter()
                    .find(|e| e.device == device)
                    .map_or(0, |e| e.user);
                return Err(StoreError::MailboxFull { user, device });
            }
            next.insert(device, r.col::<i64>(1)? as u64);
        }
        let n = self.entries.len();
        let (mut dev, mut mseq, mut kind, mut conv, mut seq) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let (mut reader, mut body, mut all_d, mut all_r, mut ts, mut size) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let mut deliveries = Vec::with_capacity(n);
        for e in self.entries {
            let m = next.entry(e.device).or_insert(1);
            let this = *m;
            *m += 1;
            dev.push(id(e.device));
            mseq.push(id(this));
            kind.push(e.kind);
            conv.push(e.conv);
            seq.push(id(e.seq));
            reader.push(e.reader.map(id));
            body.push(e.body);
            all_d.push(e.all.map(|a| id(a.0)));
            all_r.push(e.all.map(|a| id(a.1)));
            ts.push(e.ts);
            size.push(id(e.size));
            deliveries.push(Delivery {
                device: e.device,
                user: e.user,
                entry: MailboxEntry {
                    mseq: this,
                    item: e.item,
                },
            });
        }
        execute(
            c,
            "INSERT INTO mailbox (device_id, mseq, kind, conversation_id, seq, reader, body,
                                  all_delivered, all_read, ts, size)
             SELECT * FROM UNNEST($1::BIGINT[], $2::BIGINT[], $3::SMALLINT[], $4::BIGINT[],
                                  $5::BIGINT[], $6::BIGINT[], $7::BYTEA[], $8::BIGINT[],
                                  $9::BIGINT[], $10::BIGINT[], $11::BIGINT[])",
            &[
                &dev, &mseq, &kind, &conv, &seq, &reader, &body, &all_d, &all_r, &ts, &size,
            ],
        )
        .await?;
        Ok(deliveries)
    }
}

/// Stores a message row and the mailbox entries of `to` (device, owning user, own body).
/// `MailboxFull` if a device's mailbox is past `limit` with its entry.
async fn store_message<C: GenericClient>(
    c: &C,
    conv_id: i64,
    record: MessageRecord,
    to: Vec<(DeviceId, UserId, Option<Vec<u8>>)>,
    limit: Option<MailboxLimit>,
) -> Result<Vec<Delivery>, StoreError> {
    let shared_used = to.iter().any(|d| d.2.is_none());
    let kind = if record.kind == MessageKind::System {
        MSG_SYSTEM
    } else {
        MSG_USER
    };
    let body: Option<&[u8]> = shared_used.then_some(&record.body[..]);
    let st = c
        .prepare_cached(
            "INSERT INTO messages (conversation_id, seq, kind, sender_user, sender_device,
                                   client_msg_id, server_ts, body)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .await
        .map_err(pg)?;
    let inserted = c
        .execute(
            &st,
            &[
                &conv_id,
                &id(record.seq),
                &kind,
                &id(record.sender_user),
                &id(record.sender_device),
                &record.client_msg_id,
                &record.server_ts_ms,
                &body,
            ],
        )
        .await;
    match inserted {
        Ok(_) => {}
        // The same (device, client_msg_id) committed concurrently: run again, and the retry
        // answers `Duplicate`.
        Err(e) if is_unique_violation(&e) => {
            return Err(StoreError::Contended {
                backend: "postgres",
            });
        }
        Err(e) => return Err(pg(e)),
    }
    let shared = Arc::new(record);
    let mut appends = Appends::default();
    for (device, user, own) in to {
        let item = match &own {
            None => shared.clone(),
            Some(b) => Arc::new(MessageRecord {
                body: Arc::from(&b[..]),
                ..(*shared).clone()
            }),
        };
        appends.entries.push(NewEntry {
            device,
            user,
            kind: ENTRY_MESSAGE,
            conv: conv_id,
            seq: shared.seq,
            reader: None,
            size: own.as_ref().map_or(shared.body.len(), |b| b.len()) as u64,
            body: own,
            all: None,
            ts: shared.server_ts_ms,
            item: MailboxItem::Message(item),
        });
    }
    appends.flush(c, limit).await
}

/// Stores a server-written group event in the group's sequence (the caller holds the group's
/// row lock: it took `next_seq` or is about to through this call).
pub async fn post_system<C: GenericClient>(
    c: &C,
    conv_id: i64,
    actor: &DeviceAuth,
    name: &str,
    body: Vec<u8>,
    now: i64,
) -> Result<(u64, Vec<Delivery>), StoreError> {
    let seq = next_seq(c, conv_id).await?;
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
    // Every member device, the actor's own included: the event is part of the group's
    // history. Events are counted in mailbox totals but never refused.
    let members = fanout(c, conv_id).await?;
    let to = devices_of(&members).map(|(u, d)| (d, u, None)).collect();
    let deliveries = store_message(c, conv_id, record, to, None).await?;
    Ok((seq, deliveries))
}

/// Whether a post's error is the post's own refusal (bad addressing, not a member, a full
/// mailbox, …), as opposed to a failure of the transaction it ran in.
pub fn is_refusal(e: &StoreError) -> bool {
    !matches!(
        e,
        StoreError::Contended { .. }
            | StoreError::Unavailable { .. }
            | StoreError::Database { .. }
            | StoreError::Closed
    )
}

/// Stores one post (see `Store::post_message`); the caller's transaction (or savepoint) is
/// rolled back if it fails.
pub async fn post_message<C: GenericClient>(
    c: &C,
    p: &NewMessage,
) -> Result<PostOutcome, StoreError> {
    if let Some(r) = query_opt(
        c,
        "SELECT seq, server_ts FROM messages WHERE sender_device = $1 AND client_msg_id = $2",
        &[&id(p.sender.device_id), &p.client_msg_id],
    )
    .await?
    {
        return Ok(PostOutcome::Duplicate {
            seq: r.col::<i64>(0)? as u64,
            server_ts_ms: r.col(1)?,
        });
    }
    let sender = UserRef {
        id: p.sender.user_id,
        username: p.sender.username.clone(),
    };
    let (seq, deliveries) = match p.to {
        Target::Group(group) => {
            let conv_id = id(group);
            // The group's row first (it takes the seq): membership read after it is the
            // membership at this seq, whatever changes commit meanwhile.
            let seq = match query_opt(
                c,
                "UPDATE conversations SET next_seq = next_seq + 1 WHERE id = $1 AND kind = $2
                 RETURNING next_seq - 1",
                &[&conv_id, &KIND_GROUP],
            )
            .await?
            {
                Some(r) => r.col::<i64>(0)? as u64,
                None => return Err(StoreError::NotFound("group")),
            };
            let members = fanout(c, conv_id).await?;
            if members
                .binary_search_by_key(&sender.id, |(u, _)| *u)
                .is_err()
            {
                return Err(StoreError::NotFound("group"));
            }
            let to: Vec<(DeviceId, UserId)> = devices_of(&members)
                .filter(|(_, d)| *d != p.sender.device_id)
                .map(|(u, d)| (d, u))
                .collect();
            // Addressed (end-to-end encrypted groups): exactly every member device but the
            // sender's, like a direct message.
            let to: Vec<(DeviceId, UserId, Option<Vec<u8>>)> = if p.devices.is_empty() {
                to.into_iter().map(|(d, u)| (d, u, None)).collect()
            } else {
                let expected: Vec<DeviceId> = to.iter().map(|t| t.0).collect();
                let got: Vec<DeviceId> = p.devices.iter().map(|d| d.device).collect();
                check_device_set(&expected, &got)?;
                let mut own: BTreeMap<DeviceId, Option<Vec<u8>>> = p
                    .devices
                    .iter()
                    .map(|a| (a.device, a.body.clone()))
                    .collect();
                to.into_iter()
                    .map(|(d, u)| (d, u, own.remove(&d).flatten()))
                    .collect()
            };
            let name: String = query_opt(
                c,
                "SELECT name FROM groups WHERE conversation_id = $1",
                &[&conv_id],
            )
            .await?
            .ok_or(StoreError::NotFound("group"))?
            .col(0)?;
            let record = p.record(Conversation::Group { id: group, name }, seq);
            let deliveries = store_message(c, conv_id, record, to, Some(p.mailbox)).await?;
            (seq, deliveries)
        }
        Target::User(recipient_id) => {
            // The recipient's name and the devices of both users, in one statement. The
            // addressed set must be exactly: every device of the recipient and every other
            // device of the sender (for a note to self, the two coincide).
            let owners: Vec<i64> = vec![id(recipient_id), id(sender.id)];
            let mut recipient_name = None;
            let mut recipient_devices = Vec::new();
            let mut expected = Vec::new();
            for r in query(
                c,
                "SELECT u.id, u.username, d.id FROM users u
                 LEFT JOIN devices d ON d.user_id = u.id
                 WHERE u.id = ANY($1) ORDER BY d.id",
                &[&owners],
            )
            .await?
            {
                let u = r.col::<i64>(0)? as UserId;
                if u == recipient_id {
                    recipient_name = Some(r.col::<String>(1)?);
                }
                let Some(d) = r.col::<Option<i64>>(2)? else {
                    continue;
                };
                let d = d as DeviceId;
                if u == recipient_id {
                    recipient_devices.push(d);
                }
                if d != p.sender.device_id && !expected.contains(&d) {
                    expected.push(d);
                }
            }
            let recipient = UserRef {
                id: recipient_id,
                username: recipient_name.ok_or(StoreError::NotFound("recipient"))?,
            };
            let addressed: Vec<DeviceId> = p.devices.iter().map(|d| d.device).collect();
            check_device_set(&expected, &addressed)?;
            let (lo, hi) = if sender.id <= recipient.id {
                (sender.clone(), recipient.clone())
            } else {
                (recipient.clone(), sender.clone())
            };
            let conv_id = direct_conversation_id(lo.id, hi.id) as i64;
            let seq: i64 = query_opt(
                c,
                "INSERT INTO conversations (id, kind, user_lo, user_hi, next_seq)
                 VALUES ($1, $2, $3, $4, 2)
                 ON CONFLICT (id) DO UPDATE SET next_seq = conversations.next_seq + 1
                 RETURNING next_seq - 1",
                &[&conv_id, &KIND_DIRECT, &id(lo.id), &id(hi.id)],
            )
            .await?
            .ok_or(StoreError::NotFound("conversation"))?
            .col(0)?;
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
            let record = p.record(Conversation::Direct { lo, hi }, seq as u64);
            let deliveries = store_message(c, conv_id, record, to, Some(p.mailbox)).await?;
            (seq as u64, deliveries)
        }
    };
    Ok(PostOutcome::Stored {
        seq,
        server_ts_ms: p.now_ms,
        deliveries,
    })
}

/// The ticks of `target`'s own messages: what every other participant has delivered and read.
async fn aggregate<C: GenericClient>(
    c: &C,
    conv: &ConvRow,
    target: UserId,
) -> Result<(u64, u64), StoreError> {
    let row: (Option<i64>, Option<i64>) = match &conv.conversation {
        Conversation::Direct { lo, hi } => {
            let other = if lo.id == target { hi.id } else { lo.id };
            match query_opt(
                c,
                "SELECT delivered_up_to, read_up_to FROM receipts
                 WHERE conversation_id = $1 AND reader = $2",
                &[&conv.id, &id(other)],
            )
            .await?
            {
                Some(r) => (r.col(0)?, r.col(1)?),
                None => (Some(0), Some(0)),
            }
        }
        Conversation::Group { .. } => {
            let r = super::query_one(
                c,
                "SELECT MIN(GREATEST(COALESCE(r.delivered_up_to, 0), m.joined_seq - 1)),
                        MIN(GREATEST(COALESCE(r.read_up_to, 0), m.joined_seq - 1))
                 FROM members m LEFT JOIN receipts r
                   ON r.conversation_id = m.conversation_id AND r.reader = m.user_id
                 WHERE m.conversation_id = $1 AND m.user_id != $2",
                &[&conv.id, &id(target)],
            )
            .await?;
            (r.col(0)?, r.col(1)?)
        }
    };
    // Alone in a group: everyone else (nobody) has everything.
    let last = conv.next_seq.saturating_sub(1);
    Ok((
        row.0.map_or(last, |v| v as u64),
        row.1.map_or(last, |v| v as u64),
    ))
}

/// Collects a receipt for every device of `to_user` (except `skip`).
async fn send_receipt<C: GenericClient>(
    c: &C,
    conv: &ConvRow,
    to_user: UserId,
    skip: Option<DeviceId>,
    base: &ReceiptRecord,
    out: &mut Appends,
) -> Result<(), StoreError> {
    let (all_d, all_r) = aggregate(c, conv, to_user).await?;
    let record = Arc::new(ReceiptRecord {
        all_delivered_up_to: all_d,
        all_read_up_to: all_r,
        ..base.clone()
    });
    let kind = match record.kind {
        ReceiptKind::Delivered => ENTRY_DELIVERED,
        ReceiptKind::Read => ENTRY_READ,
    };
    for device in super::accounts::device_ids(c, to_user).await? {
        if Some(device) == skip {
            continue;
        }
        out.entries.push(NewEntry {
            device,
            user: to_user,
            kind,
            conv: conv.id,
            seq: record.up_to_seq,
            reader: Some(record.reader),
            body: None,
            all: Some((all_d, all_r)),
            ts: record.ts_ms,
            size: 0,
            item: MailboxItem::Receipt(record.clone()),
        });
    }
    Ok(())
}

/// Raises a watermark if `up_to` is above it (locking the row); returns the previous value if
/// it grew.
async fn raise_watermark<C: GenericClient>(
    c: &C,
    conv: i64,
    reader: UserId,
    kind: ReceiptKind,
    up_to: u64,
) -> Result<Option<u64>, StoreError> {
    let col = match kind {
        ReceiptKind::Delivered => 0,
        ReceiptKind::Read => 1,
    };
    let current = query_opt(
        c,
        "SELECT delivered_up_to, read_up_to FROM receipts
         WHERE conversation_id = $1 AND reader = $2 FOR UPDATE",
        &[&conv, &id(reader)],
    )
    .await?;
    let up = id(up_to);
    let (delivered, read) = match kind {
        ReceiptKind::Delivered => (up, 0),
        ReceiptKind::Read => (up, up),
    };
    let Some(row) = current else {
        let st = c
            .prepare_cached(
                "INSERT INTO receipts (conversation_id, reader, delivered_up_to, read_up_to)
                 VALUES ($1, $2, $3, $4)",
            )
            .await
            .map_err(pg)?;
        return match c
            .execute(&st, &[&conv, &id(reader), &delivered, &read])
            .await
        {
            Ok(_) => Ok((up_to > 0).then_some(0)),
            // Inserted concurrently: run again, and find the row.
            Err(e) if is_unique_violation(&e) => Err(StoreError::Contended {
                backend: "postgres",
            }),
            Err(e) => Err(pg(e)),
        };
    };
    let old = row.col::<i64>(col)?;
    if old >= up {
        return Ok(None);
    }
    let sql = match kind {
        ReceiptKind::Delivered => {
            "UPDATE receipts SET delivered_up_to = $3 WHERE conversation_id = $1 AND reader = $2"
        }
        ReceiptKind::Read => {
            "UPDATE receipts SET read_up_to = $3, delivered_up_to = GREATEST(delivered_up_to, $3)
             WHERE conversation_id = $1 AND reader = $2"
        }
    };
    execute(c, sql, &[&conv, &id(reader), &up]).await?;
    Ok(Some(old as u64))
}

pub async fn ack<C: GenericClient>(
    c: &C,
    who: &DeviceAuth,
    up_to: u64,
    now: i64,
) -> Result<Vec<Delivery>, StoreError> {
    let (acked, entries, bytes) = delete_mailbox(c, who.device_id, up_to).await?;
    // Per conversation: the highest acknowledged seq and the senders of acknowledged user
    // messages (other than me): they get the delivered receipt.
    let mut per_conv: BTreeMap<i64, (u64, BTreeSet<UserId>)> = BTreeMap::new();
    if !acked.is_empty() {
        let convs: Vec<i64> = acked.iter().map(|a| a.0).collect();
        let seqs: Vec<i64> = acked.iter().map(|a| id(a.1)).collect();
        for r in query(
            c,
            "SELECT g.conversation_id, g.seq, g.sender_user, g.kind
             FROM UNNEST($1::BIGINT[], $2::BIGINT[]) AS a(conversation_id, seq)
             JOIN messages g ON g.conversation_id = a.conversation_id AND g.seq = a.seq",
            &[&convs, &seqs],
        )
        .await?
        {
            let (conv, seq) = (r.col::<i64>(0)?, r.col::<i64>(1)? as u64);
            let (sender, kind) = (r.col::<i64>(2)? as UserId, r.col::<i16>(3)?);
            let e = per_conv.entry(conv).or_default();
            e.0 = e.0.max(seq);
            if sender != who.user_id && kind == MSG_USER {
                e.1.insert(sender);
            }
        }
    }
    let mut appends = Appends::default();
    if entries > 0 {
        appends.also_lock.push(who.device_id);
    }
    for (conv_id, (seq, senders)) in per_conv {
        if raise_watermark(c, conv_id, who.user_id, ReceiptKind::Delivered, seq)
            .await?
            .is_none()
            || senders.is_empty()
        {
            continue;
        }
        let conv = conversation_by_id(c, conv_id).await?;
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
            send_receipt(c, &conv, sender, None, &base, &mut appends).await?;
        }
    }
    // The receipts' heads and this device's own, in one ordered lock; then this device's
    // totals lose what was acknowledged.
    let out = appends.flush(c, None).await?;
    if entries > 0 {
        execute(
            c,
            "UPDATE mailbox_heads SET entries = entries - $2, bytes = bytes - $3
             WHERE device_id = $1",
            &[&id(who.device_id), &entries, &bytes],
        )
        .await?;
    }
    Ok(out)
}

pub async fn mark_read<C: GenericClient>(
    c: &C,
    who: &DeviceAuth,
    target: Target,
    up_to: u64,
    now: i64,
) -> Result<Vec<Delivery>, StoreError> {
    let conv_id = match target {
        Target::User(peer) => {
            let conv = direct_conversation_id(who.user_id, peer) as i64;
            if query_opt(c, "SELECT 1 FROM conversations WHERE id = $1", &[&conv])
                .await?
                .is_none()
            {
                return Err(StoreError::NotFound("conversation"));
            }
            conv
        }
        Target::Group(group) => member_group(c, group, who.user_id).await?,
    };
    let conv = conversation_by_id(c, conv_id).await?;
    if up_to >= conv.next_seq {
        return Err(StoreError::Invalid(format!(
            "up_to_seq {up_to} is beyond the last message ({})",
            conv.next_seq - 1
        )));
    }
    let Some(old) = raise_watermark(c, conv_id, who.user_id, ReceiptKind::Read, up_to).await?
    else {
        return Ok(Vec::new());
    };
    // The senders of the messages this read covers hear of it.
    let senders: Vec<UserId> = query(
        c,
        "SELECT DISTINCT sender_user FROM messages
         WHERE conversation_id = $1 AND seq > $2 AND seq <= $3 AND kind = 0 AND sender_user != $4",
        &[&conv_id, &id(old), &id(up_to), &id(who.user_id)],
    )
    .await?
    .iter()
    .map(|r| Ok(r.col::<i64>(0)? as UserId))
    .collect::<Result<_, StoreError>>()?;
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
    let mut appends = Appends::default();
    for sender in senders {
        send_receipt(c, &conv, sender, None, &base, &mut appends).await?;
    }
    send_receipt(
        c,
        &conv,
        who.user_id,
        Some(who.device_id),
        &base,
        &mut appends,
    )
    .await?;
    appends.flush(c, None).await
}

pub async fn mailbox_after<C: GenericClient>(
    c: &C,
    device: DeviceId,
    after: u64,
    limit: usize,
) -> Result<Vec<MailboxEntry>, StoreError> {
    let rows = query(
        c,
        "SELECT m.mseq, m.kind, m.conversation_id, m.seq, m.reader, ur.username, m.ts,
                m.all_delivered, m.all_read, COALESCE(m.body, g.body), g.kind, g.sender_user,
                us.username, g.sender_device, g.client_msg_id, g.server_ts,
                c.kind, c.user_lo, ulo.username, c.user_hi, uhi.username, grp.name
         FROM mailbox m
         JOIN conversations c ON c.id = m.conversation_id
         LEFT JOIN users ulo ON ulo.id = c.user_lo
         LEFT JOIN users uhi ON uhi.id = c.user_hi
         LEFT JOIN groups grp ON grp.conversation_id = c.id
         LEFT JOIN messages g ON m.kind = 1 AND g.conversation_id = m.conversation_id
                              AND g.seq = m.seq
         LEFT JOIN users us ON us.id = g.sender_user
         LEFT JOIN users ur ON ur.id = m.reader
         WHERE m.device_id = $1 AND m.mseq > $2
         ORDER BY m.mseq LIMIT $3",
        &[&id(device), &id(after), &(limit as i64)],
    )
    .await?;
    rows.iter().map(entry_from_row).collect()
}

fn entry_from_row(r: &tokio_postgres::Row) -> Result<MailboxEntry, StoreError> {
    let conv_id: i64 = r.col(2)?;
    let opt_i64 =
        |i: usize| -> Result<i64, StoreError> { Ok(r.col::<Option<i64>>(i)?.unwrap_or_default()) };
    let opt_str = |i: usize| -> Result<String, StoreError> {
        Ok(r.col::<Option<String>>(i)?.unwrap_or_default())
    };
    let conversation = if r.col::<i16>(16)? == KIND_GROUP {
        Conversation::Group {
            id: conv_id as GroupId,
            name: opt_str(21)?,
        }
    } else {
        Conversation::Direct {
            lo: UserRef {
                id: opt_i64(17)? as UserId,
                username: opt_str(18)?,
            },
            hi: UserRef {
                id: opt_i64(19)? as UserId,
                username: opt_str(20)?,
            },
        }
    };
    let mseq = r.col::<i64>(0)? as u64;
    let kind: i16 = r.col(1)?;
    let seq = r.col::<i64>(3)? as u64;
    let item = if kind == ENTRY_MESSAGE {
        let body: Option<Vec<u8>> = r.col(9)?;
        MailboxItem::Message(Arc::new(MessageRecord {
            conversation,
            seq,
            kind: if r.col::<Option<i16>>(10)? == Some(MSG_SYSTEM) {
                MessageKind::System
            } else {
                MessageKind::User
            },
            sender_user: opt_i64(11)? as UserId,
            sender_username: opt_str(12)?,
            sender_device: opt_i64(13)? as DeviceId,
            client_msg_id: opt_str(14)?,
            server_ts_ms: opt_i64(15)?,
            body: Arc::from(body.unwrap_or_default()),
        }))
    } else {
        MailboxItem::Receipt(Arc::new(ReceiptRecord {
            conversation,
            reader: opt_i64(4)? as UserId,
            reader_username: opt_str(5)?,
            kind: if kind == ENTRY_DELIVERED {
                ReceiptKind::Delivered
            } else {
                ReceiptKind::Read
            },
            up_to_seq: seq,
            all_delivered_up_to: opt_i64(7)? as u64,
            all_read_up_to: opt_i64(8)? as u64,
            ts_ms: r.col(6)?,
        }))
    };
    Ok(MailboxEntry { mseq, item })
}
