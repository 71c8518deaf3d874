//! Posts and acknowledgements of many connections, written together: one transaction and a
//! fixed number of set-based statements per batch, whatever its size (see [`super::writer`]
//! for how batches are gathered).
//!
//! A batch locks what it writes up front, in the order every writer of this backend takes
//! locks: conversation rows by ascending id (group ids, which are below 2^32, before direct
//! ids), then message rows by (conversation, seq) when their bodies are released, then receipt
//! rows by (conversation, reader), then mailbox heads by ascending device.
//! Two batches (of this node or another) that touch the same rows queue instead of
//! deadlocking. Everything a post depends on is read after its conversation is locked, and
//! each post is then decided in memory, in batch order, exactly as if the posts had been made
//! one after another: a refused post takes no seq and no mseq and does not affect the others.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use deadpool_postgres::GenericClient;

use super::accounts::release_bodies;
use super::messaging::{
    Appends, ENTRY_DELIVERED, ENTRY_MESSAGE, KIND_DIRECT, KIND_GROUP, MSG_USER, NewEntry,
    conversations_by_ids, lock_heads, place, write_mailbox,
};
use super::{RowExt, execute, id, is_unique_violation, pg, query};
use crate::logic::{check_device_set, direct_conversation_id};
use crate::*;

/// Where a validated post goes.
struct Plan {
    conv: i64,
    conversation: Conversation,
    /// (device, owning user, own body) of every entry, in device order.
    to: Vec<(DeviceId, UserId, Option<Vec<u8>>)>,
}

/// A group as the batch locked it.
struct LockedGroup {
    next_seq: u64,
    name: String,
    /// Members sorted by user id, with their devices.
    members: Vec<(UserId, Vec<DeviceId>)>,
}

