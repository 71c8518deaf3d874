//! Groups: creation, membership and settings changes (each one a system message in the group's
//! sequence), reads of a group, a user's groups, and message info.

use prost::Message as _;
use rusqlite::{Connection, OptionalExtension, params};
use tern_proto::frames::GroupAction;

use super::accounts::user_ref;
use super::cache::WriterCache;
use super::messaging::{member_group, post_system};
use crate::logic::{
    GroupSettings, authorize, group_event, heir, members_to_add, role_code, role_from_code,
};
use crate::*;

pub fn group(c: &Connection, group: GroupId) -> Result<Option<GroupRecord>, StoreError> {
    let conv = group as i64;
    let Some((name, mca, created, next_seq, description)) = c
        .prepare_cached(
            "SELECT g.name, g.members_can_add, g.created_at, c.next_seq, g.description FROM groups g
             JOIN conversations c ON c.id = g.conversation_id WHERE g.conversation_id = ?1",
        )?
        .query_row([conv], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, bool>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, String>(4)?,
            ))
        })
        .optional()?
    else {
        return Ok(None);
    };
    let mut st = c.prepare_cached(
        "SELECT m.user_id, u.username, m.role, m.joined_seq FROM members m JOIN users u ON u.id = m.user_id
         WHERE m.conversation_id = ?1 ORDER BY m.joined_seq, m.user_id",
    )?;
    let members = st
        .query_map([conv], |r| {
            Ok(MemberRecord {
                user: UserRef {
                    id: r.get::<_, i64>(0)? as UserId,
                    username: r.get(1)?,
                },
                role: role_from_code(r.get(2)?),
                joined_seq: r.get::<_, i64>(3)? as u64,
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(Some(GroupRecord {
        id: group,
        name,
        description,
        members_can_add: mca,
        created_at_ms: created,
        last_seq: next_seq.saturating_sub(1) as u64,
        members,
    }))
}

fn users(c: &Connection, ids: &[UserId]) -> Result<Vec<UserRef>, StoreError> {
    ids.iter()
        .map(|id| user_ref(c, *id)?.ok_or(StoreError::NotFound("user")))
        .collect()
}

fn insert_member(
    c: &Connection,
    conv: i64,
    user: UserId,
    role: Role,
    joined_seq: u64,
) -> Result<(), StoreError> {
    c.prepare_cached(
        "INSERT INTO members (conversation_id, user_id, role, joined_seq) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![
        conv,
        user as i64,
        role_code(role) as i64,
        joined_seq as i64
    ])?;
    Ok(())
}

/// Everything one change wrote: the system messages' deliveries.
struct Events<'a> {
    c: &'a Connection,
    cache: &'a mut WriterCache,
    conv: i64,
    actor: &'a DeviceAuth,
    now: i64,
    deliveries: Vec<Delivery>,
}

impl Events<'_> {
    /// Writes one event; returns its sequence number.
    fn emit(
        &mut self,
        action: GroupAction,
        targets: &[UserRef],
        st: &GroupSettings,
    ) -> Result<u64, StoreError> {
        let event = group_event(action, self.actor, targets, st);
        let (seq, d) = post_system(
            self.c,
            self.cache,
            self.conv,
            self.actor,
            &st.name,
            event.encode_to_vec(),
            self.now,
        )?;
        self.deliveries.extend(d);
        Ok(seq)
    }
}

