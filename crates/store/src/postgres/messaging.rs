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

use super::{RowExt, execute, id, is_unique_violation, pg, query, query_opt};
use crate::logic::direct_conversation_id;
use crate::*;

pub const KIND_DIRECT: i16 = 0;
pub const KIND_GROUP: i16 = 1;
pub(super) const MSG_USER: i16 = 0;
const MSG_SYSTEM: i16 = 1;
/// Mailbox entry kinds.
pub(super) const ENTRY_MESSAGE: i16 = 1;
pub(super) const ENTRY_DELIVERED: i16 = 2;
const ENTRY_READ: i16 = 3;

/// A conversation row, resolved.
pub struct ConvRow {
    pub id: i64,
    pub conversation: Conversation,
    pub next_seq: u64,
}

/// Loads a conversation by id, with the names clients need.
pub async fn conversation_by_id<C: GenericClient>(c: &C, conv: i64) -> Result<ConvRow, StoreError> {
    conversations_by_ids(c, &[conv])
        .await?
        .pop()
        .ok_or(StoreError::NotFound("conversation"))
}

/// Loads the conversations that exist among `convs` (in no particular order).
pub(super) async fn conversations_by_ids<C: GenericClient>(
    c: &C,
    convs: &[i64],
) -> Result<Vec<ConvRow>, StoreError> {
    let rows = query(
        c,
        "SELECT c.id, c.kind, c.user_lo, ulo.username, c.user_hi, uhi.username, c.next_seq,
                g.name
         FROM conversations c
         LEFT JOIN users ulo ON ulo.id = c.user_lo
         LEFT JOIN users uhi ON uhi.id = c.user_hi
         LEFT JOIN groups g ON g.conversation_id = c.id
         WHERE c.id = ANY($1)",
        &[&convs],
    )
    .await?;
    rows.iter()
        .map(|r| {
            let conv: i64 = r.col(0)?;
            let conversation = if r.col::<i16>(1)? == KIND_GROUP {
                Conversation::Group {
                    id: conv as GroupId,
                    name: r.col::<Option<String>>(7)?.unwrap_or_default(),
                }
            } else {
                let user = |i: usize| -> Result<UserRef, StoreError> {
                    Ok(UserRef {
                        id: r.col::<Option<i64>>(i)?.unwrap_or_default() as UserId,
                        username: r.col::<Option<String>>(i + 1)?.unwrap_or_default(),
                    })
                };
                Conversation::Direct {
                    lo: user(2)?,
                    hi: user(4)?,
                }
            };
            Ok(ConvRow {
                id: conv,
                conversation,
                next_seq: r.col::<i64>(6)? as u64,
            })
        })
        .collect()
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
pub(super) struct NewEntry {
    pub(super) device: DeviceId,
    pub(super) user: UserId,
    pub(super) kind: i16,
    pub(super) conv: i64,
    pub(super) seq: u64,
    pub(super) reader: Option<UserId>,
    pub(super) body: Option<Vec<u8>>,
    pub(super) all: Option<(u64, u64)>,
    pub(super) ts: i64,
    /// The bytes this entry counts for in the device's mailbox bound.
    pub(super) size: u64,
    pub(super) item: MailboxItem,
}

/// A device's mailbox head, as locked by [`lock_heads`] and then advanced in memory.
#[derive(Debug, Clone, Copy)]
pub(super) struct Head {
    pub(super) next_mseq: u64,
    pub(super) entries: u64,
    pub(super) bytes: u64,
}

/// Locks the mailbox heads of `devices` in ascending device order (one statement); their
/// values. `Contended` if a device has none (it was removed since the caller read the device
/// list: the transaction starts over and finds it gone).
pub(super) async fn lock_heads<C: GenericClient>(
    c: &C,
    devices: &BTreeSet<DeviceId>,
) -> Result<BTreeMap<DeviceId, Head>, StoreError> {
    if devices.is_empty() {
        return Ok(BTreeMap::new());
    }
    let ids: Vec<i64> = devices.iter().map(|d| id(*d)).collect();
    let rows = query(
        c,
        "SELECT device_id, next_mseq, entries, bytes FROM mailbox_heads
         WHERE device_id = ANY($1) ORDER BY device_id FOR UPDATE",
        &[&ids],
    )
    .await?;
    if rows.len() != ids.len() {
        return Err(StoreError::Contended {
            backend: "postgres",
        });
    }
    rows.iter()
        .map(|r| {
            Ok((
                r.col::<i64>(0)? as DeviceId,
                Head {
                    next_mseq: r.col::<i64>(1)? as u64,
                    entries: r.col::<i64>(2)? as u64,
                    bytes: r.col::<i64>(3)? as u64,
                },
            ))
        })
        .collect()
}

/// Takes the next `mseq` of the entry's device and counts the entry in its totals.
pub(super) fn place(heads: &mut BTreeMap<DeviceId, Head>, e: &NewEntry) -> Result<u64, StoreError> {
    let h = heads.get_mut(&e.device).ok_or_else(|| {
        super::db_error(format!("mailbox head of device {} not locked", e.device))
    })?;
    let mseq = h.next_mseq;
    h.next_mseq += 1;
    h.entries += 1;
    h.bytes += e.size;
    Ok(mseq)
}

/// Writes placed entries (with their `mseq`) and the heads' new values, pipelined: one round
/// trip. The heads must be locked by this transaction ([`lock_heads`]).
pub(super) async fn write_mailbox<C: GenericClient>(
    c: &C,
    heads: &BTreeMap<DeviceId, Head>,
    placed: &[(u64, NewEntry)],
) -> Result<(), StoreError> {
    let devices: Vec<i64> = heads.keys().map(|d| id(*d)).collect();
    let next: Vec<i64> = heads.values().map(|h| id(h.next_mseq)).collect();
    let entries: Vec<i64> = heads.values().map(|h| id(h.entries)).collect();
    let bytes: Vec<i64> = heads.values().map(|h| id(h.bytes)).collect();
    let update = async {
        if devices.is_empty() {
            return Ok(0);
        }
        execute(
            c,
            "UPDATE mailbox_heads h SET next_mseq = a.n, entries = a.e, bytes = a.b
             FROM UNNEST($1::BIGINT[], $2::BIGINT[], $3::BIGINT[], $4::BIGINT[])
                  AS a(device_id, n, e, b)
             WHERE h.device_id = a.device_id",
            &[&devices, &next, &entries, &bytes],
        )
        .await
    };
    let n = placed.len();
    let mut cols = MailboxColumns::with_capacity(n);
    for (mseq, e) in placed {
        cols.push(*mseq, e);
    }
    let insert = async {
        if n == 0 {
            return Ok(0);
        }
        execute(
            c,
            "INSERT INTO mailbox (device_id, mseq, kind, conversation_id, seq, reader, body,
                                  all_delivered, all_read, ts, size)
             SELECT * FROM UNNEST($1::BIGINT[], $2::BIGINT[], $3::SMALLINT[], $4::BIGINT[],
                                  $5::BIGINT[], $6::BIGINT[], $7::BYTEA[], $8::BIGINT[],
                                  $9::BIGINT[], $10::BIGINT[], $11::BIGINT[])",
            &[
                &cols.dev,
                &cols.mseq,
                &cols.kind,
                &cols.conv,
                &cols.seq,
                &cols.reader,
                &cols.body,
                &cols.all_d,
                &cols.all_r,
                &cols.ts,
                &cols.size,
            ],
        )
        .await
    };
    tokio::try_join!(update, insert)?;
    Ok(())
}