/// Stores `posts` in the caller's transaction, in order, each as if by `Store::post_message`;
/// one outcome per post. An `Err` of the whole call (a database failure, or `Contended` when
/// another writer committed a conflicting row first) means nothing of it may be committed.
pub async fn post_batch<C: GenericClient>(
    c: &C,
    posts: &[&NewMessage],
) -> Result<Vec<Result<PostOutcome, StoreError>>, StoreError> {
    // What the batch reads before it locks anything: posts already stored (retries), and the
    // users and devices of direct conversations. Then the groups' rows, locked. Pipelined.
    let senders: Vec<i64> = posts.iter().map(|p| id(p.sender.device_id)).collect();
    let client_ids: Vec<&str> = posts.iter().map(|p| p.client_msg_id.as_str()).collect();
    let mut people: BTreeSet<i64> = BTreeSet::new();
    let mut group_ids: BTreeSet<i64> = BTreeSet::new();
    for p in posts {
        match p.to {
            Target::User(r) => {
                people.insert(id(r));
                people.insert(id(p.sender.user_id));
            }
            Target::Group(g) => {
                group_ids.insert(id(g));
            }
        }
    }
    let people: Vec<i64> = people.into_iter().collect();
    let group_ids: Vec<i64> = group_ids.into_iter().collect();
    let stored = async {
        query(
            c,
            "SELECT m.sender_device, m.client_msg_id, m.seq, m.server_ts
             FROM UNNEST($1::BIGINT[], $2::TEXT[]) AS a(device_id, client_msg_id)
             JOIN messages m ON m.sender_device = a.device_id
                            AND m.client_msg_id = a.client_msg_id",
            &[&senders, &client_ids],
        )
        .await
    };
    let users = async {
        if people.is_empty() {
            return Ok(Vec::new());
        }
        query(
            c,
            "SELECT u.id, u.username, d.id FROM users u
             LEFT JOIN devices d ON d.user_id = u.id
             WHERE u.id = ANY($1) ORDER BY u.id, d.id",
            &[&people],
        )
        .await
    };
    let groups = async {
        if group_ids.is_empty() {
            return Ok(Vec::new());
        }
        query(
            c,
            "SELECT c.id, c.next_seq, g.name FROM conversations c
             JOIN groups g ON g.conversation_id = c.id
             WHERE c.id = ANY($1) AND c.kind = $2
             ORDER BY c.id FOR UPDATE OF c",
            &[&group_ids, &KIND_GROUP],
        )
        .await
    };
    let (stored, users, groups) = tokio::try_join!(stored, users, groups)?;

    let mut done: HashMap<(DeviceId, &str), (u64, i64)> = HashMap::new();
    for r in &stored {
        let device = r.col::<i64>(0)? as DeviceId;
        let client_msg_id: String = r.col(1)?;
        if let Some(p) = posts
            .iter()
            .find(|p| p.sender.device_id == device && p.client_msg_id == client_msg_id)
        {
            done.insert(
                (device, p.client_msg_id.as_str()),
                (r.col::<i64>(2)? as u64, r.col(3)?),
            );
        }
    }
    // user -> (name, devices in ascending order)
    let mut directory: HashMap<UserId, (String, Vec<DeviceId>)> = HashMap::new();
    for r in &users {
        let user = r.col::<i64>(0)? as UserId;
        let entry = match directory.entry(user) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert((r.col::<String>(1)?, Vec::new()))
            }
        };
        if let Some(d) = r.col::<Option<i64>>(2)? {
            entry.1.push(d as DeviceId);
        }
    }
    // Membership read after the groups' rows are locked: it is the membership at the seqs
    // this batch takes, whatever changes commit meanwhile (a change locks the row too).
    let mut locked: BTreeMap<i64, LockedGroup> = BTreeMap::new();
    for r in &groups {
        locked.insert(
            r.col(0)?,
            LockedGroup {
                next_seq: r.col::<i64>(1)? as u64,
                name: r.col(2)?,
                members: Vec::new(),
            },
        );
    }
    if !locked.is_empty() {
        let convs: Vec<i64> = locked.keys().copied().collect();
        for r in query(
            c,
            "SELECT m.conversation_id, m.user_id, d.id FROM members m
             LEFT JOIN devices d ON d.user_id = m.user_id
             WHERE m.conversation_id = ANY($1) ORDER BY 1, 2, 3",
            &[&convs],
        )
        .await?
        {
            let Some(g) = locked.get_mut(&r.col::<i64>(0)?) else {
                continue;
            };
            let user = r.col::<i64>(1)? as UserId;
            if g.members.last().map(|(u, _)| *u) != Some(user) {
                g.members.push((user, Vec::new()));
            }
            if let (Some(d), Some((_, ds))) = (r.col::<Option<i64>>(2)?, g.members.last_mut()) {
                ds.push(d as DeviceId);
            }
        }
    }

    // Each post checked on its own against what was read.
    let plans: Vec<Result<Plan, StoreError>> = posts
        .iter()
        .map(|p| match p.to {
            Target::Group(g) => plan_group(p, g, locked.get(&id(g))),
            Target::User(r) => plan_direct(p, r, &directory),
        })
        .collect();

    // The direct conversations of valid posts, created if new and locked, in id order.
    let mut direct: BTreeMap<i64, (i64, i64)> = BTreeMap::new();
    for plan in plans.iter().flatten() {
        if let Conversation::Direct { lo, hi } = &plan.conversation {
            direct.insert(plan.conv, (id(lo.id), id(hi.id)));
        }
    }
    let mut next_seq: BTreeMap<i64, u64> = locked.iter().map(|(k, g)| (*k, g.next_seq)).collect();
    let mut created: BTreeSet<i64> = BTreeSet::new();
    if !direct.is_empty() {
        let ids: Vec<i64> = direct.keys().copied().collect();
        let los: Vec<i64> = direct.values().map(|v| v.0).collect();
        let his: Vec<i64> = direct.values().map(|v| v.1).collect();
        // A no-op update of an existing row locks it and returns its next seq.
        for r in query(
            c,
            "INSERT INTO conversations (id, kind, user_lo, user_hi, next_seq)
             SELECT a.id, $4, a.lo, a.hi, 1
             FROM UNNEST($1::BIGINT[], $2::BIGINT[], $3::BIGINT[]) AS a(id, lo, hi)
             ORDER BY a.id
             ON CONFLICT (id) DO UPDATE SET next_seq = conversations.next_seq
             RETURNING id, next_seq, xmax = 0",
            &[&ids, &los, &his, &KIND_DIRECT],
        )
        .await?
        {
            let conv: i64 = r.col(0)?;
            next_seq.insert(conv, r.col::<i64>(1)? as u64);
            if r.col::<bool>(2)? {
                created.insert(conv);
            }
        }
    }

    // Every addressed device's head, locked in one statement.
    let devices: BTreeSet<DeviceId> = plans
        .iter()
        .flatten()
        .flat_map(|p| p.to.iter().map(|t| t.0))
        .collect();
    let mut heads = lock_heads(c, &devices).await?;

    // Decided in order, as if posted one after another.
    let mut outcomes = Vec::with_capacity(posts.len());
    let mut placed: Vec<(u64, NewEntry)> = Vec::new();
    let mut rows = MessageColumns::default();
    let mut used: BTreeSet<i64> = BTreeSet::new();
    for (p, plan) in posts.iter().zip(plans) {
        let key = (p.sender.device_id, p.client_msg_id.as_str());
        if let Some((seq, server_ts_ms)) = done.get(&key) {
            outcomes.push(Ok(PostOutcome::Duplicate {
                seq: *seq,
                server_ts_ms: *server_ts_ms,
            }));
            continue;
        }
        let plan = match plan {
            Ok(plan) => plan,
            Err(e) => {
                outcomes.push(Err(e));
                continue;
            }
        };
        let own_size = |own: &Option<Vec<u8>>| own.as_ref().map_or(p.body.len(), Vec::len) as u64;
        if let Some((device, user)) = plan.to.iter().find_map(|(d, u, own)| {
            let h = heads.get(d)?;
            (h.entries + 1 > p.mailbox.max_entries || h.bytes + own_size(own) > p.mailbox.max_bytes)
                .then_some((*d, *u))
        }) {
            outcomes.push(Err(StoreError::MailboxFull { user, device }));
            continue;
        }
        let Some(seq) = next_seq.get_mut(&plan.conv) else {
            return Err(super::db_error(format!(
                "conversation {} not locked",
                plan.conv
            )));
        };
        let record = Arc::new(p.record(plan.conversation, *seq));
        *seq += 1;
        used.insert(plan.conv);
        rows.push(plan.conv, &record, plan.to.iter().any(|t| t.2.is_none()));
        let mut deliveries = Vec::with_capacity(plan.to.len());
        for (device, user, own) in plan.to {
            let item = match &own {
                None => record.clone(),
                Some(b) => Arc::new(MessageRecord {
                    body: Arc::from(&b[..]),
                    ..(*record).clone()
                }),
            };
            let entry = NewEntry {
                device,
                user,
                kind: ENTRY_MESSAGE,
                conv: plan.conv,
                seq: record.seq,
                reader: None,
                size: own_size(&own),
                body: own,
                all: None,
                ts: record.server_ts_ms,
                item: MailboxItem::Message(item),
            };
            let mseq = place(&mut heads, &entry)?;
            deliveries.push(Delivery {
                device,
                user,
                entry: MailboxEntry {
                    mseq,
                    item: entry.item.clone(),
                },
            });
            placed.push((mseq, entry));
        }
        done.insert(key, (record.seq, record.server_ts_ms));
        outcomes.push(Ok(PostOutcome::Stored {
            seq: record.seq,
            server_ts_ms: record.server_ts_ms,
            deliveries,
        }));
    }

    // The writes, pipelined: one round trip.
    let seqs: Vec<(i64, i64)> = used
        .iter()
        .filter_map(|conv| Some((*conv, id(*next_seq.get(conv)?))))
        .collect();
    let unused: Vec<i64> = created.difference(&used).copied().collect();
    let conversations = async {
        if seqs.is_empty() {
            return Ok(0);
        }
        let (ids, next): (Vec<i64>, Vec<i64>) = seqs.iter().copied().unzip();
        execute(
            c,
            "UPDATE conversations c SET next_seq = a.next_seq
             FROM UNNEST($1::BIGINT[], $2::BIGINT[]) AS a(id, next_seq) WHERE c.id = a.id",
            &[&ids, &next],
        )
        .await
    };
    // A conversation created for posts that were all refused is not kept: sharing one is
    // what makes two users contacts.
    let forget = async {
        if unused.is_empty() {
            return Ok(0);
        }
        execute(
            c,
            "DELETE FROM conversations WHERE id = ANY($1)",
            &[&unused],
        )
        .await
    };
    let messages = rows.insert(c);
    let mailbox = write_mailbox(c, &heads, &placed);
    tokio::try_join!(conversations, forget, messages, mailbox)?;
    Ok(outcomes)
}