pub fn create_group(
    c: &Connection,
    cache: &mut WriterCache,
    new: NewGroup,
) -> Result<GroupChange, StoreError> {
    let NewGroup {
        creator,
        name,
        description,
        mut members,
        members_can_add,
        max_members: max,
        now_ms: now,
    } = new;
    let (creator, name) = (&creator, name.as_str());
    members.sort_unstable();
    members.dedup();
    members.retain(|m| *m != creator.user_id);
    if members.len() + 1 > max {
        return Err(StoreError::GroupFull(max));
    }
    let targets = users(c, &members)?;
    // Group ids stay below 2^32 (direct conversations have the ids above): the next one after
    // the highest group id, not SQLite's next rowid.
    let conv: i64 = c
        .prepare_cached(
            "INSERT INTO conversations (id, kind)
             SELECT COALESCE(MAX(id), 0) + 1, 1 FROM conversations WHERE kind = 1
             RETURNING id",
        )?
        .query_row([], |r| r.get(0))?;
    if conv as u64 > crate::logic::MAX_ID {
        return Err(StoreError::Invalid("no more group ids".into()));
    }
    c.prepare_cached(
        "INSERT INTO groups (conversation_id, name, description, members_can_add, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![conv, name, description, members_can_add, now])?;
    // Members join at the CREATED event, which is seq 1.
    insert_member(c, conv, creator.user_id, Role::Owner, 1)?;
    for m in &members {
        insert_member(c, conv, *m, Role::Member, 1)?;
    }
    cache.invalidate(conv);
    let mut ev = Events {
        c,
        cache,
        conv,
        actor: creator,
        now,
        deliveries: Vec::new(),
    };
    let st = GroupSettings {
        name: name.to_owned(),
        description,
        members_can_add,
    };
    ev.emit(GroupAction::Created, &targets, &st)?;
    let deliveries = ev.deliveries;
    let group = group(c, conv as GroupId)?.ok_or(StoreError::NotFound("group"))?;
    Ok(GroupChange { group, deliveries })
}

pub fn change_group(
    c: &Connection,
    cache: &mut WriterCache,
    actor: &DeviceAuth,
    group_id: GroupId,
    op: GroupOp,
    max: usize,
    now: i64,
) -> Result<GroupChange, StoreError> {
    let conv = member_group(c, None, group_id, actor.user_id)?;
    let before = group(c, group_id)?.ok_or(StoreError::NotFound("group"))?;
    let actor_role = before
        .role_of(actor.user_id)
        .ok_or(StoreError::NotFound("group"))?;
    let target_role = match &op {
        GroupOp::Remove(u) | GroupOp::Promote(u) | GroupOp::Demote(u) => before.role_of(*u),
        _ => None,
    };
    authorize(&op, actor_role, target_role, before.members_can_add)?;
    let mut st = GroupSettings::of(&before);
    let mut ev = Events {
        c,
        cache,
        conv,
        actor,
        now,
        deliveries: Vec::new(),
    };
    match op {
        GroupOp::Add(named) => {
            let ids = members_to_add(&before, &named, max)?;
            let targets = users(c, &ids)?;
            // The ADDED event is the new members' first message: insert them at its seq, and
            // emit it after they are members so that they receive it.
            let seq: i64 = c.query_row(
                "SELECT next_seq FROM conversations WHERE id = ?1",
                [conv],
                |r| r.get(0),
            )?;
            for u in &ids {
                insert_member(c, conv, *u, Role::Member, seq as u64)?;
            }
            ev.cache.invalidate(conv);
            ev.emit(GroupAction::Added, &targets, &st)?;
        }
        GroupOp::Remove(user) | GroupOp::Promote(user) | GroupOp::Demote(user)
            if user == actor.user_id =>
        {
            return Err(StoreError::Invalid(
                "use leave to leave a group; admins cannot change their own role".into(),
            ));
        }
        GroupOp::Remove(user) => {
            let target = users(c, &[user])?;
            // The removed member receives its own removal, and nothing after it.
            ev.emit(GroupAction::Removed, &target, &st)?;
            c.prepare_cached("DELETE FROM members WHERE conversation_id = ?1 AND user_id = ?2")?
                .execute(params![conv, user as i64])?;
            ev.cache.invalidate(conv);
        }
        GroupOp::Leave => {
            let me = users(c, &[actor.user_id])?;
            ev.emit(GroupAction::Left, &me, &st)?;
            c.prepare_cached("DELETE FROM members WHERE conversation_id = ?1 AND user_id = ?2")?
                .execute(params![conv, actor.user_id as i64])?;
            ev.cache.invalidate(conv);
            if actor_role == Role::Owner {
                let heir = heir(&before, actor.user_id);
                if let Some(heir) = heir {
                    c.prepare_cached(
                        "UPDATE members SET role = 2 WHERE conversation_id = ?1 AND user_id = ?2",
                    )?
                    .execute(params![conv, heir.user.id as i64])?;
                    ev.emit(GroupAction::Promoted, std::slice::from_ref(&heir.user), &st)?;
                }
            }
        }
        GroupOp::Promote(user) | GroupOp::Demote(user) => {
            let promote = target_role == Some(Role::Member);
            c.prepare_cached(
                "UPDATE members SET role = ?3 WHERE conversation_id = ?1 AND user_id = ?2",
            )?
            .execute(params![conv, user as i64, if promote { 1 } else { 0 }])?;
            let target = users(c, &[user])?;
            let action = if promote {
                GroupAction::Promoted
            } else {
                GroupAction::Demoted
            };
            ev.emit(action, &target, &st)?;
        }
        GroupOp::Update {
            name,
            description,
            members_can_add,
        } => {
            let rename = name.filter(|n| *n != st.name);
            let describe = description.filter(|d| *d != st.description);
            let setting = members_can_add.filter(|m| *m != st.members_can_add);
            if rename.is_none() && describe.is_none() && setting.is_none() {
                return Err(StoreError::Invalid("nothing to change".into()));
            }
            if let Some(n) = rename {
                st.name = n;
                c.prepare_cached("UPDATE groups SET name = ?2 WHERE conversation_id = ?1")?
                    .execute(params![conv, st.name])?;
                ev.emit(GroupAction::Renamed, &[], &st)?;
            }
            if let Some(d) = describe {
                st.description = d;
                c.prepare_cached("UPDATE groups SET description = ?2 WHERE conversation_id = ?1")?
                    .execute(params![conv, st.description])?;
                ev.emit(GroupAction::Described, &[], &st)?;
            }
            if let Some(m) = setting {
                st.members_can_add = m;
                c.prepare_cached(
                    "UPDATE groups SET members_can_add = ?2 WHERE conversation_id = ?1",
                )?
                .execute(params![conv, st.members_can_add])?;
                ev.emit(GroupAction::SettingsChanged, &[], &st)?;
            }
        }
    }
    let deliveries = ev.deliveries;
    let after = group(c, group_id)?.ok_or(StoreError::NotFound("group"))?;
    Ok(GroupChange {
        group: after,
        deliveries,
    })
}

pub fn groups_of(
    c: &Connection,
    user: UserId,
    limit: usize,
) -> Result<Vec<GroupSummaryRecord>, StoreError> {
    let mut st = c.prepare_cached(
        "SELECT g.conversation_id, g.name, m.role,
                (SELECT COUNT(*) FROM members x WHERE x.conversation_id = g.conversation_id)
         FROM members m JOIN groups g ON g.conversation_id = m.conversation_id
         WHERE m.user_id = ?1 ORDER BY g.conversation_id LIMIT ?2",
    )?;
    let rows = st.query_map(params![user as i64, limit as i64], |r| {
        Ok(GroupSummaryRecord {
            id: r.get::<_, i64>(0)? as GroupId,
            name: r.get(1)?,
            role: role_from_code(r.get(2)?),
            member_count: r.get::<_, i64>(3)? as u64,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn message_info(
    c: &Connection,
    group: GroupId,
    seq: u64,
) -> Result<Option<MessageInfoRecord>, StoreError> {
    let conv = group as i64;
    let Some(sender) = c
        .prepare_cached(
            "SELECT m.sender_user FROM messages m JOIN groups g ON g.conversation_id = m.conversation_id
             WHERE m.conversation_id = ?1 AND m.seq = ?2 AND m.kind = 0",
        )?
        .query_row(params![conv, seq as i64], |r| r.get::<_, i64>(0))
        .optional()?
    else {
        return Ok(None);
    };
    let mut st = c.prepare_cached(
        "SELECT m.user_id, u.username, COALESCE(r.delivered_up_to, 0), COALESCE(r.read_up_to, 0)
         FROM members m JOIN users u ON u.id = m.user_id
         LEFT JOIN receipts r ON r.conversation_id = m.conversation_id AND r.reader = m.user_id
         WHERE m.conversation_id = ?1 AND m.joined_seq < ?2 AND m.user_id != ?3
         ORDER BY u.username",
    )?;
    let members = st
        .query_map(params![conv, seq as i64, sender], |r| {
            Ok(MemberReceiptRecord {
                user: UserRef {
                    id: r.get::<_, i64>(0)? as UserId,
                    username: r.get(1)?,
                },
                delivered: r.get::<_, i64>(2)? as u64 >= seq,
                read: r.get::<_, i64>(3)? as u64 >= seq,
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(Some(MessageInfoRecord {
        group,
        seq,
        sender: sender as UserId,
        members,
    }))
}