/// The mailbox rows of one insert, column by column (for `UNNEST`).
struct MailboxColumns<'a> {
    dev: Vec<i64>,
    mseq: Vec<i64>,
    kind: Vec<i16>,
    conv: Vec<i64>,
    seq: Vec<i64>,
    reader: Vec<Option<i64>>,
    body: Vec<Option<&'a [u8]>>,
    all_d: Vec<Option<i64>>,
    all_r: Vec<Option<i64>>,
    ts: Vec<i64>,
    size: Vec<i64>,
}

impl<'a> MailboxColumns<'a> {
    fn with_capacity(n: usize) -> Self {
        MailboxColumns {
            dev: Vec::with_capacity(n),
            mseq: Vec::with_capacity(n),
            kind: Vec::with_capacity(n),
            conv: Vec::with_capacity(n),
            seq: Vec::with_capacity(n),
            reader: Vec::with_capacity(n),
            body: Vec::with_capacity(n),
            all_d: Vec::with_capacity(n),
            all_r: Vec::with_capacity(n),
            ts: Vec::with_capacity(n),
            size: Vec::with_capacity(n),
        }
    }

    fn push(&mut self, mseq: u64, e: &'a NewEntry) {
        self.dev.push(id(e.device));
        self.mseq.push(id(mseq));
        self.kind.push(e.kind);
        self.conv.push(e.conv);
        self.seq.push(id(e.seq));
        self.reader.push(e.reader.map(id));
        self.body.push(e.body.as_deref());
        self.all_d.push(e.all.map(|a| id(a.0)));
        self.all_r.push(e.all.map(|a| id(a.1)));
        self.ts.push(e.ts);
        self.size.push(id(e.size));
    }
}