fn plan_group(
    p: &NewMessage,
    group: GroupId,
    locked: Option<&LockedGroup>,
) -> Result<Plan, StoreError> {
    let g = locked.ok_or(StoreError::NotFound("group"))?;
    if g.members
        .binary_search_by_key(&p.sender.user_id, |(u, _)| *u)
        .is_err()
    {
        return Err(StoreError::NotFound("group"));
    }
    let mut to: Vec<(DeviceId, UserId, Option<Vec<u8>>)> = g
        .members
        .iter()
        .flat_map(|(u, ds)| ds.iter().map(move |d| (*d, *u, None)))
        .filter(|(d, _, _)| *d != p.sender.device_id)
        .collect();
    // Addressed (end-to-end encrypted groups): exactly every member device but the sender's,
    // like a direct message.
    if !p.devices.is_empty() {
        let expected: Vec<DeviceId> = to.iter().map(|t| t.0).collect();
        let got: Vec<DeviceId> = p.devices.iter().map(|d| d.device).collect();
        check_device_set(&expected, &got)?;
        let mut own: BTreeMap<DeviceId, Option<Vec<u8>>> = p
            .devices
            .iter()
            .map(|a| (a.device, a.body.clone()))
            .collect();
        for t in &mut to {
            t.2 = own.remove(&t.0).flatten();
        }
    }
    to.sort_by_key(|t| t.0);
    Ok(Plan {
        conv: id(group),
        conversation: Conversation::Group {
            id: group,
            name: g.name.clone(),
        },
        to,
    })
}

fn plan_direct(
    p: &NewMessage,
    recipient: UserId,
    directory: &HashMap<UserId, (String, Vec<DeviceId>)>,
) -> Result<Plan, StoreError> {
    let (recipient_name, recipient_devices) = directory
        .get(&recipient)
        .ok_or(StoreError::NotFound("recipient"))?;
    let sender = p.sender.user_id;
    let sender_devices = directory.get(&sender).map_or(&[][..], |d| &d.1[..]);
    // Every device of the recipient and every other device of the sender (for a note to
    // self, the two coincide).
    let mut expected: Vec<DeviceId> = recipient_devices
        .iter()
        .chain(sender_devices)
        .copied()
        .filter(|d| *d != p.sender.device_id)
        .collect();
    expected.sort_unstable();
    expected.dedup();
    let addressed: Vec<DeviceId> = p.devices.iter().map(|d| d.device).collect();
    check_device_set(&expected, &addressed)?;
    let me = UserRef {
        id: sender,
        username: p.sender.username.clone(),
    };
    let them = UserRef {
        id: recipient,
        username: recipient_name.clone(),
    };
    let (lo, hi) = if me.id <= them.id {
        (me, them)
    } else {
        (them, me)
    };
    let mut to: Vec<(DeviceId, UserId, Option<Vec<u8>>)> = p
        .devices
        .iter()
        .map(|d| {
            let owner = if recipient_devices.contains(&d.device) {
                recipient
            } else {
                sender
            };
            (d.device, owner, d.body.clone())
        })
        .collect();
    to.sort_by_key(|t| t.0);
    Ok(Plan {
        conv: direct_conversation_id(lo.id, hi.id) as i64,
        conversation: Conversation::Direct { lo, hi },
        to,
    })
}

/// The message rows of one batch, column by column (for `UNNEST`).
#[derive(Default)]
struct MessageColumns {
    conv: Vec<i64>,
    seq: Vec<i64>,
    sender_user: Vec<i64>,
    sender_device: Vec<i64>,
    client_msg_id: Vec<String>,
    server_ts: Vec<i64>,
    body: Vec<Option<Arc<[u8]>>>,
}