impl NewEntry {
    pub(super) fn delivery(self, mseq: u64) -> Delivery {
        Delivery {
            device: self.device,
            user: self.user,
            entry: MailboxEntry {
                mseq,
                item: self.item,
            },
        }
    }
}

/// Mailbox entries collected for one flush; see the module docs.
#[derive(Default)]
pub(super) struct Appends {
    pub(super) entries: Vec<NewEntry>,
    /// Entries and bytes the caller removed from devices' mailboxes: taken off their totals,
    /// their heads locked in the same statement as the others.
    pub(super) released: BTreeMap<DeviceId, (u64, u64)>,
}

impl Appends {
    /// Appends every collected entry; returns their deliveries in collection order.
    /// `MailboxFull` if `limit` is given and a device's mailbox is past it with its entries
    /// (the caller's savepoint then undoes the whole step).
    pub(super) async fn flush<C: GenericClient>(
        self,
        c: &C,
        limit: Option<MailboxLimit>,
    ) -> Result<Vec<Delivery>, StoreError> {
        let mut devices: BTreeSet<DeviceId> = self.entries.iter().map(|e| e.device).collect();
        devices.extend(self.released.keys().copied());
        let mut heads = lock_heads(c, &devices).await?;
        let mut placed = Vec::with_capacity(self.entries.len());
        for e in self.entries {
            let mseq = place(&mut heads, &e)?;
            placed.push((mseq, e));
        }
        if let Some(l) = limit
            && let Some((device, _)) = heads
                .iter()
                .find(|(_, h)| h.entries > l.max_entries || h.bytes > l.max_bytes)
        {
            let user = placed
                .iter()
                .find(|(_, e)| e.device == *device)
                .map_or(0, |(_, e)| e.user);
            return Err(StoreError::MailboxFull {
                user,
                device: *device,
            });
        }
        for (device, (entries, bytes)) in &self.released {
            if let Some(h) = heads.get_mut(device) {
                h.entries = h.entries.saturating_sub(*entries);
                h.bytes = h.bytes.saturating_sub(*bytes);
            }
        }
        write_mailbox(c, &heads, &placed).await?;
        Ok(placed.into_iter().map(|(m, e)| e.delivery(m)).collect())
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

/// A page of a device's mailbox. The page is cut (`LIMIT`) before the joins that name its
/// entries, so a page costs its own size whatever waits behind it (joined first, every page of
/// a 10,000-entry drain joined everything left: quadratic).
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
         FROM (SELECT * FROM mailbox WHERE device_id = $1 AND mseq > $2
               ORDER BY mseq LIMIT $3) AS m
         JOIN conversations c ON c.id = m.conversation_id
         LEFT JOIN users ulo ON ulo.id = c.user_lo
         LEFT JOIN users uhi ON uhi.id = c.user_hi
         LEFT JOIN groups grp ON grp.conversation_id = c.id
         LEFT JOIN messages g ON m.kind = 1 AND g.conversation_id = m.conversation_id
                              AND g.seq = m.seq
         LEFT JOIN users us ON us.id = g.sender_user
         LEFT JOIN users ur ON ur.id = m.reader
         ORDER BY m.mseq",
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