impl MessageColumns {
    /// A user message; its body is kept only if an entry shares it (no body of its own).
    fn push(&mut self, conv: i64, m: &MessageRecord, shared: bool) {
        self.conv.push(conv);
        self.seq.push(id(m.seq));
        self.sender_user.push(id(m.sender_user));
        self.sender_device.push(id(m.sender_device));
        self.client_msg_id.push(m.client_msg_id.clone());
        self.server_ts.push(m.server_ts_ms);
        self.body.push(shared.then(|| m.body.clone()));
    }

    async fn insert<C: GenericClient>(&self, c: &C) -> Result<u64, StoreError> {
        if self.conv.is_empty() {
            return Ok(0);
        }
        let bodies: Vec<Option<&[u8]>> = self.body.iter().map(|b| b.as_deref()).collect();
        let st = c
            .prepare_cached(
                "INSERT INTO messages (conversation_id, seq, kind, sender_user, sender_device,
                                       client_msg_id, server_ts, body)
                 SELECT a.conversation_id, a.seq, $8, a.sender_user, a.sender_device,
                        a.client_msg_id, a.server_ts, a.body
                 FROM UNNEST($1::BIGINT[], $2::BIGINT[], $3::BIGINT[], $4::BIGINT[],
                             $5::TEXT[], $6::BIGINT[], $7::BYTEA[])
                      AS a(conversation_id, seq, sender_user, sender_device, client_msg_id,
                           server_ts, body)",
            )
            .await
            .map_err(pg)?;
        match c
            .execute(
                &st,
                &[
                    &self.conv,
                    &self.seq,
                    &self.sender_user,
                    &self.sender_device,
                    &self.client_msg_id,
                    &self.server_ts,
                    &bodies,
                    &MSG_USER,
                ],
            )
            .await
        {
            Ok(n) => Ok(n),
            // The same (device, client_msg_id) committed by another writer meanwhile: run the
            // batch again, and that post answers `Duplicate`.
            Err(e) if is_unique_violation(&e) => Err(StoreError::Contended {
                backend: "postgres",
            }),
            Err(e) => Err(pg(e)),
        }
    }
}

/// One acknowledgement of a batch (see `Store::ack`).
pub struct AckRequest {
    pub who: DeviceAuth,
    pub up_to: u64,
    pub now_ms: i64,
}

/// Acknowledges every request's mailbox in the caller's transaction; the receipts each
/// produced (a reader's receipts are answered to the first of its requests in the batch).
pub async fn ack_batch<C: GenericClient>(
    c: &C,
    acks: &[&AckRequest],
) -> Result<Vec<Vec<Delivery>>, StoreError> {
    let mut out: Vec<Vec<Delivery>> = acks.iter().map(|_| Vec::new()).collect();
    // Per device, the highest acknowledgement; per reading user, its first request.
    let mut up_to: BTreeMap<DeviceId, u64> = BTreeMap::new();
    let mut first: BTreeMap<UserId, usize> = BTreeMap::new();
    for (i, a) in acks.iter().enumerate() {
        let u = up_to.entry(a.who.device_id).or_default();
        *u = (*u).max(a.up_to);
        first.entry(a.who.user_id).or_insert(i);
    }
    let owner: HashMap<DeviceId, UserId> = acks
        .iter()
        .map(|a| (a.who.device_id, a.who.user_id))
        .collect();
    let devices: Vec<i64> = up_to.keys().map(|d| id(*d)).collect();
    let limits: Vec<i64> = up_to.values().map(|u| id(*u)).collect();
    let deleted = query(
        c,
        "WITH d AS (
             DELETE FROM mailbox m
             USING UNNEST($1::BIGINT[], $2::BIGINT[]) AS a(device_id, up_to)
             WHERE m.device_id = a.device_id AND m.mseq <= a.up_to
             RETURNING m.device_id, m.kind, m.conversation_id, m.seq, m.size)
         SELECT d.device_id, d.kind, d.conversation_id, d.seq, d.size, g.sender_user, g.kind
         FROM d LEFT JOIN messages g ON d.kind = $3 AND g.conversation_id = d.conversation_id
                                    AND g.seq = d.seq",
        &[&devices, &limits, &ENTRY_MESSAGE],
    )
    .await?;
    let mut appends = Appends::default();
    // (conversation, reader) -> (highest acknowledged seq, senders of user messages in it)
    let mut per_reader: BTreeMap<(i64, UserId), (u64, BTreeSet<UserId>)> = BTreeMap::new();
    let mut acked_messages: BTreeSet<(i64, i64)> = BTreeSet::new();
    for r in &deleted {
        let device = r.col::<i64>(0)? as DeviceId;
        let released = appends.released.entry(device).or_default();
        released.0 += 1;
        released.1 += r.col::<i64>(4)? as u64;
        if r.col::<i16>(1)? != ENTRY_MESSAGE {
            continue;
        }
        let (conv, seq) = (r.col::<i64>(2)?, r.col::<i64>(3)?);
        acked_messages.insert((conv, seq));
        let reader = owner.get(&device).copied().unwrap_or_default();
        let e = per_reader.entry((conv, reader)).or_default();
        e.0 = e.0.max(seq as u64);
        if let (Some(sender), Some(kind)) = (r.col::<Option<i64>>(5)?, r.col::<Option<i16>>(6)?)
            && sender as UserId != reader
            && kind == MSG_USER
        {
            e.1.insert(sender as UserId);
        }
    }
    if deleted.is_empty() {
        return Ok(out);
    }
    // Bodies no mailbox entry refers to any more are released; then the watermarks of every
    // (conversation, reader) grow, locking their rows in order.
    let acked_messages: Vec<(i64, u64)> = acked_messages
        .into_iter()
        .map(|(c, s)| (c, s as u64))
        .collect();
    // Message rows before receipt rows (the lock order), so not pipelined with what follows.
    release_bodies(c, &acked_messages).await?;
    let wconv: Vec<i64> = per_reader.keys().map(|k| k.0).collect();
    let wreader: Vec<i64> = per_reader.keys().map(|k| id(k.1)).collect();
    let wseq: Vec<i64> = per_reader.values().map(|v| id(v.0)).collect();
    let raise = async {
        if wconv.is_empty() {
            return Ok(Vec::new());
        }
        // Only rows that grew (or are new) come back.
        query(
            c,
            "INSERT INTO receipts (conversation_id, reader, delivered_up_to)
             SELECT * FROM UNNEST($1::BIGINT[], $2::BIGINT[], $3::BIGINT[])
                      AS a(conversation_id, reader, up_to)
             ORDER BY 1, 2
             ON CONFLICT (conversation_id, reader) DO UPDATE
                SET delivered_up_to = excluded.delivered_up_to
                WHERE receipts.delivered_up_to < excluded.delivered_up_to
             RETURNING conversation_id, reader, read_up_to",
            &[&wconv, &wreader, &wseq],
        )
        .await
    };
    let grown = raise.await?;
    // (conversation, reader) -> the reader's read watermark, for those that grew and have
    // someone to tell.
    let mut tell: Vec<((i64, UserId), u64)> = Vec::new();
    for r in &grown {
        let key = (r.col::<i64>(0)?, r.col::<i64>(1)? as UserId);
        if per_reader.get(&key).is_some_and(|v| !v.1.is_empty()) {
            tell.push((key, r.col::<i64>(2)? as u64));
        }
    }
    if tell.is_empty() {
        appends.flush(c, None).await?;
        return Ok(out);
    }
    tell.sort_unstable();

    // What the receipts say: the conversations' names, the ticks of each sender's messages
    // (groups: the lowest watermark of the other members), the senders' devices. Pipelined.
    let convs: Vec<i64> = tell
        .iter()
        .map(|t| t.0.0)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut pairs: BTreeSet<(i64, UserId)> = BTreeSet::new();
    for ((conv, reader), _) in &tell {
        for s in &per_reader[&(*conv, *reader)].1 {
            pairs.insert((*conv, *s));
        }
    }
    let (pconv, psender): (Vec<i64>, Vec<i64>) = pairs.iter().map(|(c, s)| (*c, id(*s))).unzip();
    let to_users: Vec<i64> = psender
        .iter()
        .copied()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let names = conversations_by_ids(c, &convs);
    let ticks = async {
        query(
            c,
            "SELECT a.conversation_id, a.sender,
                    MIN(GREATEST(COALESCE(r.delivered_up_to, 0), m.joined_seq - 1)),
                    MIN(GREATEST(COALESCE(r.read_up_to, 0), m.joined_seq - 1))
             FROM UNNEST($1::BIGINT[], $2::BIGINT[]) AS a(conversation_id, sender)
             JOIN members m ON m.conversation_id = a.conversation_id AND m.user_id != a.sender
             LEFT JOIN receipts r ON r.conversation_id = m.conversation_id
                                 AND r.reader = m.user_id
             GROUP BY a.conversation_id, a.sender",
            &[&pconv, &psender],
        )
        .await
    };
    let devices = async {
        query(
            c,
            "SELECT user_id, id FROM devices WHERE user_id = ANY($1) ORDER BY user_id, id",
            &[&to_users],
        )
        .await
    };
    let (names, ticks, devices) = tokio::try_join!(names, ticks, devices)?;
    let names: HashMap<i64, ConvRowInfo> = names
        .into_iter()
        .map(|r| {
            (
                r.id,
                ConvRowInfo {
                    conversation: r.conversation,
                    last: r.next_seq.saturating_sub(1),
                },
            )
        })
        .collect();
    let mut group_ticks: HashMap<(i64, UserId), (u64, u64)> = HashMap::new();
    for r in &ticks {
        let key = (r.col::<i64>(0)?, r.col::<i64>(1)? as UserId);
        let (d, rd) = (r.col::<Option<i64>>(2)?, r.col::<Option<i64>>(3)?);
        group_ticks.insert(key, (d.unwrap_or(0) as u64, rd.unwrap_or(0) as u64));
    }
    let mut devices_of: BTreeMap<UserId, Vec<DeviceId>> = BTreeMap::new();
    for r in &devices {
        devices_of
            .entry(r.col::<i64>(0)? as UserId)
            .or_default()
            .push(r.col::<i64>(1)? as DeviceId);
    }

    // Which request each entry answers, in collection order.
    let mut origin: Vec<usize> = Vec::new();
    for ((conv, reader), read_up_to) in tell {
        let Some(info) = names.get(&conv) else {
            continue;
        };
        let (seq, senders) = &per_reader[&(conv, reader)];
        let Some(&i) = first.get(&reader) else {
            continue;
        };
        let who = &acks[i].who;
        for sender in senders {
            let (all_d, all_r) = match &info.conversation {
                // The only other participant of a direct conversation is the reader.
                Conversation::Direct { .. } => (*seq, read_up_to),
                // Alone in a group: everyone else (nobody) has everything.
                Conversation::Group { .. } => group_ticks
                    .get(&(conv, *sender))
                    .copied()
                    .unwrap_or((info.last, info.last)),
            };
            let record = Arc::new(ReceiptRecord {
                conversation: info.conversation.clone(),
                reader,
                reader_username: who.username.clone(),
                kind: ReceiptKind::Delivered,
                up_to_seq: *seq,
                all_delivered_up_to: all_d,
                all_read_up_to: all_r,
                ts_ms: acks[i].now_ms,
            });
            for device in devices_of.get(sender).map_or(&[][..], |d| &d[..]) {
                appends.entries.push(NewEntry {
                    device: *device,
                    user: *sender,
                    kind: ENTRY_DELIVERED,
                    conv,
                    seq: *seq,
                    reader: Some(reader),
                    body: None,
                    all: Some((all_d, all_r)),
                    ts: acks[i].now_ms,
                    size: 0,
                    item: MailboxItem::Receipt(record.clone()),
                });
                origin.push(i);
            }
        }
    }
    for (delivery, i) in appends.flush(c, None).await?.into_iter().zip(origin) {
        out[i].push(delivery);
    }
    Ok(out)
}

/// A conversation's names and last seq, for receipts.
struct ConvRowInfo {
    conversation: Conversation,
    last: u64,
}
